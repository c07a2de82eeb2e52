"""The generic runner: ledger completeness on bad inputs, resume after SIGKILL, config changes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from audio_fixtures import ffmpeg_encode, speech
from pipeline import manifests
from pipeline.config import parse_config
from pipeline.inputs import recording_id
from pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parent.parent


def config(output: Path, vad: dict | None = None, batch: int = 2) -> dict:
    return {
        "run": {"output": str(output), "progress": False, "report": {"enabled": False}},
        "stages": {
            "ingest": {"resources": {"batch_size": batch, "concurrency": [1, 2]}},
            "vad": {"threshold": 0.5, **(vad or {}), "resources": {"batch_size": batch}},
        },
    }


@pytest.fixture(scope="module")
def utterance():
    return speech("Hello there. This is a short test recording for the pipeline.", sr=22050)


def make_messy_folder(d: Path, x: np.ndarray, sr: int = 22050) -> dict[str, tuple[str, str]]:
    """Files -> (expected status, word expected in the reason)."""
    import soxr

    d.mkdir(parents=True, exist_ok=True)
    (d / "sub").mkdir()
    sf.write(d / "good.wav", x, sr)
    sf.write(d / "u8.wav", x, sr, subtype="PCM_U8")
    x96 = soxr.resample(x, sr, 96000)
    sf.write(d / "hi96k.wav", x96, 96000, subtype="PCM_24")
    sf.write(d / "six.wav", np.stack([x * (0.5 + 0.1 * k) for k in range(6)], axis=1), sr)
    sf.write(d / "sub" / "nested.flac", x, sr)
    ffmpeg_encode(d / "good.wav", d / "speech.mp3", "-b:a", "128k")
    ffmpeg_encode(d / "good.wav", d / "speech.opus", "-c:a", "libopus")
    ffmpeg_encode(d / "good.wav", d / "speech.m4a", "-c:a", "aac")
    (d / "empty.wav").write_bytes(b"")
    sf.write(d / "zero.wav", np.zeros(0, np.float32), sr)
    full = (d / "good.wav").read_bytes()
    (d / "truncated.wav").write_bytes(full[: len(full) // 3])
    flac = (d / "sub" / "nested.flac").read_bytes()
    rng = np.random.default_rng(0)
    (d / "corrupt.flac").write_bytes(flac[:200] + rng.integers(0, 256, len(flac) - 200, dtype=np.uint8).tobytes())
    (d / "fake.wav").write_text("this is not audio at all\n" * 20)
    (d / "notes.txt").write_text("recorded on a boat\n")
    sf.write(d / "silence.wav", np.zeros(sr * 3, np.float32), sr)
    expect = {
        "good.wav": ("kept", ""), "u8.wav": ("kept", ""), "hi96k.wav": ("kept", ""), "six.wav": ("kept", ""),
        "sub/nested.flac": ("kept", ""), "speech.mp3": ("kept", ""), "speech.opus": ("kept", ""),
        "speech.m4a": ("kept", ""),
        "empty.wav": ("rejected", "empty"), "zero.wav": ("rejected", "no samples"),
        "truncated.wav": ("failed", "truncated"), "corrupt.flac": ("failed", "corrupt"),
        "fake.wav": ("rejected", "not audio"), "notes.txt": ("rejected", "not audio"),
        "silence.wav": ("rejected", "no_speech"),
    }
    return expect


def test_messy_folder_every_file_in_ledger_once(tmp_path, ray_local, utterance):
    expect = make_messy_folder(tmp_path / "in", utterance)
    cfg = parse_config(config(tmp_path / "out"))
    result = run_pipeline(cfg, tmp_path / "in")
    ledger = manifests.read_manifest(result.output, "ledger").to_pylist()
    by_path = {str(Path(r["source_path"]).relative_to((tmp_path / "in").resolve())): r for r in ledger}
    assert len(ledger) == len(by_path) == len(expect)
    assert sorted(by_path) == sorted(expect)
    for name, (status, word) in expect.items():
        row = by_path[name]
        assert row["status"] == status, (name, row)
        if status != "kept":
            assert word in (row["reason"] or "").replace("_", " ") or word in (row["reason"] or ""), (name, row)
            assert row["stage"] in ("ingest", "vad")
    # The odd formats decode to the same speech: durations agree with the source within 50 ms.
    recs = {r["recording_id"]: r for r in manifests.read_manifest(result.output, "ingest").to_pylist()}
    for name in ("u8.wav", "hi96k.wav", "six.wav", "speech.opus", "speech.m4a"):
        rid = by_path[name]["recording_id"]
        assert abs(recs[rid]["duration"] - len(utterance) / 22050) < 0.06, name
        info = sf.info(recs[rid]["audio_path"])
        assert (info.samplerate, info.channels) == (16000, 1)
    assert recs[by_path["six.wav"]["recording_id"]]["channels"] == 6
    assert recs[by_path["hi96k.wav"]["recording_id"]]["sample_rate"] == 96000


def test_recording_ids_are_stable(tmp_path):
    p = tmp_path / "a b.wav"
    p.write_bytes(b"x")
    assert recording_id(p) == recording_id(str(p)) == recording_id(tmp_path / "." / "a b.wav")
    assert recording_id(p).startswith("a_b-")
    other = tmp_path / "sub"
    other.mkdir()
    (other / "a b.wav").write_bytes(b"x")
    assert recording_id(other / "a b.wav") != recording_id(p)


def _tables(out: Path) -> dict[str, list[dict]]:
    res = {}
    for stage in ("ingest", "vad", "ledger"):
        rows = manifests.read_manifest(out, stage).to_pylist()
        for r in rows:  # the cache path differs between output folders
            r.pop("audio_path", None)
        res[stage] = rows
    return res


def _parts(out: Path, stage: str) -> list[Path]:
    """Part files a running stage has staged (published manifests change only at the end)."""
    return sorted((out / ".state" / stage).glob("*/manifest/*.parquet"))


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, ray_local, utterance):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(16):
        sf.write(src / f"u{i:02d}.wav", np.concatenate([np.zeros(1600 * (i % 4), np.float32), utterance]), 22050)
    (src / "broken.wav").write_text("nope")

    run_pipeline(parse_config(config(tmp_path / "ref", batch=1)), src)

    out = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(config(out, batch=1)))
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(cfg_file), "--input", str(src), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(_parts(out, "vad")) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        assert len(_parts(out, "vad")) >= 3, "no progress within the time limit"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its Ray workers die with it
        proc.wait()
    done_before = len(_parts(out, "vad"))
    assert done_before < 17, "the run finished before the kill; nothing was tested"
    assert not (out / "ledger.parquet").exists()

    try:
        resumed = run_pipeline(parse_config(config(out, batch=1)), src)
    finally:
        # The killed driver leaves its local Ray's helper processes behind; clear them.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert resumed.processed < 17, "the rerun redid finished work"
    a, b = _tables(tmp_path / "ref"), _tables(out)
    for stage in a:
        assert len(b[stage]) == len(a[stage]), stage
        keys = [tuple(r[k] for k in manifests.KEYS[stage if stage == "ledger" else "recordings"]) for r in b[stage]]
        assert len(set(keys)) == len(keys), f"duplicate rows in {stage}"
        assert b[stage] == a[stage], stage
    # Everything is published as one file per stage; nothing stays staged.
    assert [p.name for p in (out / "manifests" / "vad").glob("*.parquet")] == ["vad.parquet"]
    assert _parts(out, "vad") == []


def test_config_change_reruns_stage_and_downstream_only(tmp_path, ray_local, utterance):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        sf.write(src / f"u{i}.wav", utterance, 22050)
    out = tmp_path / "out"
    first = run_pipeline(parse_config(config(out)), src)
    assert first.processed == 3
    ingest_file = out / "manifests" / "ingest" / "ingest.parquet"
    ingest_mtime = ingest_file.stat().st_mtime_ns
    vad_fp = pq.read_schema(out / "manifests" / "vad" / "vad.parquet").metadata

    again = run_pipeline(parse_config(config(out)), src)
    assert again.processed == 0  # nothing to do

    changed = run_pipeline(parse_config(config(out, vad={"threshold": 0.6})), src)
    assert changed.processed == 3
    assert ingest_file.stat().st_mtime_ns == ingest_mtime  # upstream untouched
    assert pq.read_schema(out / "manifests" / "vad" / "vad.parquet").metadata != vad_fp
    stage_record = yaml.safe_load((out / "manifests" / "vad" / "_stage.json").read_text())
    assert stage_record["config"]["threshold"] == 0.6
    vad = manifests.read_manifest(out, "vad").to_pylist()
    assert len(vad) == 3
