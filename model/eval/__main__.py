"""Score generated dialogues: ``python -m model.eval --test-list test.tsv --gen-dir out/ --metrics wer,cpwer,cpsim``.

The test list is the reference's tsv: 6 columns (name, prompt text 1, prompt text 2, prompt wav 1,
prompt wav 2, text) or 4 columns (name, merged prompt text, merged prompt wav, text). Generated
audio is ``<gen-dir>/<name>.<extension>``. All audio is scored as 16 kHz mono.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.eval.metrics import (
    CPWER_MAX_SECONDS,
    UTMOS,
    ErrorCounts,
    cpsim_from_embeddings,
    cpwer_counts,
    dialogue_embeddings,
    wer_counts,
)
from model.features import load_audio
from pipeline import clitools
from pipeline.audio import ANALYSIS_SR

log = logging.getLogger("model.eval")
METRICS = ("wer", "cpwer", "cpsim", "utmos")


@dataclass
class TestItem:
    name: str
    prompt_wavs: list[Path]  # two single-speaker prompts, or one merged dialogue prompt
    text: str


def read_test_list(path: str | Path) -> list[TestItem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"test list not found: {path}")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) == 6:
                name, _, _, wav1, wav2, text = cols
                wavs = [wav1, wav2]
            elif len(cols) == 4:
                name, _, wav, text = cols
                wavs = [wav]
            else:
                raise ValueError(f"{path}:{lineno}: expected 4 or 6 tab-separated columns, got {len(cols)}")
            items.append(TestItem(name, [_resolve(w, path.parent) for w in wavs], text))
    if not items:
        raise ValueError(f"{path}: test list is empty")
    return items


def _resolve(wav: str, base: Path) -> Path:
    p = Path(wav)
    return p if p.is_absolute() or p.exists() else base / p


def evaluate(
    items: list[TestItem],
    gen_dir: str | Path,
    metrics: list[str],
    asr=None,
    embed=None,
    diarize=None,
    utmos: UTMOS | None = None,
    lang: str = "en",
    extension: str = "wav",
    decode_path: str | Path | None = None,
) -> dict:
    """Corpus scores (WER/cpWER in percent, pooled) plus per-utterance details in ``"utterances"``."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    if "cpwer" in metrics and lang != "en":
        raise ValueError("cpWER is defined for English only (WhisperD transcribes the speaker turns)")
    gen_dir = Path(gen_dir)
    waves = {}
    for it in items:
        path = gen_dir / f"{it.name}.{extension}"
        if not path.is_file():
            raise FileNotFoundError(f"generated audio missing for {it.name!r}: {path}")
        waves[it.name] = load_audio(path, ANALYSIS_SR, mono=True)

    rows = {it.name: {"name": it.name, "seconds": len(waves[it.name]) / ANALYSIS_SR} for it in items}
    result: dict = {}
    if "wer" in metrics or "cpwer" in metrics:
        if asr is None:
            raise ValueError("WER/cpWER need an ASR model")
        hyps = asr([waves[it.name] for it in items])
        wer_all, wer_short, cp_short = ErrorCounts(), ErrorCounts(), ErrorCounts()
        for it, hyp in zip(items, hyps):
            row = rows[it.name]
            counts = wer_counts(it.text, hyp, lang)
            row.update(hypothesis=hyp, reference=it.text, errors=counts.errors, ref_words=counts.ref_words)
            wer_all = wer_all + counts
            if "cpwer" in metrics and row["seconds"] <= CPWER_MAX_SECONDS:
                cp = cpwer_counts(it.text, hyp, lang)
                row.update(cp_errors=cp.errors)
                wer_short, cp_short = wer_short + counts, cp_short + cp
        result["wer"] = wer_all.wer
        result["ref_words"] = wer_all.ref_words
        if "cpwer" in metrics:
            # cpWER is scored on dialogues of at most 30 s (Whisper's window); WER on the same subset
            result["cpwer"] = cp_short.wer
            result["wer_short"] = wer_short.wer
            result["num_short"] = sum(1 for r in rows.values() if "cp_errors" in r)
    if "cpsim" in metrics:
        if embed is None or diarize is None:
            raise ValueError("cpSIM needs a speaker embedder and a diarizer")
        scores = []
        for it in items:
            gen = dialogue_embeddings(waves[it.name], embed, diarize)
            score = cpsim_from_embeddings(gen, _prompt_embeddings(it, embed, diarize))
            rows[it.name]["cpsim"] = score
            scores.append(score)
        result["cpsim"] = float(np.mean(scores))
    if "utmos" in metrics:
        if utmos is None:
            raise ValueError("UTMOS needs a model (--utmos-model)")
        scores = [utmos.score(waves[it.name]) for it in items]
        for it, s in zip(items, scores):
            rows[it.name]["utmos"] = s
        result["utmos"] = float(np.mean(scores))
    result["num_utterances"] = len(items)
    result["utterances"] = list(rows.values())
    if decode_path:
        with open(decode_path, "w", encoding="utf-8") as f:
            for row in rows.values():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return result


