"""ASR: the speaker-attributed transcript of each recording (what the dialogue classifier reads).

Turns are the diarization ``turns`` [{start, end, speaker}] (overlapping turns are each
transcribed in full, so words said in an overlap may appear in both). Without a diarization stage
before this one (the row has no ``turns``), each VAD span of ``speech`` is one turn of speaker
``SPEAKER_00``.

A turn longer than the model window (30 s for Whisper; ``max_chunk_seconds``) is cut into
pieces: each cut lies in the second half of the window, in the middle of the longest VAD pause
there, else at the point of lowest short-time energy of that stretch of audio. The pieces of all recordings of
a batch are transcribed together, several per model call, grouped by backend and language; a
turn's text is its pieces' texts joined.

Language (``language_id``):
* ``fixed``: every turn is ``language``; ``language_probability`` is null (nothing was measured).
* ``whisper`` / ``hf-whisper``: that backend's model scores its language tokens on the first
  window of each turn. The recording's distribution is the duration-weighted mean over its turns:
  its argmax is ``language``, its value ``language_probability``. A turn keeps its own language
  when it is at least 1 s long and its probability reaches ``turn_language_threshold``; otherwise
  it takes the recording's (one-word back-channels are unreliable evidence). This costs one
  encoder pass per turn on top of transcription.
Each turn is transcribed by ``backends[language]``, else ``backends.default`` (the paper: English
to Whisper, Chinese to Paraformer). Recordings whose language is not in ``languages`` (when set)
are rejected before transcription.

Output: ``utterances`` [{start, end, speaker, text, language, confidence}], one per turn with
words, sorted by start; ``confidence`` is the backend's 0..1 score (see its module), averaged
over the turn's pieces by duration. A recording with no words at all is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import soundfile as sf
from pydantic import Field, model_validator

from pipeline.audio import read_span
from pipeline.backends.asr import SAMPLE_RATE, load_backend
from pipeline.backends.asr.funasr import FunAsrOptions
from pipeline.backends.asr.hf_whisper import HfWhisperOptions
from pipeline.backends.asr.pocketsphinx import PocketSphinxOptions
from pipeline.backends.asr.whisper import WhisperOptions
from pipeline.stage import Resources, Stage, StageConfig

BackendName = Literal["whisper", "hf-whisper", "funasr", "pocketsphinx"]
NO_DIARIZATION_SPEAKER = "SPEAKER_00"
MIN_TURN = 0.1  # seconds; shorter turns hold no word
MIN_LID_TURN = 1.0  # seconds; shorter turns take the recording's language
GROUP_SECONDS = 600.0  # audio held in memory per round of model calls (~38 MB)
NO_SPACE_LANGUAGES = {"zh", "ja", "yue", "th", "lo", "my", "bo"}


class AsrConfig(StageConfig):
    language_id: Literal["fixed", "whisper", "hf-whisper"] = Field(
        "fixed", description="where the language comes from: the config, or a Whisper backend's model")
    language: str = Field("en", description="language of every turn when language_id is fixed")
    languages: list[str] | None = Field(
        None, description="recordings identified as another language are rejected (null: keep all)")
    turn_language_threshold: float = Field(
        0.8, ge=0, le=1, description="probability a turn needs to keep its own language")
    backends: dict[str, BackendName] = Field(
        default_factory=lambda: {"default": "pocketsphinx"},
        description="language -> backend; 'default' serves every other language")
    max_chunk_seconds: float = Field(
        30.0, ge=2, description="longest piece of a turn per model item (also capped by each backend's window)")
    whisper: WhisperOptions = WhisperOptions()
    hf_whisper: HfWhisperOptions = HfWhisperOptions()
    funasr: FunAsrOptions = FunAsrOptions()
    pocketsphinx: PocketSphinxOptions = PocketSphinxOptions()

    @model_validator(mode="after")
    def _check(self) -> "AsrConfig":
        if "default" not in self.backends:
            raise ValueError("backends needs a 'default' entry (the backend of every language not listed)")
        return self


@dataclass
class _Turn:
    row: int
    path: str
    start: float
    end: float
    speaker: str
    pieces: list[tuple[float, float]]
    language: str | None = None
    probs: dict[str, float] | None = None
    texts: list[str] = field(default_factory=list)
    confs: list[float | None] = field(default_factory=list)


class AsrStage(Stage):
    Config = AsrConfig
    manifest = "asr"
    version = "1"
    default_resources = Resources(num_cpus=1, num_gpus=0, batch_size=2, concurrency=1)

    def __init__(self, config: AsrConfig, ctx):
        super().__init__(config, ctx)
        names = set(config.backends.values())
        if config.language_id != "fixed":
            names.add(config.language_id)
        # One model per backend, shared by the languages it serves and by language identification.
        self.models = {n: load_backend(n, getattr(config, n.replace("-", "_")), ctx.device, ctx.num_threads)
                       for n in sorted(names)}
        self.lid = self.models.get(config.language_id)
        if self.lid is not None and not self.lid.can_identify_language:
            raise ValueError(f"stages.asr.language_id: the {config.language_id} model has no language tokens")
        self.window = min(config.max_chunk_seconds, *(m.max_seconds for m in self.models.values()))

    def backend_for(self, language: str) -> str:
        return self.config.backends.get(language, self.config.backends["default"])

    def process(self, rows):
        out = [dict(r) for r in rows]
        by_row: dict[int, list[_Turn]] = {}
        for i, row in enumerate(out):
            try:
                turns = self.plan(row, i)
            except Exception as e:  # noqa: BLE001 - one bad row must not sink the batch
                row.update(status="failed", reason=f"asr: {type(e).__name__}: {e}"[:500],
                           language=None, language_probability=None, utterances=[])
                continue
            if turns:
                by_row[i] = turns
            else:
                row.update(status="rejected", reason="no turns to transcribe (no speech spans or diarization turns)",
                           language=None, language_probability=None, utterances=[])
        self._identify_languages(out, by_row)
        self._transcribe([t for i, turns in by_row.items() if out[i]["status"] != "rejected" for t in turns])
        for i, turns in by_row.items():
            row = out[i]
            if row["status"] == "rejected":
                continue
            utts = [u for u in map(_utterance, turns) if u is not None]
            row["utterances"] = utts
            if utts:
                row.update(status="ok", reason=None)
            else:
                total = sum(t.end - t.start for t in turns)
                row.update(status="rejected", reason=f"no words recognised in {len(turns)} turns ({total:.1f} s)")
        return out

    def _identify_languages(self, out: list[dict], by_row: dict[int, list[_Turn]]) -> None:
        """Set each turn's language and each row's language/language_probability; reject rows
        whose language is not wanted."""
        cfg = self.config
        if self.lid is not None:
            turns = [t for ts in by_row.values() for t in ts]
            for t, p in zip(turns, self._run(self.lid.detect_language, turns, [t.pieces[0] for t in turns])):
                t.probs = p
        for i, turns in by_row.items():
            if self.lid is None:
                lang, prob, langs = cfg.language, None, [cfg.language] * len(turns)
            else:
                lang, prob, langs = choose_languages([t.probs for t in turns],
                                                     [t.pieces[0][1] - t.pieces[0][0] for t in turns],
                                                     cfg.turn_language_threshold)
            for t, tl in zip(turns, langs):
                t.language = tl
            out[i].update(language=lang, language_probability=prob)
            if cfg.languages is not None and lang not in cfg.languages:
                p = f" (p={prob:.2f})" if prob is not None else ""
                out[i].update(status="rejected", utterances=[],
                              reason=f"language {lang}{p} not in languages {cfg.languages}")

    def _transcribe(self, turns: list[_Turn]) -> None:
        """Fill every turn's piece texts: pieces grouped by (backend, language), several per call."""
        groups: dict[tuple[str, str], list[tuple[_Turn, int]]] = {}
        for t in turns:
            t.texts, t.confs = [""] * len(t.pieces), [None] * len(t.pieces)
            key = (self.backend_for(t.language), t.language)
            groups.setdefault(key, []).extend((t, k) for k in range(len(t.pieces)))
        for (name, lang), items in sorted(groups.items()):
            res = self._run(partial(self.models[name].transcribe, language=lang),
                            [t for t, _ in items], [t.pieces[k] for t, k in items])
            for (t, k), tr in zip(items, res):
                t.texts[k], t.confs[k] = tr.text, tr.confidence

    def plan(self, row: dict, index: int) -> list[_Turn]:
        """The turns of one recording, each cut into pieces no longer than the window."""
        path = row.get("audio_path")
        if not path:
            raise ValueError("row has no audio_path (run ingest first)")
        info = sf.info(path)
        if info.samplerate != SAMPLE_RATE or info.channels != 1:
            raise ValueError(f"{path}: expected the 16 kHz mono cache, got {info.samplerate} Hz, {info.channels} ch")
        duration = info.frames / info.samplerate
        speech = row.get("speech")
        raw_turns = row.get("turns")
        if raw_turns is None:
            if speech is None:
                raise ValueError("row has neither 'turns' (diarization) nor 'speech' (vad): run vad before asr")
            raw_turns = [{"start": s["start"], "end": s["end"], "speaker": NO_DIARIZATION_SPEAKER} for s in speech]
        spans = sorted((float(s["start"]), float(s["end"])) for s in (speech or []))
        gaps = [(a[1], b[0]) for a, b in zip(spans, spans[1:]) if b[0] > a[1]]
        turns = []
        for t in raw_turns:
            a, b = max(0.0, float(t["start"])), min(duration, float(t["end"]))
            if b - a < MIN_TURN:
                continue
            pieces = split_turn(a, b, self.window, gaps, lambda lo, hi: quietest_point(path, lo, hi))
            turns.append(_Turn(index, path, a, b, str(t["speaker"]), pieces))
        return sorted(turns, key=lambda t: (t.start, t.end))

    def _run(self, fn, owners: list[_Turn], spans: list[tuple[float, float]]) -> list:
        """fn over the audio of ``spans``, read and passed in groups of bounded total length."""
        results: list = []
        group: list[np.ndarray] = []
        seconds = 0.0
        for owner, (a, b) in zip(owners, spans):
            x, _ = read_span(owner.path, a, b)
            if seconds + (b - a) > GROUP_SECONDS and group:
                results += fn(group)
                group, seconds = [], 0.0
            group.append(x)
            seconds += b - a
        if group:
            results += fn(group)
        if len(results) != len(spans):
            raise RuntimeError(f"ASR backend returned {len(results)} results for {len(spans)} inputs")
        return results


