"""GPU readiness check: every GPU figure of the project in one run of at most ~8 minutes on one GPU.

    python benchmarks/gpu_check.py --out DIR [--audio DIR]     # on a GPU machine
    python benchmarks/gpu_check.py --out DIR --dry-run         # the same code on CPU, tiny sizes (~2 min)
    python benchmarks/gpu_check.py --make-audio DIR            # only write the test audio (needs espeak-ng)

No hub is reachable, so the models are built here with RANDOM weights at the real sizes: speed
and memory only, never accuracy. Sections (each one's failure is recorded and the others go on):

* diarization  pyannote community-1 architecture (PyanNet + WeSpeaker ResNet34 + PLDA), one long file
* asr          openai-whisper at large-v3 dims, fp16, batch 16 (10 s items; decoding capped at
               ~3 tokens/s of audio, a trained model's rate on speech, since random weights never stop)
* whisperd     WhisperD = transformers Whisper at large-v2 dims with the [S1]/[S2] tokens, fp16 (20 s items)
* llm          the transformers classifier at Qwen2.5-0.5B dims (one scoring pass per 300 s recording's
               prompt); the vLLM classifier at Qwen2.5-7B dims (vLLM's dummy weights) only where vLLM
               is installed, else listed under not_measured
* dnsmos       DNSMOS P.835 on onnxruntime's CUDA provider where it exists (else its CPU provider, said so)
* pipeline     the whole pipeline on generated dialogues with configs/opendialog.yaml's stages and
               resources (four GPU stages of >= 1 worker on ONE GPU: the runner shares it), random
               real-size models, a classifier rigged to say yes and the transcript rules off (random
               text would stop every recording before the last stages)
* zipvoice     ZipVoice-Dialog generation RTF, 16 steps, bf16 and fp16 (a 10 s dialogue after a
               3 s prompt, vocoder excluded); ZipVoice-Dialog-Distill at 4/8 steps where its model code exists
* train        one trainer step (model.train.training_step) at a 500 s bf16 batch, with peak memory

Figures are written to DIR/gpu_check.json (``figures``: name -> number; ``not_measured``: name ->
why; ``info``) and printed as a table at the end. ``audio_h_per_gpu_h`` is audio hours per hour of
one whole GPU (1 / RTF for a stage that has the GPU to itself); in a dry run it is per CPU process
hour. Nothing is installed at run time. Where espeak-ng is missing (a bare GPU machine), pass
``--audio`` with a folder written beforehand by ``--make-audio`` (benchmarks/gpu_check.sh does this).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

SR = 16000
LONG_FILE = "dialogue_long.flac"
# openai-whisper dims: n_mels, width, heads, layers, vocabulary ("test": the suite's tiny model)
WHISPER_DIMS = {"test": (80, 64, 2, 1, 51865), "large-v2": (80, 1280, 20, 32, 51865),
                "large-v3": (128, 1280, 20, 32, 51866)}
# Qwen2 dims: hidden, layers, heads, kv heads, ffn, vocabulary
QWEN_DIMS = {"test": (32, 2, 4, 2, 64, 1000), "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936),
             "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064)}
RECORDING_S = 300.0  # each classifier prompt stands for a 300 s recording (its transcript fills max_chars)


@dataclass(frozen=True)
class Sizes:
    long_s: float  # generated dialogue all sections cut their audio from
    diar_s: float
    asr_items: int
    item_s: float
    whisperd_items: int
    whisperd_item_s: float
    llm_rows: int
    dnsmos_s: float
    e2e_files: int
    e2e_file_s: float
    whisper: str
    whisperd: str
    pyannote: str
    lm: str
    vllm_lm: str
    zipvoice: str  # configs/model/zipvoice_<x>.json
    gen_target_s: float
    train_batch: int
    train_utt_s: float
    train_steps: int
    repeats: int  # timed runs of each generation setting (the best counts)


GPU = Sizes(long_s=300, diar_s=600, asr_items=64, item_s=10, whisperd_items=48, whisperd_item_s=20, llm_rows=64,
            dnsmos_s=600, e2e_files=10, e2e_file_s=60, whisper="large-v3", whisperd="large-v2", pyannote="full",
            lm="qwen2.5-0.5b", vllm_lm="qwen2.5-7b", zipvoice="base", gen_target_s=10, train_batch=50,
            train_utt_s=10, train_steps=3, repeats=3)
DRY = Sizes(long_s=40, diar_s=20, asr_items=2, item_s=5, whisperd_items=2, whisperd_item_s=5, llm_rows=4,
            dnsmos_s=20, e2e_files=2, e2e_file_s=20, whisper="test", whisperd="test", pyannote="tiny",
            lm="test", vllm_lm="test", zipvoice="tiny", gen_target_s=1, train_batch=2, train_utt_s=2,
            train_steps=1, repeats=1)

# Every figure a run writes; an OPTIONAL section's figures appear only where its software exists
# (else the section is under not_measured with the reason).
FIGURES = {
    "diarization": ["rtf", "audio_h_per_gpu_h", "audio_s"],
    "asr": ["rtf", "audio_h_per_gpu_h", "audio_s"],
    "whisperd": ["rtf", "audio_h_per_gpu_h", "audio_s"],
    "llm": ["s_per_recording", "audio_h_per_gpu_h"],
    "dnsmos": ["rtf", "audio_h_per_gpu_h", "audio_s"],
    "pipeline": ["wall_s", "audio_s", "audio_h_per_gpu_h", "kept_segments", "gpu_in_use_peak", "gpu_stages",
                 *[f"{s}.{k}" for s in ("diarization", "asr", "classification", "segments")
                   for k in ("rtf", "audio_h_per_worker_h")]],
    "zipvoice": ["rtf_16_bf16", "rtf_16_fp16", "parameters"],
    "train": ["step_s", "audio_s_per_s", "audio_h_per_gpu_h", "peak_gib", "batch_audio_s"],
    "recipe": ["audio_h_per_gpu_h"],
    "llm_vllm": ["s_per_recording", "audio_h_per_gpu_h"],
    "zipvoice_distill": ["rtf_4_bf16", "rtf_8_bf16"],
}
OPTIONAL = {"llm_vllm", "zipvoice_distill"}


# ----------------------------------------------------------------------------- helpers


@dataclass
class Run:
    device: str
    sizes: Sizes
    work: Path
    audio_dir: Path
    deadline: float
    figures: dict = field(default_factory=dict)
    not_measured: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def put(self, section: str, **values) -> None:
        for k, v in values.items():
            self.figures[f"{section}.{k}"] = float(v)


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def sync(run: Run) -> None:
    if run.cuda:
        import torch

        torch.cuda.synchronize()


def free(run: Run) -> None:
    gc.collect()
    if run.cuda:
        import torch

        torch.cuda.empty_cache()


@contextlib.contextmanager
def timed(run: Run):
    """Wall seconds of the block, GPU work included: box[0] after the block."""
    box = [0.0]
    sync(run)
    t0 = time.perf_counter()
    yield box
    sync(run)
    box[0] = time.perf_counter() - t0


def peak_gib(run: Run) -> float:
    if run.cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def make_audio(out: Path, seconds: float) -> Path:
    """One generated two-speaker dialogue of ``seconds`` (espeak-ng voices): every section cuts its
    audio from it (turn-taking speech with pauses, so VAD, diarization and the rules see dialogue)."""
    import soundfile as sf

    from tools.synth import synth_long

    out.mkdir(parents=True, exist_ok=True)
    clip = synth_long(seconds, seed=7, kind="dialogue")
    sf.write(str(out / LONG_FILE), clip.audio, SR, subtype="PCM_16")
    return out / LONG_FILE


def load_audio(run: Run, seconds: float) -> np.ndarray:
    import soundfile as sf

    x, sr = sf.read(str(run.audio_dir / LONG_FILE), dtype="float32")
    if sr != SR:
        raise ValueError(f"{run.audio_dir / LONG_FILE}: {sr} Hz, expected {SR}")
    n = int(seconds * SR)
    if len(x) < n:  # loop a shorter file (written for a smaller size)
        x = np.tile(x, n // len(x) + 1)
    return np.ascontiguousarray(x[:n])


def write_wav(path: Path, audio: np.ndarray) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, SR, subtype="PCM_16")
    return path


def items(run: Run, n: int, seconds: float) -> list[np.ndarray]:
    x = load_audio(run, n * seconds)
    step = int(seconds * SR)
    return [np.ascontiguousarray(x[i * step:(i + 1) * step]) for i in range(n)]


def token_cap(seconds: float) -> int:
    return max(1, int(round(3.0 * seconds)))


# ----------------------------------------------------------------------------- model builders


def build_whisper(run: Run, size: str) -> str:
    from test_asr import make_whisper_checkpoint

    path = run.work / f"whisper-{size}.pt"
    if not path.exists():
        n_mels, width, heads, layers, vocab = WHISPER_DIMS[size]
        make_whisper_checkpoint(path, n_mels=n_mels, n_state=width, n_head=heads, n_layer=layers, n_vocab=vocab,
                                half=width >= 1024)
    return str(path)


def build_whisperd(run: Run, size: str) -> str:
    """A transformers Whisper with [S1]/[S2] in its vocabulary (like jordand/whisper-d-v1a), its
    generation held to the tags and a few words so random weights still write tagged text."""
    from test_asr import make_hf_whisper_dir
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    path = run.work / f"whisperd-{size}"
    if path.exists():
        return str(path)
    n_mels, width, heads, layers, vocab = WHISPER_DIMS[size]
    make_hf_whisper_dir(path, d_model=width, layers=layers, heads=heads, ffn=4 * width, num_mel_bins=n_mels,
                        vocab_size=vocab, half=width >= 1024)
    processor = WhisperProcessor.from_pretrained(path, local_files_only=True)
    tok = processor.tokenizer
    tok.add_tokens(["[S1]", "[S2]"])
    model = WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True)
    model.resize_token_embeddings(len(tok))
    s1 = tok.convert_tokens_to_ids("[S1]")
    allowed = {tok.convert_tokens_to_ids(t) for t in ["[S1]", "[S2]", "Ġthe", "Ġan", "Ġin", "<|endoftext|>"]}
    # End-of-text stays allowed: the backend decodes again when a window never ends.
    model.generation_config.suppress_tokens = [i for i in range(len(tok)) if i not in allowed]
    model.generation_config.begin_suppress_tokens = [i for i in range(len(tok)) if i != s1]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def build_lm(run: Run, size: str, rig: str | None = None, weights: bool = True) -> str:
    """The suite's chat tokenizer with a random Qwen2 of ``size`` (``rig``: the tiny model that always
    answers that word; ``weights=False``: config and tokenizer only, for vLLM's dummy weights)."""
    import torch
    from test_classification import build_tiny_lm
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.backends.llm.base import system_prompt

    path = run.work / f"lm-{size}{'-' + rig if rig else ''}{'' if weights else '-config'}"
    if path.exists():
        return str(path)
    build_tiny_lm(path, [system_prompt("json"), system_prompt("label"), " ".join(TRANSCRIPT_WORDS)] * 20, rig=rig)
    if size != "test":
        hidden, layers, heads, kv, ffn, vocab = QWEN_DIMS[size]
        cfg = Qwen2Config.from_pretrained(path)
        cfg.update(dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=32768,
                        torch_dtype="bfloat16"))
        for f in path.glob("model*.safetensors"):
            f.unlink()
        if weights:
            with torch.device("cuda" if run.cuda else "cpu"):
                model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
            model.save_pretrained(path)
            del model
        else:
            cfg.save_pretrained(path)
    return str(path)


