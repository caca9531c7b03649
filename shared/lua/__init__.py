"""Every Redis step that must be atomic, one Lua file each, with a header naming each KEYS/ARGV slot.

A script may start with `-- needs: a, b`: the library files `a.lua` and `b.lua` (each defines one local
function) are put before it when it is loaded, since Redis runs one self-contained source per script.
"""
from __future__ import annotations

import functools
from importlib import resources

NEEDS = "-- needs:"


@functools.cache
def source(name: str) -> str:
    """The runnable source of script `name`: its libraries, then the script."""
    text = resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
    needs = next((line[len(NEEDS):] for line in text.splitlines() if line.startswith(NEEDS)), "")
    libraries = [source(lib.strip()) for lib in needs.split(",") if lib.strip()]
    return "\n".join([*libraries, text])
