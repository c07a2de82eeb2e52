"""The Ray side of a run: starting Ray quietly and turning a config's stages into one streaming
Ray Data pipeline (one ``map_batches`` per stage, an actor pool for stages that load a model),
with resource requests fitted to a local Ray that is smaller than the pipeline."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import PipelineConfig, StageSpec
from pipeline.progress import say
from pipeline.worker import FLOW_SCHEMA, MAX_CRASHES, StageWorker, WorkerSpec, run_task


def init_ray(cfg: PipelineConfig, address: str | None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    rc = cfg.run.ray
    address = address or rc.address
    kwargs: dict[str, Any] = dict(include_dashboard=False, ignore_reinit_error=True, **_ray_log_options(verbose))
    if address:
        # Workers of an existing cluster get this project's code shipped with the job.
        import filters
        import pipeline

        kwargs["runtime_env"] = {"py_modules": [Path(pipeline.__file__).parent, Path(filters.__file__).parent]}
    else:
        kwargs.update(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, object_store_memory=rc.object_store_memory)
    with contextlib.nullcontext() if verbose else _drop_stderr_lines(b"Set ray log level from environment"):
        ray.init(address=address, **kwargs)


def _ray_log_options(verbose: bool) -> dict[str, Any]:
    """Ray's console output is for Ray developers: worker stdout/stderr, INFO lines and C++
    warnings of Ray itself stay in Ray's log folder (/tmp/ray/session_latest/logs) unless
    --verbose. Failures of our stages still reach the ledger with their reason."""
    if verbose:
        return dict(log_to_driver=True, logging_level=logging.INFO)
    # Ray's C++ side logs its own ERRORs that no user can act on to the driver's stderr, e.g.
    # "core_worker.cc: Actor ... has constructor arguments in the object store and max_restarts > 0"
    # for every Ray Data actor pool (ray-project/ray#53727). It announces the level once.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    return dict(log_to_driver=False, logging_level=logging.ERROR)


@contextlib.contextmanager
def _drop_stderr_lines(*needles: bytes):
    """Capture file descriptor 2 (C++ code writes there directly), then write back every line
    that contains none of ``needles``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().splitlines(keepends=True) if not any(n in ln for n in needles)]
            if kept:
                sys.stderr.write(b"".join(kept).decode(errors="replace"))
                sys.stderr.flush()


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data logs through its own console handler (not the root logger): raise its level."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger, which we then adjust

    if verbose:
        return
    for h in logging.getLogger("ray.data").handlers:
        if getattr(h, "name", None) == "console":
            h.setLevel(logging.ERROR)
    # e.g. "The maximum number of concurrent tasks for 'MapBatches(run_task)' is set to 2, but ...".
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.")


def build(rows: list[dict], cfg: PipelineConfig, output: Path, local: bool, verbose: bool = False):
    import ray

    _quiet_ray_data(verbose)
    ctx = ray.data.DataContext.get_current()
    # Ray Data's own bars name operators, not stages (our Progress does): only with --verbose.
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = False
    table = pa.Table.from_pylist(rows, schema=FLOW_SCHEMA)
    # Many small blocks so that the first stages start on several workers at once.
    step = max(1, -(-len(rows) // 1000))
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(rows), step)])
    n = len(cfg.stages)
    scale, gpus_scale = cpu_scale(cfg, local), gpu_scale(cfg, local)
    for i, spec in enumerate(cfg.stages):
        res = spec.resources
        if scale < 1 or (gpus_scale < 1 and res.num_gpus):
            # Round down: a sum of requests just above the total would never be scheduled.
            gpus = math.floor(res.num_gpus * gpus_scale * 1000) / 1000
            res = res.model_copy(update={"num_cpus": math.floor(res.num_cpus * scale * 1000) / 1000,
                                         # Ray takes fractions only below one GPU.
                                         "num_gpus": gpus if gpus <= 1 else float(math.floor(gpus))})
            spec = StageSpec(spec.name, spec.cls, spec.config, res, spec.fingerprint)
        w = WorkerSpec(spec, i, cfg.stages[i - 1] if i else None, output, i == n - 1)
        common = dict(batch_size=res.batch_size, batch_format="pyarrow", num_cpus=res.num_cpus, zero_copy_batch=False)
        # Bounded retries of dead workers (Ray Data's default is to retry forever): enough for the
        # crash counters to isolate every recording of a batch (see StageWorker._process).
        retries = 2 + (MAX_CRASHES - 1) * res.batch_size
        if res.num_gpus:
            common["num_gpus"] = res.num_gpus
        conc = res.concurrency
        if spec.cls.loads_model():
            pool = ray.data.ActorPoolStrategy(size=conc) if isinstance(conc, int) else \
                ray.data.ActorPoolStrategy(min_size=conc[0], max_size=conc[1])
            with _retry_args_allowed():
                ds = ds.map_batches(StageWorker, fn_constructor_kwargs={"w": w}, compute=pool,
                                    max_restarts=retries, max_task_retries=retries, **common)
        else:
            size = conc if isinstance(conc, int) else conc[1]
            with _retry_args_allowed():
                ds = ds.map_batches(run_task, fn_kwargs={"w": w}, compute=ray.data.TaskPoolStrategy(size=size),
                                    max_retries=retries, retry_exceptions=False, **common)
    return ds


