"""The README's main command on the bundled example, then training and inference on its export.

pipeline (configs/local.yaml, bundled example) -> export -> a few updates of a tiny
ZipVoice-Dialog initialised from a tiny ZipVoice -> `python -m model.infer` writes a wav.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "model"))

from pipeline import manifests  # noqa: E402

EXAMPLE = ROOT / "examples" / "audio"


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """`python run_pipeline.py` exactly as the README runs it (default config and input), into a
    temporary output folder."""
    out = tmp_path_factory.mktemp("example") / "out"
    proc = subprocess.run([sys.executable, "run_pipeline.py", "--output", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"results in {out}" in proc.stdout
    return out


def test_example_ledger_export_and_report(example_run):
    out = example_run
    inputs = sorted(p.name for p in EXAMPLE.rglob("*") if p.is_file())
    ledger = {Path(r["source_path"]).name: r for r in manifests.read_manifest(out, "ledger").to_pylist()}
    assert sorted(ledger) == inputs  # every input exactly once
    assert {r["status"] for r in ledger.values()} <= {"kept", "rejected", "failed"}  # all final
    assert all(r["reason"] for r in ledger.values() if r["status"] != "kept")
    for name in ("empty.wav", "not_audio.wav", "notes.txt"):
        assert (ledger[name]["status"], ledger[name]["stage"]) == ("rejected", "ingest")
    assert (ledger["truncated.wav"]["status"], ledger["truncated.wav"]["stage"]) == ("failed", "ingest")
    assert ledger["noise_only.wav"]["stage"] == "vad"
    for name in ("monologue_en.opus", "meeting_en.mp3"):
        assert (ledger[name]["status"], ledger[name]["stage"]) == ("rejected", "classification"), ledger[name]
    kept = [n for n, r in ledger.items() if r["status"] == "kept"]
    assert "dlg_clean_en.wav" in kept and "dlg_long_en.ogg" in kept
    assert ledger["dlg_long_en.ogg"]["kept_segments"] >= 2  # 69 s of dialogue: at least two <= 30 s pieces

    export = out / "export"
    items = [json.loads(x) for f in sorted(export.glob("manifest.*.jsonl")) for x in f.read_text().splitlines()]
    assert len(items) == sum(r["kept_segments"] for r in ledger.values())
    assert len({Path(i["path"]).stem for i in items}) == len(items)  # unique file stems
    for item in items:
        assert set(item) == {"id", "text", "path"} and item["text"].startswith("[S1]")
        info = sf.info(export / item["path"])
        assert (info.samplerate, info.channels) == (24000, 1) and 1.0 <= info.duration <= 30.5
    segments = manifests.read_manifest_file("export", export / "segments.parquet").to_pylist()
    assert {s["segment_id"] for s in segments} == {i["id"] for i in items}
    assert all(s["dnsmos_ovrl"] is not None and s["metrics"] for s in segments)
    report = (out / "report" / "report.md").read_text()
    assert "## Funnel" in report and (out / "report" / "distributions.png").exists()
    data = json.loads((out / "report" / "report.json").read_text())
    funnel = data["funnel"]
    assert funnel[0]["files"] == len(inputs) and funnel[-1]["segments"] == len(items) > 0
    for key in ("files", "audio_seconds", "speech_seconds"):
        values = [r[key] for r in funnel if r[key] is not None]
        assert values == sorted(values, reverse=True), (key, values)
    # The real pipeline's segments: one lhotse supervision per turn, S1/S2 alternating, in order.
    from pipeline.corpus import check, load_cuts

    assert check(out) == []
    for cut in load_cuts(export, "en"):
        sups = sorted(cut.supervisions, key=lambda s: s.start)
        assert len(sups) >= 2 and [s.speaker for s in sups] == [("S1", "S2")[k % 2] for k in range(len(sups))]
        assert 0 <= sups[0].start and sups[-1].end <= cut.duration + 1e-6
        assert " ".join(f"[{s.speaker}] {s.text}" for s in sups) == cut.custom["text"]
    # Worker time per stage is measured (the audio-hours-per-worker-hour figure of the report).
    costs = {c["stage"]: c for c in data["costs"]}
    assert costs["asr"]["worker_seconds"] > 0 and costs["asr"]["audio_hours"] > 0
    assert costs["ingest"]["audio_hours"] >= costs["export"]["audio_hours"]
    assert "Processing cost per stage" in report


def test_train_and_infer_on_the_example_export(example_run, tmp_path):
    from model.checkpoint import build_model, load_model, read_model_config, save_model
    from model.data import read_manifest
    from model.prepare import main as prepare_main
    from model.tokenizer import read_tokens
    from model.train import load_config, train
    from test_data import make_token_files

    export = example_run / "export"
    jsonl = read_manifest(export / "manifest.en.jsonl")
    cuts = read_manifest(export / "cuts.en.jsonl.gz")
    parquet = read_manifest(export / "segments.parquet")
    assert len(jsonl) >= 2 and [u.id for u in jsonl] == [u.id for u in cuts] == [u.id for u in parquet]
    for a, b, c in zip(jsonl, cuts, parquet):
        assert a.text == b.text == c.text
        assert a.duration == pytest.approx(c.duration, abs=0.05) == pytest.approx(b.duration, abs=0.05)

    mono_tokens, dialog_tokens = make_token_files(tmp_path / "tokens")
    torch.manual_seed(0)
    tiny = read_model_config(ROOT / "configs/model/zipvoice_tiny.json")
    save_model(build_model("zipvoice", tiny, read_tokens(mono_tokens)), tmp_path / "zipvoice", read_tokens(mono_tokens))
    raw = yaml.safe_load((ROOT / "configs/train_tiny.yaml").read_text())
    raw["exp_dir"] = str(tmp_path / "exp")
    raw["model"].update(init_checkpoint=str(tmp_path / "zipvoice"), token_file=str(dialog_tokens))
    raw["data"].update(train=[{"name": "example_en", "manifest": str(export / "manifest.en.jsonl")}],
                       feature_store=str(tmp_path / "fbank"), dev_size=1, max_duration=30.0)
    raw["train"].update(num_iters=2, save_every_n=2, valid_every_n=2, export_avg=0)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    assert prepare_main(["--config", str(tmp_path / "train.yaml")]) == 0
    res = train(load_config(raw=raw))
    assert res.batch_idx_train == 2 and all(np.isfinite(v) for v in res.losses.values())
    assert load_model(tmp_path / "exp").variant == "zipvoice_dialog"

    prompt = Path(jsonl[0].audio)
    wav = tmp_path / "dialog.wav"
    cmd = [sys.executable, "-m", "model.infer", "--checkpoint", str(tmp_path / "exp"), "--vocoder", "griffin-lim",
           "--prompt-wav", str(prompt), "--prompt-text", jsonl[0].text,
           "--text", "[S1] Did you see the lake? [S2] Yes, on Sunday.", "--out", str(wav), "--num-step", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = sf.info(wav)
    assert info.samplerate == 24000 and info.frames > 24000 * 0.5
