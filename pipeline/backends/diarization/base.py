"""What every diarization backend shares: the result type and the rules that derive a
recording's diarization fields from its turns, identically for every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

TurnTuple = tuple[float, float, str]  # (start, end, speaker): the backends' form of manifests.Turn


@dataclass
class Diarization:
    turns: list[TurnTuple]
    exclusive_turns: list[TurnTuple] | None = None  # None: derived from turns by exclusive_turns()


class Diarizer(Protocol):
    def diarize(self, audio_path: str, speech: list[tuple[float, float]], duration: float,
                min_speakers: int = 1, max_speakers: int | None = None) -> Diarization: ...


def merge_turns(turns: list[TurnTuple], gap: float = 0.0) -> list[TurnTuple]:
    """Sorted turns with same-speaker turns that touch, overlap or are at most ``gap`` apart joined."""
    last: dict[str, int] = {}
    out: list[list] = []
    for a, b, spk in sorted(turns, key=lambda t: (t[0], t[1])):
        if b <= a:
            continue
        i = last.get(spk)
        if i is not None and a - out[i][1] <= gap:
            out[i][1] = max(out[i][1], b)
            continue
        last[spk] = len(out)
        out.append([a, b, spk])
    return sorted((a, b, s) for a, b, s in out)


def _boundaries(turns: list[TurnTuple]) -> list[float]:
    return sorted({t for a, b, _ in turns for t in (a, b)})


def overlap_regions(turns: list[TurnTuple]) -> list[tuple[float, float]]:
    """Time ranges where two or more speakers are active."""
    turns = merge_turns(turns)
    events = sorted([(a, 1) for a, _, _ in turns] + [(b, -1) for _, b, _ in turns], key=lambda e: (e[0], e[1]))
    out: list[list[float]] = []
    active, since = 0, 0.0
    for t, step in events:
        if active >= 2 and t > since:
            if out and abs(out[-1][1] - since) < 1e-9:
                out[-1][1] = t
            else:
                out.append([since, t])
        active += step
        since = t
    return [(a, b) for a, b in out]


def exclusive_turns(turns: list[TurnTuple]) -> list[TurnTuple]:
    """One speaker at a time: an overlapped stretch stays with the speaker whose turn began first
    (the one holding the floor), so that a back-channel or an early start never splits a turn."""
    turns = merge_turns(turns)  # sorted by start
    out: list[TurnTuple] = []
    cuts = _boundaries(turns)
    active: list[TurnTuple] = []
    nxt = 0
    for a, b in zip(cuts, cuts[1:]):
        while nxt < len(turns) and turns[nxt][0] <= a:
            active.append(turns[nxt])
            nxt += 1
        active = [t for t in active if t[1] >= b]
        if active:
            owner = min(active, key=lambda t: (t[0], -t[1]))[2]
            out.append((a, b, owner))
    return merge_turns(out)


def union_duration(turns: list[TurnTuple]) -> float:
    total, end = 0.0, float("-inf")
    for a, b, _ in sorted(turns):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def relabel(d: Diarization) -> Diarization:
    """Speakers renamed SPEAKER_00, SPEAKER_01, ... in order of first appearance."""
    order: dict[str, str] = {}
    for _, _, spk in sorted(d.turns) + sorted(d.exclusive_turns or []):
        order.setdefault(spk, f"SPEAKER_{len(order):02d}")
    name = lambda ts: [(a, b, order[s]) for a, b, s in ts] if ts is not None else None  # noqa: E731
    return Diarization(name(d.turns), name(d.exclusive_turns))


def row_fields(d: Diarization, ndigits: int = 3) -> dict:
    """The `diarization` manifest fields of one recording (turns as ``pipeline.manifests.TurnTuple``)."""
    d = relabel(Diarization(merge_turns(d.turns), d.exclusive_turns))
    turns = d.turns
    excl = merge_turns(d.exclusive_turns) if d.exclusive_turns is not None else exclusive_turns(turns)
    overlaps = overlap_regions(turns)
    speech = union_duration(turns)
    durations: dict[str, float] = {}
    for a, b, s in turns:
        durations[s] = durations.get(s, 0.0) + (b - a)
    r = lambda x: round(float(x), ndigits)  # noqa: E731
    as_turns = lambda ts: [{"start": r(a), "end": r(b), "speaker": s} for a, b, s in ts]  # noqa: E731
    return {
        "turns": as_turns(turns),
        "exclusive_turns": as_turns(excl),
        "overlaps": [{"start": r(a), "end": r(b)} for a, b in overlaps],
        "num_speakers": len(durations),
        "speaker_durations": [{"speaker": s, "duration": r(v)} for s, v in sorted(durations.items())],
        "overlap_ratio": r(sum(b - a for a, b in overlaps) / speech) if speech > 0 else 0.0,
    }