@contextlib.contextmanager
def _retry_args_allowed():
    """Ray 2.60 has no named parameter for retry bounds yet and warns about the generic ones."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*ray_remote_args.* is deprecated")
        yield


def _footprint(cfg: PipelineConfig, resource: str) -> float:
    """How much of a resource the stages hold at once at their minimum worker counts (an actor pool
    keeps its minimum alive; a task stage holds one request at a time)."""
    need = 0.0
    for spec in cfg.stages:
        r = spec.resources
        workers = r.concurrency if isinstance(r.concurrency, int) else r.concurrency[0]
        need += getattr(r, resource) * (workers if spec.cls.loads_model() else 1)
    return need


def _shortfall(cfg: PipelineConfig, local: bool, resource: str, ray_name: str, default: float):
    """(available, needed) of ``resource`` when a local Ray has less than the stages' minimum
    footprint, else None (enough, or a cluster, which keeps the requests as written)."""
    import ray

    if not local:
        return None
    total = float(ray.cluster_resources().get(ray_name, default))
    need = _footprint(cfg, resource)
    return None if need <= total else (total, need)


def cpu_scale(cfg: PipelineConfig, local: bool) -> float:
    """On a local Ray smaller than the pipeline's minimum footprint (every actor pool keeps at least
    one worker alive), shrink the CPU requests so that all stages fit instead of waiting forever;
    the OS then shares the cores. A cluster keeps the requests as written (it may autoscale)."""
    short = _shortfall(cfg, local, "num_cpus", "CPU", 1.0)
    if short is None:
        return 1.0
    total, need = short
    scale = total / need
    say(f"local Ray has {total:g} CPUs but the stages need {need:g} at once: CPU requests scaled by {scale:.2f}")
    return scale


def gpu_scale(cfg: PipelineConfig, local: bool) -> float:
    """The same for GPUs: on a local Ray with fewer GPUs than the GPU stages' minimum workers ask
    for (the paper's layout keeps four GPU pools of >= 1 worker; a workstation has one GPU), each
    GPU worker gets a fraction of a GPU and the stages share it; with no GPU at all they run on
    the CPU. A cluster keeps the requests as written."""
    short = _shortfall(cfg, local, "num_gpus", "GPU", 0.0)
    if short is None:
        return 1.0
    total, need = short
    scale = total / need
    if scale == 0:
        say(f"local Ray has no GPU but the stages ask for {need:g}: GPU stages run on the CPU")
    else:
        gpus = "GPU" if total == 1 else "GPUs"
        say(f"local Ray has {total:g} {gpus} but the stages need {need:g} at once: GPU requests scaled by "
            f"{scale:.3f}, the GPU stages share the {gpus} (mind their memory: e.g. vllm.gpu_memory_utilization)")
    return scale

