"""bits-server: a conformant reference server for the upload side of [MC-BUP].

Command line::

    bits-server --root DIR [--host 127.0.0.1] [--port 0] [options]

prints ``bits-server: listening on http://HOST:PORT/`` on stdout when ready, logs one line per
packet on stderr, and stops cleanly on SIGINT/SIGTERM. ``bits-server --help`` lists the options.

Library API (for tests and the replayer)::

    from bitstrace.replay.server import BitsServer
    with BitsServer(root, overlap="reject", reply=True) as server:   # started on enter
        server.url              # "http://127.0.0.1:PORT/"
        server.records          # PacketRecord per packet, in completion order
        server.sessions()       # live sessions (replay.server.sessions.Session)
    # or: server = BitsServer(root, port=0, on_packet=callback); server.start(); ...; server.stop()

Keyword options are the fields of ServerOptions. ``on_packet(record)`` is called (from the
connection's thread) for every packet answered; PacketRecord.started/finished are time.monotonic() stamps, so
tests can see which requests were in flight together. ``log`` is a text stream for the log lines
(default stderr; None for silence).

Behaviour (docs/protocol.md 1-7; the state transitions are one table in replay.server.sessions):
- Packet types are compared case-insensitively. Create negotiates the protocol GUID (answered in
  lowercase) and issues fresh uppercase brace GUIDs like IIS.
- A fragment must start at the next offset N: a gap draws 416 with BITS-Received-Content-Range N
  (BITS-Error-Code 0x00000000, context 0x5). An overlap keeps only the new bytes and answers 200
  (IIS, overlap="trim") or draws 416 (MC-BUP, overlap="reject"). Bodies stream to disk as they
  arrive (pieces of at most 256 KiB), to BITS-Sessions/Requests/{id}/requestfile.bin under the
  root; a failed or abandoned write is rolled back to N. A resent fragment after the last byte
  is re-acked 200 N=T.
- Close after the last byte moves the file into place atomically (404 when the temporary file is
  gone); Close before it discards the data (Win32). Cancel deletes the session's data and reply.
  A Cancel does not wait for a fragment streaming on another connection: that fragment is cut.
  Ended and expired sessions answer 500 BG_E_SESSION_NOT_FOUND. Sessions live in memory: they
  survive reconnects, not a server restart (the directories a killed run left are removed at
  start).
- Errors carry BITS-Error-Code (or BITS-Error, error_header="mcbup") and context 0x5; a failed
  reply receipt (reply mode) carries context 0x7 and is retried by a resent final fragment.
- An existing destination is overwritten unless overwrite=False (then 409, or exists_status=403,
  with E_ACCESSDENIED). The URL path never leaves the root (replay.server.paths), nor names a
  path the filesystem cannot hold (400 E_INVALIDARG at Create); Content-Name is ignored.
- Caps: live sessions per server and per client address (a Create over either is 503 with
  BITS-Error-Code BG_E_HTTP_ERROR_503 and Retry-After), connections (lifecycle).
- HTTP is read by our own parser in strict mode (http_front); `POST` with
  `X-Http-Method-Override: BITS_POST` (OneDrive's form) is BITS_POST, its Create answered 201.

Rooms: options (ServerOptions), sessions (state table), paths (URL to file), service (the BITS
packets, no sockets), acks (the answer), http_front (a connection: bytes in, answers out,
timeouts), byte_range, log (PacketRecord), tls (HTTPS context), lifecycle (BitsServer:
start/stop, accept, caps). HTTPS: the tls_* options (tls_cert/tls_key, tls_self_signed,
tls_keylog); `server.url` then begins with https://.
"""

from bitstrace.replay.server.acks import Ack, error_ack
from bitstrace.replay.server.lifecycle import BitsServer, RootNotWritable
from bitstrace.replay.server.log import PacketRecord
from bitstrace.replay.server.options import ERROR_HEADERS, ServerOptions

__all__ = ["Ack", "BitsServer", "ERROR_HEADERS", "PacketRecord", "RootNotWritable", "ServerOptions", "error_ack"]
