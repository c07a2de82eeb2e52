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
