import json
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from model.eval.metrics import (
    UTMOS,
    MetricUnavailable,
    RTFMeter,
    corpus_cpwer,
    corpus_wer,
    cosine,
    cpsim,
    cpsim_from_embeddings,
    cpwer_counts,
    normalize_text,
    rtf,
    split_dialogue,
    wer_counts,
)

SR = 16000
MALE, FEMALE = "en-us+m3", "en-us+f3"
TURNS = [
    (MALE, "Hello, how are you doing today?"),
    (FEMALE, "I am fine, thanks. And you?"),
    (MALE, "Pretty good. The weather is nice."),
    (FEMALE, "Yes, it is a lovely day outside."),
]
PROMPT_TEXT = "This is a short prompt sentence spoken by one voice for testing."



# --------------------------------------------------------------------------- text metrics


def test_normalize_text():
    assert normalize_text("[S1] Hello, World! (laughs) <noise> It's  OK. [S2] Yes…", "en") == "hello world it's ok yes"
    assert normalize_text("Don’t “quote” me—please.", "en") == "dont quote meplease"
    assert normalize_text("[S1]你好，世界！[S2] 好的。", "zh") == "你 好 世 界 好 的"
    assert normalize_text("  [laugh]  ", "en") == ""
    with pytest.raises(ValueError, match="language"):
        normalize_text("x", "fr")


def test_wer_hand_computed():
    c = wer_counts("The cat sat on the mat.", "the cat sit on mat", "en")
    assert (c.substitutions, c.deletions, c.insertions, c.ref_words) == (1, 1, 0, 6)
    assert c.wer == pytest.approx(100 * 2 / 6)
    perfect = wer_counts("[S1] Good morning. [S2] Hi!", "good morning hi", "en")
    assert perfect.errors == 0 and perfect.wer == 0.0
    ins = wer_counts("", "extra words", "en")
    assert ins.insertions == 2 and ins.ref_words == 0


def test_corpus_wer_is_pooled_not_averaged():
    refs = ["one two", "a b c d e f g h"]
    hyps = ["one", "a b c d e f g h"]
    total = corpus_wer(refs, hyps)
    assert total.ref_words == 10 and total.errors == 1
    assert total.wer == pytest.approx(10.0)  # the mean of per-utterance WERs would be 25%
    with pytest.raises(ValueError, match="2 references but 1"):
        corpus_wer(refs, hyps[:1])


def test_split_dialogue_even_and_odd_pieces():
    assert split_dialogue("[S1] a b [S2] c [S1] d [S2] e f") == (" c e f", "a b d")
    assert split_dialogue("no tags") == ("no tags", "")


def test_cpwer_hand_computed():
    ref = "[S1] Yes please. [S2] No thanks. [S1] Okay then."
    # perfect transcript, and the same with other tag names at the same positions
    assert cpwer_counts(ref, ref).errors == 0
    assert cpwer_counts(ref, "[S2] yes please [S1] no thanks [S2] okay then").errors == 0
    # the third turn is given to the second speaker: all words right, speakers wrong
    hyp = "[S1] yes please [S2] no thanks okay then"
    assert wer_counts(ref, hyp).errors == 0
    cp = cpwer_counts(ref, hyp)
    # ref streams "no thanks" + "yes please okay then"; best hyp order scores 4 errors of 6 words
    assert cp.ref_words == 6 and cp.errors == 4
    assert cp.wer == pytest.approx(100 * 4 / 6)
    # a word error on top: one substitution more
    cp2 = cpwer_counts(ref, "[S1] yes please [S2] no thanks [S1] okay them")
    assert (cp2.substitutions, cp2.deletions, cp2.insertions, cp2.ref_words) == (1, 0, 0, 6)
    corpus = corpus_cpwer([ref, ref], [ref, hyp])
    assert corpus.errors == 4 and corpus.ref_words == 12
    assert corpus.wer > corpus_wer([ref, ref], [ref, hyp]).wer == 0.0


