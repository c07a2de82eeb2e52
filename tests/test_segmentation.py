"""<= 30 s splitting at silences, WhisperD tag parsing and tag -> speaker mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.segmentation import (
    Chunk,
    TaggedTurn,
    estimate_turn_times,
    map_tags_to_speakers,
    parse_tagged,
    split_at_silences,
    tagged_text,
    turns_from_utterances,
)
from tools import synth


def _merged(spans):
    """Stretches of speech: spans less than a millisecond apart are one (no silence between)."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1e-3:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _check_chunks(chunks, speech, max_len):
    assert chunks
    assert all(c.duration <= max_len + 1e-6 for c in chunks)
    assert all(chunks[k].end <= chunks[k + 1].start + 1e-6 for k in range(len(chunks) - 1))
    # No speech lost: every speech instant lies in a chunk.
    for a, b in _merged(speech):
        covered = sum(max(0.0, min(b, c.end) - max(a, c.start)) for c in chunks)
        assert covered == pytest.approx(b - a, abs=2e-3), (a, b)
    # Cuts fall in silence unless a single stretch of speech was longer than the limit.
    for c in chunks:
        for t in (c.start, c.end):
            inside = [s for s in _merged(speech) if s[0] + 1e-3 < t < s[1] - 1e-3]
            if inside:
                assert c.forced_cut or any(o.forced_cut for o in chunks if abs(o.end - t) < 1e-3 or abs(o.start - t) < 1e-3)
                assert inside[0][1] - inside[0][0] > max_len - 1e-6


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_generated_dialogues_split_within_limit_in_silences(seed):
    clip = synth.synth_long(150.0, seed=seed, kind="dialogue", text_pool=30, overlap_prob=0.2, overlap=(0.2, 0.5))
    speech = [(t.start, t.end) for t in clip.truth.turns]
    chunks = split_at_silences(speech, 30.0, pad=0.2, min_gap=0.3, duration=clip.truth.duration)
    _check_chunks(chunks, speech, 30.0)
    assert not any(c.forced_cut for c in chunks)  # every turn is < 30 s: silences always exist
    assert len(chunks) >= 150 / 30
    assert sum(c.duration for c in chunks) > 0.8 * 150  # chunks are long, not crumbs


def test_speech_longer_than_limit_is_cut_into_equal_pieces():
    speech = [(1.0, 5.0), (6.0, 76.0), (77.0, 80.0)]
    chunks = split_at_silences(speech, 30.0, pad=0.2)
    _check_chunks(chunks, speech, 30.0)
    forced = [c for c in chunks if c.forced_cut]
    assert len(forced) == 3 and max(c.duration for c in forced) - min(c.duration for c in forced) < 1e-2


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0.05, 40.0), st.floats(0.0, 5.0)), min_size=1, max_size=40),
       st.floats(5.0, 30.0))
def test_splitter_properties(pieces, max_len):
    t, speech = 0.3, []
    for length, pause in pieces:
        speech.append((round(t, 3), round(t + length, 3)))
        t += length + pause
    chunks = split_at_silences(speech, max_len, pad=0.2)
    _check_chunks(chunks, speech, max_len)


def test_parse_tagged_events_and_merging():
    turns = parse_tagged("  [S1] Hi there. (laughs) [S2]  [S2] Yes? [S1]Okay [S3] who")
    assert [(t.tag, t.text) for t in turns] == [("S1", "Hi there. (laughs)"), ("S2", "Yes?"), ("S1", "Okay"), ("S3", "who")]
    assert [t.tag for t in parse_tagged("no tags at all")] == ["S?"]
    assert parse_tagged("[S1] [S2] ") == []


def test_tagged_text_starts_with_s1_and_alternates():
    turns = [TaggedTurn("x", "a", speaker="B"), TaggedTurn("x", "b", speaker="B"), TaggedTurn("x", "c", speaker="A"), TaggedTurn("x", "d", speaker="B")]
    text, order = tagged_text(turns)
    assert text == "[S1] a b [S2] c [S1] d" and order == ["B", "A"]
    with pytest.raises(ValueError, match="3 speakers"):
        tagged_text(turns + [TaggedTurn("x", "e", speaker="C")])


def test_swapped_whisperd_labels_across_chunks_are_realigned():
    # Diarization: SPK_A talks 0-4 and 10-14, SPK_B 4-10 and 14-20.
    diar = [(0.0, 4.0, "SPK_A"), (4.0, 10.0, "SPK_B"), (10.0, 14.0, "SPK_A"), (14.0, 20.0, "SPK_B")]
    speech = [(0.0, 20.0)]
    # Chunk 1 (0-10): WhisperD calls A "S1". Chunk 2 (10-20): it calls A "S2" (labels are local).
    c1 = parse_tagged("[S1] one two three four [S2] five six seven eight nine ten")
    c2 = parse_tagged("[S2] eleven twelve thirteen [S1] fourteen fifteen sixteen seventeen")
    estimate_turn_times(c1, speech, Chunk(0.0, 10.0))
    estimate_turn_times(c2, speech, Chunk(10.0, 20.0))
    agree1 = map_tags_to_speakers(c1, [d for d in diar if d[0] < 10])
    agree2 = map_tags_to_speakers(c2, [d for d in diar if d[1] > 10])
    assert [t.speaker for t in c1] == ["SPK_A", "SPK_B"]
    assert [t.speaker for t in c2] == ["SPK_A", "SPK_B"]  # S2 of chunk 2 is A again
    assert agree1 > 0.8 and agree2 > 0.8
    text2, order2 = tagged_text(c2)
    assert text2.startswith("[S1] eleven") and order2 == ["SPK_A", "SPK_B"]


def test_disagreement_lowers_agreement():
    diar = [(0.0, 5.0, "A"), (5.0, 10.0, "B")]
    turns = parse_tagged("[S1] a a a a a a a a a [S2] b")  # WhisperD puts almost all words on S1
    estimate_turn_times(turns, [(0.0, 10.0)], Chunk(0.0, 10.0))
    assert map_tags_to_speakers(turns, diar) < 0.7


def test_turns_from_utterances_splits_crossing_utterance_by_time():
    utts = [{"start": 0.0, "end": 4.0, "speaker": "A", "text": "w1 w2 w3 w4"},
            {"start": 4.5, "end": 6.0, "speaker": "B", "text": "yes"},
            {"start": 6.5, "end": 10.5, "speaker": "A", "text": "x1 x2 x3 x4"}]
    turns = turns_from_utterances(utts, Chunk(0.0, 8.5))
    assert [(t.speaker, t.text) for t in turns] == [("A", "w1 w2 w3 w4"), ("B", "yes"), ("A", "x1 x2")]
    assert tagged_text(turns)[0] == "[S1] w1 w2 w3 w4 [S2] yes [S1] x1 x2"
