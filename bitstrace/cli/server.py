"""bits-server: the command line of the reference BITS upload server (bitstrace.replay.server).

    bits-server --root DIR [--host 127.0.0.1] [--port 0] [options]

prints ``bits-server: listening on http://HOST:PORT/`` on stdout when ready, logs one line per
packet on stderr, and stops cleanly on SIGINT/SIGTERM. Exit status: 0 = stopped by SIGINT/SIGTERM
(the way to stop a server, not an interruption of work), 2 = usage error (bad option, a --root
that cannot be a directory or cannot be written, an address that cannot be listened on).
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from bitstrace import __version__
from bitstrace.analyzer.bits.protocol import DEFAULT_SESSION_TIMEOUT, MAX_FRAGMENT, MAX_UPLOAD_SIZE, Header
from bitstrace.cli.common import MAX_TIMEOUT_S, Exit, HelpFormatter, credentials, discard_further_output, seconds, whole
from bitstrace.replay.server import ERROR_HEADERS, BitsServer, RootNotWritable, ServerOptions
from bitstrace.replay.server.options import DEFAULT_MAX_SESSIONS, DEFAULT_MAX_SESSIONS_PER_CLIENT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bits-server", description="A conformant reference server for the upload side of [MC-BUP].",
                                formatter_class=HelpFormatter,
                                epilog="Exit status: 0 stopped by SIGINT/SIGTERM, 2 usage error "
                                       "(bad option, unusable --root, cannot listen).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--root", required=True, type=Path, metavar="DIR",
                   help="directory that uploads land in (created if missing)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDRESS", help="address to listen on")
    p.add_argument("--port", type=whole(0, 65535), default=0, metavar="PORT", help="port; 0 picks a free one")
    p.add_argument("--overlap", choices=("trim", "reject"), default="trim",
                   help="fragment overlapping received bytes: keep only new bytes, 200 (trim, IIS) "
                        "or 416 (reject, MC-BUP)")
    p.add_argument("--no-overwrite", dest="overwrite", action="store_false",
                   help="refuse an upload whose destination exists (E_ACCESSDENIED)")
    p.add_argument("--exists-status", type=int, choices=(409, 403), default=409,
                   help="status for an existing destination with --no-overwrite (409 Win32, 403 MC-BUP)")
    p.add_argument("--create-status", type=int, choices=(200, 201), default=200,
                   help="status of a successful Create-Session ack")
    p.add_argument("--error-header", choices=tuple(ERROR_HEADERS), default="win32",
                   help=f"error header name: win32 = {Header.ERROR_CODE}, mcbup = {Header.ERROR_CODE_MCBUP}")
    p.add_argument("--max-upload-size", type=whole(1, MAX_UPLOAD_SIZE), default=MAX_UPLOAD_SIZE, metavar="BYTES",
                   help="largest entity (BG_E_TOO_LARGE above it)")
    p.add_argument("--max-fragment-size", type=whole(1, MAX_UPLOAD_SIZE), default=MAX_FRAGMENT, metavar="BYTES",
                   help="largest fragment body (413 above it)")
    p.add_argument("--session-timeout", type=seconds(MAX_TIMEOUT_S), default=DEFAULT_SESSION_TIMEOUT, metavar="SECONDS",
                   help="time without progress before a session is purged")
    p.add_argument("--host-id", metavar="NAME", help="BITS-Host-Id to announce on Create acks")
    p.add_argument("--host-id-fallback-timeout", type=whole(0, int(MAX_TIMEOUT_S)), metavar="SECONDS",
                   help="BITS-Host-Id-Fallback-Timeout (needs --host-id)")
    p.add_argument("--reply", action="store_true",
                   help="upload-reply mode: answer each upload with a JSON receipt (size, sha256)")
    p.add_argument("--auth", type=credentials, metavar="USER:PASSWORD",
                   help="require HTTP Basic credentials (401 challenge otherwise)")
    p.add_argument("--idle-timeout", type=seconds(MAX_TIMEOUT_S), default=60.0, metavar="SECONDS",
                   help="time a connection may stay silent")
    p.add_argument("--request-timeout", type=seconds(MAX_TIMEOUT_S), default=600.0, metavar="SECONDS",
                   help="time one request may take")
    p.add_argument("--max-sessions", type=whole(1), default=DEFAULT_MAX_SESSIONS, metavar="COUNT",
                   help="live sessions at most (a Create over it is 503, BG_E_HTTP_ERROR_503)")
    p.add_argument("--max-sessions-per-client", type=whole(1), default=DEFAULT_MAX_SESSIONS_PER_CLIENT,
                   metavar="COUNT", help="live sessions at most from one client address")
    p.add_argument("--max-connections", type=whole(1), metavar="COUNT",
                   help="open connections at most (default: what the descriptor limit leaves room for, "
                        "at most 512); past it the connection waiting longest for a request is closed, "
                        "or the newcomer answered 503 when all are busy")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain) file (needs --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--tls-self-signed", action="store_true",
                   help="serve HTTPS with a fresh self-signed certificate (for tests: clients must be told to trust it)")
    p.add_argument("--tls-keylog", metavar="FILE",
                   help="append the TLS secrets to FILE in NSS key log format (for bits-analyze --tls-keylog, Wireshark)")
    p.add_argument("--quiet", action="store_true", help="no per-packet log on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    option_names = {f.name for f in fields(ServerOptions)}
    options = {k: v for k, v in vars(args).items() if k in option_names}
    try:
        server = BitsServer(args.root, args.host, args.port, log=None if args.quiet else sys.stderr, **options)
    except RootNotWritable as exc:
        parser.exit(Exit.USAGE, f"bits-server: cannot use --root {str(args.root)!r}: {exc.strerror}\n")
    except OSError as exc:
        reasons = {errno.EEXIST: "it exists and is not a directory", errno.ENOTDIR: "a parent of it is not a directory"}
        what = reasons.get(exc.errno or 0) or exc.strerror or str(exc)
        parser.exit(Exit.USAGE, f"bits-server: cannot use --root {str(args.root)!r}: {what}\n")
    except ValueError as exc:  # ServerOptions' own checks, TLS files that cannot be used
        parser.exit(Exit.USAGE, f"bits-server: {exc}\n")
    try:
        server.start()
    except OSError as exc:
        parser.exit(Exit.USAGE, f"bits-server: cannot listen on {args.host} port {args.port}: "
                                f"{exc.strerror or exc}\n")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        print(f"bits-server: listening on {server.url}", flush=True)
    except BrokenPipeError:  # nobody reads stdout (`| head -0`): serve all the same
        discard_further_output(sys.stdout)
    stop.wait()
    server.stop()
    print("bits-server: stopped", file=sys.stderr, flush=True)
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
