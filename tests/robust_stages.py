"""Small stages for the robustness tests (named in configs as ``tests.robust_stages:...``).

``ToneSegments`` stands in for the analysis chain between ingest and export: one segment per
recording whose text names the dominant frequency of its analysis copy, so that a test can see
whether exported text and audio come from the same (current) content. ``CrashTask`` and
``CrashActor`` abort their worker process (as a native encoder does on bad input) on recordings
whose file name contains their ``word``.
"""

from __future__ import annotations

import os
import resource

import numpy as np

from pipeline.audio import read_span
from pipeline.stage import Resources, Stage, StageConfig


class ToneConfig(StageConfig):
    language: str = "en"


class ToneSegments(Stage):
    Config = ToneConfig
    manifest = "segments"
    default_resources = Resources(num_cpus=0.5, batch_size=4, concurrency=1)

    def process(self, rows):
        out = []
        for r in rows:
            x, sr = read_span(r["audio_path"])
            freq = int(round(np.argmax(np.abs(np.fft.rfft(x))) * sr / len(x) / 10.0) * 10)
            seg = dict(segment_id=f"{r['recording_id']}_0000", recording_id=r["recording_id"], start=0.0,
                       end=round(r["duration"], 3), duration=round(r["duration"], 3), text=f"[S1] tone {freq} hertz",
                       num_turns=1, language=self.config.language, speakers=["A"], agreement=None,
                       source="test", status="ok", reason=None)
            out.append(dict(r, segments=[seg], status="ok", reason=None))
        return out

    def manifest_rows(self, row):
        return row["segments"]


class CrashConfig(StageConfig):
    word: str = "crash"


class CrashTask(Stage):
    Config = CrashConfig
    manifest = "recordings"
    default_resources = Resources(num_cpus=0.5, batch_size=4, concurrency=1)

    def process(self, rows):
        if any(self.config.word in r["source_path"] for r in rows):
            # No core file: writing one takes ~20 s per crash on a busy machine.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.abort()  # SIGABRT: the process is gone, no exception reaches Python
        return [dict(r, status="ok", reason=None) for r in rows]


class CrashActor(CrashTask):
    def setup(self):  # a stage with a model: runs in an actor pool
        self.loaded = True


class TouchThenRaise(Stage):
    """Alters every row it is given, then raises when the batch holds a recording whose name
    contains ``word``: the runner must retry the others from the rows as they were, not as this
    stage left them."""

    Config = CrashConfig
    manifest = "vad"
    default_resources = Resources(num_cpus=0.5, batch_size=4, concurrency=1)

    def process(self, rows):
        for r in rows:
            r["speech_duration"] = (r.get("speech_duration") or 0.0) + 1.0
        if any(self.config.word in r["source_path"] for r in rows):
            raise ValueError(f"a {self.config.word} recording in the batch")
        return [dict(r, status="ok", reason=None) for r in rows]


class TruthConfig(StageConfig):
    truth_dir: str
    turns_per_segment: int = 3


class TruthSegments(Stage):
    """The segments stage for recordings whose truth is known (``<truth_dir>/<stem>.json`` as
    written by ``pipeline.synth``): consecutive groups of truth turns become segments with their
    [S1]/[S2] turns, as the segments stage would cut them, without the ASR models' cost."""

    Config = TruthConfig
    manifest = "segments"
    needs = ("source_path",)
    adds = ("segments",)
    default_resources = Resources(num_cpus=0.5, batch_size=4, concurrency=1)

    def process(self, rows):
        import json
        from pathlib import Path

        from pipeline.segmentation import TaggedTurn, tag_turns

        out = []
        for r in rows:
            truth = json.loads((Path(self.config.truth_dir) / f"{Path(r['source_path']).stem}.json").read_text())
            turns = [t for t in truth["turns"] if not t["is_backchannel"]]
            n = self.config.turns_per_segment
            segs = []
            for k in range(0, len(turns) - 1, n):
                group = turns[k:k + n]
                if len(group) < 2:
                    continue
                parts, order = tag_turns([TaggedTurn(t["speaker"], t["text"], t["start"], t["end"], t["speaker"])
                                          for t in group], sep="" if truth["language"] == "zh" else " ")
                start, end = round(group[0]["start"], 3), round(group[-1]["end"], 3)
                segs.append(dict(segment_id=f"{r['recording_id']}_{len(segs):04d}", recording_id=r["recording_id"],
                                 start=start, end=end, duration=round(end - start, 3),
                                 text=" ".join(f"[{p['speaker']}] {p['text']}" for p in parts),
                                 num_turns=len(parts), language=truth["language"], speakers=order,
                                 turns=[dict(p, start=round(p["start"], 3), end=round(p["end"], 3)) for p in parts],
                                 agreement=None, source="truth", status="ok", reason=None))
            out.append(dict(r, segments=segs, status="ok", reason=None))
        return out

    def manifest_rows(self, row):
        return row["segments"]
