"""Run report: the funnel of one run, rejection reasons, costs, and violin plots like the paper's Figure 2.

Written to ``<output>/report/``: ``report.md`` (short summary), ``report.json`` (the numbers),
``distributions.png`` (DNSMOS OVRL, number of turns and duration of the kept segments, per
language, with the configured cutoffs). Manifests are found by their schema, whatever the stages
are called in the config.

The funnel covers exactly the recordings of the ledger (the inputs of the run that wrote it) and
is monotone by construction: each row keeps what the row before kept and its own stage passed.
Recording rows count files, their audio and their VAD speech; from the first segment stage on,
rows count segments of the files still in, their audio (the union of their spans, so never more
than the files they come from) and the VAD speech inside them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipeline import manifests
from pipeline.store import part_meta, staging_dir


def _meta(path: Path) -> dict:
    return part_meta(path) or {}


def _stage_order(output: Path) -> list[str]:
    try:
        return [s["name"] for s in json.loads((output / "run_config.json").read_text())["stages"]]
    except (OSError, ValueError, KeyError):
        return sorted(d.name for d in (output / "manifests").glob("*") if d.is_dir())


def _tables(output: Path) -> list[tuple[str, str, list[dict]]]:
    """(stage, schema, rows) in pipeline order."""
    out = []
    for stage in _stage_order(output):
        files = sorted((output / "manifests" / stage).glob("*.parquet"))
        if not files:
            continue
        try:
            schema = manifests.schema_name(files[0])
            out.append((stage, schema, manifests.read_manifest(output, stage, schema).to_pylist()))
        except manifests.ManifestError:
            continue
    return out


def this_run_costs(output: Path, stages: list, since: float) -> dict[str, dict]:
    """Worker time of the parts a run wrote (staged parts newer than ``since``, a time.time()),
    per stage; read before they are published."""
    out = {}
    for spec in stages:
        d = staging_dir(output, spec.name, spec.fingerprint) / "manifest"
        seconds = audio = 0.0
        for f in d.glob("*.parquet") if d.is_dir() else []:
            if f.stat().st_mtime >= since:
                m = _meta(f)
                seconds += m.get("seconds", 0.0)
                audio += m.get("audio_seconds", 0.0)
        out[spec.name] = {"worker_seconds": round(seconds, 3), "audio_seconds": round(audio, 3)}
    return out


def stage_costs(output: Path, this_run: dict[str, dict] | None = None) -> list[dict]:
    """Worker time per stage (from the part metadata the runner writes), in pipeline order: in
    all of the outputs' making, and in the run that wrote the report (``this_run``); the rest was
    reused from earlier runs."""
    costs = []
    for name in _stage_order(output):
        d = output / "manifests" / name
        seconds = audio = 0.0
        for f in d.glob("*.parquet"):
            meta = _meta(f)
            seconds += meta.get("seconds", 0.0)
            audio += meta.get("audio_seconds", 0.0)
        try:
            gpus = float(json.loads((d / "_stage.json").read_text())["resources"]["num_gpus"])
        except (OSError, ValueError, KeyError):
            gpus = 0.0
        fresh = (this_run or {}).get(name, {})
        if audio > 0:
            costs.append({"stage": name, "worker_seconds": round(seconds, 2), "audio_hours": round(audio / 3600, 4),
                          "rtf": round(seconds / audio, 5), "gpus_per_worker": gpus,
                          "audio_hours_per_worker_hour": round(audio / seconds, 1) if seconds else None,
                          "this_run_worker_seconds": round(fresh.get("worker_seconds", 0.0), 2),
                          "this_run_audio_hours": round(fresh.get("audio_seconds", 0.0) / 3600, 4),
                          "reused_worker_seconds": round(max(0.0, seconds - fresh.get("worker_seconds", 0.0)), 2)})
    return costs


def _category(reason: str | None) -> str:
    return (reason or "unknown").split(":")[0].strip() or "unknown"


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(spans) -> float:
    return sum(b - a for a, b in spans)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def funnel(ledger: list[dict], tables: list[tuple[str, str, list[dict]]]) -> list[dict]:
    """Rows of the funnel (see the module doc)."""
    dur = {r["recording_id"]: float(r["duration"] or 0.0) for r in ledger}
    speech: dict[str, list[tuple[float, float]]] | None = None
    files = set(dur)
    rows = [{"row": "input", "counts": "input files (ledger rows)", "files": len(files), "segments": None,
             "audio_seconds": sum(dur.values()), "speech_seconds": None}]
    segs: dict[str, tuple[str, float, float]] | None = None  # segment id -> (rid, start, end)
    for stage, schema, trows in tables:
        if "segment_id" in manifests.SCHEMAS[schema].names:
            ok = {r["segment_id"]: (r["recording_id"], r["start"], r["end"]) for r in trows if r["status"] == "ok"}
            if segs is None:
                segs = {k: v for k, v in ok.items() if v[0] in files}
            else:
                segs = {k: v for k, v in segs.items() if k in ok}
            by_rec: dict[str, list[tuple[float, float]]] = {}
            for rid, a, b in segs.values():
                by_rec.setdefault(rid, []).append((max(0.0, a), min(dur.get(rid, 0.0), b)))
            spans = {rid: _union(s) for rid, s in by_rec.items()}
            rows.append({"row": stage, "counts": f"segments kept after {stage}", "files": len(spans),
                         "segments": len(segs), "audio_seconds": sum(_length(s) for s in spans.values()),
                         "speech_seconds": None if speech is None else
                         sum(_intersection(s, speech.get(rid, [])) for rid, s in spans.items())})
        else:
            if segs is not None:
                continue  # a recording-level table after the segments: the segment rows say more
            ok = {r["recording_id"] for r in trows if r["status"] == "ok"}
            files = files & ok
            if schema == "vad":
                speech = {r["recording_id"]: _union([(s["start"], s["end"]) for s in r["speech"] or []])
                          for r in trows if r["recording_id"] in files}
            rows.append({"row": stage, "counts": f"files that passed {stage}", "files": len(files), "segments": None,
                         "audio_seconds": sum(dur.get(rid, 0.0) for rid in files),
                         "speech_seconds": None if speech is None else
                         sum(_length(speech.get(rid, [])) for rid in files)})
    first_speech = next((r["speech_seconds"] for r in rows if r["speech_seconds"] is not None), None)
    for r in rows:
        r["audio_share"] = r["audio_seconds"] / rows[0]["audio_seconds"] if rows[0]["audio_seconds"] else None
        r["speech_share"] = r["speech_seconds"] / first_speech if first_speech and r["speech_seconds"] is not None \
            else None
    return rows


def cutoffs(output: Path) -> dict[str, list[float]]:
    """The configured cutoffs of the plotted quantities, from the stage records."""
    out: dict[str, list[float]] = {"dnsmos_ovrl": [], "num_turns": [], "duration": []}
    for rec in (output / "manifests").glob("*/_stage.json"):
        try:
            d = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        cfg, cls = d.get("config") or {}, d.get("class", "")
        if cls.endswith("QualityStage") and cfg.get("min_ovrl") is not None:
            out["dnsmos_ovrl"].append(float(cfg["min_ovrl"]))
        elif cls.endswith("SegmentStage"):
            out["duration"] += [float(cfg[k]) for k in ("min_duration", "max_duration") if cfg.get(k) is not None]
        elif cls.endswith("RulesStage"):
            t = cfg.get("turns") or {}
            if t.get("enabled", True):
                out["num_turns"] += [float(t[k]) for k in ("min_turns", "max_turns") if isinstance(t.get(k), (int, float))]
    return out


def summarize(output: Path, this_run: dict[str, dict] | None = None) -> dict:
    ledger = manifests.read_manifest(output, "ledger").to_pylist() if (output / "ledger.parquet").exists() else []
    in_run = {r["recording_id"] for r in ledger}
    tables = [(st, sc, [r for r in rows if r["recording_id"] in in_run]) for st, sc, rows in _tables(output)]
    kept = [r for st, sc, rows in tables if sc == "export" for r in rows if r["status"] == "ok"]
    files = Counter(r["status"] for r in ledger)
    file_reasons = Counter(f"{r['stage']}: {_category(r['reason'])}" for r in ledger if r["status"] in ("rejected", "failed"))
    seg_reasons = _first_verdicts(tables)
    langs = sorted({r["language"] or "und" for r in kept})
    per_lang = {
        lang: {
            "segments": sum(1 for r in kept if (r["language"] or "und") == lang),
            "seconds": round(sum(r["end"] - r["start"] for r in kept if (r["language"] or "und") == lang), 3),
        }
        for lang in langs
    }
    return {
        "funnel": funnel(ledger, tables),
        "costs": stage_costs(output, this_run),
        "files": dict(files),
        "file_reasons": dict(file_reasons.most_common()),
        "segment_reasons": dict(seg_reasons.most_common()),
        "languages": per_lang,
        "cutoffs": cutoffs(output),
        "kept_segments": [
            {"language": r["language"] or "und", "dnsmos_ovrl": r["dnsmos_ovrl"], "num_turns": r["num_turns"],
             "duration": r["end"] - r["start"]} for r in kept
        ],
    }


def _first_verdicts(tables) -> Counter:
    """Each dropped segment once, under the stage that dropped it first."""
    seen: set[str] = set()
    out: Counter = Counter()
    for stage, schema, rows in tables:
        if "segment_id" not in manifests.SCHEMAS[schema].names:
            continue
        for r in rows:
            if r["status"] != "ok" and r["segment_id"] not in seen:
                seen.add(r["segment_id"])
                out[f"{stage}: {_category(r['reason'])}"] += 1
    return out


def plot_distributions(kept: list[dict], path: Path, lines: dict[str, list[float]] | None = None) -> bool:
    """Violin plots of DNSMOS OVRL, number of turns and duration per language (paper, Figure 2),
    the configured cutoffs as dashed lines, n under each violin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not kept:
        return False
    lines = lines or {}
    langs = sorted({r["language"] for r in kept})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (key, title) in zip(axes, [("dnsmos_ovrl", "DNSMOS OVRL"), ("num_turns", "Number of turns"),
                                       ("duration", "Duration (s)")]):
        data = [[float(r[key]) for r in kept if r["language"] == lang and r[key] is not None] for lang in langs]
        pos = [i + 1 for i, d in enumerate(data) if d]
        present = [d for d in data if d]
        if present:
            # A violin needs spread; a single value is drawn as a point.
            spread = [d for d in present if len(set(d)) > 1]
            if spread:
                ax.violinplot(spread, [p for p, d in zip(pos, present) if len(set(d)) > 1], showmedians=True)
            for p, d in zip(pos, present):
                if len(set(d)) <= 1:
                    ax.plot([p], [d[0]], "o")
        for y in lines.get(key, []):
            ax.axhline(y, color="red", linestyle="--", linewidth=1)
        ax.set_xticks(range(1, len(langs) + 1), [f"{lang.upper()}\nn={len(d)}" for lang, d in zip(langs, data)])
        ax.set_title(title + (" (dashed: cutoff)" if lines.get(key) else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def write_report(output: str | Path, this_run: dict[str, dict] | None = None) -> Path:
    """``this_run``: worker time of the run writing the report, per stage (``this_run_costs``)."""
    output = Path(output)
    rdir = output / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    s = summarize(output, this_run)
    plotted = plot_distributions(s["kept_segments"], rdir / "distributions.png", s["cutoffs"])
    (rdir / "report.json").write_text(json.dumps({k: v for k, v in s.items() if k != "kept_segments"}, indent=2))
    lines = ["# Curation report", "", f"Output: `{output}`", "", "## Funnel", "",
             "The recordings of this run's ledger. Each row keeps what the row above kept and passed its stage:",
             "files up to the first segment stage, then the segments of those files. Audio: the files' duration,",
             "then the union of the segments' spans; speech: VAD speech inside it. Percentages: of the input",
             "audio and of the speech found by VAD.", "",
             "| stage | counts | files | segments | audio (h:mm:ss) | % audio | speech (h:mm:ss) | % speech |",
             "|---|---|---|---|---|---|---|---|"]
    for r in s["funnel"]:
        lines.append(f"| {r['row']} | {r['counts']} | {r['files']} | {'' if r['segments'] is None else r['segments']} | "
                     f"{hms(r['audio_seconds'])} | {_pct(r['audio_share'])} | "
                     f"{'' if r['speech_seconds'] is None else hms(r['speech_seconds'])} | {_pct(r['speech_share'])} |")
    lines += ["", "## Input files", "", "| status | files |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(s["files"].items())]
    if s["file_reasons"]:
        lines += ["", "## Why files left the pipeline", "", "| stage: reason | files |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["file_reasons"].items()]
    if s["segment_reasons"]:
        lines += ["", "## Why segments were dropped (each under the stage that dropped it first)", "",
                  "| stage: reason | segments |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["segment_reasons"].items()]
    if s["languages"]:
        lines += ["", "## Kept segments per language", "", "| language | segments | h:mm:ss |", "|---|---|---|"]
        lines += [f"| {k} | {v['segments']} | {hms(v['seconds'])} |" for k, v in s["languages"].items()]
    if s["costs"]:
        lines += ["", "## Processing cost per stage", "",
                  "Worker time measured inside the stage (model and I/O, not Ray scheduling): in this run, and",
                  "reused from earlier runs (results of the same config kept). With GPU workers, audio hours per",
                  "worker hour is audio hours per GPU hour (times GPUs per worker).",
                  "", "| stage | audio hours | worker s (all) | this run: worker s | this run: audio h | reused worker s "
                  "| RTF | audio hours per worker hour | GPUs per worker |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['stage']} | {c['audio_hours']:.4f} | {c['worker_seconds']:.1f} | {c['this_run_worker_seconds']:.1f} | "
                  f"{c['this_run_audio_hours']:.4f} | {c['reused_worker_seconds']:.1f} | {c['rtf']:.4f} | "
                  f"{c['audio_hours_per_worker_hour']} | {c['gpus_per_worker']:g} |" for c in s["costs"]]
    if plotted:
        lines += ["", "## Distributions of the kept segments", "",
                  "n under each language; dashed lines: the configured cutoffs.", "", "![distributions](distributions.png)"]
    (rdir / "report.md").write_text("\n".join(lines) + "\n")
    return rdir / "report.md"
