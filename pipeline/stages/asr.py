"""ASR: the speaker-attributed transcript of each recording (what the dialogue classifier reads).

Two ways to attribute words to speakers (``attribution``):

* ``words`` (default): the model transcribes **speech regions** — the union of the VAD spans and
  the diarization turns, silences longer than ``region_gap`` left out, ``region_pad`` of context
  added on both sides — in pieces of at most ``max_chunk_seconds``, with word timestamps. Every word gets the diarization speaker whose turns
  overlap it most; a word inside overlapped speech (two speakers' turns cover it alike) goes to
  the turn that began last: a back-channel inside the other speaker's turn, or the next speaker
  starting early. (The diarization's ``exclusive_turns`` give overlapped stretches to the floor
  holder, so they would erase exactly those back-channels: they are not used here.) A word
  outside every turn goes to the nearest turn. Utterances are runs of words of one speaker inside one VAD
  span, so a back-channel that the diarization found is its own utterance, and the segments
  stage, which cuts at VAD silences, never splits an utterance. Why the default: the model sees
  whole sentences with their context instead of diarization-cut fragments (a turn boundary that
  is off by 0.3 s no longer cuts a word in two or drops it), and it runs one model window per
  ~29 s of speech instead of one per turn (a 2-word back-channel costs a whole 30 s Whisper
  window), which makes the stage several times faster on dialogue. It needs a backend with word
  timestamps (``faster-whisper``); a recording whose language is routed to a backend without
  them (openai-whisper, hf-whisper, funasr, pocketsphinx) is transcribed per turn.
* ``turns``: each diarization turn is transcribed on its own (overlapping turns each in full,
  so words said in an overlap may appear in both); one utterance per turn with words.

Without a diarization stage before this one (the row has no ``turns``), every word (words) or
every VAD span (turns) belongs to speaker ``SPEAKER_00``.

A region or turn longer than the model window is cut into pieces: each cut lies in the second
half of the window, in the middle of the longest VAD pause there, else at the point of lowest
short-time energy of that stretch of audio. The window is 29 s by default, not Whisper's 30:
Whisper hallucinates tails on items that fill its window exactly. The pieces of all recordings
of a batch are transcribed together, several per model call, grouped by backend and language.

Language (``language_id``), decided per unit (a region's piece, or a turn):
* ``fixed``: every unit is ``language``; ``language_probability`` is null (nothing was measured).
* ``whisper`` / ``hf-whisper`` / ``faster-whisper``: that backend's (multilingual) model scores
  its language tokens on the first window of each unit. The recording's distribution is the
  duration-weighted mean over its units: its argmax is ``language``, its value
  ``language_probability``. A unit keeps its own language when it is at least 1 s long and its
  probability reaches ``turn_language_threshold``; otherwise it takes the recording's (one-word
  back-channels are unreliable evidence). This costs one encoder pass per unit. A recording
  transcribed per turn after all (see above) gives each turn the language of the piece it
  overlaps most.
Turns are transcribed by ``backends[language]``, else ``backends.default`` (the paper: English to
Whisper, Chinese to Paraformer); in words mode every region of a recording goes to the backend of
the recording's language, told the region's own language. Recordings whose language is not in
``languages`` (when set) are rejected before transcription.

Output: ``utterances`` [{start, end, speaker, text, language, confidence}] sorted by start;
``confidence`` is the backend's 0..1 score (see its module): in words mode the mean probability
of the utterance's words, in turns mode the turn's pieces' scores averaged by duration. A
recording with no words at all is rejected, and so is one whose mean word confidence is under
``min_confidence`` when that is set: an English-only model such as tiny.en turns speech in other
languages into fluent English with low word probabilities instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import soundfile as sf
from pydantic import Field, model_validator

from pipeline.audio import ANALYSIS_SR, read_span
from pipeline.backends import BackendSections
from pipeline.backends.asr import BACKENDS, Word
from pipeline.manifests import Span, Turn, Utterance
from pipeline.stage import Resources, Stage, StageConfig

NO_DIARIZATION_SPEAKER = "SPEAKER_00"
MIN_TURN = 0.1  # seconds; shorter turns hold no word
MIN_LID_TURN = 1.0  # seconds; shorter turns take the recording's language
GROUP_SECONDS = 600.0  # audio held in memory per round of model calls (~38 MB)
NO_SPACE_LANGUAGES = {"zh", "ja", "yue", "th", "lo", "my", "bo"}


class AsrConfig(StageConfig, BackendSections):
    """Plus one section per registered backend (``faster_whisper:``, ``whisper:``, ...)."""

    registry = BACKENDS
    backend_fields = {"backends": (), "language_id": ("fixed",)}

    language_id: str = Field(
        "fixed", description="where the language comes from: the config, or a Whisper backend's model")
    language: str = Field("en", description="language of every turn when language_id is fixed")
    languages: list[str] | None = Field(
        None, description="recordings identified as another language are rejected (null: keep all)")
    turn_language_threshold: float = Field(
        0.8, ge=0, le=1, description="probability a region or turn needs to keep its own language")
    backends: dict[str, str] = Field(
        default_factory=lambda: {"default": "faster-whisper"},
        description="language -> backend; 'default' serves every other language")
    attribution: Literal["words", "turns"] = Field(
        "words", description="words: transcribe speech regions, give each word its diarization speaker; "
                             "turns: transcribe each diarization turn on its own")
    region_gap: float = Field(
        2.0, ge=0, description="words mode: silences at least this long (s) split regions and are not transcribed")
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="recordings whose mean word confidence is lower are rejected (null: keep all)")
    region_pad: float = Field(
        0.4, ge=0, description="words mode: seconds of audio added around each region (faster-whisper's own "
                               "VAD pads 0.4 s: Whisper expects some silence around speech)")
    max_chunk_seconds: float = Field(
        29.0, ge=2, description="longest piece per model item (also capped by each backend's window)")

    @model_validator(mode="after")
    def _check(self) -> "AsrConfig":
        if "default" not in self.backends:
            raise ValueError("backends needs a 'default' entry (the backend of every language not listed)")
        if self.language_id != "fixed" and getattr(self.backend_class(self.language_id), "can_identify_language",
                                                    True) is False:
            raise ValueError(f"language_id: the {self.language_id} backend does not identify languages")
        return self


@dataclass
class _Unit:
    """A unit of transcription: a diarization turn, or (words mode, speaker None) one piece of a
    speech region."""
    row: int
    path: str
    start: float
    end: float
    speaker: str | None
    pieces: list[tuple[float, float]]
    language: str | None = None
    probs: dict[str, float] | None = None
    backend: str | None = None
    texts: list[str] = field(default_factory=list)
    confs: list[float | None] = field(default_factory=list)
    words: list[list[Word]] = field(default_factory=list)  # per piece, times absolute in the recording


class AsrStage(Stage):
    Config = AsrConfig
    manifest = "asr"
    version = "2"
    default_resources = Resources(num_cpus=1, num_gpus=0, batch_size=2, concurrency=1)
    needs = ("audio_path", "speech", "turns")  # turns: used when a diarization stage ran
    adds = ("language", "language_probability", "utterances")

    def setup(self):
        config, ctx = self.config, self.ctx
        names = set(config.backends.values())
        if config.language_id != "fixed":
            names.add(config.language_id)
        # One model per backend, shared by the languages it serves and by language identification.
        self.models = {n: config.build_backend(n, ctx.device, ctx.num_threads) for n in sorted(names)}
        self.lid = self.models.get(config.language_id)
        if self.lid is not None and not self.lid.can_identify_language:
            raise ValueError(f"stages.asr.language_id: the {config.language_id} model has no language tokens")
        self.window = min(config.max_chunk_seconds, *(m.max_seconds for m in self.models.values()))

    def backend_for(self, language: str) -> str:
        return self.config.backends.get(language, self.config.backends["default"])

    def has_word_times(self, language: str) -> bool:
        return bool(getattr(self.models[self.backend_for(language)], "word_timestamps", False))

    def process(self, rows):
        out = [dict(r) for r in rows]
        by_row: dict[int, list[_Unit]] = {}
        for i, row in enumerate(out):
            try:
                units = self.plan(row, i, regions=self.config.attribution == "words")
            except Exception as e:  # noqa: BLE001 - one bad row must not sink the batch
                row.update(status="failed", reason=f"asr: {type(e).__name__}: {e}"[:500],
                           language=None, language_probability=None, utterances=[])
                continue
            if units:
                by_row[i] = units
            else:
                row.update(status="rejected", reason="no turns to transcribe (no speech spans or diarization turns)",
                           language=None, language_probability=None, utterances=[])
        self._identify_languages(out, by_row)
        for i, units in list(by_row.items()):
            if out[i]["status"] == "rejected":
                continue
            if units[0].speaker is None and not self.has_word_times(out[i]["language"]):
                by_row[i] = self._turns_instead(out[i], i, units)
                if not by_row[i]:
                    out[i].update(status="rejected", utterances=[],
                                  reason="no turns to transcribe (no diarization turns of at least 0.1 s)")
            else:
                fixed = self.backend_for(out[i]["language"]) if units[0].speaker is None else None
                for t in units:
                    t.backend = fixed or self.backend_for(t.language)
        self._transcribe([t for i, units in by_row.items() if out[i]["status"] != "rejected" for t in units])
        for i, units in by_row.items():
            row = out[i]
            if row["status"] == "rejected":
                continue
            if units[0].speaker is None:  # words mode
                utts = attribute_words(units, row.get("turns"), row.get("speech"))
            else:
                utts = [u for u in map(_utterance, units) if u is not None]
            row["utterances"] = utts
            conf = mean_confidence(utts)
            floor = self.config.min_confidence
            if utts and floor is not None and conf is not None and conf < floor:
                row.update(status="rejected", reason=f"low_asr_confidence: mean word confidence {conf:.2f} < {floor} "
                                                     "(speech in another language, or no speech)")
            elif utts:
                row.update(status="ok", reason=None)
            else:
                total = sum(t.end - t.start for t in units)
                what = "regions" if units[0].speaker is None else "turns"
                row.update(status="rejected", reason=f"no words recognised in {len(units)} {what} ({total:.1f} s)")
        return out

    def _turns_instead(self, row: dict, index: int, regions: list[_Unit]) -> list[_Unit]:
        """Per-turn units for a recording whose backend has no word times; each turn takes the
        language of the region it overlaps most (identification already ran on the regions)."""
        turns = self.plan(row, index, regions=False)
        for t in turns:
            best = max(regions, key=lambda r: min(r.end, t.end) - max(r.start, t.start))
            t.language = best.language
            t.backend = self.backend_for(t.language)
        return turns

    def _identify_languages(self, out: list[dict], by_row: dict[int, list[_Unit]]) -> None:
        """Set each unit's language and each row's language/language_probability; reject rows
        whose language is not wanted."""
        cfg = self.config
        if self.lid is not None:
            turns = [t for ts in by_row.values() for t in ts]
            for t, p in zip(turns, self._run(self.lid.detect_language, turns, [t.pieces[0] for t in turns])):
                t.probs = p
        for i, turns in by_row.items():
            if self.lid is None:
                lang, prob, langs = cfg.language, None, [cfg.language] * len(turns)
            else:
                lang, prob, langs = choose_languages([t.probs for t in turns],
                                                     [t.pieces[0][1] - t.pieces[0][0] for t in turns],
                                                     cfg.turn_language_threshold)
            for t, tl in zip(turns, langs):
                t.language = tl
            out[i].update(language=lang, language_probability=prob)
            if cfg.languages is not None and lang not in cfg.languages:
                p = f" (p={prob:.2f})" if prob is not None else ""
                out[i].update(status="rejected", utterances=[],
                              reason=f"language {lang}{p} not in languages {cfg.languages}")

    def _transcribe(self, turns: list[_Unit]) -> None:
        """Fill every unit's piece texts (and words): pieces grouped by (backend, language),
        several per call."""
        groups: dict[tuple[str, str], list[tuple[_Unit, int]]] = {}
        for t in turns:
            n = len(t.pieces)
            t.texts, t.confs, t.words = [""] * n, [None] * n, [[] for _ in range(n)]
            groups.setdefault((t.backend, t.language), []).extend((t, k) for k in range(n))
        for (name, lang), items in sorted(groups.items()):
            res = self._run(partial(self.models[name].transcribe, language=lang),
                            [t for t, _ in items], [t.pieces[k] for t, k in items])
            for (t, k), tr in zip(items, res):
                t.texts[k], t.confs[k] = tr.text, tr.confidence
                a = t.pieces[k][0]
                t.words[k] = [Word(round(a + w.start, 3), round(a + w.end, 3), w.text, w.probability)
                              for w in (tr.words or [])]

    def plan(self, row: dict, index: int, regions: bool) -> list[_Unit]:
        """The units of one recording (speech regions, else turns), each cut into pieces no
        longer than the window."""
        path = row["audio_path"]
        info = sf.info(path)
        if info.samplerate != ANALYSIS_SR or info.channels != 1:
            raise ValueError(f"{path}: expected the 16 kHz mono cache, got {info.samplerate} Hz, {info.channels} ch")
        duration = info.frames / info.samplerate
        speech = row.get("speech")
        raw_turns = row.get("turns")
        spans = sorted((float(s["start"]), float(s["end"])) for s in (speech or []))
        gaps = [(a[1], b[0]) for a, b in zip(spans, spans[1:]) if b[0] > a[1]]
        quiet = lambda lo, hi: quietest_point(path, lo, hi)  # noqa: E731
        units = []
        if regions:
            clipped = [(max(0.0, a), min(duration, b)) for a, b in
                       spans + [(float(t["start"]), float(t["end"])) for t in raw_turns or []]]
            # Each piece of a region is its own unit: its language is identified on all of it.
            regions = speech_regions([(a, b) for a, b in clipped if b - a >= MIN_TURN], self.config.region_gap)
            for a, b in pad_regions(regions, self.config.region_pad, duration):
                units += [_Unit(index, path, p, q, None, [(p, q)]) for p, q in split_turn(a, b, self.window, gaps, quiet)]
            return units
        if raw_turns is None:
            raw_turns = [{"start": a, "end": b, "speaker": NO_DIARIZATION_SPEAKER} for a, b in spans]
        for t in raw_turns:
            a, b = max(0.0, float(t["start"])), min(duration, float(t["end"]))
            if b - a < MIN_TURN:
                continue
            units.append(_Unit(index, path, a, b, str(t["speaker"]), split_turn(a, b, self.window, gaps, quiet)))
        return sorted(units, key=lambda t: (t.start, t.end))

    def _run(self, fn, owners: list[_Unit], spans: list[tuple[float, float]]) -> list:
        """fn over the audio of ``spans``, read and passed in groups of bounded total length."""
        results: list = []
        group: list[np.ndarray] = []
        seconds = 0.0
        for owner, (a, b) in zip(owners, spans):
            x, _ = read_span(owner.path, a, b)
            if seconds + (b - a) > GROUP_SECONDS and group:
                results += fn(group)
                group, seconds = [], 0.0
            group.append(x)
            seconds += b - a
        if group:
            results += fn(group)
        if len(results) != len(spans):
            raise RuntimeError(f"ASR backend returned {len(results)} results for {len(spans)} inputs")
        return results


def mean_confidence(utts: list[Utterance]) -> float | None:
    """Mean confidence over the words of a recording (utterances weighted by their word count)."""
    scored = [(len(u["text"].split()), u["confidence"]) for u in utts if u.get("confidence") is not None]
    n = sum(k for k, _ in scored)
    return sum(k * c for k, c in scored) / n if n else None


def pad_regions(regions: list[tuple[float, float]], pad: float, duration: float) -> list[tuple[float, float]]:
    """Regions widened by ``pad`` on both sides, inside the audio, never past a neighbour's middle."""
    out = []
    for k, (a, b) in enumerate(regions):
        lo = (regions[k - 1][1] + a) / 2 if k else 0.0
        hi = (b + regions[k + 1][0]) / 2 if k + 1 < len(regions) else duration
        out.append((max(lo, a - pad), min(hi, b + pad)))
    return out


