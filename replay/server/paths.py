"""Safe mapping from a request target to a file under the server root, and the reply-URL namespace.

The URL path is the only thing that names the destination (Content-Name never does). Anything
that could leave the root is refused rather than normalised: `..` and `.` segments, empty
segments (`//`), backslashes and NUL (raw or percent-encoded), broken percent-encoding or UTF-8,
symlinks on the way, and the server's own state directory `BITS-Sessions` (which holds the
temporary request files and the replies; IIS uses the same name). So is a path the filesystem
cannot hold: a segment over NAME_MAX bytes, the whole over PATH_MAX, or deeper than MAX_DEPTH
directories (the directory walks recurse per level).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

#: The server's state directory under the root; never reachable as an upload destination.
STATE_DIR = "BITS-Sessions"
REQUESTS_DIR = "Requests"
REPLIES_DIR = "Replies"
REQUEST_FILE = "requestfile.bin"
REPLY_FILE = "responsefile.bin"

#: Directories an upload may sit under: far beyond any real upload URL, and well inside what
#: pathlib's recursive mkdir and Python's recursion limit can walk.
MAX_DEPTH = 128
NAME_MAX = 255  # POSIX's and every common filesystem's; FilesystemLimits reads the root's own
PATH_MAX = 4096
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_REPLY_PATH = re.compile(
    rf"(?P<dir>/(?:.*/)?){STATE_DIR}/{REPLIES_DIR}/(?P<id>\{{[0-9A-Fa-f-]{{36}}\}})/{re.escape(REPLY_FILE)}",
    re.IGNORECASE,
)


class UnsafePath(ValueError):
    """The request target cannot name a file under the root; the message says why."""


def decode_target(target: str) -> str:
    """The decoded absolute path of a request target (origin or absolute form), query dropped."""
    if target.lower().startswith(("http://", "https://")):
        target = urlsplit(target).path or "/"
    raw = target.split("?", 1)[0].split("#", 1)[0]
    if not raw.startswith("/"):
        raise UnsafePath("the target is not an absolute path")
    if any(ch == "\\" or ord(ch) < 0x21 or ord(ch) == 0x7F for ch in raw):
        raise UnsafePath("backslash, space or control character in the target")
    if not raw.isascii():
        raise UnsafePath("non-ASCII characters in the target")
    encoded = raw.encode("ascii")
    if encoded.count(b"%") != len(_PERCENT.findall(encoded)):
        raise UnsafePath("broken percent-encoding")
    try:
        path = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), encoded).decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafePath("percent-encoding that is not UTF-8") from None
    if any(ch == "\\" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        raise UnsafePath("encoded backslash or control character in the target")
    return path


def url_directory(path: str) -> str:
    """The directory part of a decoded URL path, with its trailing slash (`/a/b.bin` -> `/a/`)."""
    return path[: path.rindex("/") + 1]


def filesystem_limits(root: Path) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) of the filesystem holding `root`, in bytes."""
    try:
        return os.pathconf(root, "PC_NAME_MAX"), os.pathconf(root, "PC_PATH_MAX")
    except (OSError, ValueError):
        return NAME_MAX, PATH_MAX


def upload_path(root: Path, target: str, name_max: int = NAME_MAX,
                path_max: int = PATH_MAX) -> tuple[Path, str]:
    """(destination file, decoded URL path) for an upload target; raises UnsafePath."""
    path = decode_target(target)
    segments = path[1:].split("/")
    if segments[-1] == "":
        raise UnsafePath("the URL names a directory")
    if len(segments) > MAX_DEPTH + 1:
        raise UnsafePath(f"the path is {len(segments) - 1} directories deep (at most {MAX_DEPTH})")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise UnsafePath("empty, '.' or '..' segment in the path")
        if len(segment.encode("utf-8")) > name_max:
            raise UnsafePath(f"path segment over {name_max} bytes")
        if segment.casefold() == STATE_DIR.casefold():
            raise UnsafePath(f"{STATE_DIR} is the server's own state directory")
    destination = root.joinpath(*segments)
    if len(os.fsencode(destination)) >= path_max:
        raise UnsafePath(f"the file's path would be over {path_max - 1} bytes")
    check_inside(root, destination)
    return destination, path


def check_inside(root: Path, destination: Path) -> None:
    """Refuse a destination reached through a symlink, outside the root, or that is a directory."""
    try:
        _check_inside(root, destination)
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES on the way
        raise UnsafePath(f"the path cannot be looked up: {exc.strerror}") from None


def _check_inside(root: Path, destination: Path) -> None:
    real_root = Path(os.path.realpath(root))
    current = root
    for part in destination.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise UnsafePath("a symlink on the way to the destination")
        if current != destination and current.exists() and not current.is_dir():
            raise UnsafePath("a path component is a file")
    if destination.is_dir():
        raise UnsafePath("the URL names a directory")
    if not Path(os.path.realpath(destination)).is_relative_to(real_root):
        raise UnsafePath("the destination resolves outside the root")


def reply_target(target: str) -> tuple[str, str] | None:
    """(upload URL directory, session id) when the target names a reply file, else None."""
    try:
        path = decode_target(target)
    except UnsafePath:
        return None
    match = _REPLY_PATH.fullmatch(path)
    if match is None:
        return None
    return match.group("dir"), match.group("id")


def reply_url(session_id: str) -> str:
    """The BITS-Reply-URL value: relative, with backslashes, as IIS writes it."""
    return "\\".join((STATE_DIR, REPLIES_DIR, session_id, REPLY_FILE))


def state_paths(root: Path, session_id: str) -> tuple[Path, Path]:
    """(request data directory, reply directory) of a session under the state directory."""
    state = root / STATE_DIR
    return state / REQUESTS_DIR / session_id, state / REPLIES_DIR / session_id

