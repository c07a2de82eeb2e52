"""Dialogue segments: <= 30 s chunks cut at silences, and `[S1]`/`[S2]` tagged text.

Pure functions (no audio, no models) so the splitting and the speaker bookkeeping are testable on
their own:

* ``split_at_silences``: the paper's rule (section 5.2): split long audio at VAD silences and
  cut any piece still over the limit; every VAD speech span is covered by exactly one chunk or,
  when a single span is longer than the limit, by consecutive chunks that share their cut point.
* ``parse_tagged``: WhisperD output -> turns (tag, text), events in parentheses kept in the text.
* ``map_tags_to_speakers``: WhisperD's tags are local to a chunk ([S1] of one chunk may be [S2]
  of the next); they are mapped to diarization speakers by time overlap, and the agreement between
  the two is measured.
* ``tagged_text``: turns -> "[S1] ... [S2] ..." starting with [S1] and alternating.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.manifests import Utterance

Span = tuple[float, float]


@dataclass(frozen=True)
class Chunk:
    start: float
    end: float
    # True when the chunk had to be cut inside continuous speech (no silence was available).
    forced_cut: bool = False

    @property
    def duration(self) -> float:
        return self.end - self.start


def split_at_silences(speech: list[Span], max_len: float = 30.0, pad: float = 0.2,
                      min_gap: float = 0.0, prefer: list[float] | None = None,
                      duration: float | None = None) -> list[Chunk]:
    """Group speech spans into chunks of at most ``max_len`` seconds (pads included).

    Chunks are cut in the silences between spans: a chunk ends ``pad`` seconds after its last
    speech and the next starts ``pad`` before its first (or both meet in the middle of a shorter
    silence), so all speech is covered. A chunk extends as far as the limit allows and is cut at
    the last silence of at least ``min_gap`` seconds; when ``prefer`` lists good cut times (turn
    boundaries), a silence containing one of them in the chunk's second half wins. A single span
    longer than the limit is cut into equal pieces (``forced_cut``).
    """
    if max_len <= 2 * pad:
        raise ValueError(f"max_len {max_len} must exceed twice the pad {pad}")
    spans: list[tuple[float, float]] = []
    for a, b in sorted((float(a), float(b)) for a, b in speech if b > a):
        if spans and a <= spans[-1][1] + 1e-3:  # touching spans are one stretch of speech
            spans[-1] = (spans[-1][0], max(spans[-1][1], b))
        else:
            spans.append((a, b))
    if not spans:
        return []
    n = len(spans)
    last_end = min(spans[-1][1] + pad, duration) if duration is not None else spans[-1][1] + pad
    prefer = sorted(prefer or [])

    def gap(i: int) -> float:
        return spans[i + 1][0] - spans[i][1]

    def mid(i: int) -> float:  # one value for both sides of a short silence: no rounding gap
        return (spans[i][1] + spans[i + 1][0]) / 2

    def end_after(i: int) -> float:  # where a chunk whose last span is i ends
        if i == n - 1:
            return last_end
        return spans[i][1] + pad if gap(i) >= 2 * pad else mid(i)

    def start_before(i: int) -> float:  # where a chunk whose first span is i starts
        if i == 0:
            return max(0.0, spans[0][0] - pad)
        return spans[i][0] - pad if gap(i - 1) >= 2 * pad else mid(i - 1)

    def chunk(a: float, b: float, forced: bool = False) -> Chunk:
        a, b = round(a, 3), round(min(b, a + max_len), 3)
        if b - a > max_len + 1e-6:  # millisecond rounding must not break the limit
            b = round(b - 0.001, 3)
        return Chunk(a, b, forced)

    chunks: list[Chunk] = []
    i = 0
    while i < n:
        start = start_before(i)
        if end_after(i) - start > max_len:
            a, b = spans[i]
            if b - a <= max_len:  # the speech fits once its pads shrink
                room = (max_len - (b - a)) / 2
                chunks.append(chunk(max(start, a - room), min(end_after(i), b + room)))
                i += 1
                continue
            end = end_after(i)  # one span too long on its own: equal pieces
            pieces = int(-(-(end - start) // (max_len - 0.002)))  # margin: ms rounding stays in the limit
            cuts = [start + k * (end - start) / pieces for k in range(pieces)] + [end]
            chunks += [chunk(cuts[k], cuts[k + 1], True) for k in range(pieces)]
            i += 1
            continue
        j = i
        while j + 1 < n and end_after(j + 1) - start <= max_len:
            j += 1
        if j == n - 1:
            chunks.append(chunk(start, end_after(j)))
            break
        cuts = [c for c in range(i, j + 1) if gap(c) >= min_gap] or [j]
        cut = cuts[-1]
        if prefer:
            half = start + max_len / 2
            good = [c for c in cuts if end_after(c) >= half
                    and any(spans[c][1] <= t <= spans[c + 1][0] for t in prefer)]
            if good:
                cut = good[-1]
        chunks.append(chunk(start, end_after(cut)))
        i = cut + 1
    return chunks


# ------------------------------------------------------------------------------ tagged text

_TAG = re.compile(r"\[S(\d+)\]")


@dataclass
class TaggedTurn:
    """A turn of [S1]/[S2]-tagged text (the row's speaker turns are ``pipeline.manifests.Turn``)."""

    tag: str  # "S1", "S2", ... as written (local to a chunk for WhisperD)
    text: str
    start: float | None = None
    end: float | None = None
    speaker: str | None = None  # recording-level speaker (diarization label)


def parse_tagged(text: str) -> list[TaggedTurn]:
    """'[S1] hi (laughs) [S2] yo' -> [TaggedTurn('S1', 'hi (laughs)'), TaggedTurn('S2', 'yo')].

    Text before the first tag is attached to a turn of tag "S?" (untagged); empty turns are
    dropped and consecutive turns with the same tag are merged."""
    turns: list[TaggedTurn] = []
    pos = 0
    tag = "S?"
    for m in _TAG.finditer(text):
        piece = text[pos:m.start()].strip()
        if piece:
            turns.append(TaggedTurn(tag, piece))
        tag, pos = f"S{m.group(1)}", m.end()
    piece = text[pos:].strip()
    if piece:
        turns.append(TaggedTurn(tag, piece))
    return merge_turns(turns)


def merge_turns(turns: list[TaggedTurn], sep: str = " ") -> list[TaggedTurn]:
    out: list[TaggedTurn] = []
    for t in turns:
        if out and out[-1].tag == t.tag and out[-1].speaker == t.speaker:
            last = out[-1]
            last.text = f"{last.text}{sep}{t.text}".strip()
            last.end = t.end if t.end is not None else last.end
        else:
            out.append(TaggedTurn(t.tag, t.text, t.start, t.end, t.speaker))
    return out


def tagged_text(turns: list[TaggedTurn], key: str = "speaker", sep: str = " ") -> tuple[str, list[str]]:
    """Turns -> ('[S1] .. [S2] ..', [who is S1, who is S2]).

    The first turn's ``key`` (speaker, or tag) becomes [S1], the other one [S2]; turns of the
    same person in a row are merged so tags alternate. Raises ValueError for more than two."""
    parts, order = tag_turns(turns, key, sep)
    return " ".join(f"[{p['speaker']}] {p['text']}" for p in parts), order


def tag_turns(turns: list[TaggedTurn], key: str = "speaker", sep: str = " ") -> tuple[list[dict], list[str]]:
    """The turns of ``tagged_text`` as dicts ``{speaker: "S1"|"S2", start, end, text}`` (times of
    the source, None where the turn had none), and who is S1, S2."""
    order: list[str] = []
    parts: list[dict] = []
    for t in turns:
        who = getattr(t, key) or t.tag
        if who not in order:
            order.append(who)
        tag = f"S{order.index(who) + 1}"
        if parts and parts[-1]["speaker"] == tag:
            last = parts[-1]
            last["text"] = f"{last['text']}{sep}{t.text}".strip()
            last["end"] = t.end if t.end is not None else last["end"]
        else:
            parts.append({"speaker": tag, "start": t.start, "end": t.end, "text": t.text.strip()})
    if len(order) > 2:
        raise ValueError(f"{len(order)} speakers in one segment")
    return [p for p in parts if p["text"]], order


def estimate_turn_times(turns: list[TaggedTurn], speech: list[Span], chunk: Chunk, cjk: bool = False) -> None:
    """Give untimed turns (WhisperD text has no timestamps) time spans: the chunk's speech time is
    shared out in proportion to each turn's length in characters (words for non-CJK text are
    counted by characters too: speech rate is closer to constant per character than per word)."""
    regions = [(max(a, chunk.start), min(b, chunk.end)) for a, b in speech if b > chunk.start and a < chunk.end]
    regions = [r for r in regions if r[1] > r[0]] or [(chunk.start, chunk.end)]
    total = sum(b - a for a, b in regions)
    weights = [max(1, len(re.sub(r"\(.*?\)|\s", "", t.text))) for t in turns]
    wsum = float(sum(weights))

    def at(offset: float) -> float:  # speech-time offset -> absolute time
        for a, b in regions:
            if offset <= b - a:
                return a + offset
            offset -= b - a
        return regions[-1][1]

    acc = 0.0
    for t, w in zip(turns, weights):
        t.start = round(at(acc), 3)
        acc += total * w / wsum
        t.end = round(at(min(acc, total)), 3)


def _overlap(a: Span, b: Span) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def map_tags_to_speakers(turns: list[TaggedTurn], diar_turns: list[tuple[float, float, str]]) -> float:
    """Map each local tag to the diarization speaker it overlaps most (one-to-one, greedy by
    overlap), set ``turn.speaker``, and return the agreement: the share of tagged speech time whose
    diarization speaker is the one its tag was mapped to (1.0 = WhisperD and diarization agree)."""
    tags = sorted({t.tag for t in turns})
    speakers = sorted({s for _, _, s in diar_turns})
    score: dict[tuple[str, str], float] = {}
    for t in turns:
        if t.start is None or t.end is None:
            continue
        for a, b, s in diar_turns:
            score[(t.tag, s)] = score.get((t.tag, s), 0.0) + _overlap((t.start, t.end), (a, b))
    mapping: dict[str, str] = {}
    for (tag, spk), _ in sorted(score.items(), key=lambda kv: -kv[1]):
        if tag not in mapping and spk not in mapping.values() and score[(tag, spk)] > 0:
            mapping[tag] = spk
    unused = [s for s in speakers if s not in mapping.values()]
    for tag in tags:  # tags with no overlapping speech keep a distinct label
        if tag not in mapping:
            mapping[tag] = unused.pop(0) if unused else f"UNMAPPED_{tag}"
    for t in turns:
        t.speaker = mapping[t.tag]
    timed = [t for t in turns if t.start is not None and t.end is not None and t.end > t.start]
    total = sum(t.end - t.start for t in timed)
    if total <= 0:
        return 0.0
    agree = sum(_overlap((t.start, t.end), (a, b)) for t in timed for a, b, s in diar_turns if s == t.speaker)
    return round(min(1.0, agree / total), 4)


def turns_from_utterances(utterances: list[Utterance], chunk: Chunk) -> list[TaggedTurn]:
    """Diarization-attributed ASR utterances inside a chunk -> turns (for the embedded path).

    An utterance that crosses the chunk edge contributes the share of its words that falls
    inside, assuming words are spread evenly over the utterance."""
    out = []
    for u in sorted(utterances, key=lambda u: (u["start"], u["end"])):
        a, b = u["start"], u["end"]
        if b <= chunk.start or a >= chunk.end or not (u.get("text") or "").strip():
            continue
        words = u["text"].split()
        if a < chunk.start or b > chunk.end:
            n = len(words)
            lo = int(round(n * max(0.0, chunk.start - a) / max(b - a, 1e-9)))
            hi = int(round(n * min(1.0, (chunk.end - a) / max(b - a, 1e-9))))
            words = words[lo:hi]
        if words:
            out.append(TaggedTurn(u.get("speaker") or "SPEAKER_00", " ".join(words), max(a, chunk.start),
                            min(b, chunk.end), u.get("speaker") or "SPEAKER_00"))
    return merge_turns(out)
