"""Sending a plan to a live server: target rewrite, session-id substitution, pacing, concurrency.

Everything goes to the one target address given; nothing is ever sent anywhere else. The
BITS-Host-Id of a live Create ack only changes the Host header, and only with
`follow_host_id` and when the Host-Id resolves to the target's own address.

Two modes. `faithful` sends the captured requests exactly, anomalies included (only Host, the
request target, the session id and Basic credentials are rewritten). `adaptive` behaves like a
real client: it uploads the file from the bytes the capture holds, continuing from the live
server's offset (200/416), recreating the session on BG_E_SESSION_NOT_FOUND and shrinking
fragments on 413 (the recovery rules of replay.fragment_loop, shared with the client).
"""

from __future__ import annotations

import heapq
import http.client
import os
import socket
import ssl
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Iterable, Iterator, Protocol
from urllib.parse import urlsplit

from bitstrace.analyzer.authority import url_authority
from bitstrace.analyzer.basic_auth import AUTHORIZATION, auth_scheme, basic_authorization
from bitstrace.analyzer.bits.packets import SUCCESS
from bitstrace.analyzer.bits.protocol import (
    METHOD,
    PROTOCOL_GUID,
    Header,
    PacketType,
    same_id,
)
from bitstrace.analyzer.http import Headers
from bitstrace.replay.compare import AckSummary, Difference, compare, summarize
from bitstrace.replay.fragment_loop import FragmentLoop, GiveUp, Step, count_recreation
from bitstrace.replay.plan import Body, Plan, PlannedRequest, PlannedSession

MODES = ("faithful", "adaptive")
#: Bound on what is read of a response body (acks have none; a garbage server may send plenty).
MAX_RESPONSE_BODY = 1 << 20
#: Set to 1 to get the traceback of an unexpected error in a session on stderr.
DEBUG_ENV = "BITSTRACE_DEBUG"
#: Authorization schemes bound to the original connection or to a server challenge.
NON_REPLAYABLE_AUTH = ("ntlm", "negotiate", "kerberos", "digest")


class TargetError(ValueError):
    """The --target URL cannot be used."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    prefix: str  # path prefix, without a trailing slash ("" for none)

    @classmethod
    def parse(cls, url: str) -> "Target":
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:  # "[::1" (unclosed bracket), a port out of 0..65535, not a number
            raise TargetError(f"--target {url!r} is not a usable URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise TargetError(f"--target must be an http:// or https:// URL, not {url!r}")
        if not parts.hostname:
            raise TargetError(f"--target {url!r} names no host")
        if port == 0:
            raise TargetError(f"--target {url!r}: port 0 cannot be connected to (1-65535)")
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def netloc(self) -> str:
        return url_authority(self.scheme, self.host, self.port)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.prefix}"

    def path_for(self, captured_target: str, strip_prefix: str = "") -> str:
        """The live request target: the captured path (absolute form reduced to origin form),
        less `strip_prefix`, under the target's own prefix."""
        parts = urlsplit(captured_target)
        path = parts.path if parts.scheme else captured_target.split("?", 1)[0]
        query = parts.query if parts.scheme else (captured_target.split("?", 1)[1]
                                                  if "?" in captured_target else "")
        if strip_prefix and path.startswith(strip_prefix.rstrip("/")):
            path = path[len(strip_prefix.rstrip("/")):]
        if not path.startswith("/"):
            path = "/" + path
        return self.prefix + path + (f"?{query}" if query else "")


@dataclass
class Options:
    target: Target
    mode: str = "faithful"
    speed: float = 1.0  # 1 = the capture's own gaps, 2 = twice as fast, 0 = no waiting
    concurrency: int | None = None  # sessions in flight at once; None = as in the capture
    timeout: float = 30.0  # seconds to wait for the server at any one step
    auth: tuple[str, str] | None = None
    follow_host_id: bool = False
    strip_prefix: str = ""
    verify_tls: bool = True


@dataclass
class Outcome:
    """One request of the replay: what was (or would have been) sent and what came back."""

    label: str
    captured: PlannedRequest | None  # the captured request it stands for; None if made up
    sent: bool = False  # it went out (answered, or cut short by a fault after connecting)
    live: AckSummary | None = None
    fault: str | None = None
    note: str | None = None
    due_s: float | None = None  # when it should have gone, seconds after the replay started
    sent_s: float | None = None
    bytes_sent: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def pacing_error_s(self) -> float | None:
        if self.due_s is None or self.sent_s is None:
            return None
        return self.sent_s - self.due_s


