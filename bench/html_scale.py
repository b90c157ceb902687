"""The HTML report of many sessions (issue 16, item 5): the page's size, how much of it is SVG, and
how long headless Chromium takes to load, lay out and paint it.

    .venv/bin/python bench/html_scale.py [CAPTURE...] [--runs 3] [--page FILE...] [--keep DIR]

Without CAPTURE: bench/data/many.pcap (2,000 healthy sessions of 64 fragments, made by
bench/make_captures.py) read together with a few corpus captures whose sessions need a look
(a cut connection, a recreated session, a cancelled one, an unknown one...), so the page has
both parts. `--page FILE` measures pages already written (another version's, say) as well.

The render time is the page's own clock (performance.now(), from the navigation's start) when
two animation frames have passed after the load event: parsed, styled, laid out and painted.
Chromium runs with a fresh profile, no network use and no GPU, the page opened from a file; it
is started once per run and the start is not counted. Layout, style and node figures are
Chromium's Performance.getMetrics after the load.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.support.headless_chromium import CHROMIUM, Browser  # noqa: E402

from bitstrace.analyzer.report.presentation import human_size  # noqa: E402

PROBLEMS = ["connection-cut-resume.pcap", "session-not-found.pcap", "fragment-after-cancel.pcap",
            "host-id-redirect.pcapng", "never-finished.pcap", "close-incomplete.pcap", "gap.pcap"]


def write_page(captures: list[Path], page: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "bits-analyze"), "--no-progress", "--html", str(page),
                           *map(str, captures)], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise SystemExit(f"bits-analyze exited {done.returncode}:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def measure(page: Path, runs: int) -> dict[str, float]:
    renders, metrics = [], {}
    for _ in range(runs):
        with Browser() as browser:
            browser.call("Performance.enable", session=True)
            renders.append(browser.open(page))
            metrics = {m["name"]: m["value"] for m in browser.call("Performance.getMetrics", session=True)["metrics"]}
    return {"render": statistics.median(renders), "min": min(renders), "max": max(renders),
            "layout": metrics.get("LayoutDuration", 0.0), "style": metrics.get("RecalcStyleDuration", 0.0),
            "nodes": metrics.get("Nodes", 0.0)}


def svg_bytes(text: str) -> int:
    return sum(len(m) for m in re.findall(r"<svg\b.*?</svg>", text, re.S))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("captures", nargs="*", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--page", type=Path, action="append", default=[], help="a page already written, measured too")
    parser.add_argument("--keep", type=Path, help="keep the written page in this directory")
    args = parser.parse_args()
    if CHROMIUM is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    captures = args.captures or [ROOT / "bench" / "data" / "many.pcap", *(ROOT / "captures" / n for n in PROBLEMS)]
    missing = [c for c in captures if not c.exists()]
    if missing:
        print(f"missing: {', '.join(map(str, missing))} (bench/make_captures.py makes bench/data)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bits-html-scale-") as scratch:
        out = (args.keep or Path(scratch)) / "report.html"
        out.parent.mkdir(parents=True, exist_ok=True)
        seconds = write_page(captures, out)
        print(f"bits-analyze --html of {', '.join(c.name for c in captures)}: {seconds:.1f} s", file=sys.stderr)
        pages = [(f"this tree ({len(captures)} captures)", out), *((str(p), p) for p in args.page)]
        print("| page | size | of it SVG | sessions drawn | render (median of %d) | range | layout | style | DOM nodes |"
              % args.runs)
        print("|---|---|---|---|---|---|---|---|---|")
        for name, page in pages:
            text = page.read_text(encoding="utf-8")
            figures = measure(page, args.runs)
            drawn = text.count("<svg class=\"timeline\"")
            size = len(text.encode())
            print(f"| {name} | {human_size(size)} ({size:,} B) | {human_size(svg_bytes(text))} | {drawn:,} | "
                  f"**{figures['render']:.2f} s** | {figures['min']:.2f}-{figures['max']:.2f} s | "
                  f"{figures['layout']:.2f} s | {figures['style']:.2f} s | {figures['nodes']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
