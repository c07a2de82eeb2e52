"""Make what a tiny ZipVoice-Dialog training run needs, from a corpus (CPU smoke runs, tutorials).

    python -m model.tiny --corpus out/local/export --out data/tiny
    python -m model.train --config configs/train_tiny.yaml

writes into --out:
  zipvoice/            a tiny ZipVoice (monologue) model folder with random weights: model.pt,
                       model.json (configs/model/zipvoice_tiny.json), tokens.txt; it stands in for
                       the stage-1 model that the dialog curriculum initialises from;
  tokens_dialog.txt    its token table plus the 28 dialog tokens ([S1], [S2], 26 spares);
  prompt.wav,          the shortest utterance of the corpus and its text: a prompt for
  prompt.txt           `python -m model.infer` (short prompts keep inference quick).

The token table is the espeak phoneme map of piper-phonemize plus the pinyin units (so any English
or Chinese text can be tokenized), plus every other token the corpus' texts produce: the corpus is
always covered. The real models ship their own tokens.txt: use those for real training.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from pipeline import clitools

REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "model" / "zipvoice_tiny.json"
DIALOG_TOKENS = ["[S1]", "[S2]"] + [f"<extra{i}>" for i in range(26)]


def corpus_manifests(corpus: Path) -> list[Path]:
    """An export folder (its manifest.<lang>.jsonl files) or one manifest file."""
    if corpus.is_file():
        return [corpus]
    if corpus.is_dir():
        found = sorted(corpus.glob("manifest.*.jsonl"))
        if found:
            return found
        raise FileNotFoundError(f"{corpus}: no manifest.<lang>.jsonl in this folder "
                                "(run the pipeline first: it writes them into <output>/export)")
    raise FileNotFoundError(f"{corpus}: no such corpus folder or manifest")


def make_tiny(corpus: str | Path, out: str | Path, *, model_config: str | Path = REPO_CONFIG,
              seed: int = 0) -> dict:
    import soundfile as sf
    import torch

    from model.checkpoint import NUM_DIALOG_EXTRA_TOKENS, build_model, read_model_config, save_model
    from model.data import read_manifest
    from model.features import load_audio
    from model.tokenizer import build_espeak_token_table, get_tokenizer, write_tokens

    assert len(DIALOG_TOKENS) == NUM_DIALOG_EXTRA_TOKENS
    out = Path(out)
    utts = []
    for m in corpus_manifests(Path(corpus)):
        utts += read_manifest(m, dataset=m.stem)
    if not utts:
        raise ValueError(f"{corpus}: the corpus has no utterances")

    table = build_espeak_token_table()
    corpus_tokens = get_tokenizer("dialog", None).texts_to_tokens([u.text for u in utts])
    extra = sorted({t for toks in corpus_tokens for t in toks} - set(table) - set(DIALOG_TOKENS))
    for tok in extra:
        table[tok] = len(table)
    dialog = dict(table)
    for tok in DIALOG_TOKENS:
        dialog[tok] = len(dialog)
    out.mkdir(parents=True, exist_ok=True)
    write_tokens(out / "tokens_dialog.txt", dialog)

    torch.manual_seed(seed)
    random.seed(seed)
    model = build_model("zipvoice", read_model_config(model_config), table)
    save_model(model, out / "zipvoice", table)

    prompt = min(utts, key=lambda u: (u.duration, u.id))
    wave = load_audio(prompt.audio, 24000, mono=True)
    sf.write(str(out / "prompt.wav"), wave, 24000)
    (out / "prompt.txt").write_text(prompt.text + "\n", encoding="utf-8")
    return {"utterances": len(utts), "tokens": len(dialog), "corpus_only_tokens": extra,
            "parameters": sum(p.numel() for p in model.parameters()), "prompt": prompt.id}


def main(argv: list[str] | None = None) -> int:
    p = clitools.parser("python -m model.tiny", __doc__)
    p.add_argument("--corpus", required=True,
                   help="the pipeline's export folder (manifest.<lang>.jsonl) or one manifest file")
    p.add_argument("--out", default="data/tiny", help="folder to write (configs/train_tiny.yaml reads data/tiny)")
    p.add_argument("--model-config", default=str(REPO_CONFIG), help="model.json of the tiny model")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)

    def body() -> int:
        info = make_tiny(args.corpus, args.out, model_config=args.model_config, seed=args.seed)
        out = Path(args.out)
        print(f"{args.corpus}: {info['utterances']} utterances; token table of {info['tokens']} tokens "
              f"({len(info['corpus_only_tokens'])} found only in the corpus)")
        print(f"wrote {out / 'zipvoice'} (tiny ZipVoice, {info['parameters']:,} random parameters), "
              f"{out / 'tokens_dialog.txt'}, {out / 'prompt.wav'} + prompt.txt ({info['prompt']})")
        return 0

    return clitools.run(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