@dataclass
class SessionResult:
    key: str  # PlannedSession.key
    captured_id: str  # the captured session id (the key when the session had none)
    generation: int = 0  # PlannedSession.generation
    live_ids: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fault: str | None = None  # why the session stopped early
    started_s: float | None = None
    ended_s: float | None = None

    @property
    def differences(self) -> int:
        return sum(1 for o in self.outcomes if o.differences)


@dataclass
class ReplayResult:
    target: str
    mode: str
    speed: float
    sessions: list[SessionResult]
    interrupted: bool = False  # stopped by the user (Ctrl-C); the sessions hold what was done

    @property
    def faults(self) -> int:
        return sum(1 for s in self.sessions if s.fault)

    @property
    def differences(self) -> int:
        return sum(s.differences for s in self.sessions)

    def median_pacing_error_s(self) -> float | None:
        errors = [abs(o.pacing_error_s) for s in self.sessions for o in s.outcomes
                  if o.pacing_error_s is not None]
        return statistics.median(errors) if errors else None


def _result_of(session: PlannedSession) -> SessionResult:
    return SessionResult(session.key, session.session_id or session.key, session.generation)


class Observer(Protocol):
    def on_session_start(self, session: PlannedSession) -> None: ...
    def on_bytes(self, session: PlannedSession, count: int) -> None: ...
    def on_session_end(self, session: PlannedSession, result: SessionResult) -> None: ...


class Fault(Exception):
    """A failure that stops a session, phrased for the user. `reached_server` is False when
    the request never left (no connection)."""

    def __init__(self, message: str, reached_server: bool = True) -> None:
        super().__init__(message)
        self.reached_server = reached_server


# --- one HTTP exchange over a live connection --------------------------------------------------

class _LiveConnection:
    """A live TCP connection standing for one captured connection."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.used = False
        self.http = self._open()

    def _open(self) -> http.client.HTTPConnection:
        target, timeout = self.options.target, self.options.timeout
        if target.scheme == "https":
            context = ssl.create_default_context()
            if not self.options.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(target.host, target.port, timeout=timeout,
                                               context=context)
        return http.client.HTTPConnection(target.host, target.port, timeout=timeout)

    def close(self) -> None:
        sock = self.http.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
            except OSError:
                pass
        self.http.close()

    def exchange(self, method: str, path: str, headers: list[tuple[str, str]],
                 body: BodySource, counter: "_ByteCounter") -> AckSummary:
        """Send one request, streaming its body; return the summary of the answer.

        A reused keep-alive connection that the server had closed meanwhile is reopened and
        the request sent again once, as any client does; a failure on a fresh connection is
        a fault.
        """
        reused = self.used
        self.used = True
        try:
            return self._exchange(method, path, headers, body(), counter)
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
            if not reused:
                raise self._fault(exc, counter) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._fault(exc, counter) from None
        except ValueError as exc:  # http.client refuses a header or target it finds illegal
            self.http.close()
            raise Fault(f"the captured request cannot be sent as it is: {exc}") from None
        self.http.close()
        counter.request_bytes = 0
        try:
            return self._exchange(method, path, headers, body(), counter)
        except (OSError, http.client.HTTPException) as exc:
            raise self._fault(exc, counter) from None

    def _exchange(self, method: str, path: str, headers: list[tuple[str, str]],
                  body: Iterable[bytes], counter: "_ByteCounter") -> AckSummary:
        conn = self.http
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        for chunk in body:
            conn.send(chunk)
            counter.add(len(chunk))
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BODY)
        if not response.isclosed():
            conn.close()  # a body larger than any ack: do not read on into the next answer
        return summarize(response.status, response.getheader)

    def _fault(self, exc: BaseException, counter: "_ByteCounter") -> Fault:
        where = f"{self.options.target.host}:{self.options.target.port}"
        self.http.close()
        if isinstance(exc, ConnectionRefusedError):
            return Fault(f"cannot connect to {where}: connection refused (nothing listens there)",
                         reached_server=False)
        if isinstance(exc, socket.gaierror):
            return Fault(f"cannot resolve {self.options.target.host}: {exc.strerror}",
                         reached_server=False)
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return Fault(f"{where} did not answer within {self.options.timeout:g} s")
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return Fault(f"{where} reset the connection after {counter.request_bytes} of "
                         f"{counter.expected} body bytes")
        if isinstance(exc, http.client.RemoteDisconnected):
            return Fault(f"{where} closed the connection without answering")
        if isinstance(exc, http.client.BadStatusLine):
            return Fault(f"{where} answered something that is not HTTP: {exc.line[:60]!r}")
        if isinstance(exc, http.client.HTTPException):
            return Fault(f"{where} sent a malformed HTTP answer ({type(exc).__name__}: {exc})")
        if isinstance(exc, ssl.SSLError):
            return Fault(f"TLS with {where} failed: {exc.reason or exc}")
        return Fault(f"talking to {where} failed: {exc.strerror or exc}"
                     if isinstance(exc, OSError) else f"talking to {where} failed: {exc}")


BodySource = Callable[[], Iterable[bytes]]  # a fresh iterator over the body on each call


class _ByteCounter:
    def __init__(self, expected: int, report) -> None:
        self.expected = expected
        self.request_bytes = 0
        self._report = report

    def add(self, count: int) -> None:
        self.request_bytes += count
        self._report(count)


class _Connections:
    """Live connections keyed by the captured connection they stand for; each is closed when
    the last planned request of its captured connection is done, so TCP boundaries follow the
    capture's."""

    def __init__(self, plan: Plan, options: Options) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._live: dict[int, _LiveConnection] = {}
        self._remaining: dict[int, int] = {}
        for session in plan.sessions:
            for request in session.requests:
                key = request.connection
                self._remaining[key] = self._remaining.get(key, 0) + 1

    def get(self, key: int) -> _LiveConnection:
        with self._lock:
            live = self._live.get(key)
            if live is None:
                live = self._live[key] = _LiveConnection(self.options)
            return live

    def done(self, key: int) -> None:
        """One planned request of `key` is over (sent, skipped or abandoned)."""
        with self._lock:
            self._remaining[key] -= 1
            if self._remaining[key] <= 0:
                live = self._live.pop(key, None)
                if live is not None:
                    live.close()

    def discard(self, key: int) -> None:
        with self._lock:
            live = self._live.pop(key, None)
        if live is not None:
            live.close()

    def close_all(self) -> None:
        with self._lock:
            for live in self._live.values():
                live.close()
            self._live.clear()


