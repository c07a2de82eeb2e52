"""Rule-based transcript filters for dialogue segments (OpenDialog recipe, paper section 5.3).

WhisperD transcripts are imperfect; the paper drops segments with "an abnormal number of speaker
turns, unexpected language symbols, unusual word counts, excessive repetition, and improbable
maximum word lengths". We add Granary's Whisper hallucination signs (share of unique words, a word
of >= 25 characters, longest vs second-longest word, known hallucinated phrases) and the
agreement between WhisperD's tags and the diarization.

Every rule is a pure function ``rule(segment, config) -> Verdict``; ``check_segment`` runs the
enabled ones in a fixed order and ``apply_rules`` folds them into one verdict with every metric.

What counts as a word: the text is NFKC-normalised (full-width letters and brackets become ASCII),
``[S1]``/``[S2]`` tags and parenthesised events like ``(laughs)`` are taken out, the rest is split
on whitespace and edge punctuation is stripped. Han characters and kana count as one word each, so
for Chinese "words" are characters and a Latin word inside Chinese text is one word. Digits and
punctuation belong to no script.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any, Callable, Generic, Mapping, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "RULES",
    "RulesConfig",
    "Transcript",
    "Verdict",
    "agreement",
    "apply_rules",
    "check_segment",
    "first_failure",
    "hallucination",
    "parse",
    "repetition",
    "script",
    "turns",
    "word_count",
    "word_length",
]

# The script a language is written in; other languages are rejected by the script rule.
LANGUAGE_SCRIPT = {"en": "latin", "zh": "han"}

# ----------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rule: str
    reason: str | None = None  # "<rule>: why", None when ok
    metrics: dict[str, Any] = field(default_factory=dict)


def _pass(rule: str, metrics: dict) -> Verdict:
    return Verdict(True, rule, None, metrics)


def _fail(rule: str, why: str, metrics: dict) -> Verdict:
    return Verdict(False, rule, f"{rule}: {why}", metrics)


# ----------------------------------------------------------------------------- config

T = TypeVar("T")


class PerLanguage(BaseModel, Generic[T]):
    """One value per supported language."""

    model_config = ConfigDict(extra="forbid")

    en: T
    zh: T


def _check_band(band: tuple[float, float]) -> tuple[float, float]:
    if not 0 <= band[0] <= band[1]:
        raise ValueError(f"band {list(band)} must satisfy 0 <= min <= max")
    return band


Band = Annotated[tuple[float, float], AfterValidator(_check_band)]
Share = Annotated[float, Field(ge=0, le=1)]


class RuleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false skips the rule (no verdict, no metrics)")


class TurnsRule(RuleConfig):
    min_turns: int = Field(2, ge=1, description="a dialogue has at least two turns")
    max_turns: int = Field(30, ge=1, description="absolute cap on turns per segment")
    max_turns_per_second: float = Field(
        1.0, gt=0, description="turns may not exceed 1 + this x duration (one turn of slack for short segments)"
    )


class ScriptRule(RuleConfig):
    max_foreign_share: PerLanguage[Share] = Field(
        PerLanguage[Share](en=0.05, zh=0.3),
        description="share of words written in another script than the language's (en: Latin, "
        "zh: Han); zh allows code-switched English words",
    )


class WordCountRule(RuleConfig):
    min_words: int = Field(3, ge=1, description="fewer words (zh: characters) is rejected")
    words_per_second: PerLanguage[Band] = Field(
        PerLanguage[Band](en=(0.5, 5.5), zh=(1.0, 9.0)),
        description="[min, max] words (zh: characters) per second of segment duration",
    )


class RepetitionRule(RuleConfig):
    ngram: int = Field(4, ge=2, description="n of the repeated n-gram (words; zh: characters)")
    max_ngram_repeats: int = Field(3, ge=1, description="non-overlapping occurrences allowed for one n-gram")
    max_top_word_share: Share = Field(0.4, description="share of the most frequent word")
    top_word_min_words: int = Field(10, ge=1, description="the share is only judged from this many words on")
    max_token_run: int = Field(6, ge=1, description="longest run of one repeated word (zh: character, e.g. 哈哈哈)")


class WordLengthRule(RuleConfig):
    max_word_chars: int = Field(
        22, ge=1, description="longest word; URL-like tokens are exempt and hyphenated compounds are measured per part"
    )


DEFAULT_PHRASES = [
    "thank you for watching",
    "thanks for watching",
    "thank you so much for watching",
    "please subscribe",
    "subscribe to my channel",
    "like and subscribe",
    "don't forget to subscribe",
    "subtitles by",
    "subtitled by",
    "captions by",
    "transcribed by",
    "transcription by",
    "amara.org",
    "字幕",
    "请不吝点赞",
    "订阅转发",
    "打赏支持明镜",
    "明镜与点点栏目",
    "感谢观看",
    "谢谢观看",
    "优优独播剧场",
]


class HallucinationRule(RuleConfig):
    min_unique_share: PerLanguage[Share] = Field(
        PerLanguage[Share](en=0.4, zh=0.25),
        description="distinct words / words (Granary: 0.4); zh counts characters, whose natural "
        "diversity is lower (~0.45-0.6 over 100 characters of chat)",
    )
    unique_min_words: int = Field(10, ge=1, description="the unique share is only judged from this many words on")
    long_word_chars: int = Field(25, ge=1, description="a word this long (Granary: 25) is a hallucination sign")
    max_long_word_ratio: float = Field(
        4.0, gt=1, description="longest / second-longest word length; Granary flags (l1 - l2) / l2 >= 3, i.e. ratio >= 4"
    )
    long_word_ratio_min_chars: int = Field(
        16, ge=1, description="the ratio is only judged when the longest word has this many characters"
    )
    phrases: list[str] = Field(
        DEFAULT_PHRASES,
        description="known hallucinated phrases, matched case-insensitively on whole words "
        "(phrases with Han characters as substrings)",
    )


class AgreementRule(RuleConfig):
    min_agreement: Share = Field(
        0.6, description="share of the transcript whose [S1]/[S2] tags agree with diarization; None passes"
    )


class RulesConfig(BaseModel):
    """Thresholds of the transcript rules; each rule has ``enabled`` and its own section."""

    model_config = ConfigDict(extra="forbid")

    turns: TurnsRule = TurnsRule()
    script: ScriptRule = ScriptRule()
    word_count: WordCountRule = WordCountRule()
    repetition: RepetitionRule = RepetitionRule()
    word_length: WordLengthRule = WordLengthRule()
    hallucination: HallucinationRule = HallucinationRule()
    agreement: AgreementRule = AgreementRule()


# ----------------------------------------------------------------------------- parsing

_TAG = re.compile(r"\[([^\[\]]*)\]")
_EVENT = re.compile(r"\([^()]*\)")
# Scripts written without spaces: one character is one word.
_CHAR_WORD = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_PIECE = re.compile(f"[{_CHAR_WORD}]|[^{_CHAR_WORD}]+")
_SINGLE_CHAR_WORD = re.compile(f"[{_CHAR_WORD}]")
_EDGE = re.compile(r"^[\W_]+|[\W_]+$")
_URL = re.compile(
    r"^(?:[a-z][a-z0-9+.-]*://\S+|www\.\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
    r"|[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|edu|gov|io|co|uk|cn|de|fr|jp|tv|me|ai|info|ly)(?:/\S*)?)$",
    re.IGNORECASE,
)
_COMPOUND = re.compile(r"[-/]")
_SCRIPT_NAMES = {"CJK": "han", "HIRAGANA": "kana", "KATAKANA": "kana", "KATAKANA-HIRAGANA": "kana"}


@dataclass(frozen=True)
class Transcript:
    """A segment's text taken apart once: tags, per-turn words, all words."""

    prefix: str  # text before the first tag
    tags: tuple[str, ...]  # tag contents in order, e.g. ("S1", "S2")
    turns: tuple[tuple[str, ...], ...]  # words of each tagged turn
    words: tuple[str, ...]  # every word, original case
    events: int  # parenthesised non-speech events
    norm: str  # casefolded words joined by spaces (phrase matching)


