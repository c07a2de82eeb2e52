"""Training data: manifests, tokens, features, a resumable feature store and the bucketing sampler.

Manifests (one utterance = one dialogue segment; relative audio paths are resolved against the
dataset's `root`, by default the manifest's folder):
  * OpenDialog layout `manifest.<lang>.jsonl` (ours and the released corpus): `id`, `text`,
    `path`; optional `duration`, `start`, `end`, `tokens` (string tokens);
  * lhotse cuts `*.jsonl.gz` (MonoCut lines with exactly one supervision);
  * the pipeline's Parquet segments/export manifest (`segment_id`, `path`, `text`, `duration`,
    `status`; only `status == "ok"` rows);
  * TSV `id<TAB>text<TAB>wav[<TAB>start<TAB>end]` (the reference's custom-dataset format).

Texts are cleaned as the reference's OpenDialog preparation does (`_` -> space, whitespace
collapsed). Features are Vocos log-mels (model.features), computed on the fly or read from a
feature store built by `python -m model.prepare`; batches carry them *multiplied by FEAT_SCALE*
and padded with log(1e-10) * FEAT_SCALE (lhotse's padding, fact sheet 1). Stereo datasets give
300-dim features [ch0 | ch1 | mono downmix] (fact sheet 5.7).

Batches come from `BucketBatchSampler`: datasets are muxed with weights (lhotse semantics: a
weighted random interleaving until every source is exhausted), the stream is cut into windows of
`buffer_size` utterances, each window is spread over duration buckets and every bucket is cut into
batches of at most `max_duration` seconds. The plan of an epoch is a pure function of
(seed, epoch), so a position inside it can be saved and restored, and DDP ranks take every
world_size-th batch of the same plan.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from model.features import FEAT_SCALE, HOP_LENGTH, SAMPLING_RATE, VocosFbank, load_audio
from pipeline.atomic import atomic_write

log = logging.getLogger(__name__)

FRAME_RATE = SAMPLING_RATE / HOP_LENGTH  # 93.75 frames per second
LOG_EPS_PAD = math.log(1e-10)  # lhotse's feature padding value (before FEAT_SCALE)
FEATURE_PAD_VALUE = LOG_EPS_PAD * FEAT_SCALE  # what padded frames hold in a batch: -2.3026
FEAT_DIM = 100


# --------------------------------------------------------------------------------------------
# Configuration (shared by model.train and model.prepare)
# --------------------------------------------------------------------------------------------


class DatasetSpec(BaseModel):
    """One training source."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="unique; names the store folder")
    manifest: str = Field(..., description=".jsonl (OpenDialog), .jsonl.gz (lhotse cuts), .parquet, .tsv")
    root: str | None = Field(None, description="base of relative audio paths (default: manifest folder)")
    channels: Literal[1, 2] = Field(1, description="2: stereo dialogues, features [ch0|ch1|mix]")
    repeat: int = Field(1, ge=1, description="the dataset is seen this many times per epoch")
    weight: float | None = Field(None, gt=0, description="mux weight (default: count after repeat)")
    dev_size: int | None = Field(None, ge=0, description="override data.dev_size for this dataset")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: list[DatasetSpec] = Field(..., min_length=1)
    dev_size: int = Field(1000, ge=0, description="first N utterances (sorted ids) of each dataset")
    dev_ids: str | None = Field(None, description="file with one dev id per line (replaces dev_size)")
    feature_store: str | None = Field(None, description="folder of stores built by model.prepare")
    min_duration: float = Field(1.0, ge=0)
    max_len: float = Field(30.0, gt=0, description="longest utterance kept, seconds (60 for fine-tunes)")
    max_duration: float = Field(500.0, gt=0, description="seconds of audio per batch (per GPU)")
    num_buckets: int = Field(30, ge=1)
    buffer_size: int = Field(60000, ge=1)
    drop_last: bool = True
    num_workers: int = Field(4, ge=0)


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


@dataclass
class Utterance:
    id: str
    text: str
    audio: str  # absolute (or cwd-relative) audio path
    duration: float
    start: float | None = None  # span inside the audio file, seconds
    end: float | None = None
    channels: int = 1
    dataset: str = ""
    tokens: list[str] | None = None


_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """`_` is the pad symbol: it becomes a space; whitespace is collapsed (fact sheet 9)."""
    return _WS.sub(" ", text.replace("_", " ")).strip()


def _resolve(path: str, root: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else root / p)


def _bad(path, lineno, msg) -> ValueError:
    where = f"{path}:{lineno}" if lineno else str(path)
    return ValueError(f"{where}: {msg}")


