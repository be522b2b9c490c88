"""Where the C lives, and the numbers it shares with Python: every ``#define`` of
steerd/bpf/steerd.h.

Why read the header: fixed numbers (map bounds, key and value sizes, counter indexes, learned
mode's constants) are written once, in C; Python sizes its maps, validates a configuration
and names the counters from the same file, so the two sides cannot disagree. A leaf module:
maps, programs, counters and learned mode all read it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

# The C sources ship inside the package (package data, in the wheel too): steerd/bpf.
BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
HEADER = BPF_DIR / "steerd.h"


@functools.cache
def header_constants(path: Path = HEADER) -> dict[str, int]:
    """Every ``#define NAME <integer>`` in the shared header."""
    consts: dict[str, int] = {}
    pattern = re.compile(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", re.MULTILINE)
    for name, value in pattern.findall(path.read_text()):
        consts[name] = int(value, 0)
    return consts
