"""The exported corpus as one published artefact: built aside, swapped in whole, checkable.

During a run the export stage only encodes audio into a store (``<output>/cache/export/``, one
file per audio key: source file identity, span and encoding settings), never into the corpus
folder. At the end of a run that finished, :func:`publish` builds the whole corpus for the export
manifest's kept segments in a hidden staging folder next to it (audio hard-linked from the store,
so a threshold change re-encodes nothing) and swaps it with the published folder in one step
(``renameat2(RENAME_EXCHANGE)``; where the file system lacks it, two renames that the next run
or ``check`` completes). A reader sees the previous corpus or the new one, never a mix, and the
audio of a segment that is no longer kept is not in the new one.

The corpus folder holds:

* ``audio/<lang>/<segment_id>.<ext>`` and ``manifest.<lang>.jsonl`` (``id``, ``text``, ``path``):
  the released OpenDialog layout, read by the trainer;
* ``segments.parquet``: every metric of every exported segment (the ``export`` schema);
* lhotse manifests written by lhotse: ``recordings.<lang>.jsonl.gz``, ``supervisions.<lang>.jsonl.gz``
  and ``cuts.<lang>.jsonl.gz``, one supervision per speaker turn (``speaker`` S1/S2, its span in the
  file), paths relative to the corpus folder (``load_cuts`` or lhotse's
  ``CutSet.from_file(...).with_recording_path_prefix(folder)``);
* ``rttm/<lang>/<segment_id>.rttm``: the S1/S2 turns of each file, written by pyannote.core;
* ``metadata.jsonl``: Hugging Face ``datasets`` audiofolder metadata
  (``load_dataset("audiofolder", data_dir=folder)``);
* ``corpus.json``: the run, the config fingerprints and the counts.

``check(folder)`` verifies that all of these agree.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import time
import uuid
from collections import defaultdict
from pathlib import Path

import soundfile as sf

from pipeline import manifests

CORPUS_JSON = "corpus.json"
STORE = Path("cache") / "export"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- swapping


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _old(root: Path) -> Path:
    return root.with_name(f".{root.name}.old")


def recover(root: Path) -> None:
    """Finish what a killed swap left: the previous corpus back in place when the new one never
    arrived, and staging folders of dead runs removed."""
    old = _old(root)
    if old.exists() and not root.exists():
        os.rename(old, root)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    for p in root.parent.glob(f".{root.name}.new-*"):
        shutil.rmtree(p, ignore_errors=True)


def swap_in(staging: Path, root: Path) -> None:
    """Make ``staging`` the published ``root``; the previous one is deleted."""
    if root.exists() and not root.is_symlink() and _exchange(staging, root):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the previous corpus
        return
    if root.exists() or root.is_symlink():
        old = _old(root)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(root, old)  # killed here: recover() puts it back
        os.rename(staging, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, root)


# ----------------------------------------------------------------------------- building


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _turn_spans(r: dict, duration: float) -> list[dict]:
    """The segment's turns in the time of its exported file, clipped to it."""
    out = []
    for t in r.get("turns") or []:
        a = max(0.0, round(t["start"] - r["start"], 3))
        b = min(duration, round(t["end"] - r["start"], 3))
        if b > a:
            out.append(dict(t, start=a, end=b))
    return out


def _lhotse(items: list[dict], sample_rate: int):
    from lhotse import AudioSource, CutSet, MonoCut, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    cuts = []
    for r in items:
        n = r["_frames"]
        rec = Recording(id=r["segment_id"], sources=[AudioSource(type="file", channels=[0], source=r["path"])],
                        sampling_rate=sample_rate, num_samples=n, duration=n / sample_rate)
        sups = [SupervisionSegment(id=f"{r['segment_id']}-{k:03d}", recording_id=rec.id, start=t["start"],
                                   duration=round(t["end"] - t["start"], 3), channel=0, text=t["text"],
                                   language=r["language"], speaker=t["speaker"])
                for k, t in enumerate(_turn_spans(r, rec.duration))]
        if not sups:  # no timed turns: one supervision for the whole file
            sups = [SupervisionSegment(id=f"{r['segment_id']}-000", recording_id=rec.id, start=0.0,
                                       duration=rec.duration, channel=0, text=r["text"], language=r["language"])]
        cuts.append(MonoCut(id=r["segment_id"], start=0.0, duration=rec.duration, channel=0, supervisions=sups,
                            recording=rec, custom={
                                "text": r["text"], "source_recording_id": r["recording_id"],
                                "source_start": r["start"], "source_end": r["end"], "num_turns": r["num_turns"],
                                "dnsmos_ovrl": r["dnsmos_ovrl"], "agreement": r["agreement"]}))
    cutset = CutSet.from_cuts(cuts)
    return (RecordingSet.from_recordings(c.recording for c in cuts),
            SupervisionSet.from_segments(s for c in cuts for s in c.supervisions), cutset)


