"""Member offsets of the running kernel's structures, read from its BTF (/sys/kernel/btf/vmlinux).

Why: bcc compiles against kernel headers, and on this machine class those are Debian's
generic ones, not the running kernel's; a tracing program that follows kernel pointers
(task -> files -> fdtable -> file -> socket -> sock) with offsets from the wrong headers
would read garbage. The running kernel describes its own layout in BTF, and ``bpftool``
(Debian's, already a prerequisite) prints it as JSON; the offsets go to the program as -D
flags. Only the members a program names are resolved, through typedefs, qualifiers and
anonymous structs and unions, and each one's size is checked by the caller.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from steerd.daemon.dataplane.errors import DataplaneError

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
_QUALIFIERS = {"TYPEDEF", "VOLATILE", "CONST", "RESTRICT", "TYPE_TAG"}


@dataclass(frozen=True)
class Member:
    """Where a member is inside its outermost structure, and how wide it is."""

    offset: int  # bytes from the start of the structure named first in the path
    size: int  # bytes (8 for a pointer)


def load_types(path: str = VMLINUX_BTF) -> dict[int, dict[str, Any]]:
    """Every type of the BTF at ``path``, by id."""
    try:
        out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", path],
                             capture_output=True, check=True, timeout=60).stdout
        types = json.loads(out)["types"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        raise DataplaneError(f"cannot read the kernel's BTF from {path} with bpftool: "
                             f"{exc}") from exc
    return {t["id"]: t for t in types}


def _strip(types: Mapping[int, dict[str, Any]], type_id: int) -> dict[str, Any]:
    t = types[type_id]
    while t["kind"] in _QUALIFIERS:
        t = types[t["type_id"]]
    return t


def _size(types: Mapping[int, dict[str, Any]], type_id: int) -> int:
    t = _strip(types, type_id)
    if t["kind"] == "PTR":
        return 8
    if "size" in t:
        return int(t["size"])
    raise DataplaneError(f"BTF type {t.get('name', type_id)} has no size")


def _find(types: Mapping[int, dict[str, Any]], struct: dict[str, Any], name: str
          ) -> tuple[int, int] | None:
    """(bit offset, type id) of member ``name``, looking into anonymous members too."""
    for m in struct.get("members", []):
        if m["name"] == name:
            if "bitfield_size" in m:
                raise DataplaneError(f"{struct['name']}.{name} is a bitfield")
            return m["bits_offset"], m["type_id"]
    for m in struct.get("members", []):
        if m["name"] == "(anon)":
            inner = _strip(types, m["type_id"])
            if inner["kind"] in ("STRUCT", "UNION"):
                found = _find(types, inner, name)
                if found is not None:
                    return m["bits_offset"] + found[0], found[1]
    return None


def member_offsets(paths: Iterable[str], types: Mapping[int, dict[str, Any]] | None = None
                   ) -> dict[str, Member]:
    """``"sock.__sk_common.skc_num"`` -> its offset from the start of ``struct sock`` and
    its size, for each path (a struct name, then members, each inside the previous)."""
    types = load_types() if types is None else types
    structs = {t["name"]: t for t in types.values() if t["kind"] == "STRUCT"}
    out: dict[str, Member] = {}
    for path in paths:
        first, *names = path.split(".")
        if first not in structs:
            raise DataplaneError(f"the kernel's BTF has no struct {first}")
        current, bits, type_id = structs[first], 0, structs[first]["id"]
        for name in names:
            found = _find(types, current, name)
            if found is None:
                raise DataplaneError(f"the kernel's BTF has no member {name} in {path}")
            bits += found[0]
            type_id = found[1]
            current = _strip(types, type_id)
        if bits % 8:
            raise DataplaneError(f"{path} is not byte-aligned")
        out[path] = Member(bits // 8, _size(types, type_id))
    return out
