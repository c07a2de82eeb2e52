"""The synthetic generator's audio must match its truth: every stage's test trusts it."""
import json
import re
import subprocess

import numpy as np
import pytest
import soundfile as sf

from tools import synth


SR = 16000


def db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2) + 1e-20)


def frame_db(x: np.ndarray, sr: int, hop: float = 0.01) -> np.ndarray:
    h = int(hop * sr)
    n = len(x) // h
    return 10 * np.log10(np.mean(x[: n * h].reshape(n, h).astype(np.float64) ** 2, axis=1) + 1e-20)


def median_f0(x: np.ndarray, sr: int) -> float:
    """Autocorrelation F0 over voiced 40 ms frames."""
    fr, hop = int(0.04 * sr), int(0.01 * sr)
    lo, hi = int(sr / 400), int(sr / 60)
    f0 = []
    for k in range(0, len(x) - fr, hop):
        s = x[k:k + fr] - x[k:k + fr].mean()
        if np.sqrt(np.mean(s ** 2)) < 0.02:
            continue
        ac = np.correlate(s, s, "full")[fr - 1:]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.4 * ac[0]:
            f0.append(sr / lag)
    return float(np.median(f0))


def ffprobe(path) -> tuple[int, int]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                          "stream=sample_rate,channels", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    st = json.loads(out)["streams"][0]
    return int(st["sample_rate"]), int(st["channels"])


def ffmpeg_decode(path, sr: int) -> np.ndarray:
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-f", "f32le",
                          "-ac", "1", "-ar", str(sr), "-"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.float32)


@pytest.fixture(scope="module")
def clean():
    return synth.synth_dialogue(7, n_turns=6, pause=(0.3, 0.8), keep_stems=True)


# ---------------------------------------------------------------------------------- text


def test_text_generator_is_deterministic_and_sized():
    a = [synth.TextGen("en", 5).sentence(k) for k in ("question", "statement", "answer") * 20]
    b = [synth.TextGen("en", 5).sentence(k) for k in ("question", "statement", "answer") * 20]
    assert a == b
    gen = synth.TextGen("en", 1)
    sentences = [gen.sentence(("question", "statement", "answer")[i % 3]) for i in range(300)]
    assert all(5 <= len(s.split()) <= 15 for s in sentences)
    assert all(s.endswith("?") for s in sentences[::3])
    assert len(set(sentences)) > 250
    assert len(gen.vocabulary()) >= 300
    used = {w for s in sentences for w in re.findall(r"[a-z]+(?:-[a-z]+)?", s.lower())}
    assert len(used) >= 200 and used <= gen.vocabulary()
    zh = synth.TextGen("zh", 1)
    zs = [zh.sentence("question") for _ in range(20)]
    assert all(s.endswith("？") and re.search(r"[\u4e00-\u9fff]", s) for s in zs)
    with pytest.raises(ValueError, match="language"):
        synth.TextGen("fr")


# ---------------------------------------------------------------------------------- truth


def test_same_seed_same_samples_and_truth():
    kw = dict(n_turns=5, backchannel_prob=0.7, overlap_prob=0.5, noise_snr_db=20, music_db=-20)
    a = synth.synth_dialogue(3, **kw)
    synth._CACHE.clear()  # espeak itself must be deterministic too, not just the cache
    b = synth.synth_dialogue(3, **kw)
    assert np.array_equal(a.audio, b.audio)
    assert a.truth == b.truth
    c = synth.synth_dialogue(4, **kw)
    assert c.truth.transcript != a.truth.transcript


def test_clean_dialogue_truth_matches_audio(clean):
    t, a = clean.truth, clean.audio
    assert t.kind == "dialogue" and t.sample_rate == SR and set(t.speakers) == {"S1", "S2"}
    assert t.duration == pytest.approx(len(a) / SR, abs=1e-3)
    starts = [x.start for x in t.turns]
    assert starts == sorted(starts)
    assert [x.speaker for x in t.turns] == ["S1", "S2"] * 3
    assert not any(x.overlap or x.is_backchannel for x in t.turns)
    assert 0 < t.turns[0].start and t.turns[-1].end < t.duration
    assert t.transcript == " ".join(f"[{x.speaker}] {x.text}" for x in t.turns)
    fdb = frame_db(a, SR)
    for x in t.turns:
        inside = fdb[int(x.start * 100) + 1:int(x.end * 100) - 1]
        assert np.mean(inside > -50) > 0.6, x
        # Boundaries exact to ~10 ms: speech right inside, digital silence right outside.
        s, e = int(round(x.start * SR)), int(round(x.end * SR))
        assert db(a[s:s + 160]) > -65 and db(a[e - 160:e]) > -65, x
        assert db(a[s - 320:s - 16]) < -100 and db(a[e + 16:e + 320]) < -100, x
    for prev, nxt in zip(t.turns, t.turns[1:]):
        assert nxt.start - prev.end >= 0.3 - 1e-3
        gap = a[int(prev.end * SR) + 16:int(nxt.start * SR) - 16]
        assert db(gap) < -100