def speech_regions(spans: list[tuple[float, float]], max_gap: float) -> list[tuple[float, float]]:
    """Union of the spans, joined across silences shorter than ``max_gap``."""
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a - out[-1][1] < max_gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def word_speakers(words: list[tuple[float, float]], turns: list[Turn]) -> list[str]:
    """The diarization speaker of each (start, end) word: see the module docstring."""
    full = [(float(t["start"]), float(t["end"]), str(t["speaker"])) for t in turns]
    out = []
    for a, b in words:
        if b - a < 0.02:  # DTW gives some words no width: look around their centre
            a, b = (a + b) / 2 - 0.01, (a + b) / 2 + 0.01
        score: dict[str, tuple[float, float]] = {}  # speaker -> (overlap, latest start of a covering turn)
        for s, e, spk in full:
            ov = min(b, e) - max(a, s)
            if ov > 0:
                old = score.get(spk, (0.0, -np.inf))
                score[spk] = (old[0] + ov, max(old[1], s))
        if score:
            # Overlaps within 20 ms tie: the word lies in overlapped speech, and is the newcomer's.
            out.append(max(score, key=lambda k: (round(score[k][0] / 0.02), score[k][1])))
        else:
            mid = (a + b) / 2
            out.append(min(full, key=lambda t: max(t[0] - mid, mid - t[1]))[2])
    return out


