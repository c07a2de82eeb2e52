"""Real recorded speech through a whole pipeline profile (default: configs/local.yaml).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_real.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_real.py --config configs/local.yaml --output /tmp/real

Inputs: every clip of ``../shared/realspeech/`` (see its README) and pyannote.audio's packaged
``sample.wav`` (a real two-speaker phone call, with ``sample.rttm`` and a speaker-attributed
``sample.stm``). Per file it prints:

* where the file left the pipeline and why (the ledger), and the segments kept;
* speakers found by the diarization stage vs true (from the reference);
* DER (pyannote.metrics, no collar, overlap scored) where an RTTM exists;
* WER (en) or CER (zh) of the ASR stage's transcript, speaker-agnostic: every utterance in time
  order against the reference, both normalised like the trainer's evaluation
  (``model.eval.metrics``: tags and punctuation removed, lowercase, Chinese split into characters);
* cpWER (concatenated minimum-permutation WER: speaker streams paired in the best order) where the reference
  attributes speakers (``[S1]``/``[S2]`` text or an STM): of the ASR stage's speaker-attributed
  utterances, and of the exported ``[S1]``/``[S2]`` segment texts (each segment's tags mapped
  back to the diarization speakers it records, so that streams are consistent across segments);
* then the run's worker time per audio second for every stage (RTF) and the mean WER of the
  English two-speaker dialogues.

Speed figures depend on what else runs on the machine: the script prints the load average.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.eval.metrics import normalize_text, wer_counts, word_errors  # noqa: E402
from pipeline import manifests, report  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.runner import run_pipeline  # noqa: E402
from tools.scoring import diarization_error  # noqa: E402

TAG = re.compile(r"\[(S\d+)\]")


def references(realspeech: Path) -> dict[str, dict]:
    """name -> {wav, lang, text, streams (speaker -> text) or None, rttm turns or None, speakers}."""
    out: dict[str, dict] = {}
    for wav in sorted(realspeech.glob("*.wav")):
        ref: dict = {"wav": wav, "lang": wav.stem.split("_")[0], "text": None, "streams": None, "rttm": None,
                     "speakers": None}
        m = re.match(r"[a-z]+_(\d+)spk", wav.stem)
        if m:
            ref["speakers"] = int(m.group(1))
        txt = wav.with_suffix(".txt")
        if txt.exists():
            ref["text"] = txt.read_text(encoding="utf-8")
            ref["streams"] = tagged_streams(ref["text"])
        rttm = wav.with_suffix(".rttm")
        if rttm.exists():
            ref["rttm"] = read_rttm(rttm)
        out[wav.stem] = ref
    import pyannote.audio

    sample = Path(pyannote.audio.__file__).parent / "sample"
    streams: dict[str, list[str]] = {}
    for line in (sample / "sample.stm").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            streams.setdefault(parts[2], []).append(parts[5])
    out["pyannote_sample"] = {"wav": sample / "sample.wav", "lang": "en", "rttm": read_rttm(sample / "sample.rttm"),
                              "text": " ".join(line.split(maxsplit=5)[5] for line in
                                               (sample / "sample.stm").read_text().splitlines() if line.strip()),
                              "streams": {k: " ".join(v) for k, v in streams.items()}, "speakers": len(streams)}
    return out


def tagged_streams(text: str) -> dict[str, str] | None:
    """``[S1] a [S2] b [S1] c`` -> {"S1": "a c", "S2": "b"}; None when the text has no tags."""
    parts = TAG.split(text)
    if len(parts) < 3:
        return None
    streams: dict[str, list[str]] = {}
    for spk, words in zip(parts[1::2], parts[2::2]):
        streams.setdefault(spk, []).append(words.strip())
    return {k: " ".join(v) for k, v in streams.items()}


def read_rttm(path: Path) -> list[tuple[float, float, str]]:
    turns = []
    for line in path.read_text().splitlines():
        f = line.split()
        if f and f[0] == "SPEAKER":
            turns.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return turns


def cpwer(ref: dict[str, str], hyp: dict[str, str], lang: str) -> float:
    """cpWER: the speaker streams of reference and hypothesis paired one to one (missing streams
    empty) in the order that gives the fewest word errors, errors summed over the pairs, divided
    by the reference words. Texts normalised like ``wer_counts`` (zh: characters)."""
    r = [normalize_text(v, lang) for v in ref.values()]
    h = [normalize_text(v, lang) for v in hyp.values()]
    n = max(len(r), len(h))
    r, h = r + [""] * (n - len(r)), h + [""] * (n - len(h))
    best = min(sum(word_errors(a, b).errors for a, b in zip(r, perm)) for perm in itertools.permutations(h))
    return best / max(1, sum(len(a.split()) for a in r))


def export_streams(rows: list[dict], speakers_of: dict[str, list[str]]) -> dict[str, str]:
    """Exported segment texts of one recording -> diarization speaker -> text, in time order."""
    streams: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r["start"]):
        order = speakers_of.get(r["segment_id"]) or []
        parts = TAG.split(r["text"] or "")
        for tag, words in zip(parts[1::2], parts[2::2]):
            k = int(tag[1:]) - 1
            spk = order[k] if k < len(order) else f"{r['segment_id']}:{tag}"
            streams.setdefault(spk, []).append(words.strip())
    return {k: " ".join(v) for k, v in streams.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    ap.add_argument("--realspeech", default=str(ROOT.parent / "shared" / "realspeech"))
    ap.add_argument("--output", help="pipeline output (default: a temporary folder)")
    args = ap.parse_args(argv)

    refs = references(Path(args.realspeech))
    work = Path(tempfile.mkdtemp(prefix="bench_real_"))
    src = work / "input"
    src.mkdir()
    for name, ref in refs.items():
        (src / f"{name}.wav").symlink_to(ref["wav"])
    output = Path(args.output) if args.output else work / "out"
    cfg = load_config(args.config, {"progress": False})
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = run_pipeline(cfg, str(src), str(output))
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]

    def table(name: str, schema: str | None = None) -> dict[str, dict]:
        try:
            return {r["recording_id"]: r for r in manifests.read_manifest(output, name, schema).to_pylist()}
        except Exception:  # noqa: BLE001 - the profile may not have this stage
            return {}

    # The inputs are links: the runner records the files they point to.
    name_of = {str(Path(r["wav"]).resolve()): n for n, r in refs.items()}
    key = lambda r: name_of.get(str(Path(r["source_path"]).resolve()), Path(r["source_path"]).stem)  # noqa: E731
    ingest = {key(r): r for r in table("ingest", "recordings").values()}
    ledger = {key(r): r for r in manifests.read_manifest(output, "ledger").to_pylist()}
    diar, asr = table("diarization"), table("asr")
    segments = manifests.read_manifest(output, "segments").to_pylist() if (output / "manifests" / "segments").exists() else []
    speakers_of = {s["segment_id"]: s["speakers"] for s in segments}
    exported: dict[str, list[dict]] = {}
    if (output / "manifests" / "export").exists():
        for r in manifests.read_manifest(output, "export").to_pylist():
            if r["status"] == "ok":
                exported.setdefault(r["recording_id"], []).append(r)

    print(f"\n== {Path(args.config).name} on {len(refs)} real recordings: {wall:.0f} s wall "
          f"(load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores) ==")
    head = f"{'file':<38} {'s':>5} {'fate':<44} {'spk':>5} {'DER':>6} {'WER':>6} {'cpWER':>6} {'cpWERx':>6}"
    print(head + "\n" + "-" * len(head))
    dialogue_wers = []
    notes = []
    for name, ref in refs.items():
        led = ledger.get(name, {})
        rid = (ingest.get(name) or {}).get("recording_id")
        fate = led.get("status", "?")
        if fate == "kept":
            fate += f" {led.get('kept_segments')} seg {led.get('kept_duration') or 0:.1f} s"
        else:
            fate += f" at {led.get('stage')}: {led.get('reason') or ''}"
        d = diar.get(rid) or {}
        found = d.get("num_speakers")
        spk = f"{found if found is not None else '-'}/{ref['speakers'] or '?'}"
        der = "-"
        if ref["rttm"] and d.get("turns") is not None:
            hyp = [(t["start"], t["end"], t["speaker"]) for t in d["turns"]]
            der = f"{diarization_error(ref['rttm'], hyp, led.get('duration') or 0)['der']:.3f}"
        wer = cp = cpx = "-"
        a = asr.get(rid) or {}
        utts = sorted(a.get("utterances") or [], key=lambda u: u["start"])
        lang = ref["lang"]
        if ref["text"] and a:
            e = wer_counts(ref["text"], " ".join(u["text"] for u in utts), lang)
            wer = f"{e.wer / 100:.3f}"
            if lang == "en" and (ref["speakers"] or 0) == 2:
                dialogue_wers.append(e.wer / 100)
            if a.get("language") not in (None, lang):
                notes.append(f"{name}: ASR ran as {a.get('language')!r} on {lang!r} speech")
        if ref["streams"] and a:
            streams: dict[str, list[str]] = {}
            for u in utts:
                streams.setdefault(u["speaker"], []).append(u["text"])
            cp = f"{cpwer(ref['streams'], {k: ' '.join(v) for k, v in streams.items()}, lang):.3f}"
            if rid in exported:
                cpx = f"{cpwer(ref['streams'], export_streams(exported[rid], speakers_of), lang):.3f}"
        dur = led.get("duration") or 0.0
        print(f"{name[:38]:<38} {dur:5.1f} {fate[:44]:<44} {spk:>5} {der:>6} {wer:>6} {cp:>6} {cpx:>6}")
    print("spk = speakers found/true; WER = the ASR stage's transcript (zh: CER); cpWER = its speaker-attributed "
          "utterances; cpWERx = the exported [S1]/[S2] segments ('-': nothing exported or no attributed reference)")
    for n in notes:
        print("note:", n)
    if dialogue_wers:
        print(f"mean WER of the English two-speaker dialogues: {sum(dialogue_wers) / len(dialogue_wers):.3f} "
              f"({len(dialogue_wers)} files)")
    # What the rule and DNSMOS thresholds see on real speech (every segment that reached them).
    lang_of = {(ingest.get(n) or {}).get("recording_id"): r["lang"] for n, r in refs.items()}
    rates = [(r["metrics"] or {}).get("words_per_second") for r in
             (manifests.read_manifest(output, "rules").to_pylist() if (output / "manifests" / "rules").exists() else [])
             if lang_of.get(r["recording_id"]) == "en"]
    rates = sorted(x for x in rates if x is not None)
    if rates:
        print(f"English segments at the rules: {len(rates)}, words per second {rates[0]:.2f}-{rates[-1]:.2f} "
              f"(median {rates[len(rates) // 2]:.2f})")
    ovrl = sorted(r["dnsmos_ovrl"] for r in (manifests.read_manifest(output, "quality").to_pylist()
                                              if (output / "manifests" / "quality").exists() else [])
                  if r["dnsmos_ovrl"] is not None)
    if ovrl:
        print(f"segments scored by DNSMOS: {len(ovrl)}, OVRL {ovrl[0]:.2f}-{ovrl[-1]:.2f} (median {ovrl[len(ovrl) // 2]:.2f})")
    print("\nworker seconds per audio second (RTF) per stage:")
    for c in report.stage_costs(output):
        print(f"  {c['stage']:<15} {c['rtf']:.4f}  ({c['worker_seconds']:.1f} s for {c['audio_hours'] * 3600:.0f} s of audio)")
    print(f"\noutput: {res.output}")


if __name__ == "__main__":
    main()
