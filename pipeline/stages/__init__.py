"""Stage registry: a stage name in a config -> the class that implements it.

The runner only sees this mapping; a user stage can be named by import path
(``uses: mypackage.module:MyStage``).
"""

from __future__ import annotations

import importlib

STAGES = {
    "ingest": "pipeline.stages.ingest:IngestStage",
    "vad": "pipeline.stages.vad:VadStage",
    "diarization": "pipeline.stages.diarization:DiarizationStage",
    "asr": "pipeline.stages.asr:AsrStage",
    "classification": "pipeline.stages.classification:ClassificationStage",
    "segments": "pipeline.stages.segments:SegmentStage",
    "rules": "pipeline.stages.rules:RulesStage",
    "quality": "pipeline.stages.quality:QualityStage",
    "export": "pipeline.stages.export:ExportStage",
}


def resolve_stage(kind: str):
    target = STAGES.get(kind, kind)
    if ":" not in target:
        raise KeyError(f"unknown stage {kind!r}; known: {', '.join(STAGES)} (or 'package.module:Class')")
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"cannot load stage {kind!r} from {target}: {e}") from e
