"""The command lines: inputs as files, folders, globs and list files; --set overrides validated like
the file; errors as one `error:` line with exit code 2; help, --version and --debug on every CLI;
per-stage progress; the README's tiny training commands."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from audio_fixtures import ffmpeg_encode, speech
from pipeline.cli import main as pipeline_main
from pipeline.config import ConfigError, apply_overrides, load_config
from pipeline.inputs import expand_inputs, is_list_file
from pipeline.progress import Progress

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "configs" / "local.yaml"


def small_config(path: Path) -> Path:
    """Ingest + VAD only: the CLI is what is tested here, not the stages."""
    raw = {"run": {"progress": True, "report": {"enabled": False}},
           "stages": {"ingest": {"resources": {"batch_size": 4, "concurrency": 1}},
                      "vad": {"resources": {"batch_size": 8}}}}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    x = speech("Hello there. This is a short recording for the command line.", sr=16000)
    sf.write(d / "one.wav", x, 16000)
    ffmpeg_encode(d / "one.wav", d / "two.mp3", "-b:a", "64k")
    (d / "globbed").mkdir()
    sf.write(d / "globbed" / "a.flac", x[: len(x) // 2], 16000)
    sf.write(d / "globbed" / "b.flac", x, 16000)
    sf.write(d / "globbed" / "skip.wav", x, 16000)
    (d / "listed").mkdir()
    sf.write(d / "listed" / "three.wav", x, 16000)
    (d / "paths.lst").write_text("# one path per line, relative to this file\nlisted/three.wav\n")
    (d / "notes.txt").write_text("Recorded on a boat, two speakers.\nSecond line of notes.\n")
    return d


# --------------------------------------------------------------------------------------------
# Inputs


def test_list_files_are_recognised_by_content(inputs):
    assert is_list_file(inputs / "paths.lst")
    assert not is_list_file(inputs / "notes.txt")  # text, but its lines name no existing path
    assert not is_list_file(inputs / "one.wav") and not is_list_file(inputs / "two.mp3")
    # an audio file given alone is one input (it used to be read as a list and fail to decode)
    [entry] = expand_inputs(inputs / "two.mp3")
    assert entry.source_path == str((inputs / "two.mp3").resolve()) and entry.verdict is None
    got = [Path(e.source_path).name for e in expand_inputs([inputs / "paths.lst", str(inputs / "globbed" / "*.flac"),
                                                    inputs / "notes.txt", inputs / "one.wav", inputs / "one.wav"])]
    # sorted by path; the same file named twice is one input
    assert got == ["a.flac", "b.flac", "three.wav", "notes.txt", "one.wav"]
    with pytest.raises(FileNotFoundError, match="nothing-here.wav: no such file or directory"):
        expand_inputs([inputs / "one.wav", inputs / "nothing-here.wav"])
    with pytest.raises(FileNotFoundError, match=r"\*\.ogg: no file matches this pattern"):
        expand_inputs(str(inputs / "*.ogg"))


def test_files_globs_and_list_files_on_the_command_line(inputs, tmp_path):
    """run_pipeline.py one.wav two.mp3 'globbed/*.flac' --input paths.lst --input notes.txt, as a
    user runs it (its own process and Ray, output to a pipe): every named input ends in the ledger
    once, the progress names every stage, and none of Ray's own console noise shows."""
    cfg = small_config(tmp_path / "small.yaml")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_pipeline.py"), "one.wav", "two.mp3", "--config", str(cfg),
         "--output", str(out), "globbed/*.flac", "--input", "paths.lst", "--input", "notes.txt"],
        cwd=inputs, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    status = {Path(r["source_path"]).name: (r["status"], r["stage"], r["reason"]) for r in ledger}
    assert set(status) == {"one.wav", "two.mp3", "a.flac", "b.flac", "three.wav", "notes.txt"}
    for name in ("one.wav", "two.mp3", "b.flac", "three.wav"):
        assert status[name][0] == "kept", status[name]
    assert status["notes.txt"][:2] == ("rejected", "ingest") and "not_audio" in status["notes.txt"][2]
    lines = proc.stdout.splitlines()
    for stage, todo in (("ingest", 6), ("vad", 5)):
        assert [ln for ln in lines if re.match(rf"\[progress [\d:]+\] {stage} +{todo}/{todo} rec .* done$", ln)], lines
    noise = ("MapBatches", "core_worker", "Total Progress", "logging.cc", "WARNING")
    assert not [ln for ln in lines if any(n in ln for n in noise)], lines
    assert lines[-1].startswith("[pipeline]   ledger:")