TRANSCRIPT_WORDS = (
    "so what did you think of the match last night honestly I could not believe the ending we were "
    "sure it would go to extra time and then that goal in the last minute right my brother was "
    "shouting at the screen the whole evening anyway are you coming on Sunday I think so if the "
    "weather holds we could take the train and walk from the station that sounds good to me"
).split()


def llm_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows with a 300 s recording's speaker-attributed transcript (about 2.5 words/s of speech)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        utts, t = [], 0.0
        while t < RECORDING_S - 5:
            d = float(rng.uniform(2, 8))
            words = rng.choice(TRANSCRIPT_WORDS, size=max(1, int(2.5 * d)))
            utts.append({"start": t, "end": t + d, "speaker": "AB"[len(utts) % 2], "text": " ".join(words),
                         "language": "en", "confidence": 0.9})
            t += d + 0.3
        rows.append({"recording_id": f"r{i}", "duration": RECORDING_S, "status": "ok", "reason": None,
                     "turns": [{k: u[k] for k in ("start", "end", "speaker")} for u in utts], "utterances": utts})
    return rows


# ----------------------------------------------------------------------------- sections


def section_diarization(run: Run) -> None:
    import torch

    from pipeline.backends.diarization.pyannote import PyannoteDiarizer, PyannoteOptions
    from tools.pyannote_random import write_random_pipeline

    s = run.sizes
    pdir = write_random_pipeline(run.work / f"pyannote-{s.pyannote}", size=s.pyannote)
    path = write_wav(run.work / "diar.wav", load_audio(run, s.diar_s))
    d = PyannoteDiarizer(PyannoteOptions(model=str(pdir), batch_size=32), device=run.device,
                         num_threads=torch.get_num_threads())
    d.diarize(str(path), [], min(s.diar_s, 30.0))  # warm-up: kernels, first allocations
    with timed(run) as t:
        d.diarize(str(path), [], s.diar_s)
    run.put("diarization", rtf=t[0] / s.diar_s, audio_h_per_gpu_h=s.diar_s / t[0], audio_s=s.diar_s)
    run.info["diarization"] = f"pyannote community-1 architecture ({s.pyannote} size), random weights, batch 32"


