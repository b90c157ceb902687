"""Rebuilding uploaded entities from fragment bodies as they stream past.

The pipeline calls `Extractor.on_body` with each request body chunk (ExchangeAssembler's
on_body) and the session tracker calls `settle` with each parsed Fragment once its ack is in.
Nothing is buffered whole: each chunk is written at its offset into one sparse temp file per
session, inside the output directory, as it passes (small chunks that continue each other wait in
memory, a bounded run per session, and reach the file in one write).

Design (why one file plus a coverage map, not a staging file per fragment): the coverage map
records for every stored byte range the fragment (request frame) it came from and whether the
server acknowledged it.
- Acknowledged bytes are never overwritten. A later copy of the range is read back and
  compared; a difference is a resend-conflict and the acknowledged copy stays.
- Bytes not (yet) acknowledged are provisional: the fragment is in flight, drew no answer, a
  416, an error, or lies past the ack's N. A later copy is compared (a difference is a
  resend-conflict) and replaces them.
- `settle` turns a fragment's provisional bytes below min(E+1, N) acknowledged when its ack is
  200/201; the rest stay provisional, so refused data never counts as delivered.
At `finish` an entity is complete only when acknowledged bytes run without a hole over [0, TOTAL)
of its final TOTAL: that of the last fragment the server acknowledged (a conformant server refuses a
fragment whose TOTAL changed, so a refused fragment's TOTAL is not the file's), else that of the
last fragment seen. Fragments that disagree on TOTAL are a located problem naming every TOTAL and
the one judged against; nothing past the final TOTAL counts. A complete entity is cut to TOTAL,
hashed (sha256) and named `<session id without braces>_<sanitised Content-Name>`; any other keeps
the `.partial` suffix and lists its holes (what of [0, TOTAL) is not acknowledged).
The hash streams so that publishing need not read the file back: the spool keeps the sha256 of
the acknowledged prefix [0, hashed_end), which never changes again (acknowledged bytes are never
overwritten). One in-flight fragment at a time, the one whose write starts exactly at
hashed_end, extends a tentative copy as it stores; its ack promotes the copy only when it
acknowledges every byte fed. Anything else (a partial ack, a refusal, another fragment writing
over the fed bytes, a gap) drops the copy, and publishing reads back only what lies past
hashed_end.
The coverage map says which ranges are acknowledged, provisional or missing. All files are
opened relative to the output directory's descriptor with O_NOFOLLOW|O_EXCL and published with
link(2), so no name ever leaves the directory, follows a symlink or replaces an existing file.

Only a bounded number of temp files stay open (MAX_OPEN_SPOOLS, least recently used closed
first), so a capture of any number of sessions fits the open-file limit. A closed temp file is
reopened by name when next needed; since the directory may be writable by others, the reopened
file must be the one created (device, inode, and the size it had when closed). A temp file that
cannot be reopened or was replaced loses its entity (a Problem says so), and the rest goes on.
The descriptor is held while publishing, so the linked name is checked to be the same file.

Temp files never outlive their run. An interrupted or failed run (a signal the command line turns
into an exception, any exception) calls `discard`, which removes every temp file this run made
and is still its own. A run killed outright (kill -9, a crash) cannot, so each run holds an
exclusive flock(2) on `.bitstrace-PID.lock` in the directory for as long as it lives, and every
new run first looks for `.bitstrace-PID-N.tmp` files of other runs: when their lock can be taken
(the kernel drops a lock with its process, so a reused PID cannot fake a live run) or, without a
lock file, when no process has that PID, the files are removed and a problem names them, their
size and the PID. They are removed rather than only reported because nothing can resume from them
(the coverage map lived in the dead process's memory) and they can be large; a live run's files
are never touched.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import hashlib
import operator
import os
import re
import resource
import signal
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from bitstrace.analyzer.bits.catalogue import Anomaly, anomaly, frame_name
from bitstrace.analyzer.bits.packets import BitsPacket, fragment_head
from bitstrace.analyzer.bits.protocol import session_key
from bitstrace.analyzer.problems import Problem

PARTIAL_SUFFIX = ".partial"
# The extractor's problems that mean an entity was not written as captured (the run is incomplete).
WRITE_FAILURES = frozenset({"extract-write-failed", "extract-temp-file-lost"})
MAX_NAME_BYTES = 180  # leaves room for the id, a de-duplication counter and the suffix in 255
MAX_ID_BYTES = 60
# Win32 "Naming Files, Paths, and Namespaces": device names, alone or before an extension, in any
# case; CONIN$ and CONOUT$ open the console as well.
_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"{port}{digit}" for port in ("com", "lpt") for digit in (*"0123456789", "\u00b9", "\u00b2", "\u00b3")}
)
_UNSAFE = frozenset('<>:"|?*')
# Small contiguous writes wait in memory and reach the file as one pwrite per run: a capture of
# 1 KiB fragments otherwise costs a system call per fragment. Larger chunks go straight through.
WRITE_BEHIND_BYTES = 4 << 20  # waiting over all sessions at most
RUN_BYTES = 256 << 10  # one session's waiting run at most
DIRECT_WRITE_BYTES = 16 << 10
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_REOPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# Temp files open at once. The common default soft limit on open files is 1,024, shared with the
# capture files, stdio and whatever embeds the analyzer; 128 stays far below it while the sessions
# in flight at one moment of a capture (those that take turns writing) rarely exceed it, and the
# write-behind runs mean a closed file is reopened once per run, not once per chunk. A lower soft
# limit lowers the bound to a quarter of it.
MAX_OPEN_SPOOLS = 128
TEMP_PREFIX = ".bitstrace-"
# a run's files: its temp files `.bitstrace-PID-N.tmp` and its lock `.bitstrace-PID.lock`
_RUN_FILE = re.compile(r"\.bitstrace-([1-9][0-9]{0,9})(?:-[0-9]+\.tmp|\.lock)")
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
STALE_NAMES_LISTED = 5
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def windows_reserved(name: str) -> bool:
    """Whether Windows takes `name` for a device: it drops trailing dots and spaces, of the name and
    of the part before the first dot, and ignores case (`CON`, `con.txt`, `NUL .tar.gz`, `COM1.`)."""
    return name.rstrip(" .").split(".", 1)[0].rstrip(" ").lower() in _WINDOWS_RESERVED


def _not_reserved(name: str) -> str:
    return "_" + name if windows_reserved(name) else name


def sanitise(part: str, limit: int = MAX_NAME_BYTES) -> str:
    """One safe path component: last path part only, no control chars, no reserved names."""
    part = part.replace("\\", "/").rsplit("/", 1)[-1]
    part = "".join("_" if ch in _UNSAFE else ch for ch in part if ch.isprintable())
    part = _not_reserved(part.strip(" ."))
    return part.encode("utf-8")[:limit].decode("utf-8", "ignore").rstrip(" .")


def entity_name(session_id: str, content_name: str | None) -> str:
    """`<session id without braces>_<sanitised Content-Name>` (just the id without a name). Each part
    is checked after the braces go, and the joined name again: reserved names are a property of
    the name that reaches the disk."""
    sid = sanitise(sanitise(session_id, MAX_ID_BYTES).strip("{}"), MAX_ID_BYTES) or "session"
    name = sanitise(content_name) if content_name else ""
    return _not_reserved(f"{sid}_{name}" if name else sid)


@dataclass(slots=True)
class CoveredRange:
    first: int
    last: int  # inclusive
    frames: tuple[int, ...]  # request frames of the fragments the bytes came from
    acknowledged: bool
    captures: tuple[int, ...] = ()  # the capture file index of each of `frames`


@dataclass(frozen=True, slots=True)
class Hole:
    """Bytes of [0, TOTAL) not acknowledged: never sent, lost in a capture gap, or provisional."""

    first: int
    last: int  # inclusive


@dataclass
class ExtractedEntity:
    session_id: str
    path: str
    complete: bool
    total: int | None  # the final TOTAL (see module doc)
    acknowledged_bytes: int  # below `total`
    sha256: str | None  # of complete entities only
    coverage: list[CoveredRange]
    anomalies: list[Anomaly] = field(default_factory=list)
    holes: list[Hole] = field(default_factory=list)  # empty exactly when complete


@dataclass(slots=True)
class _Piece:
    start: int
    end: int  # exclusive
    place: tuple[int, int]  # (capture index, request frame) of the fragment the bytes came from
    acknowledged: bool
    owner: tuple[int, int] | None  # in-flight fragment (connection, request offset)

    def same_origin(self, other: "_Piece") -> bool:
        return self.place == other.place and self.acknowledged == other.acknowledged and self.owner == other.owner


@dataclass(slots=True)
class _Inflight:
    key: tuple[int, int]
    spool: "_Spool"
    first: int
    last: int
    total: int
    place: tuple[int, int]  # (capture index, request frame)
    ts_ns: int
    connection: int
    # earlier copy's (place, acknowledged) -> [first, end, first differing offset or -1] compared
    conflicts: dict[tuple[tuple[int, int], bool], list[int]] = field(default_factory=dict)


class _WriteBehind:
    """The bytes waiting to be written, over all spools (see WRITE_BEHIND_BYTES)."""

    def __init__(self) -> None:
        self.waiting = 0
        self.spools: dict[_Spool, None] = {}  # those that may hold a waiting run


class _OpenFiles:
    """The spools whose temp file is open, least recently used first (see MAX_OPEN_SPOOLS)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spools: OrderedDict[_Spool, None] = OrderedDict()

    def make_room(self) -> None:
        while len(self.spools) >= self.limit:
            spool, _ = self.spools.popitem(last=False)
            spool.close()


