"""Dialogue classification with vLLM: offline batched generation on a GPU worker.

The whole batch of prompts goes to ``LLM.generate`` at once (vLLM schedules it), greedy
(temperature 0), with the output constrained by guided decoding to the answer JSON schema
(``{"dialogue": bool, "confidence": number}``), so a well-behaved run never produces an off-format
answer; the answer is still parsed strictly, and anything else (a truncated answer, a confidence
outside 0..1) is a failed row. vLLM is imported lazily: it only exists on GPU nodes
(``pip install '.[vllm]'``). Guided decoding is found by feature detection: current vLLM has
``SamplingParams(structured_outputs=StructuredOutputsParams(json=...))``, older releases
(0.8-0.11) ``SamplingParams(guided_decoding=GuidedDecodingParams(json=...))``.

The stage's workers are a GPU actor pool: give the stage ``resources.num_gpus`` (at least
``tensor_parallel_size``) and one worker per model replica (``resources.concurrency``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.backends.hub import is_local, local_path, model_not_found
from pipeline.backends.llm.base import (
    ANSWER_SCHEMA,
    PromptConfig,
    Verdict,
    fit_prompts,
    prompt_version,
    prompt_token_ids,
    special_tokens_of,
    verdict_from_text,
)

INSTALL_HINT = "pip install '.[vllm]' on a GPU node"


class VllmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("Qwen/Qwen2.5-7B-Instruct", description="hub id or local directory of an instruct model")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica")
    max_model_len: int = Field(8192, ge=512, description="context length in tokens (prompt + answer)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="share of GPU memory vLLM may take")
    dtype: str = Field("auto", description="vLLM dtype: auto, bfloat16, float16")
    max_tokens: int = Field(48, ge=8, description="answer length limit in tokens")
    # The stage's shared ``prompt`` section, set by the stage (not a key of this section).
    prompt: PromptConfig = Field(default_factory=PromptConfig, exclude=True)


def import_vllm():
    """(vllm, vllm.sampling_params), or a clear error where vLLM is not installed."""
    try:
        import vllm
        from vllm import sampling_params
    except ImportError as e:
        raise RuntimeError(f"the vllm classification backend needs vLLM, which is not installed ({e}): "
                           f"{INSTALL_HINT}, or use backend: transformers on CPU") from e
    return vllm, sampling_params


def sampling_params(vllm, spm, max_tokens: int):
    """Greedy decoding constrained to the answer schema, for whichever API this vLLM has."""
    common = dict(temperature=0.0, max_tokens=max_tokens)
    if hasattr(spm, "StructuredOutputsParams"):
        return vllm.SamplingParams(**common, structured_outputs=spm.StructuredOutputsParams(json=ANSWER_SCHEMA))
    if hasattr(spm, "GuidedDecodingParams"):
        return vllm.SamplingParams(**common, guided_decoding=spm.GuidedDecodingParams(json=ANSWER_SCHEMA))
    raise RuntimeError(f"vLLM {getattr(vllm, '__version__', '?')} has no guided decoding "
                       "(StructuredOutputsParams or GuidedDecodingParams): install vllm >= 0.8")


class VllmClassifier:
    name = "vllm"
    answer_format = "json"

    Options = VllmOptions

    def __init__(self, options: VllmOptions | None = None, device: str = "cuda", num_threads: int = 1, *,
                 llm=None, modules=None):
        """``llm`` and ``modules`` ((vllm, vllm.sampling_params)) replace the real ones in tests."""
        self.config = options or VllmOptions()
        self.prompt = self.config.prompt
        self.model = self.config.model
        self.prompt_version = prompt_version(self.answer_format)
        vllm, spm = modules or import_vllm()
        if llm is None:
            llm = self._load(vllm, device)
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.special_tokens = special_tokens_of(self.tokenizer)
        self.params = sampling_params(vllm, spm, self.config.max_tokens)

    def _load(self, vllm, device: str):
        if device != "cuda":
            raise RuntimeError("the vllm classification backend needs a GPU: set "
                               "stages.classification.resources.num_gpus (>= tensor_parallel_size)")
        c = self.config
        ref = local_path(c.model) if is_local(c.model) else c.model
        try:
            return vllm.LLM(model=ref, tensor_parallel_size=c.tensor_parallel_size, max_model_len=c.max_model_len,
                            gpu_memory_utilization=c.gpu_memory_utilization, dtype=c.dtype)
        except OSError as e:
            if is_local(c.model):
                raise ValueError(f"{ref}: not a model directory vLLM can load ({e})") from e
            raise model_not_found(c.model, "dialogue classifier LLM",
                                  "set stages.classification.vllm.model to a local model directory", e) from e

    def prompt_ids(self, row: dict) -> list[int]:
        return prompt_token_ids(self.tokenizer, row, self.prompt, self.answer_format, self.special_tokens)

    def classify(self, rows: list[dict]) -> list[Verdict]:
        ids = [self.prompt_ids(r) for r in rows]
        fits, out = fit_prompts(ids, self.config.max_model_len, self.config.max_tokens)
        if fits:
            # Token ids, not text: vLLM would add a second BOS to a templated prompt.
            results = self.llm.generate([{"prompt_token_ids": ids[i]} for i in fits], self.params, use_tqdm=False)
            if len(results) != len(fits):
                raise RuntimeError(f"vLLM returned {len(results)} outputs for {len(fits)} prompts")
            for i, res in zip(fits, results):
                out[i] = verdict_from_text(res.outputs[0].text if res.outputs else "")
        return out
