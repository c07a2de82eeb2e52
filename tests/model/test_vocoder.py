import numpy as np
import pytest
import torch
import yaml

from model.features import VocosFbank, num_frames
from model.vocoder import GriffinLimVocoder, VocosVocoder, load_vocoder

TINY_VOCOS = {
    "feature_extractor": {
        "class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
        "init_args": {"sample_rate": 24000, "n_fft": 1024, "hop_length": 256, "n_mels": 100, "padding": "center"},
    },
    "backbone": {
        "class_path": "vocos.models.VocosBackbone",
        "init_args": {"input_channels": 100, "dim": 32, "intermediate_dim": 64, "num_layers": 2},
    },
    "head": {"class_path": "vocos.heads.ISTFTHead", "init_args": {"dim": 32, "n_fft": 1024, "hop_length": 256, "padding": "center"}},
}



@pytest.fixture(scope="module")
def speech_24k():
    from audio_fixtures import speech

    return speech("Hello there, a short test.", "en-us+f3", sr=24000)[: 24000 * 3 // 2]


def test_griffin_lim_inverts_the_mel(speech_24k):
    fbank = VocosFbank()
    feats = fbank.extract(speech_24k, 24000)  # (T, 100)
    t = feats.shape[0]
    vocoder = load_vocoder("griffin-lim")
    assert isinstance(vocoder, GriffinLimVocoder) and vocoder.sampling_rate == 24000
    wave = vocoder.decode(feats.T.unsqueeze(0))
    assert wave.shape == (1, t * 256)
    assert wave.abs().max() <= 1.0
    assert num_frames(wave.shape[1]) == t
    again = fbank.extract(wave[0], 24000)
    loud = feats > feats.max() - 8  # compare where the speech has energy (log domain)
    err = (again - feats).abs()[loud].mean().item()
    noise = torch.randn(len(speech_24k)) * float(np.std(speech_24k))
    noise_err = (fbank.extract(noise, 24000) - feats).abs()[loud].mean().item()
    assert err < 0.4, (err, noise_err)
    assert err < noise_err / 4


def test_griffin_lim_nnls_recovers_magnitude():
    from model.features import mel_filterbank

    rng = torch.Generator().manual_seed(0)
    mag = torch.rand(1, 513, 20, generator=rng)
    mel = (mel_filterbank().T @ mag[0]).unsqueeze(0)
    rec = GriffinLimVocoder(nnls_iter=200).mel_to_magnitude(mel)
    assert rec.min() >= 0
    rel = ((mel_filterbank().T @ rec[0]) - mel[0]).norm() / mel.norm()
    assert rel < 0.05


def test_vocos_local_directory_random_weights(tmp_path):
    from vocos import Vocos

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(TINY_VOCOS))
    torch.manual_seed(0)
    model = Vocos.from_hparams(str(cfg))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    vocoder = load_vocoder(str(tmp_path))
    assert isinstance(vocoder, VocosVocoder)
    feats = torch.randn(2, 100, 40) - 3
    wave = vocoder.decode(feats)
    assert wave.shape == (2, 39 * 256)  # Vocos' centred ISTFT: hop * (T - 1)
    assert wave.abs().max() <= 1.0
    expected = model.decode(feats).clamp(-1, 1)
    torch.testing.assert_close(wave, expected)  # the saved weights were loaded
    with pytest.raises(ValueError, match=r"\(B, 100, T\)"):
        vocoder.decode(torch.randn(1, 80, 10))


def test_vocos_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_VOCOS))
        load_vocoder(str(tmp_path))
    evil = dict(TINY_VOCOS, head={"class_path": "os.system", "init_args": {}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(evil))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="vocos class"):
        load_vocoder(str(tmp_path))


def test_unreachable_hub_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="griffin-lim"):
        load_vocoder("nobody/no-such-vocoder")