def test_cpsim_from_embeddings_takes_best_assignment():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert cpsim_from_embeddings([a, b], [a, b]) == pytest.approx(1.0)
    assert cpsim_from_embeddings([b, a], [a, b]) == pytest.approx(1.0)
    assert cpsim_from_embeddings([a, a], [a, b]) == pytest.approx(0.5)
    assert cosine(a, -a) == pytest.approx(-1.0)


# --------------------------------------------------------------------------- cpSIM on espeak voices


@pytest.fixture(scope="module")
def voices():
    from audio_fixtures import speech

    gap = np.zeros(SR // 4, dtype=np.float32)
    turns = [speech(text, voice, SR) for voice, text in TURNS]
    dialogue = np.concatenate([x for t in turns for x in (t, gap)][:-1])
    bounds = np.cumsum([len(x) for t in turns for x in (t, gap)])[:-1:2] / SR  # end of each turn
    prompts = {v: speech(PROMPT_TEXT, v, SR) for v in (MALE, FEMALE, "en-us+m7", "en-us+f4")}
    return {"dialogue": dialogue, "turn_ends": bounds, "turns": turns, "prompts": prompts}


@pytest.fixture(scope="module")
def resemblyzer_models():
    from model.eval.speaker import ResemblyzerEmbedder, SimpleDiarizer

    embed = ResemblyzerEmbedder()
    return embed, SimpleDiarizer(encoder=embed.encoder)


def test_simple_diarizer_recovers_turns(voices, resemblyzer_models):
    _, diarize = resemblyzer_models
    segments = diarize(voices["dialogue"])
    assert {label for _, _, label in segments} == {"SPEAKER_00", "SPEAKER_01"}
    starts = np.concatenate([[0.0], voices["turn_ends"][:-1] + 0.25])
    majority = []
    for start, end in zip(starts, voices["turn_ends"]):
        speech_per_label = {}
        for s, e, label in segments:
            overlap = max(0.0, min(e, end) - max(s, start))
            speech_per_label[label] = speech_per_label.get(label, 0.0) + overlap
        majority.append(max(speech_per_label, key=speech_per_label.get))
    # alternating speakers: turns 1 and 3 share a label, 2 and 4 the other
    assert majority[0] == majority[2] != majority[1] == majority[3]


def test_cpsim_prefers_the_right_prompts(voices, resemblyzer_models):
    embed, diarize = resemblyzer_models
    p = voices["prompts"]
    gen = voices["dialogue"]
    right = cpsim(gen, [p[MALE], p[FEMALE]], embed, diarize)
    swapped = cpsim(gen, [p[FEMALE], p[MALE]], embed, diarize)
    other = cpsim(gen, [p["en-us+m7"], p["en-us+f4"]], embed, diarize)
    one_voice = cpsim(gen, [p[MALE], p[MALE]], embed, diarize)
    assert swapped == pytest.approx(right)  # the speaker assignment is maximised over
    assert right > other + 0.03, (right, other)
    assert right > one_voice + 0.05, (right, one_voice)


def test_cpsim_falls_back_to_whole_audio_without_two_speakers(voices, resemblyzer_models):
    embed, _ = resemblyzer_models
    p = voices["prompts"]
    gen = voices["dialogue"]
    score = cpsim(gen, [p[MALE], p[FEMALE]], embed, lambda w: [(0.0, len(w) / SR, "SPEAKER_00")])
    whole = embed(gen)
    expected = (cosine(whole, embed(p[MALE])) + cosine(whole, embed(p[FEMALE]))) / 2
    assert score == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- WavLM-ECAPA embedder


@pytest.fixture(scope="module")
def tiny_wavlm(tmp_path_factory):
    from transformers import WavLMConfig, WavLMModel

    from model.eval.speaker import EcapaTdnnHead

    d = tmp_path_factory.mktemp("wavlm")
    cfg = WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, num_buckets=32, max_bucket_distance=64,
    )
    torch.manual_seed(0)
    WavLMModel(cfg).save_pretrained(d / "wavlm")
    head = EcapaTdnnHead(num_layers=3, feat_dim=32, channels=16, emb_dim=8, se_bottleneck=4, attention_channels=4)
    with torch.no_grad():
        head.feature_weight.copy_(torch.tensor([0.1, -0.3, 0.5]))
    state = {k: v for k, v in head.state_dict().items()}
    state["feature_extract.model.encoder.layers.0.fc1.weight"] = torch.zeros(2, 2)  # s3prl keys are ignored
    torch.save({"model": state}, d / "ecapa.pth")
    return d, head.eval()


