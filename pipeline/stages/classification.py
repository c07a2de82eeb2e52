"""Classification: is the recording a two-speaker dialogue? (the paper's LLM classifier, section 5.1)

Reads the diarization ``turns`` and the ASR ``utterances`` and adds ``is_dialogue``,
``dialogue_score`` (0..1), ``backend``, ``model``, ``prompt_version`` and ``answer``. Dialogues
stay ``ok`` and flow on; other recordings are ``rejected`` with a ``not_dialogue: ...`` reason; an
answer that does not parse is ``failed`` ("unparsable LLM answer: ..."), never read as a yes.

Backends (``pipeline/backends/llm/``): ``heuristic`` (the embedded default: diarization turn
statistics, no model), ``transformers`` (a local causal LM, yes/no log-likelihood or generated
JSON) and ``vllm`` (GPU, batched, guided decoding). A recording is a dialogue when its score
reaches ``threshold``. With an LLM backend, recordings whose diarization rules them out by
speaker count (``prefilter``) are rejected without an LLM call: a 1-speaker or a 5-speaker
recording cannot become a two-speaker ``[S1]/[S2]`` dialogue whatever its text says.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Literal

from pydantic import Field, model_validator

from pipeline.backends.llm import Classifier, PromptConfig, Verdict, load_backend
from pipeline.backends.llm.heuristic import HeuristicClassifier, HeuristicConfig, judge, speaker_reason, turn_stats
from pipeline.backends.llm.transformers import TransformersConfig
from pipeline.backends.llm.vllm import VllmConfig
from pipeline.scores import ScoreStore, key_of, scoring_fingerprint
from pipeline.stage import Resources, Stage, StageConfig

MAX_ANSWER_CHARS = 500
# What a backend reads of a recording: a verdict is stored under a hash of these fields.
_SEEN = ("turns", "exclusive_turns", "overlaps", "utterances", "num_speakers", "speaker_durations",
         "overlap_ratio", "duration", "language", "speech_duration")


class ClassificationConfig(StageConfig):
    # ray-llm: vLLM through Ray's batch LLM engine (ray.data.llm), configured by the vllm section.
    backend: Literal["heuristic", "transformers", "vllm", "ray-llm"] = "heuristic"
    threshold: float = Field(0.5, ge=0, le=1, description="dialogue_score that makes a dialogue")
    prefilter: bool = Field(True, description="LLM backends: reject by diarization speaker count before the LLM")
    heuristic: HeuristicConfig = HeuristicConfig()
    prompt: PromptConfig = PromptConfig()
    transformers: TransformersConfig = TransformersConfig()
    vllm: VllmConfig = VllmConfig()

    @model_validator(mode="after")
    def _gpus(self) -> "ClassificationConfig":
        if self.backend in ("vllm", "ray-llm"):
            gpus = self.resources.num_gpus if self.resources else 0
            if gpus < self.vllm.tensor_parallel_size:
                raise ValueError(f"backend {self.backend} needs resources.num_gpus >= vllm.tensor_parallel_size "
                                 f"({self.vllm.tensor_parallel_size}), got {gpus}")
        return self


class ClassificationStage(Stage):
    Config = ClassificationConfig
    manifest = "classification"
    version = "1"
    # The backends' verdicts are stored (pipeline/scores.py); these only decide what they mean.
    thresholds = ("threshold", "prefilter")
    default_resources = Resources(num_cpus=1, num_gpus=0, batch_size=8, concurrency=1)

    def __init__(self, config: ClassificationConfig, ctx, backend: Classifier | None = None):
        """``backend`` replaces the configured one (tests; a caller that already holds a model)."""
        super().__init__(config, ctx)
        self.heuristic = HeuristicClassifier(config.heuristic)
        if backend is not None:
            self.backend = backend
        elif config.backend == "heuristic":
            self.backend = self.heuristic
        else:
            kind_cfg = getattr(config, "vllm" if config.backend == "ray-llm" else config.backend)
            self.backend = load_backend(config.backend, kind_cfg, config.prompt, ctx.device)
        self.is_llm = self.backend is not self.heuristic
        # A backend handed in by the caller is not described by the config: its verdicts are not stored.
        self.store = None if backend is not None else \
            ScoreStore(ctx.output_dir, ctx.name, scoring_fingerprint(type(self), config))

    def process(self, rows):
        out: list[dict | None] = [self._precheck(r) for r in rows]
        todo = [i for i, r in enumerate(out) if r is None]
        verdicts = self._verdicts([rows[i] for i in todo]) if todo else []
        for i, v in zip(todo, verdicts):
            out[i] = self._apply(rows[i], v, self.backend)
        return out

    def _verdicts(self, rows: list[dict]) -> list[Verdict]:
        """The backend's verdicts, stored ones first: an unchanged transcript is not asked twice."""
        keys = [key_of({k: r.get(k) for k in _SEEN}) for r in rows]
        stored = self.store.get(keys) if self.store else {}
        ask = [i for i, k in enumerate(keys) if k not in stored]
        new = self.backend.classify([rows[i] for i in ask]) if ask else []
        if len(new) != len(ask):
            raise RuntimeError(f"{self.backend.name} backend returned {len(new)} verdicts for {len(ask)} rows")
        if self.store:
            # Unusable answers are not stored: the next run asks again.
            self.store.put({keys[i]: asdict(v) for i, v in zip(ask, new) if v.error is None})
        got = dict(zip(ask, new))
        return [got[i] if i in got else Verdict(**stored[k]) for i, k in enumerate(keys)]

    def _precheck(self, row: dict) -> dict | None:
        """A finished row when the recording needs no backend call, else None."""
        if self.is_llm:
            if "utterances" not in row:
                return self._failed(row, "classification needs the ASR 'utterances': run the asr stage before it")
            if not any(str(u.get("text") or "").strip() for u in row["utterances"] or []):
                return self._result(row, "rejected", "not_dialogue: empty transcript", self.backend, score=0.0)
            if self.config.prefilter:
                turns = row["turns"] if row.get("turns") is not None else row["utterances"]
                st = turn_stats(dict(row, turns=turns), self.config.heuristic)
                why = speaker_reason(st, self.config.heuristic)
                if why:
                    score, _ = judge(st, self.config.heuristic)
                    return self._result(row, "rejected", f"not_dialogue: {why}", self.heuristic, score=score,
                                        answer=json.dumps(asdict(st)))
        elif row.get("turns") is None:
            return self._failed(row, "classification needs the diarization 'turns': "
                                     "run the diarization stage before it")
        return None

    def _apply(self, row: dict, v: Verdict, backend: Classifier) -> dict:
        if v.error is not None or v.score is None:
            snippet = (v.answer or "")[:120]
            return self._result(row, "failed", f"unparsable LLM answer: {v.error}: {snippet!r}", backend,
                                answer=v.answer)
        t = self.config.threshold
        if v.score >= t:
            return self._result(row, "ok", None, backend, v.score, v.answer)
        if v.reason:
            why = v.reason
        elif backend is self.heuristic:
            why = f"heuristic score {v.score:.2f} < threshold {t}"
        elif v.score < 0.5:
            why = f"llm answered no (score {v.score:.2f})"
        else:
            why = f"llm score {v.score:.2f} < threshold {t}"
        return self._result(row, "rejected", f"not_dialogue: {why}", backend, v.score, v.answer)

    def _result(self, row: dict, status: str, reason: str | None, backend: Classifier,
                score: float | None = None, answer: str | None = None) -> dict:
        return dict(row, status=status, reason=reason,
                    is_dialogue=None if status == "failed" else status == "ok",
                    dialogue_score=None if score is None else round(float(score), 4),
                    backend=backend.name, model=backend.model, prompt_version=backend.prompt_version,
                    answer=None if answer is None else answer[:MAX_ANSWER_CHARS])

    def _failed(self, row: dict, reason: str) -> dict:
        return self._result(row, "failed", reason, self.backend)