def _words(text: str) -> list[str]:
    out = []
    for token in text.split():
        for piece in _PIECE.findall(token):
            piece = _EDGE.sub("", piece)
            if piece:
                out.append(piece)
    return out


@lru_cache(maxsize=4096)
def parse(text: str) -> Transcript:
    # NFKC leaves typographic apostrophes alone: "don’t" and "don't" must be one word.
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'")
    parts = _TAG.split(text)
    prefix, tags, bodies = parts[0].strip(), tuple(parts[1::2]), parts[2::2]
    events = 0
    turns = []
    for body in bodies:
        events += len(_EVENT.findall(body))
        turns.append(tuple(_words(_EVENT.sub(" ", body))))
    events += len(_EVENT.findall(prefix))
    # Words before the first tag still count (the tag rule rejects them; word metrics stay honest).
    words = tuple(_words(_EVENT.sub(" ", prefix))) + tuple(w for t in turns for w in t)
    norm = " ".join(w.casefold() for w in words)
    return Transcript(prefix, tags, tuple(turns), words, events, norm)


def _transcript(segment: Mapping) -> Transcript:
    text = segment.get("text")
    return parse(text if isinstance(text, str) else "")


def _duration(segment: Mapping) -> float | None:
    """Seconds, or None when the segment has no usable duration."""
    d = segment.get("duration")
    if d is None:
        try:
            d = float(segment["end"]) - float(segment["start"])
        except (KeyError, TypeError, ValueError):
            return None
    try:
        d = float(d)
    except (TypeError, ValueError):
        return None
    # Below a microsecond no segment is real, and rates over such a duration overflow to inf.
    return d if math.isfinite(d) and d >= 1e-6 else None


