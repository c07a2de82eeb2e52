"""Zero-shot dialogue (or monologue) generation from a prompt: `python -m model.infer ...`.

    python -m model.infer --checkpoint DIR --prompt-wav P.wav \
        --prompt-text "[S1] ... [S2] ..." --text "[S1] ... [S2] ..." --out x.wav

Front end of the reference dialog inference (fact sheet 6.4), unless --raw:
  1. shorten prompt silences longer than 1 s (-50 dBFS) to 1 s and trim edge silence to 0.1 s;
  2. append 0.2 s of silence so the prompt's last word does not leak into the generated speech;
  3. raise the prompt RMS to 0.1 if it is quieter, and scale the output back by rms / 0.1;
  4. add a final "." to prompt and target text when they lack final punctuation;
  5. split long dialogues at [S1] into chunks of <= 40 s with the prompt and join the chunk
     waveforms with a 0.1 s linear cross-fade.
Stereo models take a 2-channel prompt, or two mono prompts (--prompt-wav/--prompt-text for
speaker 1, --prompt-wav2/--prompt-text2 for speaker 2) placed on a 2-channel canvas: speaker 1 in
channel 0 first, then speaker 2 in channel 1. The inactive channel gets ambient noise
(--ambient-wav, or a faint synthetic noise floor when none is given: digital silence is out of
distribution for the stereo model, paper A.1.4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from model.checkpoint import LoadedModel, load_model
from model.features import FEAT_SCALE, VocosFbank, load_audio
from model.sampling import cross_fade, generate_long
from model.tokenizer import SPK_A_TOKEN, SPK_B_TOKEN, get_tokenizer
from model.vocoder import Vocoder, load_vocoder
from pipeline import clitools

SAMPLING_RATE = 24000
TARGET_RMS = 0.1
# (Euler steps, guidance scale) when not given. Distilled models take w as an input (no CFG pass)
# and need 4-8 steps; ZipVoice-Dialog-Distill keeps the dialog teacher's w = 1.5, a scale both
# distillation stages trained on, ZipVoice-Distill the reference's 3.0.
DEFAULT_SAMPLING = {"zipvoice": (16, 1.0), "zipvoice_distill": (8, 3.0)}
DIALOG_SAMPLING, DIALOG_DISTILL_SAMPLING = (16, 1.5), (8, 1.5)


def default_sampling(variant: str) -> tuple[int, float]:
    if variant in DEFAULT_SAMPLING:
        return DEFAULT_SAMPLING[variant]
    return DIALOG_DISTILL_SAMPLING if variant.endswith("_distill") else DIALOG_SAMPLING
FINAL_PUNCTUATION = set(".,!?;:…。，！？；：、")


# --------------------------------------------------------------------------------------------
# Front end (waveforms are (C, N) float32 arrays)
# --------------------------------------------------------------------------------------------


def _silent_frames(wave: np.ndarray, sr: int, threshold_db: float, frame: float = 0.01) -> np.ndarray:
    hop = max(1, int(sr * frame))
    mono = wave.mean(axis=0)
    n = len(mono) // hop
    rms = np.sqrt(np.mean(mono[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-20)
    return 20 * np.log10(rms) < threshold_db


def remove_long_silences(wave: np.ndarray, sr: int = SAMPLING_RATE, threshold_db: float = -50.0,
                         max_silence: float = 1.0) -> np.ndarray:
    """Shorten every silence longer than max_silence to max_silence (half kept at each end)."""
    hop = int(sr * 0.01)
    silent = _silent_frames(wave, sr, threshold_db)
    keep = np.ones(wave.shape[1], dtype=bool)
    max_frames = int(max_silence / 0.01)
    i = 0
    while i < len(silent):
        if not silent[i]:
            i += 1
            continue
        j = i
        while j < len(silent) and silent[j]:
            j += 1
        if j - i > max_frames:
            keep[(i + max_frames // 2) * hop: (j - max_frames // 2) * hop] = False
        i = j
    return wave[:, keep]


def trim_edge_silence(wave: np.ndarray, sr: int = SAMPLING_RATE, threshold_db: float = -50.0,
                      keep: float = 0.1) -> np.ndarray:
    """Cut leading/trailing silence down to `keep` seconds."""
    hop = int(sr * 0.01)
    loud = np.flatnonzero(~_silent_frames(wave, sr, threshold_db))
    if len(loud) == 0:
        return wave
    start = max(0, loud[0] * hop - int(keep * sr))
    end = min(wave.shape[1], (loud[-1] + 1) * hop + int(keep * sr))
    return wave[:, start:end]


def rms_normalise(wave: np.ndarray, target: float = TARGET_RMS) -> tuple[np.ndarray, float]:
    """Raise quiet prompts to `target` RMS; returns (wave, original RMS)."""
    rms = float(np.sqrt(np.mean(wave ** 2)))
    if 0.0 < rms < target:
        wave = wave * (target / rms)
    return wave, rms


def add_final_punctuation(text: str) -> str:
    text = text.rstrip()
    return text if text and text[-1] in FINAL_PUNCTUATION else text + "."


def stereo_canvas(wave1: np.ndarray, wave2: np.ndarray, ambient: np.ndarray | None = None,
                  seed: int = 0) -> np.ndarray:
    """(2, N1 + N2): speaker 1 in channel 0 over [0, N1), speaker 2 in channel 1 afterwards.

    The inactive channel carries ambient noise: the given recording looped, or a faint
    Gaussian floor (~-60 dBFS) when none is given.
    """
    n1, n2 = len(wave1), len(wave2)
    n = n1 + n2
    if ambient is not None and len(ambient) > 0:
        canvas = np.stack([np.resize(ambient, n), np.resize(np.roll(ambient, n1), n)])
    else:
        canvas = np.random.default_rng(seed).normal(0.0, 1e-3, size=(2, n))
    canvas = canvas.astype(np.float32)
    canvas[0, :n1] = wave1
    canvas[1, n1:] = wave2
    return canvas


def _tagged(text: str, tag: str) -> str:
    text = text.strip()
    return text if text.startswith(("[S1]", "[S2]")) else f"{tag}{text}"


# --------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------


def vocode(vocoder: Vocoder, features: torch.Tensor, feat_dim: int = 100) -> torch.Tensor:
    """Scaled features (T, F or 2F) -> waveform (C, N); each 100-dim channel block separately."""
    mel = (features.float() / FEAT_SCALE).T.unsqueeze(0)  # (1, F', T)
    channels = [vocoder.decode(mel[:, c: c + feat_dim])[0].cpu()
                for c in range(0, mel.shape[1], feat_dim)]
    return torch.stack(channels)


def synthesize(loaded: LoadedModel, tokenizer, vocoder: Vocoder, prompt_wave: np.ndarray,
               prompt_text: str, text: str, *, raw: bool = False, num_step: int | None = None,
               guidance_scale: float | None = None, t_shift: float = 0.5, speed: float = 1.0,
               max_seconds: float = 40.0, seed: int = 666) -> np.ndarray:
    """Generate (C, N) float32 audio at 24 kHz for `text` in the voices of the prompt.

    prompt_wave: (C, N) at 24 kHz with C = 2 for the stereo model and 1 otherwise.
    num_step / guidance_scale default to the variant's (`default_sampling`).
    """
    model = loaded.model
    stereo = loaded.variant.startswith("zipvoice_dialog_stereo")
    dialog = loaded.variant.startswith("zipvoice_dialog")
    steps, w = default_sampling(loaded.variant)
    num_step = steps if num_step is None else num_step
    guidance_scale = w if guidance_scale is None else guidance_scale
    if prompt_wave.ndim != 2 or prompt_wave.shape[0] != (2 if stereo else 1):
        raise ValueError(f"{loaded.variant} needs a prompt shaped ({2 if stereo else 1}, N), "
                         f"got {prompt_wave.shape}")
    if dialog and not text.strip().startswith(SPK_A_TOKEN):
        raise ValueError(f"dialogue text must start with {SPK_A_TOKEN}: {text[:40]!r}")

    prompt_rms = TARGET_RMS
    if not raw:
        prompt_wave = trim_edge_silence(remove_long_silences(prompt_wave))
        prompt_wave = np.concatenate(
            [prompt_wave, np.zeros((prompt_wave.shape[0], int(0.2 * SAMPLING_RATE)), np.float32)],
            axis=1)
        prompt_wave, prompt_rms = rms_normalise(prompt_wave)
        prompt_text, text = add_final_punctuation(prompt_text), add_final_punctuation(text)

    fbank = VocosFbank(SAMPLING_RATE, num_channels=2 if stereo else 1)
    device = model.embed.weight.device
    prompt_features = fbank.extract(prompt_wave if stereo else prompt_wave[0], SAMPLING_RATE)
    prompt_features = (prompt_features * FEAT_SCALE).to(device)
    prompt_tokens, tokens = tokenizer.texts_to_token_ids([prompt_text, text])
    if not prompt_tokens or not tokens:
        raise ValueError("prompt text or target text has no known tokens for this token table")

    generator = torch.Generator().manual_seed(seed)
    chunks = generate_long(
        model, prompt_tokens, prompt_features, tokens,
        split_token_id=model.spk_a_id if dialog and not raw else None,
        max_seconds=max_seconds if not raw else float("inf"), speed=speed, num_step=num_step,
        guidance_scale=guidance_scale, t_shift=t_shift, generator=generator)
    waves = [vocode(vocoder, feats, model.feat_dim) for feats in chunks]
    wave = cross_fade(waves, SAMPLING_RATE, 0.1)
    if prompt_rms < TARGET_RMS:
        wave = wave * (prompt_rms / TARGET_RMS)
    return wave.clamp(-1.0, 1.0).numpy().astype(np.float32)


def load_prompt(args, stereo: bool, dialog: bool) -> tuple[np.ndarray, str]:
    """Prompt waveform (C, N) and prompt text from one merged or two per-speaker prompts."""
    if args.prompt_wav2 is None:
        wave = load_audio(args.prompt_wav, SAMPLING_RATE, mono=not stereo)
        if stereo and (wave.ndim != 2 or wave.shape[0] != 2):
            raise ValueError(f"{args.prompt_wav}: the stereo model needs a 2-channel prompt "
                             "(or two mono prompts with --prompt-wav2/--prompt-text2)")
        return (wave if stereo else wave[None]), args.prompt_text
    if args.prompt_text2 is None:
        raise ValueError("--prompt-wav2 needs --prompt-text2 (the transcript of speaker 2)")
    if not dialog:
        raise ValueError("two prompts need a dialog model")
    w1 = load_audio(args.prompt_wav, SAMPLING_RATE, mono=True)
    w2 = load_audio(args.prompt_wav2, SAMPLING_RATE, mono=True)
    text = _tagged(args.prompt_text, SPK_A_TOKEN) + _tagged(args.prompt_text2, SPK_B_TOKEN)
    if stereo:
        ambient = load_audio(args.ambient_wav, SAMPLING_RATE) if args.ambient_wav else None
        return stereo_canvas(w1, w2, ambient, seed=args.seed), text
    return np.concatenate([w1, w2])[None], text


def build_parser() -> argparse.ArgumentParser:
    p = clitools.parser("python -m model.infer", __doc__)
    p.add_argument("--checkpoint", required=True,
                   help="model folder (model.pt|model.safetensors, model.json, tokens.txt) or file")
    p.add_argument("--prompt-wav", required=True, help="prompt audio (speaker 1, or the whole prompt)")
    p.add_argument("--prompt-text", required=True, help="transcript of --prompt-wav")
    p.add_argument("--prompt-wav2", help="second mono prompt (speaker 2)")
    p.add_argument("--prompt-text2", help="transcript of --prompt-wav2")
    p.add_argument("--ambient-wav", help="ambient noise for the inactive channel of a stereo canvas")
    p.add_argument("--text", required=True, help="text to synthesise ([S1] ... [S2] ... for dialogues)")
    p.add_argument("--out", required=True, help="output wav path")
    p.add_argument("--vocoder", default=None,
                   help="'griffin-lim', a local Vocos dir, or a hub id (default charactr/vocos-mel-24khz)")
    p.add_argument("--tokenizer", choices=["dialog", "emilia", "simple", "espeak"], default=None,
                   help="default: dialog for dialog models, emilia for ZipVoice")
    p.add_argument("--num-step", type=int, default=None,
                   help="Euler steps of the flow-matching sampler (default 16; 8 for distilled models)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale, an input of distilled models (default 1.5 for "
                        "dialog models, 1.0 for ZipVoice)")
    p.add_argument("--t-shift", type=float, default=0.5,
                   help="time-grid shift (< 1 puts more steps near the noise end)")
    p.add_argument("--speed", type=float, default=1.0, help="speaking rate (> 1 is faster)")
    p.add_argument("--seed", type=int, default=666, help="random seed of the initial noise")
    p.add_argument("--max-seconds", type=float, default=40.0, help="chunk budget, prompt included")
    p.add_argument("--raw", action="store_true",
                   help="no silence handling, RMS normalisation, punctuation or chunking")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--attention", choices=["sdpa", "explicit"], default="sdpa",
                   help="attention kernel; both compute the reference math (sdpa is faster)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return clitools.run(lambda: _generate(args), args.debug)


def _generate(args) -> int:
    torch.manual_seed(args.seed)
    loaded = load_model(args.checkpoint, device=args.device)
    loaded.model.set_attention_backend(args.attention)
    stereo = loaded.variant.startswith("zipvoice_dialog_stereo")
    dialog = loaded.variant.startswith("zipvoice_dialog")
    tokenizer = get_tokenizer(args.tokenizer or ("dialog" if dialog else "emilia"), loaded.token_file)
    vocoder = load_vocoder(args.vocoder).to(args.device)
    prompt_wave, prompt_text = load_prompt(args, stereo, dialog)
    wave = synthesize(loaded, tokenizer, vocoder, prompt_wave, prompt_text, args.text,
                      raw=args.raw, num_step=args.num_step, guidance_scale=args.guidance_scale,
                      t_shift=args.t_shift, speed=args.speed, max_seconds=args.max_seconds,
                      seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), wave.T, SAMPLING_RATE)
    print(f"wrote {out} ({wave.shape[1] / SAMPLING_RATE:.2f} s, {wave.shape[0]} channel(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