def _read_jsonl(path: Path, root: Path) -> list[Utterance]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad(path, lineno, f"not valid JSON ({e})") from None
            missing = [k for k in ("id", "text", "path") if k not in d]
            if missing:
                raise _bad(path, lineno, f"missing field(s) {missing} (OpenDialog lines need id, text, path)")
            start, end = d.get("start"), d.get("end")
            dur = d.get("duration")
            if dur is None and start is not None and end is not None:
                dur = float(end) - float(start)
            out.append(Utterance(id=str(d["id"]), text=clean_text(str(d["text"])),
                                 audio=_resolve(d["path"], root),
                                 duration=float(dur) if dur is not None else -1.0,
                                 start=None if start is None else float(start),
                                 end=None if end is None else float(end),
                                 tokens=d.get("tokens")))
    return out


def _read_cuts(path: Path, root: Path) -> list[Utterance]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                sups = d.get("supervisions") or []
                if not sups:
                    raise _bad(path, lineno, f"cut {d.get('id')!r} has no supervision")
                text = sups[0].get("text") or ""
                if len(sups) > 1:
                    # One supervision per speaker turn (the pipeline's export): the tagged text of the cut.
                    text = (d.get("custom") or {}).get("text") or " ".join(
                        f"[{s.get('speaker')}] {s.get('text') or ''}" for s in sorted(sups, key=lambda s: s["start"]))
                rec = d["recording"]
                sources = rec["sources"]
                if len(sources) != 1 or sources[0].get("type", "file") != "file":
                    raise _bad(path, lineno, "only recordings with one 'file' source are supported")
                start = float(d.get("start", 0.0))
                dur = float(d["duration"])
                tokens = None if len(sups) > 1 else sups[0].get("tokens") or (sups[0].get("custom") or {}).get("tokens")
                # A MultiCut lists its channels; a MonoCut of a multi-channel recording is read as
                # the downmix (OpenDialog audio is mono).
                channel = d.get("channel", 0)
                channels = len(channel) if isinstance(channel, list) else 1
                out.append(Utterance(id=str(d["id"]), text=clean_text(text),
                                     audio=_resolve(sources[0]["source"], root), duration=dur,
                                     start=start, end=start + dur, channels=channels,
                                     tokens=tokens))
            except ValueError:
                raise
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise _bad(path, lineno, f"not a lhotse cut line ({type(e).__name__}: {e})") from None
    return out


def _read_parquet(path: Path, root: Path) -> list[Utterance]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    need = {"segment_id", "path", "text"}
    missing = need - set(table.column_names)
    if missing:
        raise _bad(path, None, f"missing column(s) {sorted(missing)} (expected the export manifest)")
    out = []
    for r in table.to_pylist():
        if r.get("status", "ok") != "ok" or not r.get("path"):
            continue
        dur = r.get("duration")
        if dur is None and r.get("start") is not None and r.get("end") is not None:
            dur = r["end"] - r["start"]
        # `path` is the exported segment file: its start/end are those of the source recording.
        out.append(Utterance(id=str(r["segment_id"]), text=clean_text(r["text"] or ""),
                             audio=_resolve(r["path"], root),
                             duration=float(dur) if dur is not None else -1.0))
    return out


