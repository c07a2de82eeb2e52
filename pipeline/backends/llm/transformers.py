"""Dialogue classification with a local causal LM through transformers (small models, CPU or GPU).

Two modes:

* ``score`` (default): the prompt asks for one word, yes or no, and the model is not sampled at
  all. The log-likelihood of each allowed answer as the continuation of the prompt is computed
  (surface forms ``yes``/``Yes``/`` yes``/`` Yes`` and the same for no, summed per label), and
  ``dialogue_score = P(yes) / (P(yes) + P(no))``. The output can never be off-format, the score is
  a real model probability rather than a verbalised confidence, and it costs one forward pass per
  prompt (when every form is a single token; else one pass per form). When the model puts less
  than ``min_label_mass`` of its probability on the allowed answers it is not answering the
  question (it wants to say something else), and the row fails instead of being forced to a label.
* ``generate``: greedy generation of a JSON answer, parsed strictly (``parse_answer``); the same
  prompt and parser as the vllm backend, useful to check that path on CPU.

Batches are left-padded, with position ids that skip the padding, so a prompt gets the same
score alone or in a batch. Prompts are sorted by length before batching to limit padding.
"""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.backends.hub import is_local, local_path, model_not_found
from pipeline.backends.llm.base import (
    LABELS,
    PromptConfig,
    Verdict,
    prompt_version,
    prompt_token_ids,
    special_tokens_of,
    verdict_from_text,
)

SURFACE_FORMS = {"yes": ("yes", "Yes", " yes", " Yes"), "no": ("no", "No", " no", " No")}


class TransformersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("Qwen/Qwen2.5-0.5B-Instruct", description="hub id or local directory of a causal LM")
    mode: Literal["score", "generate"] = Field("score", description="score yes/no by log-likelihood, or generate JSON")
    batch_size: int = Field(4, ge=1, description="prompts per forward pass")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on GPU")
    min_label_mass: float = Field(
        0.05, ge=0, lt=1, description="score mode: least probability on yes/no for a usable answer")
    max_new_tokens: int = Field(32, ge=4, description="generate mode: answer length limit")
    # The stage's shared ``prompt`` section, set by the stage (not a key of this section).
    prompt: PromptConfig = Field(default_factory=PromptConfig, exclude=True)


