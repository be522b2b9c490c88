"""Where the C lives, and the numbers it shares with Python: every ``#define`` of
bpf/steerd.h.

Why read the header: fixed numbers (map bounds, key and value sizes, counter indexes, learned
mode's constants) are written once, in C; Python sizes its maps, validates a configuration
and names the counters from the same file, so the two sides cannot disagree. A leaf module:
maps, programs, counters and learned mode all read it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path


def _bpf_dir() -> Path:
    """The C sources: bpf/ at the top of a checkout; in a wheel, the same files mapped into
    the package as steerd/bpf (pyproject.toml's package-dir), since an installed steerd
    compiles them on the machine it runs on."""
    here = Path(__file__).resolve()
    installed, checkout = here.parents[2] / "bpf", here.parents[3] / "bpf"
    return installed if (installed / "steerd.h").is_file() else checkout


BPF_DIR = _bpf_dir()
HEADER = BPF_DIR / "steerd.h"


@functools.cache
def header_constants(path: Path = HEADER) -> dict[str, int]:
    """Every ``#define NAME <integer>`` in the shared header."""
    consts: dict[str, int] = {}
    pattern = re.compile(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", re.MULTILINE)
    for name, value in pattern.findall(path.read_text()):
        consts[name] = int(value, 0)
    return consts
