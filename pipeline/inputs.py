"""Finding the input files of a run and giving each a stable recording id and a content key.

Discovery always terminates and accounts for every entry it meets: symlinked folders are
followed once per real folder (loops end there), unreadable files and folders, hidden entries and
broken links come back with a verdict instead of vanishing, and file names that are not UTF-8
are carried with their undecodable bytes escaped (``caf\\xe9.wav``) so that every manifest can
store them; ``fs_path`` turns such a name back into the path the OS knows.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

# Files up to this size are hashed whole; larger ones by their head, tail and size (a changed
# middle with the same size and mtime is the one edit this misses).
FULL_HASH_BYTES = 1 << 20
EDGE_BYTES = 64 << 10


class Input(NamedTuple):
    """One entry of a run. ``verdict`` is None for a file to process, else (status, reason) of an
    entry that discovery already settled (hidden, unreadable, broken link)."""

    source_path: str  # absolute, undecodable bytes escaped
    recording_id: str
    content_key: str  # changes when the file's content changes
    verdict: tuple[str, str] | None = None


def display_path(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text: undecodable bytes become ``\\xNN`` escapes."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace")


_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def fs_path(source_path: str) -> str:
    """The OS path behind a ``display_path`` (identity for names that were valid UTF-8)."""
    if "\\x" not in source_path or os.path.lexists(source_path):
        return source_path
    raw = _ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), source_path.encode("utf-8"))
    return os.fsdecode(raw)


def recording_id(path: str | os.PathLike) -> str:
    """Same file path, same id on every run: a readable stem plus a hash of the absolute path
    (two files with the same name in different folders never collide)."""
    p = Path(fs_path(str(path)) if isinstance(path, str) else path)
    p = p.resolve() if p.exists() else Path(os.path.abspath(p))  # a broken link keeps its own name
    stem = re.sub(r"[^A-Za-z0-9]+", "_", display_path(p.stem)).strip("_")[:40] or "rec"
    return f"{stem}-{hashlib.sha1(os.fsencode(p)).hexdigest()[:10]}"


def content_key(path: str | os.PathLike) -> str:
    """Size, mtime and a hash of the bytes (whole file when small, else head + tail): a file
    replaced at the same path gets another key. Raises OSError when the file cannot be read."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode())
        if st.st_size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(-EDGE_BYTES, os.SEEK_END)
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()[:16]


def _entry(path: str, verdict: tuple[str, str] | None = None) -> Input:
    # A broken link is shown as itself: its target does not exist.
    real = str(Path(path).resolve()) if os.path.exists(path) else os.path.abspath(path)
    key = "-"
    if verdict is None:
        try:
            key = content_key(real)
        except PermissionError:
            verdict = ("failed", "permission_denied: the file cannot be read")
        except OSError as e:
            verdict = ("failed", f"io_error: {e.strerror or e}")
    return Input(display_path(real), recording_id(real), key, verdict)


def _walk(root: str) -> list[tuple[str, tuple[str, str] | None]]:
    """Every entry under ``root`` with its verdict (None: to process); symlinked folders are
    followed, each real folder walked once."""
    out: list[tuple[str, tuple[str, str] | None]] = []
    seen_dirs: set[tuple[int, int]] = set()
    st = os.stat(root)
    seen_dirs.add((st.st_dev, st.st_ino))
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: os.fsencode(e.name))
        except PermissionError:
            out.append((folder, ("failed", "permission_denied: the folder cannot be listed")))
            continue
        except OSError as e:
            out.append((folder, ("failed", f"io_error: the folder cannot be listed: {e.strerror or e}")))
            continue
        subdirs = []
        for e in entries:
            path = os.path.join(folder, e.name)
            hidden = e.name.startswith(".")
            try:
                is_dir = e.is_dir(follow_symlinks=True)
                is_file = not is_dir and e.is_file(follow_symlinks=True)
            except OSError:
                is_dir = is_file = False
            if is_dir:
                if hidden:
                    out.append((path, ("rejected", "hidden: folder name starts with '.', not walked")))
                    continue
                try:
                    dst = os.stat(path)
                except OSError as err:
                    out.append((path, ("failed", f"io_error: {err.strerror or err}")))
                    continue
                if (dst.st_dev, dst.st_ino) in seen_dirs:
                    continue  # a symlink loop or a second link to a folder already walked
                seen_dirs.add((dst.st_dev, dst.st_ino))
                subdirs.append(path)
            elif hidden:
                out.append((path, ("rejected", "hidden: file name starts with '.'")))
            elif is_file:
                out.append((path, None))
            elif e.is_symlink() and not os.path.exists(path):
                out.append((path, ("failed", f"broken_link: target {display_path(os.readlink(path))} does not exist")))
            else:  # a FIFO or device: opening it could block or never end
                out.append((path, ("rejected", "not_audio: not a regular file")))
        stack.extend(reversed(subdirs))
    return out


def discover(input_spec: str | Path) -> list[Input]:
    """Every input of a run, one entry per real file, sorted by path.

    ``input_spec`` is a directory (walked recursively; every regular file is an input, so files
    that are not audio show up in the ledger instead of vanishing; hidden files and folders are
    recorded as ``rejected: hidden``) or a text file listing one path per line (relative paths
    are relative to the list's folder; blank lines and '#' comments are skipped)."""
    spec = Path(input_spec)
    if spec.is_dir():
        found = _walk(str(spec))
    elif spec.is_file():
        found: list[tuple[str, tuple[str, str] | None]] = []
        for line in spec.read_text(errors="surrogateescape").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(fs_path(line))
                p = p if p.is_absolute() else spec.parent / p
                if p.is_file():
                    found.append((str(p), None))
                elif p.is_dir():
                    found.append((str(p), ("rejected", "not_audio: a folder listed as a file")))
                elif p.exists():
                    found.append((str(p), ("rejected", "not_audio: not a regular file")))
                else:
                    found.append((str(p), ("failed", "missing: the listed file does not exist")))
    else:
        raise FileNotFoundError(f"{spec}: input is neither a directory nor a list file")
    # One entry per real file: two links to one file (or a folder reached twice) count once.
    unique: dict[str, tuple[str, tuple[str, str] | None]] = {}
    for path, verdict in found:
        unique.setdefault(str(Path(path).resolve()) if os.path.exists(path) else os.path.abspath(path), (path, verdict))
    # Hashing is file I/O: threads overlap it (a network file system answers slowly).
    with ThreadPoolExecutor(8) as pool:
        entries = list(pool.map(lambda item: _entry(item[0], item[1]), [unique[k] for k in unique]))
    return sorted(entries, key=lambda e: e.source_path)


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


def expand_inputs(specs: str | Path | list[str | Path] | tuple) -> list[Input]:
    """Every input (:class:`Input`) named on a command line, sorted and
    without duplicates. Each spec is a folder (walked by :func:`discover`), a list file (see
    :func:`is_list_file`), any other file (one input: a file that is not audio gets its ledger
    row), or a glob (``'in/*.wav'``, ``'in/**/*.mp3'``; quoted so that the shell leaves it alone)
    whose matches are taken the same way. A path that does not exist or a glob that matches
    nothing is an error naming it."""
    if isinstance(specs, (str, Path)):
        specs = [specs]

    def one(p: Path) -> list[Input]:
        if p.is_dir() or is_list_file(p):
            return discover(p)
        return [_entry(str(p))]

    found: dict[str, Input] = {}
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
        for entry in pairs:
            found.setdefault(entry.source_path, entry)
    return sorted(found.values(), key=lambda e: e.source_path)
