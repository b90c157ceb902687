"""The TLS layer (analyzer/tls.py) on real TLS traffic.

"built": real OpenSSL TLS byte streams (Python's ssl module in memory, tests/tls_fixtures.py)
carrying the corpus's single-fragment BITS upload, written as TCP segments into a pcap.
"recorded": real sockets on 127.0.0.1 captured with tcpdump (tests/tls_recorded.py; root).
tshark with the same key log is the oracle for the decrypted bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import tls_fixtures as fx
from tests.support import tls_recorded

from bitstrace.analyzer import exchanges as exchanges_module  # noqa: E402
from bitstrace.analyzer.analysis import analyze  # noqa: E402
from bitstrace.cli.analyze import main  # noqa: E402
from bitstrace.analyzer.http import HttpParser  # noqa: E402
from bitstrace.analyzer.pipeline import read_exchanges  # noqa: E402
from bitstrace.analyzer.tls import (TlsConnection, TlsFacts, TlsKeys, hkdf_expand_label,  # noqa: E402
                                    tls12_prf)

TSHARK = shutil.which("tshark")
EDITCAP = shutil.which("editcap")

EXPECTED_SUITES = {
    "tls13:aes128": ("TLS 1.3", "TLS_AES_128_GCM_SHA256"),
    "tls13:aes256": ("TLS 1.3", "TLS_AES_256_GCM_SHA384"),
    "tls13:chacha": ("TLS 1.3", "TLS_CHACHA20_POLY1305_SHA256"),
    "tls12:ecdhe-aes128-gcm": ("TLS 1.2", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
    "tls12:ecdhe-aes256-gcm": ("TLS 1.2", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
    "tls12:ecdhe-chacha": ("TLS 1.2", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
    "tls12:ecdhe-aes128-sha-etm": ("TLS 1.2", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"),
    "tls12:ecdhe-aes256-sha-mte": ("TLS 1.2", "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"),
    "tls12:ecdhe-aes128-sha256-mte": ("TLS 1.2", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256"),
    "tls12:ecdhe-aes128-sha256-etm": ("TLS 1.2", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256"),
    "tls12:ecdhe-aes256-sha384-etm": ("TLS 1.2", "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384"),
    "tls12:ecdhe-aes256-sha384-mte": ("TLS 1.2", "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384"),
    "tls12:rsa-aes256-gcm": ("TLS 1.2", "TLS_RSA_WITH_AES_256_GCM_SHA384"),
    "tls12:rsa-aes128-sha256-mte": ("TLS 1.2", "TLS_RSA_WITH_AES_128_CBC_SHA256"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fx.Built]:
    directory = tmp_path_factory.mktemp("tls")
    creds = fx.make_credentials(directory)
    return {name: fx.build(name, directory, creds) for name in fx.SCENARIOS}


def keys_of(*paths: Path) -> TlsKeys:
    keys = TlsKeys()
    for path in paths:
        keys.add_keylog(path.read_text(), str(path))
    return keys


class RecordingParser(HttpParser):
    """An HttpParser that keeps every byte it is given: the decrypted streams, as ours."""

    made: list[RecordingParser] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen = bytearray()
        RecordingParser.made.append(self)

    def feed(self, data, frame, ts_ns):
        self.seen += data
        return super().feed(data, frame, ts_ns)

    def feed_body(self, data, frame, ts_ns):
        taken = super().feed_body(data, frame, ts_ns)
        if taken:
            self.seen += data
        return taken


def our_streams(pcap: Path, keys: TlsKeys, monkeypatch: pytest.MonkeyPatch) -> tuple[list[bytes], object]:
    """(each connection's decrypted client and server streams in order, the run's result)."""
    RecordingParser.made = []
    monkeypatch.setattr(exchanges_module, "HttpParser", RecordingParser)
    result = read_exchanges([pcap], lambda exchange: None, tls_keys=keys)
    monkeypatch.undo()
    return [bytes(p.seen) for p in RecordingParser.made], result


def tshark_tls_streams(pcap: Path, keylog: Path, streams: int) -> dict[int, set[str]]:
    """tshark's `follow,tls,raw` of each TCP stream: the hashes of its two directions."""
    args = [TSHARK, "-n", "-q", "-r", str(pcap), "-o", f"tls.keylog_file:{keylog}"]
    for n in range(streams):
        args += ["-z", f"follow,tls,raw,{n}"]
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    hashes: dict[tuple[int, int], hashlib._Hash] = defaultdict(hashlib.sha256)
    stream = -1
    for line in output.splitlines():
        if line.startswith("Filter: tcp.stream eq "):
            stream = int(line.rsplit(" ", 1)[1])
            hashes[(stream, 0)], hashes[(stream, 1)]
            continue
        if not line.strip() or line.startswith(("=", "Follow:", "Node ")):
            continue
        # tshark 4.0 labels the TLS follow's nodes oddly; the indentation still parts the two sides
        hashes[(stream, 1 if line.startswith("\t") else 0)].update(bytes.fromhex(line.strip()))
    out: dict[int, set[str]] = defaultdict(set)
    for (n, _), digest in hashes.items():
        out[n].add(digest.hexdigest())
    return dict(out)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- every suite, resumption, HelloRetryRequest (built) -------------------------------------------

