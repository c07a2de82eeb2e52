"""ASR stage and backends.

Hub-backed backends (openai-whisper, transformers Whisper, FunASR Paraformer) are loaded through
the same loader users use, from tiny random-weight models built here in a temporary directory:
their text is garbage, so those tests check structure (rows, spans, languages, scores). The
pocketsphinx model ships in its package and is real: its words are checked against the
generator's text. The faster-whisper backend with the bundled real tiny.en weights and the
word-level speaker attribution are tested in tests/test_faster_whisper.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline import manifests
from pipeline.backends.asr import Transcript, load_backend
from pipeline.backends.hub import ModelNotFound
from pipeline.config import ConfigError, parse_config
from pipeline.runner import run_pipeline
from pipeline.stage import StageContext
from pipeline.stages.asr import (NO_DIARIZATION_SPEAKER, AsrConfig, AsrStage, choose_languages,
                                 quietest_point, split_turn)
from tools import synth

ROOT = Path(__file__).resolve().parent.parent
SR = 16000
WORDS_WER = 0.35  # real tiny.en on espeak voices (robotic, so worse than on real speech)


# ------------------------------------------------------------------ tiny random-weight models


def make_whisper_checkpoint(path: Path, *, n_mels: int = 80, n_state: int = 64, n_head: int = 2,
                            n_layer: int = 1, n_vocab: int = 51865, seed: int = 0, half: bool = False) -> Path:
    """An openai-whisper checkpoint file ({"dims", "model_state_dict"}) with random weights
    (``half``: stored as float16, like the published checkpoints)."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    dims = ModelDimensions(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=n_state, n_audio_head=n_head,
                           n_audio_layer=n_layer, n_vocab=n_vocab, n_text_ctx=448, n_text_state=n_state,
                           n_text_head=n_head, n_text_layer=n_layer)
    model = Whisper(dims)
    with torch.no_grad():
        # whisper leaves the decoder's positions uninitialised (torch.empty); small embeddings keep
        # the random logits flat enough that text tokens, not special tokens, come out.
        model.decoder.positional_embedding.normal_(0, 0.02)
        model.decoder.token_embedding.weight.normal_(0, 0.02)
    if half:
        model.half()
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in byte order."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def make_hf_whisper_dir(path: Path, *, d_model: int = 64, layers: int = 1, heads: int = 2, ffn: int = 128,
                        num_mel_bins: int = 80, vocab_size: int | None = None, seed: int = 0,
                        half: bool = False) -> Path:
    """A save_pretrained directory: random WhisperForConditionalGeneration + a WhisperProcessor
    whose tokenizer is a small byte-level BPE with Whisper's special tokens (built offline).
    ``vocab_size`` pads the vocabulary with filler words up to a real model's size."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    torch.manual_seed(seed)
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "n"), ("Ġ", "a"), ("Ġa", "n"), ("i", "n"), ("Ġ", "in")]:
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{c}|>" for c in LANGUAGES], "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    while vocab_size is not None and len(vocab) + len(specials) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = tok.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=num_mel_bins, d_model=d_model, encoder_layers=layers,
                        decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
                        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_source_positions=1500,
                        max_target_positions=448, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                        decoder_start_token_id=sot)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot, max_length=448,
        lang_to_id={f"<|{c}|>": ids(f"<|{c}|>") for c in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), is_multilingual=True,
        # A random model would babble special tokens; real checkpoints never emit them mid-text.
        suppress_tokens=[ids(s) for s in specials[1:]], begin_suppress_tokens=[eot])
    if half:
        model.half()
    model.save_pretrained(path)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=num_mel_bins), tokenizer=tok)
    processor.save_pretrained(path)
    return path


PARAFORMER_CHARS = "你好我们去公园吃饭今天气很不错是的对"


def make_paraformer_dir(path: Path, *, d_model: int = 32, heads: int = 2, ffn: int = 64, encoder_blocks: int = 1,
                        decoder_blocks: int = 1, chars: str | list[str] = PARAFORMER_CHARS, seed: int = 0) -> Path:
    """A FunASR model directory (config.yaml, model.pt, tokens.json, am.mvn) of a random Paraformer,
    laid out like the published ones so that ``AutoModel(model=dir)`` loads it."""
    import yaml
    from funasr import AutoModel

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    n_mels, lfr_m = 80, 7
    cfg = {
        "model": "Paraformer",
        "model_conf": {"ctc_weight": 0.0, "predictor_bias": 1, "sampling_ratio": 0.75},
        "encoder": "SANMEncoder",
        "encoder_conf": {"output_size": d_model, "attention_heads": heads, "linear_units": ffn,
                         "num_blocks": encoder_blocks, "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                         "attention_dropout_rate": 0.0, "input_layer": "pe",
                         "pos_enc_class": "SinusoidalPositionEncoder", "normalize_before": True,
                         "kernel_size": 11, "sanm_shfit": 0, "selfattention_layer_type": "sanm"},
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {"attention_heads": heads, "linear_units": ffn, "num_blocks": decoder_blocks,
                         "dropout_rate": 0.0, "positional_dropout_rate": 0.0, "self_attention_dropout_rate": 0.0,
                         "src_attention_dropout_rate": 0.0, "att_layer_num": decoder_blocks,
                         "kernel_size": 11, "sanm_shfit": 0},
        "predictor": "CifPredictorV2",
        "predictor_conf": {"idim": d_model, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
        "frontend": "WavFrontend",
        "frontend_conf": {"fs": 16000, "window": "hamming", "n_mels": n_mels, "frame_length": 25,
                          "frame_shift": 10, "lfr_m": lfr_m, "lfr_n": 6},
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>"},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    tokens = ["<blank>", "<s>", "</s>", *chars, "<unk>"]
    (path / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
    dim = n_mels * lfr_m
    # Kaldi nnet CMVN: add a shift (minus the mean), then rescale (1/std) each feature.
    (path / "am.mvn").write_text(
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {' '.join(['8.0'] * dim)} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {' '.join(['0.25'] * dim)} ]\n</Nnet>\n")
    # AutoModel builds the random model from config.yaml when model.pt holds nothing; store it.
    torch.save({}, path / "model.pt")
    built = AutoModel(model=str(path), device="cpu", disable_update=True, disable_pbar=True, log_level="ERROR", ncpu=1)
    torch.save(built.model.state_dict(), path / "model.pt")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("asr_models")
    return {"whisper": make_whisper_checkpoint(d / "whisper-tiny.pt"),
            "hf-whisper": make_hf_whisper_dir(d / "hf-whisper-tiny"),
            "funasr": make_paraformer_dir(d / "paraformer-tiny")}


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


# ------------------------------------------------------------------ pure logic


def test_long_turns_are_cut_at_vad_pauses_else_at_the_quietest_point(tmp_path):
    # VAD pauses inside a 70 s turn: each cut takes the longest pause in the second half of the window.
    gaps = [(12.0, 12.5), (24.0, 24.8), (26.0, 26.2), (40.0, 40.3), (55.0, 56.0)]
    never = lambda lo, hi: pytest.fail("a VAD pause was available")  # noqa: E731
    pieces = split_turn(0.0, 70.0, 30.0, gaps, never)
    assert pieces == [(0.0, 24.4), (24.4, 40.15), (40.15, 70.0)]
    assert split_turn(3.0, 20.0, 30.0, gaps, never) == [(3.0, 20.0)]

    # No pause: the cut lands on the quietest stretch of the audio (a 150 ms dip at 21.3 s and 43.9 s).
    t = np.arange(int(66 * SR)) / SR
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    for dip in (21.3, 43.9):
        x[int((dip - 0.075) * SR): int((dip + 0.075) * SR)] *= 0.01
    path = tmp_path / "long.wav"
    sf.write(path, x, SR)
    pieces = split_turn(0.0, 66.0, 30.0, [], lambda lo, hi: quietest_point(str(path), lo, hi))
    assert [round(b, 1) for _, b in pieces[:-1]] == [21.3, 43.9]
    assert all(b - a <= 30.0 for a, b in pieces)
    assert pieces[0][0] == 0.0 and pieces[-1][1] == 66.0
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))


def test_language_of_recording_and_turns():
    en = {"en": 0.9, "zh": 0.05, "de": 0.05}
    zh = {"en": 0.05, "zh": 0.92, "de": 0.03}
    unsure = {"en": 0.3, "zh": 0.6, "de": 0.1}
    lang, prob, turns = choose_languages([en, zh, zh, unsure], [10.0, 4.0, 0.5, 3.0], 0.8)
    assert lang == "en"
    assert prob == pytest.approx((0.9 * 10 + 0.05 * 4.5 + 0.3 * 3) / 17.5, abs=1e-4)
    # Confident long turns keep their own language; short or unsure ones take the recording's.
    assert turns == ["en", "zh", "en", "en"]


def test_a_stage_before_the_stage_it_reads_from_is_a_config_error():
    """An ASR with no VAD before it (the per-row "run vad before asr" of old) fails at load time."""
    base = {"run": {"output": "/tmp/x"}}
    for order, words in [(["ingest", "asr", "vad"], ["stages.asr", "'speech'", "'vad'", "put vad before asr"]),
                         (["ingest", "vad", "asr", "diarization"], ["stages.asr", "'turns'", "'diarization'"]),
                         (["ingest", "vad", "diarization", "classification", "asr"], []),  # heuristic: turns only
                         (["ingest", "vad", "segments", "asr"], ["stages.segments", "'utterances'", "'asr'"])]:
        raw = {**base, "stages": {name: {} for name in order}}
        if not words:
            assert [s.name for s in parse_config(raw).stages] == order
            continue
        with pytest.raises(ConfigError) as e:
            parse_config(raw)
        assert all(w in str(e.value) for w in words), str(e.value)
    llm_first = {**base, "stages": {"ingest": {}, "vad": {}, "diarization": {},
                                    "classification": {"backend": "transformers"}, "asr": {}}}
    with pytest.raises(ConfigError, match="stages.classification: needs 'utterances', which stage 'asr' adds after it"):
        parse_config(llm_first)


def test_config_errors_name_the_key():
    base = {"run": {"output": "/tmp/x"}, "stages": {"ingest": {}, "vad": {}}}
    for section, words in [({"backends": {"en": "whisper"}}, ["stages.asr", "default"]),
                           ({"backends": {"default": "kaldi"}}, ["stages.asr.backends.default"]),
                           ({"whisper": {"modle": "x"}}, ["stages.asr.whisper.modle", "unknown key"]),
                           ({"language_id": "guess"}, ["stages.asr.language_id"])]:
        with pytest.raises(ConfigError) as e:
            parse_config({**base, "stages": {**base["stages"], "asr": section}})
        assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_models_fail_with_the_setting_to_change(tmp_path):
    cases = [("faster-whisper", {"model": str(tmp_path / "none")}, "stages.asr.faster_whisper.model"),
             ("faster-whisper", {"model": "large-v9"}, "stages.asr.faster_whisper.model"),
             ("whisper", {"model": str(tmp_path / "nope.pt")}, "stages.asr.whisper.model"),
             ("whisper", {"model": "large-v9"}, "stages.asr.whisper.model"),
             ("hf-whisper", {"model": "nobody/no-such-whisper"}, "stages.asr.hf_whisper.model"),
             ("hf-whisper", {"model": str(tmp_path / "none")}, "stages.asr.hf_whisper.model"),
             ("funasr", {"model": str(tmp_path / "none")}, "stages.asr.funasr.model")]
    for name, options, key in cases:
        with pytest.raises(ModelNotFound) as e:
            load_backend(name, options)
        assert "not found locally and the hub is unreachable" in str(e.value) and key in str(e.value), str(e.value)
    with pytest.raises(FileNotFoundError, match="stages.asr.pocketsphinx.lm"):
        load_backend("pocketsphinx", {"lm": str(tmp_path / "none.lm.bin")})


def test_pocketsphinx_result_does_not_depend_on_earlier_clips():
    """One decoder serves many clips: each clip must come out as it does on a fresh decoder."""
    path = Path(__file__).resolve().parents[2] / "shared" / "realspeech" / "en_1spk_librispeech_1995-1837-0001.wav"
    x, sr = sf.read(path, dtype="float32")
    assert sr == 16000
    first, second = x[: 4 * sr], x[4 * sr:]
    fresh = load_backend("pocketsphinx", {}).transcribe([first])[0]
    reused = load_backend("pocketsphinx", {})
    after_other = reused.transcribe([second, first, first])
    assert fresh.text and fresh.confidence is not None
    assert [t.text for t in after_other[1:]] == [fresh.text] * 2
    assert [t.confidence for t in after_other[1:]] == [fresh.confidence] * 2


# ------------------------------------------------------------------ backends on random weights


def test_whisper_backend_loads_a_checkpoint_file_and_batches(models):
    asr = load_backend("whisper", {"model": str(models["whisper"]), "batch_size": 2, "max_new_tokens": 4})
    xs = [_noise(1.0, 1), _noise(3.0, 2), _noise(0.4, 3)]
    probs = asr.detect_language(xs)
    assert len(probs) == 3 and all(len(p) == 99 and sum(p.values()) == pytest.approx(1, abs=1e-4) for p in probs)
    out = asr.transcribe(xs, language="en")
    assert len(out) == 3 and all(isinstance(t, Transcript) for t in out)
    assert all(t.text and 0 <= t.confidence <= 1 and "<|" not in t.text for t in out)
    auto = asr.transcribe(xs[:1], language=None)  # whisper identifies the language itself
    assert len(auto) == 1 and auto[0].text
    with pytest.raises(ValueError, match="30 s"):
        asr.transcribe([_noise(31.0, 4)], language="en")


def test_hf_whisper_backend_raw_text_languages_and_beams(models):
    asr = load_backend("hf-whisper", {"model": str(models["hf-whisper"]), "batch_size": 2, "max_new_tokens": 4})
    xs = [_noise(1.0, 1), _noise(2.5, 2), _noise(0.5, 3)]
    probs = asr.detect_language(xs)
    assert len(probs) == 3 and all(len(p) > 90 and sum(p.values()) == pytest.approx(1, abs=1e-4) for p in probs)
    for lang in ("en", "zh"):
        out = asr.transcribe(xs, language=lang)
        assert len(out) == 3
        for t in out:
            # The raw sequence keeps the decoder prompt and special tokens (WhisperD's tags live there).
            assert t.raw.startswith(f"<|startoftranscript|><|{lang}|><|transcribe|><|notimestamps|>"), t.raw
            assert "<|" not in t.text and 0 < t.confidence <= 1
    beams = load_backend("hf-whisper", {"model": str(models["hf-whisper"]), "beam_size": 2, "max_new_tokens": 3})
    out = beams.transcribe(xs[:2], language="en")
    assert len(out) == 2 and all(0 < t.confidence <= 1 for t in out)


def test_funasr_backend_batches_by_seconds_and_keeps_order(models):
    asr = load_backend("funasr", {"model": str(models["funasr"]), "batch_size_s": 4.0})
    xs = [_noise(3.0, 1), _noise(0.6, 2), _noise(2.0, 3)]
    together = asr.transcribe(xs)
    alone = [asr.transcribe([x])[0] for x in xs]
    assert [t.text for t in together] == [t.text for t in alone]
    assert all(t.text and set(t.text) <= set(PARAFORMER_CHARS) and 0 < t.confidence <= 1 for t in together)
    # CIF emits tokens in proportion to the audio: the longest item gets the longest text.
    assert len(together[0].text) > len(together[1].text)


def test_funasr_runs_on_kaldi_native_fbank_when_torchaudio_is_broken(models, tmp_path):
    fake = tmp_path / "fake" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise OSError('libtorchaudio.so: undefined symbol (simulated)')\n")
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from pipeline.backends.asr import load_backend
        asr = load_backend("funasr", {{"model": {str(models["funasr"])!r}}})
        import funasr.utils.fbank as fb
        assert sys.modules["torchaudio"] is None and not fb._HAS_TORCHAUDIO and fb._knf is not None
        x = (np.random.default_rng(0).standard_normal(32000) * 0.1).astype(np.float32)
        print("TEXT", asr.transcribe([x])[0].text)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), str(ROOT)]))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout.split("TEXT", 1)[1].strip()
    assert text and set(text) <= set(PARAFORMER_CHARS)


# ------------------------------------------------------------------ the stage with test doubles


class FakeAsr:
    """Test double: language from the pitch (220 Hz tone = zh, else en), text names the backend."""

    max_seconds = 30.0
    can_identify_language = True

    def __init__(self, name):
        self.name = name
        self.calls: list[tuple[str | None, list[float]]] = []

    def detect_language(self, xs):
        out = []
        for x in xs:
            f = np.abs(np.fft.rfft(x)).argmax() * SR / len(x)
            out.append({"zh": 0.95, "en": 0.05} if abs(f - 220) < 20 else {"zh": 0.1, "en": 0.9})
        return out

    def transcribe(self, xs, language=None):
        self.calls.append((language, [len(x) / SR for x in xs]))
        silent = [float(np.abs(x).max()) < 1e-3 for x in xs]
        return [Transcript("" if s else f"{self.name} {language}", None if s else 0.5) for s in silent]


def _tone(seconds, hz):
    t = np.arange(int(seconds * SR)) / SR
    return (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_stage_routes_languages_splits_long_turns_and_flags_bad_rows(tmp_path):
    cfg = AsrConfig(language_id="whisper", backends={"en": "whisper", "zh": "funasr", "default": "whisper"},
                    languages=["en", "zh"], attribution="turns")
    # The models are replaced by doubles; the stage is built with the embedded backend only.
    stage = AsrStage(AsrConfig(), StageContext("asr", tmp_path))
    stage.config = cfg
    en, zh = FakeAsr("whisper"), FakeAsr("funasr")
    stage.models, stage.lid = {"whisper": en, "funasr": zh}, en

    # Recording a: English with one Chinese turn and a 65 s English turn; diarized.
    long = _tone(65.0, 440)
    for dip in (28.0, 55.0):
        long[int((dip - 0.05) * SR): int((dip + 0.05) * SR)] *= 0.01
    a = np.concatenate([long, np.zeros(SR, np.float32), _tone(4.0, 220), np.zeros(SR, np.float32),
                        _tone(0.6, 220), np.zeros(SR, np.float32)])
    sf.write(tmp_path / "a.wav", a, SR)
    row_a = {"recording_id": "a", "audio_path": str(tmp_path / "a.wav"), "duration": len(a) / SR, "status": "ok",
             "speech": [{"start": 0.0, "end": 65.0}, {"start": 66.0, "end": 70.0}, {"start": 71.0, "end": 71.6}],
             "turns": [{"start": 0.0, "end": 65.0, "speaker": "A"}, {"start": 66.0, "end": 70.0, "speaker": "B"},
                       {"start": 71.0, "end": 71.6, "speaker": "B"}]}
    # Recording b: no diarization, and silent: no span gives a word.
    sf.write(tmp_path / "b.wav", np.zeros(5 * SR, np.float32), SR)
    row_b = {"recording_id": "b", "audio_path": str(tmp_path / "b.wav"), "duration": 5.0, "status": "ok",
             "speech": [{"start": 1.0, "end": 2.0}, {"start": 3.0, "end": 4.5}]}
    # Recording c: its cached audio is gone.
    row_c = {"recording_id": "c", "audio_path": str(tmp_path / "gone.wav"), "duration": 3.0, "status": "ok",
             "speech": [{"start": 0.0, "end": 3.0}]}
    out = {r["recording_id"]: r for r in stage.process([row_a, row_b, row_c])}

    ra = out["a"]
    assert ra["status"] == "ok" and ra["language"] == "en" and 0.5 < ra["language_probability"] <= 1
    assert [(u["speaker"], u["language"], u["text"]) for u in ra["utterances"]] == [
        ("A", "en", "whisper en whisper en whisper en"),  # 65 s turn in three <= 30 s pieces
        ("B", "zh", "funasr zh"),  # a confident 4 s Chinese turn goes to the zh backend
        ("B", "en", "whisper en"),  # 0.6 s: too short to trust, takes the recording's language
    ]
    assert [(u["start"], u["end"]) for u in ra["utterances"]] == [(0.0, 65.0), (66.0, 70.0), (71.0, 71.6)]
    # The long turn is cut at its two quiet dips; every piece fits the 30 s window.
    pieces = sorted(d for _, ds in en.calls for d in ds)
    assert pieces == pytest.approx([0.6, 1.0, 1.5, 10.0, 27.0, 28.0], abs=0.05)  # 1.0, 1.5: recording b
    assert [lang for lang, _ in zh.calls] == ["zh"]

    rb = out["b"]
    assert rb["status"] == "rejected" and "no words recognised in 2 turns" in rb["reason"]
    assert out["c"]["status"] == "failed" and "gone.wav" in out["c"]["reason"]

    # A recording identified as a language outside `languages` is rejected before transcription.
    stage.config = cfg.model_copy(update={"languages": ["zh"]})
    calls = len(en.calls)
    rej = stage.process([row_a])[0]
    assert rej["status"] == "rejected" and "language en" in rej["reason"] and rej["utterances"] == []
    assert len(en.calls) == calls

    # A recording whose words the model is unsure of (the doubles say 0.5) is rejected when asked.
    stage.config = cfg.model_copy(update={"min_confidence": 0.6})
    low = stage.process([row_a])[0]
    assert low["status"] == "rejected" and low["reason"].startswith("low_asr_confidence: mean word confidence 0.50")
    assert low["utterances"]  # kept in the manifest: the reason can be checked

    # Words mode with a backend that has no word times: the region's pieces are identified (the
    # last one, 55-71.6 s, is mostly the 440 Hz tone: en), then each turn is transcribed on its own
    # in the language of the piece it overlaps most.
    stage.config = cfg.model_copy(update={"attribution": "words"})
    words = stage.process([row_a])[0]
    assert [(u["speaker"], u["language"], u["text"]) for u in words["utterances"]] == [
        ("A", "en", "whisper en whisper en whisper en"), ("B", "en", "whisper en"), ("B", "en", "whisper en")]

    # Fixed language: no identification, no probability; VAD spans become SPEAKER_00 turns.
    stage.config, stage.lid = AsrConfig(language="zh", backends={"default": "funasr"}, attribution="turns"), None
    fixed = stage.process([dict(row_a, turns=None)])[0]
    assert fixed["language"] == "zh" and fixed["language_probability"] is None
    assert {u["speaker"] for u in fixed["utterances"]} == {NO_DIARIZATION_SPEAKER}
    assert [u["text"] for u in fixed["utterances"]][1:] == ["funasr zh", "funasr zh"]


# ------------------------------------------------------------------ inside the pipeline (Ray, Parquet)


def _write_inputs(src: Path) -> dict[str, synth.Truth]:
    en = synth.VOICES["en"]
    clips = {
        # Voices pocketsphinx handles best among espeak's (see benchmarks/bench_asr.py).
        "dlg_en.wav": synth.synth_dialogue(21, n_turns=4, pause=(0.5, 0.9), voices=[en["male"][2], en["female"][1]]),
        "mono_en.wav": synth.synth_monologue(22, n_sentences=2, voices=[en["female"][2]]),
        "dlg_zh.wav": synth.synth_dialogue(23, n_turns=3, pause=(0.5, 0.9), language="zh"),
    }
    truths = {}
    for name, clip in clips.items():
        synth.write_clip(clip, src / name, src.parent / "truth" / f"{name}.json")
        truths[name] = clip.truth
    return truths


def _run(tmp_path: Path, src: Path, stages: dict):
    cfg = parse_config({"run": {"output": str(tmp_path / "out"), "progress": False, "report": {"enabled": False}},
                        "stages": {"ingest": {}, "vad": {}, **stages}})
    res = run_pipeline(cfg, src)
    recs = {r["recording_id"]: Path(r["source_path"]).name for r in manifests.read_manifest(res.output, "ingest").to_pylist()}
    return res, recs


def _wer(truth: synth.Truth, utterances: list[dict]) -> float:
    return jiwer.wer(_norm(" ".join(t.text for t in truth.turns)), _norm(" ".join(u["text"] for u in utterances)))


def test_every_backend_writes_an_asr_manifest_in_the_pipeline(tmp_path, ray_local, models):
    src = tmp_path / "in"
    truths = _write_inputs(src)
    # Whichever language the random whisper names, route it to Paraformer: LID -> map -> backend.
    lid = load_backend("whisper", {"model": str(models["whisper"])})
    x, _ = sf.read(src / "dlg_en.wav", dtype="float32")
    routed = max(lid.detect_language([x[: 5 * SR]])[0].items(), key=lambda kv: kv[1])[0]
    small = {"num_cpus": 0.3, "batch_size": 3}
    stages = {
        "asr_whisper": {"uses": "asr", "language_id": "whisper", "backends": {"default": "whisper"},
                        "whisper": {"model": str(models["whisper"]), "max_new_tokens": 4}, "resources": small},
        "asr_hf": {"uses": "asr", "language_id": "hf-whisper", "backends": {"default": "hf-whisper"},
                   "hf_whisper": {"model": str(models["hf-whisper"]), "max_new_tokens": 4}, "resources": small},
        "asr_funasr": {"uses": "asr", "language": "zh", "backends": {"default": "funasr"},
                       "funasr": {"model": str(models["funasr"])}, "resources": small},
        "asr_routed": {"uses": "asr", "language_id": "whisper", "backends": {routed: "funasr", "default": "whisper"},
                       "whisper": {"model": str(models["whisper"]), "max_new_tokens": 4},
                       "funasr": {"model": str(models["funasr"])}, "resources": small},
        # Last: the real English model may find no word in Chinese speech and reject that file.
        "asr": {"resources": small},
    }
    res, names = _run(tmp_path, src, stages)
    vad = {r["recording_id"]: r for r in manifests.read_manifest(res.output, "vad").to_pylist()}
    whisper_langs = set(load_backend("whisper", {"model": str(models["whisper"])}).tokenizer.all_language_codes)
    for stage in stages:
        rows = {r["recording_id"]: r for r in manifests.read_manifest(res.output, stage, "asr").to_pylist()}
        expect = set(names) if stage != "asr" else {r for r, n in names.items() if "en" in n}
        assert expect <= set(rows), (stage, rows.keys())
        for rid in expect:
            row, name = rows[rid], names[rid]
            assert row["status"] == "ok", (stage, name, row["reason"])
            utts = row["utterances"]
            spans = [(s["start"], s["end"]) for s in vad[rid]["speech"]]
            if stage == "asr":
                # Words mode (faster-whisper): no diarization, so every word is SPEAKER_00's and an
                # utterance is the words of one VAD span (DTW times may spill 0.5 s into a pause).
                assert len(utts) <= len(spans) and all(
                    any(a - 0.5 <= u["start"] <= u["end"] <= b + 0.5 for a, b in spans) for u in utts), stage
            else:
                # Backends without word times are transcribed per turn, even in words mode: each
                # VAD span is one SPEAKER_00 turn with its own utterance.
                assert [(u["start"], u["end"]) for u in utts] == spans, stage
            assert all(u["speaker"] == NO_DIARIZATION_SPEAKER and u["text"] for u in utts)
            assert all(u["confidence"] is None or 0 <= u["confidence"] <= 1 for u in utts)
            if stage in ("asr_whisper", "asr_hf", "asr_routed"):
                assert row["language"] in whisper_langs and 0 < row["language_probability"] <= 1
                assert all(u["language"] in whisper_langs for u in utts)
            else:
                assert row["language_probability"] is None
                assert row["language"] == ("zh" if stage == "asr_funasr" else "en")
                assert all(u["language"] == row["language"] for u in utts)
            if stage in ("asr_funasr", "asr_routed"):
                assert row["language"] == ("zh" if stage == "asr_funasr" else routed)
                # Chinese text is joined without spaces, from the Paraformer vocabulary only.
                assert all(set(u["text"]) <= set(PARAFORMER_CHARS) for u in utts), stage
    # The real tiny.en weights: most words of clean espeak English (pooled over the English files).
    rows = {r["recording_id"]: r for r in manifests.read_manifest(res.output, "asr").to_pylist()}
    english = [(truths[n], rows[r]["utterances"]) for r, n in names.items() if "en" in n]
    refs = [_norm(" ".join(t.text for t in truth.turns)) for truth, _ in english]
    hyps = [_norm(" ".join(u["text"] for u in utts)) for _, utts in english]
    assert jiwer.wer(refs, hyps) < WORDS_WER, hyps


def test_words_and_pocketsphinx_turns_after_real_diarization(tmp_path, ray_local):
    src = tmp_path / "in"
    en = synth.VOICES["en"]
    clip = synth.synth_dialogue(21, n_turns=4, pause=(0.6, 1.0), voices=[en["male"][2], en["female"][1]])
    synth.write_clip(clip, src / "dlg.wav", tmp_path / "truth.json")
    res, names = _run(tmp_path, src, {"diarization": {"backend": "embedded"}, "asr": {},
                                      "asr_ps": {"uses": "asr", "backends": {"default": "pocketsphinx"}}})
    diar = manifests.read_manifest(res.output, "diarization").to_pylist()[0]
    turns = sorted((t["start"], t["end"], t["speaker"]) for t in diar["turns"])
    words = manifests.read_manifest(res.output, "asr").to_pylist()[0]
    assert words["status"] == "ok", words["reason"]
    # Words mode: utterances carry the diarization speakers, both of them, in time order.
    utts = words["utterances"]
    assert {u["speaker"] for u in utts} == {s for _, _, s in turns}
    assert len({u["speaker"] for u in utts}) == 2 and len(utts) >= 4
    assert [u["start"] for u in utts] == sorted(u["start"] for u in utts)
    assert _wer(clip.truth, utts) < WORDS_WER, utts
    # pocketsphinx has no word times: one utterance per diarization turn with words.
    row = manifests.read_manifest(res.output, "asr_ps", "asr").to_pylist()[0]
    assert row["status"] == "ok", row["reason"]
    utts = row["utterances"]
    assert {(u["start"], u["end"], u["speaker"]) for u in utts} <= {(round(a, 3), round(b, 3), s) for a, b, s in turns}
    assert len({u["speaker"] for u in utts}) == 2 and len(utts) >= 3
    assert _wer(clip.truth, utts) < 0.8, utts
