"""Dialogue segments: <= 30 s pieces of a dialogue recording with `[S1]`/`[S2]` tagged text.

The recording is split at VAD silences (pieces still over the limit are cut further) and each
piece is transcribed with speaker tags:

* ``method: whisperd`` (the paper): WhisperD re-transcribes each piece; its tags are local to the
  piece, so they are mapped to the diarization speakers by time overlap (consistent speakers across
  a recording, recorded in ``speakers``) and the share of time on which both agree is kept as
  ``agreement``. Languages without a WhisperD model fall back to the diarization method.
* ``method: diarization`` (embedded, offline): the same tagged text is built from the diarization
  turns and the ASR text of the utterances inside the piece.

Every segment text starts with [S1] and alternates; [S1] is whoever speaks first in the segment.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.audio import read_span
from pipeline.segmentation import (
    Chunk,
    estimate_turn_times,
    map_tags_to_speakers,
    parse_tagged,
    split_at_silences,
    tag_turns,
    turns_from_utterances,
)
from pipeline.stage import Resources, Stage, StageConfig

CJK_LANGS = {"zh", "ja", "yue"}
_SPECIAL = re.compile(r"<\|[^|>]*\|>")


class WhisperDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # language -> hub id or local directory. The paper used the public English WhisperD and an
    # in-house Chinese one; languages missing here use the diarization method.
    models: dict[str, str] = Field(default_factory=lambda: {"en": "jordand/whisper-d-v1a"})
    processor: str | None = Field("openai/whisper-large-v2", description="processor (tokenizer + features) when the model folder lacks one")
    batch_size: int = Field(8, ge=1)
    fp16: bool = True
    max_new_tokens: int | None = Field(None, ge=1, le=444, description="null: up to the model's limit")


class SegmentsConfig(StageConfig):
    method: Literal["whisperd", "diarization"] = "diarization"
    max_duration: float = Field(30.0, gt=2, description="seconds per segment (WhisperD's input limit)")
    pad: float = Field(0.2, ge=0, description="seconds of silence kept around speech at a cut")
    min_gap: float = Field(0.3, ge=0, description="preferred minimum silence at a cut (seconds)")
    min_duration: float = Field(1.0, ge=0, description="shorter segments are rejected")
    whisperd: WhisperDConfig = WhisperDConfig()


class SegmentStage(Stage):
    Config = SegmentsConfig
    manifest = "segments"
    version = "1"
    default_resources = Resources(num_cpus=1, batch_size=2, concurrency=1)
    needs = ("audio_path", "speech", "turns", "utterances", "language")
    adds = ("segments",)

    def setup(self):
        # WhisperD models load on first use, per language; the worker keeps them.
        self._whisperd: dict[str, object] = {}

    # -------------------------------------------------------------------------- per recording

    def process(self, rows):
        return [self._one(r) for r in rows]

    def _one(self, row: dict) -> dict:
        cfg = self.config
        speech = [(s["start"], s["end"]) for s in row.get("speech") or []]
        turns = row.get("turns") or []
        prefer = sorted({t["end"] for t in turns} | {t["start"] for t in turns})
        chunks = split_at_silences(speech, cfg.max_duration, cfg.pad, cfg.min_gap, prefer, row.get("duration"))
        language = row.get("language") or "en"
        use_whisperd = cfg.method == "whisperd" and language in cfg.whisperd.models
        segments = self._whisperd_segments(row, chunks, language) if use_whisperd else \
            self._diarization_segments(row, chunks, language)
        for k, seg in enumerate(segments):
            seg.update(segment_id=f"{row['recording_id']}_{k:04d}", recording_id=row["recording_id"])
            if seg["status"] == "ok" and seg["duration"] < cfg.min_duration:
                seg["status"], seg["reason"] = "rejected", f"too_short: {seg['duration']:.2f} s < {cfg.min_duration} s"
        ok = sum(s["status"] == "ok" for s in segments)
        out = dict(row, segments=segments, status="ok", reason=None)
        if not ok:
            why = sorted({(s["reason"] or "").split(":")[0] for s in segments}) or ["no speech"]
            out["status"], out["reason"] = "rejected", f"no_segment: {len(segments)} pieces, none usable ({', '.join(why)})"
        return out

    @staticmethod
    def _segment(chunk: Chunk, language: str, source: str) -> dict:
        return dict(start=chunk.start, end=chunk.end, duration=round(chunk.duration, 3), text=None, num_turns=0,
                    language=language, speakers=[], turns=[], agreement=None, source=source, status="ok", reason=None)

    def _finish(self, seg: dict, turns, key: str, sep: str) -> dict:
        try:
            parts, order = tag_turns(turns, key=key, sep=sep)
        except ValueError as e:
            seg["status"], seg["reason"] = "rejected", f"speakers: {e}"
            return seg
        text = " ".join(f"[{p['speaker']}] {p['text']}" for p in parts)
        # Turn spans stay inside the segment (an utterance may start in the padding before it).
        spans = [dict(p, start=round(max(seg["start"], p["start"]), 3), end=round(min(seg["end"], p["end"]), 3))
                 for p in parts if p["start"] is not None and p["end"] is not None]
        seg.update(text=text, num_turns=text.count("[S"), speakers=order, turns=spans)
        if not text:
            seg["status"], seg["reason"] = "rejected", "empty: no words in segment"
        return seg

    def _diarization_segments(self, row: dict, chunks: list[Chunk], language: str) -> list[dict]:
        sep = "" if language in CJK_LANGS else " "
        out = []
        for c in chunks:
            seg = self._segment(c, language, "diarization")
            out.append(self._finish(seg, turns_from_utterances(row.get("utterances") or [], c), "speaker", sep))
        return out

    # -------------------------------------------------------------------------- WhisperD

    def _backend(self, language: str):
        if language not in self._whisperd:
            from pipeline.backends.asr import load_backend

            w = self.config.whisperd
            options = {"model": w.models[language], "processor": w.processor, "batch_size": w.batch_size,
                       "fp16": w.fp16, "max_new_tokens": w.max_new_tokens}
            self._whisperd[language] = load_backend("hf-whisper", options, device=self.ctx.device,
                                                    num_threads=self.ctx.num_threads)
        return self._whisperd[language]

    def _whisperd_segments(self, row: dict, chunks: list[Chunk], language: str) -> list[dict]:
        backend = self._backend(language)
        audio = [read_span(row["audio_path"], c.start, c.end)[0] for c in chunks]
        # The raw decoding keeps WhisperD's [S1]/[S2] even where they are special tokens.
        texts = [_SPECIAL.sub(" ", t.raw) for t in backend.transcribe(audio, language=language)]
        speech = [(s["start"], s["end"]) for s in row.get("speech") or []]
        diar = [(t["start"], t["end"], t["speaker"]) for t in row.get("turns") or []]
        sep = "" if language in CJK_LANGS else " "
        out = []
        for c, raw in zip(chunks, texts):
            seg = self._segment(c, language, "whisperd")
            turns = parse_tagged(raw)
            if not turns:
                seg["status"], seg["reason"] = "rejected", "empty: WhisperD produced no words"
                out.append(seg)
                continue
            estimate_turn_times(turns, speech, c)
            local = [(a, b, s) for a, b, s in diar if b > c.start and a < c.end]
            seg["agreement"] = map_tags_to_speakers(turns, local) if local else None
            out.append(self._finish(seg, turns, "speaker", sep))
        return out

    def manifest_rows(self, row):
        return row.get("segments") or []
