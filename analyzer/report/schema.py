"""The report of schema `bitstrace.report` version 1 (schema.md), as types: what json.py builds
and what text.py, html.py and timeline.py render, checked by mypy against this one definition.

TypedDicts rather than dataclasses: the report *is* a JSON document. The writers put the dicts
out as they are (json.py's own encoder, JSON Lines records spread from them), the renderers read
reports loaded back from `--json` files as well as built ones, and a TypedDict costs nothing at
run time, so the output stays byte for byte what it was and as fast. A field is added by one
line in its record below (and the line in json.py that fills it, and its line in schema.md).

Every key is always present (absent values are null, never missing keys); the renderers still
read with `.get`, since a report from another producer or another version may lack some.
Strings such as a severity or a verdict are typed `str`, not a Literal: the renderers must show
whatever a report holds, including values this version does not know.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class ToolRecord(TypedDict):
    name: str
    version: str


class FilterRecord(TypedDict):
    """What the lists were cut to; the summary counts everything."""

    session: str | None
    min_severity: str  # error | warning | info


class ClockSkewRecord(TypedDict):
    """Evidence that the two directions were stamped by clocks apart (one tap per direction)."""

    answers_before_requests: int
    behind_s: float
    answers_after_next_request: int
    ahead_s: float
    offset_s: float  # server→client stamps minus client→server ones, at least this much


class CaptureRecord(TypedDict):
    capture_point: NotRequired[str]  # only when the input names directories: the directory read
    file: str
    format: str | None  # pcap | pcapng; "" or null when the file was not read as a capture
    frames: int  # how many frames the file held
    bytes: int
    first_time: str | None
    first_ts: float | None
    last_time: str | None
    last_ts: float | None
    complete: bool  # false: reading stopped early (see problems)
    connections: int
    exchanges: int
    decoder: dict[str, int]  # counters of the packet decoder
    tcp: dict[str, int]  # counters of the reassembler
    clock_skew: ClockSkewRecord | None  # null: the BITS exchanges show no skew
    tls: NotRequired[list[dict[str, Any]]]  # only when the capture holds TLS: analyzer/tls.py facts_record


class ProblemRecord(TypedDict):
    """Bad input met while reading; the analysis went on."""

    kind: str
    message: str
    file: str | None
    frame: int | None
    offset: int | None
    connection: int | None
    fatal: bool


class SeverityCounts(TypedDict):
    error: int
    warning: int
    info: int


class SummaryRecord(TypedDict):
    sessions: int
    delivered: int
    not_delivered: int
    unknown: int
    anomalies: SeverityCounts
    http_exchanges: int
    bits_exchanges: int
    other_http: int
    downloads: int


class RangeRecord(TypedDict):
    first: int
    last: int  # inclusive
    total: int


class RequestRecord(TypedDict):
    method: str
    target: str
    frame: int
    capture: int  # index into the report's `captures` of the file `frame` counts in
    last_frame: int
    last_capture: int
    time: str | None
    ts: float | None
    range: RangeRecord | None  # fragments only
    content_length: int | None
    body_length: int
    body_sha256: str | None  # None when the body is partial


class ResponseRecord(TypedDict):
    status: int | None
    reason: str | None
    frame: int | None
    capture: int | None
    time: str | None
    ts: float | None
    packet_type: str | None  # BITS-Packet-Type as on the wire
    session_id: str | None
    received: int | None
    error_code: str | None  # `0x8020001F`
    error_name: str | None
    error_context: str | None
    reply_url: str | None
    host_id: str | None


class PacketRecord(TypedDict):
    type: str | None  # Ping | Create-Session | Fragment | Close-Session | Cancel-Session; None: unknown
    type_raw: str | None  # as on the wire
    connection: int
    request: RequestRecord
    response: ResponseRecord | None  # None: no response in the capture
    anomalies: list[str]  # codes raised at this packet


class AnomalyRecord(TypedDict):
    code: str
    severity: str  # error | warning | info
    meaning: str  # the catalogue's line
    spec: str
    message: str
    session: str | None
    connection: int | None
    frames: list[int]
    captures: list[int]  # the file of each of `frames` (index into the report's `captures`)
    time: str | None
    ts: float | None


class CoverageRecord(TypedDict):
    first: int
    last: int  # inclusive
    frames: list[int]  # request frames of the fragments the bytes came from
    captures: list[int]
    acknowledged: bool


class HoleRecord(TypedDict):
    first: int
    last: int  # inclusive


class ExtractedRecord(TypedDict):
    path: str
    complete: bool
    sha256: str | None
    coverage: list[CoverageRecord]
    holes: list[HoleRecord]  # what of [0, final TOTAL) no acknowledged fragment covers


class SessionRecord(TypedDict):
    capture_points: NotRequired[list[str]]  # only when the input names directories
    id: str | None
    client: str
    server: str
    host: str | None  # Host header of the Create-Session
    url: str
    content_name: str | None
    protocol: str | None
    user_agent: str | None
    state: str  # machine state at the end of the capture
    verdict: str  # delivered | not-delivered | unknown
    verdict_reason: str
    before_capture: bool  # already running when the capture began
    reply_url: str | None
    total: int | None
    acknowledged: int  # high-water mark the server acknowledged
    bytes_sent: int  # fragment body bytes on the wire, resends included
    fragments: int
    first_time: str | None
    first_ts: float | None
    last_time: str | None
    last_ts: float | None
    duration_s: float
    throughput_bps: float | None  # acknowledged bytes / duration
    connections: list[int]
    packets: list[PacketRecord]  # empty in a report built without them (json.PacketSource)
    anomalies: list[AnomalyRecord]
    extracted: ExtractedRecord | None  # only with --extract


class DownloadRecord(TypedDict):
    client: str
    server: str
    method: str
    url: str
    host: str | None
    status: int | None
    bytes: int
    range: str | None  # the Range header
    user_agent: str
    frame: int
    capture: int
    time: str | None  # when the request was sent
    ts: float | None
    session: str | None  # the upload-reply session whose reply this fetches


class Report(TypedDict):
    schema: str  # "bitstrace.report"
    version: int
    tool: ToolRecord
    filter: FilterRecord
    captures: list[CaptureRecord]
    problems: list[ProblemRecord]
    summary: SummaryRecord
    sessions: list[SessionRecord]
    anomalies: list[AnomalyRecord]  # those of no session
    downloads: list[DownloadRecord]
