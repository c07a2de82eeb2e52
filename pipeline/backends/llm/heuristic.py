"""The embedded classifier: is it a two-speaker dialogue, judged from diarization turn statistics.

No model and no transcript text: it reads ``turns`` [{start, end, speaker}] (and, when present,
``speaker_durations``, ``overlap_ratio``, ``speech_duration``, ``duration``).

Statistics:

* main speakers: speakers holding at least ``min_speaker_share`` of the summed talk time (so a
  diarization that splits off a few seconds of one voice, or a listener's "mm-hmm", does not make
  a third or a second speaker);
* alternations: speaker changes along the main speakers' turns sorted by start (same-speaker
  neighbours merged);
* balance: talk time of the second main speaker / that of the first (0..1);
* turn rate: alternations per minute of speech;
* overlap ratio: share of speech where two or more speakers talk at once;
* speech ratio: speech / recording duration.

Gates (config, defaults in ``HeuristicOptions``): the number of main speakers in
[min_speakers, max_speakers], alternations >= min_alternations, turn rate >= min_turn_rate,
overlap ratio <= max_overlap_ratio, speech ratio >= min_speech_ratio. Each failed gate is a reason.

Score, in 0..1: ``0.5 * (every gate passes) + 0.5 * mean(q)`` over six qualities, each 0..1:
speakers (1 when its gate passes), alternations / 10, balance / 0.5, turn rate / (6 per minute),
1 - overlap ratio / max_overlap_ratio, speech ratio / 0.6 (each capped at 1, and 0 when its own gate
fails). So a recording that passes the gates scores at least 0.5 (the stage's default threshold)
and one that fails any gate scores below 0.5; a threshold above 0.5 asks for stronger evidence
(more turn-taking, better balance) on top of the gates.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.backends.llm.base import Verdict

# Values at which a quality reaches 1 (a clearly conversational recording).
GOOD_ALTERNATIONS = 10
GOOD_BALANCE = 0.5
GOOD_TURN_RATE = 6.0  # speaker changes per minute of speech
GOOD_SPEECH_RATIO = 0.6


class HeuristicOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_speakers: int = Field(2, ge=1, description="main speakers wanted at least")
    max_speakers: int = Field(2, ge=1, description="main speakers wanted at most")
    min_speaker_share: float = Field(0.1, ge=0, lt=0.5, description="share of talk time that makes a main speaker")
    # Two exchanges back and forth (A B A B A) at least: a monologue that diarization splits
    # shows one or two stray changes, a real conversation of a minute or more shows dozens.
    min_alternations: int = Field(4, ge=0, description="speaker changes between main speakers")
    min_turn_rate: float = Field(1.0, ge=0, description="speaker changes per minute of speech")
    max_overlap_ratio: float = Field(0.3, gt=0, le=1, description="share of speech with overlapping speakers")
    min_speech_ratio: float = Field(0.2, ge=0, le=1, description="speech / recording duration")

    @model_validator(mode="after")
    def _range(self) -> "HeuristicOptions":
        if self.min_speakers > self.max_speakers:
            raise ValueError("min_speakers must not exceed max_speakers")
        return self


@dataclass
class TurnStats:
    detected_speakers: int
    main_speakers: int
    alternations: int
    balance: float
    turn_rate: float
    overlap_ratio: float
    speech_ratio: float


def _union_and_overlap(turns: list[dict]) -> tuple[float, float]:
    """Seconds covered by any turn, and by two or more turns at once."""
    events = sorted([(t["start"], 1) for t in turns] + [(t["end"], -1) for t in turns])
    union = overlap = 0.0
    active, last = 0, None
    for time, step in events:
        if last is not None:
            if active >= 1:
                union += time - last
            if active >= 2:
                overlap += time - last
        active += step
        last = time
    return union, overlap


def turn_stats(row: dict, cfg: HeuristicOptions) -> TurnStats:
    turns = [t for t in row.get("turns") or [] if t["end"] > t["start"]]
    talk: dict[str, float] = defaultdict(float)
    if row.get("speaker_durations"):
        for s in row["speaker_durations"]:
            talk[s["speaker"]] += s["duration"]
    else:
        for t in turns:
            talk[t["speaker"]] += t["end"] - t["start"]
    total = sum(talk.values())
    main = sorted((s for s, d in talk.items() if total > 0 and d / total >= cfg.min_speaker_share),
                  key=lambda s: -talk[s])
    seq: list[str] = []
    for t in sorted(turns, key=lambda t: (t["start"], t["end"])):
        if t["speaker"] in main and (not seq or seq[-1] != t["speaker"]):
            seq.append(t["speaker"])
    alternations = max(0, len(seq) - 1)
    balance = talk[main[1]] / talk[main[0]] if len(main) >= 2 and talk[main[0]] > 0 else 0.0
    union, overlap = _union_and_overlap(turns)
    speech = row.get("speech_duration") or union
    duration = row.get("duration") or max((t["end"] for t in turns), default=0.0)
    overlap_ratio = row.get("overlap_ratio")
    if overlap_ratio is None:
        overlap_ratio = overlap / union if union > 0 else 0.0
    return TurnStats(
        detected_speakers=len([s for s, d in talk.items() if d > 0]),
        main_speakers=len(main),
        alternations=alternations,
        balance=round(balance, 4),
        turn_rate=round(alternations / (speech / 60.0), 3) if speech > 0 else 0.0,
        overlap_ratio=round(float(overlap_ratio), 4),
        speech_ratio=round(min(1.0, speech / duration), 4) if duration > 0 else 0.0,
    )


def speaker_reason(st: TurnStats, cfg: HeuristicOptions) -> str | None:
    """Why the speaker count rules the recording out, or None."""
    n = st.main_speakers
    if cfg.min_speakers <= n <= cfg.max_speakers:
        return None
    if n == 0:
        return "no speaker turns"
    why = "1 speaker (monologue)" if n == 1 else f"{n} speakers"
    if st.detected_speakers != n:
        why += f" ({st.detected_speakers} detected, {n} with >= {cfg.min_speaker_share:.0%} of talk time)"
    return why


def judge(st: TurnStats, cfg: HeuristicOptions) -> tuple[float, list[str]]:
    """(score, reasons of the failed gates); see the module doc for the formula."""
    reasons: list[str] = []
    q: dict[str, float] = {}
    why = speaker_reason(st, cfg)
    q["speakers"] = 0.0 if why else 1.0
    reasons += [why] if why else []
    # With fewer than two main speakers there is no turn-taking to report on: the count says it all.
    talk = st.main_speakers >= 2
    if st.alternations < cfg.min_alternations:
        reasons += [f"{st.alternations} speaker alternations < min_alternations {cfg.min_alternations}"] if talk else []
        q["alternations"] = 0.0
    else:
        q["alternations"] = min(1.0, st.alternations / GOOD_ALTERNATIONS)
    q["balance"] = min(1.0, st.balance / GOOD_BALANCE)
    if st.turn_rate < cfg.min_turn_rate:
        reasons += [f"turn rate {st.turn_rate:.1f}/min < min_turn_rate {cfg.min_turn_rate}"] if talk else []
        q["turn_rate"] = 0.0
    else:
        q["turn_rate"] = min(1.0, st.turn_rate / GOOD_TURN_RATE)
    if st.overlap_ratio > cfg.max_overlap_ratio:
        reasons.append(f"overlap ratio {st.overlap_ratio:.2f} > max_overlap_ratio {cfg.max_overlap_ratio}")
        q["overlap"] = 0.0
    else:
        q["overlap"] = 1.0 - st.overlap_ratio / cfg.max_overlap_ratio
    if st.speech_ratio < cfg.min_speech_ratio:
        reasons.append(f"speech ratio {st.speech_ratio:.2f} < min_speech_ratio {cfg.min_speech_ratio}")
        q["speech"] = 0.0
    else:
        q["speech"] = min(1.0, st.speech_ratio / GOOD_SPEECH_RATIO)
    score = 0.5 * (not reasons) + 0.5 * sum(q.values()) / len(q)
    return round(score, 4), reasons


class HeuristicClassifier:
    name = "heuristic"
    model = "turn-statistics"
    prompt_version = None
    Options = HeuristicOptions

    def __init__(self, options: HeuristicOptions | None = None, device: str = "cpu", num_threads: int = 1):
        self.config = options or HeuristicOptions()

    def classify(self, rows: list[dict]) -> list[Verdict]:
        out = []
        for row in rows:
            st = turn_stats(row, self.config)
            score, reasons = judge(st, self.config)
            out.append(Verdict(score, json.dumps(asdict(st)), reason="; ".join(reasons) or None))
        return out