# --- the replay --------------------------------------------------------------------------------

class _Clock:
    def __init__(self, plan: Plan, speed: float) -> None:
        self.start = time.monotonic()
        self.origin_ns = plan.first_ts_ns
        self.speed = speed
        self.stopped = threading.Event()  # set on interruption: waits end, nothing more is sent

    def now(self) -> float:
        return time.monotonic() - self.start

    def due(self, ts_ns: int) -> float | None:
        if self.speed <= 0:
            return None
        return (ts_ns - self.origin_ns) / 1e9 / self.speed

    def wait_until(self, due: float | None) -> None:
        if due is not None:
            delay = due - self.now()
            if delay > 0:
                # A tiny --speed stretches the capture past what a wait can be given.
                self.stopped.wait(min(delay, threading.TIMEOUT_MAX))


def auth_notes(plan: Plan, options: Options) -> list[str]:
    """What the replay cannot do about the captured credentials, said plainly."""
    notes: list[str] = []
    schemes = {auth_scheme(v) for s in plan.sessions for r in s.requests
               for v in Headers(r.headers).get_all(AUTHORIZATION)}
    blocked = sorted(schemes & set(NON_REPLAYABLE_AUTH))
    if blocked:
        instead = ("those requests carry the --auth Basic credentials instead" if options.auth
                   else "those requests are sent without Authorization (give --auth USER:PASS "
                        "to send Basic credentials instead)")
        notes.append(f"the capture uses {'/'.join(s.upper() for s in blocked)} authentication, "
                     "which cannot be replayed (it is bound to the original connection or "
                     f"server challenge); {instead}")
    if "basic" in schemes and options.auth is None:
        notes.append("the capture's Basic credentials are sent as captured (use --auth to "
                     "replace them)")
    return notes


_AUTHORIZATION = AUTHORIZATION.lower()
_FRAGMENT_RUN = frozenset({PacketType.FRAGMENT, PacketType.PING})


