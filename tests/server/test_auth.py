"""Tokens, tenants, namespaces, quotas, unauthenticated mode, the printed default token and TLS.

Servers are real ``kvstore serve`` processes; the Authenticator and the
config checks are also tested directly (no process).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import socket
import ssl
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from kvstore.blockformat import HEADER_BYTES as BLOB_HEADER_BYTES
from kvstore.blockformat import BlockHeader
from kvstore.client import Connection
from kvstore.protocol import (FLAG_ERROR, FLAG_REPLY, HEADER_BYTES, Header, Op, PutResult, ServerError, Status,
                              pack_hello)
from kvstore.server.auth import (DEFAULT_NAMESPACE, MIN_TOKEN_CHARS, Authenticator, Tenant, default_token,
                                 load_tenants)
from kvstore.server.blobs import BLOCK_OVERHEAD_BYTES
from kvstore.server.config import ServerConfig
from kvstore.server.serve import tenants_of

from .conftest import TOKEN, ServerProcess

LAYOUT = b"A" * 16
TOKEN_A = "tenant-a-secret-0123456789abcdef"
TOKEN_B = "tenant-b-secret-0123456789abcdef"
QUOTA_A = 64 << 10
CAPACITY = 64 << 20


def blob(key: bytes, payload: bytes) -> bytes:
    return BlockHeader.for_payload(key, LAYOUT, payload).pack() + payload


def payload_of(seed: object, size: int) -> bytes:
    return random.Random(repr(seed)).randbytes(size)


def get_one(conn: Connection, keys: list[bytes]) -> list[bytes | None]:
    """Blobs of ``keys`` (None: miss), read through the client."""
    out: dict[int, bytearray] = {}
    sizes = conn.get(keys, lambda i, size: [memoryview(out.setdefault(i, bytearray(size)))])
    return [None if size is None else bytes(out[i]) for i, size in enumerate(sizes)]


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def raw_hello(url: str, token: str | None) -> tuple[Header, bytes, bytes]:
    """Send a HELLO by hand: (reply header, reply payload, what came after it before the server closed)."""
    with socket.create_connection(host_port(url), timeout=2.0) as sock:
        payload = pack_hello(token)
        sock.sendall(Header(Op.HELLO, 42, 0, len(payload)).pack() + payload)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    header = Header.unpack(data[:HEADER_BYTES])
    end = HEADER_BYTES + header.payload_len
    return header, data[HEADER_BYTES:end], data[end:]


def stop_server(server: ServerProcess) -> None:
    server.kill()
    if server.proc is not None and server.proc.stdout is not None:
        server.proc.stdout.close()


# -- a server with two tenants ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tenants_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("two-namespaces") / "tokens.toml"
    path.write_text(f'[tenants.a]\ntoken = "{TOKEN_A}"\nquota = "64KiB"\noperator = true\n\n'
                    f'[tenants.b]\ntoken = "{TOKEN_B}"\n')
    server = ServerProcess(tmp_path_factory.mktemp("two-namespaces-data"), "--tokens-file", str(path), "--host-bytes",
                           "16MiB", "--disk-bytes", "64MiB", "--disk-sync", "false", token=None).start()
    assert "2 tenant(s): a, b" in "".join(server.output)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def conn_a(tenants_server):
    conn = Connection(tenants_server.url, TOKEN_A, 10.0)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def conn_b(tenants_server):
    conn = Connection(tenants_server.url, TOKEN_B, 10.0)
    yield conn
    conn.close()


def test_each_token_names_its_namespace_and_quota(conn_a, conn_b):
    assert (conn_a.welcome.namespace, conn_a.welcome.quota_bytes) == ("a", QUOTA_A)
    assert (conn_b.welcome.namespace, conn_b.welcome.quota_bytes) == ("b", CAPACITY)  # no quota: the capacity
    assert conn_a.stats()["namespace"] == "a" and conn_b.stats()["namespace"] == "b"
    assert conn_a.stats()["blocks"]["quota_bytes"] == QUOTA_A and conn_b.stats()["blocks"]["quota_bytes"] == 0


WRONG_TOKENS = {
    "unknown": "not-a-token-of-anybody-0123456789",
    "a's token less its last character": TOKEN_A[:-1],
    "a's token plus a character": TOKEN_A + "x",
    "a's token in upper case": TOKEN_A.upper(),
    "a's token with a NUL": TOKEN_A + "\0",
    "the default test token": TOKEN,
    "a space": " ",
}


def test_a_tenant_learns_nothing_of_another_through_stats_or_metrics(tenants_server, conn_a, conn_b, tmp_path):
    """Tenant b's STATS is its own namespace only; the server's totals (what a holds) go to the operator (a);
    /metrics, which needs no token, names no namespace unless the operator asks for it."""
    key = b"private-to-a"
    conn_a.put([(key, [blob(key, payload_of("private", 2000))])])
    mine = conn_b.stats()
    assert mine["namespace"] == "b" and "server" not in mine
    assert set(mine) == {"namespace", "blocks"}
    assert conn_a.stats()["server"]["blocks"] >= 1  # the operator sees the whole server
    text = urllib.request.urlopen(tenants_server.metrics_url + "/metrics", timeout=10).read().decode()
    assert 'namespace="a"' not in text and 'namespace="b"' not in text and "kvstore_server_namespace_bytes" in text
    path = tmp_path / "tokens.toml"
    path.write_text(f'[tenants.a]\ntoken = "{TOKEN_A}"\n\n[tenants.b]\ntoken = "{TOKEN_B}"\n')
    shown = ServerProcess(tmp_path / "data", "--tokens-file", str(path), "--metrics-namespaces", "true",
                          token=None).start()
    try:
        conn = Connection(shown.url, TOKEN_B, 10.0)
        conn.put([(key, [blob(key, payload_of("b", 100))])])
        assert "server" not in conn.stats()  # no operator in this file: nobody sees the totals over STATS
        conn.close()
        text = urllib.request.urlopen(shown.metrics_url + "/metrics", timeout=10).read().decode()
        assert 'kvstore_server_namespace_bytes{namespace="b"}' in text  # the operator turned them on
    finally:
        stop_server(shown)


@pytest.mark.parametrize("case", list(WRONG_TOKENS))
def test_a_wrong_token_is_unauthorized_and_closed(tenants_server, conn_a, case):
    token = WRONG_TOKENS[case]
    with pytest.raises(ServerError) as info:
        Connection(tenants_server.url, token, 5.0)
    assert info.value.status == Status.UNAUTHORIZED
    header, message, after = raw_hello(tenants_server.url, token)
    assert header.flags == FLAG_REPLY | FLAG_ERROR and header.status == Status.UNAUTHORIZED
    assert (header.opcode, header.request_id) == (Op.HELLO, 42)
    assert b"token" in message and after == b""  # and then the server closed the connection
    assert TOKEN_A.encode() not in message and TOKEN_B.encode() not in message
    assert conn_a.ping(b"unaffected") == b"unaffected"


@pytest.mark.parametrize("token", [None, ""])
def test_an_empty_token_is_refused(tenants_server, token):
    with pytest.raises(ServerError) as info:
        Connection(tenants_server.url, token, 5.0)
    assert info.value.status == Status.UNAUTHORIZED


def test_failed_logins_are_counted(tenants_server):
    def failures() -> float:
        text = urllib.request.urlopen(tenants_server.metrics_url + "/metrics", timeout=5).read().decode()
        match = re.search(r"^kvstore_server_auth_failures_total (\S+)$", text, re.M)
        return float(match.group(1))
    before = failures()
    for _ in range(3):
        with pytest.raises(ServerError):
            Connection(tenants_server.url, "guess-guess-guess-guess", 5.0)
    assert failures() == before + 3


def test_namespaces_are_isolated_even_with_the_exact_keys(conn_a, conn_b):
    keys = [hashlib.sha256(f"isolated/{i}".encode()).digest() for i in range(4)]
    blobs = [blob(k, payload_of(k, 2000)) for k in keys]
    assert conn_a.put([(k, [b]) for k, b in zip(keys, blobs)]) == [PutResult.STORED] * 4
    # b can never read, test for, list or delete a's blocks.
    assert get_one(conn_b, keys) == [None] * 4
    assert conn_b.exists_prefix(keys) == 0
    assert conn_b.exists_prefix(keys[:1]) == 0
    assert conn_b.delete(keys) == [False] * 4
    assert not set(keys) & set(conn_b.list_keys())
    # a's blocks are intact afterwards.
    assert get_one(conn_a, keys) == blobs
    assert conn_a.exists_prefix(keys) == 4
    assert set(keys) <= set(conn_a.list_keys())


def test_the_same_key_in_two_namespaces_holds_different_bytes(tenants_server, conn_a, conn_b):
    key = hashlib.sha256(b"shared key").digest()
    blob_a, blob_b = blob(key, b"bytes of a" * 100), blob(key, b"bytes of b" * 300)
    assert conn_a.put([(key, [blob_a])]) == [PutResult.STORED]
    assert conn_b.put([(key, [blob_b])]) == [PutResult.STORED]  # not PRESENT: a's block is not visible to b
    assert get_one(conn_a, [key]) == [blob_a]
    assert get_one(conn_b, [key]) == [blob_b]
    # A fresh connection of each tenant sees its own bytes too.
    for token, expected in ((TOKEN_A, blob_a), (TOKEN_B, blob_b)):
        conn = Connection(tenants_server.url, token, 5.0)
        assert get_one(conn, [key]) == [expected]
        conn.close()
    # Deleting a's copy leaves b's.
    assert conn_a.delete([key]) == [True]
    assert get_one(conn_a, [key]) == [None]
    assert get_one(conn_b, [key]) == [blob_b]


def test_a_quota_bounds_a_namespace_and_evicts_its_own_least_recently_used_blocks(conn_a, conn_b):
    b_keys = [f"b-keeps/{i}".encode() for i in range(5)]
    b_blobs = [blob(k, payload_of(k, 30_000)) for k in b_keys]  # 150 KB in b: more than a's quota
    assert conn_b.put([(k, [v]) for k, v in zip(b_keys, b_blobs)]) == [PutResult.STORED] * 5
    evicted_before = conn_a.stats()["blocks"]["evicted_quota"]
    size = 4000
    keys = [f"quota/{i}".encode() for i in range(60)]  # 60 x 4 KB: almost four times the quota
    blobs = {k: blob(k, payload_of(k, size - BLOB_HEADER_BYTES)) for k in keys}
    favourite = keys[0]
    for i in range(0, len(keys), 3):
        batch = keys[i:i + 3]
        assert conn_a.put([(k, [blobs[k]]) for k in batch]) == [PutResult.STORED] * len(batch)
        ns = conn_a.stats()["blocks"]
        assert ns["used_bytes"] <= QUOTA_A, (i, ns)
        assert get_one(conn_a, [favourite]) == [blobs[favourite]]  # read often: never the least recently used
    ns = conn_a.stats()["blocks"]
    assert ns["evicted_quota"] > evicted_before
    held = [k for k in keys if conn_a.exists_prefix([k])]
    # What is left: the most recent puts and the favourite; the oldest others went first.
    assert favourite in held
    others = [k for k in held if k != favourite]
    assert others == keys[len(keys) - len(others):]
    assert len(held) >= (QUOTA_A // (size + BLOCK_OVERHEAD_BYTES)) - 2  # each block counts its overhead too
    assert get_one(conn_a, held) == [blobs[k] for k in held]
    # b lost nothing to a's quota.
    assert get_one(conn_b, b_keys) == b_blobs
    b_stats = conn_b.stats()["blocks"]
    assert b_stats["evicted_quota"] == 0 and b_stats["evicted_capacity"] == 0


def test_a_block_larger_than_the_quota_is_rejected(conn_a, conn_b):
    key = b"quota/too-big"
    # A block counts its bytes and BLOCK_OVERHEAD_BYTES against the quota.
    too_big = blob(key, payload_of(key, QUOTA_A - BLOCK_OVERHEAD_BYTES - BLOB_HEADER_BYTES + 1))
    assert len(too_big) + BLOCK_OVERHEAD_BYTES == QUOTA_A + 1
    before = conn_a.stats()["blocks"]
    assert conn_a.put([(key, [too_big])]) == [PutResult.REJECTED]
    after = conn_a.stats()["blocks"]
    assert get_one(conn_a, [key]) == [None]
    assert (after["blocks"], after["used_bytes"]) == (before["blocks"], before["used_bytes"])  # nothing evicted for it
    assert after["rejected"] == before["rejected"] + 1
    # The same block is fine in b (no quota), and a block of exactly the quota fits in a.
    assert conn_b.put([(key, [too_big])]) == [PutResult.STORED]
    exact_key = b"quota/exact"
    exact = blob(exact_key, payload_of(exact_key, QUOTA_A - BLOCK_OVERHEAD_BYTES - BLOB_HEADER_BYTES))
    assert conn_a.put([(exact_key, [exact])]) == [PutResult.STORED]
    ns = conn_a.stats()["blocks"]
    assert (ns["blocks"], ns["used_bytes"]) == (1, QUOTA_A)
    assert get_one(conn_a, [exact_key]) == [exact]


# -- unauthenticated mode ------------------------------------------------------------------------------------------------

def test_unauthenticated_mode_on_loopback_accepts_any_client(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("open")  # ServerProcess.start() must not see "token" etc. in the path
    server = ServerProcess(tmp_path, "--allow-unauthenticated", "true", "--host-bytes", "8MiB", "--disk-bytes", "0",
                           token=None).start()
    try:
        assert "unauthenticated" in "".join(server.output)
        assert not (tmp_path / "token").exists()
        key = b"open/block"
        data = blob(key, b"anyone may read this")
        anonymous = Connection(server.url, None, 5.0)
        assert anonymous.welcome.namespace == DEFAULT_NAMESPACE
        assert anonymous.put([(key, [data])]) == [PutResult.STORED]
        other = Connection(server.url, "whatever-token-they-send-x", 5.0)
        assert other.welcome.namespace == DEFAULT_NAMESPACE
        assert get_one(other, [key]) == [data]
        anonymous.close()
        other.close()
    finally:
        stop_server(server)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.1", "example.com"])
def test_unauthenticated_mode_is_refused_off_loopback(host):
    with pytest.raises(ValueError, match="allow_unauthenticated"):
        ServerConfig(host=host, allow_unauthenticated=True)
    ServerConfig(host=host, allow_unauthenticated=False, token=TOKEN)  # fine with a token


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost"])
def test_unauthenticated_mode_is_allowed_on_loopback(host):
    assert ServerConfig(host=host, allow_unauthenticated=True).allow_unauthenticated


# -- the printed default token ------------------------------------------------------------------------------------------

def test_without_tokens_a_default_token_is_made_printed_kept_0600_and_reused(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("printed")  # ServerProcess.start() must not see "token" etc. in the path
    server = ServerProcess(tmp_path, "--host-bytes", "8MiB", "--disk-bytes", "32MiB", "--disk-sync", "false",
                           token=None).start()
    try:
        printed = re.search(r"token (\S+) \(namespace default", "".join(server.output))
        assert printed, server.output
        token = printed.group(1)
        assert len(token) >= MIN_TOKEN_CHARS
        path = tmp_path / "token"
        assert path.read_text().strip() == token
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        conn = Connection(server.url, token, 5.0)
        key = b"default/block"
        data = blob(key, b"kept across restarts")
        assert conn.welcome.namespace == DEFAULT_NAMESPACE
        assert conn.put([(key, [data])]) == [PutResult.STORED]
        conn.close()
        with pytest.raises(ServerError) as info:
            Connection(server.url, token[::-1], 5.0)
        assert info.value.status == Status.UNAUTHORIZED
        assert server.stop() == 0
        server.restart()
        again = re.search(r"token (\S+) \(namespace default", "".join(server.output))
        assert again and again.group(1) == token
        conn = Connection(server.url, token, 5.0)
        assert get_one(conn, [key]) == [data]
        conn.close()
    finally:
        stop_server(server)


# -- TLS ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is not installed: cannot make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "c.pem", folder / "k.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                           str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                          capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a self-signed certificate: {made.stderr.strip()[-300:]}")
    server = ServerProcess(tmp_path_factory.mktemp("tls-data"), "--tls-cert", str(cert), "--tls-key", str(key),
                           "--host-bytes", "32MiB", "--disk-bytes", "0").start()
    assert server.url.startswith("kvstores://")
    server.ca = str(cert)
    yield server
    stop_server(server)


def test_tls_round_trip_exact_bytes(tls_server):
    conn = Connection(tls_server.url, TOKEN, 5.0, tls_ca_file=tls_server.ca)
    try:
        assert isinstance(conn._sock, ssl.SSLSocket)
        assert conn.ping(b"over tls") == b"over tls"
        items = [(f"tls/{i}".encode(), blob(f"tls/{i}".encode(), payload_of(("tls", i), 1000 + (1 << 20) * (i % 2))))
                 for i in range(4)]
        assert conn.put([(k, [v[:50], v[50:]]) for k, v in items]) == [PutResult.STORED] * 4
        keys = [k for k, _ in items] + [b"tls/missing"]
        assert get_one(conn, keys) == [v for _, v in items] + [None]
        assert conn.exists_prefix(keys) == 4
        assert conn.stats()["namespace"] == DEFAULT_NAMESPACE
    finally:
        conn.close()


def test_tls_wrong_token_is_an_error_reply(tls_server):
    with pytest.raises(ServerError) as info:
        Connection(tls_server.url, "wrong-token-over-tls-0123456", 5.0, tls_ca_file=tls_server.ca)
    assert info.value.status == Status.UNAUTHORIZED


def test_plain_tcp_and_unverified_clients_fail_cleanly_against_a_tls_server(tls_server):
    host, port = host_port(tls_server.url)
    with pytest.raises((ConnectionError, OSError)) as info:
        Connection(f"kvstore://{host}:{port}", TOKEN, 3.0)
    assert not isinstance(info.value, TimeoutError), "a plain client should be closed on, not left waiting"
    with pytest.raises(ssl.SSLError):  # no CA given: the self-signed certificate does not verify
        Connection(tls_server.url, TOKEN, 3.0)
    for size in (1, 5, 64, 4096):  # garbage instead of a TLS hello, then the client goes away
        with socket.create_connection((host, port), timeout=3.0) as sock:
            sock.sendall(os.urandom(size))
    assert tls_server.alive()
    conn = Connection(tls_server.url, TOKEN, 5.0, tls_ca_file=tls_server.ca)
    assert conn.ping(b"still serving") == b"still serving"
    conn.close()


def test_stats_command_reaches_a_tls_server_given_its_ca(tls_server, capsys):
    """``kvstore stats`` had no way to name a private CA: every TLS server of one said 'is kvstore serve running?'."""
    from kvstore.cli import main

    assert main(["stats", "--url", tls_server.url, "--token", TOKEN, "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert "has a certificate this machine does not trust" in err and "--tls-ca-file" in err
    assert "Traceback" not in err
    assert main(["stats", "--url", tls_server.url, "--token", TOKEN, "--tls-ca-file", tls_server.ca]) == 0
    assert f"namespace {DEFAULT_NAMESPACE}" in capsys.readouterr().out
    for wrong in ("/nonexistent.pem", __file__):  # missing, and not PEM
        assert main(["stats", "--url", tls_server.url, "--token", TOKEN, "--tls-ca-file", wrong]) == 2
        assert "--tls-ca-file: expected a PEM file of CA certificates" in capsys.readouterr().err
    plain = tls_server.url.replace("kvstores://", "kvstore://")
    assert main(["stats", "--url", plain, "--token", TOKEN, "--tls-ca-file", tls_server.ca]) == 2
    assert "--tls-ca-file: only for a TLS server" in capsys.readouterr().err


# -- the Authenticator and tenant loading, without a server ----------------------------------------------------------------

def _tenants() -> list[Tenant]:
    return [Tenant("team-a", TOKEN_A, 1000), Tenant("team-b", TOKEN_B), Tenant("c.3_x", "c" * MIN_TOKEN_CHARS)]


def test_authenticate_finds_the_right_tenant():
    auth = Authenticator(_tenants())
    assert auth.authenticate(TOKEN_A).namespace == "team-a"
    assert auth.authenticate(TOKEN_B).namespace == "team-b"
    assert auth.authenticate("c" * MIN_TOKEN_CHARS).namespace == "c.3_x"
    for wrong in ("", TOKEN_A[:-1], TOKEN_A + "a", "c" * (MIN_TOKEN_CHARS + 1), "é" * 20):
        assert auth.authenticate(wrong) is None
    assert auth.quota_of("team-a") == 1000 and auth.quota_of("team-b") == 0 and auth.quota_of("nobody") == 0
    assert [t.namespace for t in auth.tenants] == ["team-a", "team-b", "c.3_x"]


def test_authenticate_compares_with_every_token_in_constant_time(monkeypatch):
    import kvstore.server.auth as auth_module

    calls: list[tuple[bytes, bytes]] = []
    real = auth_module.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)
    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    auth = Authenticator(_tenants())
    for token, expected in ((TOKEN_A, "team-a"), ("c" * MIN_TOKEN_CHARS, "c.3_x"), ("nope" * 5, None)):
        calls.clear()
        found = auth.authenticate(token)
        assert (found.namespace if found else None) == expected
        assert len(calls) == 3, "no early exit: every known token is compared, whichever matches"
        assert {b for _, b in calls} == {t.token.encode() for t in _tenants()}


def test_an_open_namespace_takes_any_token_but_known_tokens_keep_their_tenant():
    auth = Authenticator([Tenant("team-a", TOKEN_A)], open_namespace="default")
    assert auth.authenticate("").namespace == "default"
    assert auth.authenticate("anything").namespace == "default"
    assert auth.authenticate(TOKEN_A).namespace == "team-a"
    assert Authenticator([], "default").authenticate("").namespace == "default"
    assert Authenticator([]).authenticate("") is None


def test_duplicate_namespaces_or_tokens_raise():
    with pytest.raises(ValueError, match="namespace"):
        Authenticator([Tenant("team-a", TOKEN_A), Tenant("team-a", TOKEN_B)])
    with pytest.raises(ValueError, match="token"):
        Authenticator([Tenant("team-a", TOKEN_A), Tenant("team-b", TOKEN_A)])


@pytest.mark.parametrize("namespace", ["", "-lead", ".lead", "_lead", "a b", "a/b", "a\0b", "x" * 65, "équipe",
                                       "a:b", "ns\n"])
def test_bad_namespace_names_raise(namespace):
    with pytest.raises(ValueError, match="namespace"):
        Tenant(namespace, TOKEN_A)


@pytest.mark.parametrize("namespace", ["a", "A", "9", "team-a", "A.b_c-9", "x" * 64])
def test_good_namespace_names(namespace):
    assert Tenant(namespace, TOKEN_A).namespace == namespace


@pytest.mark.parametrize("token", ["", "short", "x" * (MIN_TOKEN_CHARS - 1), None, 12345678901234567890,
                                   b"bytes-are-not-a-token-0123"])
def test_short_or_non_text_tokens_raise(token):
    with pytest.raises(ValueError, match="token"):
        Tenant("team-a", token)


def test_load_tenants_from_toml_and_yaml(tmp_path):
    toml = tmp_path / "tokens.toml"
    toml.write_text(f'[tenants.a]\ntoken = "{TOKEN_A}"\nquota = "64KiB"\n[tenants.b]\ntoken = "{TOKEN_B}"\n')
    assert load_tenants(toml) == [Tenant("a", TOKEN_A, 65536), Tenant("b", TOKEN_B, 0)]
    yaml = tmp_path / "tokens.yaml"
    yaml.write_text(f"tenants:\n  a:\n    token: {TOKEN_A}\n    quota: 1GiB\n  b:\n    token: {TOKEN_B}\n")
    assert load_tenants(yaml) == [Tenant("a", TOKEN_A, 1 << 30), Tenant("b", TOKEN_B, 0)]


@pytest.mark.parametrize("text, match", [
    ("[tenants]\n", "at least one tenant"),
    ('[tenants.a]\nquota = "1GiB"\n', "token"),
    (f'[tenants.a]\ntoken = "{TOKEN_A}"\nqouta = "1GiB"\n', "qouta"),
    (f'[tenants.a]\ntoken = "{TOKEN_A}"\n[tenants.b]\ntoken = "{TOKEN_A}"\n', None),
    ('[tenants.a]\ntoken = "short"\n', "token"),
    (f'[tenants."bad name"]\ntoken = "{TOKEN_A}"\n', "namespace"),
    (f'[tenants.a]\ntoken = "{TOKEN_A}"\nquota = "lots"\n', "quota"),
])
def test_bad_tokens_files_raise(tmp_path, text, match):
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        Authenticator(load_tenants(path))


def test_default_token_is_made_once_with_mode_0600(tmp_path):
    token = default_token(tmp_path / "data")
    path = tmp_path / "data" / "token"
    assert len(token) >= MIN_TOKEN_CHARS and path.read_text() == token + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert default_token(tmp_path / "data") == token
    path.write_text("short\n")  # not a usable token: replaced
    fresh = default_token(tmp_path / "data")
    assert fresh != token and len(fresh) >= MIN_TOKEN_CHARS


def test_a_replaced_default_token_file_is_made_private(tmp_path):
    path = tmp_path / "token"
    path.write_text("\n")  # e.g. created empty by hand
    path.chmod(0o644)
    token = default_token(tmp_path)
    assert path.read_text() == token + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_tenants_of_a_config(tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[tenants.a]\ntoken = "{TOKEN_A}"\n')
    assert tenants_of(ServerConfig(tokens_file=str(tokens), data_dir=str(tmp_path))) == \
        ([Tenant("a", TOKEN_A)], None, None)
    assert tenants_of(ServerConfig(token=TOKEN, data_dir=str(tmp_path))) == \
        ([Tenant(DEFAULT_NAMESPACE, TOKEN, operator=True)], None, None)  # the only tenant runs the server
    assert tenants_of(ServerConfig(allow_unauthenticated=True, data_dir=str(tmp_path))) == ([], "default", None)
    tenants, open_namespace, printed = tenants_of(ServerConfig(data_dir=str(tmp_path / "fresh")))
    assert tenants == [Tenant(DEFAULT_NAMESPACE, printed, operator=True)] and open_namespace is None
    assert (tmp_path / "fresh" / "token").read_text().strip() == printed


def test_tls_handshakes_in_progress_count_against_the_connection_cap(tls_server, tmp_path):
    """Silent sockets never finish a handshake; each one in progress holds TLS buffers (300 KiB), so they hold
    a connection slot: past the cap the server closes them at once instead of keeping thousands open."""
    cert = Path(tls_server.ca)
    server = ServerProcess(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(cert.with_name("k.pem")),
                           "--host-bytes", "8MiB", "--disk-bytes", "0", "--max-connections", "4").start()
    try:
        fds = Path(f"/proc/{server.proc.pid}/fd")
        baseline = len(list(fds.iterdir()))
        host, port = host_port(server.url)
        silent = [socket.create_connection((host, port), timeout=3.0) for _ in range(64)]
        deadline = time.monotonic() + 3  # well inside the 10 s a handshake may take
        while time.monotonic() < deadline and sum(1 for s in silent if _closed_by_peer(s)) < 60:
            time.sleep(0.05)
        assert sum(1 for s in silent if _closed_by_peer(s)) >= 60  # all but the cap's four
        assert len(list(fds.iterdir())) <= baseline + 4
        for sock in silent:
            sock.close()
        conn = Connection(server.url, TOKEN, 5.0, tls_ca_file=str(cert))
        assert conn.ping(b"served again") == b"served again"
        conn.close()
    finally:
        stop_server(server)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (a read sees the end of the stream) without blocking."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
