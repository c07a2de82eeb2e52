"""transformers Whisper (``WhisperForConditionalGeneration`` + ``WhisperProcessor``): batched
generation, language identification from the language-token logits, and the raw decoded
sequence with special tokens for fine-tunes such as WhisperD (``[S1]``/``[S2]`` speaker tags).

``model`` is a hub id (``openai/whisper-large-v3``, from the local hub cache or downloaded) or a
local directory written by ``save_pretrained``; ``processor`` (default: same as ``model``) names
the feature extractor + tokenizer, e.g. ``openai/whisper-large-v2`` for WhisperD.

Confidence = exp(mean log-probability of the generated tokens up to and including end-of-text)
with greedy decoding; with beam search exp(the beam's length-normalised score). 0..1.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.audio import ANALYSIS_SR
from pipeline.backends.asr.base import Transcript, as_float32, batches, looks_like_path
from pipeline.backends.hub import is_local, local_path, model_not_found


class HfWhisperOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("openai/whisper-large-v3", description="hub id or local save_pretrained directory")
    processor: str | None = Field(None, description="processor hub id or directory (default: model)")
    batch_size: int = Field(8, ge=1, description="30 s windows per generate() call")
    beam_size: int = Field(1, ge=1, description="1 = greedy decoding")
    fp16: bool = Field(True, description="half precision on GPU (CPU always runs float32)")
    max_new_tokens: int | None = Field(None, ge=1, description="generated tokens per window (default: the model's generation config)")


class HfWhisperBackend:
    name = "hf-whisper"
    Options = HfWhisperOptions
    max_seconds = 30.0
    can_identify_language = True
    word_timestamps = False

    def __init__(self, options: HfWhisperOptions, device: str = "cpu", num_threads: int = 1):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.options = options
        self.device = device
        self.dtype = torch.float16 if options.fp16 and device == "cuda" else torch.float32
        how = "set stages.asr.hf_whisper.{} to a local directory (save_pretrained)"
        self.model = _load(WhisperForConditionalGeneration, options.model, "transformers Whisper",
                           how.format("model"), dtype=self.dtype)
        self.model.to(device).eval()
        self.processor = _load(WhisperProcessor, options.processor or options.model, "Whisper processor",
                               how.format("processor"))
        self.tokenizer = self.processor.tokenizer
        gen = self.model.generation_config
        self.eos = gen.eos_token_id if isinstance(gen.eos_token_id, int) else gen.eos_token_id[0]
        self.sot = gen.decoder_start_token_id
        self.lang_ids = {tok.strip("<|>"): i for tok, i in (getattr(gen, "lang_to_id", None) or {}).items()}
        self.can_identify_language = bool(self.lang_ids)

    def features(self, audios: list[np.ndarray]):
        """Log-mel input features of a list of <= 30 s arrays, on the model's device and dtype."""
        xs = [as_float32(a) for a in audios]
        for x in xs:
            if len(x) > self.max_seconds * ANALYSIS_SR + 1:
                raise ValueError(f"hf-whisper: {len(x) / ANALYSIS_SR:.1f} s item exceeds its 30 s window")
        feats = self.processor.feature_extractor(xs, sampling_rate=ANALYSIS_SR, return_tensors="pt")
        return feats.input_features.to(self.device, self.dtype)

    def detect_language(self, audios: list[np.ndarray]) -> list[dict[str, float]]:
        import torch

        if not self.lang_ids:
            raise NotImplementedError(f"hf-whisper model {self.options.model!r} has no lang_to_id in its generation config")
        codes, ids = list(self.lang_ids), list(self.lang_ids.values())
        out: list[dict[str, float]] = []
        with torch.no_grad():
            for idx in batches(len(audios), self.options.batch_size):
                feats = self.features([audios[i] for i in idx])
                start = torch.full((len(idx), 1), self.sot, dtype=torch.long, device=self.device)
                logits = self.model(input_features=feats, decoder_input_ids=start, use_cache=False).logits[:, -1]
                probs = logits[:, ids].float().softmax(-1).cpu().numpy()
                out += [dict(zip(codes, map(float, p))) for p in probs]
        return out

    def generate(self, audios: list[np.ndarray], language: str | None = None, **generate_kwargs):
        """``model.generate`` on one batch: returns (token sequences incl. the decoder prompt,
        per-item log-probability score or None). Extra kwargs go to generate (e.g. prompt_ids)."""
        import torch

        kw = dict(task="transcribe", num_beams=self.options.beam_size, return_dict_in_generate=True,
                  output_scores=True)
        if language is not None and self.lang_ids:
            kw["language"] = language
        if self.options.max_new_tokens:
            kw["max_new_tokens"] = self.options.max_new_tokens
        kw.update(generate_kwargs)
        with torch.no_grad():
            out = self.model.generate(input_features=self.features(audios), **kw)
        seqs = out.sequences
        scores = [None] * len(audios)
        if getattr(out, "sequences_scores", None) is not None:  # beam search
            scores = [float(s) for s in out.sequences_scores]
        elif getattr(out, "scores", None):
            step = self.model.compute_transition_scores(seqs, out.scores, normalize_logits=True).float().cpu()
            gen = seqs[:, -step.shape[1]:].cpu()
            for i in range(len(audios)):
                # Count tokens up to the first end-of-text; the rest is padding.
                ends = (gen[i] == self.eos).nonzero()
                n = int(ends[0]) + 1 if len(ends) else gen.shape[1]
                lp = step[i, :n]
                lp = lp[torch.isfinite(lp)]
                scores[i] = float(lp.mean()) if len(lp) else None
        return seqs.cpu(), scores

    def transcribe(self, audios: list[np.ndarray], language: str | None = None) -> list[Transcript]:
        out: list[Transcript] = []
        for idx in batches(len(audios), self.options.batch_size):
            seqs, scores = self.generate([audios[i] for i in idx], language)
            for seq, score in zip(seqs.tolist(), scores):
                seq = _until_eos(seq, self.eos, self.sot)
                text = self.tokenizer.decode(seq, skip_special_tokens=True).strip()
                raw = self.tokenizer.decode(seq, skip_special_tokens=False)
                out.append(Transcript(text, float(np.exp(score)) if score is not None else None, raw))
        return out


def _until_eos(seq: list[int], eos: int, sot: int) -> list[int]:
    """Tokens up to and including the first end-of-text after the start of transcript."""
    start = seq.index(sot) if sot in seq else 0
    try:
        return seq[: seq.index(eos, start + 1) + 1]
    except ValueError:
        return seq


def _load(cls, ref: str, what: str, how: str, **kwargs):
    if is_local(ref):
        return cls.from_pretrained(local_path(ref), local_files_only=True, **kwargs)
    if looks_like_path(ref):
        raise model_not_found(ref, what, how)
    try:  # the local hub cache first, then the hub
        return cls.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as e:
        raise model_not_found(ref, what, how, e) from e
