"""Finding the input files of a run and giving each a stable recording id."""

from __future__ import annotations

import glob
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


_GLOB_CHARS = frozenset("*?[")
_LIST_SNIFF_BYTES = 64 * 1024


def is_list_file(path: str | Path) -> bool:
    """A list file is text whose lines are paths: its start decodes as UTF-8 without NUL or other
    control characters, every non-blank, non-'#' line is short enough to be a path, and at least
    one of them names an existing file or folder (relative to the list's folder). Anything else
    (audio, a transcript, a file of any other kind) is an input file of its own."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_LIST_SNIFF_BYTES)
    except OSError:
        return False
    if not head or b"\x00" in head:
        return False
    if len(head) == _LIST_SNIFF_BYTES:
        head = head[: head.rfind(b"\n") + 1] or head  # judge whole lines only
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines or any(len(ln) > 4096 or any(ord(c) < 32 for c in ln) for ln in lines):
        return False
    return any((p if p.is_absolute() else path.parent / p).exists()
               for p in (Path(ln).expanduser() for ln in lines[:1000]))


def expand_inputs(specs: str | Path | list[str | Path] | tuple) -> list[tuple[str, str]]:
    """(absolute source path, recording id) for the inputs named on a command line, sorted and
    without duplicates. Each spec is a folder (walked by :func:`discover`), a list file (see
    :func:`is_list_file`), any other file (one input: a file that is not audio gets its ledger
    row), or a glob (``'in/*.wav'``, ``'in/**/*.mp3'``; quoted so that the shell leaves it alone)
    whose matches are taken the same way. A path that does not exist or a glob that matches
    nothing is an error naming it."""
    if isinstance(specs, (str, Path)):
        specs = [specs]

    def one(p: Path) -> list[tuple[str, str]]:
        if p.is_dir() or is_list_file(p):
            return discover(p)
        return [(str(p.resolve()), recording_id(p))]

    found: dict[str, str] = {}
    for spec in specs:
        s = str(spec)
        p = Path(s).expanduser()
        if p.exists():
            pairs = one(p)
        elif _GLOB_CHARS & set(s):
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise FileNotFoundError(f"{s}: no file matches this pattern")
            pairs = [pair for m in matches for pair in one(Path(m))]
        else:
            raise FileNotFoundError(f"{s}: no such file or directory")
        for src, rid in pairs:
            found.setdefault(src, rid)
    return sorted(found.items())