def test_wavlm_ecapa_loads_head_and_embeds(tiny_wavlm):
    from transformers import WavLMModel

    from model.eval.speaker import load_embedder

    d, head = tiny_wavlm
    embed = load_embedder("wavlm-ecapa", str(d / "ecapa.pth"), str(d / "wavlm"))
    wave = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    emb = embed(wave)
    assert emb.shape == (8,)
    wavlm = WavLMModel.from_pretrained(d / "wavlm").eval()
    x = torch.from_numpy(wave).unsqueeze(0)
    x = (x - x.mean()) / torch.sqrt(x.var() + 1e-7)
    with torch.no_grad():
        expected = head(torch.stack(wavlm(x, output_hidden_states=True).hidden_states))[0].numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)


def test_wavlm_ecapa_errors(tiny_wavlm, tmp_path):
    from model.eval.speaker import WavLMEcapaEmbedder, load_embedder

    d, head = tiny_wavlm
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        WavLMEcapaEmbedder(tmp_path / "missing.pth", d / "wavlm")
    bad = {k: v for k, v in head.state_dict().items() if k != "linear.bias"}
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        WavLMEcapaEmbedder(tmp_path / "bad.pth", d / "wavlm")
    with pytest.raises(ValueError, match="checkpoint"):
        load_embedder("wavlm-ecapa")


# --------------------------------------------------------------------------- UTMOS, RTF


class _ScoreWithRate(torch.nn.Module):
    def forward(self, wav: torch.Tensor, sr: int) -> torch.Tensor:
        return 1.0 + 4.0 * torch.sigmoid(wav.pow(2).mean().sqrt() * 10.0) + 0.0 * sr


class _ScoreOnly(torch.nn.Module):
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return wav.abs().max().reshape(1, 1)


def test_utmos_torchscript_loader(tmp_path):
    wave = np.sin(np.arange(SR) / 10.0).astype(np.float32) * 0.2
    torch.jit.script(_ScoreWithRate()).save(str(tmp_path / "utmos.pt"))
    score = UTMOS(tmp_path / "utmos.pt").score(wave)
    rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))
    assert score == pytest.approx(1.0 + 4.0 / (1.0 + np.exp(-rms * 10.0)), rel=1e-5)
    torch.jit.script(_ScoreOnly()).save(str(tmp_path / "plain.pt"))
    assert UTMOS(tmp_path / "plain.pt").score(wave) == pytest.approx(0.2, rel=1e-3)
    # a 24 kHz input is resampled to 16 kHz first: a 200 Hz sine keeps its peak
    sine24 = (0.5 * np.sin(2 * np.pi * 200 * np.arange(24000) / 24000)).astype(np.float32)
    assert UTMOS(tmp_path / "plain.pt").score(sine24, 24000) == pytest.approx(0.5, rel=0.01)