def _language(segment: Mapping) -> str | None:
    lang = segment.get("language")
    return lang if isinstance(lang, str) else None


def _script_of(ch: str) -> str | None:
    if not ch.isalpha():
        return None  # digits, punctuation, symbols and marks are neutral
    if ch < "\u0250":
        return "latin"
    first = unicodedata.name(ch, "OTHER").split(" ", 1)[0]
    return _SCRIPT_NAMES.get(first, first.lower())


def _word_script(word: str) -> str | None:
    scripts = Counter(s for s in map(_script_of, word) if s)
    return scripts.most_common(1)[0][0] if scripts else None


def _r(x: float) -> float:
    return round(x, 4)


def _show(word: str, limit: int = 40) -> str:
    return word if len(word) <= limit else word[: limit - 3] + "..."


# ----------------------------------------------------------------------------- rules


def turns(segment: Mapping, config: RulesConfig) -> Verdict:
    """Malformed [S1]/[S2] tags or an abnormal number of speaker turns."""
    cfg, t = config.turns, _transcript(segment)
    n = len(t.tags)
    m: dict[str, Any] = {"turns": n, "events": t.events}
    duration = _duration(segment)
    m["turns_per_second"] = _r(n / duration) if duration else None
    if not t.tags:
        return _fail("turns", "no [S1]/[S2] tags", m)
    if t.prefix or t.tags[0] != "S1":
        return _fail("turns", "text does not start with [S1]", m)
    for i, tag in enumerate(t.tags):
        if tag not in ("S1", "S2"):
            return _fail("turns", f"unknown tag [{_show(tag, 20)}] (turn {i + 1})", m)
        if i and tag == t.tags[i - 1]:
            return _fail("turns", f"[{tag}] twice in a row (turn {i + 1})", m)
    for i, words in enumerate(t.turns):
        if not words:
            return _fail("turns", f"empty turn {i + 1} ([{t.tags[i]}])", m)
    if n < cfg.min_turns:
        return _fail("turns", f"{n} speaker turn{'s' if n != 1 else ''} < min_turns {cfg.min_turns}", m)
    if n > cfg.max_turns:
        return _fail("turns", f"{n} speaker turns > max_turns {cfg.max_turns}", m)
    if duration and n > 1 + cfg.max_turns_per_second * duration:
        return _fail(
            "turns",
            f"{n} speaker turns in {duration:.2f} s > 1 + max_turns_per_second {cfg.max_turns_per_second} x duration",
            m,
        )
    return _pass("turns", m)


def script(segment: Mapping, config: RulesConfig) -> Verdict:
    """Words written in a script that does not belong to the segment's language."""
    cfg, t = config.script, _transcript(segment)
    lang = _language(segment)
    counts = Counter(s for s in map(_word_script, t.words) if s)
    total = sum(counts.values())
    m: dict[str, Any] = {"scripts": {s: _r(c / total) for s, c in sorted(counts.items())}}
    if lang not in LANGUAGE_SCRIPT:
        m["foreign_share"] = None
        return _fail("script", f"unsupported language {lang!r} (supported: {', '.join(LANGUAGE_SCRIPT)})", m)
    expected = LANGUAGE_SCRIPT[lang]
    foreign = (total - counts[expected]) / total if total else 0.0
    m["foreign_share"] = _r(foreign)
    limit = getattr(cfg.max_foreign_share, lang)
    if foreign > limit:
        others = ", ".join(f"{s} {c}" for s, c in counts.most_common() if s != expected)
        return _fail(
            "script",
            f"{foreign:.0%} of words not {expected} ({others}) > max_foreign_share {limit} for {lang}",
            m,
        )
    return _pass("script", m)


