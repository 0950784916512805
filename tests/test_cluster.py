"""The multi-node topology on one machine (docs/scaling.md): `pacegate demo --cluster
--chaos` with a node of every tier SIGKILLed mid-run loses no acknowledged reading and stores
none twice; `pacegate cluster up` starts every node and stops every process it started."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from console.cluster import Cluster, ClusterService
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[1]


def _fresh_root() -> Path:
    # the throwaway PostgreSQL runs as the 'postgres' user, which must enter the directory;
    # pytest's base temporary directory is 0700
    root = Path(tempfile.mkdtemp(prefix="pacegate-cluster-"))
    root.chmod(0o711)
    return root


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_demo_on_the_cluster_with_a_node_of_every_tier_killed_loses_nothing() -> None:
    root = _fresh_root()
    work = root / "W"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "console",
                "demo",
                "--cluster",
                "--chaos",
                "--json",
                "--workdir",
                str(work),
                "--devices",
                "6",
                "--duration",
                "15",
                "--rate",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=540,
            cwd=REPO,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        report = json.loads(proc.stdout)
        assert report["topology"] == {
            "edges": 2,
            "hospitals": 2,
            "workers": 2,
            "store": "postgresql",
            "analytics": "dask",
        }
        assert {"edge-2-broker", "edge-2-gateway", "hospital-1"} <= set(report["killed"])
        assert any(k.startswith("dask-worker") for k in report["killed"])
        # the supervisor brought each killed pacegate service back
        for name in ("edge-2-broker", "edge-2-gateway", "hospital-1"):
            assert report["restarted"][name] >= 1, report["restarted"]
        assert report["acknowledged"] > 0
        assert report["lost"] == 0
        assert report["duplicates_stored"] == 0
        assert report["stored"] >= report["acknowledged"]
        assert report["analysis"]["ok"] is True
        assert report["analysis"]["count"] == report["stored"]
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_cluster_up_starts_every_node_and_stops_every_process_it_started() -> None:
    root = _fresh_root()
    work = root / "W"
    log = root / "up.log"
    try:
        with open(log, "w") as out:
            up = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "console",
                    "cluster",
                    "up",
                    "--workdir",
                    str(work),
                    "--edges",
                    "2",
                    "--hospitals",
                    "1",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            assert wait_until(lambda: "cluster is up" in log.read_text(), 180), log.read_text()
            topology = json.loads((work / "cluster.json").read_text())
            assert len(topology["edges"]) == 2
            assert topology["store"] == "postgresql"
            children = psutil.Process(up.pid).children(recursive=True)
            names = {" ".join(c.cmdline()) for c in children}
            for what in ("broker -c", "gateway -c", "hospital -c", "cloud -c", "trust serve"):
                assert any(what in n for n in names), what
            # no edge node holds the CA key
            assert not list(work.glob("edge-*/pki/ca.key"))
            up.send_signal(signal.SIGTERM)
            assert up.wait(timeout=120) == 0
            _gone, alive = psutil.wait_procs(children, timeout=30)
            assert alive == []
            # and the throwaway PostgreSQL stopped with it
            assert not (work / "postgres" / "data" / "postmaster.pid").exists()
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def test_cluster_plan_orders_the_stop_device_side_first(tmp_path: Path) -> None:
    """The cluster is a Stack whose services are its plan; it stops the brokers first and
    the cloud last, whatever order they started in."""
    from console.endpoints import Endpoints
    from console.workdir import WorkLayout

    plan = {
        name: ClusterService(["true"], ("127.0.0.1", 0), rank)
        for name, rank in (("cloud", 5), ("hospital-1", 3), ("edge-1-broker", 0))
    }
    cluster = Cluster(WorkLayout(tmp_path), Endpoints(), plan=plan)
    assert cluster.service_names() == ("cloud", "hospital-1", "edge-1-broker")
    assert sorted(plan, key=cluster.stop_rank) == ["edge-1-broker", "hospital-1", "cloud"]
