"""What a pipeline stage is.

A stage is a small class: it validates its own config section (``Config``), declares its
resources and the row columns it needs and adds, loads its model once in ``setup`` (once per Ray
worker: a stage that overrides ``setup`` runs in a pool of long-lived Ray actors, one without a
model as plain Ray tasks) and turns a batch of recording rows into updated rows with a verdict
(``status`` ok / rejected / failed, ``reason``).
The runner is generic: it never looks inside rows beyond ``recording_id``, ``status`` and
``reason``. Every row starts with ``recording_id`` and ``source_path`` (``ROW_START``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

ROW_START = ("recording_id", "source_path")

# A language code as configs and rows carry it ('en', 'zh', 'en-US'); also a file name part.
LANGUAGE_CODE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


class Resources(BaseModel):
    """What one worker of a stage asks Ray for."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(4, ge=1, description="recordings per call of process()")
    # Number of workers: a fixed size or a (min, max) autoscaling range.
    concurrency: int | tuple[int, int] = 1

    @model_validator(mode="after")
    def _check_concurrency(self) -> "Resources":
        c = self.concurrency
        if isinstance(c, int) and c < 1:
            raise ValueError("concurrency must be >= 1")
        if isinstance(c, tuple) and not (1 <= c[0] <= c[1]):
            raise ValueError("concurrency range must satisfy 1 <= min <= max")
        return self


class StageConfig(BaseModel):
    """Base of every stage's config section. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    uses: str | None = Field(None, description="stage type, when the section name differs from it")
    resources: Resources | None = None


@dataclass(frozen=True)
class StageContext:
    """Where a stage runs: paths of this run and the device it was given."""

    name: str  # section name = manifest folder
    output_dir: Path
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @property
    def cache_dir(self) -> Path:
        return self.output_dir / "cache"

    @property
    def device(self) -> str:
        if self.num_gpus > 0:
            import torch

            if torch.cuda.is_available():
                return "cuda"
        return "cpu"

    @property
    def num_threads(self) -> int:
        return max(1, int(round(self.num_cpus)))


class Stage:
    """Base class. Subclasses set the class attributes and implement ``process``."""

    Config: ClassVar[type[StageConfig]] = StageConfig
    manifest: ClassVar[str]  # schema name in pipeline.manifests
    version: ClassVar[str] = "1"  # bump when outputs change for the same config
    default_resources: ClassVar[Resources] = Resources()
    # Row columns the stage reads and the ones it adds (``pipeline.manifests`` types the nested
    # ones). A config whose stages come in an order that breaks this fails when it is loaded, so
    # process() never checks per row for an earlier stage's columns.
    needs: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: StageConfig, ctx: StageContext):
        self.config = config
        self.ctx = ctx
        self.setup()

    def setup(self) -> None:
        """Load the stage's model (once per worker). Overriding it makes the stage an actor."""

    @classmethod
    def row_needs(cls, config: StageConfig) -> tuple[str, ...]:
        """The columns this stage needs with this config (default: ``needs``)."""
        return cls.needs

    @classmethod
    def loads_model(cls) -> bool:
        """Whether workers keep state between batches: then they are a pool of Ray actors."""
        return cls.setup is not Stage.setup

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return one row per input row (same order), updated with this stage's fields and with
        ``status``/``reason`` set. Raise only for errors that concern the whole batch: the runner
        then retries row by row and marks the rows that still fail as ``failed``."""
        raise NotImplementedError

    def manifest_rows(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows of this stage's manifest for one processed recording (default: the row itself)."""
        return [row]

    @classmethod
    def finalize(cls, config: StageConfig, output_dir: Path) -> None:
        """Runs once on the driver after the whole pipeline (e.g. write dataset-level files)."""


def limit_threads(n: int) -> None:
    """Keep one worker's math libraries to its share of the CPUs: several workers share a node,
    and oversubscribed BLAS/OpenMP pools spin-wait (a 20x slowdown was seen on 2 cores)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    # The variables only reach libraries loaded later; numpy's BLAS is already loaded here.
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    import torch

    torch.set_num_threads(n)