def word_count(segment: Mapping, config: RulesConfig) -> Verdict:
    """Too few words, or a speaking rate outside the language's band."""
    cfg, t = config.word_count, _transcript(segment)
    n = len(t.words)
    duration = _duration(segment)
    m: dict[str, Any] = {"words": n, "words_per_second": _r(n / duration) if duration else None}
    if n < cfg.min_words:
        return _fail("word_count", f"{n} words < min_words {cfg.min_words}", m)
    if duration is None:
        return _fail("word_count", "no positive duration to judge the speaking rate", m)
    lang = _language(segment)
    if lang in LANGUAGE_SCRIPT:
        lo, hi = getattr(cfg.words_per_second, lang)
        rate = n / duration
        if not lo <= rate <= hi:
            return _fail(
                "word_count",
                f"{rate:.2f} words/s outside words_per_second [{lo}, {hi}] for {lang}",
                m,
            )
    return _pass("word_count", m)


def _max_ngram_repeats(words: list[str], n: int) -> tuple[int, tuple[str, ...] | None]:
    """The n-gram with the most non-overlapping occurrences (a run of one word is the run rule's)."""
    counts: Counter = Counter()
    last: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        if i >= last.get(g, -n) + n:
            counts[g] += 1
            last[g] = i
    if not counts:
        return 0, None
    g, c = counts.most_common(1)[0]
    return c, g


def _longest_run(words: list[str]) -> tuple[int, str | None]:
    best, best_word, run = 0, None, 0
    for i, w in enumerate(words):
        run = run + 1 if i and w == words[i - 1] else 1
        if run > best:
            best, best_word = run, w
    return best, best_word


def repetition(segment: Mapping, config: RulesConfig) -> Verdict:
    """One n-gram repeated many times, one word dominating the text, or a long run of one word."""
    cfg, t = config.repetition, _transcript(segment)
    words = t.norm.split()
    reps, gram = _max_ngram_repeats(words, cfg.ngram)
    run, run_word = _longest_run(words)
    top_word, top = Counter(words).most_common(1)[0] if words else (None, 0)
    share = top / len(words) if words else 0.0
    m = {"max_ngram_repeats": reps, "max_token_run": run, "top_word_share": _r(share)}
    if run > cfg.max_token_run:
        return _fail("repetition", f"{_show(run_word)!r} {run} times in a row > max_token_run {cfg.max_token_run}", m)
    if reps > cfg.max_ngram_repeats:
        # Chinese n-grams are characters: show them as written.
        sep = "" if all(_SINGLE_CHAR_WORD.fullmatch(w) for w in gram) else " "
        shown = _show(sep.join(gram), 60)
        return _fail(
            "repetition",
            f"{cfg.ngram}-gram {shown!r} repeated {reps} times > max_ngram_repeats {cfg.max_ngram_repeats}",
            m,
        )
    if len(words) >= cfg.top_word_min_words and share > cfg.max_top_word_share:
        return _fail(
            "repetition",
            f"{_show(top_word)!r} is {share:.0%} of {len(words)} words > max_top_word_share {cfg.max_top_word_share}",
            m,
        )
    return _pass("repetition", m)


def word_length(segment: Mapping, config: RulesConfig) -> Verdict:
    """An improbably long word (glued words, garbage); URLs and hyphen compounds are allowed."""
    cfg, t = config.word_length, _transcript(segment)
    parts = [p for w in t.words if not _URL.match(w) for p in _COMPOUND.split(w)]
    longest = max(parts, key=len, default="")
    m = {"max_word_chars": len(longest)}
    if len(longest) > cfg.max_word_chars:
        return _fail(
            "word_length", f"{_show(longest)!r} has {len(longest)} characters > max_word_chars {cfg.max_word_chars}", m
        )
    return _pass("word_length", m)