def test_utmos_unavailable(tmp_path):
    with pytest.raises(MetricUnavailable, match="UTMOS is unavailable"):
        UTMOS(None)
    with pytest.raises(MetricUnavailable, match="not found"):
        UTMOS(tmp_path / "none.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    with pytest.raises(MetricUnavailable, match="TorchScript"):
        UTMOS(tmp_path / "state_dict.pt")


def test_rtf():
    assert rtf(2.0, 4.0) == 0.5
    with pytest.raises(ValueError):
        rtf(1.0, 0.0)
    meter = RTFMeter()
    with meter.measure() as m:
        time.sleep(0.05)
        m.audio_seconds = 1.0
    meter.add(0.15, 1.0)
    assert meter.audio_seconds == 2.0
    assert 0.1 <= meter.value < 0.5
    with pytest.raises(ValueError, match="audio_seconds"):
        with meter.measure():
            pass


# --------------------------------------------------------------------------- ASR and the CLI


def _tiny_whisper(path):
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                "<|notimestamps|>"]
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for s in specials:
        vocab[s] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    eot = ids["<|endoftext|>"]
    cfg = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_target_positions=32, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"], begin_suppress_tokens=None, suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        lang_to_id={"<|en|>": ids["<|en|>"]}, is_multilingual=True, max_length=12,
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
    )
    model.save_pretrained(path)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(path)


def test_whisper_asr_local_directory(tmp_path):
    from model.eval.asr import _WHISPER_MARKER, BackendASR, load_asr

    _tiny_whisper(tmp_path / "whisper")
    asr = load_asr(str(tmp_path / "whisper"), device="cpu")
    assert isinstance(asr, BackendASR)
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(SR).astype(np.float32) * 0.1, rng.standard_normal(SR * 2).astype(np.float32) * 0.1]
    out = asr(waves)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    # random weights still decode some tokens after the decoder prompt (sot, language, task);
    # this tiny random model only emits Whisper markers, which the transcript leaves out
    raw = asr.backend.transcribe(waves, language="en")
    assert all(t.raw.count("<|") > 4 for t in raw)  # 4 are the prompt
    assert out == [_WHISPER_MARKER.sub("", t.raw).strip() for t in raw]
    with pytest.raises(RuntimeError, match="pocketsphinx"):
        load_asr(str(tmp_path / "no-such-model"))


def test_pocketsphinx_asr_hears_speech(voices):
    from model.eval.asr import load_asr

    asr = load_asr("pocketsphinx")
    hyp = asr([voices["turns"][0]])[0]
    # weak model: at least one word of "hello how are you doing today" right
    assert set(normalize_text(hyp, "en").split()) & {"hello", "how", "are", "you", "doing", "today"}
    with pytest.raises(ValueError, match="English"):
        load_asr("pocketsphinx", language="zh")