def _asr_rtf(run: Run, section: str, backend: str, options: dict, audio: list[np.ndarray]) -> None:
    from bench_asr import rtf

    wall, audio_s = rtf(backend, options, audio, run.device, _threads())
    run.put(section, rtf=wall / audio_s, audio_h_per_gpu_h=audio_s / wall, audio_s=audio_s)


# One line per ASR backend timed at its real size: (section, backend, builder of its options).
# A faster-whisper backend adds ("asr_faster_whisper", "faster-whisper", <its random large-v3 builder>)
# here and its figure names to FIGURES.
ASR_ENTRIES: list[tuple[str, str, Callable[[Run], dict]]] = [
    ("asr", "whisper", lambda run: {"model": build_whisper(run, run.sizes.whisper), "batch_size": 16,
                                    "fp16": True, "max_new_tokens": token_cap(run.sizes.item_s)}),
]


def section_asr(run: Run) -> None:
    s = run.sizes
    audio = items(run, s.asr_items, s.item_s)
    for section, backend, options in ASR_ENTRIES:
        _asr_rtf(run, section, backend, options(run), audio)
        run.info[section] = f"{backend} at {s.whisper} dims, random weights, batch 16, {s.item_s:g} s items, " \
                            f"<= {token_cap(s.item_s)} tokens/item"
        free(run)