def test_voices_clearly_differ(clean):
    sr, f0 = SR, {}
    for spk in ("S1", "S2"):
        f0[spk] = median_f0(clean.stems[spk], sr)
    lo, hi = sorted(f0.values())
    assert hi / lo > 1.5, f0
    genders = {v["gender"] for v in clean.truth.speakers.values()}
    assert genders == {"male", "female"}


def test_overlaps_really_overlap():
    c = synth.synth_dialogue(11, n_turns=8, overlap_prob=1.0, overlap=(0.4, 0.8), keep_stems=True)
    turns = c.truth.turns
    flagged = [x for x in turns if x.overlap]
    assert len(flagged) >= 4
    for x in turns:
        others = [y for y in turns if y.speaker != x.speaker and y.start < x.end and x.start < y.end]
        assert bool(others) == x.overlap
        for y in others:  # both voices sound during the shared span
            s, e = int(max(x.start, y.start) * SR), int(min(x.end, y.end) * SR)
            assert e - s > 0.1 * SR
            assert db(c.stems[x.speaker][s:e]) > -45 and db(c.stems[y.speaker][s:e]) > -45
    for spk in ("S1", "S2"):  # nobody overlaps themself
        own = [x for x in turns if x.speaker == spk]
        assert all(b.start >= a.end for a, b in zip(own, own[1:]))


def test_backchannels_are_short_listener_turns():
    c = synth.synth_dialogue(5, n_turns=10, backchannel_prob=1.0, keep_stems=True)
    bcs = [x for x in c.truth.turns if x.is_backchannel]
    assert len(bcs) >= 3
    assert any(x.overlap for x in bcs) and any(not x.overlap for x in bcs)  # inside and between
    for b in bcs:
        assert b.text in synth.EN_BACKCHANNELS and b.end - b.start < 1.5
        assert db(c.stems[b.speaker][int(b.start * SR):int(b.end * SR)]) > -45
        if b.overlap:
            host = [x for x in c.truth.turns if x.start <= b.start and b.end <= x.end and x is not b]
            assert host and host[0].speaker != b.speaker
    for b in bcs:
        assert b.text in c.truth.transcript


@pytest.mark.parametrize("color,snr", [("white", 15.0), ("pink", 5.0)])
def test_noise_at_requested_snr(color, snr):
    c = synth.synth_dialogue(2, n_turns=3, noise_snr_db=snr, noise_color=color, keep_stems=True)
    speech = sum(c.stems.values())
    noise = c.audio - speech
    mask = synth.speech_mask(c.truth.turns, len(c.audio), SR)
    measured = db(speech[mask]) - db(noise)
    assert measured == pytest.approx(snr, abs=0.5)
    assert c.truth.conditions["noise"] == {"snr_db": snr, "color": color,
                                           "definition": "speech power over the turns / noise power"}
    spec = np.abs(np.fft.rfft(noise)) ** 2
    f = np.fft.rfftfreq(len(noise), 1 / SR)
    low, high = spec[(f > 200) & (f < 400)].mean(), spec[(f > 3200) & (f < 6400)].mean()
    tilt = 10 * np.log10(low / high)  # 4 octaves apart: pink (-3 dB/octave) 12 dB, white 0 dB
    assert (10 < tilt < 14) if color == "pink" else (abs(tilt) < 1.5)
    # Noise leaves the speech of a seed untouched.
    quiet = synth.synth_dialogue(2, n_turns=3, keep_stems=True)
    assert quiet.truth.turns == c.truth.turns
    assert np.allclose(sum(quiet.stems.values()), speech, atol=1e-6)