def _utterance(t: _Turn) -> dict | None:
    sep = "" if (t.language or "") in NO_SPACE_LANGUAGES else " "
    text = sep.join(x.strip() for x in t.texts if x and x.strip()).strip()
    if not text:
        return None
    weights = [(b - a, c) for (a, b), c, x in zip(t.pieces, t.confs, t.texts) if c is not None and x.strip()]
    conf = sum(w * c for w, c in weights) / sum(w for w, _ in weights) if weights and sum(w for w, _ in weights) > 0 else None
    return {"start": round(t.start, 3), "end": round(t.end, 3), "speaker": t.speaker, "text": text,
            "language": t.language, "confidence": round(float(conf), 4) if conf is not None else None}


def split_turn(start: float, end: float, window: float, gaps: list[tuple[float, float]],
               quietest) -> list[tuple[float, float]]:
    """Pieces of [start, end] no longer than ``window``. Each cut lands in the second half of the
    window: in the middle of the longest VAD pause there, else at ``quietest(lo, hi)``."""
    pieces = []
    a = start
    while end - a > window:
        lo, hi = a + window / 2, a + window
        best = None
        for g0, g1 in gaps:
            c0, c1 = max(g0, lo), min(g1, hi)
            if c1 > c0 and (best is None or c1 - c0 > best[1] - best[0]):
                best = (c0, c1)
        cut = (best[0] + best[1]) / 2 if best else float(quietest(lo, hi))
        cut = min(max(cut, lo), hi)
        pieces.append((a, cut))
        a = cut
    pieces.append((a, end))
    return pieces