@pytest.mark.parametrize("scenario", fx.SCENARIOS)
def test_decrypted_streams_are_the_plaintext_sent(built, scenario, monkeypatch) -> None:
    """built: every scenario's decrypted streams equal, byte for byte, what each side wrote."""
    item = built[scenario]
    streams, result = our_streams(item.pcap, keys_of(item.keylog), monkeypatch)
    expected = [fx.joined(turns, side) for turns in item.plain for side in (0, 1)]
    assert streams == expected
    assert result.complete and not result.problems
    facts = result.captures[0].tls
    assert len(facts) == len(item.plain) and all(f.decrypted for f in facts)
    assert all(f.sni == "uploads.example.test" for f in facts)
    if scenario in EXPECTED_SUITES:
        assert (facts[0].version_name, facts[0].suite_name) == EXPECTED_SUITES[scenario]
        assert facts[0].encrypt_then_mac == scenario.endswith("-etm")


@pytest.mark.parametrize("scenario,resumed", [("resume:session-id", "session-id"), ("resume:ticket", "ticket"),
                                              ("resume:psk", "psk"), ("resume:rsa-session-id", "session-id"),
                                              ("resume:rsa-ticket", "ticket")])
def test_resumption_is_reported(built, scenario, resumed) -> None:
    """built: the second connection resumes the first's session, and says how."""
    result = read_exchanges([built[scenario].pcap], lambda e: None, tls_keys=keys_of(built[scenario].keylog))
    assert [f.resumed for f in result.captures[0].tls] == [None, resumed]


@pytest.mark.parametrize("scenario", ["tls12:rsa-aes256-gcm", "tls12:rsa-aes128-sha256-mte",
                                      "resume:rsa-session-id", "resume:rsa-ticket"])
def test_rsa_key_exchange_with_the_servers_private_key(built, scenario, tmp_path, capsys) -> None:
    """built: --tls-rsa-key alone (no key log) decrypts TLS_RSA_* connections, including those
    resuming an RSA session by id or ticket (the master secret remembered across connections)."""
    item = built[scenario]
    out = tmp_path / "report.json"
    status = main([str(item.pcap), "--tls-rsa-key", str(item.creds.key), "--json", str(out), "--no-progress"])
    assert status == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert [t["decrypted"] for t in report["captures"][0]["tls"]] == [True] * len(item.plain)
    assert report["summary"]["delivered"] == 1


def test_hello_retry_request(built) -> None:
    """built: the server takes only secp384r1, which the client did not key-share first."""
    result = read_exchanges([built["hrr"].pcap], lambda e: None, tls_keys=keys_of(built["hrr"].keylog))
    (facts,) = result.captures[0].tls
    assert facts.hello_retry and facts.decrypted
    plain = read_exchanges([built["tls13"].pcap], lambda e: None, tls_keys=keys_of(built["tls13"].keylog))
    assert not plain.captures[0].tls[0].hello_retry


def test_bits_session_and_extraction_through_tls(built, tmp_path) -> None:
    """built: the BITS layer sees the same upload as in the plain capture; --extract rebuilds it."""
    plain = analyze([fx.CORPUS / fx.SOURCE], extract_dir=tmp_path / "plain")
    item = built["tls13:aes128"]
    tls = analyze([item.pcap], extract_dir=tmp_path / "tls", tls_keys=keys_of(item.keylog))
    (ours,), (theirs,) = tls.bits.sessions, plain.bits.sessions
    assert (ours.id, ours.verdict, ours.acknowledged, ours.entity.sha256) == \
        (theirs.id, theirs.verdict, theirs.acknowledged, theirs.entity.sha256)
    assert Path(ours.entity.path).read_bytes() == Path(theirs.entity.path).read_bytes()


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
@pytest.mark.parametrize("scenario", fx.SCENARIOS)
def test_decrypted_streams_equal_tshark_follow_tls(built, scenario, monkeypatch) -> None:
    """built: tshark with the same key log is the oracle for the decrypted bytes."""
    item = built[scenario]
    streams, _ = our_streams(item.pcap, keys_of(item.keylog), monkeypatch)
    theirs = tshark_tls_streams(item.pcap, item.keylog, len(item.plain))
    ours = {n: {sha(streams[2 * n]), sha(streams[2 * n + 1])} for n in range(len(item.plain))}
    assert ours == theirs


