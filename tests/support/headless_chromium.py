"""Drive Debian's headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe:
JSON messages ended by NUL on file descriptors 3 and 4), for the HTML report's browser tests and
bench/html_scale.py. No port is opened and nothing is loaded but the file given: the profile is
a fresh temporary directory and every background service is switched off.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--no-default-browser-check"]


class ChromiumError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page, as a context manager."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0) -> None:
        if CHROMIUM is None:
            raise ChromiumError("chromium is not installed (apt-get install chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="bits-chromium-")
        # Chromium reads commands on fd 3 and writes answers on fd 4: the child's ends are moved
        # there just before exec, from numbers above both so that no move overwrites the other.
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        child_read = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD_CLOEXEC, 10)
        child_write = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_read)
        os.close(from_browser_write)

        def child_ends() -> None:
            os.dup2(child_read, 3)  # inheritable, unlike the originals (close-on-exec)
            os.dup2(child_write, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=child_ends)
        os.close(child_read)
        os.close(child_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call("Log.enable", session=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (ChromiumError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()  # our own child, by its handle
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise ChromiumError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise ChromiumError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send a command (to the page when `session`) and wait for its answer; events met on the
        way are kept in `events`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise ChromiumError(f"{method}: {answer['error']}")
                return dict(answer.get("result") or {})
            self.events.append(answer)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)

    def open(self, page: Path) -> float:
        """Load `page` and wait until it is laid out and a frame painted; the seconds that took
        as the page measures them (from the navigation's start)."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=page.resolve().as_uri())
        self.wait_event("Page.loadEventFired")
        painted = self.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame("
                                "() => done(performance.now()))))")
        return float(painted) / 1000

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise ChromiumError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def console_messages(self) -> list[str]:
        """What the page logged or threw so far (errors, CSP refusals)."""
        texts = []
        for event in self.events:
            if event.get("method") == "Log.entryAdded":
                texts.append(event["params"]["entry"].get("text", ""))
            elif event.get("method") == "Runtime.exceptionThrown":
                texts.append(json.dumps(event["params"]))
            elif event.get("method") == "Runtime.consoleAPICalled":
                texts.append(json.dumps(event["params"].get("args")))
        return texts

    def screenshot(self, path: Path, *, quality: int | None = None) -> None:
        """The viewport as PNG (or JPEG at `quality`), written to `path`."""
        import base64

        options: dict[str, Any] = {"format": "png"} if quality is None else {"format": "jpeg", "quality": quality}
        data = self.call("Page.captureScreenshot", session=True, **options)["data"]
        path.write_bytes(base64.b64decode(data))