def open_spool_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_OPEN_SPOOLS if soft == resource.RLIM_INFINITY else max(1, min(MAX_OPEN_SPOOLS, soft // 4))


_START = operator.attrgetter("start")
_END = operator.attrgetter("end")


class _Spool:
    """One session's temp file and its coverage map (pieces sorted, never overlapping)."""

    def __init__(self, dir_fd: int, temp_name: str, session_id: str, generation: int, several_captures: bool,
                 behind: _WriteBehind, open_files: _OpenFiles) -> None:
        self.dir_fd = dir_fd
        self.behind = behind
        self.open_files = open_files
        self.waiting = bytearray()  # stored bytes not written yet: the run [waiting_at, waiting_at + len)
        self.waiting_at = 0
        self.write_errors: list[str] = []
        self.several_captures = several_captures  # messages then name frames `capture:frame`
        self.generation = generation
        self.temp_name = temp_name
        open_files.make_room()
        self.fd: int | None = os.open(temp_name, _OPEN_FLAGS, 0o644, dir_fd=dir_fd)
        open_files.spools[self] = None
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino)
        self._closed_size = 0
        self.lost: str | None = None  # why the temp file is no longer ours to use or publish
        self.session_id = session_id
        # every TOTAL the fragments gave -> where it first came: ((capture, frame), connection)
        self.totals: dict[int, tuple[tuple[int, int], int]] = {}
        self.last_total: int | None = None  # of the last fragment seen
        self.acknowledged_total: int | None = None  # of the last fragment the server acknowledged
        self.pieces: list[_Piece] = []
        self.anomalies: list[Anomaly] = []
        self.hashed = hashlib.sha256()  # of the file's bytes [0, hashed_end), all acknowledged
        self.hashed_end = 0
        self._tentative: Any = None  # `hashed` extended by the bytes `_streamer` wrote from hashed_end
        self._tentative_end = 0
        self._streamer: tuple[int, int] | None = None

    def descriptor(self) -> int:
        """The temp file's descriptor, reopening it (as the same file) if it was closed for room."""
        fd = self.fd
        if fd is not None:
            self.open_files.spools.move_to_end(self)
            return fd
        if self.lost is not None:
            raise OSError(errno.ESTALE, self.lost)
        self.open_files.make_room()
        try:
            fd = os.open(self.temp_name, _REOPEN_FLAGS, dir_fd=self.dir_fd)
        except OSError as error:
            self.lost = f"could not be reopened ({error.strerror or error})"
            raise
        st = os.fstat(fd)
        # an inode number is free for reuse once our file is gone, so the size must match too
        if (st.st_dev, st.st_ino) != self.identity or st.st_size != self._closed_size:
            os.close(fd)
            self.lost = "was replaced by another file"
            raise OSError(errno.ESTALE, self.lost)
        self.fd = fd
        self.open_files.spools[self] = None
        return fd

    def close(self) -> None:
        fd = self.fd
        if fd is None:
            return
        self.fd = None
        self.open_files.spools.pop(self, None)
        try:
            self._closed_size = os.fstat(fd).st_size
        finally:
            os.close(fd)

    def is_named_by(self, name: str) -> bool:
        """Whether `name` in the directory is this spool's file (the descriptor is held: no inode reuse)."""
        if self.fd is None:
            return False
        try:
            st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def store(self, pos: int, data: memoryview, inflight: _Inflight) -> None:
        end = pos + len(data)
        pieces = self.pieces
        j = len(pieces) if not pieces or pieces[-1].end <= pos else bisect.bisect_right(pieces, pos, key=_END)
        if j == len(pieces) or pieces[j].start >= end:  # nothing stored there yet: most fragments
            self._add(pos, data, inflight)
            return
        # Bytes met here may still wait in memory; a run that then fails to write leaves the map,
        # so the map is read only after the flush.
        self.flush()
        j = bisect.bisect_right(pieces, pos, key=_END)
        if j == len(pieces) or pieces[j].start >= end:
            self._add(pos, data, inflight)
            return
        segments: list[tuple[int, int, _Piece | None]] = []
        cursor = pos
        while j < len(pieces) and pieces[j].start < end:
            piece = pieces[j]
            if piece.start > cursor:
                segments.append((cursor, piece.start, None))
            segments.append((max(piece.start, cursor), min(piece.end, end), piece))
            cursor = min(piece.end, end)
            j += 1
        if cursor < end:
            segments.append((cursor, end, None))
        for a, b, stored in segments:
            chunk = data[a - pos:b - pos]
            if stored is not None:
                if stored.owner == inflight.key:
                    continue
                self._compare(a, b, chunk, stored, inflight)
                if stored.acknowledged:
                    continue
            self._write(a, chunk, inflight)
            self.assign(_Piece(a, b, inflight.place, False, inflight.key))

    def _add(self, pos: int, data: memoryview, inflight: _Inflight) -> None:
        """Store bytes where nothing is mapped. The place in the map is found after the write: a
        waiting run the write flushes may fail and leave the map, moving what lies after it."""
        self._write(pos, data, inflight)
        pieces = self.pieces
        j = len(pieces) if not pieces or pieces[-1].end <= pos else bisect.bisect_right(pieces, pos, key=_END)
        pieces.insert(j, _Piece(pos, pos + len(data), inflight.place, False, inflight.key))
        self._merge(j, j + 1)

    def _write(self, pos: int, chunk: memoryview, inflight: _Inflight) -> None:
        """Store provisional bytes, feeding the tentative hash when they continue it."""
        if self._streamer not in (None, inflight.key) and pos < self._tentative_end:
            self._drop_tentative()  # the streamed bytes are being replaced
        waiting = self.waiting
        if waiting and (pos != self.waiting_at + len(waiting) or len(waiting) >= RUN_BYTES):
            self.flush()
            waiting = self.waiting
        if len(chunk) >= DIRECT_WRITE_BYTES:
            self.flush()
            self._pwrite(chunk, pos)
        else:
            if not waiting:
                self.waiting_at = pos
                self.behind.spools[self] = None
            self.waiting += chunk
            self.behind.waiting += len(chunk)
        if self._streamer == inflight.key and pos == self._tentative_end:
            self._tentative.update(chunk)
            self._tentative_end += len(chunk)
        elif self._streamer is None and pos == self.hashed_end:
            self._tentative = self.hashed.copy()
            self._tentative.update(chunk)
            self._tentative_end = pos + len(chunk)
            self._streamer = inflight.key

    def _pwrite(self, data: bytes | bytearray | memoryview, pos: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.descriptor(), view, pos)
            if written <= 0:
                raise OSError(errno.EIO, f"short write at byte {pos}")
            view, pos = view[written:], pos + written

    def flush(self) -> None:
        """Write the waiting run. When that fails its bytes leave the map (they are not in the file),
        hashes that covered them are dropped, and the error waits in `write_errors` for the extractor
        (the write that forced the flush still goes on)."""
        run, at = self.waiting, self.waiting_at
        if not run:
            return
        self.waiting = bytearray()
        self.behind.waiting -= len(run)
        try:
            self._pwrite(run, at)
        except OSError as error:
            if self.lost is not None:
                return  # the whole entity is lost, and reported as such
            self._clear(at, at + len(run))
            if self.hashed_end > at:
                self.hashed, self.hashed_end = hashlib.sha256(), 0
            if self._tentative_end > at:
                self._drop_tentative()
            self.write_errors.append(f"{error.strerror or error}; bytes {at}-{at + len(run) - 1} are lost")

    def _drop_tentative(self) -> None:
        self._streamer = self._tentative = None
        self._tentative_end = self.hashed_end

    def _compare(self, a: int, b: int, chunk: memoryview, piece: _Piece, inflight: _Inflight) -> None:
        """Read the stored copy back; the overlap with each earlier copy is reported once."""
        self.flush()
        stored = os.pread(self.descriptor(), b - a, a)
        if len(stored) != b - a:
            return  # the stored copy never reached the file (a failed write): nothing to compare
        differs = -1 if stored == chunk else a + next(i for i, (x, y) in enumerate(zip(stored, chunk)) if x != y)
        seen = inflight.conflicts.setdefault((piece.place, piece.acknowledged), [a, b, differs])
        seen[0], seen[1] = min(seen[0], a), max(seen[1], b)
        if differs >= 0 and (seen[2] < 0 or differs < seen[2]):
            seen[2] = differs

    def report_conflicts(self, inflight: _Inflight) -> None:
        for (place, acknowledged), (first, end, differs) in sorted(inflight.conflicts.items()):
            if differs < 0:
                continue
            state = "acknowledged, kept" if acknowledged else "unacknowledged, replaced by the resend"
            self.anomalies.append(anomaly(
                "resend-conflict",
                f"bytes {first}-{end - 1} resent in frame {frame_name(*inflight.place, self.several_captures)} differ from "
                f"the copy first sent in frame {frame_name(*place, self.several_captures)} ({state}); first differing byte {differs}",
                session_id=self.session_id, frames=(place[1], inflight.place[1]),
                captures=(place[0], inflight.place[0]), timestamps=(inflight.ts_ns,),
                connection=inflight.connection,
            ))
        inflight.conflicts.clear()

    def assign(self, new: _Piece) -> None:
        """Make `new` the owner of [new.start, new.end), splitting what it covers."""
        at = self._clear(new.start, new.end)
        self.pieces.insert(at, new)
        self._merge(at, at + 1)

    def _clear(self, start: int, end: int) -> int:
        """Unmap [start, end), cutting the pieces at its edges; returns where the range now sits."""
        pieces = self.pieces
        i = j = bisect.bisect_right(pieces, start, key=_END)
        while j < len(pieces) and pieces[j].start < end:
            j += 1
        if i == j:
            return i
        first, last = pieces[i], pieces[j - 1]
        kept = []
        if first.start < start:
            kept.append(_Piece(first.start, start, first.place, first.acknowledged, first.owner))
        if last.end > end:
            kept.append(_Piece(end, last.end, last.place, last.acknowledged, last.owner))
        pieces[i:j] = kept
        return i + (first.start < start)

    def _merge(self, lo: int, hi: int) -> None:
        """Join same-origin neighbours among pieces[lo - 1:hi + 1] (the pieces just changed and those beside them)."""
        pieces = self.pieces
        i = max(lo, 1)
        while i <= hi and i < len(pieces):
            before, piece = pieces[i - 1], pieces[i]
            if before.end == piece.start and before.same_origin(piece):
                before.end = piece.end
                del pieces[i]
                hi -= 1
            else:
                i += 1

    def settle(self, inflight: _Inflight, acknowledged_below: int) -> None:
        if inflight.conflicts:
            self.report_conflicts(inflight)
        if self._streamer == inflight.key:
            if acknowledged_below >= self._tentative_end:  # every byte fed is now acknowledged
                self.hashed, self.hashed_end = self._tentative, self._tentative_end
            self._drop_tentative()
        pieces = self.pieces
        lo = bisect.bisect_right(pieces, inflight.first, key=_END)
        hi = bisect.bisect_left(pieces, inflight.last + 1, key=_START)
        i = lo
        while i < hi:  # the fragment's pieces change state in place: the map's order and extent stay
            piece = pieces[i]
            if piece.owner == inflight.key:
                piece.owner = None
                if piece.end <= acknowledged_below:
                    piece.acknowledged = True
                elif piece.start < acknowledged_below:
                    pieces.insert(i + 1, _Piece(acknowledged_below, piece.end, piece.place, False, None))
                    piece.end, piece.acknowledged = acknowledged_below, True
                    i, hi = i + 1, hi + 1
            i += 1
        self._merge(lo, hi)

    def coverage(self) -> list[CoveredRange]:
        runs: list[tuple[int, int, bool, dict[tuple[int, int], None]]] = []  # places kept unique, in order
        for piece in self.pieces:
            if runs and runs[-1][1] == piece.start and runs[-1][2] == piece.acknowledged:
                first, _, acknowledged, places = runs[-1]
                places[piece.place] = None
                runs[-1] = (first, piece.end, acknowledged, places)
            else:
                runs.append((piece.start, piece.end, piece.acknowledged, {piece.place: None}))
        return [CoveredRange(first, end - 1, tuple(frame for _, frame in places), acknowledged,
                             tuple(capture for capture, _ in places))
                for first, end, acknowledged, places in runs]

    @property
    def total(self) -> int | None:
        """The final TOTAL (see module doc)."""
        return self.acknowledged_total if self.acknowledged_total is not None else self.last_total

    def acknowledged_bytes(self, total: int) -> int:
        return sum(min(pc.end, total) - pc.start for pc in self.pieces if pc.acknowledged and pc.start < total)

    def holes(self, total: int) -> list[Hole]:
        """What of [0, total) is not acknowledged."""
        holes = []
        cursor = 0
        for piece in self.pieces:
            if piece.start >= total:
                break
            if not piece.acknowledged:
                continue
            if piece.start > cursor:
                holes.append(Hole(cursor, piece.start - 1))
            cursor = piece.end
        if cursor < total:
            holes.append(Hole(cursor, total - 1))
        return holes


class Extractor:
    """Writes each session's entity into `out_dir` as its fragments pass (see module doc)."""

    def __init__(self, out_dir: str | os.PathLike[str], *, several_captures: bool = False,
                 capture_names: Sequence[str] = (), temp_tag: str | None = None) -> None:
        os.makedirs(out_dir, exist_ok=True)
        # temp file names are unique among the writers of out_dir by this tag: the process id,
        # unless the caller knows more writers (a partitioned run: hosts sharing out_dir, and
        # several units in one process)
        self.temp_tag = str(os.getpid()) if temp_tag is None else temp_tag
        self.several_captures = several_captures
        self.capture_names = capture_names  # by capture index: problems name the file of their frame
        self.out_dir = os.fspath(out_dir)
        self._dir_fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY)
        self._pid = os.getpid()
        self._temp_names: dict[str, tuple[int, int] | None] = {}  # made by this run -> (device, inode)
        self._lock_fd: int | None = None
        self._done = False
        self._spools: dict[str, _Spool] = {}  # by session key: the current session of that id
        self._retired: list[_Spool] = []  # earlier sessions whose id a Create ack issued again
        self._generation: dict[str, int] = {}
        self._temp_files = 0
        self._inflight: dict[tuple[int, int], _Inflight] = {}
        self._behind = _WriteBehind()
        self._open_files = _OpenFiles(open_spool_limit())
        self.problems: list[Problem] = []
        self._named: set[tuple[str, str]] = set()  # (kind, session id) already in `problems`
        self._repeated: dict[str, int] = {}  # kind -> problems counted, not listed
        self._remove_stale()
        self._lock()

    def _lock(self) -> None:
        """Hold `.bitstrace-PID.lock` for the run: while it is held, other runs leave our temp files."""
        name = f"{TEMP_PREFIX}{self._pid}.lock"
        try:
            fd = os.open(name, _LOCK_FLAGS, 0o644, dir_fd=self._dir_fd)
        except OSError:
            return  # other runs then judge our files by our PID alone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held by a process of another PID namespace: theirs
            return
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        name = f"{TEMP_PREFIX}{self._pid}.lock"
        try:
            st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            here = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
                os.unlink(name, dir_fd=self._dir_fd)
        except OSError:
            pass  # gone already: nothing to remove
        finally:
            os.close(fd)

    def _run_alive(self, pid: int) -> bool:
        """Whether the run of `pid` lives: its lock is held, or, without a lock file, the PID is in use."""
        try:
            fd = os.open(f"{TEMP_PREFIX}{pid}.lock", os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         dir_fd=self._dir_fd)
        except FileNotFoundError:
            if pid == self._pid:
                return False  # no other live process has our PID
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except (OSError, OverflowError):
                return True  # someone else's process, or a PID that cannot be asked: leave the files
            return True
        except OSError:
            return True  # cannot tell: leave the files
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # drops the lock just taken
        return False

    def _remove_stale(self) -> None:
        """Remove the temp files of runs that died without cleaning up, and say so (see module doc)."""
        runs: dict[int, list[tuple[str, int]]] = {}
        try:
            with os.scandir(self._dir_fd) as entries:
                for entry in entries:
                    match = _RUN_FILE.fullmatch(entry.name)
                    if match is not None and entry.is_file(follow_symlinks=False):
                        runs.setdefault(int(match.group(1)), []).append((entry.name, entry.stat(follow_symlinks=False).st_size))
        except OSError:
            return
        for pid, found in sorted(runs.items()):
            if self._run_alive(pid):
                continue
            removed, size, failed = [], 0, []
            for name, length in sorted(found):
                try:
                    os.unlink(name, dir_fd=self._dir_fd)
                except FileNotFoundError:
                    continue
                except OSError as error:
                    failed.append(f"{name} ({error.strerror or error})")
                    continue
                if name.endswith(".tmp"):
                    removed.append(name)
                    size += length
            if not removed and not failed:
                continue  # only a lock file
            listed = ", ".join(removed[:STALE_NAMES_LISTED]) + (", …" if len(removed) > STALE_NAMES_LISTED else "")
            message = (f"removed {len(removed):,} temporary file{'s' if len(removed) != 1 else ''} ({size:,} bytes) "
                       f"left in {self.out_dir} by an earlier run (pid {pid}) that ended without cleaning up"
                       f"{': ' + listed if removed else ''}")
            if failed:
                message += f"; could not remove {', '.join(failed)}"
            self.problems.append(Problem("extract-stale-temp-removed", message))

    def discard(self) -> None:
        """The run stops early (a signal, an exception): remove every temp file it made that is
        still its own and the lock; nothing more is published. Safe to call more than once."""
        if self._done:
            return
        self._done = True
        # a second Ctrl-C (or SIGTERM) while removing would leave the rest: they wait until done
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self._remove_own()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _remove_own(self) -> None:
        for spool in self._retired + list(self._spools.values()):
            try:
                spool.close()
            except OSError:
                pass
        for name, identity in self._temp_names.items():
            try:
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
                if identity is None or (st.st_dev, st.st_ino) == identity:  # None: made as the run stopped
                    os.unlink(name, dir_fd=self._dir_fd)
            except OSError:
                continue
        self._temp_names.clear()
        self._unlock()
        os.close(self._dir_fd)

    def _capture_name(self, index: int) -> str | None:
        return self.capture_names[index] if index < len(self.capture_names) else None

    def _problem(self, kind: str, session_id: str, message: str, **place: Any) -> None:
        # A session that cannot be written fails again at each later fragment: the first failure
        # names it, the rest are counted (a full disk would otherwise list one line per fragment).
        named = (kind, session_key(session_id))
        if named in self._named:
            self._repeated[kind] = self._repeated.get(kind, 0) + 1
            return
        self._named.add(named)
        self.problems.append(Problem(kind, message, **place))

    def on_body(self, connection: Any, message: Any, chunk: bytes | bytearray | memoryview, body_offset: int) -> None:
        """ExchangeAssembler's on_body hook: one body chunk of `message`, at `body_offset` in its body
        (bytes lost in a capture gap are never written, so they stay missing, never acknowledged)."""
        if not message.is_request:
            return
        key = (connection.id, message.stream_offset)
        inflight = self._inflight.get(key)
        if inflight is None:
            inflight = self._start(key, connection, message)
            if inflight is None:
                return
        if inflight.spool.lost is not None:
            return
        data = memoryview(chunk).cast("B")
        pos = inflight.first + body_offset
        end = min(pos + len(data), inflight.last + 1)
        if pos >= end:
            return
        try:
            inflight.spool.store(pos, data[:end - pos], inflight)
        except OSError as error:
            if inflight.spool.lost is None:
                self._problem("extract-write-failed", inflight.spool.session_id,
                              f"writing session {inflight.spool.session_id}: {error}",
                              frame=inflight.place[1], connection=inflight.connection,
                              file=self._capture_name(inflight.place[0]))
        if inflight.spool.write_errors:
            self._report_write_errors(inflight.spool)
        if self._behind.waiting > WRITE_BEHIND_BYTES:
            self._flush_all()

    def _flush_all(self) -> None:
        for spool in self._behind.spools:
            spool.flush()
            if spool.write_errors:
                self._report_write_errors(spool)
        self._behind.spools.clear()

    def _report_write_errors(self, spool: _Spool) -> None:
        """Runs written late fail apart from the fragment at hand: the message names the bytes."""
        for message in spool.write_errors:
            self._problem("extract-write-failed", spool.session_id, f"writing session {spool.session_id}: {message}")
        spool.write_errors.clear()

    def _start(self, key: tuple[int, int], connection: Any, message: Any) -> _Inflight | None:
        fragment = fragment_head(message)
        if fragment is None:
            return None
        session_id, rng = fragment
        spool = self._spool(session_id)
        if spool is None:
            return None
        place = (message.first_capture, message.first_frame)
        spool.last_total = rng.total
        spool.totals.setdefault(rng.total, (place, connection.id))
        inflight = _Inflight(key, spool, rng.first, rng.last, rng.total, place, message.first_ts_ns, connection.id)
        self._inflight[key] = inflight
        return inflight

    def _spool(self, session_id: str) -> _Spool | None:
        key = session_key(session_id)
        spool = self._spools.get(key)
        if spool is None:
            for _ in range(100):  # names a live run of another PID namespace may hold are skipped
                name = f"{TEMP_PREFIX}{self.temp_tag}-{self._temp_files}.tmp"
                self._temp_files += 1
                self._temp_names[name] = None  # before it exists: an interrupt in between still removes it
                try:
                    spool = _Spool(self._dir_fd, name, session_id, self._generation.get(key, 0),
                                   self.several_captures, self._behind, self._open_files)
                except FileExistsError:
                    del self._temp_names[name]
                    continue
                except OSError as error:
                    del self._temp_names[name]
                    self._problem("extract-write-failed", session_id, f"temp file for session {session_id}: {error}")
                    return None
                self._temp_names[name] = spool.identity
                break
            if spool is None:
                self._problem("extract-write-failed", session_id, f"temp file for session {session_id}: "
                              f"every name tried exists in {self.out_dir}")
                return None
            self._spools[key] = spool
        return spool

    def settle(self, packet: BitsPacket) -> None:
        """A Fragment's ack is known: its bytes below min(E+1, N) count when the status is 200/201."""
        inflight = self._inflight.pop((packet.connection, packet.request_offset), None)
        if inflight is None:
            return
        limit = inflight.first
        if packet.succeeded:
            limit = inflight.last + 1
            if packet.received_offset is not None:
                limit = min(limit, packet.received_offset)
            inflight.spool.acknowledged_total = inflight.total
        inflight.spool.settle(inflight, limit)

    def session_reissued(self, key: str) -> None:
        """A Create ack issued an id already in use (servers that derive ids): a new entity starts."""
        spool = self._spools.pop(key, None)
        if spool is not None:
            self._retired.append(spool)
        self._generation[key] = self._generation.get(key, 0) + 1

    def finish(self, names: dict[tuple[str, int], tuple[str, str | None]]) -> dict[tuple[str, int], ExtractedEntity]:
        """Publish every entity. `names` and the result are keyed by (session key, generation): the
        generation counts the Create acks that re-issued the id (0 for the first session)."""
        for inflight in self._inflight.values():  # fragments whose exchange never came
            inflight.spool.settle(inflight, inflight.first)
        self._inflight.clear()
        self._flush_all()
        entities: dict[tuple[str, int], ExtractedEntity] = {}
        for spool in self._retired + list(self._spools.values()):
            key = (session_key(spool.session_id), spool.generation)
            session_id, content_name = names.get(key, (spool.session_id, None))
            try:
                entities[key] = self._publish(spool, session_id, content_name)
            except OSError as error:
                if spool.lost is None:
                    self._problem("extract-write-failed", session_id, f"publishing session {session_id}: {error}")
            if spool.lost is not None:  # the file under the temp name is not ours to remove
                self.problems.append(Problem(
                    "extract-temp-file-lost", f"session {session_id}: temp file "
                    f"{os.path.join(self.out_dir, spool.temp_name)} {spool.lost}; its entity is not published"))
            elif spool.is_named_by(spool.temp_name):
                os.unlink(spool.temp_name, dir_fd=self._dir_fd)
            self._temp_names.pop(spool.temp_name, None)
            spool.close()
        self._spools.clear()
        self._retired.clear()
        self._done = True
        self._unlock()
        os.close(self._dir_fd)
        for kind, count in self._repeated.items():
            self.problems.append(Problem(kind, f"{count:,} more {kind} problems of sessions named above; only counted"))
        return entities

    def _publish(self, spool: _Spool, session_id: str, content_name: str | None) -> ExtractedEntity:
        total = spool.total
        assert total is not None  # a spool is made for a fragment, which gives a TOTAL
        if len(spool.totals) > 1:
            self._total_changed(spool, session_id, total)
        holes = spool.holes(total)
        complete = not holes
        digest = None
        fd = spool.descriptor()  # held from here on: the file linked below is checked to be this one
        if complete:
            os.ftruncate(fd, total)
            digest = self._sha256(spool, total)
        name = self._link(spool, entity_name(session_id, content_name), "" if complete else PARTIAL_SUFFIX)
        if not spool.is_named_by(name):
            os.unlink(name, dir_fd=self._dir_fd)
            spool.lost = "was replaced by another file"
            raise OSError(errno.ESTALE, spool.lost)
        return ExtractedEntity(
            session_id=session_id, path=os.path.join(self.out_dir, name), complete=complete, total=total,
            acknowledged_bytes=spool.acknowledged_bytes(total), sha256=digest, coverage=spool.coverage(),
            anomalies=spool.anomalies, holes=holes,
        )

    def _total_changed(self, spool: _Spool, session_id: str, total: int) -> None:
        """Fragments that disagree on TOTAL: which TOTAL the file is judged against is said, never chosen silently."""
        given = ", then ".join(f"TOTAL {t} (frame {frame_name(*place, self.several_captures)})"
                               for t, (place, _) in spool.totals.items())
        judged = ("that of the last acknowledged fragment" if spool.acknowledged_total is not None
                  else "that of the last fragment; none was acknowledged")
        (capture, frame), connection = list(spool.totals.values())[1]
        self.problems.append(Problem(
            "extract-total-changed", f"session {session_id}: the fragments give {given}; the extracted file is "
            f"judged against TOTAL {total}, {judged}", file=self._capture_name(capture), frame=frame,
            connection=connection))

    def _link(self, spool: _Spool, base: str, suffix: str) -> str:
        for attempt in range(1, 10_000):
            name = _not_reserved(f"{base}{suffix}" if attempt == 1 else f"{base}-{attempt}{suffix}")
            try:
                os.link(spool.temp_name, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd,
                        follow_symlinks=False)
                return name
            except FileExistsError:
                continue
        raise FileExistsError(f"no free name for {base}{suffix}")

    @staticmethod
    def _sha256(spool: _Spool, size: int) -> str:
        """The streamed hash, completed by reading back what lies past it (all of it when the
        streamed prefix runs past `size`: a hash cannot be cut back)."""
        digest, offset = (spool.hashed.copy(), spool.hashed_end) if spool.hashed_end <= size else (hashlib.sha256(), 0)
        while offset < size:
            block = os.pread(spool.descriptor(), min(1 << 20, size - offset), offset)
            if not block:
                break
            digest.update(block)
            offset += len(block)
        return digest.hexdigest()
