"""DNSMOS P.835 scorer: equal to the speechmos reference, sensitive to noise, batch == single."""

import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from filters import dnsmos as dn
from filters.dnsmos import DNSMOS

SR = 16000
TEXT = ("The weather was calm this morning, so we took the small boat out across the bay. "
        "By noon the wind had picked up and the waves grew taller, and we decided to turn back "
        "before the storm arrived. Everyone was tired but happy when we finally reached the shore.")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """About 14 s of espeak-ng speech at 16 kHz."""
    path = tmp_path_factory.mktemp("dnsmos") / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us+f3", "-w", str(path), TEXT], check=True)
    x, sr = sf.read(path, dtype="float32")
    x = np.clip(soxr.resample(x, sr, SR), -1, 1).astype(np.float32)
    assert len(x) > 13 * SR
    return x


@pytest.fixture(scope="module")
def scorer() -> DNSMOS:
    return DNSMOS(num_threads=2)


@pytest.fixture(scope="module")
def reference():
    """speechmos.dnsmos.run, memoised per clip (it also runs P.808 on every window)."""
    from speechmos import dnsmos as sm

    cache = {}

    def run(x):
        key = (len(x), float(x[:1000].sum()), float(x.sum()))
        if key not in cache:
            cache[key] = sm.run(x, SR)
        return cache[key]

    return run


def close(ours: dict, ref: dict, tol: float) -> None:
    for k, rk in [("ovrl", "ovrl_mos"), ("sig", "sig_mos"), ("bak", "bak_mos")]:
        assert abs(ours[k] - ref[rk]) < tol, (k, ours[k], ref[rk])


def test_window_rule_matches_speechmos(monkeypatch):
    """Our windows (tiling by doubling, hop count, rounding-skipped windows) are exactly the
    segments speechmos feeds its model, for short and long clips."""
    from speechmos import dnsmos as sm

    seen = []

    class Recorder:
        def run(self, _, feeds):
            seen.append(feeds["input_1"][0].copy())
            return [np.zeros((1, 3), np.float32)]

    class P808Stub:
        def run(self, _, feeds):
            return [np.zeros((1, 1), np.float32)]

    model = sm.DNSMOS.__new__(sm.DNSMOS)
    model.onnx_sess, model.p808_onnx_sess = Recorder(), P808Stub()
    monkeypatch.setattr(model, "audio_melspec", lambda audio: np.zeros((900, 120)))
    rng = np.random.default_rng(0)
    counts = []
    for seconds in [0.3, 5.0, 8.2, 9.01, 12.5, 17.5, 30.0, 61.0]:
        x = rng.uniform(-0.5, 0.5, int(seconds * SR)).astype(np.float32)
        seen.clear()
        model(x, SR, False)
        tiled = dn.tile_to_window(x)
        ours = [tiled[s: s + dn.WIN_SAMPLES] for s in dn.window_starts(len(tiled))]
        assert len(ours) == len(seen), seconds
        assert all(np.array_equal(a, b) for a, b in zip(ours, seen)), seconds
        counts.append(len(ours))
    # Doubling gives an 8.2 s clip 7 windows; float rounding drops windows 7..23 of long clips.
    assert counts[2] == 7 and counts[-2] == 7 and counts[-1] == 35


@pytest.mark.parametrize("seconds", [6.5, 12.5])
def test_matches_speechmos(speech, scorer, reference, seconds, monkeypatch):
    x = speech[: int(seconds * SR)]
    ref = reference(x)
    close(scorer.score(x), ref, 1e-3)
    # Small front-end chunks: the halo stitching must give the same numbers.
    monkeypatch.setattr(dn, "FRONT_MAX_FRAMES", 500)
    close(scorer.score(x), ref, 1e-3)


def test_p808_only_when_asked(speech, scorer, reference):
    x = speech[: 5 * SR]
    assert "p808" not in scorer.score(x) and scorer._p808 is None
    ours = DNSMOS(p808=True, num_threads=2).score(x)
    ref = reference(x)
    close(ours, ref, 1e-3)
    assert abs(ours["p808"] - ref["p808_mos"]) < 1e-3


