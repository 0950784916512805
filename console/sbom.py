"""Complete the CycloneDX SBOM of pacegate's environment (``./dev sbom``).

``cyclonedx-py environment`` lists the Python distributions installed in the virtualenv. What
runs pacegate is more than that, and a medical-device SBOM names it all (FDA premarket
cybersecurity guidance, section V.A.4: commercial, open-source and off-the-shelf components):

- the OpenSSL that pyca ``cryptography`` bundles in its wheel (ML-KEM, ML-DSA, AES-GCM,
  ChaCha20-Poly1305, Fernet all run in it), which no Python package metadata names;
- the OpenSSL that Python's ``ssl`` module links (every MQTT TLS 1.3 connection runs in it);
- the Python interpreter;
- the Debian packages pacegate starts (``mosquitto``, ``tshark``), from ``dpkg-query``.

Usage: ``python -m console.sbom ENV_SBOM OUT [--deb PACKAGE ...]``. The result is validated
against the CycloneDX JSON schema of its spec version before it is written.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

SBOM_FILE_MODE = 0o644  # an SBOM is meant to be shared with buyers and regulators
DPKG_TIMEOUT_S = 30.0
_VERSION = re.compile(r"OpenSSL (\d+\.\d+\.\d+\S*)")


def _openssl_version(text: str) -> str:
    m = _VERSION.search(text)
    return m.group(1) if m else text


def _cryptography_openssl() -> str:
    # Only the version string of the OpenSSL inside the wheel: no cryptography happens here.
    from cryptography.hazmat.backends.openssl.backend import backend

    return str(backend.openssl_version_text())


def _component(name: str, version: str, purl: str, ctype: str, description: str) -> dict[str, Any]:
    return {
        "bom-ref": purl,
        "type": ctype,
        "name": name,
        "version": version,
        "purl": purl,
        "description": description,
    }


def _debian_packages(names: list[str]) -> list[dict[str, Any]]:
    dpkg = shutil.which("dpkg-query")
    if dpkg is None or not names:
        return []
    proc = subprocess.run(
        [dpkg, "-W", "-f", "${Package}\t${Version}\t${Architecture}\n", *names],
        capture_output=True,
        text=True,
        timeout=DPKG_TIMEOUT_S,
        check=False,
    )
    out = []
    for line in proc.stdout.splitlines():
        name, version, arch = [*line.split("\t"), "", "", ""][:3]
        if not version:
            continue  # not installed: nothing to declare
        out.append(
            _component(
                name,
                version,
                f"pkg:deb/debian/{name}@{version}?arch={arch}",
                "application",
                "Debian package started by pacegate",
            )
        )
    return out


def complete(bom: dict[str, Any], debian: list[str]) -> dict[str, Any]:
    """Add the components the Python metadata does not name (see the module docstring)."""
    components: list[dict[str, Any]] = bom.setdefault("components", [])
    bundled = _openssl_version(_cryptography_openssl())
    system = _openssl_version(ssl.OPENSSL_VERSION)
    py = platform.python_version()
    extra = [
        _component(
            "openssl",
            bundled,
            f"pkg:generic/openssl@{bundled}?bundled-in=cryptography",
            "library",
            "OpenSSL statically bundled in the pyca cryptography wheel (ML-KEM-768, ML-DSA-65, "
            "AES-GCM, ChaCha20-Poly1305, Fernet)",
        ),
        _component(
            "openssl",
            system,
            f"pkg:generic/openssl@{system}?linked-by=python-ssl",
            "library",
            "OpenSSL linked by Python's ssl module (MQTT over TLS 1.3)",
        ),
        _component(
            "cpython", py, f"pkg:generic/cpython@{py}", "application", "the Python interpreter"
        ),
        *_debian_packages(debian),
    ]
    known = {c.get("bom-ref") for c in components}
    components.extend(c for c in extra if c["bom-ref"] not in known)
    deps: list[dict[str, Any]] = bom.setdefault("dependencies", [])
    crypto = next((c for c in components if c.get("name") == "cryptography"), None)
    if crypto is not None:
        deps.append({"ref": extra[0]["bom-ref"], "dependsOn": []})
        for d in deps:
            if d.get("ref") == crypto["bom-ref"]:
                d.setdefault("dependsOn", []).append(extra[0]["bom-ref"])
    return bom


def validate(text: str, spec_version: str) -> None:
    """Raise ``ValueError`` if ``text`` is not valid CycloneDX JSON of ``spec_version``."""
    version = SchemaVersion.from_version(spec_version)
    error = JsonStrictValidator(version).validate_str(text)
    if error is not None:
        raise ValueError(f"not a valid CycloneDX {spec_version} document: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m console.sbom", description=__doc__)
    parser.add_argument("env_sbom", type=Path, help="cyclonedx-py environment output (JSON)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--deb", action="append", default=[], help="a Debian package to add")
    args = parser.parse_args(argv)
    bom = json.loads(args.env_sbom.read_text())
    # pyproject.toml reads the version from pacegate.__version__ (one source), which
    # cyclonedx-py's static --pyproject reading does not follow: name it here
    from pacegate import __version__

    bom.setdefault("metadata", {}).setdefault("component", {}).setdefault("version", __version__)
    text = json.dumps(complete(bom, args.deb), indent=2) + "\n"
    try:
        validate(text, bom.get("specVersion", "1.6"))
    except ValueError as exc:
        print(f"sbom: {exc}", file=sys.stderr)
        return 1
    args.out.write_text(text)
    args.out.chmod(SBOM_FILE_MODE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
