"""Compare two pipeline output folders: are the ledger, every stage manifest and the export the same?

    python -m tools.compare_runs OUT_A OUT_B      # exit 0: identical; 1: differences (listed)
    python -m tools.compare_runs OUT_A OUT_B --ignore RECORDING_ID ...   # leave recordings out

Compared: ``ledger.parquet``; every ``manifests/<stage>/<stage>.parquet`` row by row, with the
verdicts recorded in its metadata; ``_stage.json`` (config, version, fingerprint); the export's file
list, its jsonl/Parquet content and every audio file (bytes, else decoded samples). Ignored, because
they legitimately differ between two runs: worker seconds (``seconds`` in part metadata), the
``resources`` of a stage record (scaled to the machine), the report's timing and plots, and the
output folder's own path (replaced by ``<OUT>`` in every string before comparing). ``--ignore``
leaves out the rows and verdicts of recordings known to vary between runs (then the audio
duration totals of the part metadata are not compared either).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

PART_META_KEY = b"opendialog.part"


def _norm(value, root: str):
    if isinstance(value, str):
        return value.replace(root, "<OUT>")
    if isinstance(value, list):
        return [_norm(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v, root) for k, v in value.items()}
    return value


def _parquet(path: Path, root: str, ignore: frozenset = frozenset()) -> tuple[list[dict], dict]:
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(PART_META_KEY, b"{}"))
    meta.pop("seconds", None)
    if ignore:
        meta.pop("audio_seconds", None)
        meta["outcomes"] = {k: v for k, v in meta.get("outcomes", {}).items() if k not in ignore}
    rows = [r for r in table.to_pylist() if r.get("recording_id") not in ignore]
    return _norm(rows, root), meta


def _key(row: dict, i: int):
    return row.get("segment_id") or row.get("recording_id") or i


def _diff_rows(what: str, a: list[dict], b: list[dict], out: list[str]) -> None:
    """Rows matched by their key (segment, else recording), so that one extra row is one line."""
    ka = {_key(r, i): r for i, r in enumerate(a)}
    kb = {_key(r, i): r for i, r in enumerate(b)}
    out += [f"{what} [{k}]: only in the first run" for k in ka if k not in kb]
    out += [f"{what} [{k}]: only in the second run" for k in kb if k not in ka]
    for key, ra in ka.items():
        rb = kb.get(key)
        if rb is None or ra == rb:
            continue
        cols = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
        for c in cols[:5]:
            out.append(f"{what} [{key}] {c}: {str(ra.get(c))[:200]!r} vs {str(rb.get(c))[:200]!r}")


def _samples(path: Path) -> str:
    from pipeline.audio import read_source_span

    return hashlib.sha1(read_source_span(path, 0.0, 3600.0, 24000).tobytes()).hexdigest()


def _text(path: Path) -> str:
    return (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)).read()


def compare(a: Path, b: Path, ignore: frozenset = frozenset()) -> list[str]:
    out: list[str] = []
    ra, rb = str(a.resolve()), str(b.resolve())
    for rel in ["ledger.parquet"] + sorted(
            str(p.relative_to(a)) for p in (a / "manifests").glob("*/*.parquet")):
        pa_, pb_ = a / rel, b / rel
        if not pb_.exists():
            out.append(f"{rel}: only in {a}")
            continue
        rows_a, meta_a = _parquet(pa_, ra, ignore)
        rows_b, meta_b = _parquet(pb_, rb, ignore)
        _diff_rows(rel, rows_a, rows_b, out)
        if meta_a != meta_b:
            # The recorded verdicts: those that differ, one line each.
            oa, ob = meta_a.pop("outcomes", {}), meta_b.pop("outcomes", {})
            out += [f"{rel}: verdict of {rid}: {oa.get(rid)} vs {ob.get(rid)}"
                    for rid in sorted(set(oa) | set(ob)) if oa.get(rid) != ob.get(rid)]
            if meta_a != meta_b:
                out.append(f"{rel}: part metadata differs: {meta_a} vs {meta_b}")
    names_a = {str(p.relative_to(a)) for p in (a / "manifests").glob("*/*.parquet")}
    names_b = {str(p.relative_to(b)) for p in (b / "manifests").glob("*/*.parquet")}
    out += [f"{rel}: only in {b}" for rel in sorted(names_b - names_a)]
    for rec in sorted((a / "manifests").glob("*/_stage.json")):
        rel = rec.relative_to(a)
        other = b / rel
        if not other.exists():
            out.append(f"{rel}: only in {a}")
            continue
        ja, jb = (json.loads(p.read_text()) for p in (rec, other))
        for j in (ja, jb):
            j.pop("resources", None)
        if ja != jb:
            out.append(f"{rel}: {ja} vs {jb}")
    files_a = {str(p.relative_to(a / "export")) for p in (a / "export").rglob("*") if p.is_file()}
    files_b = {str(p.relative_to(b / "export")) for p in (b / "export").rglob("*") if p.is_file()}
    out += [f"export/{f}: only in {a}" for f in sorted(files_a - files_b)]
    out += [f"export/{f}: only in {b}" for f in sorted(files_b - files_a)]
    for f in sorted(files_a & files_b):
        fa, fb = a / "export" / f, b / "export" / f
        if fa.read_bytes() == fb.read_bytes():
            continue
        if f.endswith(".parquet"):
            _diff_rows(f"export/{f}", _parquet(fa, ra, ignore)[0], _parquet(fb, rb, ignore)[0], out)
        elif f.endswith((".jsonl", ".jsonl.gz")):
            ta, tb = _norm(_text(fa), ra), _norm(_text(fb), rb)
            if ta != tb:
                out.append(f"export/{f}: content differs")
        elif _samples(fa) != _samples(fb):
            out.append(f"export/{f}: decoded samples differ")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.compare_runs", description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--ignore", nargs="*", default=[], metavar="RECORDING_ID", help="recordings left out")
    args = p.parse_args(argv)
    a, b = args.first, args.second
    diffs = compare(a, b, frozenset(args.ignore))
    for d in diffs:
        print(d)
    n = len(list((a / "export").rglob("*.mp3")))
    left_out = f" (leaving out {', '.join(args.ignore)})" if args.ignore else ""
    print(f"{'identical' if not diffs else f'{len(diffs)} differences'}{left_out}: ledger, "
          f"{len(list((a / 'manifests').glob('*/*.parquet')))} manifests, export ({n} audio files)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
