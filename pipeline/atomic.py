"""The one way the project writes a file that others may read while it is being written.

Readers (a resumed run, the trainer, a user copying the corpus) see the old file or the new one,
never half of one: the data goes to a hidden temporary name in the same folder, then one rename.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path | str, data: bytes | str | Callable[[Path], None]) -> None:
    """Write `data` to `path` atomically.

    `data` is bytes, text (UTF-8), or a writer `f(tmp_path)` for libraries that write by path
    (pyarrow, soundfile, torch.save, gzip).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target: a rename across filesystems is a copy, not atomic.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            data(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
