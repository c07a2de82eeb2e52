"""Text -> token strings -> token ids, compatible with the official ZipVoice / ZipVoice-Dialog tokens.txt.

``tokens.txt`` holds ``token<TAB>id`` lines with ids exactly 0..V-1 (V = number of lines); the pad
token is ``_``. Tokens missing from the file are dropped silently, as the reference does, so a model
never sees an id outside its embedding table.

Tokenizers:
* ``simple``: one token per character.
* ``espeak``: espeak-ng phonemes (piper-phonemize) for one language.
* ``emilia``: mixed Chinese/English G2P of ZipVoice (pinyin initial+"0" / TONE3 final, espeak en-us
  phonemes, ``<pinyin>`` overrides and ``[tag]`` literal tokens).
* ``dialog``: ``emilia`` after removing whitespace around ``[S1]``/``[S2]``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable

from pipeline.atomic import atomic_write

log = logging.getLogger(__name__)

PAD_TOKEN = "_"
SPK_A_TOKEN = "[S1]"
SPK_B_TOKEN = "[S2]"


# --------------------------------------------------------------------------- tokens.txt


def read_tokens(path: str | os.PathLike) -> dict[str, int]:
    """Read ``token<TAB>id`` lines; ids must be exactly 0..V-1 with V the number of entries."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    token2id: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip("\t"):
                continue
            # rsplit keeps a leading space: the espeak table has the space character as a token.
            parts = line.rsplit("\t", 1)
            if len(parts) != 2 or parts[0] == "":
                raise ValueError(f"{path}:{lineno}: expected 'token<TAB>id', got {line!r}")
            token, idx = parts
            try:
                idx = int(idx)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: id {idx!r} of token {token!r} is not an integer") from None
            if token in token2id:
                raise ValueError(f"{path}:{lineno}: duplicate token {token!r}")
            token2id[token] = idx
    if not token2id:
        raise ValueError(f"{path}: token file is empty")
    ids = sorted(token2id.values())
    if ids != list(range(len(ids))):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        missing = sorted(set(range(len(ids))) - set(ids))[:5]
        detail = f"id {dup} is used twice" if dup is not None else f"missing ids {missing}"
        raise ValueError(f"{path}: ids must be exactly 0..{len(ids) - 1} (one per line): {detail}")
    return token2id


def write_tokens(path: str | os.PathLike, token2id: dict[str, int]) -> None:
    """Write a token table as ``token<TAB>id`` lines sorted by id."""
    ids = sorted(token2id.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"cannot write {path}: ids must be exactly 0..{len(ids) - 1}")
    for tok in token2id:
        if tok == "" or any(c in tok for c in "\t\n\r"):
            raise ValueError(f"cannot write {path}: token {tok!r} is empty or holds a tab/newline")
    lines = [f"{tok}\t{idx}\n" for tok, idx in sorted(token2id.items(), key=lambda kv: kv[1])]
    atomic_write(Path(path), "".join(lines))


def build_char_token_table(texts: Iterable[str]) -> dict[str, int]:
    """Character table for the ``simple`` tokenizer: ``_`` first, then characters by frequency."""
    counts = Counter()
    for t in texts:
        counts.update(t)
    counts.pop(PAD_TOKEN, None)
    for c in "\t\n\r":
        counts.pop(c, None)
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    table = {PAD_TOKEN: 0}
    for c, _ in order:
        table[c] = len(table)
    return table


@functools.lru_cache(maxsize=1)
def pinyin_units() -> tuple[str, ...]:
    """Sorted pinyin units: every initial with a trailing "0" and every TONE3 final with tones 1..5."""
    from pypinyin.contrib.tone_convert import to_finals_tone3, to_initials
    from pypinyin.pinyin_dict import pinyin_dict

    bases = set()
    for readings in set(pinyin_dict.values()):
        for r in readings.split(","):
            # strip tone marks; the diaeresis of ü survives as "v"
            plain = "".join(c for c in unicodedata.normalize("NFD", r) if c == "\u0308" or not unicodedata.combining(c))
            bases.add(plain.replace("u\u0308", "v"))
    units = set()
    for base in bases:
        if not base.isalpha() or not base.isascii():
            continue  # rare readings such as "ê" or syllabic "m̄"
        ini = to_initials(base, strict=False)
        if ini:
            units.add(ini + "0")
        for tone in "12345":
            fin = to_finals_tone3(base + tone, strict=False, neutral_tone_with_five=True)
            if fin:
                units.add(fin)
    return tuple(sorted(units))