def _read_tsv(path: Path, root: Path) -> list[Utterance]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) not in (3, 5):
                raise _bad(path, lineno, f"expected 'id<TAB>text<TAB>wav[<TAB>start<TAB>end]', "
                                         f"got {len(parts)} column(s)")
            start = end = None
            if len(parts) == 5:
                try:
                    start, end = float(parts[3]), float(parts[4])
                except ValueError:
                    raise _bad(path, lineno, f"start/end must be numbers, got {parts[3:]!r}") from None
                if end <= start:
                    raise _bad(path, lineno, f"end {end} <= start {start}")
            out.append(Utterance(id=parts[0], text=clean_text(parts[1]),
                                 audio=_resolve(parts[2], root),
                                 duration=(end - start) if start is not None else -1.0,
                                 start=start, end=end))
    return out


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None,
                  channels: int = 1, dataset: str = "", probe_durations: bool = True) -> list[Utterance]:
    """Utterances of one manifest, format from the suffix. Durations missing from the manifest
    are read from the audio headers (unless `probe_durations` is False: they stay -1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = Path(root) if root is not None else path.parent
    name = path.name.lower()
    if name.endswith(".jsonl.gz"):
        utts = _read_cuts(path, root)
    elif name.endswith(".jsonl"):
        utts = _read_jsonl(path, root)
    elif name.endswith(".parquet"):
        utts = _read_parquet(path, root)
    elif name.endswith((".tsv", ".txt")):
        utts = _read_tsv(path, root)
    else:
        raise ValueError(f"{path}: unknown manifest format (use .jsonl, .jsonl.gz, .parquet or .tsv)")
    seen = set()
    for u in utts:
        if u.id in seen:
            raise ValueError(f"{path}: duplicate utterance id {u.id!r}")
        seen.add(u.id)
        u.channels = channels if u.channels == 1 else u.channels
        u.dataset = dataset
    if probe_durations:
        _fill_durations(utts, path)
    return utts


def _fill_durations(utts: list[Utterance], manifest: Path) -> None:
    todo = [u for u in utts if u.duration < 0]
    if not todo:
        return
    import soundfile as sf

    def probe(u: Utterance) -> float:
        try:
            info = sf.info(u.audio)
            return info.frames / info.samplerate
        except Exception:
            if not Path(u.audio).is_file():
                raise FileNotFoundError(f"{manifest}: audio of {u.id!r} not found: {u.audio}") from None
            return load_audio(u.audio).shape[-1] / SAMPLING_RATE  # a container libsndfile cannot read

    if len(todo) > 10000:
        log.info("%s: reading %d audio headers for durations (model.prepare caches them)",
                 manifest, len(todo))
    with ThreadPoolExecutor(max_workers=8) as pool:
        for u, d in zip(todo, pool.map(probe, todo)):
            u.duration = d


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def feature_dim(channels: int) -> int:
    return FEAT_DIM if channels == 1 else 3 * FEAT_DIM


def compute_features(utt: Utterance) -> torch.Tensor:
    """Unscaled Vocos log-mel of an utterance: (T, 100), or (T, 300) = [ch0 | ch1 | mix] for a
    stereo utterance (the mix is the mel of the mean of the two waveforms)."""
    wave = load_audio(utt.audio, SAMPLING_RATE, mono=utt.channels == 1)
    if utt.start is not None:
        a = int(round(utt.start * SAMPLING_RATE))
        b = int(round(utt.end * SAMPLING_RATE)) if utt.end is not None else wave.shape[-1]
        wave = wave[..., a:b]
    if utt.channels == 1:
        return VocosFbank(num_channels=1).extract(wave, SAMPLING_RATE)
    if wave.ndim != 2 or wave.shape[0] != 2:
        raise ValueError(f"{utt.audio}: stereo dataset {utt.dataset!r} needs 2-channel audio, "
                         f"got {wave.shape[0] if wave.ndim == 2 else 1} channel(s)")
    both = VocosFbank(num_channels=2).extract(wave, SAMPLING_RATE)
    mix = VocosFbank(num_channels=1).extract(wave.mean(axis=0), SAMPLING_RATE)
    return torch.cat([both, mix], dim=1)


# --------------------------------------------------------------------------------------------
# Feature store: <dir>/store.json + shards/<k>.safetensors (features) + shards/<k>.jsonl (index)
# --------------------------------------------------------------------------------------------

STORE_VERSION = 1


def _shard_plan(ids: list[str], shard_size: int) -> list[list[str]]:
    ids = sorted(ids)
    return [ids[i: i + shard_size] for i in range(0, len(ids), shard_size)]


def _shard_digest(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()[:16]


def _write_shard(args) -> tuple[int, int]:
    """Compute one shard and write it atomically: features first, the index (the "done" marker)
    last. Returns (shard number, utterances written)."""
    k, utts, shard_dir, dtype, tokenizer_name = args
    from safetensors.torch import save_file

    tokenizer = _worker_tokenizer(tokenizer_name)
    tensors, index = {}, []
    for u in utts:
        try:
            feats = compute_features(u)
        except (ValueError, OSError, RuntimeError) as e:  # one bad file must not stop a long run
            log.warning("skipping %s: %s", u.id, e)
            index.append({"id": u.id, "error": str(e)})
            continue
        tensors[u.id] = feats.to(getattr(torch, dtype)).contiguous()
        tokens = u.tokens
        if tokens is None and tokenizer is not None:
            tokens = tokenizer.texts_to_tokens([u.text])[0]
        index.append({"id": u.id, "num_frames": int(feats.shape[0]), "text": u.text,
                      "tokens": tokens})
    base = Path(shard_dir) / f"{k:05d}"
    digest = _shard_digest([u.id for u in utts])
    atomic_write(base.with_suffix(".safetensors"),
                 lambda tmp: save_file(tensors, str(tmp), metadata={"digest": digest}))
    lines = [json.dumps({"digest": digest, "count": len(utts)})]
    lines += [json.dumps(row, ensure_ascii=False) for row in index]
    atomic_write(base.with_suffix(".jsonl"), "".join(line + "\n" for line in lines))
    return k, len(utts)


_TOKENIZERS: dict = {}


def _worker_tokenizer(name: str | None):
    """String tokens do not depend on the token table: a table-less tokenizer suffices."""
    if name is None:
        return None
    if name not in _TOKENIZERS:
        from model.tokenizer import get_tokenizer

        _TOKENIZERS[name] = get_tokenizer(name, None)
    return _TOKENIZERS[name]


def _shard_done(shard_dir: Path, k: int, ids: list[str]) -> bool:
    idx = shard_dir / f"{k:05d}.jsonl"
    if not idx.is_file() or not (shard_dir / f"{k:05d}.safetensors").is_file():
        return False
    try:
        with open(idx, encoding="utf-8") as f:
            head = json.loads(f.readline())
    except (OSError, json.JSONDecodeError):
        return False
    return head.get("digest") == _shard_digest(ids)


def build_feature_store(utts: list[Utterance], out_dir: str | os.PathLike, *, channels: int = 1,
                        shard_size: int = 1000, num_workers: int = 1, dtype: str = "float16",
                        tokenizer: str | None = None, max_shards: int | None = None) -> dict:
    """Precompute features (and string tokens) into a sharded store. Resumable: shards whose
    index exists with the same id list are kept; a killed run redoes only unfinished shards.
    `max_shards` stops after computing that many new shards (a budget per invocation).
    Utterances whose audio cannot be read are recorded as failed and left out.
    Returns {"computed": [...], "skipped": [...], "num_shards": N, "complete", "failed": [ids]}."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"feature store dtype must be float16 or float32, got {dtype!r}")
    out_dir = Path(out_dir)
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    wrong = next((u for u in utts if u.channels != channels), None)
    if wrong is not None:
        raise ValueError(f"{out_dir}: utterance {wrong.id!r} has {wrong.channels} channel(s), the "
                         f"store is built for {channels}")
    by_id = {u.id: u for u in utts}
    plan = _shard_plan(list(by_id), shard_size)
    meta = {"version": STORE_VERSION, "feature": {"type": "vocos", "sampling_rate": SAMPLING_RATE,
                                                  "dim": feature_dim(channels), "scaled": False},
            "channels": channels, "dtype": dtype, "shard_size": shard_size, "num_shards": len(plan),
            "num_utterances": len(by_id), "tokenizer": tokenizer, "complete": False}
    store_json = out_dir / "store.json"
    if store_json.is_file():
        old = json.loads(store_json.read_text())
        if old.get("channels") != channels or old.get("dtype") != dtype or \
                old.get("shard_size") != shard_size:
            raise ValueError(f"{store_json}: existing store has channels={old.get('channels')}, "
                             f"dtype={old.get('dtype')}, shard_size={old.get('shard_size')}; "
                             "use another folder or delete it")
    _atomic_write_json(store_json, meta)
    todo, skipped = [], []
    for k, ids in enumerate(plan):
        (skipped if _shard_done(shard_dir, k, ids) else todo).append(k)
    if max_shards is not None:
        todo = todo[:max_shards]
    for stale in shard_dir.glob("*.tmp"):
        stale.unlink()
    jobs = [(k, [by_id[i] for i in plan[k]], str(shard_dir), dtype, tokenizer) for k in todo]
    computed = []
    if num_workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(num_workers) as pool:
            for k, n in pool.imap_unordered(_write_shard, jobs):
                computed.append(k)
                log.info("%s: shard %d done (%d utterances)", out_dir, k, n)
    else:
        for job in jobs:
            k, n = _write_shard(job)
            computed.append(k)
            log.info("%s: shard %d done (%d utterances)", out_dir, k, n)
    for path in shard_dir.glob("*.jsonl"):  # shards of an older plan (the manifest changed)
        if not path.stem.isdigit() or int(path.stem) >= len(plan):
            path.unlink()
            path.with_suffix(".safetensors").unlink(missing_ok=True)
    meta["complete"] = all(_shard_done(shard_dir, k, ids) for k, ids in enumerate(plan))
    _atomic_write_json(store_json, meta)
    failed = []
    for path in sorted(shard_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            f.readline()
            failed += [row["id"] for row in map(json.loads, f) if "error" in row]
    return {"computed": sorted(computed), "skipped": skipped, "num_shards": len(plan),
            "complete": meta["complete"], "failed": failed}


def _atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


class FeatureStore:
    """Read side of a store: features by id (lazy, memory-mapped safetensors), frame counts and
    cached string tokens. Safe to use from DataLoader workers (handles open lazily per process)."""

    MAX_OPEN = 64

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "store.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"feature store not found: {meta_path} "
                                    "(build it with python -m model.prepare)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("version") != STORE_VERSION:
            raise ValueError(f"{meta_path}: store version {self.meta.get('version')}, "
                             f"this code reads {STORE_VERSION}")
        if not self.meta.get("complete"):
            raise ValueError(f"{meta_path}: the store is incomplete (a precompute was interrupted); "
                             "rerun python -m model.prepare to finish it")
        self.shard_of: dict[str, int] = {}
        self.num_frames: dict[str, int] = {}
        self.tokens: dict[str, list[str] | None] = {}
        self.failed: dict[str, str] = {}  # id -> why its features could not be computed
        for idx in sorted((self.path / "shards").glob("*.jsonl")):
            k = int(idx.stem)
            with open(idx, encoding="utf-8") as f:
                f.readline()
                for line in f:
                    row = json.loads(line)
                    if "error" in row:
                        self.failed[row["id"]] = row["error"]
                        continue
                    self.shard_of[row["id"]] = k
                    self.num_frames[row["id"]] = int(row["num_frames"])
                    self.tokens[row["id"]] = row.get("tokens")
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    def __contains__(self, utt_id: str) -> bool:
        return utt_id in self.shard_of

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def get(self, utt_id: str) -> torch.Tensor:
        """Unscaled features (T, D) as float32."""
        from safetensors import safe_open

        if os.getpid() != self._pid:  # forked worker: do not share file handles
            self._handles, self._pid = {}, os.getpid()
        k = self.shard_of[utt_id]
        h = self._handles.pop(k, None)
        if h is None:
            h = safe_open(str(self.path / "shards" / f"{k:05d}.safetensors"), framework="pt")
            if len(self._handles) >= self.MAX_OPEN:  # bounded: thousands of shards, few fds
                self._handles.pop(next(iter(self._handles)))
        self._handles[k] = h  # most recently used last
        return h.get_tensor(utt_id).float()


# --------------------------------------------------------------------------------------------
# Building the train / dev sets
# --------------------------------------------------------------------------------------------


@dataclass
class DataSplit:
    utts: list[Utterance]  # flat list over all datasets
    sources: list[np.ndarray]  # per dataset: indices into utts
    specs: list[DatasetSpec]
    stores: dict[str, FeatureStore] = field(default_factory=dict)

    @property
    def hours(self) -> float:
        return sum(u.duration for u in self.utts) / 3600.0


def load_datasets(cfg: DataConfig, *, require_dialog: bool = False,
                  channels: int | None = None) -> tuple[DataSplit, DataSplit]:
    """Read every training manifest (and its store), split off the dev utterances, filter by
    duration. `require_dialog`: every text must start with [S1] (dialog/stereo stages).
    `channels`: the channel count every dataset must have (2 for the stereo stage)."""
    dev_ids = None
    if cfg.dev_ids:
        p = Path(cfg.dev_ids)
        if not p.is_file():
            raise FileNotFoundError(f"data.dev_ids: file not found: {p}")
        dev_ids = {line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()}
    names = [s.name for s in cfg.train]
    if len(set(names)) != len(names):
        raise ValueError(f"data.train: dataset names must be unique, got {names}")
    train_utts, dev_utts, train_src, dev_src, stores = [], [], [], [], {}
    for spec in cfg.train:
        if channels is not None and spec.channels != channels:
            raise ValueError(f"data.train.{spec.name}: this stage needs channels: {channels}, "
                             f"the dataset has {spec.channels}")
        utts = read_manifest_cached(spec, cfg.feature_store, stores)
        if require_dialog:
            bad = next((u for u in utts if not u.text.startswith("[S1]")), None)
            if bad is not None:
                raise ValueError(f"{spec.manifest}: dialogue text must start with [S1]; "
                                 f"utterance {bad.id!r} is {bad.text[:50]!r}")
        utts.sort(key=lambda u: u.id)
        if dev_ids is not None:
            dev = [u for u in utts if u.id in dev_ids]
            train = [u for u in utts if u.id not in dev_ids]
        else:
            n_dev = cfg.dev_size if spec.dev_size is None else spec.dev_size
            if n_dev >= len(utts) and len(utts) > 0:
                raise ValueError(f"{spec.manifest}: dev_size {n_dev} leaves no training data "
                                 f"({len(utts)} utterances)")
            dev, train = utts[:n_dev], utts[n_dev:]
        n_split = len(train)
        dev, train = (filter_by_duration(x, cfg.min_duration, cfg.max_len, spec.name)
                      for x in (dev, train))
        n_in_range = len(train)
        longest = max((u.duration for u in train), default=0.0)
        if cfg.max_duration < cfg.max_len:
            too_long = sum(u.duration > cfg.max_duration for u in train)
            if too_long:
                log.warning("%s: %d utterances are longer than the batch budget data.max_duration "
                            "%.1f s and are dropped (raise it to %.1f to keep them)",
                            spec.name, too_long, cfg.max_duration, longest)
                train = [u for u in train if u.duration <= cfg.max_duration]
                dev = [u for u in dev if u.duration <= cfg.max_duration]
        if not train:
            raise ValueError(_no_training_data(spec.manifest, len(utts), n_split, n_in_range, longest, cfg))
        train_src.append(np.arange(len(train_utts), len(train_utts) + len(train)))
        dev_src.append(np.arange(len(dev_utts), len(dev_utts) + len(dev)))
        train_utts += train
        dev_utts += dev
    return (DataSplit(train_utts, train_src, list(cfg.train), stores),
            DataSplit(dev_utts, dev_src, list(cfg.train), stores))


def read_manifest_cached(spec: DatasetSpec, feature_store: str | None,
                         stores: dict[str, FeatureStore]) -> list[Utterance]:
    """The dataset's utterances; with a store, durations and tokens come from the store (exact
    frame counts, no audio header reads)."""
    if feature_store is None:
        return read_manifest(spec.manifest, spec.root, spec.channels, spec.name)
    store = FeatureStore(Path(feature_store) / spec.name)
    if store.channels != spec.channels:
        raise ValueError(f"{store.path}: store has {store.channels} channel(s), dataset "
                         f"{spec.name!r} is configured with {spec.channels}")
    stores[spec.name] = store
    utts = read_manifest(spec.manifest, spec.root, spec.channels, spec.name,
                         probe_durations=False)
    bad = [u for u in utts if u.id in store.failed]
    if bad:
        log.warning("%s: %d utterance(s) whose audio could not be read are left out (e.g. %s: %s)",
                    spec.name, len(bad), bad[0].id, store.failed[bad[0].id])
        utts = [u for u in utts if u.id not in store.failed]
    missing = [u.id for u in utts if u.id not in store]
    if missing:
        raise ValueError(f"{store.path}: {len(missing)} utterance(s) of {spec.manifest} are not in "
                         f"the store (e.g. {missing[0]!r}); rerun python -m model.prepare")
    for u in utts:
        u.duration = store.num_frames[u.id] / FRAME_RATE
        if u.tokens is None:
            u.tokens = store.tokens[u.id]
    return utts


def _no_training_data(manifest, n_all: int, n_split: int, n_in_range: int, longest: float,
                      cfg: DataConfig) -> str:
    """Why a dataset has no training utterance left, naming the step that removed them and the
    setting that fixes it."""
    head = f"{manifest}: no training utterances left"
    if n_all == 0:
        return f"{head}: the manifest is empty"
    if n_split == 0:
        return f"{head}: all {n_all} are held out for validation (lower data.dev_size)"
    if n_in_range == 0:
        return (f"{head}: all {n_split} are outside the duration filter [data.min_duration, "
                f"data.max_len] = [{cfg.min_duration}, {cfg.max_len}] s (widen it)")
    need = math.ceil(longest * 10) / 10
    return (f"{head}: all {n_in_range} within [data.min_duration, data.max_len] = "
            f"[{cfg.min_duration}, {cfg.max_len}] s are longer than the batch budget "
            f"data.max_duration = {cfg.max_duration} s, which must hold at least one utterance; "
            f"raise it to at least {need:g} (e.g. --set data.max_duration={need:g}) or lower "
            f"data.max_len to drop the long ones")


def filter_by_duration(utts: list[Utterance], min_duration: float, max_len: float,
                       name: str = "") -> list[Utterance]:
    kept = [u for u in utts if min_duration <= u.duration <= max_len]
    if len(kept) < len(utts):
        log.info("%s: %d of %d utterances outside [%.1f, %.1f] s dropped", name or "data",
                 len(utts) - len(kept), len(utts), min_duration, max_len)
    return kept


# --------------------------------------------------------------------------------------------
# Dataset and batches
# --------------------------------------------------------------------------------------------


class TTSDataset(torch.utils.data.Dataset):
    """Item i -> {"id", "text", "tokens" (ids), "features" (T, D) unscaled, "duration"}."""

    def __init__(self, split: DataSplit, tokenizer):
        self.utts = split.utts
        self.stores = split.stores
        self.tokenizer = tokenizer
        self._token_cache: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.utts)

    def string_tokens(self, utt: Utterance) -> list[str]:
        if utt.tokens is not None:
            return utt.tokens
        tokens = self._token_cache.get(utt.id)
        if tokens is None:
            tokens = self.tokenizer.texts_to_tokens([utt.text])[0]
            self._token_cache[utt.id] = tokens
        return tokens

    def __getitem__(self, i: int) -> dict:
        utt = self.utts[i]
        store = self.stores.get(utt.dataset)
        feats = store.get(utt.id) if store is not None else compute_features(utt)
        ids = self.tokenizer.tokens_to_token_ids([self.string_tokens(utt)])[0]
        return {"id": utt.id, "text": utt.text, "tokens": ids, "features": feats,
                "duration": feats.shape[0] / FRAME_RATE}


