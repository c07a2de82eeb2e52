import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from model.features import FEAT_SCALE, VocosFbank, load_audio, mel_filterbank, num_frames


def _tone(n, sr=24000, f=440.0, amp=0.3):
    t = np.arange(n) / sr
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


@pytest.mark.parametrize("n", [0, 127, 128, 255, 383, 384])
def test_frame_count_formula(n):
    assert num_frames(n) == (n + 128) // 256 == int(np.floor(n / 256 + 0.5))


@pytest.mark.parametrize("n", [513, 639, 640, 1000, 24000, 24000 + 127, 24000 + 128, 24000 + 129])
def test_frame_count_of_features(n):
    expected = (n + 128) // 256  # lhotse: round(N / 256)
    feats = VocosFbank().extract(np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.1, 24000)
    assert feats.shape == (expected, 100)
    assert feats.dtype == torch.float32


def test_extra_stft_frames_are_cut_missing_ones_repeat_the_last():
    from model.features import _fix_length, log_mel

    x = _tone(24000 + 100)
    feats = VocosFbank().extract(x, 24000)
    full = log_mel(torch.from_numpy(x)).T
    assert full.shape[0] == 1 + len(x) // 256 == 95  # the centred STFT gives one frame more
    assert feats.shape[0] == num_frames(len(x)) == 94
    torch.testing.assert_close(feats, full[:94])
    padded = _fix_length(full[:3], 5)
    assert padded.shape == (5, 100)
    torch.testing.assert_close(padded[3], full[2])
    torch.testing.assert_close(padded[4], full[2])


def test_matches_torchaudio_melspectrogram():
    from torchaudio.transforms import MelSpectrogram

    ref = MelSpectrogram(
        sample_rate=24000, n_fft=1024, win_length=1024, hop_length=256, n_mels=100, f_min=0.0, f_max=None,
        center=True, pad_mode="reflect", power=1.0, norm=None, mel_scale="htk",
    )
    rng = np.random.default_rng(1)
    x = (0.2 * rng.standard_normal(24000 * 2) + _tone(48000, f=220)).astype(np.float32)
    expected = torch.log(torch.clamp(ref(torch.from_numpy(x)), min=1e-7)).T
    got = VocosFbank().extract(x, 24000)
    n = num_frames(len(x))
    assert got.shape == (n, 100)
    torch.testing.assert_close(got, expected[:n], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(mel_filterbank(), ref.mel_scale.fb, atol=1e-5, rtol=0)


def test_tone_energy_lands_in_the_right_mel_bin():
    feats = VocosFbank().extract(_tone(24000, f=1000.0), 24000)
    peak = int(feats[10:-10].mean(0).argmax())
    fb = mel_filterbank()
    bin_1k = round(1000 / 12000 * 512)
    assert peak == int(fb[bin_1k].argmax())


def test_stereo_layout_and_mono_average():
    a, b = _tone(12000, f=300), _tone(12000, f=3000)
    stereo = np.stack([a, b])
    mono_fb, stereo_fb = VocosFbank(), VocosFbank(num_channels=2)
    s = stereo_fb.extract(stereo, 24000)
    assert s.shape == (num_frames(12000), 200)
    torch.testing.assert_close(s[:, :100], mono_fb.extract(a, 24000))
    torch.testing.assert_close(s[:, 100:], mono_fb.extract(b, 24000))
    torch.testing.assert_close(mono_fb.extract(stereo, 24000), mono_fb.extract((a + b) / 2, 24000))
    torch.testing.assert_close(mono_fb.extract(torch.from_numpy(stereo), 24000), mono_fb.extract((a + b) / 2, 24000))
    with pytest.raises(ValueError, match="stereo extractor"):
        stereo_fb.extract(a, 24000)
    with pytest.raises(ValueError, match="too short"):
        mono_fb.extract(a[:400], 24000)


def test_resamples_other_rates():
    x16 = _tone(16000, sr=16000, f=500)
    feats = VocosFbank().extract(x16, 16000)
    assert feats.shape == (num_frames(24000), 100)
    ref = VocosFbank().extract(_tone(24000, f=500), 24000)
    # same tone at 24 kHz: interior frames agree closely in the bins that hold energy
    inner = slice(5, -5)
    strong = ref[inner] > -3
    assert (feats[inner][strong] - ref[inner][strong]).abs().mean() < 0.1


def test_feat_scale():
    assert FEAT_SCALE == 0.1


def test_load_audio_wav_flac_mp4_and_errors(tmp_path):
    sr = 16000
    stereo = np.stack([_tone(sr, sr, 200), _tone(sr, sr, 400)]).T  # (N, 2)
    wav = tmp_path / "a.wav"
    sf.write(wav, stereo, sr)
    x = load_audio(wav, 24000, mono=False)
    assert x.shape == (2, 24000) and x.dtype == np.float32
    m = load_audio(wav, 24000)
    assert m.shape == (24000,)
    np.testing.assert_allclose(m, x.mean(0), atol=1e-6)
    assert np.allclose(load_audio(wav, 16000, mono=False), stereo.T, atol=1e-4)

    m4a = tmp_path / "a.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    y = load_audio(m4a, 24000, mono=False)
    assert y.shape[0] == 2 and abs(y.shape[1] - 24000) < 2400  # aac adds priming samples

    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage-not-audio" * 10)
    with pytest.raises(ValueError, match="broken.wav"):
        load_audio(bad)


@pytest.mark.parametrize("orig_sr", [8000, 16000, 22050, 44100, 48000])
def test_resampling_is_the_references_torchaudio_resampler(tmp_path, orig_sr):
    from torchaudio.transforms import Resample

    from model.features import resample_sinc

    rng = np.random.default_rng(orig_sr)
    n = orig_sr // 3 + 7  # a length that does not divide evenly
    x = (0.3 * rng.standard_normal((2, n)) + np.stack([_tone(n, orig_sr, 300), _tone(n, orig_sr, 3500)])
         ).astype(np.float32)
    expected = Resample(orig_freq=orig_sr, new_freq=24000)(torch.from_numpy(x)).numpy()
    got = resample_sinc(x, orig_sr, 24000)
    assert got.shape == expected.shape == (2, -(-n * 24000 // orig_sr))
    np.testing.assert_array_equal(got, expected)  # same filters, same float32 convolution
    mono = Resample(orig_freq=orig_sr, new_freq=24000)(torch.from_numpy(x[0]))
    np.testing.assert_array_equal(resample_sinc(x[0], orig_sr, 24000), mono.numpy())
    # files and the feature extractor go through it
    sf.write(tmp_path / "p.wav", x.T, orig_sr, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "p.wav", 24000, mono=False), expected)
    torch.testing.assert_close(VocosFbank().extract(x[0], orig_sr), VocosFbank().extract(mono, 24000),
                               rtol=0, atol=0)


def test_sinc_and_soxr_resampling_differ_above_the_source_band():
    """Why the resampler matters: above 8 kHz a 16 kHz prompt has only what each filter leaks."""
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(16000)).astype(np.float32)
    from model.features import resample, resample_sinc

    sinc = VocosFbank().extract(resample_sinc(x, 16000, 24000), 24000)
    soxr = VocosFbank().extract(resample(x, 16000, 24000), 24000)
    high = mel_filterbank().argmax(0) > 8000 * 1024 // 24000  # mel bins centred above 8 kHz
    low = mel_filterbank().argmax(0) < 7000 * 1024 // 24000
    assert (sinc[:, high] - soxr[:, high]).abs().mean() > 1.0
    assert (sinc[:, low] - soxr[:, low]).abs().mean() < 0.05
