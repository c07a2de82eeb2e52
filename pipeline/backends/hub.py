"""Model references: a local path or a hub id, with one clear error when neither works."""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFound(RuntimeError):
    pass


def is_local(ref: str | os.PathLike) -> bool:
    return Path(os.path.expanduser(str(ref))).exists()


def local_path(ref: str | os.PathLike) -> str:
    return str(Path(os.path.expanduser(str(ref))).resolve())


def model_not_found(ref: str, what: str, how: str, cause: BaseException | None = None) -> ModelNotFound:
    """The error every loader raises when weights are neither on disk nor downloadable.

    ``how`` tells the user what to set, e.g. "set stages.asr.whisper.model to a local checkpoint file".
    """
    detail = f" ({type(cause).__name__}: {str(cause)[:300]})" if cause else ""
    return ModelNotFound(
        f"{what} model {ref!r} not found locally and the hub is unreachable{detail}: {how}"
    )