def _prompt_embeddings(it: TestItem, embed, diarize) -> list[np.ndarray]:
    waves = [load_audio(p, ANALYSIS_SR) for p in it.prompt_wavs]
    if len(waves) == 2:
        return [embed(w) for w in waves]
    return dialogue_embeddings(waves[0], embed, diarize)  # merged prompt: diarize it too


def build_parser() -> argparse.ArgumentParser:
    p = clitools.parser("python -m model.eval", __doc__)
    p.add_argument("--test-list", required=True, help="tsv with 6 (split prompts) or 4 (merged prompt) columns")
    p.add_argument("--gen-dir", required=True, help="directory of generated <name>.<extension> files")
    p.add_argument("--extension", default="wav", help="file extension of the generated audio")
    p.add_argument("--metrics", default="wer,cpwer,cpsim", help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--lang", default="en", choices=["en", "zh"], help="language of the test set")
    p.add_argument("--asr", default="jordand/whisper-d-v1a", help="Whisper dir / hub id, or 'pocketsphinx'")
    p.add_argument("--embedder", default="resemblyzer", choices=["resemblyzer", "wavlm-ecapa"],
                   help="speaker embedder of cpSIM")
    p.add_argument("--ecapa-checkpoint", help="wavlm_large_finetune.pth (for --embedder wavlm-ecapa)")
    p.add_argument("--wavlm-dir", help="local Hugging Face WavLM-Large directory (for --embedder wavlm-ecapa)")
    p.add_argument("--utmos-model", help="UTMOS22 TorchScript file")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present for ASR, cpu for speakers)")
    p.add_argument("--num-threads", type=int, default=1, help="torch CPU threads (1, as the reference scripts)")
    p.add_argument("--decode-path", help="write per-utterance results (jsonl) here")
    p.add_argument("--output", help="write the summary json here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    # the per-file models are small: more intra-op threads mostly add contention
    torch.set_num_threads(args.num_threads)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    items = read_test_list(args.test_list)
    asr = embed = diarize = utmos = None
    if "wer" in metrics or "cpwer" in metrics:
        from model.eval.asr import load_asr

        asr = load_asr(args.asr, device=args.device, language=args.lang)
    if "cpsim" in metrics:
        from model.eval.speaker import SimpleDiarizer, load_embedder

        device = args.device or "cpu"
        embed = load_embedder(args.embedder, args.ecapa_checkpoint, args.wavlm_dir, device)
        shared = getattr(embed, "encoder", None)  # reuse the resemblyzer encoder if we have one
        diarize = SimpleDiarizer(encoder=shared, device=device)
    if "utmos" in metrics:
        utmos = UTMOS(args.utmos_model)
    result = evaluate(items, args.gen_dir, metrics, asr, embed, diarize, utmos, args.lang, args.extension, args.decode_path)
    summary = {k: v for k, v in result.items() if k != "utterances"}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return result


def cli(argv: list[str] | None = None) -> int:
    """``python -m model.eval``: :func:`main` with errors as one ``error:`` line (exit 2)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    return clitools.run(lambda: (main(argv), 0)[1], debug)


if __name__ == "__main__":
    sys.exit(cli())
