"""Run report: hours at each stage, rejection reasons, and violin plots like the paper's Figure 2.

Written to ``<output>/report/``: ``report.md`` (short summary), ``report.json`` (the numbers),
``distributions.png`` (DNSMOS OVRL, number of turns and duration of the kept segments, per
language). Manifests are found by their schema, whatever the stages are called in the config.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipeline import manifests
from pipeline.store import part_meta


def _by_schema(output: Path) -> dict[str, list[dict]]:
    tables: dict[str, list[dict]] = {}
    for d in sorted((output / "manifests").glob("*")):
        files = sorted(d.glob("*.parquet"))
        if not files:
            continue
        try:
            name = manifests.schema_name(files[0])
            tables.setdefault(name, []).extend(manifests.read_manifest(output, d.name, name).to_pylist())
        except manifests.ManifestError:
            continue
    return tables


def stage_costs(output: Path) -> list[dict]:
    """Worker time per stage, from the part metadata the runner writes, in pipeline order."""
    try:
        order = [s["name"] for s in json.loads((output / "run_config.json").read_text())["stages"]]
    except (OSError, ValueError, KeyError):
        order = sorted(d.name for d in (output / "manifests").glob("*"))
    costs = []
    for name in order:
        d = output / "manifests" / name
        seconds = audio = 0.0
        for f in d.glob("*.parquet"):
            meta = part_meta(f) or {}
            seconds += meta.get("seconds", 0.0)
            audio += meta.get("audio_seconds", 0.0)
        try:
            gpus = float(json.loads((d / "_stage.json").read_text())["resources"]["num_gpus"])
        except (OSError, ValueError, KeyError):
            gpus = 0.0
        if audio > 0:
            costs.append({"stage": name, "worker_seconds": round(seconds, 2), "audio_hours": round(audio / 3600, 4),
                          "rtf": round(seconds / audio, 5), "gpus_per_worker": gpus,
                          "audio_hours_per_worker_hour": round(audio / seconds, 1) if seconds else None})
    return costs


def _category(reason: str | None) -> str:
    return (reason or "unknown").split(":")[0].strip() or "unknown"


def summarize(output: Path) -> dict:
    t = _by_schema(output)
    ledger = manifests.read_manifest(output, "ledger").to_pylist() if (output / "ledger.parquet").exists() else []
    hours = {}

    def h(x: float) -> float:
        return round(x / 3600, 4)

    recs = [r for r in t.get("recordings", []) if r["duration"]]
    hours["input"] = h(sum(r["duration"] for r in recs))
    if "vad" in t:
        hours["speech"] = h(sum(r["speech_duration"] or 0 for r in t["vad"]))
    dur = {r["recording_id"]: r["duration"] for r in recs}
    if "classification" in t:
        hours["dialogue"] = h(sum(dur.get(r["recording_id"], 0) for r in t["classification"] if r["is_dialogue"]))
    if "segments" in t:
        hours["segments"] = h(sum(r["duration"] for r in t["segments"] if r["status"] == "ok"))
    if "rules" in t:
        hours["after_rules"] = h(sum(r["end"] - r["start"] for r in t["rules"] if r["status"] == "ok"))
    if "quality" in t:
        hours["after_dnsmos"] = h(sum(r["end"] - r["start"] for r in t["quality"] if r["status"] == "ok"))
    kept = [r for r in t.get("export", []) if r["status"] == "ok"]
    if "export" in t:
        hours["kept"] = h(sum(r["duration"] for r in kept))

    files = Counter(r["status"] for r in ledger)
    file_reasons = Counter(f"{r['stage']}: {_category(r['reason'])}" for r in ledger if r["status"] in ("rejected", "failed"))
    seg_reasons: Counter = Counter()
    for schema in ("segments", "rules", "quality", "export"):
        for r in t.get(schema, []):
            if r["status"] != "ok":
                seg_reasons[f"{schema}: {_category(r['reason'])}"] += 1
    langs = sorted({r["language"] or "und" for r in kept})
    per_lang = {
        lang: {
            "segments": sum(1 for r in kept if (r["language"] or "und") == lang),
            "hours": h(sum(r["duration"] for r in kept if (r["language"] or "und") == lang)),
        }
        for lang in langs
    }
    return {
        "hours": hours,
        "costs": stage_costs(output),
        "files": dict(files),
        "file_reasons": dict(file_reasons.most_common()),
        "segment_reasons": dict(seg_reasons.most_common()),
        "languages": per_lang,
        "kept_segments": [
            {"language": r["language"] or "und", "dnsmos_ovrl": r["dnsmos_ovrl"], "num_turns": r["num_turns"],
             "duration": r["duration"]} for r in kept
        ],
    }


def plot_distributions(kept: list[dict], path: Path) -> bool:
    """Violin plots of DNSMOS OVRL, number of turns and duration per language (paper, Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not kept:
        return False
    langs = sorted({r["language"] for r in kept})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, title) in zip(axes, [("dnsmos_ovrl", "DNSMOS OVRL"), ("num_turns", "Number of turns"),
                                       ("duration", "Duration (s)")]):
        data = [[float(r[key]) for r in kept if r["language"] == lang and r[key] is not None] for lang in langs]
        pos = [i + 1 for i, d in enumerate(data) if d]
        data = [d for d in data if d]
        if data:
            # A violin needs spread; a single value is drawn as a point.
            spread = [d for d in data if len(set(d)) > 1]
            if spread:
                ax.violinplot(spread, [p for p, d in zip(pos, data) if len(set(d)) > 1], showmedians=True)
            for p, d in zip(pos, data):
                if len(set(d)) <= 1:
                    ax.plot([p], [d[0]], "o")
        ax.set_xticks(range(1, len(langs) + 1), [lang.upper() for lang in langs])
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(output: str | Path) -> Path:
    output = Path(output)
    rdir = output / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    s = summarize(output)
    plotted = plot_distributions(s["kept_segments"], rdir / "distributions.png")
    (rdir / "report.json").write_text(json.dumps({k: v for k, v in s.items() if k != "kept_segments"}, indent=2))
    lines = ["# Curation report", "", f"Output: `{output}`", "", "## Hours at each stage", "",
             "| stage | hours |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in s["hours"].items()]
    lines += ["", "## Input files", "", "| status | files |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(s["files"].items())]
    if s["file_reasons"]:
        lines += ["", "## Why files left the pipeline", "", "| stage: reason | files |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["file_reasons"].items()]
    if s["segment_reasons"]:
        lines += ["", "## Why segments were dropped", "", "| stage: reason | segments |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["segment_reasons"].items()]
    if s["languages"]:
        lines += ["", "## Kept segments per language", "", "| language | segments | hours |", "|---|---|---|"]
        lines += [f"| {k} | {v['segments']} | {v['hours']:.4f} |" for k, v in s["languages"].items()]
    if s["costs"]:
        lines += ["", "## Processing cost per stage", "",
                  "Worker time measured inside the stage (model and I/O, not Ray scheduling). With",
                  "GPU workers, audio hours per worker hour is audio hours per GPU hour (times GPUs per worker).",
                  "", "| stage | audio hours | worker seconds | RTF | audio hours per worker hour | GPUs per worker |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['stage']} | {c['audio_hours']:.4f} | {c['worker_seconds']:.1f} | {c['rtf']:.4f} | "
                  f"{c['audio_hours_per_worker_hour']} | {c['gpus_per_worker']:g} |" for c in s["costs"]]
    if plotted:
        lines += ["", "## Distributions of the kept segments", "", "![distributions](distributions.png)"]
    (rdir / "report.md").write_text("\n".join(lines) + "\n")
    return rdir / "report.md"