@lru_cache(maxsize=256)
def _phrase_key(phrase: str) -> tuple[str, bool]:
    """A phrase as the text's words are normalised, and whether it is matched as a substring."""
    words = parse(f"[S1] {phrase}").norm
    spaceless = re.search(f"[{_CHAR_WORD}]", words) is not None
    return (words.replace(" ", "") if spaceless else words), spaceless


def _phrase_in(phrase: str, t: Transcript) -> bool:
    key, spaceless = _phrase_key(phrase)
    if not key:
        return False
    if spaceless:  # no word boundaries in Chinese text
        return key in t.norm.replace(" ", "")
    return f" {key} " in f" {t.norm} "


def hallucination(segment: Mapping, config: RulesConfig) -> Verdict:
    """Granary's Whisper hallucination signs and known hallucinated phrases."""
    cfg, t = config.hallucination, _transcript(segment)
    words = t.norm.split()
    lang = _language(segment)
    unique = len(set(words)) / len(words) if words else None
    lengths = sorted((len(w) for w in t.words), reverse=True)
    ratio = lengths[0] / lengths[1] if len(lengths) > 1 else None
    phrase = next((p for p in cfg.phrases if _phrase_in(p, t)), None)
    m = {
        "unique_share": _r(unique) if unique is not None else None,
        "longest_word_chars": lengths[0] if lengths else 0,
        "long_word_ratio": _r(ratio) if ratio is not None else None,
        "hallucinated_phrase": phrase,
    }
    if phrase is not None:
        return _fail("hallucination", f"known hallucinated phrase {phrase!r}", m)
    min_unique = getattr(cfg.min_unique_share, lang) if lang in LANGUAGE_SCRIPT else cfg.min_unique_share.en
    if unique is not None and len(words) >= cfg.unique_min_words and unique < min_unique:
        return _fail(
            "hallucination", f"unique word share {unique:.2f} < min_unique_share {min_unique} ({len(words)} words)", m
        )
    if lengths and lengths[0] >= cfg.long_word_chars:
        return _fail("hallucination", f"a word of {lengths[0]} characters >= long_word_chars {cfg.long_word_chars}", m)
    if ratio is not None and lengths[0] >= cfg.long_word_ratio_min_chars and ratio >= cfg.max_long_word_ratio:
        return _fail(
            "hallucination",
            f"longest word ({lengths[0]} chars) is {ratio:.1f}x the second longest ({lengths[1]}) "
            f">= max_long_word_ratio {cfg.max_long_word_ratio}",
            m,
        )
    return _pass("hallucination", m)


def agreement(segment: Mapping, config: RulesConfig) -> Verdict:
    """WhisperD's speaker tags disagree with the diarization (skipped when not measured)."""
    cfg = config.agreement
    a = segment.get("agreement")
    try:
        a = float(a) if a is not None else None
    except (TypeError, ValueError):
        a = None
    if a is not None and not math.isfinite(a):
        a = None
    m = {"agreement": _r(a) if a is not None else None}
    if a is not None and a < cfg.min_agreement:
        return _fail("agreement", f"{a:.2f} < min_agreement {cfg.min_agreement}", m)
    return _pass("agreement", m)


# Order matters only for which reason is reported first: structure, then language, then content.
RULES: dict[str, Callable[[Mapping, RulesConfig], Verdict]] = {
    "turns": turns,
    "script": script,
    "word_count": word_count,
    "repetition": repetition,
    "word_length": word_length,
    "hallucination": hallucination,
    "agreement": agreement,
}


def check_segment(segment: Mapping, config: RulesConfig | None = None) -> list[Verdict]:
    """The verdict of every enabled rule, in ``RULES`` order."""
    config = config or RulesConfig()
    return [rule(segment, config) for name, rule in RULES.items() if getattr(config, name).enabled]


def first_failure(verdicts: list[Verdict]) -> Verdict | None:
    return next((v for v in verdicts if not v.ok), None)


def apply_rules(segment: Mapping, config: RulesConfig | None = None) -> Verdict:
    """One verdict for the segment: the first failing rule's (``rule="rules"`` when all pass),
    with the metrics of every rule and the names of all failing rules under ``failed``."""
    verdicts = check_segment(segment, config)
    metrics: dict[str, Any] = {}
    for v in verdicts:
        metrics.update(v.metrics)
    metrics["failed"] = [v.rule for v in verdicts if not v.ok]
    bad = first_failure(verdicts)
    if bad is None:
        return Verdict(True, "rules", None, metrics)
    return Verdict(False, bad.rule, bad.reason, metrics)