def test_noise_lowers_ovrl(speech, scorer):
    clean = speech[: 5 * SR]
    noise = np.random.default_rng(1).standard_normal(len(clean)).astype(np.float32)
    noise *= np.sqrt(np.mean(clean**2) / np.mean(noise**2))  # 0 dB SNR
    noisy = clean + noise
    noisy /= max(1.0, float(np.abs(noisy).max()))
    s_clean, s_noisy = scorer.score_batch([clean, noisy])
    assert s_clean["ovrl"] >= s_noisy["ovrl"] + 0.5, (s_clean, s_noisy)
    assert s_clean["bak"] > s_noisy["bak"]


def test_batch_equals_single_and_spans(speech, scorer, monkeypatch):
    spans = [(0.0, 5.0), (1.0, 4.0), (3.2, 13.2), (0.0, 0.01), (4.0, 12.2)]
    clips = [speech[round(a * SR): round(b * SR)] for a, b in spans]
    single = [scorer.score(c) for c in clips]
    # Head batches of 2 windows, groups of 2-4 windows: groups split between clips and
    # inside the 7-window clip (8.2 s, doubled).
    monkeypatch.setattr(dn, "GROUP_BATCHES", 1)
    small = DNSMOS(num_threads=2, batch_size=2)
    batch = small.score_batch(clips)
    for b, s in zip(batch, single):
        assert b.keys() == s.keys() == {"ovrl", "sig", "bak"}
        for k in b:
            assert abs(b[k] - s[k]) < 1e-4, (k, b, s)
    for sp, b in zip(small.score_spans(speech, spans), batch):
        for k in b:
            assert abs(sp[k] - b[k]) < 1e-4, (k, sp, b)
    # Different clips give different scores (nothing is shared by mistake across clips).
    assert len({round(b["ovrl"], 4) for b in batch}) == len(batch)


def test_resamples_other_rates(speech, scorer):
    x = speech[: 5 * SR]
    x44 = np.clip(soxr.resample(x, SR, 44100), -1, 1).astype(np.float32)
    expected = scorer.score(np.clip(soxr.resample(x44, 44100, SR), -1, 1))
    got = scorer.score(x44, sample_rate=44100)
    assert got == pytest.approx(expected, abs=1e-6)
    spans = scorer.score_spans(x44, [(0.0, 5.0)], sample_rate=44100)
    assert spans[0] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("audio, message", [
    (np.zeros(0, np.float32), "empty"),
    (np.zeros((2, 16000), np.float32), "1-D mono"),
    (np.zeros(16000, np.int16), "dtype int16"),
    (np.full(16000, np.nan, np.float32), "NaN"),
    (np.full(16000, 1.5, np.float32), "values must lie in"),
])
def test_bad_audio(scorer, audio, message):
    with pytest.raises(ValueError, match=message):
        scorer.score(audio)
    with pytest.raises(ValueError, match="clip 1"):
        scorer.score_batch([np.zeros(SR, np.float32), audio])


@pytest.mark.parametrize("span", [(1.0, 1.0), (2.0, 1.0), (-0.5, 1.0), (0.5, 3.5), (1.0,)])
def test_bad_spans(scorer, span):
    with pytest.raises(ValueError, match="span 1"):
        scorer.score_spans(np.zeros(3 * SR, np.float32), [(0.0, 1.0), span])


def test_bad_arguments(scorer):
    with pytest.raises(ValueError, match="sample_rate"):
        scorer.score(np.zeros(SR, np.float32), sample_rate=0)
    with pytest.raises(ValueError, match="batch_size"):
        DNSMOS(batch_size=0)
    with pytest.raises(ValueError, match="num_threads"):
        DNSMOS(num_threads=0)


def test_providers_are_used():
    m = DNSMOS(num_threads=1, providers=["CPUExecutionProvider"])
    assert m._front.get_providers() == m._head.get_providers() == ["CPUExecutionProvider"]