def test_music_is_tonal_and_at_level():
    c = synth.synth_dialogue(2, n_turns=3, music_db=-12.0, keep_stems=True)
    speech = sum(c.stems.values())
    music = c.audio - speech
    mask = synth.speech_mask(c.truth.turns, len(c.audio), SR)
    assert db(speech[mask]) - db(music) == pytest.approx(12.0, abs=0.5)
    spec = np.sort(np.abs(np.fft.rfft(music)) ** 2)[::-1]
    assert spec[: len(spec) // 100].sum() > 0.8 * spec.sum()  # energy sits in few bins: tones


# ---------------------------------------------------------------------------------- kinds


def test_monologue_has_one_speaker():
    c = synth.synth_monologue(1, n_sentences=4)
    t = c.truth
    assert t.kind == "monologue" and list(t.speakers) == ["S1"]
    assert len(t.turns) == 4 and {x.speaker for x in t.turns} == {"S1"}
    assert t.transcript.count("[S1]") == 1 and "[S2]" not in t.transcript
    assert all(b.start - a.end >= 0.3 - 1e-3 for a, b in zip(t.turns, t.turns[1:]))


@pytest.mark.parametrize("n", [3, 4])
def test_meeting_has_three_or_four_speakers(n):
    c = synth.synth_meeting(2, n_speakers=n, n_turns=n + 2)
    t = c.truth
    labels = [f"S{i + 1}" for i in range(n)]
    assert t.kind == "meeting" and list(t.speakers) == labels
    assert {x.speaker for x in t.turns} == set(labels)
    assert len({(v["voice"], v["pitch"]) for v in t.speakers.values()}) == n
    assert all(a.speaker != b.speaker for a, b in zip(t.turns, t.turns[1:]))
    with pytest.raises(ValueError, match="3 or 4"):
        synth.synth_meeting(1, n_speakers=5)


def test_chinese_dialogue():
    c = synth.synth_dialogue(1, n_turns=2, language="zh")
    assert c.truth.language == "zh"
    assert all(v["voice"].startswith("cmn") for v in c.truth.speakers.values())
    assert re.fullmatch(r"\[S1\] [^\[]+ \[S2\] [^\[]+", c.truth.transcript)


def test_silence_and_noise_only():
    s = synth.synth_silence(2.0)
    assert s.truth.kind == "silence" and s.truth.turns == [] and not np.any(s.audio)
    assert len(s.audio) == 2 * SR
    n = synth.synth_silence(2.0, noise_dbfs=-55.0)
    assert db(n.audio) == pytest.approx(-55.0, abs=0.5)


def test_duration_target_and_long_reuse():
    c = synth.synth_long(90.0, 1, text_pool=8)
    t = c.truth
    assert 90.0 <= t.duration < 110.0
    texts = [x.text for x in t.turns if not x.is_backchannel]
    sentences = [s for x in texts for s in re.split(r"(?<=[.?]) ", x)]
    assert len(set(sentences)) <= 24 < len(sentences)  # reused from the pool of 3 x 8


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="color"):
        synth.synth_dialogue(1, n_turns=2, noise_snr_db=10, noise_color="brown")
    with pytest.raises(ValueError, match="language"):
        synth.synth_dialogue(1, n_turns=2, language="fr")
    with pytest.raises(ValueError, match="exactly one"):
        synth.synth_dialogue(1, n_turns=2, duration=10.0)
    with pytest.raises(ValueError, match=r"x\.aiff.*suffix"):
        synth.write_audio(tmp_path / "x.aiff", np.zeros(100), SR)


# ---------------------------------------------------------------------------------- files

FORMATS = [  # name, sr, channels, subtype, expected decoded sr, lossless
    ("a.wav", 16000, 1, "PCM_16", 16000, True),
    ("b.wav", 24000, 2, "PCM_24", 24000, True),
    ("c.flac", 44100, 2, None, 44100, True),
    ("d.ogg", 22050, 1, None, 22050, False),
    ("e.mp3", 32000, 1, None, 32000, False),
    ("f.mp3", 44100, 2, None, 44100, False),
    ("g.m4a", 16000, 1, None, 16000, False),
    ("h.opus", 16000, 2, None, 48000, False),
    ("i.opus", 22050, 1, None, 48000, False),
]


