"""Clock skew between the two directions of a capture, bounded by the causality of BITS exchanges.

A capture made with one tap per direction (or merged from two) stamps each direction with its
own clock. With `offset` = server→client stamps minus client→server stamps, causality bounds it:

- an answer cannot begin before its request began: offset <= ack - request, for every packet;
- a BITS client sends its next request on a connection only after it has read the answer to the
  previous one (it never pipelines): offset >= ack - next request, for consecutive packets of a
  connection (in stream order).

Unskewed, 0 satisfies both. A violated bound is evidence of skew, and the least correction that
satisfies it is the estimate the session walk uses to compare an ack's time with a request's
(`client_ns`): so skew moves timings, never the order of events, states or verdicts. The
evidence is the report's capture-level note, not a protocol anomaly.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitstrace.analyzer.bits.packets import BitsPacket


@dataclass(slots=True)
class ClockSkew:
    """What one capture file's packets show of the server→client clock against the client's."""

    answers_before_requests: int = 0  # acks stamped before their request began
    behind_ns: int = 0  # the most an ack precedes its request: the server clock is behind by at least this
    answers_after_next_request: int = 0  # acks stamped after the client's next request on their connection
    ahead_ns: int = 0  # the most such an ack follows that request: the server clock is ahead by at least this

    @property
    def detected(self) -> bool:
        return bool(self.answers_before_requests or self.answers_after_next_request)

    @property
    def offset_ns(self) -> int:
        """The estimated server→client clock minus client→server clock (0: no evidence). When the
        evidence points both ways (jitter, or a client that pipelines), the unambiguous bound wins:
        an answer never begins before its request."""
        return -self.behind_ns if self.behind_ns else self.ahead_ns

    def client_ns(self, server_ns: int) -> int:
        """A server→client timestamp on the client→server clock."""
        return server_ns - self.offset_ns


class SkewMeter:
    """Collects the evidence packet by packet, as the tracker files them: the packets of a
    connection come in stream order, so each is compared with the one before it there."""

    __slots__ = ("skews", "_last")

    def __init__(self) -> None:
        self.skews: dict[int, ClockSkew] = {}  # by capture file index of the request, where seen
        self._last: dict[int, BitsPacket] = {}  # connection id -> its latest packet

    def observe(self, pkt: BitsPacket) -> None:
        acked, sent = pkt.acked_ns, pkt.sent_ns
        if acked is not None and acked < sent:
            skew = self._skew(pkt.request_capture)
            skew.answers_before_requests += 1
            skew.behind_ns = max(skew.behind_ns, sent - acked)
        before = self._last.get(pkt.connection)
        self._last[pkt.connection] = pkt
        if before is not None and before.acked_ns is not None and before.acked_ns > sent:
            skew = self._skew(pkt.request_capture)
            skew.answers_after_next_request += 1
            skew.ahead_ns = max(skew.ahead_ns, before.acked_ns - sent)

    def _skew(self, capture: int) -> ClockSkew:
        skew = self.skews.get(capture)
        if skew is None:
            skew = self.skews[capture] = ClockSkew()
        return skew


NO_SKEW = ClockSkew()
