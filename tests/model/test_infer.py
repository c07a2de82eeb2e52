"""The inference front end and `python -m model.infer` end to end with tiny random models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import model.infer
from model.checkpoint import build_model, load_model, save_model
from model.infer import (
    add_final_punctuation,
    remove_long_silences,
    rms_normalise,
    stereo_canvas,
    synthesize,
    trim_edge_silence,
)
from model.sampling import generate_long
from model.tokenizer import build_espeak_token_table, get_tokenizer
from model.vocoder import load_vocoder

REPO = Path(__file__).resolve().parents[2]
TINY = json.loads((REPO / "configs/model/zipvoice_tiny.json").read_text())
SR = 24000



def tone(seconds, freq=220.0, amp=0.05):
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t) * (1.2 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def test_final_punctuation():
    assert add_final_punctuation("[S1] hi [S2] there") == "[S1] hi [S2] there."
    assert add_final_punctuation("ok?  ") == "ok?"
    assert add_final_punctuation("好的。") == "好的。"


def test_rms_normalise_raises_quiet_prompts_only():
    quiet = np.full((1, 100), 0.01, np.float32)
    out, rms = rms_normalise(quiet)
    assert rms == pytest.approx(0.01) and np.sqrt(np.mean(out ** 2)) == pytest.approx(0.1)
    loud = np.full((1, 100), 0.5, np.float32)
    out, rms = rms_normalise(loud)
    assert rms == pytest.approx(0.5) and np.array_equal(out, loud)


def test_silence_handling():
    speech = tone(0.5)
    sil = np.zeros(int(2.5 * SR), np.float32)
    wave = np.concatenate([sil[: SR], speech, sil, speech, sil[: SR // 2]])[None]
    shortened = remove_long_silences(wave)
    # the 2.5 s gap becomes 1 s; the 1 s lead and 0.5 s tail are not longer than 1 s
    assert shortened.shape[1] == pytest.approx(wave.shape[1] - 1.5 * SR, abs=0.02 * SR)
    trimmed = trim_edge_silence(shortened)
    assert trimmed.shape[1] == pytest.approx(shortened.shape[1] - 0.9 * SR - 0.4 * SR, abs=0.02 * SR)


def test_stereo_canvas_places_speakers_on_their_channels():
    a, b = tone(0.3, 200), tone(0.2, 300)
    canvas = stereo_canvas(a, b)
    n1 = len(a)
    assert canvas.shape == (2, len(a) + len(b))
    assert np.array_equal(canvas[0, :n1], a) and np.array_equal(canvas[1, n1:], b)
    # the inactive parts hold a faint noise floor, not digital silence
    assert 0 < np.abs(canvas[1, :n1]).max() < 0.01 and 0 < np.abs(canvas[0, n1:]).max() < 0.01


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    tokens = build_espeak_token_table(extra_tokens=["[S1]", "[S2]"])
    dirs = {}
    for variant in ("zipvoice_dialog", "zipvoice_dialog_stereo"):
        torch.manual_seed(0)
        dirs[variant] = root / variant
        save_model(build_model(variant, TINY, tokens), dirs[variant], tokens)
    sf.write(root / "spk1.wav", tone(1.0, 200), SR)
    sf.write(root / "spk2.wav", tone(0.8, 320), SR)
    sf.write(root / "merged.wav", np.concatenate([tone(1.0, 200), tone(0.8, 320)]), SR)
    return root, dirs


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "model.infer", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_dialog_end_to_end(tiny_dirs, tmp_path):
    root, dirs = tiny_dirs
    out = tmp_path / "dialog.wav"
    proc = run_cli("--checkpoint", dirs["zipvoice_dialog"], "--prompt-wav", root / "merged.wav",
                   "--prompt-text", "[S1] Hello there. [S2] Hi!",
                   "--text", "[S1] How are you doing today? [S2] Fine, thanks.",
                   "--out", out, "--vocoder", "griffin-lim", "--num-step", "2")
    assert proc.returncode == 0, proc.stderr
    wave, sr = sf.read(out)
    assert sr == SR and wave.ndim == 1 and len(wave) > 0.2 * SR
    assert np.isfinite(wave).all() and np.abs(wave).max() <= 1.0


def test_cli_stereo_two_mono_prompts(tiny_dirs, tmp_path):
    root, dirs = tiny_dirs
    out = tmp_path / "stereo.wav"
    proc = run_cli("--checkpoint", dirs["zipvoice_dialog_stereo"], "--prompt-wav", root / "spk1.wav",
                   "--prompt-text", "Hello there.", "--prompt-wav2", root / "spk2.wav",
                   "--prompt-text2", "Hi!", "--text", "[S1] How are you? [S2] Fine.",
                   "--out", out, "--vocoder", "griffin-lim", "--num-step", "2")
    assert proc.returncode == 0, proc.stderr
    wave, sr = sf.read(out)
    assert sr == SR and wave.shape[1] == 2 and wave.shape[0] > 0.2 * SR


def test_cli_rejects_bad_prompts(tiny_dirs, tmp_path):
    root, dirs = tiny_dirs
    proc = run_cli("--checkpoint", dirs["zipvoice_dialog_stereo"], "--prompt-wav", root / "merged.wav",
                   "--prompt-text", "[S1] a [S2] b", "--text", "[S1] c", "--out", tmp_path / "x.wav",
                   "--vocoder", "griffin-lim")
    assert proc.returncode != 0 and "merged.wav: the stereo model needs a 2-channel prompt" in proc.stderr


def test_synthesize_chunks_long_dialogues(tiny_dirs, monkeypatch):
    _, dirs = tiny_dirs
    counts = []

    def spy(*args, **kwargs):
        chunks = generate_long(*args, **kwargs)
        counts.append(len(chunks))
        return chunks

    monkeypatch.setattr(model.infer, "generate_long", spy)
    loaded = load_model(dirs["zipvoice_dialog"])
    tokenizer = get_tokenizer("dialog", loaded.token_file)
    prompt = tone(0.6)[None]
    text = " ".join(f"[S1] turn number {i}. [S2] reply {i}." for i in range(3))
    with pytest.raises(ValueError, match="must start with"):
        synthesize(loaded, tokenizer, load_vocoder("griffin-lim"), prompt, "[S1] a [S2] b", "hi")
    # a 2 s budget forces several chunks; they are joined with 0.1 s cross-fades
    wave = synthesize(loaded, tokenizer, load_vocoder("griffin-lim"), prompt, "[S1] ah [S2] oh",
                      text, num_step=1, max_seconds=2.0)
    assert counts[-1] >= 3
    assert wave.shape[0] == 1 and wave.shape[1] > SR
