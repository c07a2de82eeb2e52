"""Transcript rules (filters/rules.py) and the rules stage (pipeline/stages/rules.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from filters.rules import RULES, RulesConfig, Verdict, apply_rules, check_segment, first_failure, parse
from pipeline import manifests
from pipeline.config import ConfigError, parse_config
from pipeline.stage import StageContext
from pipeline.stages import resolve_stage
from pipeline.stages.rules import RulesStage

CFG = RulesConfig()


def seg(text: str, duration: float, language: str = "en", **kw) -> dict:
    return {"segment_id": "r_0000", "recording_id": "r", "start": 0.0, "end": duration, "duration": duration,
            "text": text, "num_turns": text.count("[S"), "language": language, "agreement": None,
            "source": "whisperd", "status": "ok", **kw}


def verdict(segment: dict, rule: str, config: RulesConfig = CFG) -> Verdict:
    return next(v for v in check_segment(segment, config) if v.rule == rule)


# ----------------------------------------------------------------------------- the table

LOOP_EN = ("[S1] I'm going to the store. [S2] I'm going to the store. [S1] I'm going to the store. "
           "[S2] I'm going to the store.")
RUN_EN = "[S1] No no no no no no no no. [S2] Okay, fine, I get it."
SUBTITLES_ZH = "[S1] 好的，我们下次再聊。[S2] 字幕由某某提供"

GOOD = [
    seg("[S1] Hi, how are you doing today? [S2] Fine, thanks. (laughs) How about you? [S1] Good, good.", 5.0),
    seg("[S1] So did you finish the report for Monday? [S2] Almost, I still need the numbers from sales. "
        "[S1] I can send them tonight if that helps. [S2] That would be great, thank you so much. "
        "[S1] No problem, I'll ping you when it's done.", 14.0),
    # A 23-character URL is longer than max_word_chars but URL-like tokens are exempt.
    seg("[S1] Go to www.opendialog-demo.com for the details. [S2] Okay, I will check it tonight.", 5.0),
    # Hyphenated compounds are measured per part.
    seg("[S1] We need a good twenty-five-minute-long presentation. [S2] Sure, I can prepare it.", 5.0),
    seg("[S1] (laughs) That's hilarious! [S2] I know, right? (laughs) [S1] Don’t tell anyone.", 4.0, agreement=0.9),
    seg("[S1] Are you coming? [S2] Yes. [S1] When? [S2] Soon, soon. [S1] Okay.", 4.0),
    seg("[S1] 哎，你昨天去那个新开的火锅店了吗？[S2] 去了去了，我跟我同事一起去的，人特别多。[S1] 那味道怎么样？", 8.0, "zh"),
    # Code-switched English words are allowed in Chinese.
    seg("[S1] 你用的是iPhone还是安卓？[S2] 我用的是iPhone，不过我老婆用华为。", 5.0, "zh"),
    # Full-width brackets are events too; digits belong to no script.
    seg("[S1] 今天天气真不错（笑）[S2] 是啊，我们下午6点半出去走走吧。", 4.0, "zh"),
    seg("[S1] 哈哈哈，你太逗了。[S2] 真的吗？我觉得还好吧。", 3.0, "zh", agreement=1.0),
]

BAD = [
    # turns: malformed tags and abnormal counts
    ("turns", "does not start with [S1]", seg("Well [S1] Hi there. [S2] Hello.", 2.0)),
    ("turns", "does not start with [S1]", seg("[S2] Hi there. [S1] Hello you.", 2.0)),
    ("turns", "no [S1]/[S2] tags", seg("No tags at all in this text.", 2.0)),
    ("turns", "1 speaker turn < min_turns 2", seg("[S1] Hello there, my old friend.", 2.0)),
    ("turns", "[S1] twice in a row", seg("[S1] Hi there. [S1] Hello again.", 2.0)),
    ("turns", "unknown tag [S3]", seg("[S1] Hi there. [S3] Hello again.", 2.0)),
    ("turns", "empty turn 2", seg("[S1] Hi there. [S2] (laughs) [S1] Okay then.", 3.0)),
    ("turns", "empty turn 2", seg("[S1] Hi there. [S2] [S1] Okay then.", 3.0)),
    ("turns", "> 1 + max_turns_per_second",
     seg(" ".join(f"[S{1 + i % 2}] word{i} ok." for i in range(12)), 5.0)),
    ("turns", "[S2] twice in a row", seg("[S1] 你好啊 [S2] 我很好 [S2] 那就好", 3.0, "zh")),
    ("turns", "1 speaker turn", seg("[S1] 你好，今天天气怎么样？", 3.0, "zh")),
    ("turns", "unknown tag [s2]", seg("[S1] 你好啊 [s2] 我很好", 2.0, "zh")),
    # script: letters of another script than the language's
    ("script", "not latin (cyrillic", seg("[S1] Привет, как дела? [S2] Хорошо, спасибо.", 3.0)),
    ("script", "not latin (han", seg("[S1] 你好，今天天气怎么样？[S2] 很好，谢谢你。", 3.0)),
    ("script", "not latin (arabic", seg("[S1] مرحبا كيف حالك اليوم [S2] I am fine thank you very much my friend", 5.0)),
    ("script", "not han (latin", seg("[S1] Hello, how are you doing today? [S2] 我很好。", 3.0, "zh")),
    ("script", "not han (kana", seg("[S1] こんにちは、お元気ですか？[S2] はい、元気です。", 3.0, "zh")),
    ("script", "unsupported language 'fr'", seg("[S1] Bonjour, ça va? [S2] Oui, très bien.", 3.0, "fr")),
    # word_count: too few words, speaking rate out of band
    ("word_count", "2 words < min_words 3", seg("[S1] Hi. [S2] Yo.", 1.0)),
    ("word_count", "words/s outside words_per_second [0.5, 5.5]",
     seg("[S1] I really think we should go now because it is late. [S2] Yes but the party is only just "
         "getting started and everyone is here so why would we leave already?", 3.0)),
    ("word_count", "outside words_per_second [0.5, 5.5]", seg("[S1] Okay so. [S2] Yes, sure.", 25.0)),
    ("word_count", "outside words_per_second [1.0, 9.0]",
     seg("[S1] 你昨天去那个新开的火锅店了吗味道怎么样 [S2] 去了去了我跟我同事一起去的人特别多排了快一个小时", 3.0, "zh")),
    ("word_count", "outside words_per_second [1.0, 9.0]", seg("[S1] 你好吗 [S2] 很好", 20.0, "zh")),
    ("word_count", "2 words < min_words 3", seg("[S1] 好 [S2] 嗯", 1.0, "zh")),
    # repetition: n-gram loops, one dominating word, long runs
    ("repetition", "4-gram \"i'm going to the\" repeated 4 times",
     seg(LOOP_EN, 8.0)),
    ("repetition", "'no' 8 times in a row", seg(RUN_EN, 5.0)),
    ("repetition", "'yeah' is 58% of 12 words",
     seg("[S1] Yeah okay yeah sure yeah fine yeah. [S2] Yeah right yeah good yeah.", 5.0)),
    ("repetition", "'哈' 10 times in a row", seg("[S1] 哈哈哈哈哈哈哈哈哈哈你太逗了 [S2] 是吧", 4.0, "zh")),
    ("repetition", "4-gram '我跟你说' repeated 4 times", seg("[S1] 我跟你说我跟你说我跟你说我跟你说 [S2] 你说吧", 5.0, "zh")),
    # word_length: improbably long words
    ("word_length", "has 30 characters > max_word_chars 22",
     seg("[S1] Hello aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa there. [S2] What was that?", 4.0)),
    ("word_length", "has 24 characters",
     seg("[S1] That was thankyousoverymuchindeed, right? [S2] Yes it was.", 4.0)),
    ("word_length", "has 34 characters",
     seg("[S1] 我觉得这个supercalifragilisticexpialidocious很好 [S2] 是吗，为什么呢？", 5.0, "zh")),
    # hallucination: Granary's signs and known phrases
    ("hallucination", "known hallucinated phrase 'thank you for watching'",
     seg("[S1] Great talk today. [S2] Thank you for watching!", 3.0)),
    ("hallucination", "'please subscribe'", seg("[S1] Okay everyone. [S2] PLEASE Subscribe to the channel.", 3.0)),
    ("hallucination", "'amara.org'", seg("[S1] Okay, that's it. [S2] Community of Amara.org thanks you.", 3.0)),
    ("hallucination", "'字幕'", seg(SUBTITLES_ZH, 4.0, "zh")),
    ("hallucination", "'请不吝点赞'", seg("[S1] 请不吝点赞订阅转发 [S2] 打赏支持明镜与点点栏目", 4.0, "zh")),
    ("hallucination", "unique word share 0.30 < min_unique_share 0.4",
     seg("[S1] yes no maybe yes okay no sure maybe okay right sure no [S2] right yes maybe right okay sure yes no",
         8.0)),
    ("hallucination", "unique word share 0.11 < min_unique_share 0.25",
     seg("[S1] 对是好，是对好，好是对，对好是 [S2] 是好对，好对是，对是好，是对好，好是对", 6.0, "zh")),
    ("hallucination", "a word of 36 characters >= long_word_chars 25",
     seg("[S1] Visit www.subscribe-to-our-channel-now.com please [S2] Sure thing friend.", 4.0)),
    ("hallucination", "6.0x the second longest", seg("[S1] Uh huh mmmmmmmmmmmmmmmmmm [S2] So it is.", 3.0)),
    ("hallucination", "19.0x the second longest", seg("[S1] 嗯嗯 hmmmmmmmmmmmmmmmmmm [S2] 好的好的", 3.0, "zh")),
    # agreement: WhisperD tags vs diarization
    ("agreement", "0.30 < min_agreement 0.6",
     seg("[S1] Did you see the game? [S2] Yes, what a finish!", 3.0, agreement=0.3)),
    ("agreement", "0.59 < min_agreement", seg("[S1] 你看比赛了吗？[S2] 看了，太精彩了！", 3.0, "zh", agreement=0.59)),
]


@pytest.mark.parametrize("segment", GOOD, ids=[s["text"][:30] for s in GOOD])
def test_good_transcripts_pass_every_rule(segment):
    verdicts = check_segment(segment, CFG)
    assert [v.rule for v in verdicts] == list(RULES)
    assert [v.reason for v in verdicts if not v.ok] == []
    overall = apply_rules(segment, CFG)
    assert overall.ok and overall.reason is None and overall.metrics["failed"] == []


@pytest.mark.parametrize("rule,why,segment", BAD, ids=[f"{r}-{s['text'][:24]}" for r, _, s in BAD])
def test_bad_transcripts_fail_with_the_rule_name(rule, why, segment):
    overall = apply_rules(segment, CFG)
    assert not overall.ok
    assert overall.rule == rule
    assert overall.reason.startswith(f"{rule}: ")
    assert why in overall.reason
    assert first_failure(check_segment(segment, CFG)).reason == overall.reason
    assert rule in overall.metrics["failed"]


def test_the_table_covers_every_rule_in_both_languages():
    assert {s["language"] for s in GOOD} == {"en", "zh"}
    for rule in RULES:
        langs = {s["language"] for r, _, s in BAD if r == rule}
        assert {"en", "zh"} <= langs, rule


def test_metrics_cover_every_rule():
    m = apply_rules(GOOD[1], CFG).metrics
    assert m["turns"] == 5 and m["words"] == 40 and m["words_per_second"] == round(40 / 14, 4)
    assert m["scripts"] == {"latin": 1.0} and m["foreign_share"] == 0.0
    for key in ("max_ngram_repeats", "max_token_run", "top_word_share", "max_word_chars", "unique_share",
                "longest_word_chars", "long_word_ratio", "hallucinated_phrase", "agreement", "turns_per_second"):
        assert key in m, key
    json.dumps(m, allow_nan=False)


def test_chinese_counts_characters_as_words():
    t = parse("[S1] 我用iPhone打电话。[S2] 好的（笑）")
    assert t.words == ("我", "用", "iPhone", "打", "电", "话", "好", "的")
    assert t.turns == (("我", "用", "iPhone", "打", "电", "话"), ("好", "的")) and t.events == 1


def test_disabled_rules_are_skipped():
    single = seg("[S1] Hello there, my old friend.", 2.0)
    cfg = RulesConfig.model_validate({"turns": {"enabled": False}})
    assert "turns" not in [v.rule for v in check_segment(single, cfg)]
    assert apply_rules(single, cfg).ok
    assert not apply_rules(single, CFG).ok


def test_thresholds_come_from_the_config():
    s = seg("[S1] Did you see the game? [S2] Yes, what a finish!", 3.0, agreement=0.3)
    assert apply_rules(s, RulesConfig.model_validate({"agreement": {"min_agreement": 0.2}})).ok
    fast = seg("[S1] One two three four. [S2] Five six seven eight.", 1.0)
    assert apply_rules(fast, CFG).rule == "word_count"
    loose = RulesConfig.model_validate({"word_count": {"words_per_second": {"en": [0.5, 10], "zh": [1, 9]}},
                                        "turns": {"max_turns_per_second": 2}})
    assert apply_rules(fast, loose).ok


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="min_turnz"):
        RulesConfig.model_validate({"turns": {"min_turnz": 2}})
    with pytest.raises(ValidationError, match="min <= max"):
        RulesConfig.model_validate({"word_count": {"words_per_second": {"en": [5, 1], "zh": [1, 9]}}})
    with pytest.raises(ValidationError):
        RulesConfig.model_validate({"script": {"max_foreign_share": {"en": 0.1, "zh": 0.3, "fr": 0.1}}})
    with pytest.raises(ConfigError, match="stages.rules.repetition.ngramm: unknown key"):
        parse_config({"stages": {"rules": {"repetition": {"ngramm": 3}}}})


def test_documented_yaml_block_is_the_default_config():
    block = yaml.safe_dump(CFG.model_dump(mode="json", exclude={"uses", "resources"}), allow_unicode=True)
    spec = parse_config({"stages": {"rules": yaml.safe_load(block)}}).stages[0]
    assert spec.cls is RulesStage
    assert spec.config.model_dump(exclude={"uses", "resources"}) == CFG.model_dump()


# ----------------------------------------------------------------------------- properties

VOCAB_EN = list(dict.fromkeys("""
time year people way day man thing woman life child world school state family student group country problem
hand part place case week company system program question work government number night point home water room
mother area money story fact month lot right study book eye job word business issue side kind head house
service friend father power hour game line end member law car city community name president team minute idea
kid body information back parent face others level office door health person art war history party result
change morning reason research girl guy moment air teacher force education foot boy age policy process music
market sense nation plan college interest death experience effect class control care field development role
effort rate heart drug show leader light voice wife police mind price report decision son view relationship
town road arm difference value building action model season society tax director position player record paper
space ground form event official matter center couple site project activity star table need court oil
situation cost industry figure street image phone data picture practice piece land product doctor wall
patient worker news test movie north love support technology step baby computer type attention film tree
source organization hair window evidence population site truth green blue quick happy small large early
""".split()))
VOCAB_ZH = list(dict.fromkeys(
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能"
    "好都然没日于起还发成事只作当想经种美面定见行头两长知样现分将外但身些与高意进把法此实回二理美点月明其水很"
    "电力儿用果己关方前所本新路吗西物问话文老手全机气期感因被东拉件先间"))


@st.composite
def dialogue(draw, language: str) -> dict:
    """A well-formed transcript: alternating turns of distinct ordinary words at a normal rate."""
    n_turns = draw(st.integers(2, 6))
    if language == "en":
        sizes = [draw(st.integers(4, 10)) for _ in range(n_turns)]
        pool, rate_band, sep, ends = VOCAB_EN, (1.5, 4.0), " ", [".", "?", "!", ",", ""]
    else:
        sizes = [draw(st.integers(6, 20)) for _ in range(n_turns)]
        pool, rate_band, sep, ends = VOCAB_ZH, (2.0, 6.0), "", ["。", "？", "！", "，", ""]
    words = draw(st.randoms(use_true_random=False)).sample(pool, sum(sizes))
    turns, i = [], 0
    for k, size in enumerate(sizes):
        body = words[i : i + size]
        i += size
        if language == "en" and draw(st.booleans()):
            body = [body[0].capitalize()] + body[1:]
        text = sep.join(body) + draw(st.sampled_from(ends))
        if draw(st.booleans()):
            text += " (laughs)"
        turns.append(f"[S{1 + k % 2}] {text}")
    total = sum(sizes)
    lo = max(rate_band[0], total / 30)
    rate = draw(st.floats(lo, rate_band[1]))
    return seg(" ".join(turns), round(total / rate, 3), language, agreement=draw(st.none() | st.floats(0.6, 1)))


FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.sampled_from(["en", "zh"]).flatmap(dialogue))
def test_any_well_formed_dialogue_passes(segment):
    v = apply_rules(segment, CFG)
    assert v.ok, v.reason


@FAST
@given(data=st.data(), language=st.sampled_from(["en", "zh"]), ngram=st.integers(2, 5),
       max_repeats=st.integers(1, 5), extra=st.integers(1, 4))
def test_repeating_a_phrase_past_the_threshold_trips_repetition(data, language, ngram, max_repeats, extra):
    pool = VOCAB_EN if language == "en" else VOCAB_ZH
    sep = " " if language == "en" else ""
    words = data.draw(st.randoms(use_true_random=False)).sample(pool, 20)
    m = data.draw(st.integers(ngram, ngram + 4))
    phrase, before, after = words[:m], words[m : m + 3], words[m + 3 : m + 6]
    seq = before + phrase * (max_repeats + extra) + after
    cut = data.draw(st.integers(1, len(seq) - 1))
    segment = seg(f"[S1] {sep.join(seq[:cut])} [S2] {sep.join(seq[cut:])}", len(seq) / 3, language)
    cfg = RulesConfig.model_validate({"repetition": {"ngram": ngram, "max_ngram_repeats": max_repeats}})
    v = verdict(segment, "repetition", cfg)
    assert not v.ok
    assert f"{ngram}-gram" in v.reason and f"repeated {max_repeats + extra} times" in v.reason
    # One repeat fewer than allowed-plus-one passes the n-gram check.
    ok_seq = before + phrase * max_repeats + after
    ok_seg = seg(f"[S1] {sep.join(ok_seq[:1])} [S2] {sep.join(ok_seq[1:])}", len(ok_seq) / 3, language)
    assert verdict(ok_seg, "repetition", cfg).metrics["max_ngram_repeats"] == max_repeats


@FAST
@given(data=st.data(), language=st.sampled_from(["en", "zh"]))
def test_a_30_character_word_trips_word_length(data, language):
    segment = data.draw(dialogue(language))
    long_word = data.draw(st.text("abcdefghijklmnopqrstuvwxyz", min_size=30, max_size=30))
    parts = segment["text"].split(" ")
    at = data.draw(st.integers(1, len(parts)))  # after the leading [S1]
    segment["text"] = " ".join(parts[:at] + [long_word] + parts[at:])
    v = verdict(segment, "word_length")
    assert not v.ok and "has 30 characters" in v.reason and v.metrics["max_word_chars"] == 30
    assert not verdict(segment, "hallucination").ok  # >= 25 characters: Granary's sign too


PIECES = ["[S1]", "[S2]", "[S3]", "[", "]", "(laughs)", "(", ")", " ", "字幕", "哈", "no ", "www.a.com",
          "\u0301", "\x00", "\U0001f600", "ＡＢＣ", "（笑）"]
ANY = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5))


@settings(max_examples=200, deadline=None)
@given(text=st.text() | st.lists(st.sampled_from(PIECES) | st.text(max_size=6), max_size=30).map("".join),
       language=st.sampled_from(["en", "zh"]) | ANY, duration=ANY, agreement=ANY)
@example(text="0", language=None, duration=2.225073858507203e-309, agreement=None)  # 1 word / it = inf
def test_rules_never_raise_and_are_deterministic(text, language, duration, agreement):
    segment = {"text": text, "language": language, "duration": duration, "agreement": agreement,
               "start": 0.0, "end": 1.0}
    first = check_segment(segment, CFG)
    parse.cache_clear()
    again = check_segment(dict(segment), CFG)
    assert first == again
    assert [v.rule for v in first] == list(RULES)
    for v in first:
        assert v.ok == (v.reason is None)
        assert v.ok or v.reason.startswith(f"{v.rule}: ")
    json.dumps(apply_rules(segment, CFG).metrics, allow_nan=False)


# ----------------------------------------------------------------------------- the stage

def stage_segment(i: int, text: str, duration: float, language: str = "en", status: str = "ok", **kw) -> dict:
    s = seg(text, duration, language, **kw)
    s.update(segment_id=f"rec_{i:04d}", start=10.0 * i, end=10.0 * i + duration, status=status)
    return s


def make_stage() -> RulesStage:
    return RulesStage(CFG, StageContext("rules", output_dir=Path("/nonexistent")))


def test_stage_sets_segment_verdicts_and_keeps_the_recording():
    good = stage_segment(0, GOOD[0]["text"], 5.0)
    single = stage_segment(1, "[S1] Hello there, my old friend.", 2.0)
    loop = stage_segment(2, LOOP_EN, 8.0)
    upstream = stage_segment(3, "[S1] x", 1.0, status="rejected", reason="segments: too short")
    row = {"recording_id": "rec", "status": "ok", "reason": None, "segments": [good, single, loop, upstream]}
    (out,) = make_stage().process([row])
    assert out["status"] == "ok" and out["reason"] is None
    segs = out["segments"]
    assert [s["status"] for s in segs] == ["ok", "rejected", "rejected", "rejected"]
    assert segs[0]["reason"] is None
    assert segs[1]["reason"].startswith("turns: 1 speaker turn")
    assert segs[2]["reason"].startswith("repetition: ")
    assert segs[3] == upstream and "metrics" not in segs[3]  # rejected upstream: left alone
    m = segs[0]["metrics"]
    assert m["words"] == 13 and m["failed"] == []
    assert segs[2]["metrics"]["failed"] == ["repetition", "hallucination"]
    assert row["segments"][0].get("metrics") is None  # the input rows are not mutated


def test_stage_rejects_a_recording_whose_segments_all_fail():
    segs = [stage_segment(0, "[S1] Hello there, my old friend.", 2.0),
            stage_segment(1, "[S1] Hi there. [S1] Hello again.", 2.0),
            stage_segment(2, RUN_EN, 5.0)]
    rows = [{"recording_id": "all_bad", "status": "ok", "reason": None, "segments": segs},
            {"recording_id": "none_ok", "status": "ok", "reason": None,
             "segments": [stage_segment(0, "[S1] a", 1.0, status="rejected", reason="segments: x")]}]
    all_bad, none_ok = make_stage().process(rows)
    assert all_bad["status"] == "rejected"
    assert all_bad["reason"] == "all 3 segments rejected by rules: turns x2, repetition x1"
    assert none_ok["status"] == "rejected" and "no segment with status ok" in none_ok["reason"]
    # A row without segments (a failed one passed on by the runner) has no manifest rows.
    missing = {"recording_id": "no_segments", "status": "failed", "reason": "x"}
    assert make_stage().manifest_rows(missing) == []
    # Rules before the stage that makes the segments: the config fails to load (once, not per row).
    with pytest.raises(ConfigError, match="stages.rules: needs 'segments', which stage 'segments' adds after it"):
        parse_config({"stages": {"ingest": {}, "rules": {}, "segments": {}}})


def test_manifest_rows_fit_the_rules_schema(tmp_path):
    good = stage_segment(0, GOOD[6]["text"], 8.0, "zh")
    bad = stage_segment(1, SUBTITLES_ZH, 4.0, "zh")
    upstream = stage_segment(2, "[S1] x", 1.0, status="rejected", reason="segments: too short")
    stage = make_stage()
    (out,) = stage.process([{"recording_id": "rec", "status": "ok", "reason": None,
                             "segments": [good, bad, upstream]}])
    rows = stage.manifest_rows(out)
    table = manifests.to_table("rules", rows)
    assert table.column("segment_id").to_pylist() == ["rec_0000", "rec_0001", "rec_0002"]
    assert table.column("status").to_pylist() == ["ok", "rejected", "rejected"]
    assert table.column("start").to_pylist() == [0.0, 10.0, 20.0]
    reasons = table.column("reason").to_pylist()
    assert reasons[0] is None and reasons[1].startswith("hallucination: ") and reasons[2] == "segments: too short"
    metrics = table.column("metrics").to_pylist()
    # A struct column (a map for the scripts), not a JSON string.
    assert dict(metrics[0]["scripts"]) == {"han": 1.0} and metrics[0]["words"] > 0 and metrics[2] is None
    path = tmp_path / "rules.parquet"
    manifests.write_table(table, path)
    assert manifests.read_manifest_file("rules", path).num_rows == 3


def test_stage_is_registered_as_a_stateless_rules_stage():
    cls = resolve_stage("rules")
    assert cls is RulesStage and issubclass(cls.Config, RulesConfig)
    assert cls.manifest == "rules" and not cls.loads_model()
    assert math.isclose(cls.default_resources.num_cpus, 0.5) and cls.default_resources.num_gpus == 0