def attribute_words(regions: list[_Unit], turns: list[Turn] | None, speech: list[Span] | None) -> list[Utterance]:
    """Utterances from the regions' words: runs of one speaker inside one VAD span."""
    words = [(w, r.language) for r in regions for ws in r.words for w in ws]
    if not words:
        return []
    if turns:
        speakers = word_speakers([(w.start, w.end) for w, _ in words], turns)
    else:
        speakers = [NO_DIARIZATION_SPEAKER] * len(words)
    spans = sorted((float(s["start"]), float(s["end"])) for s in speech or [])
    ends = np.array([b for _, b in spans])

    def span_of(w: Word) -> int:
        """The VAD span the word overlaps most (DTW often stretches a word's end into the pause
        after it), else, in a pause, the nearer one."""
        i = int(np.searchsorted(ends, w.start))
        best, most = min(i, len(spans) - 1), 0.0
        while i < len(spans) and spans[i][0] < w.end:
            ov = min(w.end, spans[i][1]) - max(w.start, spans[i][0])
            if ov > most:
                best, most = i, ov
            i += 1
        if most == 0.0 and 0 < best < len(spans) and w.start - spans[best - 1][1] < spans[best][0] - w.end:
            best -= 1
        return best if spans else 0

    utts: list[dict] = []
    cur: list[tuple[Word, str]] = []
    key = None
    for (w, lang), spk in zip(words, speakers):
        k = (spk, span_of(w))
        if cur and k != key:
            utts.append(_word_utterance(cur, key[0]))
            cur = []
        cur.append((w, lang))
        key = k
    utts.append(_word_utterance(cur, key[0]))
    return sorted(utts, key=lambda u: (u["start"], u["end"]))