def quietest_point(path: str, lo: float, hi: float, frame: float = 0.025, hop: float = 0.01) -> float:
    """Time of the lowest short-time energy in [lo, hi] (25 ms frames, 10 ms hop, 50 ms smoothing)."""
    x, sr = read_span(path, lo, hi)
    n, h = int(frame * sr), int(hop * sr)
    if len(x) < n + h:
        return (lo + hi) / 2
    count = 1 + (len(x) - n) // h
    idx = np.arange(n)[None, :] + h * np.arange(count)[:, None]
    energy = (x[idx].astype(np.float64) ** 2).mean(axis=1)
    energy = np.convolve(energy, np.ones(5) / 5, mode="same")
    return lo + (int(np.argmin(energy)) * h + n / 2) / sr


def choose_languages(turn_probs: list[dict[str, float]], weights: list[float], threshold: float
                     ) -> tuple[str, float, list[str]]:
    """(recording language, its probability, language of each turn) from per-turn distributions."""
    total: dict[str, float] = {}
    wsum = sum(weights) or 1.0
    for p, w in zip(turn_probs, weights):
        for lang, v in p.items():
            total[lang] = total.get(lang, 0.0) + v * w / wsum
    lang = max(total, key=total.get)
    per_turn = []
    for p, w in zip(turn_probs, weights):
        own = max(p, key=p.get)
        per_turn.append(own if w >= MIN_LID_TURN and p[own] >= threshold else lang)
    return lang, round(float(total[lang]), 4), per_turn