def _write_test_list(tmp_path, voices):
    p = voices["prompts"]
    files = {}
    for name, wave in [("m3", p[MALE]), ("f3", p[FEMALE]), ("m7", p["en-us+m7"]), ("f4", p["en-us+f4"])]:
        files[name] = tmp_path / f"prompt_{name}.wav"
        sf.write(files[name], wave, SR)
    merged = tmp_path / "prompt_merged.wav"
    sf.write(merged, np.concatenate([p[MALE], np.zeros(SR // 4, np.float32), p[FEMALE]]), SR)
    gen = tmp_path / "gen"
    gen.mkdir()
    text = " ".join(f"[S{1 + i % 2}] {t}" for i, (_, t) in enumerate(TURNS))
    for name in ("right", "other", "merged"):
        sf.write(gen / f"{name}.wav", voices["dialogue"], SR)
    test_list = tmp_path / "test.tsv"
    test_list.write_text(
        f"right\tp1\tp2\t{files['m3']}\t{files['f3']}\t{text}\n"
        f"other\tp1\tp2\tprompt_m7.wav\tprompt_f4.wav\t{text}\n"  # relative to the test list
        f"merged\t[S1] p1 [S2] p2\t{merged}\t{text}\n",
        encoding="utf-8",
    )
    return test_list, gen, files


def test_cli_cpsim(tmp_path, voices):
    from model.eval.__main__ import main

    test_list, gen, _ = _write_test_list(tmp_path, voices)
    decode = tmp_path / "decode.jsonl"
    result = main([
        "--test-list", str(test_list), "--gen-dir", str(gen), "--metrics", "cpsim",
        "--decode-path", str(decode), "--output", str(tmp_path / "summary.json"),
    ])
    rows = {r["name"]: r for r in map(json.loads, decode.read_text().splitlines())}
    assert set(rows) == {"right", "other", "merged"}
    assert rows["right"]["cpsim"] > rows["other"]["cpsim"] + 0.03
    assert rows["merged"]["cpsim"] > rows["other"]["cpsim"]  # the merged prompt is diarized too
    assert result["cpsim"] == pytest.approx(np.mean([r["cpsim"] for r in rows.values()]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_utterances"] == 3 and "wer" not in summary

    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        main(["--test-list", str(bad), "--gen-dir", str(gen), "--metrics", "cpsim"])
    with pytest.raises(FileNotFoundError, match="missing"):
        main(["--test-list", str(test_list), "--gen-dir", str(tmp_path / "missing"), "--metrics", "cpsim"])


def test_cli_wer_cpwer_with_pocketsphinx(tmp_path, voices):
    from model.eval.__main__ import main

    # two short turns keep the (slow) offline ASR cheap
    wave = np.concatenate([voices["turns"][0], np.zeros(SR // 4, np.float32), voices["turns"][1]])
    (tmp_path / "gen").mkdir()
    sf.write(tmp_path / "gen" / "short.wav", wave, SR)
    sf.write(tmp_path / "p.wav", voices["prompts"][MALE], SR)
    text = f"[S1] {TURNS[0][1]} [S2] {TURNS[1][1]}"
    (tmp_path / "test.tsv").write_text(f"short\tp1\tp2\tp.wav\tp.wav\t{text}\n", encoding="utf-8")
    decode = tmp_path / "decode.jsonl"
    result = main([
        "--test-list", str(tmp_path / "test.tsv"), "--gen-dir", str(tmp_path / "gen"),
        "--metrics", "wer,cpwer", "--asr", "pocketsphinx", "--decode-path", str(decode),
    ])
    (row,) = map(json.loads, decode.read_text().splitlines())
    assert row["reference"] == text and isinstance(row["hypothesis"], str)
    assert result["ref_words"] == 12
    assert result["wer"] == pytest.approx(wer_counts(text, row["hypothesis"]).wer)
    assert result["cpwer"] == pytest.approx(cpwer_counts(text, row["hypothesis"]).wer)
    assert result["num_short"] == 1 and result["wer_short"] == pytest.approx(result["wer"])
    assert result["wer"] < 100.0  # the offline model gets some words of clean synthetic speech
    with pytest.raises(ValueError, match="English"):
        main(["--test-list", str(tmp_path / "test.tsv"), "--gen-dir", str(tmp_path / "gen"),
              "--metrics", "cpwer", "--lang", "zh", "--asr", "pocketsphinx"])


def test_evaluate_with_a_custom_asr(tmp_path, voices):
    from model.eval.__main__ import evaluate, read_test_list

    test_list, gen, _ = _write_test_list(tmp_path, voices)
    items = read_test_list(test_list)
    assert [len(it.prompt_wavs) for it in items] == [2, 2, 1]
    perfect = [it.text for it in items]
    swapped = [it.text.replace("[S1]", "[X]").replace("[S2]", "[S1]").replace("[X]", "[S2]") for it in items]
    merged_turns = [" ".join(it.text.split("[S2]", 1)) for it in items]  # turn 2 lost its tag
    assert evaluate(items, gen, ["wer", "cpwer"], asr=lambda waves: perfect)["cpwer"] == 0.0
    assert evaluate(items, gen, ["wer", "cpwer"], asr=lambda waves: swapped)["cpwer"] == 0.0  # positions count
    res = evaluate(items, gen, ["wer", "cpwer"], asr=lambda waves: merged_turns)
    assert res["wer"] == 0.0 and res["cpwer"] > 0.0
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(items, gen, ["mos"])
