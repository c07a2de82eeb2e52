"""Finding the input files of a run and giving each a stable recording id."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def recording_id(path: str | Path) -> str:
    """Same file path, same id on every run: a readable stem plus a hash of the absolute path
    (two files with the same name in different folders never collide)."""
    p = Path(path).resolve()
    stem = re.sub(r"[^A-Za-z0-9]+", "_", p.stem).strip("_")[:40] or "rec"
    return f"{stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:10]}"


def discover(input_spec: str | Path) -> list[tuple[str, str]]:
    """(absolute source path, recording id) for every input file, sorted by path.

    ``input_spec`` is a directory (walked recursively; every regular file is an input, so files
    that are not audio show up in the ledger instead of vanishing) or a text file listing one path
    per line (relative paths are relative to the list's folder; blank lines and '#' comments are
    skipped)."""
    spec = Path(input_spec)
    if spec.is_dir():
        files = []
        for root, dirs, names in os.walk(spec, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [Path(root) / n for n in names if not n.startswith(".")]
    elif spec.is_file():
        files = []
        for line in spec.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                files.append(p if p.is_absolute() else spec.parent / p)
    else:
        raise FileNotFoundError(f"{spec}: input is neither a directory nor a list file")
    seen: dict[str, str] = {}
    for f in files:
        abs_path = str(f.resolve())
        seen.setdefault(abs_path, recording_id(abs_path))
    return sorted(seen.items())