def section_whisperd(run: Run) -> None:
    s = run.sizes
    path = build_whisperd(run, s.whisperd)
    _asr_rtf(run, "whisperd", "hf-whisper",
             {"model": path, "batch_size": 16, "fp16": True, "max_new_tokens": token_cap(s.whisperd_item_s) + 8},
             items(run, s.whisperd_items, s.whisperd_item_s))
    run.info["whisperd"] = f"hf-whisper (the WhisperD path) at {s.whisperd} dims + [S1]/[S2], random weights, " \
                           f"batch 16, {s.whisperd_item_s:g} s items"


def _classify_rate(run: Run, section: str, clf, rows: list[dict]) -> None:
    clf.classify(rows[:1])  # warm-up
    with timed(run) as t:
        verdicts = clf.classify(rows)
    if len(verdicts) != len(rows):
        raise RuntimeError(f"{len(verdicts)} verdicts for {len(rows)} rows")
    per = t[0] / len(rows)
    run.put(section, s_per_recording=per, audio_h_per_gpu_h=RECORDING_S / per)


def section_llm(run: Run) -> None:
    from pipeline.backends.llm.transformers import TransformersClassifier, TransformersOptions

    s = run.sizes
    path = build_lm(run, s.lm)
    clf = TransformersClassifier(TransformersOptions(model=path, batch_size=16, min_label_mass=0.0),
                                 device=run.device)
    _classify_rate(run, "llm", clf, llm_rows(s.llm_rows))
    run.info["llm"] = f"transformers classifier, Qwen2 at {s.lm} dims, random weights, yes/no scoring, " \
                      f"batch 16, one prompt per {RECORDING_S:g} s recording"


