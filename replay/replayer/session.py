"""One planned session replayed against the live server, in either mode.

`faithful` sends the captured requests exactly, anomalies included (only Host, the request
target, the session id and Basic credentials are rewritten). `adaptive` behaves like a real
client: it uploads the file from the bytes the capture holds, continuing from the live
server's offset (200/416), recreating the session on BG_E_SESSION_NOT_FOUND and shrinking
fragments on 413 (the recovery rules of replay.fragment_loop, shared with the client).

Everything goes to the one target address given; nothing is ever sent anywhere else, and no
name is looked up but the target's own (to connect to it). The BITS-Host-Id of a live Create
ack only changes the Host header, and only with `follow_host_id` and when it names the
target itself (`names_target`).
"""

from __future__ import annotations

import functools
import ipaddress
from http import HTTPStatus
from typing import Iterator

from bitstrace.analyzer.authority import host_name, url_authority
from bitstrace.analyzer.basic_auth import AUTHORIZATION, auth_scheme, basic_authorization
from bitstrace.analyzer.bits.packets import SUCCESS
from bitstrace.analyzer.bits.protocol import METHOD, PROTOCOL_GUID, Header, PacketType, same_id
from bitstrace.analyzer.http import Headers
from bitstrace.replay.fragment_loop import FragmentLoop, GiveUp, Step, count_recreation
from bitstrace.replay.replayer.compare import AckSummary, compare
from bitstrace.replay.replayer.connections import BodySource, ByteCounter, Connections, chunked
from bitstrace.replay.replayer.options import Options
from bitstrace.replay.replayer.pacing import Clock
from bitstrace.replay.replayer.plan import SpooledBody, Plan, PlannedRequest, PlannedSession
from bitstrace.replay.replayer.results import (
    NO_DIFFERENCES,
    Fault,
    Observer,
    Outcome,
    SessionResult,
    result_of,
    unexpected_fault,
)

#: Authorization schemes bound to the original connection or to a server challenge.
NON_REPLAYABLE_AUTH = ("ntlm", "negotiate", "kerberos", "digest")


def auth_notes(plan: Plan, options: Options) -> list[str]:
    """What the replay cannot do about the captured credentials, said plainly."""
    notes: list[str] = []
    schemes = {scheme for session in plan.sessions for scheme in session.auth_schemes}
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