def _word_utterance(words: list[tuple[Word, str]], speaker: str) -> Utterance:
    lang = max({lg for _, lg in words}, key=[lg for _, lg in words].count)
    sep = "" if (lang or "") in NO_SPACE_LANGUAGES else " "
    return {"start": round(words[0][0].start, 3), "end": round(max(w.end for w, _ in words), 3), "speaker": speaker,
            "text": sep.join(w.text for w, _ in words), "language": lang,
            "confidence": round(float(np.mean([w.probability for w, _ in words])), 4)}


def _utterance(t: _Unit) -> Utterance | None:
    sep = "" if (t.language or "") in NO_SPACE_LANGUAGES else " "
    text = sep.join(x.strip() for x in t.texts if x and x.strip()).strip()
    if not text:
        return None
    weights = [(b - a, c) for (a, b), c, x in zip(t.pieces, t.confs, t.texts) if c is not None and x.strip()]
    conf = sum(w * c for w, c in weights) / sum(w for w, _ in weights) if weights and sum(w for w, _ in weights) > 0 else None
    return {"start": round(t.start, 3), "end": round(t.end, 3), "speaker": t.speaker, "text": text,
            "language": t.language, "confidence": round(float(conf), 4) if conf is not None else None}


def split_turn(start: float, end: float, window: float, gaps: list[tuple[float, float]],
               quietest) -> list[tuple[float, float]]:
    """Pieces of [start, end] no longer than ``window``. Each cut lands in the second half of the
    window: in the middle of the longest VAD pause there, else at ``quietest(lo, hi)``."""
    pieces = []
    a = start
    while end - a > window:
        lo, hi = a + window / 2, a + window
        best = None
        for g0, g1 in gaps:
            c0, c1 = max(g0, lo), min(g1, hi)
            if c1 > c0 and (best is None or c1 - c0 > best[1] - best[0]):
                best = (c0, c1)
        cut = (best[0] + best[1]) / 2 if best else float(quietest(lo, hi))
        cut = min(max(cut, lo), hi)
        pieces.append((a, cut))
        a = cut
    pieces.append((a, end))
    return pieces