class _SessionReplay:
    """Replays one planned session on the calling thread."""

    def __init__(self, session: PlannedSession, plan: Plan, options: Options, clock: _Clock,
                 connections: _Connections, observer: Observer | None) -> None:
        self.session = session
        self.plan = plan
        self.options = options
        self.clock = clock
        self.connections = connections
        self.observer = observer
        self.result = _result_of(session)
        self.live_ids: dict[str, str] = {}  # captured id → live id
        self.live_id: str | None = None
        self.host: str = options.target.netloc
        self.shift = 0.0  # how late the session started (concurrency cap), added to every due time
        self.offset: int | None = None  # adaptive: the live server's received offset
        self.recreated = 0  # adaptive: sessions recreated after the server forgot them, in all

    # -- header rewriting

    def headers_for(self, request: PlannedRequest,
                    replace: dict[str, str] | None = None) -> list[tuple[str, str]]:
        """The captured headers, in their order and case, with Host, the session id and
        credentials rewritten and `replace` applied (added at the end when absent)."""
        replace = {k.lower(): v for k, v in (replace or {}).items()}
        out: list[tuple[str, str]] = []
        for name, value in request.headers:
            lowered = name.lower()
            if lowered == Header.HOST.lower():
                value = self.host
            elif lowered == Header.SESSION_ID.lower():
                value = self._live_session_id(value)
            elif lowered == _AUTHORIZATION:
                if self.options.auth:
                    value = self._basic()
                elif auth_scheme(value) in NON_REPLAYABLE_AUTH:
                    continue
            if lowered in replace:
                value = replace.pop(lowered)
            out.append((name, value))
        out.extend((name, value) for name, value in replace.items())
        return out

    def _live_session_id(self, captured: str) -> str:
        for known, live in self.live_ids.items():
            if same_id(known, captured):
                return live
        return self.live_id if self.options.mode == "adaptive" and self.live_id else captured

    def _basic(self) -> str:
        assert self.options.auth is not None
        return basic_authorization(*self.options.auth)

    # -- sending

    def send(self, outcome: Outcome, request: PlannedRequest, headers: list[tuple[str, str]],
             body: BodySource, length: int, ts_ns: int | None) -> AckSummary:
        """Wait for the request's time, send it, fill `outcome`; raises Fault."""
        due = self.clock.due(ts_ns) if ts_ns is not None else None
        if due is not None:
            due += self.shift
            self.clock.wait_until(due)
        if self.clock.stopped.is_set():
            outcome.fault = "interrupted before this request"
            raise Fault(outcome.fault, reached_server=False)
        outcome.due_s = due
        outcome.sent_s = self.clock.now()
        key = request.connection
        live = self.connections.get(key)
        counter = _ByteCounter(length, lambda n: self._count(outcome, n))
        path = self.options.target.path_for(request.target, self.options.strip_prefix)
        if "chunked" in (Headers(headers).get("Transfer-Encoding") or "").lower():
            body = _chunked(body)  # the capture holds the de-chunked body
        with live.lock:
            try:
                ack = live.exchange(request.method, path, headers, body, counter)
            except Fault as fault:
                self.connections.discard(key)
                if self.clock.stopped.is_set():
                    fault = Fault("interrupted while this request was in flight")
                outcome.fault = str(fault)
                outcome.sent = fault.reached_server
                raise fault from None
        outcome.sent = True
        outcome.live = ack
        return ack

    def _count(self, outcome: Outcome, count: int) -> None:
        outcome.bytes_sent += count
        if self.observer is not None:
            self.observer.on_bytes(self.session, count)

    def body_of(self, body: Body | None) -> BodySource:
        return lambda: iter(()) if body is None else self.plan.spool.read(body)

    def learn(self, request: PlannedRequest, ack: AckSummary) -> None:
        """Take the live session id (and Host-Id) from a successful Create ack."""
        if request.packet_type is not PacketType.CREATE_SESSION:
            return
        if ack.status not in SUCCESS or not ack.session_id:
            return
        captured = ((request.response.session_id if request.response else None)
                    or self.session.session_id or self.session.key)
        self.live_ids[captured] = ack.session_id
        self.live_id = ack.session_id
        self.result.live_ids.append(ack.session_id)
        if ack.host_id:
            self._consider_host_id(ack.host_id)

    def _consider_host_id(self, host_id: str) -> None:
        if not self.options.follow_host_id:
            self.result.notes.append(f"the server gave BITS-Host-Id {host_id}; not followed "
                                     "(use --follow-host-id)")
            return
        target = self.options.target
        if _resolves_to(host_id, target.host, target.port):
            self.host = url_authority(target.scheme, host_id, target.port)
            self.result.notes.append(f"following BITS-Host-Id {host_id} (it is the target's "
                                     "own address)")
        else:
            self.result.notes.append(f"BITS-Host-Id {host_id} does not resolve to the target's "
                                     "address: not followed (nothing is sent anywhere but the "
                                     "target)")

    # -- the two modes

    def run(self) -> SessionResult:
        try:
            if self.options.mode == "adaptive":
                self._adaptive()
            else:
                self._faithful()
        except Fault as fault:
            self.result.fault = str(fault)
            unsent = len(self.session.requests) - self._released - 1
            if unsent > 0:
                self.result.notes.append(f"{unsent} later captured request(s) not sent")
        except OSError as exc:  # the body spool: the temporary directory failed under us
            self.result.fault = f"reading the spooled capture bodies failed: {exc}"
        except Exception as exc:  # a bug must not make the session vanish from the results
            self.result.fault = unexpected_fault(exc)
        finally:
            self._release_through(len(self.session.requests) - 1)
        return self.result

    _released = 0  # planned requests whose turn is over (their live connection may close)

    def _release_through(self, index: int) -> None:
        for request in self.session.requests[self._released:index + 1]:
            self.connections.done(request.connection)
        self._released = max(self._released, index + 1)

    def _faithful(self) -> None:
        for index, request in enumerate(self.session.requests):
            outcome = Outcome(request.label, request)
            self.result.outcomes.append(outcome)
            if request.body is not None and not request.body.complete:
                outcome.note = "body incomplete in the capture: not sent"
                self._release_through(index)
                continue
            ack = self.send(outcome, request, self.headers_for(request),
                            self.body_of(request.body),
                            request.body.length if request.body else 0, request.ts_ns)
            self.learn(request, ack)
            outcome.differences = compare(request.response, ack)
            self._release_through(index)

    def _adaptive(self) -> None:
        requests = self.session.requests
        index = 0
        reauthenticated = False  # the last request drew 401 and was resent with --auth
        while index < len(requests):
            request = requests[index]
            if request.packet_type is PacketType.FRAGMENT:
                # A run of fragments (Pings between them included: a real client pings on its
                # own when it reconnects) becomes one upload loop up to the run's last byte.
                end = index
                while end < len(requests) and requests[end].packet_type in _FRAGMENT_RUN:
                    end += 1
                self._upload([r for r in requests[index:end]
                              if r.packet_type is PacketType.FRAGMENT and r.range is not None])
                self._release_through(end - 1)
                index, reauthenticated = end, False
                continue
            previous = requests[index - 1] if index else None
            if (reauthenticated and previous.response and previous.response.status == HTTPStatus.UNAUTHORIZED
                    and request.packet_type is previous.packet_type):
                self.result.outcomes.append(Outcome(request.label, request, note=(
                    "the captured client's resend after 401: already resent with --auth")))
            elif request.body is not None and not request.body.complete:
                self.result.outcomes.append(Outcome(request.label, request,
                                                    note="body incomplete in the capture: not sent"))
            else:
                sent_before = len(self.result.outcomes)
                ack = self._send_adaptive(request, self.headers_for(request),
                                          self.body_of(request.body),
                                          request.body.length if request.body else 0,
                                          request.ts_ns, request.label, request)
                reauthenticated = len(self.result.outcomes) - sent_before > 1
                self.learn(request, ack)
                if (ack.session_not_found and request.packet_type is PacketType.CLOSE_SESSION
                        and self.offset is not None):
                    try:
                        self.recreated = count_recreation(self.recreated)
                    except GiveUp as why:
                        raise Fault(str(why)) from None
                    self.result.notes.append("session not found at Close: recreating it and "
                                             "uploading again")
                    self._recreate(request)
                    self._upload([r for r in requests if r.packet_type is PacketType.FRAGMENT
                                  and r.range is not None], from_offset=0)
                    self._send_adaptive(request, self.headers_for(request), self.body_of(None), 0,
                                        None, request.label, None)
            self._release_through(index)
            index += 1

    def _send_adaptive(self, request: PlannedRequest, headers: list[tuple[str, str]],
                       body: BodySource, length: int, ts_ns: int | None,
                       label: str, captured: PlannedRequest | None) -> AckSummary:
        """Send, and resend once with --auth credentials on a 401."""
        outcome = Outcome(label, captured)
        self.result.outcomes.append(outcome)
        ack = self.send(outcome, request, headers, body, length, ts_ns)
        if captured is not None:
            outcome.differences = compare(captured.response, ack)
        if (ack.status == HTTPStatus.UNAUTHORIZED and self.options.auth
                and AUTHORIZATION not in Headers(headers)):
            outcome.note = "401: resent with --auth credentials"
            return self._send_adaptive(request, headers + [(AUTHORIZATION, self._basic())],
                                       body, length, None, label, None)
        return ack

    def _recreate(self, near: PlannedRequest) -> None:
        create = next((r for r in self.session.requests
                       if r.packet_type is PacketType.CREATE_SESSION), None)
        if create is not None:
            headers = self.headers_for(create)
            template = create
        else:
            template = near
            headers = [(Header.PACKET_TYPE, PacketType.CREATE_SESSION.value),
                       (Header.SUPPORTED_PROTOCOLS, PROTOCOL_GUID),
                       (Header.HOST, self.host), (Header.CONTENT_LENGTH, "0")]
            agent = near.header(Header.USER_AGENT)
            if agent:
                headers.insert(0, (Header.USER_AGENT, agent))
        synthetic = PlannedRequest(
            exchange=template.exchange, file=near.file, connection=near.connection,
            frame=template.frame, ts_ns=near.ts_ns, done_ts_ns=near.ts_ns, method=METHOD,
            target=template.target,
            version=template.version, headers=headers,
            packet_type=PacketType.CREATE_SESSION, packet_type_raw=PacketType.CREATE_SESSION.value,
            session_id=None, range=None, body=None, response=None)
        ack = self._send_adaptive(synthetic, headers, self.body_of(None), 0, None,
                                  "Create-Session (recreated)", None)
        if ack.status not in SUCCESS or not ack.session_id:
            raise Fault(f"recreating the session failed: {ack.describe()}")
        self.live_id = ack.session_id
        for captured in self.live_ids:  # every later packet goes to the new session
            self.live_ids[captured] = ack.session_id
        self.result.live_ids.append(ack.session_id)

    def _upload(self, fragments: list[PlannedRequest], from_offset: int | None = None) -> None:
        """Upload the bytes the captured fragments carried (up to the last of them), from the
        captured bytes, following the live server's offset (replay.fragment_loop)."""
        if not fragments:
            return
        end = max(r.range.last for r in fragments) + 1
        if from_offset is not None:
            offset = from_offset
        elif self.offset is not None:
            offset = self.offset
        else:
            offset = fragments[0].range.first
        loop = FragmentLoop(fragments[0].range.total, offset, stop=end, end=end,
                            recreated=self.recreated)
        slot = 0
        while not loop.done:
            # The n-th fragment sent takes the n-th captured one's size, time and connection.
            captured = fragments[min(slot, len(fragments) - 1)]
            ts_ns = captured.ts_ns if slot < len(fragments) else None
            slot += 1
            wanted = loop.next_range(captured.range.length)
            pieces = self.session.entity_piece(wanted.first, wanted.last)
            if pieces is None:
                raise Fault(f"bytes {wanted.first}-{wanted.last} of the file were never captured "
                            "whole: cannot upload further")
            headers = self.headers_for(captured, {
                Header.CONTENT_RANGE: str(wanted), Header.CONTENT_LENGTH: str(wanted.length)})
            pairs = captured if captured.range == wanted else None
            ack = self._send_adaptive(captured, headers, lambda p=pieces: self._pieces(p),
                                      wanted.length, ts_ns, f"Fragment {wanted}", pairs)
            try:
                step = loop.answer(ack.status, ack.received, ack.session_not_found)
            except GiveUp as why:
                raise Fault(str(why)) from None
            self.recreated = loop.recreated
            if step is Step.NEW_SESSION:
                self._recreate(captured)
                loop.restart()
            self.offset = loop.offset

    def _pieces(self, pieces: list[tuple[Body, int, int]]) -> Iterator[bytes]:
        for body, skip, take in pieces:
            yield from self.plan.spool.read(body, skip, take)


