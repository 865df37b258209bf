"""What the bench scripts' JSON records share: the machine named the same way, the file written
atomically under its kind (``cellmnn.files``), a line saying where it went."""
from __future__ import annotations

import json
import os
import platform

from cellmnn.files import write_text_atomic


def machine() -> str:
    """The machine a run measured: architecture, cores, platform."""
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}"


def write_record(path: str, fmt: str, kind, **fields) -> None:
    """Write {"format": fmt, "machine": machine(), **fields} as JSON to ``path`` (atomically, marked
    with ``kind``; values JSON cannot hold are written as text) and say so."""
    doc = {"format": fmt, "machine": machine(), **fields}
    write_text_atomic(path, json.dumps(doc, indent=1, default=str), kind)
    print(f"wrote {path}")
