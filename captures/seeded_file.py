"""The uploaded files of the corpus and benchmark generators: seeded pseudo-random bytes, so a
file's sha256 is the same on every run (captures/expected.json relies on it). Used by
captures/make_captures.py and bench/make_captures.py."""

from __future__ import annotations

import random
from pathlib import Path

# random.randbytes draws 32-bit words in order, so any chunk size that is a multiple of 4
# gives the same bytes: the chunk only bounds memory.
CHUNK = 1 << 20


def write_seeded_file(path: Path, size: int, seed: int) -> Path:
    """Write `size` bytes drawn from random.Random(seed) to `path`, a chunk at a time."""
    rng = random.Random(seed)
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = rng.randbytes(min(CHUNK, left))
            out.write(chunk)
            left -= len(chunk)
    return path