def unexpected_fault(exc: Exception) -> str:
    """A fault message for an error the replay did not foresee (a bug): its type and message;
    the traceback on stderr only when BITSTRACE_DEBUG=1."""
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exception(exc)
    return f"unexpected error: {type(exc).__name__}: {exc}"


def _chunked(body: BodySource) -> BodySource:
    def chunks() -> Iterator[bytes]:
        for chunk in body():
            if chunk:
                yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        yield b"0\r\n\r\n"
    return chunks


def _resolves_to(host: str, target_host: str, port: int) -> bool:
    try:
        wanted = {a[4][0] for a in socket.getaddrinfo(target_host, port, type=socket.SOCK_STREAM)}
        given = {a[4][0] for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(wanted & given)


def dry_run(plan: Plan, options: Options) -> list[dict]:
    """What `replay` would send, request by request, without sending anything. Live session
    ids are shown as `<live id of CAPTURED>`; adaptive mode's reactions depend on the live
    answers, so the captured sequence is shown."""
    clock = _Clock(plan, options.speed)
    unused = _Connections(plan, options)  # opens nothing until asked to
    described = []
    seen: set[int] = set()
    for session in plan.sessions:
        worker = _SessionReplay(session, plan, options, clock, unused, None)
        requests = []
        for request in session.requests:
            if request.packet_type is PacketType.CREATE_SESSION:
                captured = ((request.response.session_id if request.response else None)
                            or session.session_id or session.key)
                worker.live_ids[captured] = f"<live id of {captured}>"
            body = request.body
            requests.append({
                "label": request.label,
                "at_s": clock.due(request.ts_ns),
                "connection": request.connection, "file": request.file,
                "new_connection": request.connection not in seen,
                "method": request.method,
                "url": f"{options.target.scheme}://{options.target.netloc}"
                       f"{options.target.path_for(request.target, options.strip_prefix)}",
                "headers": worker.headers_for(request),
                "body_length": body.length if body else 0,
                "body_sha256": body.sha256 if body else None,
                "note": ("body incomplete in the capture: not sent"
                         if body is not None and not body.complete else None),
            })
            seen.add(request.connection)
        described.append({"captured_id": session.session_id or session.key,
                          "generation": session.generation, "requests": requests})
    return described


def replay(plan: Plan, options: Options, observer: Observer | None = None) -> ReplayResult:
    """Replay every session of the plan; sessions that overlapped in the capture overlap here
    (up to `options.concurrency` at once). Faults stop the session they hit, not the replay."""
    if options.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    clock = _Clock(plan, options.speed)
    connections = _Connections(plan, options)
    slots = threading.BoundedSemaphore(options.concurrency) if options.concurrency else None
    results: list[SessionResult | None] = [None] * len(plan.sessions)

    finished = [threading.Event() for _ in plan.sessions]

    def run(position: int, session: PlannedSession, due: float | None) -> None:
        result = results[position] = _result_of(session)
        try:
            worker = _SessionReplay(session, plan, options, clock, connections, observer)
            result = results[position] = worker.result
            if due is not None:
                worker.shift = max(0.0, clock.now() - due)
            if observer is not None:
                observer.on_session_start(session)
            result.started_s = clock.now()
            worker.run()
            result.ended_s = clock.now()
            if observer is not None:
                observer.on_session_end(session, result)
        except Exception as exc:  # outside the session's own steps (the observer, say)
            result.fault = result.fault or unexpected_fault(exc)
        finally:
            finished[position].set()
            if slots is not None:
                slots.release()

    # Sessions start in capture order at their captured time, one thread per session in
    # flight, and never before the sessions that had ended when they began in the capture:
    # at any speed, what did not overlap there does not overlap here.
    threads: list[threading.Thread] = []
    running: list[tuple[int, int]] = []  # heap of (captured end, position) of started sessions
    interrupted = False
    try:
        for position, session in enumerate(plan.sessions):
            while running and running[0][0] <= session.first_ts_ns:
                finished[heapq.heappop(running)[1]].wait()
            due = clock.due(session.first_ts_ns)
            clock.wait_until(due)
            if slots is not None:
                slots.acquire()
            thread = threading.Thread(target=run, args=(position, session, due),
                                      name=f"replay-{session.key}", daemon=True)
            thread.start()
            threads.append(thread)
            heapq.heappush(running, (session.done_ts_ns, position))
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        # Stop waiting and sending; closing the connections ends requests in flight.
        interrupted = True
        clock.stopped.set()
        connections.close_all()
        for position in range(len(threads)):
            # Not Thread.join: after an interrupted join, CPython 3.11 may return at once.
            finished[position].wait(options.timeout)
    finally:
        connections.close_all()
    return ReplayResult(str(options.target), options.mode, options.speed,
                        [r for r in results if r is not None], interrupted)
