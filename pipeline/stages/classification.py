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

from pydantic import Field, model_validator

from pipeline.backends import BackendSections
from pipeline.backends.llm import BACKENDS
from pipeline.backends.llm.base import Classifier, PromptConfig, Verdict
from pipeline.backends.llm.heuristic import judge, speaker_reason, turn_stats
from pipeline.scores import ScoreStore, key_of, scoring_fingerprint
from pipeline.stage import Resources, Stage, StageConfig

MAX_ANSWER_CHARS = 500
# What a backend reads of a recording: a verdict is stored under a hash of these fields.
_SEEN = ("turns", "exclusive_turns", "overlaps", "utterances", "num_speakers", "speaker_durations",
         "overlap_ratio", "duration", "language", "speech_duration")


class ClassificationConfig(StageConfig, BackendSections):
    """Plus one section per registered backend (``heuristic:``, ``transformers:``, ``vllm:``; ray-llm,
    vLLM through Ray's batch LLM engine (ray.data.llm), is configured by the vllm section)."""

    registry = BACKENDS

    backend: str = "heuristic"
    threshold: float = Field(0.5, ge=0, le=1, description="dialogue_score that makes a dialogue")
    prefilter: bool = Field(True, description="LLM backends: reject by diarization speaker count before the LLM")
    prompt: PromptConfig = PromptConfig()

    @model_validator(mode="after")
    def _gpus(self) -> "ClassificationConfig":
        # A backend that shards its model over GPUs (vLLM) needs that many GPUs per worker.
        tp = getattr(self.options(self.backend), "tensor_parallel_size", None)
        if tp:
            gpus = self.resources.num_gpus if self.resources else 0
            if gpus < tp:
                section = self.registry.section(self.backend)
                raise ValueError(f"backend {self.backend} needs resources.num_gpus >= {section}.tensor_parallel_size "
                                 f"({tp}), got {gpus}")
        return self


class ClassificationStage(Stage):
    Config = ClassificationConfig
    manifest = "classification"
    version = "1"
    # The backends' verdicts are stored (pipeline/scores.py); these only decide what they mean.
    thresholds = ("threshold", "prefilter")
    default_resources = Resources(num_cpus=1, num_gpus=0, batch_size=8, concurrency=1)
    needs = ("turns",)

    @classmethod
    def row_needs(cls, config):
        # An LLM reads the transcript; its speaker-count prefilter reads the turns when there are.
        return cls.needs if config.backend == "heuristic" else ("turns", "utterances")
    adds = ("is_dialogue", "dialogue_score", "backend", "model", "prompt_version", "answer")

    def __init__(self, config: ClassificationConfig, ctx, backend: Classifier | None = None):
        """``backend`` replaces the configured one (tests; a caller that already holds a model)."""
        self.backend = backend
        self._given = backend is not None
        super().__init__(config, ctx)

    def setup(self):
        config, ctx = self.config, self.ctx
        self.heuristic = config.build_backend("heuristic")  # the speaker-count prefilter of LLM backends
        if self.backend is not None:
            pass
        elif config.backend == "heuristic":
            self.backend = self.heuristic
        else:
            # LLM backends show the transcript as the stage's prompt section says.
            wants_prompt = "prompt" in config.backend_class(config.backend).Options.model_fields
            self.backend = config.build_backend(config.backend, ctx.device, ctx.num_threads,
                                                **({"prompt": config.prompt} if wants_prompt else {}))
        self.is_llm = self.backend is not self.heuristic
        # A backend handed in by the caller is not described by the config: its verdicts are not stored.
        self.store = None if self._given else \
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
