"""The shared core: PSK store at rest, ingest wire format, config errors, log hygiene."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacegate.configfile import load_config
from pacegate.errors import ConfigError
from pacegate.identity import validate_device_id
from pacegate.ingest import (
    FLAG_IMPLAUSIBLE,
    IngestAck,
    IngestBatch,
    IngestItem,
    IngestWireError,
    decode,
    encode_ack,
    encode_batch,
)
from pacegate.keystore import PskStore
from pacegate.log import (
    SUPPRESSED_EVENT,
    EventRateLimiter,
    JsonFormatter,
    RedactingFilter,
    event_limiter,
    flush_security_events,
    security_event,
)
from pacegate.reading import Reading

READING = Reading(40, 82, 42, datetime(2026, 1, 1, tzinfo=UTC))


# -- PSK store ----------------------------------------------------------------------------
def test_psk_store_file_holds_no_psk_in_clear_and_is_private(tmp_path: Path) -> None:
    store = PskStore.create(tmp_path / "psk.store", tmp_path / "psk.key")
    psk = os.urandom(32)
    store.add("pm-0001", psk)
    store.save()
    blob = (tmp_path / "psk.store").read_bytes()
    assert psk not in blob
    assert psk.hex().encode() not in blob
    for name in ("psk.store", "psk.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    loaded = PskStore.load(tmp_path / "psk.store", tmp_path / "psk.key")
    entry = loaded.get("pm-0001")
    assert entry is not None
    assert entry.psk == psk
    assert not entry.revoked


def test_psk_store_revocation_survives_reload(tmp_path: Path) -> None:
    store = PskStore.create(tmp_path / "s", tmp_path / "k")
    store.add("pm-0001", os.urandom(32))
    store.revoke("pm-0001")
    store.save()
    entry = PskStore.load(tmp_path / "s", tmp_path / "k").get("pm-0001")
    assert entry is not None
    assert entry.revoked


def test_tampered_psk_store_is_refused_with_the_file_named(tmp_path: Path) -> None:
    store = PskStore.create(tmp_path / "s", tmp_path / "k")
    store.add("pm-0001", os.urandom(32))
    store.save()
    blob = bytearray((tmp_path / "s").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "s").write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match=str(tmp_path / "s")):
        PskStore.load(tmp_path / "s", tmp_path / "k")


def test_duplicate_device_in_psk_store_is_refused(tmp_path: Path) -> None:
    store = PskStore.create(tmp_path / "s", tmp_path / "k")
    store.add("pm-0001", os.urandom(32))
    with pytest.raises(ValueError, match="already"):
        store.add("pm-0001", os.urandom(32))


@pytest.mark.parametrize("bad", ["", "PM-1", "a/b", "a+b", "#", "..", "a.b", "x" * 65, "gateway"])
def test_unsafe_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        validate_device_id(bad)


# -- ingest wire --------------------------------------------------------------------------
def test_ingest_batch_round_trips() -> None:
    batch = IngestBatch(
        7, (IngestItem("pm-0001", 3, READING), IngestItem("pm-0002", 9, READING, FLAG_IMPLAUSIBLE))
    )
    assert decode(encode_batch(batch)) == batch
    assert decode(encode_ack(IngestAck(7, 1, 1))) == IngestAck(7, 1, 1)


@given(st.binary(max_size=400))
def test_arbitrary_ingest_bytes_decode_or_raise_the_one_wire_error(data: bytes) -> None:
    try:
        decode(data)
    except IngestWireError:
        pass


def test_truncated_ingest_batch_is_refused() -> None:
    raw = encode_batch(IngestBatch(1, (IngestItem("pm-0001", 3, READING),)))
    for end in range(len(raw)):
        with pytest.raises(IngestWireError):
            decode(raw[:end])


# -- config files -------------------------------------------------------------------------
def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    p.write_text("a: 1\nb: [unclosed\nc: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value)
    assert err.value.line is not None


def test_wrong_type_names_file_line_and_key(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    p.write_text("listen:\n  host: 127.0.0.1\n  port: eighty\n")
    with pytest.raises(ConfigError) as err:
        load_config(p).section("listen").get_int("port", 1)
    assert f"{p}:3: listen.port" in str(err.value)


def test_unknown_key_is_refused_with_the_allowed_ones(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    p.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="port"):
        load_config(p).check_keys({"port"})


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "x.yaml"
    p.parent.mkdir()
    p.write_text("ca: ../pki/ca.crt\n")
    assert load_config(p).get_path("ca") == tmp_path / "sub" / ".." / "pki" / "ca.crt"


# -- logs ---------------------------------------------------------------------------------
def test_security_events_are_json_and_secret_fields_are_redacted() -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("pacegate.security")
    logger.addHandler(handler)
    try:
        security_event(
            "reading_rejected",
            component="gateway",
            reason="bad_tag",
            peer="pm-0001",
            psk="00" * 32,
            session_key="ab",
            reading="82bpm",
        )
    finally:
        logger.removeHandler(handler)
    event = json.loads(buf.getvalue())
    assert event["event"] == "reading_rejected"
    assert event["reason"] == "bad_tag"
    assert event["peer"] == "pm-0001"
    assert event["psk"] == event["session_key"] == event["reading"] == "<redacted>"
    assert "00" * 32 not in buf.getvalue()


def test_event_rate_limiter_logs_a_burst_then_counts_and_reports_once_per_window() -> None:
    now = [0.0]
    limiter = EventRateLimiter(burst=3, window=10.0, clock=lambda: now[0])
    key = ("broker", "packet_refused", "qos_invalid", "127.0.0.1")
    assert [limiter.admit(key)[0] for _ in range(5)] == [True, True, True, False, False]
    assert limiter.admit(("broker", "packet_refused", "qos_invalid", "10.0.0.9"))[0]  # per source
    assert limiter.flush() == []  # the window is not over
    now[0] = 10.0
    assert limiter.flush() == [(key, 2)]  # one summary, with the count
    assert limiter.flush() == []
    assert limiter.admit(key) == (True, [])  # a new window


def test_event_rate_limiter_keeps_a_bounded_number_of_keys() -> None:
    limiter = EventRateLimiter(burst=1, window=10.0, max_keys=4, clock=lambda: 0.0)
    for i in range(1000):
        limiter.admit(("broker", "e", "r", f"10.0.{i // 256}.{i % 256}"))
    assert len(limiter._windows) == 5  # 4 sources and one shared overflow key


def test_security_event_flood_is_one_summary_line_per_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr(event_limiter(), "_clock", lambda: now[0])
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pacegate.security")
    logger.addHandler(handler)
    try:
        for _ in range(10_000):
            security_event("puback_ignored", component="broker", reason="x", source="1.2.3.4")
        now[0] += event_limiter().window
        flush_security_events()
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    burst = event_limiter().burst
    assert len(lines) == burst + 1
    summary = lines[-1]
    assert summary["event"] == SUPPRESSED_EVENT
    assert summary["suppressed_event"] == "puback_ignored"
    assert summary["suppressed"] == 10_000 - burst
    assert summary["source"] == "1.2.3.4"


# -- TLS contexts -------------------------------------------------------------------------
def test_tls_key_log_is_created_owner_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pacegate.pki import init_pki
    from pacegate.tlsconf import KEYLOG_ENV, client_context

    pki = init_pki(tmp_path / "pki")
    keylog = tmp_path / "keys.log"
    monkeypatch.setenv(KEYLOG_ENV, str(keylog))
    client_context(pki.ca_cert, pki.gateway_cert, pki.gateway_key)
    assert stat.S_IMODE(keylog.stat().st_mode) == 0o600


def test_garbage_ca_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    from pacegate.pki import init_pki
    from pacegate.tlsconf import client_context

    pki = init_pki(tmp_path / "pki")
    pki.ca_cert.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=str(pki.ca_cert)):
        client_context(pki.ca_cert, pki.gateway_cert, pki.gateway_key)