@pytest.mark.parametrize("name,sr,ch,subtype,dec_sr,lossless", FORMATS)
def test_write_every_format_and_read_back(tmp_path, name, sr, ch, subtype, dec_sr, lossless):
    c = synth.synth_dialogue(9, n_turns=2, sample_rate=sr)
    audio_path, truth_path = synth.write_clip(c, tmp_path / name, channels=ch, subtype=subtype)
    truth = synth.Truth.load(truth_path)
    assert truth.sample_rate == sr and truth.file["channels"] == ch and truth.turns == c.truth.turns
    if audio_path.suffix in (".m4a", ".opus"):
        got_sr, got_ch = ffprobe(audio_path)
        y = ffmpeg_decode(audio_path, sr)
    else:
        info = sf.info(str(audio_path))
        got_sr, got_ch = info.samplerate, info.channels
        y, _ = sf.read(str(audio_path), dtype="float32", always_2d=True)
        if subtype:
            assert info.subtype == subtype
        y = y.mean(axis=1)
    assert (got_sr, got_ch) == (dec_sr, ch)
    x = c.audio
    assert abs(len(y) - len(x)) < 0.1 * sr  # AAC pads its last frame
    n = min(len(x), len(y))
    if lossless:
        assert np.max(np.abs(y[:n] - x[:n])) < 1e-3
    else:  # same loudness contour, with no codec delay left: turn times stay true
        ex, ey = frame_db(x[:n], sr), frame_db(y[:n], sr)
        ex, ey = np.maximum(ex, -80), np.maximum(ey, -80)
        assert np.corrcoef(ex, ey)[0, 1] > 0.95
        lags = range(-5, 6)
        best = max(lags, key=lambda k: np.dot(ex[5 + k:len(ex) - 5 + k] + 80, ey[5:len(ey) - 5] + 80))
        assert best == 0


def test_build_example(tmp_path):
    index = synth.build_example(tmp_path / "audio")
    files = {p.name for p in (tmp_path / "audio").iterdir()}
    assert files == {r["file"] for r in index}
    assert not any(f.endswith(".json") for f in files)
    rows = {r["file"]: r for r in index}
    dialogues = [r for r in index if r["kind"] == "dialogue" and r["language"] == "en"]
    assert len(dialogues) == 4 and all(30 <= r["duration"] <= 75 for r in dialogues)
    assert max(r["duration"] for r in dialogues) > 60  # needs splitting into <= 30 s pieces
    assert 25 <= rows["dlg_zh.m4a"]["duration"] <= 40
    assert rows["meeting_en.mp3"]["speakers"] == 3
    total = sum(r.get("duration", 0) for r in index)
    assert 240 <= total <= 300  # about 4-5 minutes
    for r in index:
        if r["truth"] is None:
            continue
        t = synth.Truth.load(tmp_path / "truth" / r["truth"])
        assert t.file["name"] == r["file"]
        path = tmp_path / "audio" / r["file"]
        sr, ch = ffprobe(path)
        assert ch == r["channels"] and (sr == t.sample_rate or path.suffix == ".opus")
    bc = synth.Truth.load(tmp_path / "truth" / "dlg_backchannel_en.json")
    assert sum(x.is_backchannel for x in bc.turns) >= 2
    main = [x for x in bc.turns if not x.is_backchannel]
    assert any(a.speaker != b.speaker and a.start < b.end and b.start < a.end for a in main for b in main)
    noisy = synth.Truth.load(tmp_path / "truth" / "dlg_noisy_en.json")
    assert noisy.conditions["noise"]["snr_db"] == 15.0
    # The bad inputs are bad in the advertised way.
    assert (tmp_path / "audio" / "empty.wav").stat().st_size == 0
    for bad in ("empty.wav", "not_audio.wav"):
        with pytest.raises(sf.LibsndfileError):
            sf.read(str(tmp_path / "audio" / bad))
    raw = (tmp_path / "audio" / "truncated.wav").read_bytes()
    claimed = int.from_bytes(raw[40:44], "little")
    assert raw[36:40] == b"data" and claimed == 5 * 16000 * 2 > len(raw) - 44


def test_cli_writes_audio_and_truth(tmp_path, capsys):
    out = tmp_path / "x.flac"
    assert synth.main(["dialogue", "--seed", "3", "--turns", "2", "--sr", "22050", "--out", str(out)]) == 0
    t = synth.Truth.load(tmp_path / "x.json")
    assert sf.info(str(out)).samplerate == 22050 and len(t.turns) == 2
    assert np.array_equal(sf.read(str(out))[0],
                          sf.read(str(synth.write_clip(synth.synth_dialogue(3, n_turns=2, sample_rate=22050),
                                                       tmp_path / "y.flac")[0]))[0])
