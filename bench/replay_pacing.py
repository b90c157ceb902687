"""How closely bits-replay keeps the capture's pacing: median |sent − due| per packet at --speed 1.

    python bench/replay_pacing.py [CAPTURE ...]   (default: every capture in captures/)

Each capture is replayed faithfully against a local bits-server (127.0.0.1, port 0, default
settings: the numbers are about timing, not answers). Prints one line per capture and the
median over all packets.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitstrace.replay.replayer.plan import build_plan  # noqa: E402
from bitstrace.replay.replayer.options import Options, Target  # noqa: E402
from bitstrace.replay.replayer.schedule import replay  # noqa: E402
from bitstrace.replay.server import BitsServer  # noqa: E402

CAPTURES = Path(__file__).resolve().parent.parent / "captures"


def main(argv: list[str]) -> None:
    paths = [Path(a) for a in argv] or sorted(CAPTURES.glob("*.pcap*"))
    errors: list[float] = []
    for path in paths:
        with tempfile.TemporaryDirectory() as root, BitsServer(root, log=None) as server, \
                build_plan([path]) as plan:
            result = replay(plan, Options(target=Target.parse(server.url), speed=1, timeout=10))
        mine = [abs(o.pacing_error_s) for s in result.sessions for o in s.outcomes
                if o.pacing_error_s is not None]
        errors += mine
        if mine:
            print(f"{path.name:40} {len(mine):4} packets  median {statistics.median(mine) * 1e3:7.3f} ms"
                  f"  max {max(mine) * 1e3:7.3f} ms")
    if errors:
        print(f"{'all':40} {len(errors):4} packets  median {statistics.median(errors) * 1e3:7.3f} ms"
              f"  p90 {statistics.quantiles(errors, n=10)[-1] * 1e3:7.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
