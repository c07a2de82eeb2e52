"""ASR callables for WER/cpWER: ``asr(list of 16 kHz mono float arrays) -> list of transcripts``.

* ``WhisperASR``: any Whisper checkpoint through transformers; the paper scores English dialogues
  with WhisperD (``jordand/whisper-d-v1a``), a Whisper fine-tune that writes [S1]/[S2] turn tags.
* ``PocketsphinxASR``: offline US-English decoder whose model ships in the package (weak, but real).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WHISPER_D = "jordand/whisper-d-v1a"
SAMPLING_RATE = 16000


class WhisperASR:
    def __init__(self, model: str = WHISPER_D, device: str | None = None, language: str = "en", batch_size: int = 16):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

        local = Path(model).is_dir()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        try:
            processor = WhisperProcessor.from_pretrained(model, local_files_only=local)
            whisper = WhisperForConditionalGeneration.from_pretrained(model, dtype=dtype, local_files_only=local)
        except (OSError, ValueError) as err:  # ValueError: a missing path is an invalid hub id
            from pipeline.backends.hub import model_not_found

            raise model_not_found(
                model, "Whisper ASR",
                "pass a local directory holding a transformers Whisper checkpoint "
                "(e.g. a download of jordand/whisper-d-v1a), or --asr pocketsphinx",
                err,
            ) from err
        # WhisperD's speaker tags must not be suppressed, and the language/task come from generate().
        whisper.generation_config.suppress_tokens = None
        whisper.generation_config.forced_decoder_ids = None
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:  # batching needs a pad id
            tokenizer.pad_token_id = whisper.config.eos_token_id
        self.pipe = pipeline(
            "automatic-speech-recognition",
            model=whisper,
            tokenizer=tokenizer,
            feature_extractor=processor.feature_extractor,
            chunk_length_s=30,
            device=device,
            dtype=dtype,
        )
        self.language = language
        self.batch_size = batch_size

    def __call__(self, waves: list[np.ndarray]) -> list[str]:
        inputs = [{"raw": np.asarray(w, dtype=np.float32), "sampling_rate": SAMPLING_RATE} for w in waves]
        kwargs = {"task": "transcribe"}
        if self.language:
            kwargs["language"] = self.language
        outs = self.pipe(inputs, batch_size=self.batch_size, generate_kwargs=kwargs)
        return [o["text"].strip() for o in outs]


class PocketsphinxASR:
    def __init__(self):
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=SAMPLING_RATE, loglevel="ERROR")

    def __call__(self, waves: list[np.ndarray]) -> list[str]:
        out = []
        for w in waves:
            pcm = (np.clip(np.asarray(w, dtype=np.float32), -1, 1) * 32767).astype(np.int16).tobytes()
            self.decoder.start_utt()
            self.decoder.process_raw(pcm, full_utt=True)
            self.decoder.end_utt()
            hyp = self.decoder.hyp()
            out.append(hyp.hypstr if hyp is not None else "")
        return out


def load_asr(name: str = WHISPER_D, device: str | None = None, language: str = "en"):
    """"pocketsphinx", or a Whisper model (local directory or hub id)."""
    if name == "pocketsphinx":
        if language != "en":
            raise ValueError("pocketsphinx only ships an English model")
        return PocketsphinxASR()
    return WhisperASR(name, device=device, language=language)
