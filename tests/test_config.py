"""Config validation and manifest schemas: clear errors naming the key, the file and the problem."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import manifests
from pipeline.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("train")))
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.stages and cfg.stages[0].name == "ingest"
    # Fingerprints chain: each differs from the one before.
    fps = [s.fingerprint for s in cfg.stages]
    assert len(set(fps)) == len(fps)


def _base():
    return {"run": {"output": "x"}, "stages": {"ingest": {}, "vad": {"threshold": 0.5}}}


@pytest.mark.parametrize(
    "patch, expected",
    [
        (lambda c: c["stages"]["vad"].update(treshold=0.4), "stages.vad.treshold: unknown key"),
        (lambda c: c["stages"]["vad"].update(threshold=1.5), "stages.vad.threshold"),
        (lambda c: c["stages"]["vad"].update(backend="webrtc"), "stages.vad.backend"),
        (lambda c: c["stages"]["vad"].update(resources={"num_gpus": -1}), "stages.vad.resources.num_gpus"),
        (lambda c: c["stages"]["vad"].update(resources={"concurrency": [3, 1]}), "stages.vad.resources"),
        (lambda c: c["stages"].update(nonsense={}), "stages.nonsense: unknown stage"),
        (lambda c: c["run"].update(ouput="y"), "run.ouput: unknown key"),
        (lambda c: c.update(extra=1), "extra: unknown key"),
        (lambda c: c.update(stages={}), "stages: must be a non-empty mapping"),
    ],
)
def test_bad_configs_name_the_key(patch, expected):
    raw = _base()
    patch(raw)
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "my.yaml")
    assert "my.yaml" in str(e.value) and expected in str(e.value)


def test_all_errors_reported_at_once_and_file_errors(tmp_path):
    raw = _base()
    raw["stages"]["vad"].update(threshold=2, foo=1)
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "c.yaml")
    assert "stages.vad.threshold" in str(e.value) and "stages.vad.foo" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_fingerprint_ignores_resources_but_not_settings():
    a = parse_config(_base())
    raw = _base()
    raw["stages"]["vad"]["resources"] = {"batch_size": 99, "concurrency": 3}
    b = parse_config(raw)
    assert [s.fingerprint for s in a.stages] == [s.fingerprint for s in b.stages]
    assert b.stages[1].resources.batch_size == 99
    raw["stages"]["ingest"]["min_duration"] = 2.0
    c = parse_config(raw)
    assert c.stages[0].fingerprint != a.stages[0].fingerprint
    assert c.stages[1].fingerprint != a.stages[1].fingerprint  # downstream follows upstream


def test_manifest_validation_errors(tmp_path):
    rows = [{"recording_id": "r1", "status": "ok", "reason": None, "speech": [{"start": 0.0, "end": 1.0}],
             "speech_duration": 1.0, "num_segments": 1}]
    t = manifests.to_table("vad", rows)
    good = tmp_path / "manifests" / "vad" / "a.parquet"
    manifests.write_table(t, good)
    assert manifests.read_manifest(tmp_path, "vad").num_rows == 1

    with pytest.raises(manifests.ManifestError, match="invalid status"):
        manifests.to_table("vad", [dict(rows[0], status="maybe")])
    with pytest.raises(manifests.ManifestError, match="do not fit"):
        manifests.to_table("vad", [dict(rows[0], speech="lots")])

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"recording_id": ["r"]}), plain)
    with pytest.raises(manifests.ManifestError, match="plain.parquet: not a manifest"):
        manifests.read_manifest_file("vad", plain)
    with pytest.raises(manifests.ManifestError, match="is a 'vad' manifest, expected 'asr'"):
        manifests.read_manifest_file("asr", good)
    old = t.replace_schema_metadata({manifests.SCHEMA_VERSION_KEY: b'{"name": "vad", "version": 0}'})
    pq.write_table(old, tmp_path / "old.parquet")
    with pytest.raises(manifests.ManifestError, match="schema version 0"):
        manifests.read_manifest_file("vad", tmp_path / "old.parquet")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(manifests.ManifestError, match="broken.parquet: cannot read"):
        manifests.read_manifest_file("vad", broken)
    dropped = t.drop_columns(["speech"]).replace_schema_metadata(t.schema.metadata)
    pq.write_table(dropped, tmp_path / "dropped.parquet")
    with pytest.raises(manifests.ManifestError, match=r"lacks columns \['speech'\]"):
        manifests.read_manifest_file("vad", tmp_path / "dropped.parquet")


def test_duplicate_rows_across_parts_are_read_once(tmp_path):
    mk = lambda rid, n: {"recording_id": rid, "status": "ok", "reason": None, "speech": [],  # noqa: E731
                         "speech_duration": float(n), "num_segments": 0}
    manifests.write_table(manifests.to_table("vad", [mk("a", 1), mk("b", 1)]), tmp_path / "manifests/vad/p1.parquet")
    manifests.write_table(manifests.to_table("vad", [mk("b", 2), mk("c", 1)]), tmp_path / "manifests/vad/p2.parquet")
    t = manifests.read_manifest(tmp_path, "vad")
    assert t.column("recording_id").to_pylist() == ["a", "b", "c"]
    assert t.column("speech_duration").to_pylist() == [1.0, 2.0, 1.0]  # the later part wins
