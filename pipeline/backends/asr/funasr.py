"""FunASR Paraformer (Chinese in the paper's recipe) via ``funasr.AutoModel``.

``model`` is a local model directory (``config.yaml``, ``model.pt``, ``tokens.json``, ``am.mvn``,
as published) or a FunASR hub name such as ``paraformer-zh`` (``hub: ms`` ModelScope or
``hf``), which works only with hub access or a filled hub cache.

FunASR computes fbank features with torchaudio when it imports and with kaldi-native-fbank
otherwise. A torchaudio whose compiled libraries are broken fails with OSError instead of
ImportError, which FunASR does not catch: it is then hidden from FunASR (in this worker) so
that the kaldi-native-fbank path is taken.

Confidence = exp(mean over the predicted tokens of the decoder's best log-probability), i.e. the
geometric-mean probability of the greedy tokens, read from the decoder output. 0..1.

A model folder is data, never code: FunASR would import a Python file named by the folder's
config (``trust_remote_code``/``remote_code``); such a folder is refused and the option is forced
off for hub models too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipeline.audio import ANALYSIS_SR
from pipeline.backends.asr.base import Transcript, as_float32, looks_like_path
from pipeline.backends.hub import is_local, local_path, model_not_found


class FunAsrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("paraformer-zh", description="local model directory or FunASR hub name")
    hub: str = Field("ms", description="hub of a model name: 'ms' (ModelScope) or 'hf'")
    batch_size_s: float = Field(300.0, gt=0, description="seconds of audio per model call")
    fp16: bool = Field(False, description="half precision on GPU")


def hide_broken_torchaudio() -> bool:
    """Make ``import torchaudio`` raise ImportError when it would raise something else."""
    if "torchaudio" in sys.modules:
        return sys.modules["torchaudio"] is None
    try:
        import torchaudio  # noqa: F401
        import torchaudio.compliance.kaldi  # noqa: F401
    except ImportError:
        return False
    except Exception:  # OSError from missing/mismatched compiled libraries
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        sys.modules["torchaudio"] = None  # type: ignore[assignment]
        return True
    return False


def refuse_remote_code(folder: str | Path) -> None:
    """ValueError when a FunASR model folder's config asks to run code from the folder."""
    folder = Path(folder)
    configs = [folder / "config.yaml"]
    meta = folder / "configuration.json"
    if meta.is_file():
        try:
            conf = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{meta}: not valid JSON ({e})") from None
        configs.append(meta)
        if isinstance(conf, dict) and isinstance(conf.get("file_path_metas"), dict):
            name = conf["file_path_metas"].get("config")
            if isinstance(name, str):
                configs.append(folder / name)
    for f in configs:
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8")) if f.suffix == ".json" else yaml.safe_load(f.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise ValueError(f"{f}: cannot be read ({e})") from None
        if isinstance(cfg, dict) and (cfg.get("trust_remote_code") or cfg.get("remote_code")):
            raise ValueError(f"{f}: asks for trust_remote_code (running Python code from the model folder); "
                             "refused: use a model folder without it")


class FunAsrBackend:
    name = "funasr"
    Options = FunAsrOptions
    max_seconds = 60.0  # Paraformer has no fixed window; this bounds attention memory
    can_identify_language = False
    word_timestamps = False

    def __init__(self, options: FunAsrOptions, device: str = "cpu", num_threads: int = 1):
        self.options = options
        ref = options.model
        how = "set stages.asr.funasr.model to a local model directory (config.yaml, model.pt, tokens.json, am.mvn)"
        if not is_local(ref) and looks_like_path(ref):
            raise model_not_found(ref, "FunASR", how)
        if is_local(ref):
            refuse_remote_code(local_path(ref))
        hide_broken_torchaudio()
        from funasr import AutoModel

        kw = dict(device=device, ncpu=num_threads, disable_update=True, disable_pbar=True,
                  log_level="ERROR", fp16=options.fp16 and device == "cuda", trust_remote_code=False)
        if is_local(ref):
            self.model = AutoModel(model=local_path(ref), **kw)
        else:
            try:
                self.model = AutoModel(model=ref, hub=options.hub, **kw)
            except Exception as e:
                # A failed download is only printed; the error that follows ("model ... is not
                # registered") says nothing useful, so it is left out.
                raise model_not_found(ref, "FunASR", how + " (the hub download failed, see the log)") from e
        self._decoder_out: list = []
        # The decoder's output holds the token log-probabilities that AutoModel's results drop.
        self.model.model.decoder.register_forward_hook(self._keep_decoder_out)

    def _keep_decoder_out(self, module, args, output):
        logits = output[0] if isinstance(output, (tuple, list)) else output
        lengths = args[3] if len(args) > 3 else None
        self._decoder_out.append((logits.detach().float(), lengths))

    def transcribe(self, audios: list[np.ndarray], language: str | None = None) -> list[Transcript]:
        xs = [as_float32(a) for a in audios]
        out: list[Transcript | None] = [None] * len(xs)
        # Similar lengths share a batch: less padding.
        order = sorted(range(len(xs)), key=lambda i: len(xs[i]))
        batch: list[int] = []
        seconds = 0.0
        for i in order + [None]:
            dur = len(xs[i]) / ANALYSIS_SR if i is not None else 0.0
            if batch and (i is None or seconds + dur > self.options.batch_size_s):
                for j, t in zip(batch, self._run([xs[j] for j in batch])):
                    out[j] = t
                batch, seconds = [], 0.0
            if i is not None:
                batch.append(i)
                seconds += dur
        return out  # type: ignore[return-value]

    def _run(self, xs: list[np.ndarray]) -> list[Transcript]:
        import torch

        self._decoder_out.clear()
        res = self.model.generate(input=xs, batch_size=len(xs))
        texts = [str(r.get("text", "")).strip() for r in res]
        if len(texts) != len(xs):
            # FunASR returns a single empty result when no item of the batch has a token.
            if all(not t for t in texts):
                return [Transcript("", None, "") for _ in xs]
            raise RuntimeError(f"funasr returned {len(texts)} results for {len(xs)} inputs")
        confs: list[float | None] = [None] * len(xs)
        if len(self._decoder_out) == 1:
            logits, lengths = self._decoder_out[0]
            if lengths is not None and logits.shape[0] == len(xs):
                best = torch.log_softmax(logits, -1).max(-1).values
                for i in range(len(xs)):
                    n = int(lengths[i])
                    confs[i] = float(torch.exp(best[i, :n].mean())) if n > 0 else None
        return [Transcript(t, c if t else None, t) for t, c in zip(texts, confs)]

    def detect_language(self, audios: list[np.ndarray]) -> list[dict[str, float]]:
        raise NotImplementedError("funasr Paraformer has no language identification")