def test_missing_input_is_one_error_line_with_exit_code_2(tmp_path, capsys):
    cfg = small_config(tmp_path / "small.yaml")
    for args, message in (([str(tmp_path / "gone.wav")], "gone.wav: no such file or directory"),
                          (["--input", str(tmp_path / "*.wav")], "*.wav: no file matches this pattern")):
        rc = pipeline_main([*args, "--config", str(cfg), "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# --------------------------------------------------------------------------------------------
# --set


def test_set_changes_the_fingerprint_of_the_stage_and_downstream():
    base = {s.name: s.fingerprint for s in load_config(LOCAL).stages}
    cfg = load_config(LOCAL, sets=["stages.quality.min_ovrl=3.0"])
    changed = {s.name: s.fingerprint for s in cfg.stages}
    assert next(s for s in cfg.stages if s.name == "quality").config.min_ovrl == 3.0
    assert [n for n in base if base[n] != changed[n]] == ["quality", "export"]
    # YAML values: lists, mappings, null; list items by index
    raw = apply_overrides({"a": {"b": [1, {"c": 2}]}}, ["a.b.1.c=[x, 3]", "a.d={e: null}", "f=true"])
    assert raw == {"a": {"b": [1, {"c": ["x", 3]}], "d": {"e": None}}, "f": True}


def test_set_is_validated_like_the_file(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"stages\.quality\.min_ovl: unknown key"):
        load_config(LOCAL, sets=["stages.quality.min_ovl=3.0"])
    with pytest.raises(ConfigError, match=r"stages\.quality\.min_ovrl: Input should be a valid number"):
        load_config(LOCAL, sets=["stages.quality.min_ovrl=high"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(LOCAL, sets=["stages.quality.min_ovrl"])
    rc = pipeline_main(["--set", "stages.quality.min_ovl=3.0", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "stages.quality.min_ovl: unknown key" in err
    assert not (tmp_path / "o").exists()  # nothing started
    # model.train reads --set with the same parser
    from model.train import load_config as train_config

    with pytest.raises(ValueError, match=r"train\.nmu_iters"):
        train_config(ROOT / "configs" / "train_tiny.yaml", ["train.nmu_iters=3"])
    assert train_config(ROOT / "configs" / "train_tiny.yaml", ["data.train.0.repeat=2"]).data.train[0].repeat == 2


def test_relative_config_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    sub = tmp_path / "configs" / "deep"
    sub.mkdir(parents=True)
    (sub / "c.yaml").write_text(LOCAL.read_text())
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/deep/c.yaml")
    assert cfg.run.input == str(tmp_path / "examples" / "audio")
    assert cfg.run.output == str(tmp_path / "out" / "local")


# --------------------------------------------------------------------------------------------
# Every CLI: help text, --version, one error line


def _parsers():
    from model.average import build_parser as average
    from model.eval.__main__ import build_parser as evaluate
    from model.infer import build_parser as infer
    from model.prepare import build_parser as prepare
    from model.tiny import main as _tiny  # noqa: F401 - builds its parser inside main
    from model.train import build_parser as train
    from pipeline.cli import build_parser as pipeline
    from tools.synth import build_parser as synth

    return [pipeline(), train(), infer(), evaluate(), average(), prepare(), synth()]


def _all_actions(p: argparse.ArgumentParser):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from ((sub.prog, x) for x in _all_actions_flat(sub))
        else:
            yield p.prog, a


def _all_actions_flat(p):
    return [a for a in p._actions if not isinstance(a, argparse._SubParsersAction)]


def test_every_flag_has_help_and_every_cli_a_version(capsys):
    for p in _parsers():
        missing = [f"{prog} {a.option_strings or a.dest}" for prog, a in _all_actions(p) if not a.help]
        assert not missing
        assert {"--version", "--debug"} <= set(p._option_string_actions)
        with pytest.raises(SystemExit) as e:
            p.parse_args(["--version"])
        assert e.value.code == 0 and "opendialog-forge" in capsys.readouterr().out
        fmt = p._get_formatter()
        for _, a in _all_actions(p):
            if a.default not in (None, False, [], argparse.SUPPRESS) and a.help != argparse.SUPPRESS:
                assert "(default: %(default)s)" in fmt._get_help_string(a) or "default" in a.help, a


def test_infer_with_a_missing_checkpoint_is_one_error_line(tmp_path):
    args = [sys.executable, "-m", "model.infer", "--checkpoint", str(tmp_path / "nope"),
            "--prompt-wav", "p.wav", "--prompt-text", "[S1] hi", "--text", "[S1] hello", "--out",
            str(tmp_path / "x.wav"), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == [f"error: checkpoint not found: {tmp_path / 'nope'}"], proc.stderr
    debug = subprocess.run(args + ["--debug"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and debug.stderr.rstrip().endswith(lines[0])


# --------------------------------------------------------------------------------------------
# Progress


def test_progress_counts_shrink_with_upstream_rejections(tmp_path):
    out = tmp_path / "progress.txt"
    with open(out, "w") as f:
        p = Progress(["ingest", "vad", "asr"], [4, 4, 5], mode="plain", stream=f, interval=3600)
        p.record(0, {"a": "ok", "b": "ok", "c": "rejected", "d": "ok"}, 7200.0)
        p.record(1, {"a": "ok", "b": "rejected"}, 3600.0)
        p.record(2, {"e": "ok"}, 10.0)  # e was resumed at asr
        assert [p.todo(i) for i in range(3)] == [4, 3, 3]
        assert p.finished(0) and not p.finished(1) and not p.finished(2)
        lines = p.lines()
        assert lines[0].startswith("ingest") and "4/4 rec" in lines[0] and "2.000 audio h" in lines[0]
        assert "done" in lines[0] and "2/3 rec" in lines[1] and "ETA" in lines[1] and "rec/min" in lines[1]
        p.start()
        p.close()
    text = out.read_text().splitlines()
    assert len(text) == 3 and all(t.startswith("[progress ") for t in text)
    assert [re.search(r"\] (\w+)", t).group(1) for t in text] == ["ingest", "vad", "asr"]


# --------------------------------------------------------------------------------------------
# The README's tiny training path


def _readme_commands(title: str) -> list[str]:
    """The commands of the first ```bash block after a README heading (continuations joined,
    comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(title):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start: section.index("\n```", start)]
    commands, cur = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$|^#.*$", "", line).rstrip()
        if line.endswith("\\"):
            cur += line[:-1]
            continue
        if cur + line:
            commands.append((cur + line).strip())
        cur = ""
    return commands


def test_readme_tiny_training_commands_run(tmp_path):
    """The README's commands after the example, in a fresh folder: the example's export is
    replaced by a small generated corpus of the same layout, training runs 2 updates and
    inference 2 steps (the README's run longer). `python` is this interpreter."""
    sys.path.insert(0, str(ROOT / "tests" / "model"))
    from test_data import make_corpus

    commands = _readme_commands("### A tiny training run")
    assert commands[0].startswith("python run_pipeline.py") and len(commands) == 4, commands
    work = tmp_path / "clone"
    work.mkdir()
    make_corpus(work / "out" / "local" / "export", 4)
    (work / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "bin").mkdir()
    shim = tmp_path / "bin" / "python"  # a script, not a link: the venv is found from the path
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    quick = {"model.train": " --set train.num_iters=2 --set train.save_every_n=2 --set train.valid_every_n=2",
             "model.infer": " --num-step 2"}
    ran = []
    for cmd in commands[1:]:
        module = cmd.split()[2]
        proc = subprocess.run(["bash", "-c", cmd + quick.get(module, "")], cwd=work, capture_output=True,
                              text=True, env=env, timeout=600)
        assert proc.returncode == 0, (cmd, proc.stderr[-3000:])
        ran.append(module)
    assert ran == ["model.tiny", "model.train", "model.infer"]
    for f in ("zipvoice/model.pt", "zipvoice/model.json", "zipvoice/tokens.txt", "tokens_dialog.txt",
              "prompt.wav", "prompt.txt"):
        assert (work / "data" / "tiny" / f).is_file(), f
    assert (work / "exp" / "tiny_dialog" / "model.pt").is_file()
    [wav] = work.glob("*.wav")
    assert sf.info(wav).samplerate == 24000 and sf.info(wav).frames > 0


def test_batch_budget_error_names_the_real_cause(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "model"))
    from test_data import make_corpus

    from model.data import DataConfig, DatasetSpec, load_datasets

    manifest = make_corpus(tmp_path, 3)
    spec = DatasetSpec(name="x", manifest=str(manifest))
    with pytest.raises(ValueError, match=r"longer than the batch budget data\.max_duration = 1\.5 s.*"
                                         r"--set data\.max_duration="):
        load_datasets(DataConfig(train=[spec], dev_size=1, min_duration=1.0, max_len=30, max_duration=1.5))
    with pytest.raises(ValueError, match=r"outside the duration filter"):
        load_datasets(DataConfig(train=[spec], dev_size=1, min_duration=20.0, max_len=30, max_duration=40))
