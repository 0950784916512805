"""A deterministic handshake: fixed identities, randoms, ephemeral keys, ML-KEM
encapsulation randomness and deterministic ML-DSA signatures (through the session's test
seams: an injected ``Entropy`` and ``KemProvider``, never a production switch) give exact
frames, transcript bytes, ``th_hello`` and keys, checked in as data
(tests/vectors/channel_handshake_v2.json).

Then everything is derived again from docs/channel.md alone: the frames are parsed with a
parser written here, the shared secrets come from kyber-py and X25519, the schedule from
stdlib HMAC, and the records are opened with AES-GCM. That proves every field the document
lists is in the transcript as documented: leaving any of them (the KEM ciphertext, say) out
of the session's transcript hash changes ``th_hello`` and the keys, and fails here.

Regenerate the data after a deliberate wire change with
``.venv/bin/python -m tests.test_channel_handshake_vector`` (and say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from dilithium_py.ml_dsa import ML_DSA_65
from kyber_py.ml_kem import ML_KEM_768

from pacegate.channel import ChannelIdentity
from pacegate.channel import keyschedule as ks
from pacegate.channel.kem import KemProvider
from pacegate.channel.session import NEED_DATA, ChannelSession, HandshakeComplete, Message
from tests.test_channel_vectors import _expand, _extract

VECTOR = Path(__file__).resolve().parent / "vectors" / "channel_handshake_v2.json"

# ---- the fixed inputs (any bytes would do; these are easy to retype elsewhere)
INPUTS = {
    "client_identity_seed": bytes(range(0x00, 0x20)),  # ML-DSA-65 xi, "gateway"
    "server_identity_seed": bytes(range(0x20, 0x40)),  # ML-DSA-65 xi, "hospital"
    "client_random": bytes(range(0x40, 0x60)),
    "server_random": bytes(range(0x60, 0x80)),
    "client_x25519_private": bytes(range(0x80, 0xA0)),
    "server_x25519_private": bytes(range(0xA0, 0xC0)),
    "client_mlkem_seed": bytes(range(0xC0, 0x100)),  # d || z (64 bytes)
    "server_mlkem_encaps_m": bytes(range(0x30, 0x50)),
}
TIME_MS = 1_780_000_000_000  # the client's and the server's wall clock, in ms
APP_MESSAGE = b"hello hospital"


class FixedEntropy(ks.Entropy):
    """The test seam: one fixed random and X25519 key per side, deterministic ML-DSA
    (FIPS 204 rnd = 0^32, by dilithium-py; pyca verifies what it signs)."""

    def __init__(self, random: bytes, x25519: bytes, signers: dict[bytes, bytes]) -> None:
        self._random: list[bytes] = [random]
        self._x25519: list[bytes] = [x25519]
        self._signers = signers  # ML-DSA public key -> dilithium-py secret key

    def random(self, n: int) -> bytes:
        value = self._random.pop()  # each side draws exactly one
        assert len(value) == n
        return value

    def x25519_private_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self._x25519.pop())

    def sign(self, key: MLDSA65PrivateKey, context: bytes, message: bytes) -> bytes:
        sk = self._signers[key.public_key().public_bytes_raw()]
        return bytes(ML_DSA_65.sign(sk, message, ctx=context, deterministic=True))


class FixedKem(KemProvider):
    """ML-KEM-768 with fixed key-generation seed and encapsulation randomness (kyber-py's
    internal, deterministic encapsulation; pyca generates from the seed and decapsulates)."""

    name = "fixed"

    def __init__(self, seed: bytes = b"", m: bytes = b"") -> None:
        self._seed, self._m = seed, m

    def generate(self) -> tuple[Any, bytes]:
        sk = MLKEM768PrivateKey.from_seed_bytes(self._seed)
        return sk, sk.public_key().public_bytes_raw()

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        shared, ct = ML_KEM_768._encaps_internal(public_key, self._m)
        return bytes(shared), bytes(ct)

    def decapsulate(self, private_key: Any, ciphertext: bytes) -> bytes:
        assert isinstance(private_key, MLKEM768PrivateKey)
        return private_key.decapsulate(ciphertext)


def run_handshake() -> dict[str, bytes]:
    """The real sessions, made deterministic only through their injected parameters."""
    c_key = MLDSA65PrivateKey.from_seed_bytes(INPUTS["client_identity_seed"])
    s_key = MLDSA65PrivateKey.from_seed_bytes(INPUTS["server_identity_seed"])
    signers = {}
    for seed in (INPUTS["client_identity_seed"], INPUTS["server_identity_seed"]):
        pk, sk = ML_DSA_65._keygen_internal(seed)
        signers[bytes(pk)] = bytes(sk)
    clock = lambda: TIME_MS / 1000  # noqa: E731
    client = ChannelSession.client(
        ChannelIdentity("gateway", c_key),
        server_name="hospital",
        server_key=s_key.public_key(),
        kem=FixedKem(seed=INPUTS["client_mlkem_seed"]),
        entropy=FixedEntropy(INPUTS["client_random"], INPUTS["client_x25519_private"], signers),
        wall_clock=clock,
    )
    server = ChannelSession.server(
        ChannelIdentity("hospital", s_key),
        allowed_clients={"gateway": c_key.public_key()},
        kem=FixedKem(m=INPUTS["server_mlkem_encaps_m"]),
        entropy=FixedEntropy(INPUTS["server_random"], INPUTS["server_x25519_private"], signers),
        wall_clock=clock,
    )
    client_hello = client.initiate()
    server.receive_data(client_hello)
    assert server.next_event() is NEED_DATA
    server_hello = server.data_to_send()
    client.receive_data(server_hello)
    assert client.next_event() is NEED_DATA
    client_auth = client.data_to_send()
    server.receive_data(client_auth)
    assert server.next_event() == HandshakeComplete("gateway")
    server_auth = server.data_to_send()
    client.receive_data(server_auth)
    assert client.next_event() == HandshakeComplete("hospital")
    app_record = client.send(APP_MESSAGE)
    server.receive_data(app_record)
    assert server.next_event() == Message(APP_MESSAGE)
    assert client.th_hello == server.th_hello
    assert client.th_full == server.th_full
    assert client.th_hello is not None
    assert client.th_full is not None
    return {
        "client_hello": client_hello,
        "server_hello": server_hello,
        "client_auth_record": client_auth,
        "server_auth_record": server_auth,
        "app_record": app_record,
        "th_hello": client.th_hello,
        "th_full": client.th_full,
    }


# ---- the independent reading of docs/channel.md


class Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        assert len(out) == n, "short field"
        self.pos += n
        return out

    def u(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vec(self, len_size: int) -> bytes:
        return self.take(self.u(len_size))


def unframe(raw: bytes, ftype: int) -> bytes:
    assert raw[0] == ftype
    assert struct.unpack(">I", raw[1:5])[0] == len(raw) - 5
    return raw[5:]


def parse_client_hello(body: bytes) -> dict[str, Any]:
    c = Cursor(body)
    versions = [c.u(2) for _ in range(c.u(1))]
    suites = [c.u(2) for _ in range(c.u(1))]
    out = {
        "versions": versions,
        "suites": suites,
        "random": c.take(32),
        "time_ms": c.u(8),
        "client_name": c.vec(1),
        "server_name": c.vec(1),
        "x25519": c.vec(2),
        "ek": c.vec(2),
    }
    out["signed"] = body[: c.pos]
    out["signature"] = c.vec(2)
    assert c.pos == len(body)
    return out


def parse_server_hello(body: bytes) -> dict[str, Any]:
    c = Cursor(body)
    out = {
        "version": c.u(2),
        "suite": c.u(2),
        "random": c.take(32),
        "x25519": c.vec(2),
        "ct": c.vec(2),
    }
    assert c.pos == len(body)
    return out


def open_record(raw: bytes, key: bytes, iv: bytes, seq: int) -> bytes:
    nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
    return AESGCM(key).decrypt(nonce, raw[5:], raw[:5])


def derive_from_the_document(frames: dict[str, bytes]) -> dict[str, bytes]:
    ch_raw, sh_raw = frames["client_hello"], frames["server_hello"]
    ch = parse_client_hello(unframe(ch_raw, 0x01))
    sh = parse_server_hello(unframe(sh_raw, 0x02))
    c_pub = MLDSA65PrivateKey.from_seed_bytes(INPUTS["client_identity_seed"]).public_key()
    s_pub = MLDSA65PrivateKey.from_seed_bytes(INPUTS["server_identity_seed"]).public_key()
    # every field of both hellos is what the inputs say
    c_x = X25519PrivateKey.from_private_bytes(INPUTS["client_x25519_private"])
    s_x = X25519PrivateKey.from_private_bytes(INPUTS["server_x25519_private"])
    ek, dk = ML_KEM_768.key_derive(INPUTS["client_mlkem_seed"])
    ss_mlkem, ct = ML_KEM_768._encaps_internal(ek, INPUTS["server_mlkem_encaps_m"])
    assert ch["versions"] == [0x0002]
    assert ch["suites"] == [0x0001]
    assert ch["random"] == INPUTS["client_random"]
    assert ch["time_ms"] == TIME_MS
    assert (ch["client_name"], ch["server_name"]) == (b"gateway", b"hospital")
    assert ch["x25519"] == c_x.public_key().public_bytes_raw()
    assert ch["ek"] == ek
    c_pub.verify(ch["signature"], ch["signed"], b"pacegate-channel v2 client hello")
    assert (sh["version"], sh["suite"]) == (0x0002, 0x0001)
    assert sh["random"] == INPUTS["server_random"]
    assert sh["x25519"] == s_x.public_key().public_bytes_raw()
    assert sh["ct"] == ct
    assert ML_KEM_768.decaps(dk, sh["ct"]) == ss_mlkem
    ss_x = c_x.exchange(X25519PublicKey.from_public_bytes(sh["x25519"]))
    assert ss_x == s_x.exchange(X25519PublicKey.from_public_bytes(ch["x25519"]))
    # the key schedule, as documented
    th_hello = hashlib.sha256(ch_raw + sh_raw).digest()
    hs = _extract(b"pacegate-channel v2", ss_mlkem + ss_x + th_hello)
    c_hs_key, c_hs_iv = _expand(hs, "c hs key", th_hello, 32), _expand(hs, "c hs iv", th_hello, 12)
    s_hs_key, s_hs_iv = _expand(hs, "s hs key", th_hello, 32), _expand(hs, "s hs iv", th_hello, 12)
    client_auth = open_record(frames["client_auth_record"], c_hs_key, c_hs_iv, 0)
    c = Cursor(client_auth)
    assert c.take(1) == b"\x10"
    assert c.vec(1) == b"gateway"
    signed_c = hashlib.sha256(ch_raw + sh_raw + b"\x10\x07gateway").digest()
    c_pub.verify(c.vec(2), signed_c, b"pacegate-channel v2 client auth")
    server_auth = open_record(frames["server_auth_record"], s_hs_key, s_hs_iv, 0)
    c = Cursor(server_auth)
    assert c.take(1) == b"\x11"
    assert c.vec(1) == b"hospital"
    signed_s = hashlib.sha256(ch_raw + sh_raw + client_auth + b"\x11\x08hospital").digest()
    s_pub.verify(c.vec(2), signed_s, b"pacegate-channel v2 server auth")
    transcript = ch_raw + sh_raw + client_auth + server_auth
    th_full = hashlib.sha256(transcript).digest()
    master = _expand(hs, "master", th_full, 32)
    e0 = struct.pack(">I", 0)
    c_ap0_key, c_ap0_iv = _expand(master, "c ap key", e0, 32), _expand(master, "c ap iv", e0, 12)
    assert open_record(frames["app_record"], c_ap0_key, c_ap0_iv, 0) == b"\x21" + APP_MESSAGE
    return {
        "transcript": transcript,
        "th_hello": th_hello,
        "hs_secret": hs,
        "c_hs_key": c_hs_key,
        "c_hs_iv": c_hs_iv,
        "s_hs_key": s_hs_key,
        "s_hs_iv": s_hs_iv,
        "th_full": th_full,
        "master": master,
        "c_ap0_key": c_ap0_key,
        "c_ap0_iv": c_ap0_iv,
        "s_ap0_key": _expand(master, "s ap key", e0, 32),
        "s_ap0_iv": _expand(master, "s ap iv", e0, 12),
    }


def current() -> dict[str, bytes]:
    frames = run_handshake()
    return {**INPUTS, **frames, **derive_from_the_document(frames)}


def load_vector() -> dict[str, Any]:
    data = json.loads(VECTOR.read_text(encoding="utf-8"))
    return {k: (v if isinstance(v, int) else bytes.fromhex(v)) for k, v in data.items()}


def test_deterministic_handshake_gives_the_checked_in_frames_and_keys() -> None:
    expected = load_vector()
    assert expected["time_ms"] == TIME_MS
    for name, value in INPUTS.items():
        assert expected[name] == value, f"{VECTOR.name}: input {name} changed"
    got = run_handshake()
    for name, value in got.items():
        assert value == expected[name], f"{name} differs from {VECTOR.name}"


def test_every_documented_field_is_in_the_transcript_by_an_independent_derivation() -> None:
    expected = load_vector()
    frames = run_handshake()
    derived = derive_from_the_document(frames)
    # the session's transcript hashes are the document's
    assert frames["th_hello"] == derived["th_hello"]
    assert frames["th_full"] == derived["th_full"]
    for name, value in derived.items():
        assert value == expected[name], f"{name} differs from {VECTOR.name}"
    # and the session's keys are the document's: its records open under them (above), and
    # its schedule functions give the same bytes
    hs = ks.handshake_secret(
        ML_KEM_768.decaps(
            ML_KEM_768.key_derive(INPUTS["client_mlkem_seed"])[1],
            parse_server_hello(frames["server_hello"][5:])["ct"],
        )
        + X25519PrivateKey.from_private_bytes(INPUTS["client_x25519_private"]).exchange(
            X25519PublicKey.from_public_bytes(
                parse_server_hello(frames["server_hello"][5:])["x25519"]
            )
        ),
        frames["th_hello"],
    )
    assert hs == derived["hs_secret"]
    c_ap0, s_ap0 = ks.application_keys(ks.master_secret(hs, frames["th_full"]), 0)
    assert (c_ap0.key, c_ap0.iv, s_ap0.key, s_ap0.iv) == (
        derived["c_ap0_key"],
        derived["c_ap0_iv"],
        derived["s_ap0_key"],
        derived["s_ap0_iv"],
    )


def test_the_vector_identities_are_the_seeded_keys_of_both_implementations() -> None:
    for seed in (INPUTS["client_identity_seed"], INPUTS["server_identity_seed"]):
        pk, _ = ML_DSA_65._keygen_internal(seed)
        pyca = MLDSA65PrivateKey.from_seed_bytes(seed).public_key()
        assert pyca.public_bytes_raw() == bytes(pk)
        assert isinstance(pyca, MLDSA65PublicKey)


def write_vector() -> None:
    out: dict[str, Any] = {"time_ms": TIME_MS}
    out.update({k: v.hex() for k, v in current().items()})
    VECTOR.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_vector()
