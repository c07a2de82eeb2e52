"""Dialogue classification on Ray's own batch LLM engine (``ray.data.llm`` with vLLM).

The processor comes from Ray's public builder (``ray.data.llm.build_processor`` with a
``vLLMEngineProcessorConfig``): chat templating and tokenization stay ours (the transcript is
neutralised and the prompt rendered exactly as for the other LLM backends, then sent as token
ids), decoding is greedy and constrained to the answer JSON schema through the request's
``sampling_params.structured_outputs`` (Ray turns it into vLLM's ``StructuredOutputsParams``),
and the answer is parsed strictly as everywhere else.

Where the engine runs: the classification stage is one stage of the pipeline's Ray Data dataset,
whose GPU workers already hold the GPU (``resources.num_gpus``). Each worker instantiates the
processor's vLLM engine stage (Ray's ``vLLMEngineStage`` UDF, what the processor's own
``map_batches`` would start) once and feeds it every batch, so the model loads once per worker
and Ray's async engine wrapper (request queue, per-row errors) does the batching. Settings come
from the stage's ``vllm:`` section (model, tensor_parallel_size, max_model_len,
gpu_memory_utilization, dtype, max_tokens), as for the ``vllm`` backend.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

from pipeline.backends.hub import is_local, local_path, model_not_found
from pipeline.backends.llm.base import (
    ANSWER_SCHEMA,
    Verdict,
    fit_prompts,
    prompt_token_ids,
    prompt_version,
    special_tokens_of,
    verdict_from_text,
)
from pipeline.backends.llm.vllm import INSTALL_HINT, VllmOptions

ENGINE_STAGE = "vLLMEngineStage"


def build_engine_processor(config: VllmOptions, model_source: str, batch_size: int, runtime_env: dict | None = None):
    """The ray.data.llm processor of this classifier: the vLLM engine stage alone (our own
    template and tokenizer feed it token ids; the answer text comes with the engine output)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine_kwargs: dict[str, Any] = dict(tensor_parallel_size=config.tensor_parallel_size,
                                         max_model_len=config.max_model_len,
                                         gpu_memory_utilization=config.gpu_memory_utilization, dtype=config.dtype)
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=model_source, engine_kwargs=engine_kwargs, batch_size=batch_size, concurrency=1,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        # A row the engine fails on becomes a 'failed' recording, not a failed batch.
        should_continue_on_error=True, log_engine_metrics=False, runtime_env=runtime_env)
    return build_processor(proc_cfg)


def engine_request(token_ids: list[int], max_tokens: int) -> dict:
    """One processor input row: greedy, at most ``max_tokens``, constrained to the answer schema."""
    return {"tokenized_prompt": token_ids,
            "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens,
                                "structured_outputs": {"json": ANSWER_SCHEMA}}}


def verdict_from_output(row: dict) -> Verdict:
    error = row.get("__inference_error__") or ""
    if error:
        return Verdict(None, "", error=f"LLM engine error: {error}"[:500])
    return verdict_from_text(row.get("generated_text") or "")


class RayLlmClassifier:
    name = "ray-llm"
    answer_format = "json"
    Options = VllmOptions
    section = "vllm"  # vLLM through Ray's batch engine: the vllm backend's settings

    def __init__(self, options: VllmOptions | None = None, device: str = "cuda", num_threads: int = 1, *,
                 batch_size: int = 64):
        self.config = options or VllmOptions()
        self.prompt = self.config.prompt
        self.model = self.config.model
        self.prompt_version = prompt_version(self.answer_format)
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(f"the ray-llm classification backend runs vLLM, which is not installed: "
                               f"{INSTALL_HINT}, or use backend: transformers on CPU")
        if device != "cuda":
            raise RuntimeError("the ray-llm classification backend needs a GPU: set "
                               "stages.classification.resources.num_gpus (>= vllm.tensor_parallel_size)")
        ref = local_path(self.model) if is_local(self.model) else self.model
        self.tokenizer = self._tokenizer(ref)
        self.special_tokens = special_tokens_of(self.tokenizer)
        from ray.llm._internal.batch.processor.base import Processor

        self.processor = build_engine_processor(self.config, ref, batch_size)
        stage = self.processor.get_stage_by_name(ENGINE_STAGE)
        self._column = Processor.DATA_COLUMN
        kwargs = stage.get_dataset_map_batches_kwargs(batch_size=batch_size, data_column=self._column)
        # The engine's async machinery binds to the loop it starts on: one loop for the worker's life.
        self._loop = asyncio.new_event_loop()

        async def start():
            return stage.fn(**kwargs["fn_constructor_kwargs"])

        try:
            self.engine = self._loop.run_until_complete(start())
        except OSError as e:
            if is_local(self.model):
                raise ValueError(f"{ref}: not a model directory vLLM can load ({e})") from e
            raise model_not_found(self.model, "dialogue classifier LLM",
                                  "set stages.classification.vllm.model to a local model directory", e) from e

    def _tokenizer(self, ref: str):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(ref, local_files_only=is_local(self.model))
        except OSError as e:
            if is_local(self.model):
                raise ValueError(f"{ref}: no tokenizer in this model directory ({e})") from e
            raise model_not_found(self.model, "dialogue classifier LLM",
                                  "set stages.classification.vllm.model to a local model directory", e) from e

    def prompt_ids(self, row: dict) -> list[int]:
        return prompt_token_ids(self.tokenizer, row, self.prompt, self.answer_format, self.special_tokens)

    def classify(self, rows: list[dict]) -> list[Verdict]:
        ids = [self.prompt_ids(r) for r in rows]
        fits, out = fit_prompts(ids, self.config.max_model_len, self.config.max_tokens)
        if fits:
            batch = {self._column: [engine_request(ids[i], self.config.max_tokens) for i in fits]}
            results = self._loop.run_until_complete(self._run(batch))
            if len(results) != len(fits):
                raise RuntimeError(f"the LLM engine returned {len(results)} outputs for {len(fits)} prompts")
            for i, res in zip(fits, results):
                out[i] = verdict_from_output(res)
        return out

    async def _run(self, batch: dict) -> list[dict]:
        results: list[dict] = []
        async for part in self.engine(batch):
            results += part.get(self._column, [])
        return results