def section_llm_vllm(run: Run) -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed here: the Qwen2.5-7B-sized vLLM classifier is not measured"
    if not run.cuda:
        return "vLLM needs a GPU"
    import vllm

    from pipeline.backends.llm.vllm import VllmClassifier, VllmOptions

    s = run.sizes
    path = build_lm(run, s.vllm_lm, weights=False)
    cfg = VllmOptions(model=path, max_model_len=8192, gpu_memory_utilization=0.85, dtype="bfloat16")
    llm = vllm.LLM(model=path, load_format="dummy", max_model_len=cfg.max_model_len,
                   gpu_memory_utilization=cfg.gpu_memory_utilization, dtype=cfg.dtype)
    _classify_rate(run, "llm_vllm", VllmClassifier(cfg, llm=llm), llm_rows(max(s.llm_rows, 256)))
    run.info["llm_vllm"] = f"vLLM {vllm.__version__}, Qwen2 at {s.vllm_lm} dims (dummy weights), guided JSON"
    del llm
    return None


def section_dnsmos(run: Run) -> None:
    import onnxruntime as ort

    from filters.dnsmos import DNSMOS

    s = run.sizes
    cuda = run.cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    x = load_audio(run, s.dnsmos_s)
    clips = [x[i:i + 20 * SR] for i in range(0, len(x) - 5 * SR, 20 * SR)]  # segment-sized clips
    dn = DNSMOS(providers=providers, num_threads=_threads())
    dn.score_batch(clips[:1])
    with timed(run) as t:
        dn.score_batch(clips)
    audio_s = sum(len(c) for c in clips) / SR
    run.put("dnsmos", rtf=t[0] / audio_s, audio_h_per_gpu_h=audio_s / t[0], audio_s=audio_s)
    run.info["dnsmos"] = (f"onnxruntime {ort.__version__}, {providers[0]}"
                          + ("" if cuda or not run.cuda else " (no CUDA provider in this onnxruntime: CPU figure, "
                                                             f"{_threads()} threads)"))


def e2e_config(run: Run, out: Path, logical_gpu: bool) -> dict:
    """configs/opendialog.yaml's stages and resources, every model swapped for a local random one."""
    import yaml

    s = run.sizes
    raw = yaml.safe_load((ROOT / "configs" / "opendialog.yaml").read_text())
    st = raw["stages"]
    st["diarization"]["pyannote"]["model"] = str(
        __import__("tools.pyannote_random", fromlist=["x"]).write_random_pipeline(
            run.work / f"pyannote-{s.pyannote}", size=s.pyannote))
    st["asr"].update(language_id="fixed", language="en", languages=["en"], backends={"en": "whisper", "default": "whisper"})
    st["asr"]["whisper"] = {"model": build_whisper(run, s.whisper), "batch_size": 16, "fp16": True,
                            "max_new_tokens": token_cap(30.0 if run.cuda else s.item_s)}
    st["asr"].pop("funasr", None)
    st["classification"].update(backend="transformers", prefilter=False)
    st["classification"].pop("vllm", None)
    st["classification"]["transformers"] = {"model": build_lm(run, "test", rig="yes")}
    st["segments"]["whisperd"].update(models={"en": build_whisperd(run, s.whisperd)}, processor=None,
                                      max_new_tokens=token_cap(30.0 if run.cuda else s.item_s))
    st["rules"] = {r: {"enabled": False} for r in
                   ("turns", "script", "word_count", "repetition", "word_length", "hallucination", "agreement")}
    st["quality"]["min_ovrl"] = 1.0
    ray = {"num_gpus": 1} if logical_gpu else {}
    return {"run": {"output": str(out), "progress": False, "report": {"enabled": False}, "ray": ray},
            "stages": st}