def build_espeak_token_table(extra_tokens: Iterable[str] = ()) -> dict[str, int]:
    """espeak map of piper-phonemize (sorted by id), then pinyin units, then ``extra_tokens``.

    For tests and tiny models only: the official models were built with a table that this one does
    not reproduce exactly (the vocab sizes differ). Always read the official tokens.txt.
    """
    from piper_phonemize import get_espeak_map

    espeak = sorted(get_espeak_map().items(), key=lambda kv: kv[1][0])
    table: dict[str, int] = {}
    for tok in [t for t, _ in espeak] + list(pinyin_units()) + list(extra_tokens):
        if tok not in table:
            table[tok] = len(table)
    return table


# --------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """Base class: token table handling. Subclasses implement ``texts_to_tokens``."""

    def __init__(self, token_file: str | os.PathLike | None = None):
        self.token_file = token_file
        if token_file is None:
            self.token2id: dict[str, int] = {}
            self.pad_id = None
        else:
            self.token2id = read_tokens(token_file)
            if PAD_TOKEN not in self.token2id:
                raise ValueError(f"{token_file}: the pad token {PAD_TOKEN!r} is missing")
            self.pad_id = self.token2id[PAD_TOKEN]

    @property
    def vocab_size(self) -> int:
        return len(self.token2id)

    def texts_to_tokens(self, texts: list[str]) -> list[list[str]]:
        raise NotImplementedError

    def tokens_to_token_ids(self, tokens_list: list[list[str]]) -> list[list[int]]:
        if not self.token2id:
            raise ValueError(f"{type(self).__name__} was built without a token file: cannot map tokens to ids")
        t2i = self.token2id
        # OOV tokens are skipped, as the reference does (it logs them at debug level only).
        return [[t2i[t] for t in tokens if t in t2i] for tokens in tokens_list]

    def texts_to_token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokens_to_token_ids(self.texts_to_tokens(texts))


class SimpleTokenizer(Tokenizer):
    def texts_to_tokens(self, texts: list[str]) -> list[list[str]]:
        return [list(t) for t in texts]


def _espeak(text: str, lang: str) -> list[str]:
    from piper_phonemize import phonemize_espeak

    return [p for sentence in phonemize_espeak(text, lang) for p in sentence]


class EspeakTokenizer(Tokenizer):
    def __init__(self, token_file: str | os.PathLike | None = None, lang: str = "en-us"):
        super().__init__(token_file)
        self.lang = lang

    def texts_to_tokens(self, texts: list[str]) -> list[list[str]]:
        return [_espeak(t, self.lang) for t in texts]


# ---- text normalisation


_PUNCT_MAP = [
    ("，", ","), ("。", "."), ("！", "!"), ("？", "?"), ("；", ";"), ("：", ":"), ("、", ","),
    ("‘", "'"), ("’", "'"), ("“", '"'), ("”", '"'),
    # ellipses: the long forms first so "..." inside "···" is not split
    ("⋯", "…"), ("···", "…"), ("・・・", "…"), ("...", "…"),
]


def map_punctuations(text: str) -> str:
    for src, dst in _PUNCT_MAP:
        text = text.replace(src, dst)
    return text