class SessionReplay:
    """Replays one planned session on the calling thread."""

    def __init__(self, session: PlannedSession, plan: Plan, options: Options, clock: Clock,
                 connections: Connections, observer: Observer | None) -> None:
        self.session = session
        self.requests = session.requests  # read from the plan's store once, let go after the run
        self.plan = plan
        self.options = options
        self.clock = clock
        self.connections = connections
        self.observer = observer
        self.result = result_of(session)
        self.live_ids: dict[str, str] = {}  # captured id → live id
        self.live_id: str | None = None
        self.host: str = options.target.netloc
        self.shift = 0.0  # how late the session started (concurrency cap), added to every due time
        self.offset: int | None = None  # adaptive: the live server's received offset
        self.recreated = 0  # adaptive: sessions recreated after the server forgot them, in all
        self._peer: str | None = None  # the address the last request reached

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
        counter = ByteCounter(length, lambda n: self._count(outcome, n))
        path = self.options.target.path_for(request.target, self.options.strip_prefix)
        if "chunked" in (Headers(headers).get("Transfer-Encoding") or "").lower():
            body = chunked(body)  # the capture holds the de-chunked body
        with live.lock:
            try:
                ack = live.exchange(request.method, path, request.version, headers, body,
                                    counter)
                self._peer = live.last_peer
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

    def body_of(self, body: SpooledBody | None) -> BodySource:
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
        """Only the Host header can change, and only when the Host-Id names the target itself
        without a name being looked up (see `names_target`): the live server chooses the
        Host-Id, and a DNS query for it would tell a resolver the replay is running."""
        if not self.options.follow_host_id:
            self.result.notes.append(f"the server gave BITS-Host-Id {host_id}; not followed "
                                     "(use --follow-host-id)")
            return
        target = self.options.target
        if names_target(host_id, target.host, self._peer):
            self.host = url_authority(target.scheme, host_id, target.port)
            self.result.notes.append(f"following BITS-Host-Id {host_id} (it is the target's "
                                     "own address)")
        else:
            self.result.notes.append(f"BITS-Host-Id {host_id} is neither the target's host "
                                     "nor its address (no name is looked up): not followed "
                                     "(nothing is sent anywhere but the target)")

    # -- the two modes

    def run(self) -> SessionResult:
        try:
            if self.options.mode == "adaptive":
                self._adaptive()
            else:
                self._faithful()
        except Fault as fault:
            self.result.fault = str(fault)
            unsent = len(self.requests) - self._released - 1
            if unsent > 0:
                self.result.notes.append(f"{unsent} later captured request(s) not sent")
        except OSError as exc:  # the body spool: the temporary directory failed under us
            self.result.fault = f"reading the spooled capture bodies failed: {exc}"
        except Exception as exc:  # a bug must not make the session vanish from the results
            self.result.fault = unexpected_fault(exc)
        finally:
            self._release_through(len(self.requests) - 1)
            self.session.release()
        return self.result

    _released = 0  # planned requests whose turn is over (their live connection may close)

    def _release_through(self, index: int) -> None:
        for request in self.requests[self._released:index + 1]:
            self.connections.done(request.connection)
        self._released = max(self._released, index + 1)

    def _faithful(self) -> None:
        for index, request in enumerate(self.requests):
            outcome = Outcome(request.label, request, self.plan.store)
            self.result.outcomes.append(outcome)
            if request.body is not None and not request.body.complete:
                outcome.note = "body incomplete in the capture: not sent"
                self._release_through(index)
                continue
            ack = self.send(outcome, request, self.headers_for(request),
                            self.body_of(request.body),
                            request.body.length if request.body else 0, request.ts_ns)
            self.learn(request, ack)
            outcome.differences = compare(request.response, ack) or NO_DIFFERENCES
            self._release_through(index)

    def _adaptive(self) -> None:
        requests = self.requests
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
            if (reauthenticated and previous is not None and previous.response
                    and previous.response.status == HTTPStatus.UNAUTHORIZED
                    and request.packet_type is previous.packet_type):
                self.result.outcomes.append(Outcome(request.label, request, self.plan.store, note=(
                    "the captured client's resend after 401: already resent with --auth")))
            elif request.body is not None and not request.body.complete:
                self.result.outcomes.append(Outcome(request.label, request, self.plan.store,
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
        outcome = Outcome(label, captured, self.plan.store)
        self.result.outcomes.append(outcome)
        ack = self.send(outcome, request, headers, body, length, ts_ns)
        if captured is not None:
            outcome.differences = compare(captured.response, ack) or NO_DIFFERENCES
        if (ack.status == HTTPStatus.UNAUTHORIZED and self.options.auth
                and AUTHORIZATION not in Headers(headers)):
            outcome.note = "401: resent with --auth credentials"
            return self._send_adaptive(request, headers + [(AUTHORIZATION, self._basic())],
                                       body, length, None, label, None)
        return ack

    def _recreate(self, near: PlannedRequest) -> None:
        create = next((r for r in self.requests
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
        ranges = [r.range for r in fragments if r.range is not None]
        if not ranges or len(ranges) != len(fragments):
            return
        end = max(r.last for r in ranges) + 1
        if from_offset is not None:
            offset = from_offset
        elif self.offset is not None:
            offset = self.offset
        else:
            offset = ranges[0].first
        loop = FragmentLoop(ranges[0].total, offset, stop=end, end=end,
                            recreated=self.recreated)
        slot = 0
        while not loop.done:
            # The n-th fragment sent takes the n-th captured one's size, time and connection.
            captured = fragments[min(slot, len(fragments) - 1)]
            captured_range = ranges[min(slot, len(fragments) - 1)]
            ts_ns = captured.ts_ns if slot < len(fragments) else None
            slot += 1
            wanted = loop.next_range(captured_range.length)
            pieces = self.session.entity_piece(wanted.first, wanted.last, self.requests)
            if pieces is None:
                raise Fault(f"bytes {wanted.first}-{wanted.last} of the file were never captured "
                            "whole: cannot upload further")
            headers = self.headers_for(captured, {
                Header.CONTENT_RANGE: str(wanted), Header.CONTENT_LENGTH: str(wanted.length)})
            pairs = captured if captured_range == wanted else None
            ack = self._send_adaptive(captured, headers, functools.partial(self._pieces, pieces),
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

    def _pieces(self, pieces: list[tuple[SpooledBody, int, int]]) -> Iterator[bytes]:
        for body, skip, take in pieces:
            yield from self.plan.spool.read(body, skip, take)


def names_target(host_id: str, target_host: str, peer: str | None) -> bool:
    """The Host-Id is the target itself: the target's host name as given (any case), or an
    IP literal equal to the target's own literal or to the address the connection reached.
    Nothing is resolved."""
    named = host_name(host_id)
    if not named:
        return False
    if named == host_name(target_host):
        return True
    try:
        given = ipaddress.ip_address(named)
    except ValueError:
        return False
    for known in (target_host, peer):
        try:
            if known is not None and ipaddress.ip_address(known) == given:
                return True
        except ValueError:
            continue
    return False
