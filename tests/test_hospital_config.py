"""hospital.yaml: the default parses, every mistake names file, line, key and fix; and the
``pacegate hospital verify|rotate-key`` commands over a real store."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from console.cli import main as pacegate_main
from console.workdir import WorkLayout, hospital_config_text
from hospital.config import load_hospital_config
from hospital.store import SqliteReadingStore
from pacegate.errors import ConfigError
from pacegate.ingest import IngestItem
from pacegate.reading import Reading


@pytest.fixture
def work(tmp_path: Path) -> WorkLayout:
    w = WorkLayout(tmp_path / "work")
    w.root.mkdir()
    w.hospital_config.write_text(
        hospital_config_text(
            w,
            host="127.0.0.1",
            port=18884,
            metrics_port=0,
            cloud_host="127.0.0.1",
            cloud_port=18885,
        )
    )
    return w


def write(work: WorkLayout, text: str) -> Path:
    work.hospital_config.write_text(text)
    return work.hospital_config


def test_default_config_parses_with_paths_relative_to_the_file(work: WorkLayout) -> None:
    cfg = load_hospital_config(work.hospital_config)
    assert (cfg.listen_host, cfg.listen_port, cfg.metrics_port) == ("127.0.0.1", 18884, 0)
    assert cfg.identity_key == work.pki.channel_key("hospital")
    assert cfg.allowed_gateways == {"gateway": work.pki.channel_pub("gateway")}
    assert cfg.sqlite_database == work.hospital_dir / "readings.db"
    assert cfg.keyring == work.hospital_dir / "keyring.json"
    assert (cfg.cloud.host, cfg.cloud.port, cfg.cloud.server_name) == ("127.0.0.1", 18885, "cloud")
    assert cfg.cloud.server_key == work.pki.channel_pub("cloud")


def test_unknown_key_names_file_line_and_the_allowed_keys(work: WorkLayout) -> None:
    text = work.hospital_config.read_text().replace("  keyring:", "  keyrnig:")
    path = write(work, text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "keyrnig" in ln)
    with pytest.raises(ConfigError) as info:
        load_hospital_config(path)
    assert f"hospital.yaml:{line}: store.keyrnig: unknown key" in str(info.value)
    assert "keyring" in str(info.value)


def test_missing_identity_key_file_is_reported_for_the_service(work: WorkLayout) -> None:
    with pytest.raises(ConfigError) as info:
        load_hospital_config(work.hospital_config, require_channel_files=True)
    assert "identity.key" in str(info.value)
    assert "pacegate pki" in str(info.value)
    load_hospital_config(work.hospital_config)  # verify/rotate-key do not need it


def test_no_allowed_gateway_is_refused(work: WorkLayout) -> None:
    text = work.hospital_config.read_text()
    text = text.replace("  gateway: pki/channel/gateway.mldsa.pub\n", "")
    text = text.replace("allowed_gateways:", "allowed_gateways: {}\n#")
    with pytest.raises(ConfigError, match="allowed_gateways"):
        load_hospital_config(write(work, text))


def test_out_of_range_port_names_the_key(work: WorkLayout) -> None:
    text = work.hospital_config.read_text().replace("port: 18884", "port: 70000")
    with pytest.raises(ConfigError, match=r"listen\.port: 70000 is out of range"):
        load_hospital_config(write(work, text))


def test_bad_gateway_name_is_refused(work: WorkLayout) -> None:
    text = work.hospital_config.read_text().replace("  gateway: pki", "  Gate/Way: pki")
    with pytest.raises(ConfigError, match="not a valid identity name"):
        load_hospital_config(write(work, text))


def test_keyring_inside_the_database_file_is_refused(work: WorkLayout) -> None:
    text = work.hospital_config.read_text().replace("keyring.json", "readings.db")
    with pytest.raises(ConfigError, match=r"store\.keyring: is the database file"):
        load_hospital_config(write(work, text))


# -- the commands ---------------------------------------------------------------------------
def fill(work: WorkLayout, n: int) -> None:
    cfg = load_hospital_config(work.hospital_config)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring) as s:
        s.store_batch([IngestItem("pm-0001", i, Reading(60, 72, 1, t0)) for i in range(1, n + 1)])


def test_verify_command_exits_zero_on_a_whole_chain(
    work: WorkLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(work, 12)
    assert pacegate_main(["hospital", "verify", "-c", str(work.hospital_config)]) == 0
    assert "verify: OK: 12 rows" in capsys.readouterr().err


def test_verify_command_reports_a_deleted_row_and_exits_nonzero(
    work: WorkLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(work, 12)
    with sqlite3.connect(work.hospital_dir / "readings.db", isolation_level=None) as c:
        c.execute("DELETE FROM readings WHERE seq = 4")
    assert pacegate_main(["hospital", "verify", "-c", str(work.hospital_config)]) == 1
    err = capsys.readouterr().err
    assert "verify: FAILED" in err
    assert "row 5: missing_rows: row 4 deleted" in err


def test_rotate_key_command_reencrypts_every_row(
    work: WorkLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(work, 12)
    assert pacegate_main(["hospital", "rotate-key", "-c", str(work.hospital_config)]) == 0
    err = capsys.readouterr().err
    assert "key version 2 now encrypts; 12 rows re-encrypted; retired versions: 1" in err
    assert pacegate_main(["hospital", "verify", "-c", str(work.hospital_config)]) == 0


def test_commands_report_a_bad_config_with_exit_code_2(
    work: WorkLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    write(work, "store: [1, 2]\n")
    assert pacegate_main(["hospital", "verify", "-c", str(work.hospital_config)]) == 2
    assert "configuration error" in capsys.readouterr().err


def test_verify_json_reports_problems_as_one_object(
    work: WorkLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    fill(work, 6)
    with sqlite3.connect(work.hospital_dir / "readings.db", isolation_level=None) as c:
        c.execute("DELETE FROM readings WHERE seq = 6")
    assert pacegate_main(["hospital", "verify", "--json", "-c", str(work.hospital_config)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["rows"] == 5
    assert [p["kind"] for p in report["problems"]] == ["head_mismatch", "rolled_back"]


def test_rotate_key_keep_old_leaves_both_keys(work: WorkLayout) -> None:
    from hospital.keyring import Keyring

    fill(work, 3)
    argv = ["hospital", "rotate-key", "--keep-old", "-c", str(work.hospital_config)]
    assert pacegate_main(argv) == 0
    assert Keyring.load(work.hospital_dir / "keyring.json").versions == [1, 2]


def _with_store(work: WorkLayout, section: str) -> Path:
    import re

    text = re.sub(
        r"^store:\n(?:[ #].*\n)*", section, work.hospital_config.read_text(), count=1, flags=re.M
    )
    return write(work, text)


def test_store_backend_postgresql_names_its_dsn_file_writer_and_anchor(work: WorkLayout) -> None:
    path = _with_store(
        work,
        "store:\n  backend: postgresql\n  dsn_file: hospital/pg.dsn\n"
        "  writer: hospital-1\n  keyring: hospital/keyring.json\n",
    )
    cfg = load_hospital_config(path)
    assert cfg.postgres is not None
    assert cfg.database is None
    assert cfg.postgres.dsn_file == work.hospital_dir / "pg.dsn"
    assert cfg.postgres.writer == "hospital-1"
    assert cfg.anchor == work.hospital_dir / "hospital-1-anchor"  # the node's own, by default
    with pytest.raises(ConfigError, match=r"store\.backend.*PostgreSQL"):
        _ = cfg.sqlite_database
    assert load_hospital_config(work.hospital_config).postgres is not None


@pytest.mark.parametrize(
    ("store", "key", "fix"),
    [
        ("  backend: mysql\n", "store.backend", "'postgresql'"),
        ("  backend: postgresql\n  writer: n1\n", "store.dsn_file", "add 'dsn_file:'"),
        ("  backend: postgresql\n  dsn_file: pg.dsn\n", "store.writer", "add 'writer:'"),
        (
            "  backend: postgresql\n  dsn_file: pg.dsn\n  writer: 'node 1'\n",
            "store.writer",
            "one per ingest node",
        ),
        (
            "  backend: postgresql\n  dsn_file: pg.dsn\n  writer: n1\n  database: r.db\n",
            "store.database",
            "remove 'database'",
        ),
        ("  database: r.db\n  writer: n1\n", "store.writer", "remove 'writer'"),
        ("  database: r.db\n  dsn_file: pg.dsn\n", "store.dsn_file", "remove 'dsn_file'"),
    ],
)
def test_store_backend_mistakes_name_the_file_line_key_and_fix(
    work: WorkLayout, store: str, key: str, fix: str
) -> None:
    path = _with_store(work, "store:\n  keyring: k.json\n" + store)
    with pytest.raises(ConfigError) as info:
        load_hospital_config(path)
    message = str(info.value)
    assert "hospital.yaml:" in message, message
    assert key in message, message
    assert fix in message, message


def test_dsn_file_missing_or_shared_is_refused_without_showing_its_content(
    work: WorkLayout,
) -> None:
    from hospital.store import open_store
    from pacegate.layout import write_secret

    path = _with_store(
        work,
        "store:\n  backend: postgresql\n  dsn_file: pg.dsn\n  writer: n1\n  keyring: k.json\n",
    )
    cfg = load_hospital_config(path)
    assert cfg.postgres is not None
    with pytest.raises(ConfigError, match=r"pg\.dsn: store\.dsn_file: DSN file not found"):
        open_store(cfg)
    write_secret(cfg.postgres.dsn_file, b"host=127.0.0.1 password=hunter2\n")
    cfg.postgres.dsn_file.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        cfg.postgres.read_dsn()
    assert "hunter2" not in str(info.value)
    cfg.postgres.dsn_file.chmod(0o600)
    assert cfg.postgres.read_dsn() == "host=127.0.0.1 password=hunter2"
