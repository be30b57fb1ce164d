"""JSON state files that several processes read while one writes: read tolerantly, written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: Path, default=None):
    """The file's value, or ``default`` when it is missing or unreadable (a writer killed before its rename
    never leaves half a file, but a file may be absent)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_json(path: Path, value) -> None:
    """Write through a partial file and a rename: readers see the old file or the new one."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, default=str))
    os.replace(partial, path)