# -- key sources ---------------------------------------------------------------------------------

def test_keylog_option_and_sslkeylogfile(built, tmp_path, monkeypatch, capsys) -> None:
    """built: --tls-keylog decrypts; SSLKEYLOGFILE does too, and bits-analyze says it read it."""
    item = built["tls12:ecdhe-aes128-gcm"]
    monkeypatch.delenv("SSLKEYLOGFILE", raising=False)
    assert main([str(item.pcap), "--tls-keylog", str(item.keylog), "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("SSLKEYLOGFILE", str(item.keylog))
    assert main([str(item.pcap), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"reading TLS keys from SSLKEYLOGFILE={item.keylog}" in captured.err
    text = " ".join(captured.out.split())
    assert "1 BITS upload session: 1 delivered" in text
    assert "1 TLS connection: 1 TLS 1.2 TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256; 0 resumed; 1 decrypted" in text


@pytest.mark.skipif(EDITCAP is None, reason="editcap is not installed")
def test_decryption_secrets_block_from_editcap(built, tmp_path, monkeypatch) -> None:
    """built + editcap --inject-secrets: the pcapng's own secrets decrypt it, no key log given."""
    monkeypatch.delenv("SSLKEYLOGFILE", raising=False)
    item = built["tls13:chacha"]
    pcapng = tmp_path / "with-secrets.pcapng"
    subprocess.run([EDITCAP, "--inject-secrets", f"tls,{item.keylog}", str(item.pcap), str(pcapng)], check=True,
                   capture_output=True)
    out = tmp_path / "report.json"
    assert main([str(pcapng), "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["captures"][0]["tls"][0]["decrypted"] and report["summary"]["delivered"] == 1


def test_decryption_secrets_block_after_the_packets_it_unlocks(built, tmp_path) -> None:
    """built: a pcapng (written with construct, tests/support/craft.py) whose secrets block comes between
    the packets, after the handshake and the first requests: the waiting records decrypt then."""
    from tests.support import craft
    from bitstrace.analyzer.capture import CaptureReader

    item = built["tls13:aes128"]
    frames = [bytes(f.data) for f in CaptureReader(item.pcap)]
    secrets = item.keylog.read_bytes()
    dsb = craft.block(0x0000000A, fx.struct_pack_dsb(secrets))
    middle = len(frames) // 2
    data = craft.shb() + craft.idb(1)
    data += b"".join(craft.epb(0, 1_000_000 + i, f) for i, f in enumerate(frames[:middle]))
    data += dsb + b"".join(craft.epb(0, 2_000_000 + i, f) for i, f in enumerate(frames[middle:]))
    pcapng = tmp_path / "late-secrets.pcapng"
    pcapng.write_bytes(data)
    seen = []
    result = read_exchanges([pcapng], seen.append)
    assert result.complete and [f.decrypted for f in result.captures[0].tls] == [True]
    assert [e.request.headers.get("BITS-Packet-Type") for e in seen] == ["Create-Session", "Fragment", "Close-Session"]
    assert all(e.response is not None and "orphan-response" not in e.flags for e in seen)


# -- what cannot be decrypted -------------------------------------------------------------------

def test_without_keys_one_clear_problem_and_exit_status_3(built, tmp_path, monkeypatch, capsys) -> None:
    """built: no key: one problem per capture naming server, SNI and remedy; exit status 3."""
    monkeypatch.delenv("SSLKEYLOGFILE", raising=False)
    item = built["resume:psk"]
    out = tmp_path / "report.json"
    assert main([str(item.pcap), "--json", str(out), "--no-progress"]) == 3
    report = json.loads(out.read_text())
    (problem,) = report["problems"]
    assert problem["kind"] == "tls-undecrypted"
    assert problem["message"] == ("2 TLS connections to 127.0.0.1:443 (SNI uploads.example.test) could not be "
                                  "decrypted: no key for their client random; give --tls-keylog FILE")
    assert [t["reason"] for t in report["captures"][0]["tls"]] == ["no key for their client random"] * 2
    assert report["summary"]["sessions"] == 0
    main([str(item.pcap), "--no-progress"])
    text = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "2 not decrypted: their HTTP exchanges are not in this report" in text
    assert ("No BITS upload sessions in the capture. 2 TLS connections could not be decrypted: sessions in "
            "them are not shown (see Problems).") in text


def test_wrong_key_is_a_located_problem(built, tmp_path) -> None:
    """built: a key log whose secrets are wrong: each direction stops at its first record, the
    problem names frame, stream and offset; no crash, nothing guessed."""
    item = built["tls12:ecdhe-aes256-gcm"]
    lines = []
    for line in item.keylog.read_text().splitlines():
        if line.startswith("#"):
            continue
        label, random, secret = line.split(" ")
        lines.append(f"{label} {random} {secret[:-2]}{int(secret[-2:], 16) ^ 1:02x}")
    wrong = tmp_path / "wrong.keys"
    wrong.write_text("\n".join(lines))
    seen = []
    result = read_exchanges([item.pcap], seen.append, tls_keys=keys_of(wrong))
    decrypt = [p for p in result.problems if p.kind == "tls-decrypt"]
    assert len(decrypt) == 2 and all(p.frame and p.offset and p.connection == 0 for p in decrypt)
    assert "AEAD tag does not verify" in decrypt[0].message
    assert seen == [] and not result.complete
    assert "wrong key or damaged capture" in result.captures[0].tls[0].reason


def test_truncated_record(built, tmp_path) -> None:
    """built: the capture ends inside the server's last record: a located problem, the rest kept."""
    item = built["tls13:aes256"]
    client, server = fx.contexts(item.creds, tmp_path / "k.keys", fx.TlsOptions())
    pair = fx.TlsPair(client, server, "uploads.example.test")
    pair.handshake()
    turns = item.plain[0]
    for side, data in turns:
        pair.send(side, data)
    wire = list(pair.wire)
    side, last = wire[-1]
    assert side == 1
    wire[-1] = (1, last[:len(last) - 7])
    pcap = fx.write_pcap(tmp_path / "cut.pcap", [fx.Flow(wire)])
    seen = []
    result = read_exchanges([pcap], seen.append, tls_keys=keys_of(tmp_path / "k.keys"))
    (problem,) = [p for p in result.problems if p.kind == "tls-truncated-record"]
    assert problem.offset == len(fx.joined(wire, 1)) - (len(last) - 7) and problem.frame
    assert [e.response is not None for e in seen] == [True, True, False]


def test_garbage_after_the_handshake(built, tmp_path) -> None:
    """built: bytes that are no TLS record after the client's handshake: the client direction
    stops there with a located problem; the server direction still decrypts."""
    item = built["tls13:aes256"]
    client, server = fx.contexts(item.creds, tmp_path / "k.keys", fx.TlsOptions())
    pair = fx.TlsPair(client, server, "uploads.example.test")
    pair.handshake()
    garbage_at = len(fx.joined(pair.wire, 0))
    for side, data in item.plain[0]:
        pair.send(side, data)
    wire = list(pair.wire)
    first_request = next(i for i, (side, _) in enumerate(wire) if side == 0 and i > 2)
    wire.insert(first_request, (0, b"\x00\x01 this is not TLS at all \xff" * 4))
    pcap = fx.write_pcap(tmp_path / "garbage.pcap", [fx.Flow(wire)])
    seen = []
    result = read_exchanges([pcap], seen.append, tls_keys=keys_of(tmp_path / "k.keys"))
    (problem,) = [p for p in result.problems if p.kind == "tls-record"]
    assert problem.offset >= garbage_at and "not a TLS record" in problem.message
    assert [e.response.status for e in seen] == [200, 200, 200]  # server answers, requests lost
    assert all(e.request is None for e in seen)
    assert not result.captures[0].tls[0].decrypted


def test_tls_on_any_port_and_plain_http_untouched(built, tmp_path) -> None:
    """built: TLS is known by its ClientHello on port 8080 too; a plain capture gives no TLS facts."""
    item = built["tls13:aes128"]
    client, server = fx.contexts(item.creds, tmp_path / "k.keys", fx.TlsOptions())
    pair = fx.TlsPair(client, server, "uploads.example.test")
    pair.handshake()
    for side, data in item.plain[0]:
        pair.send(side, data)
    pcap = fx.write_pcap(tmp_path / "port.pcap", [fx.Flow(pair.wire, server=("127.0.0.1", 8080),
                                                          client=("127.0.0.1", 50001))])
    result = read_exchanges([pcap], lambda e: None, tls_keys=keys_of(tmp_path / "k.keys"))
    assert [f.decrypted for f in result.captures[0].tls] == [True]
    plain = read_exchanges([fx.CORPUS / fx.SOURCE], lambda e: None)
    assert plain.captures[0].tls == []


# -- splitting -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split_material(built) -> tuple[list[fx.Chunks], TlsKeys, list[bytes]]:
    """A TLS 1.2 AES-CBC (encrypt-then-MAC) and a TLS 1.3 connection carrying the same upload."""
    item = built["tls13"]
    keylog = item.keylog.with_suffix(".split")
    wires = []
    for options in (fx.TlsOptions(fx.ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA"), fx.TlsOptions()):
        client, server = fx.contexts(item.creds, keylog, options)
        pair = fx.TlsPair(client, server, "uploads.example.test")
        pair.handshake()
        for side, data in item.plain[0]:
            pair.send(side, data)
        wires.append(pair.wire)
    return wires, keys_of(keylog), [fx.joined(item.plain[0], 0), fx.joined(item.plain[0], 1)]


class _Collect(HttpParser):
    def __init__(self, role: str) -> None:
        super().__init__(role)  # type: ignore[arg-type]
        self.seen = bytearray()

    def feed(self, data, frame, ts_ns):
        self.seen += data
        return super().feed(data, frame, ts_ns)

    def feed_body(self, data, frame, ts_ns):
        return False


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_record_streams_split_anywhere_decrypt_the_same(split_material, data) -> None:
    """built + hypothesis: each direction's TLS bytes cut at any byte boundaries (segments of
    one byte, many records in one segment) decrypt to the same plaintext."""
    wires, keys, expected = split_material
    for wire in wires:
        facts = TlsFacts(0, (b"\x7f\0\0\1", 1), (b"\x7f\0\0\1", 443), 1)
        connection = TlsConnection(facts, keys, {}, lambda problem: pytest.fail(str(problem)), True)
        parsers = _Collect("request"), _Collect("response")
        directions = connection.attach(*parsers)
        for side, chunk in wire:
            cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(chunk) - 1)), max_size=6))))
            for start, end in zip([0, *cuts], [*cuts, len(chunk)]):
                if start < end:
                    directions[side].feed(chunk[start:end], 1, 0)
        for direction in directions:
            direction.eof(2, 0)
        connection.finish()
        assert facts.decrypted
        assert [bytes(p.seen) for p in parsers] == expected


def test_split_material_matches_the_plaintext(split_material) -> None:
    """built: the TLS bytes fed as one piece per flight decrypt to the plaintext sent, and
    hold many records in one piece and records over many (what the splits vary)."""
    wires, keys, expected = split_material
    for wire in wires:
        facts = TlsFacts(0, (b"\x7f\0\0\1", 1), (b"\x7f\0\0\1", 443), 1)
        connection = TlsConnection(facts, keys, {}, lambda problem: pytest.fail(str(problem)), True)
        parsers = _Collect("request"), _Collect("response")
        directions = connection.attach(*parsers)
        for side, chunk in wire:
            directions[side].feed(chunk, 1, 0)
        assert [bytes(p.seen) for p in parsers] == expected


# -- key derivation against RFC 8448 -------------------------------------------------------------

def test_hkdf_expand_label_rfc8448() -> None:
    """RFC 8448 section 3: the server handshake traffic key and IV from its secret."""
    secret = bytes.fromhex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
    assert hkdf_expand_label(secret, "key", b"", 16, "sha256").hex() == "3fce516009c21727d0f2e4e86ee403bc"
    assert hkdf_expand_label(secret, "iv", b"", 12, "sha256").hex() == "5d313eb2671276ee13000b30"


def test_tls12_prf_known_vector() -> None:
    """The TLS 1.2 PRF (SHA-256) test vector published on the IETF TLS list (used by many stacks)."""
    secret = bytes.fromhex("9bbe436ba940f017b17652849a71db35")
    seed = bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c")
    out = tls12_prf(secret, b"test label", seed, 100, "sha256")
    assert out.hex().startswith("e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a")


# -- recorded with tcpdump ------------------------------------------------------------------------

@pytest.mark.needs_root
@pytest.mark.skipif(tls_recorded.missing() is not None, reason=str(tls_recorded.missing()))
def test_key_update_recorded(built, tmp_path, monkeypatch) -> None:
    """recorded: openssl s_client/s_server, a request, KeyUpdate both ways (K), a request: both
    decrypt after the update; tshark agrees on every byte."""
    creds = built["tls13"].creds
    pcap, keylog = tls_recorded.record_key_update(tmp_path, creds.cert, creds.key)
    seen = []
    result = read_exchanges([pcap], seen.append, tls_keys=keys_of(keylog))
    assert [f.decrypted for f in result.captures[0].tls] == [True]
    assert [(e.request.body_length, e.response.status) for e in seen] == [(0, 200), (5, 200)]
    if TSHARK:
        updates = subprocess.run([TSHARK, "-n", "-r", str(pcap), "-o", f"tls.keylog_file:{keylog}", "-Y",
                                  "tls.handshake.type == 24"], capture_output=True, text=True).stdout
        assert len(updates.strip().splitlines()) >= 2  # a KeyUpdate each way
        streams, _ = our_streams(pcap, keys_of(keylog), monkeypatch)
        assert {sha(streams[0]), sha(streams[1])} == tshark_tls_streams(pcap, keylog, 1)[0]
        assert streams[0] == b"".join(tls_recorded.REQUESTS)


@pytest.mark.needs_root
@pytest.mark.skipif(tls_recorded.missing() is not None, reason=str(tls_recorded.missing()))
def test_bits_upload_recorded_over_real_tls_sockets(built, tmp_path, monkeypatch) -> None:
    """recorded: the corpus upload over real TLS sockets (kernel TCP on lo, tcpdump): the same
    session and file as the plain capture; tshark agrees on the decrypted bytes."""
    creds = built["tls13"].creds
    turns = fx.plain_streams(fx.CORPUS / "clean-multi-fragment.pcap")[0]
    keylog = tmp_path / "upload.keys"
    pcap = tls_recorded.record_bits_upload(tmp_path, creds.cert, creds.key, turns, keylog)
    plain = analyze([fx.CORPUS / "clean-multi-fragment.pcap"])
    tls = analyze([pcap], tls_keys=keys_of(keylog))
    assert tls.complete
    (ours,), (theirs,) = tls.bits.sessions, plain.bits.sessions
    assert (ours.id, ours.verdict, ours.acknowledged, len(ours.fragments)) == \
        (theirs.id, theirs.verdict, theirs.acknowledged, len(theirs.fragments))
    streams, _ = our_streams(pcap, keys_of(keylog), monkeypatch)
    assert streams == [fx.joined(turns, 0), fx.joined(turns, 1)]
    if TSHARK:
        assert {sha(streams[0]), sha(streams[1])} == tshark_tls_streams(pcap, keylog, 1)[0]


# -- the committed HTTPS captures (captures/https/, recorded with tcpdump) ----------------------

HTTPS = fx.CORPUS / "https"


@pytest.mark.parametrize("capture,keylog", [("tls13-upload.pcap", "tls13-upload.keys"),
                                            ("tls12-embedded-secrets.pcapng", None)])
def test_committed_https_captures(capture, keylog, tmp_path, monkeypatch) -> None:
    """recorded: each HTTPS capture of captures/https/ gives the plain corpus upload's session and
    file, from its key log or from its own secrets block."""
    monkeypatch.delenv("SSLKEYLOGFILE", raising=False)
    keys = keys_of(HTTPS / keylog) if keylog else None
    tls = analyze([HTTPS / capture], extract_dir=tmp_path / "tls", tls_keys=keys)
    plain = analyze([fx.CORPUS / fx.SOURCE], extract_dir=tmp_path / "plain")
    assert tls.complete and not tls.problems
    (ours,), (theirs,) = tls.bits.sessions, plain.bits.sessions
    assert (ours.verdict, ours.entity.sha256) == (theirs.verdict, theirs.entity.sha256)
    if keylog:
        assert not analyze([HTTPS / capture]).complete  # without the key log


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
def test_committed_https_capture_equals_tshark(monkeypatch) -> None:
    """recorded: tshark with the key log decrypts the same bytes."""
    pcap, keylog = HTTPS / "tls13-upload.pcap", HTTPS / "tls13-upload.keys"
    streams, _ = our_streams(pcap, keys_of(keylog), monkeypatch)
    assert {sha(streams[0]), sha(streams[1])} == tshark_tls_streams(pcap, keylog, 1)[0]


def test_capture_without_the_client_hello(built, tmp_path) -> None:
    """built: a TLS connection whose handshake records are missing from the capture is still
    known for TLS (its records), and reported as not decryptable, with the reason."""
    item = built["tls13:aes128"]
    client, server = fx.contexts(item.creds, tmp_path / "k.keys", fx.TlsOptions())
    pair = fx.TlsPair(client, server, "uploads.example.test")
    pair.handshake()
    handshake = len(pair.wire)
    for side, data in item.plain[0]:
        pair.send(side, data)
    pcap = fx.write_pcap(tmp_path / "late.pcap", [fx.Flow(pair.wire[handshake:])])
    result = read_exchanges([pcap], lambda e: None, tls_keys=keys_of(tmp_path / "k.keys"))
    (facts,) = result.captures[0].tls
    assert not facts.decrypted and facts.reason == "the capture began after the TLS handshake (no ClientHello)"
    assert [p.kind for p in result.problems] == ["tls-undecrypted"]


def test_unreadable_keys_are_a_usage_error(tmp_path, capsys) -> None:
    """A key log that cannot be read, or a file that is no RSA private key: exit status 2 and
    one line naming the file, before any analysis."""
    capture = str(fx.CORPUS / fx.SOURCE)
    assert main([capture, "--tls-keylog", str(tmp_path / "missing.keys"), "--no-progress"]) == 2
    assert f"cannot read {tmp_path / 'missing.keys'}" in capsys.readouterr().err
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("hello\n")
    assert main([capture, "--tls-rsa-key", str(not_a_key), "--no-progress"]) == 2
    assert f"{not_a_key}: cannot load a private key" in capsys.readouterr().err


def test_malformed_key_log_lines_are_reported(built, tmp_path) -> None:
    """built: lines that are not NSS key log lines are counted in one problem naming the file and
    the first such line; the good lines still decrypt."""
    item = built["tls13"]
    keylog = tmp_path / "messy.keys"
    keylog.write_text("CLIENT_RANDOM nothex\n" + item.keylog.read_text() + "garbage line\n")
    keys = keys_of(keylog)
    result = read_exchanges([item.pcap], lambda e: None, tls_keys=keys)
    assert result.captures[0].tls[0].decrypted
    (problem,) = [p for p in result.problems if p.kind == "tls-keylog-line"]
    assert problem.file == str(keylog) and "2 line(s)" in problem.message and "line 1" in problem.message


def test_tls13_with_only_the_traffic_secrets(built, tmp_path) -> None:
    """built: a key log with only CLIENT/SERVER_TRAFFIC_SECRET_0 (no handshake secrets): the
    encrypted handshake is skipped until a record verifies under the traffic secret."""
    item = built["tls13:aes128"]
    keylog = tmp_path / "traffic-only.keys"
    keylog.write_text("".join(line + "\n" for line in item.keylog.read_text().splitlines()
                              if "_TRAFFIC_SECRET_0" in line))
    seen = []
    result = read_exchanges([item.pcap], seen.append, tls_keys=keys_of(keylog))
    assert result.complete and not result.problems and len(seen) == 3


def test_wrong_traffic_secret_without_handshake_secrets(built, tmp_path) -> None:
    """built: only traffic secrets, and wrong ones: nothing verifies, so nothing is decrypted,
    and the report says so (the skipping of handshake records is bounded)."""
    item = built["tls13:aes128"]
    keylog = tmp_path / "wrong-traffic.keys"
    lines = [line.split(" ") for line in item.keylog.read_text().splitlines() if "_TRAFFIC_SECRET_0" in line]
    keylog.write_text("".join(f"{a} {b} {'00' * (len(c) // 2)}\n" for a, b, c in lines))
    seen = []
    result = read_exchanges([item.pcap], seen.append, tls_keys=keys_of(keylog))
    assert seen == [] and not result.complete and not result.captures[0].tls[0].decrypted


@pytest.mark.parametrize("scenario,why", [("tls12:ecdhe-aes128-sha-etm", "record MAC does not verify"),
                                          ("tls12:ecdhe-aes256-sha-mte", "does not verify"),
                                          ("tls12:ecdhe-chacha", "AEAD tag does not verify")])
def test_wrong_key_other_suites(built, tmp_path, scenario, why) -> None:
    """built: a wrong master secret on CBC (both MAC orders) and ChaCha20 suites: located
    problems, nothing decrypted."""
    item = built[scenario]
    wrong = tmp_path / "wrong.keys"
    wrong.write_text("".join(f"{a} {b} {c[:-2]}{int(c[-2:], 16) ^ 1:02x}\n" for a, b, c in
                             (line.split(" ") for line in item.keylog.read_text().splitlines()
                              if not line.startswith("#"))))
    seen = []
    result = read_exchanges([item.pcap], seen.append, tls_keys=keys_of(wrong))
    decrypt = [p for p in result.problems if p.kind == "tls-decrypt"]
    assert len(decrypt) == 2 and all(why in p.message and p.frame and p.offset for p in decrypt)
    assert seen == []


def test_waiting_for_keys_is_bounded(built, monkeypatch) -> None:
    """built: records wait for keys only up to WAIT_LIMIT bytes a direction; past it the
    direction gives up and says why."""
    from bitstrace.analyzer import tls

    monkeypatch.setattr(tls, "WAIT_LIMIT", 4096)
    item = built["tls13:aes128"]
    result = read_exchanges([item.pcap], lambda e: None, tls_keys=TlsKeys())
    (facts,) = result.captures[0].tls
    assert not facts.decrypted and facts.reason.startswith("no keys came within the first")


def test_secrets_block_in_a_later_section(built, tmp_path) -> None:
    """built: a pcapng of two sections (construct-written secrets block in the second, big-endian
    one, between its packets): the secrets of any section serve every connection."""
    from tests.support import craft
    from bitstrace.analyzer.capture import CaptureReader

    item = built["tls12:ecdhe-aes256-gcm"]
    frames = [bytes(f.data) for f in CaptureReader(item.pcap)]
    secrets = item.keylog.read_bytes()
    body = fx.DSB_BODY_BE.build(dict(secrets=secrets))
    middle = len(frames) // 2
    data = craft.shb() + craft.idb(1) + b"".join(craft.epb(0, 1_000_000 + i, f) for i, f in enumerate(frames[:middle]))
    data += craft.shb(">") + craft.idb(1, ">") + craft.epb(0, 2_000_000, frames[middle], ">")
    data += craft.block(0x0000000A, body, ">")
    data += b"".join(craft.epb(0, 2_000_001 + i, f, ">") for i, f in enumerate(frames[middle + 1:]))
    pcapng = tmp_path / "two-sections.pcapng"
    pcapng.write_bytes(data)
    seen = []
    result = read_exchanges([pcapng], seen.append)
    assert result.complete and len(seen) == 3 and all(e.response.status == 200 for e in seen)


def test_capture_gap_in_a_record_stream(built, tmp_path) -> None:
    """built: a client segment missing from the capture (inside the fragment's records): that
    direction stops decrypting with a located problem; what came before is analysed."""
    from tests.support import craft
    from bitstrace.analyzer.capture import CaptureReader

    item = built["tls13:aes256"]
    frames = [(f.ts_ns, bytes(f.data)) for f in CaptureReader(item.pcap)]
    big = [i for i, (_, data) in enumerate(frames) if len(data) > 1400]
    dropped = big[len(big) // 2]
    pcap = tmp_path / "gap.pcap"
    pcap.write_bytes(craft.pcap_bytes([f for i, f in enumerate(frames) if i != dropped]))
    seen = []
    result = read_exchanges([pcap], seen.append, tls_keys=keys_of(item.keylog))
    (problem,) = [p for p in result.problems if p.kind == "tls-gap"]
    assert problem.connection == 0 and problem.offset
    assert seen[0].request.headers.get("BITS-Packet-Type") == "Create-Session" and not seen[0].flags
    assert not result.captures[0].tls[0].decrypted
    assert result.captures[0].tls[0].reason == "a capture gap cut the TLS record stream"


def test_retransmission_with_other_bytes_in_a_tls_stream(built, tmp_path) -> None:
    """built: a client segment retransmitted with one byte changed: the first copy is kept (and
    decrypts), and the exchange it belongs to is flagged overlap-conflict."""
    from tests.support import craft
    from bitstrace.analyzer.capture import CaptureReader

    item = built["tls13:aes256"]
    frames = [(f.ts_ns, bytes(f.data)) for f in CaptureReader(item.pcap)]
    big = [i for i, (_, data) in enumerate(frames) if len(data) > 1400]
    copied = big[len(big) // 2]
    ts, data = frames[copied]
    changed = data[:-1] + bytes([data[-1] ^ 0xFF])
    frames.insert(copied + 1, (ts + 1, changed))
    pcap = tmp_path / "conflict.pcap"
    pcap.write_bytes(craft.pcap_bytes(frames))
    seen = []
    result = read_exchanges([pcap], seen.append, tls_keys=keys_of(item.keylog))
    assert result.complete and result.captures[0].tls[0].decrypted
    assert [sorted(e.flags) for e in seen] == [[], ["overlap-conflict"], []]
