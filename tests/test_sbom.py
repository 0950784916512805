"""``./dev sbom`` writes a valid CycloneDX SBOM naming what really runs pacegate."""

from __future__ import annotations

import json
import ssl
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

import pacegate
from console.sbom import validate

REPO = Path(__file__).resolve().parents[1]
SBOM_TIMEOUT = 600  # cyclonedx-py imports and validates; tens of seconds on a busy machine


@pytest.mark.integration
def test_dev_sbom_writes_valid_cyclonedx_naming_the_crypto_broker_and_he_libraries(
    tmp_path: Path,
) -> None:
    out = tmp_path / "pacegate.cdx.json"
    proc = subprocess.run(
        ["./dev", "sbom", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SBOM_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    bom = json.loads(text)
    assert bom["bomFormat"] == "CycloneDX"
    # checked by the CycloneDX library's own schema validator, not only by console.sbom
    assert (
        JsonStrictValidator(SchemaVersion.from_version(bom["specVersion"])).validate_str(text)
        is None
    )
    assert bom["metadata"]["component"]["name"] == "pacegate"
    assert bom["metadata"]["component"]["version"] == pacegate.__version__

    by_name: dict[str, list[dict[str, str]]] = {}
    for c in bom["components"]:
        assert c.get("version"), c
        assert c.get("purl"), c
        by_name.setdefault(c["name"].lower(), []).append(c)
    for dist in ("cryptography", "amqtt", "tenseal", "paho-mqtt", "ruamel.yaml"):
        (comp,) = by_name[dist]
        assert comp["version"] == version(dist)
        assert comp["purl"] == f"pkg:pypi/{dist}@{version(dist)}"
    # the OpenSSL builds that do the cryptography, which no Python metadata names
    openssl = {c["purl"].split("?")[1]: c["version"] for c in by_name["openssl"]}
    assert openssl["linked-by=python-ssl"] in ssl.OPENSSL_VERSION
    assert "bundled-in=cryptography" in openssl
    crypto_ref = by_name["cryptography"][0]["bom-ref"]
    (crypto_deps,) = [d for d in bom["dependencies"] if d["ref"] == crypto_ref]
    assert any("bundled-in=cryptography" in ref for ref in crypto_deps["dependsOn"])
    assert out.stat().st_mode & 0o777 == 0o644
    assert not (tmp_path / "pacegate.cdx.json.python").exists()


def test_an_invalid_sbom_is_refused_before_it_is_written() -> None:
    bad = json.dumps(
        {"bomFormat": "CycloneDX", "specVersion": "1.6", "components": [{"name": "x"}]}
    )
    with pytest.raises(ValueError, match=r"not a valid CycloneDX 1\.6"):
        validate(bad, "1.6")


def test_security_policy_gives_a_private_channel_timelines_and_supported_versions() -> None:
    policy = (REPO / "SECURITY.md").read_text()
    for heading in (
        "## Supported versions",
        "## Reporting a vulnerability",
        "## What happens next",
        "## Vulnerabilities in the components we ship",
        "## Scope",
    ):
        assert heading in policy
    # the supported line is the package's own version line
    major_minor = ".".join(pacegate.__version__.split(".")[:2])
    assert f"| {major_minor}.x" in policy
    assert "privately" in policy
    assert "Do **not** open a public issue" in policy
    assert "CVSS" in policy
    assert "./dev sbom" in policy
    assert (REPO / "docs" / "out-of-scope.md").exists()