def quietest_point(path: str, lo: float, hi: float, frame: float = 0.025, hop: float = 0.01) -> float:
    """Time of the lowest short-time energy in [lo, hi] (25 ms frames, 10 ms hop, 50 ms smoothing)."""
    x, sr = read_span(path, lo, hi)
    n, h = int(frame * sr), int(hop * sr)
    if len(x) < n + h:
        return (lo + hi) / 2
    count = 1 + (len(x) - n) // h
    idx = np.arange(n)[None, :] + h * np.arange(count)[:, None]
    energy = (x[idx].astype(np.float64) ** 2).mean(axis=1)
    energy = np.convolve(energy, np.ones(5) / 5, mode="same")
    return lo + (int(np.argmin(energy)) * h + n / 2) / sr


def choose_languages(turn_probs: list[dict[str, float]], weights: list[float], threshold: float
                     ) -> tuple[str, float, list[str]]:
    """(recording language, its probability, language of each turn) from per-turn distributions."""
    total: dict[str, float] = {}
    wsum = sum(weights) or 1.0
    for p, w in zip(turn_probs, weights):
        for lang, v in p.items():
            total[lang] = total.get(lang, 0.0) + v * w / wsum
    lang = max(total, key=total.get)
    per_turn = []
    for p, w in zip(turn_probs, weights):
        own = max(p, key=p.get)
        per_turn.append(own if w >= MIN_LID_TURN and p[own] >= threshold else lang)
    return lang, round(float(total[lang]), 4), per_turn