def _rttm(path: Path, r: dict, duration: float) -> None:
    from pyannote.core import Annotation, Segment

    ann = Annotation(uri=r["segment_id"])
    for k, t in enumerate(_turn_spans(r, duration)):
        ann[Segment(t["start"], t["end"]), k] = t["speaker"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        ann.write_rttm(f)


def build(staging: Path, rows: list[dict], store: Path, sample_rate: int, info: dict) -> dict:
    """Write the whole corpus for ``rows`` (the kept rows of the export manifest) into ``staging``."""
    staging.mkdir(parents=True)
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        src = store / r["audio_key"][:2] / (r["audio_key"] + Path(r["path"]).suffix)
        _link(src, staging / r["path"])
        r["_frames"] = sf.info(str(staging / r["path"])).frames
        by_lang[r["language"] or "und"].append(r)
    manifests.write_table(manifests.to_table("export", rows), staging / "segments.parquet")
    meta_lines = []
    for lang, items in sorted(by_lang.items()):
        (staging / f"manifest.{lang}.jsonl").write_text("".join(
            json.dumps({"id": r["segment_id"], "text": r["text"], "path": r["path"]}, ensure_ascii=False) + "\n"
            for r in items), encoding="utf-8")
        recs, sups, cuts = _lhotse(items, sample_rate)
        recs.to_file(staging / f"recordings.{lang}.jsonl.gz")
        sups.to_file(staging / f"supervisions.{lang}.jsonl.gz")
        cuts.to_file(staging / f"cuts.{lang}.jsonl.gz")
        for r in items:
            _rttm(staging / "rttm" / lang / f"{r['segment_id']}.rttm", r, r["_frames"] / sample_rate)
            meta_lines.append(json.dumps({"file_name": r["path"], "id": r["segment_id"], "text": r["text"],
                                          "language": lang, "duration": round(r["_frames"] / sample_rate, 4),
                                          "dnsmos_ovrl": r["dnsmos_ovrl"]}, ensure_ascii=False) + "\n")
    (staging / "metadata.jsonl").write_text("".join(meta_lines), encoding="utf-8")
    summary = {
        "format": FORMAT_VERSION, **info,
        "segments": len(rows),
        "seconds": round(sum(r["_frames"] for r in rows) / sample_rate, 3),
        "languages": {lang: {"segments": len(items), "seconds": round(sum(r["_frames"] for r in items) / sample_rate, 3)}
                      for lang, items in sorted(by_lang.items())},
        "sample_rate": sample_rate,
    }
    # Last: a staging folder with corpus.json is complete.
    (staging / CORPUS_JSON).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def publish(output: Path, root: Path, sample_rate: int) -> dict:
    """Build the corpus of the published export manifest and swap it in; then drop store files
    that no kept segment uses."""
    recover(root)
    table = manifests.read_manifest(output, "export", "export")
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    try:
        run = json.loads((output / "run_config.json").read_text())
        stages = {s["name"]: s["fingerprint"] for s in run["stages"]}
    except (OSError, ValueError, KeyError):
        stages = {}
    info = {"run_id": f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprint": list(stages.values())[-1] if stages else None, "stages": stages}
    staging = root.with_name(f".{root.name}.new-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    store = output / STORE
    summary = build(staging, rows, store, sample_rate, info)
    swap_in(staging, root)
    used = {r["audio_key"] for r in rows}
    for p in store.glob("*/*") if store.is_dir() else []:
        if p.name.split(".")[0] not in used and not p.name.startswith("."):
            p.unlink(missing_ok=True)
    return summary


# ----------------------------------------------------------------------------- reading, checking


def load_cuts(root: str | Path, language: str):
    """The lhotse CutSet of one language, its relative audio paths resolved against ``root``
    (wherever the folder was moved)."""
    from lhotse import CutSet

    root = Path(root)
    return CutSet.from_file(root / f"cuts.{language}.jsonl.gz").with_recording_path_prefix(str(root))


def check(root: str | Path) -> list[str]:
    """Problems found in a published corpus (empty: segments.parquet, the jsonl manifests, the
    lhotse manifests, the RTTM files, metadata.jsonl, corpus.json and the audio files agree).
    ``root``: the corpus folder or the output folder holding it as ``export/``."""
    from lhotse import CutSet, RecordingSet, SupervisionSet

    root = Path(root)
    if (root / "export" / CORPUS_JSON).exists() and not (root / CORPUS_JSON).exists():
        root = root / "export"  # an output folder was named
    if not root.exists() and _old(root).exists():  # a reader repairs nothing: a run may be swapping
        return [f"{root}: missing, the previous corpus is in {_old(root)} (a swap was interrupted: "
                "the next run puts it back)"]
    problems: list[str] = []
    try:
        summary = json.loads((root / CORPUS_JSON).read_text())
    except (OSError, ValueError) as e:
        return [f"{root / CORPUS_JSON}: cannot read ({e}): not a published corpus"]
    try:
        rows = manifests.read_manifest_file("export", root / "segments.parquet").to_pylist()
    except manifests.ManifestError as e:
        return [str(e)]
    paths = {r["segment_id"]: r["path"] for r in rows}
    if len(paths) != len(rows):
        problems.append("segments.parquet: duplicate segment ids")
    if any(r["status"] != "ok" for r in rows):
        problems.append("segments.parquet: rows that are not kept")
    on_disk = {p.relative_to(root).as_posix() for p in (root / "audio").rglob("*") if p.is_file()} \
        if (root / "audio").is_dir() else set()
    if on_disk != set(paths.values()):
        extra, missing = sorted(on_disk - set(paths.values())), sorted(set(paths.values()) - on_disk)
        problems.append(f"audio/: {len(extra)} files not in segments.parquet {extra[:3]}, "
                        f"{len(missing)} listed files missing {missing[:3]}")
    langs = sorted({r["language"] or "und" for r in rows})
    listed = {p.name.split(".")[1] for p in root.glob("manifest.*.jsonl")}
    if set(langs) != listed:
        problems.append(f"manifest.<lang>.jsonl for {sorted(listed)}, segments in {langs}")
    frames: dict[str, int] = {}
    for lang in langs:
        want = {r["segment_id"]: r for r in rows if (r["language"] or "und") == lang}
        try:
            items = [json.loads(x) for x in (root / f"manifest.{lang}.jsonl").read_text(encoding="utf-8").splitlines()]
            if {i["id"]: i["path"] for i in items} != {k: r["path"] for k, r in want.items()} or \
                    any(i["text"] != want[i["id"]]["text"] for i in items):
                problems.append(f"manifest.{lang}.jsonl: ids, paths or texts differ from segments.parquet")
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"manifest.{lang}.jsonl: {e}")
        try:
            cuts = CutSet.from_file(root / f"cuts.{lang}.jsonl.gz")
            recs = RecordingSet.from_file(root / f"recordings.{lang}.jsonl.gz")
            sups = SupervisionSet.from_file(root / f"supervisions.{lang}.jsonl.gz")
            if sorted(c.id for c in cuts) != sorted(want) or sorted(recs.ids) != sorted(want):
                problems.append(f"cuts/recordings.{lang}: ids differ from segments.parquet")
            for c in cuts:
                if c.id in want and c.recording.sources[0].source != want[c.id]["path"]:
                    problems.append(f"cuts.{lang}: {c.id} points to {c.recording.sources[0].source}")
                frames[c.id] = c.recording.num_samples
            if sorted({s.recording_id for s in sups}) != sorted(c.id for c in cuts if c.supervisions):
                problems.append(f"supervisions.{lang}: recordings differ from the cuts")
        except Exception as e:  # noqa: BLE001 - lhotse raises many kinds for a damaged file
            problems.append(f"lhotse manifests of {lang}: {type(e).__name__}: {e}")
        rttm = {p.stem for p in (root / "rttm" / lang).glob("*.rttm")}
        if rttm != set(want):
            problems.append(f"rttm/{lang}: {len(rttm)} files for {len(want)} segments")
    for sid, rel in paths.items():
        if rel in on_disk:
            try:
                n = sf.info(str(root / rel)).frames
            except Exception as e:  # noqa: BLE001
                problems.append(f"{rel}: cannot decode ({e})")
                continue
            if sid in frames and frames[sid] != n:
                problems.append(f"{rel}: {n} samples, the cut says {frames[sid]}")
    try:
        meta = [json.loads(x) for x in (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
        if sorted(m["file_name"] for m in meta) != sorted(paths.values()):
            problems.append("metadata.jsonl: file names differ from segments.parquet")
    except (OSError, ValueError, KeyError) as e:
        problems.append(f"metadata.jsonl: {e}")
    if summary.get("segments") != len(rows):
        problems.append(f"{CORPUS_JSON}: {summary.get('segments')} segments, segments.parquet has {len(rows)}")
    return problems
