"""The key-schedule and record test vectors published in docs/channel.md, recomputed with
the code and with an independent reimplementation written from the document alone."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacegate.channel import keyschedule as ks

DOC = Path(__file__).resolve().parent.parent / "docs" / "channel.md"


def load_vectors() -> dict[str, bytes]:
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"```json channel-vectors\n(.*?)```", text, re.S)
    assert block, f"{DOC}: no ```json channel-vectors block"
    return {k: bytes.fromhex(v) for k, v in json.loads(block.group(1)).items()}


V = load_vectors()


# ---- the independent reading of docs/channel.md (RFC 5869 by hand, no pacegate code)
def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def _expand(secret: bytes, label: str, ctx: bytes, n: int) -> bytes:
    info = b"pacegate-channel v2 " + label.encode() + struct.pack(">H", len(ctx)) + ctx
    out, block, i = b"", b"", 1
    while len(out) < n:
        block = hmac.new(secret, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:n]


def doc_schedule() -> dict[str, bytes]:
    hs = _extract(b"pacegate-channel v2", V["shared"] + V["th_hello"])
    master = _expand(hs, "master", V["th_full"], 32)
    e0, e1 = struct.pack(">I", 0), struct.pack(">I", 1)
    master1 = _extract(_expand(master, "rekey", V["th_ku"], 32), V["shared_rekey"] + V["th_ku"])
    return {
        "hs_secret": hs,
        "c_hs_key": _expand(hs, "c hs key", V["th_hello"], 32),
        "c_hs_iv": _expand(hs, "c hs iv", V["th_hello"], 12),
        "s_hs_key": _expand(hs, "s hs key", V["th_hello"], 32),
        "s_hs_iv": _expand(hs, "s hs iv", V["th_hello"], 12),
        "master": master,
        "c_ap0_key": _expand(master, "c ap key", e0, 32),
        "c_ap0_iv": _expand(master, "c ap iv", e0, 12),
        "s_ap0_key": _expand(master, "s ap key", e0, 32),
        "s_ap0_iv": _expand(master, "s ap iv", e0, 12),
        "master_epoch1": master1,
        "c_ap1_key": _expand(master1, "c ap key", e1, 32),
        "s_ap1_key": _expand(master1, "s ap key", e1, 32),
    }


def code_schedule() -> dict[str, bytes]:
    hs = ks.handshake_secret(V["shared"], V["th_hello"])
    c_hs, s_hs = ks.handshake_keys(hs, V["th_hello"])
    master = ks.master_secret(hs, V["th_full"])
    c0, s0 = ks.application_keys(master, 0)
    master1 = ks.next_master_secret(master, V["shared_rekey"], V["th_ku"])
    c1, s1 = ks.application_keys(master1, 1)
    return {
        "hs_secret": hs,
        "c_hs_key": c_hs.key,
        "c_hs_iv": c_hs.iv,
        "s_hs_key": s_hs.key,
        "s_hs_iv": s_hs.iv,
        "master": master,
        "c_ap0_key": c0.key,
        "c_ap0_iv": c0.iv,
        "s_ap0_key": s0.key,
        "s_ap0_iv": s0.iv,
        "master_epoch1": master1,
        "c_ap1_key": c1.key,
        "s_ap1_key": s1.key,
    }


@pytest.mark.parametrize("name", sorted(doc_schedule()))
def test_key_schedule_matches_the_published_vector(name: str) -> None:
    assert doc_schedule()[name] == V[name], "docs/channel.md disagrees with itself"
    assert code_schedule()[name] == V[name], "the code disagrees with docs/channel.md"


@pytest.mark.parametrize("seq", [0, 1])
def test_record_layer_matches_the_published_vector(seq: int) -> None:
    expected = V[f"record_seq{seq}"]
    header = expected[:5]
    assert header == b"\x17" + struct.pack(">I", len(V["record_inner"]) + 16)
    nonce = (int.from_bytes(V["c_ap0_iv"], "big") ^ seq).to_bytes(12, "big")
    assert header + AESGCM(V["c_ap0_key"]).encrypt(nonce, V["record_inner"], header) == expected
    protection = ks.RecordProtection(ks.TrafficKeys(V["c_ap0_key"], V["c_ap0_iv"]))
    sealed = [header + protection.seal(header, V["record_inner"]) for _ in range(2)]
    assert sealed[seq] == expected