def section_pipeline(run: Run) -> None:
    import ray

    from pipeline import report
    from pipeline.config import parse_config
    from pipeline.runner import run_pipeline

    s = run.sizes
    src = run.work / "e2e_in"
    x = load_audio(run, s.e2e_files * s.e2e_file_s)
    step = int(s.e2e_file_s * SR)
    for i in range(s.e2e_files):
        write_wav(src / f"dialogue{i:02d}.wav", x[i * step:(i + 1) * step])
    out = run.work / "e2e_out"
    # A CPU-only dry run gives Ray one LOGICAL GPU: the scheduling is the single-GPU machine's.
    cfg = parse_config(e2e_config(run, out, logical_gpu=not run.cuda))
    if ray.is_initialized():
        ray.shutdown()
    # How much GPU the stages hold at once, sampled while the pipeline runs.
    peak, done = [0.0], threading.Event()

    def watch():
        while not done.wait(0.2):
            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    total = ray.cluster_resources().get("GPU", 0.0)
                    peak[0] = max(peak[0], total - ray.available_resources().get("GPU", 0.0))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with timed(run) as t:
            res = run_pipeline(cfg, src)
    finally:
        done.set()
        watcher.join()
        ray.shutdown()
    ledger = res.ledger.to_pylist()
    kept = sum(r["kept_segments"] or 0 for r in ledger)
    if not all(r["status"] == "kept" for r in ledger):
        raise RuntimeError("not every generated dialogue was kept: "
                           + "; ".join(f"{r['recording_id']} {r['status']} at {r['stage']}: {r['reason']}"
                                       for r in ledger if r["status"] != "kept"))
    costs = {c["stage"]: c for c in report.stage_costs(res.output)}
    audio_s = s.e2e_files * s.e2e_file_s
    figs = dict(wall_s=t[0], audio_s=audio_s, audio_h_per_gpu_h=audio_s / t[0], kept_segments=kept,
                gpu_in_use_peak=peak[0], gpu_stages=sum(spec.resources.num_gpus > 0 for spec in cfg.stages))
    for name in ("diarization", "asr", "classification", "segments"):
        c = costs[name]
        figs[f"{name}.rtf"] = c["rtf"]
        figs[f"{name}.audio_h_per_worker_h"] = c["audio_hours_per_worker_hour"]
    run.put("pipeline", **figs)
    run.info["pipeline"] = (f"{s.e2e_files} generated dialogues x {s.e2e_file_s:g} s through all nine stages on "
                            f"{'one GPU' if run.cuda else 'one logical GPU (CPU)'}; wall time includes Ray "
                            "start and model loading")


def _zipvoice(run: Run, variant: str):
    import torch

    from bench_train import token_table
    from model.checkpoint import build_model, read_model_config

    torch.manual_seed(0)
    cfg = read_model_config(ROOT / "configs" / "model" / f"zipvoice_{run.sizes.zipvoice}.json")
    return build_model(variant, cfg, token_table()).to(run.device).eval()


def section_zipvoice(run: Run) -> None:
    import torch

    from bench_model import generation_seconds
    from model.zipvoice import num_parameters

    s = run.sizes
    model = _zipvoice(run, "zipvoice_dialog")
    model.set_attention_backend("sdpa")
    if run.cuda:  # warm-up: kernels, allocator
        generation_seconds(model, run.device, 16, torch.bfloat16, target_seconds=s.gen_target_s)
    figs = {"parameters": num_parameters(model)}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        secs = generation_seconds(model, run.device, 16, dtype, target_seconds=s.gen_target_s, repeats=s.repeats)
        figs[f"rtf_16_{name}"] = secs / s.gen_target_s
    run.put("zipvoice", **figs)
    run.info["zipvoice"] = f"ZipVoice-Dialog ({s.zipvoice} config), {s.gen_target_s:g} s after a 3 s prompt, " \
                           "16 Euler steps with CFG, SDPA attention, vocoder excluded (paper: RTF 0.063)"