class EnglishNormalizer:
    """The reference's English normalisation (tacotron-cleaner style, numbers spelled by inflect).

    Its exact behaviour matters: the official checkpoints were trained on the tokens it yields.
    Rules, in order:
      * abbreviations match as whole words, case-insensitively, with or without a period; the
        period is kept ("Mr. X" -> "mister. X", "btw" -> "by the way"; no "vs");
      * numbers: commas inside digit groups go; "£N" -> "N pounds"; "$D.C" -> "D dollars, C cents";
        "a/b" -> "<a> <ordinal of b>" (singular: "two third"; halves and quarters are named);
        "a.b" -> "a point b" (both parts read as whole numbers); "%" -> "percent"; "Nth" ordinals;
        every remaining digit run is read as one number (leading zeros vanish: "007" -> "seven"),
        1001..2999 as years ("nineteen eighty-four", "two thousand five", "nineteen hundred").
    Every spelled-out number is surrounded by single spaces ("10:30" -> " ten : thirty "), and the
    commas inflect puts after "thousand"/"million" stay: espeak hears them as short pauses.
    """

    _abbreviations = [
        (re.compile(rf"\b{abbr}\b", re.IGNORECASE), full)
        for abbr, full in [
            ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"),
            ("jr", "junior"), ("maj", "major"), ("gen", "general"), ("drs", "doctors"), ("rev", "reverend"),
            ("lt", "lieutenant"), ("hon", "honorable"), ("sgt", "sergeant"), ("capt", "captain"),
            ("esq", "esquire"), ("ltd", "limited"), ("col", "colonel"), ("ft", "fort"),
            ("etc", "et cetera"), ("btw", "by the way"),
        ]
    ]
    _comma_number = re.compile(r"([0-9][0-9,]+[0-9])")
    _pounds = re.compile(r"£([0-9,]*[0-9]+)")
    _dollars = re.compile(r"\$([0-9.,]*[0-9]+)")
    _fraction = re.compile(r"([0-9]+)/([0-9]+)")
    _decimal = re.compile(r"([0-9]+\.[0-9]+)")
    _percent = re.compile(r"([0-9.,]*[0-9]+%)")
    _ordinal = re.compile(r"[0-9]+(st|nd|rd|th)")
    _number = re.compile(r"[0-9]+")

    def __init__(self):
        import inflect

        self._inflect = inflect.engine()

    def _words(self, n, **kwargs) -> str:
        return self._inflect.number_to_words(n, **kwargs)

    def _dollars_repl(self, m: re.Match) -> str:
        amount = m.group(1)
        parts = amount.split(".")
        if len(parts) > 2:
            return f" {amount} dollars "
        dollars = int(parts[0]) if parts[0] else 0
        cents = int(parts[1]) if len(parts) > 1 and parts[1] else 0
        said = []
        if dollars:
            said.append(f"{dollars} {'dollar' if dollars == 1 else 'dollars'}")
        if cents:
            said.append(f"{cents} {'cent' if cents == 1 else 'cents'}")
        # the digits are spelled out by the number rule further down
        return f" {', '.join(said)} " if said else " zero dollars "

    def _fraction_repl(self, m: re.Match) -> str:
        num, den = int(m.group(1)), int(m.group(2))
        if den == 2:
            name = "half" if num == 1 else "halves"
        elif den == 4:
            name = "quarter" if num == 1 else "quarters"
        else:
            name = self._inflect.ordinal(self._words(den))
        return f" {self._words(num)} {name} "

    def _number_repl(self, m: re.Match) -> str:
        n = int(m.group(0))
        if 1000 < n < 3000:
            if n == 2000:
                return " two thousand "
            if n < 2010 and n > 2000:
                return f" two thousand {self._words(n % 100)} "
            if n % 100 == 0:
                return f" {self._words(n // 100)} hundred "
            # read in pairs like a year: 1984 -> nineteen eighty-four, 1905 -> nineteen oh five
            return " " + self._words(n, andword="", zero="oh", group=2).replace(", ", " ") + " "
        return f" {self._words(n, andword='')} "

    def normalize(self, text: str) -> str:
        for pattern, full in self._abbreviations:
            text = pattern.sub(full, text)
        text = self._comma_number.sub(lambda m: m.group(1).replace(",", ""), text)
        text = self._pounds.sub(r"\1 pounds", text)
        text = self._dollars.sub(self._dollars_repl, text)
        text = self._fraction.sub(self._fraction_repl, text)
        text = self._decimal.sub(lambda m: m.group(1).replace(".", " point "), text)
        text = self._percent.sub(lambda m: m.group(1).replace("%", " percent "), text)
        text = self._ordinal.sub(lambda m: f" {self._words(m.group(0))} ", text)
        return self._number.sub(self._number_repl, text)


class ChineseNormalizer:
    """Arabic numerals, percentages, dates and amounts to Chinese characters (cn2an)."""

    def normalize(self, text: str) -> str:
        import cn2an

        try:
            return cn2an.transform(text, "an2cn")
        except Exception as err:  # cn2an rejects some odd digit strings; keep the text then
            log.debug("cn2an could not normalise %r: %s", text, err)
            return text


# ---- emilia / dialog


_PART = re.compile(r"<[^<>]*>|\[[^\[\]]*\]|.", re.S)
_TAG = re.compile(r"(<[^<>]*>|\[[^\[\]]*\])")


def _is_chinese(part: str) -> bool:
    return len(part) == 1 and "\u4e00" <= part <= "\u9fa5"


def _is_pinyin_tag(part: str) -> bool:
    return len(part) > 2 and part.startswith("<") and part.endswith(">")


def _is_bracket_tag(part: str) -> bool:
    return len(part) > 2 and part.startswith("[") and part.endswith("]")


def _is_letter(part: str) -> bool:
    return len(part) == 1 and ("a" <= part <= "z" or "A" <= part <= "Z")


def _is_tone3_pinyin(s: str) -> bool:
    return len(s) > 1 and s[:-1].isalpha() and s[-1] in "12345"


def split_pinyin(syllable: str) -> list[str]:
    """TONE3 syllable -> [initial + "0", final with tone] (no initial for zero-initial syllables)."""
    from pypinyin.contrib.tone_convert import to_finals_tone3, to_initials

    out = []
    initial = to_initials(syllable, strict=False)
    final = to_finals_tone3(syllable, strict=False, neutral_tone_with_five=True)
    if initial:
        out.append(initial + "0")
    if final:
        out.append(final)
    return out