def collate(items: list[dict]) -> dict:
    """Pad to the longest item with log(1e-10) and multiply by FEAT_SCALE (model-ready)."""
    lens = torch.tensor([it["features"].shape[0] for it in items], dtype=torch.long)
    dim = items[0]["features"].shape[1]
    feats = torch.full((len(items), int(lens.max()), dim), LOG_EPS_PAD, dtype=torch.float32)
    for i, it in enumerate(items):
        feats[i, : it["features"].shape[0]] = it["features"]
    return {"features": feats * FEAT_SCALE, "features_lens": lens,
            "tokens": [it["tokens"] for it in items], "ids": [it["id"] for it in items],
            "text": [it["text"] for it in items],
            "duration": float(sum(it["duration"] for it in items))}


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


def mux(sources: list[np.ndarray], weights: list[float], rng: np.random.Generator) -> np.ndarray:
    """Weighted random interleaving until every source is exhausted (lhotse CutSet.mux).

    Each source emits its items at the times of a Poisson process of rate `weight`; merging the
    processes picks the next item from source i with probability w_i / sum(active w), exactly
    the sequential weighted draw, in one vectorised sort.
    """
    times, items = [], []
    for src, w in zip(sources, weights):
        if len(src) == 0:
            continue
        times.append(np.cumsum(rng.exponential(1.0 / w, size=len(src))))
        items.append(src)
    if not items:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(np.concatenate(times), kind="stable")
    return np.concatenate(items)[order]