def section_zipvoice_distill(run: Run) -> str | None:
    import torch

    from bench_model import generation_seconds
    from model.zipvoice import MODEL_CLASSES

    variants = [v for v in MODEL_CLASSES if "distill" in v and "dialog" in v]
    if not variants:
        return "no ZipVoice-Dialog-Distill model code in model/ (model.zipvoice.MODEL_CLASSES)"
    s = run.sizes
    model = _zipvoice(run, variants[0])
    if run.cuda:
        generation_seconds(model, run.device, 4, torch.bfloat16, target_seconds=s.gen_target_s)
    figs = {f"rtf_{n}_bf16": generation_seconds(model, run.device, n, torch.bfloat16,
                                                target_seconds=s.gen_target_s, repeats=s.repeats) / s.gen_target_s
            for n in (4, 8)}
    run.put("zipvoice_distill", **figs)
    return None


def section_train(run: Run) -> None:
    import torch

    from bench_train import make_batch, token_table
    from model.optim import FixedLR, ScaledAdam
    from model.train import training_step

    s = run.sizes
    device = torch.device(run.device)
    model = _zipvoice(run, "zipvoice_dialog").train()
    model.set_attention_backend("sdpa")
    optimizer = ScaledAdam(model.parameters(), lr=1e-4)
    FixedLR(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    tokens, feats, lens = make_batch(s.train_batch, s.train_utt_s, token_table())
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(s.train_steps + 1):  # the first step warms up (allocator, kernels, optimizer state)
        with timed(run) as t:
            out = training_step(model, optimizer, scaler, tokens, feats, lens, device=device, precision="bf16",
                                condition_drop_ratio=0.2)
            float(out["loss"])
        if i:
            times.append(t[0])
    step = sorted(times)[len(times) // 2]
    audio = s.train_batch * s.train_utt_s
    run.put("train", step_s=step, audio_s_per_s=audio / step, audio_h_per_gpu_h=audio / step,
            peak_gib=peak_gib(run), batch_audio_s=audio)
    run.info["train"] = f"model.train.training_step, ZipVoice-Dialog ({s.zipvoice} config), bf16, " \
                        f"{s.train_batch} x {s.train_utt_s:g} s, ScaledAdam; median of {s.train_steps} after a warm-up"


def recipe(run: Run) -> None:
    """The paper's GPU stages one after another on one GPU: 1 / sum of their GPU hours per audio hour
    (the classifier is the vLLM one where measured, else the transformers one)."""
    llm = "llm_vllm" if "llm_vllm.audio_h_per_gpu_h" in run.figures else "llm"
    stages = ["diarization", "asr", llm, "whisperd"]
    rates = [run.figures.get(f"{k}.audio_h_per_gpu_h") for k in stages]
    if any(r is None or not r > 0 for r in rates):
        missing = [k for k, r in zip(stages, rates) if r is None]
        run.not_measured["recipe"] = f"needs every GPU stage's figure (missing: {', '.join(missing)})"
        return
    run.put("recipe", audio_h_per_gpu_h=1.0 / sum(1.0 / r for r in rates))
    run.info["recipe"] = f"sequential GPU hours of {', '.join(stages)} (anchors: Sommelier ~22.6 per A100-hour, " \
                         "Emilia-Pipe ~19 per GPU-hour)"


SECTIONS: list[tuple[str, Callable[[Run], str | None], float]] = [
    # name, function (returns a reason when it cannot run here), seconds it needs at GPU size;
    # most wanted first: a section that no longer fits the budget is skipped and listed
    ("zipvoice", section_zipvoice, 30),
    ("train", section_train, 45),
    ("diarization", section_diarization, 40),
    ("asr", section_asr, 90),
    ("whisperd", section_whisperd, 90),
    ("pipeline", section_pipeline, 150),
    ("llm", section_llm, 40),
    ("dnsmos", section_dnsmos, 30),
    ("zipvoice_distill", section_zipvoice_distill, 20),
    ("llm_vllm", section_llm_vllm, 120),
]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def run_check(run: Run, only: list[str] | None = None) -> None:
    for name, fn, need in SECTIONS:
        if only and name not in only:
            continue
        left = run.deadline - time.monotonic()
        if left < need * (0.1 if run.device == "cpu" else 1.0):
            run.not_measured[name] = f"skipped: {left:.0f} s of the time budget left, the section needs ~{need:.0f} s"
            say(run.not_measured[name])
            continue
        say(f"{name} ...")
        t0 = time.perf_counter()
        if run.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        try:
            why = fn(run)
            if why:
                run.not_measured[name] = why
                say(f"{name}: not measured: {why}")
        except Exception as e:  # noqa: BLE001 - one section failing must not hide the others' figures
            run.not_measured[name] = f"failed: {type(e).__name__}: {str(e)[:400]}"
            say(f"{name} FAILED:\n{traceback.format_exc(limit=6)}")
        else:
            if not why:
                say(f"{name}: {time.perf_counter() - t0:.1f} s")
        free(run)
    if not only:
        recipe(run)


def environment(run: Run) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": run.device,
           "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2), "torch_threads": _threads()}
    if run.cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    for mod in ("ray", "pyannote.audio", "whisper", "transformers", "onnxruntime", "vllm"):
        try:
            env[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:  # noqa: BLE001 - missing or broken: say which
            env[mod] = f"unavailable ({type(e).__name__})"
    return env


def print_table(result: dict) -> None:
    print("\n== gpu_check figures ==")
    for k, v in result["figures"].items():
        print(f"{k:<42} {v:>14.6g}")
    for k, why in result["not_measured"].items():
        print(f"{k:<42} not measured: {why}")
    print(f"device: {result['environment'].get('gpu', result['environment']['device'])}; "
          f"total {result['seconds']:.0f} s; json: {result['json']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: tests that every section runs")
    ap.add_argument("--audio", type=Path, help=f"folder with {LONG_FILE} (from --make-audio); default: generate")
    ap.add_argument("--make-audio", type=Path, metavar="DIR", help="only write the test audio to DIR and exit")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all sections (default 480 on GPU, 600 in a dry run); a section that "
                         "needs more than is left is skipped and listed")
    ap.add_argument("--only", nargs="*", help="run only these sections")
    args = ap.parse_args(argv)
    if args.make_audio:
        say(f"wrote {make_audio(args.make_audio, GPU.long_s)}")
        return 0
    if not args.out:
        ap.error("--out is required")
    import torch

    t_start = time.monotonic()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        say("CUDA is not available: running at GPU sizes on the CPU would take hours; use --dry-run")
        return 2
    sizes = DRY if args.dry_run else GPU
    if args.dry_run:  # tiny models: a second intra-op thread only adds spin-waits on a shared machine
        torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (600.0 if args.dry_run else 480.0)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        audio_dir = args.audio
        if audio_dir is None or not (audio_dir / LONG_FILE).exists():
            if audio_dir is not None:
                say(f"{audio_dir / LONG_FILE} not found: generating the audio here")
            if shutil.which("espeak-ng") is None:
                say("espeak-ng is not installed: pass --audio DIR written by --make-audio on a machine with it")
                return 2
            audio_dir = work / "audio"
            make_audio(audio_dir, sizes.long_s)
        run = Run(device, sizes, work, audio_dir, t_start + budget)
        env = environment(run)
        say(json.dumps(env))
        run_check(run, args.only)
    result = {"environment": env, "dry_run": args.dry_run, "sizes": sizes.__dict__, "figures": run.figures,
              "not_measured": run.not_measured, "info": run.info, "seconds": time.monotonic() - t_start,
              "json": str(args.out / "gpu_check.json")}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    print_table(result)
    return 0 if all(math.isfinite(v) for v in run.figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