class EmiliaTokenizer(Tokenizer):
    def __init__(self, token_file: str | os.PathLike | None = None):
        super().__init__(token_file)
        self.english_normalizer = EnglishNormalizer()
        self.chinese_normalizer = ChineseNormalizer()

    def preprocess_text(self, text: str) -> str:
        return map_punctuations(text)

    def texts_to_tokens(self, texts: list[str]) -> list[list[str]]:
        out = []
        for text in texts:
            tokens: list[str] = []
            for seg, lang in self.get_segments(self.preprocess_text(text)):
                if lang == "zh":
                    tokens += self.tokenize_zh(seg)
                elif lang == "en":
                    tokens += self.tokenize_en(seg)
                elif lang == "pinyin":
                    tokens += self.tokenize_pinyin(seg)
                elif lang == "tag":
                    tokens.append(seg)
                else:
                    log.warning("no language detected, segment dropped: %r", seg)
            out.append(tokens)
        return out

    @staticmethod
    def get_segments(text: str) -> list[tuple[str, str]]:
        """Cut text into (segment, lang) with lang in zh/en/pinyin/tag (or other if it has no letters)."""
        segments: list[list[str]] = []  # [text, lang]
        for part in _PART.findall(text):
            if _is_chinese(part) or _is_pinyin_tag(part):
                lang = "zh"
            elif _is_letter(part):
                lang = "en"
            else:
                lang = "other"
            if not segments:
                segments.append([part, lang])
            elif lang == "other" or lang == segments[-1][1]:
                segments[-1][0] += part
            elif segments[-1][1] == "other":
                # a leading run of punctuation/tags takes the language of what follows
                segments[-1][0] += part
                segments[-1][1] = lang
            else:
                segments.append([part, lang])
        result = []
        for seg, lang in segments:
            for piece in _TAG.split(seg):
                if not piece:
                    continue
                if _is_pinyin_tag(piece):
                    result.append((piece, "pinyin"))
                elif _is_bracket_tag(piece):
                    result.append((piece, "tag"))
                else:
                    result.append((piece, lang))
        return result

    def tokenize_en(self, text: str) -> list[str]:
        try:
            return _espeak(self.english_normalizer.normalize(text), "en-us")
        except Exception as err:
            log.warning("English G2P failed on %r: %s", text, err)
            return []

    def tokenize_zh(self, text: str) -> list[str]:
        import jieba
        from pypinyin import Style, lazy_pinyin

        jieba.setLogLevel(logging.WARNING)
        text = self.chinese_normalizer.normalize(text)
        words = list(jieba.cut(text))
        syllables = lazy_pinyin(words, style=Style.TONE3, tone_sandhi=True, neutral_tone_with_five=True)
        tokens = []
        for s in syllables:
            # anything that is not a TONE3 syllable (punctuation, spaces) stays a raw token
            tokens.extend(split_pinyin(s) if _is_tone3_pinyin(s) else [s])
        return tokens

    def tokenize_pinyin(self, text: str) -> list[str]:
        syllable = text[1:-1]
        if not _is_tone3_pinyin(syllable):
            log.warning("invalid pinyin tag %r (expected e.g. <ni3>), dropped", text)
            return []
        return split_pinyin(syllable)


_SPK_TAG_SPACE = re.compile(r"\s*(\[S[12]\])\s*")


class DialogTokenizer(EmiliaTokenizer):
    def __init__(self, token_file: str | os.PathLike | None = None):
        super().__init__(token_file)
        self.spk_a_id = self.spk_b_id = None
        if token_file is not None:
            missing = [t for t in (SPK_A_TOKEN, SPK_B_TOKEN) if t not in self.token2id]
            if missing:
                raise ValueError(
                    f"{token_file}: the dialog tokenizer needs the speaker tokens {missing} "
                    "(use the ZipVoice-Dialog tokens.txt)"
                )
            self.spk_a_id = self.token2id[SPK_A_TOKEN]
            self.spk_b_id = self.token2id[SPK_B_TOKEN]

    def preprocess_text(self, text: str) -> str:
        return map_punctuations(_SPK_TAG_SPACE.sub(r"\1", text))


_TOKENIZERS = {"simple": SimpleTokenizer, "espeak": EspeakTokenizer, "emilia": EmiliaTokenizer, "dialog": DialogTokenizer}


def get_tokenizer(name: str, token_file: str | os.PathLike | None) -> Tokenizer:
    if name not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(_TOKENIZERS)}")
    return _TOKENIZERS[name](token_file)