def load_causal_lm(ref: str, device: str = "cpu", dtype: str = "auto"):
    """(tokenizer, model) from a local directory or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = is_local(ref)
    path = local_path(ref) if local else ref
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:  # transformers raises either for a missing/incomplete model
        if local:
            raise ValueError(f"{path}: not a transformers causal LM directory ({str(e)[:300]})") from e
        raise model_not_found(ref, "dialogue classifier LLM",
                              "set stages.classification.transformers.model to a local model directory", e) from e
    return tok, model.to(device).eval()


class TransformersClassifier:
    name = "transformers"
    Options = TransformersOptions

    def __init__(self, options: TransformersOptions | None = None, device: str = "cpu", num_threads: int = 1):
        self.config = options or TransformersOptions()
        self.prompt = self.config.prompt
        self.model = self.config.model
        self.device = device
        self.tokenizer, self.lm = load_causal_lm(self.config.model, device, self.config.dtype)
        self.answer_format = "label" if self.config.mode == "score" else "json"
        self.prompt_version = prompt_version(self.answer_format)
        self.special_tokens = special_tokens_of(self.tokenizer)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.forms = self._surface_forms()

    def _surface_forms(self) -> dict[str, list[tuple[int, ...]]]:
        forms = {}
        for label in LABELS:
            ids = {tuple(self.tokenizer(f, add_special_tokens=False)["input_ids"]) for f in SURFACE_FORMS[label]}
            forms[label] = sorted(i for i in ids if i)
        if not forms["yes"] or not forms["no"] or set(forms["yes"]) & set(forms["no"]):
            raise ValueError(f"{self.model}: the tokenizer cannot tell 'yes' from 'no' ({forms})")
        return forms

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, row: dict) -> list[int]:
        return prompt_token_ids(self.tokenizer, row, self.prompt, self.answer_format, self.special_tokens)

    def classify(self, rows: list[dict]) -> list[Verdict]:
        ids = [self.prompt_ids(r) for r in rows]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[Verdict | None] = [None] * len(ids)
        step = self.config.batch_size
        for k in range(0, len(order), step):
            chunk = order[k:k + step]
            batch = [ids[i] for i in chunk]
            verdicts = self._score(batch) if self.config.mode == "score" else self._generate(batch)
            for i, v in zip(chunk, verdicts):
                out[i] = v
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ model calls

    def _pad(self, seqs: list[list[int]]):
        import torch

        n = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _logprobs(self, seqs: list[list[int]], keep: int):
        """Log-softmax over the vocabulary at the last ``keep`` positions, [batch, keep, vocab].
        Only those logits are computed: with a 150k vocabulary, all of them would be gigabytes."""
        import torch

        input_ids, mask = self._pad(seqs)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
        with torch.inference_mode():
            try:
                logits = self.lm(**inputs, logits_to_keep=keep).logits
            except TypeError:  # an architecture without logits_to_keep
                logits = self.lm(**inputs).logits
        return torch.log_softmax(logits[:, -keep:].float(), dim=-1)

    def continuation_logprobs(self, prompts: list[list[int]], conts: list[tuple[int, ...]],
                              single_pass: bool | None = None) -> list[list[float]]:
        """log P(cont | prompt) for every prompt x continuation. Single-token continuations are
        read from one pass over the prompts; longer ones need a pass over prompt + continuation."""
        if single_pass is None:
            single_pass = all(len(c) == 1 for c in conts)
        if single_pass:
            lp = self._logprobs(prompts, 1)[:, -1, :]
            return [[float(lp[i, c[0]]) for c in conts] for i in range(len(prompts))]
        seqs = [p + list(c) for p in prompts for c in conts]
        keep = max(len(c) for c in conts) + 1
        lp = self._logprobs(seqs, keep)
        out: list[list[float]] = []
        for i in range(len(prompts)):
            row = []
            for j, c in enumerate(conts):
                # The continuation is the right end of its left-padded row: its k-th token is
                # predicted by the logits len(c) - k positions from the end.
                s = i * len(conts) + j
                row.append(sum(float(lp[s, keep - 1 - len(c) + k, tok]) for k, tok in enumerate(c)))
            out.append(row)
        return out

    def _score(self, batch: list[list[int]]) -> list[Verdict]:
        conts = self.forms["yes"] + self.forms["no"]
        n_yes = len(self.forms["yes"])
        verdicts = []
        for lps in self.continuation_logprobs(batch, conts):
            l_yes, l_no = _logsumexp(lps[:n_yes]), _logsumexp(lps[n_yes:])
            l_all = _logsumexp([l_yes, l_no])
            p_yes = math.exp(l_yes - l_all)
            mass = min(1.0, math.exp(l_all))
            answer = json.dumps({"label": "yes" if p_yes >= 0.5 else "no", "p_yes": round(p_yes, 4),
                                 "label_mass": round(mass, 4)})
            if mass < self.config.min_label_mass:
                verdicts.append(Verdict(None, answer, error=f"the model put {mass:.2%} of its probability on "
                                        f"yes/no (min_label_mass {self.config.min_label_mass})"))
            else:
                verdicts.append(Verdict(p_yes, answer))
        return verdicts

    def _generate(self, batch: list[list[int]]) -> list[Verdict]:
        import torch
        from transformers import GenerationConfig

        # A fresh config: the model's own may sample or carry a repetition penalty (Qwen's does).
        eos = self.lm.generation_config.eos_token_id or self.tokenizer.eos_token_id
        gen = GenerationConfig(do_sample=False, max_new_tokens=self.config.max_new_tokens,
                               pad_token_id=self.pad_id, eos_token_id=eos)
        input_ids, mask = self._pad(batch)
        with torch.inference_mode():
            out = self.lm.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen)
        texts = self.tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        return [verdict_from_text(t) for t in texts]


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    if m == -math.inf:
        return m
    return m + math.log(sum(math.exp(x - m) for x in xs))