class BucketBatchSampler:
    """Duration-bucketed batches capped by total seconds; deterministic per (seed, epoch);
    resumable mid-epoch; sharded over DDP ranks.

    durations: per utterance (index = position in the dataset); sources: per dataset the indices
    of its utterances; repeats/weights: per dataset (weights default to counts after repetition,
    the reference's mux weights).
    """

    def __init__(self, durations, sources: list[np.ndarray], *, max_duration: float,
                 repeats: list[int] | None = None, weights: list[float | None] | None = None,
                 num_buckets: int = 30, buffer_size: int = 60000, drop_last: bool = True,
                 seed: int = 42, world_size: int = 1, rank: int = 0):
        self.durations = np.asarray(durations, dtype=np.float64)
        self.sources = [np.asarray(s, dtype=np.int64) for s in sources]
        n = len(self.sources)
        self.repeats = list(repeats) if repeats is not None else [1] * n
        counts = [len(s) * r for s, r in zip(self.sources, self.repeats)]
        weights = list(weights) if weights is not None else [None] * n
        self.weights = [float(c) if w is None else float(w) for w, c in zip(weights, counts)]
        if any(self.durations > max_duration):
            raise ValueError(f"utterances longer than max_duration ({max_duration} s) cannot be "
                             f"batched: longest is {self.durations.max():.1f} s")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.max_duration = float(max_duration)
        self.buffer_size = int(buffer_size)
        self.drop_last = drop_last
        self.seed = int(seed)
        self.world_size, self.rank = int(world_size), int(rank)
        used = np.concatenate(self.sources) if self.sources else np.zeros(0, dtype=np.int64)
        # Equal-count buckets over the training durations (fixed for the whole run).
        if len(used):
            qs = np.quantile(self.durations[used], np.linspace(0, 1, num_buckets + 1)[1:-1])
            self.boundaries = np.unique(qs)
        else:
            self.boundaries = np.zeros(0)
        self.epoch = 1
        self.position = 0
        self._plan: tuple[int, list[np.ndarray]] | None = None

    # ---- plan ------------------------------------------------------------------------------

    def global_plan(self, epoch: int) -> list[np.ndarray]:
        """Every batch of `epoch` (all ranks), in order."""
        rng = np.random.default_rng([self.seed, epoch])
        streams = []
        for src, rep in zip(self.sources, self.repeats):
            streams.append(np.concatenate([rng.permutation(src) for _ in range(rep)])
                           if len(src) else src)
        stream = mux(streams, self.weights, rng)
        bucket_of = np.searchsorted(self.boundaries, self.durations, side="right")
        buckets: dict[int, list[int]] = {}
        plan: list[np.ndarray] = []
        for start in range(0, len(stream), self.buffer_size):
            window = stream[start: start + self.buffer_size]
            for idx in window:
                buckets.setdefault(int(bucket_of[idx]), []).append(int(idx))
            ready: list[np.ndarray] = []
            for b in sorted(buckets):
                ready += self._cut(buckets[b])
            rng.shuffle(ready)
            plan += ready
        if not self.drop_last:
            rest = [np.asarray(buckets[b], dtype=np.int64) for b in sorted(buckets) if buckets[b]]
            rng.shuffle(rest)
            plan += rest
        return plan

    def _cut(self, bucket: list[int]) -> list[np.ndarray]:
        """Cut full batches off the front of a bucket (in place); the partial rest stays."""
        out = []
        total, start = 0.0, 0
        for i, idx in enumerate(bucket):
            d = self.durations[idx]
            if total + d > self.max_duration:
                out.append(np.asarray(bucket[start:i], dtype=np.int64))
                start, total = i, 0.0
            total += d
        del bucket[:start]
        return out

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of `epoch`: every world_size-th batch of the global plan, which is
        truncated to a multiple of world_size so every rank runs the same number of steps."""
        if self._plan is None or self._plan[0] != epoch:
            plan = self.global_plan(epoch)
            plan = plan[: len(plan) // self.world_size * self.world_size]
            self._plan = (epoch, plan[self.rank:: self.world_size])
        return self._plan[1]

    # ---- iteration and state ---------------------------------------------------------------

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = int(epoch), int(position)

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch.tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, sd: dict) -> None:
        if int(sd.get("world_size", self.world_size)) != self.world_size:
            log.warning("sampler state saved with world size %s, now %d: the epoch restarts",
                        sd.get("world_size"), self.world_size)
            self.set_epoch(int(sd["epoch"]), 0)
            return
        self.seed = int(sd.get("seed", self.seed))
        self._plan = None
        self.set_epoch(int(sd["epoch"]), int(sd["position"]))


class FixedBatches(torch.utils.data.Sampler):
    """A fixed list of batches for a DataLoader's `batch_sampler` (the trainer slices the epoch
    plan at the resume position)."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            yield b.tolist()


