"""WhisperD re-transcription inside the pipeline, with a tiny random Whisper that has [S1]/[S2]."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import manifests
from pipeline.config import ConfigError, parse_config
from pipeline.runner import run_pipeline
from tools import synth
from test_asr import make_hf_whisper_dir


def make_whisperd_dir(path: Path) -> Path:
    """A random Whisper whose vocabulary holds [S1] and [S2] as tokens. Generation is restricted to
    the tags and a few words, so the random model writes tagged text (garbage, but tagged) and
    reaches end-of-text early."""
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    make_hf_whisper_dir(path)
    processor = WhisperProcessor.from_pretrained(path, local_files_only=True)
    tok = processor.tokenizer
    tok.add_tokens(["[S1]", "[S2]"])
    model = WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True)
    model.resize_token_embeddings(len(tok))
    allowed = {tok.convert_tokens_to_ids(t) for t in ["[S1]", "[S2]", "Ġthe", "Ġan", "Ġin", "<|endoftext|>"]}
    gen: GenerationConfig = model.generation_config
    gen.suppress_tokens = [i for i in range(len(tok)) if i not in allowed]
    model.generation_config = gen
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_whisperd_segments_in_pipeline(tmp_path, ray_local):
    wd = make_whisperd_dir(tmp_path / "whisperd")
    src = tmp_path / "in"
    clip = synth.synth_dialogue(31, duration=55.0, pause=(0.4, 0.9))
    synth.write_clip(clip, src / "long.wav", tmp_path / "long.json")
    cfg = parse_config({
        "run": {"output": str(tmp_path / "out"), "progress": False, "report": {"enabled": False}},
        "stages": {
            "ingest": {}, "vad": {}, "diarization": {"backend": "embedded"},
            "segments": {"method": "whisperd", "whisperd": {"models": {"en": str(wd)}, "processor": None,
                                                            "max_new_tokens": 24, "batch_size": 4}},
        },
    })
    res = run_pipeline(cfg, src)
    segs = manifests.read_manifest(res.output, "segments").to_pylist()
    diar = manifests.read_manifest(res.output, "diarization").to_pylist()[0]
    speakers = {t["speaker"] for t in diar["turns"]}
    assert len(segs) >= 2  # 55 s of dialogue needs at least two <= 30 s pieces
    assert all(s["source"] == "whisperd" and s["end"] - s["start"] <= 30.0 for s in segs)
    assert all(segs[k]["end"] <= segs[k + 1]["start"] + 1e-6 for k in range(len(segs) - 1))
    # Speech is covered: every true turn lies inside the span of the segments.
    for t in clip.truth.turns:
        assert any(s["start"] - 0.3 <= t.start and t.end <= s["end"] + 0.3 for s in segs) or \
            sum(max(0.0, min(t.end, s["end"]) - max(t.start, s["start"])) for s in segs) >= 0.9 * (t.end - t.start)
    tagged = [s for s in segs if s["text"]]
    assert tagged, "the tiny WhisperD wrote no text"
    for s in tagged:
        assert s["text"].startswith("[S1]")
        tags = [w for w in s["text"].split() if w in ("[S1]", "[S2]")]
        assert all(a != b for a, b in zip(tags, tags[1:])), s["text"]  # alternating
        assert set(s["speakers"]) <= speakers | {f"UNMAPPED_S{k}" for k in (1, 2)} | {"UNMAPPED_S?"}
        assert s["agreement"] is None or 0.0 <= s["agreement"] <= 1.0
        assert s["num_turns"] == len(tags)
    assert {r["status"] for r in segs} <= {"ok", "rejected"}


def test_missing_whisperd_model_is_a_clear_failure(tmp_path, ray_local):
    src = tmp_path / "in"
    synth.write_clip(synth.synth_dialogue(32, n_turns=4), src / "d.wav", tmp_path / "d.json")

    def config(model: str, out: str):
        return parse_config({
            "run": {"output": str(tmp_path / out), "progress": False, "report": {"enabled": False}},
            "stages": {"ingest": {}, "vad": {}, "diarization": {},
                       "segments": {"method": "whisperd", "whisperd": {"models": {"en": model}}}},
        })

    # A local path that does not exist stops the run before any work, naming the key.
    with pytest.raises(ConfigError, match=r"stages\.segments\.whisperd\.models\.en: .*nowhere does not exist"):
        run_pipeline(config(str(tmp_path / "nowhere"), "out_path"), src)
    assert not (tmp_path / "out_path").exists()
    # A hub id cannot be checked before the run: with no hub, the recording fails with the reason.
    res = run_pipeline(config("nobody/no-such-whisperd", "out_hub"), src)
    row = manifests.read_manifest(res.output, "ledger").to_pylist()[0]
    assert row["status"] == "failed" and row["stage"] == "segments"
    assert "not found locally" in row["reason"] and "no-such-whisperd" in row["reason"]


@pytest.mark.parametrize("raw, expected", [
    ("<|startoftranscript|><|en|><|transcribe|><|notimestamps|> [S1] Hi. [S2] Hello.<|endoftext|>", "[S1] Hi. [S2] Hello."),
    ("<|startoftranscript|>[S1] a (laughs)<|endoftext|>", "[S1] a (laughs)"),
])
def test_special_tokens_are_stripped_from_raw_whisperd_output(raw, expected):
    from pipeline.stages.segments import _SPECIAL

    assert " ".join(_SPECIAL.sub(" ", raw).split()) == expected