def make_loader(dataset: TTSDataset, batches: list[np.ndarray], num_workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    # A private generator: creating the loader must not draw from the global torch RNG, or a
    # resumed run would see other noise than an uninterrupted one.
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=FixedBatches(batches), collate_fn=collate,
        num_workers=num_workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False)


def dev_batches(split: DataSplit, max_duration: float, world_size: int = 1,
                rank: int = 0) -> list[np.ndarray]:
    """Validation batches: utterances sorted by duration, cut at max_duration; rank r takes
    every world_size-th batch (partial last batches kept)."""
    if not split.utts:
        return []
    order = np.argsort([u.duration for u in split.utts], kind="stable")
    batches, cur, total = [], [], 0.0
    for i in order:
        d = split.utts[i].duration
        if cur and total + d > max_duration:
            batches.append(np.asarray(cur, dtype=np.int64))
            cur, total = [], 0.0
        cur.append(int(i))
        total += d
    if cur:
        batches.append(np.asarray(cur, dtype=np.int64))
    return batches[rank::world_size]


def describe(split: DataSplit) -> str:
    parts = []
    for spec, src in zip(split.specs, split.sources):
        hours = sum(split.utts[i].duration for i in src) / 3600
        parts.append(f"{spec.name}: {len(src)} utts, {hours:.2f} h" +
                     (f" (x{spec.repeat})" if spec.repeat > 1 else ""))
    return "; ".join(parts)
