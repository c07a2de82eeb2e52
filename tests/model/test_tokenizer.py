import pytest

from model.tokenizer import (
    DialogTokenizer,
    EmiliaTokenizer,
    EnglishNormalizer,
    EspeakTokenizer,
    SimpleTokenizer,
    build_char_token_table,
    build_espeak_token_table,
    get_tokenizer,
    map_punctuations,
    number_words,
    ordinal_words,
    read_tokens,
    write_tokens,
)

EXTRA = ["[S1]", "[S2]", "[laugh]"]


@pytest.fixture(scope="module")
def dialog_tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokens.txt"
    write_tokens(path, build_espeak_token_table(EXTRA))
    return path


@pytest.fixture(scope="module")
def dialog(dialog_tokens):
    return DialogTokenizer(dialog_tokens)


def test_token_file_round_trip_keeps_space_token(tmp_path):
    table = build_espeak_token_table(EXTRA)
    assert table["_"] == 0 and table[" "] == 3  # piper's espeak map: _ ^ $ space ...
    assert list(table)[-3:] == EXTRA
    assert "zh0" in table and "iang5" in table and "ang1" in table
    path = tmp_path / "tokens.txt"
    write_tokens(path, table)
    assert read_tokens(path) == table
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(table) and lines[3] == " \t3"


@pytest.mark.parametrize(
    "content, message",
    [
        ("_\t0\na\t2\n", "0..1"),
        ("_\t0\na\t1\nb\t1\n", "used twice"),
        ("_\t0\na\tx\n", "not an integer"),
        ("_\t0\na\t1\na\t2\n", "duplicate token 'a'"),
        ("_\t0\nnotab\n", "expected 'token<TAB>id'"),
        ("", "empty"),
    ],
)
def test_token_file_validation(tmp_path, content, message):
    path = tmp_path / "bad_tokens.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="bad_tokens.txt") as err:
        read_tokens(path)
    assert message in str(err.value)


def test_missing_file_and_pad_and_speaker_tokens(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_tokens(tmp_path / "nope.txt")
    no_pad = tmp_path / "nopad.txt"
    write_tokens(no_pad, {"a": 0, "b": 1})
    with pytest.raises(ValueError, match="pad token"):
        SimpleTokenizer(no_pad)
    plain = tmp_path / "plain.txt"
    write_tokens(plain, build_espeak_token_table())
    assert EmiliaTokenizer(plain).vocab_size == len(build_espeak_token_table())
    with pytest.raises(ValueError, match=r"\[S1\]"):
        DialogTokenizer(plain)


def test_dialog_tokenizer_mixed_text(dialog, dialog_tokens):
    table = read_tokens(dialog_tokens)
    assert dialog.spk_a_id == table["[S1]"] and dialog.spk_b_id == table["[S2]"]
    assert dialog.pad_id == 0 and dialog.vocab_size == len(table)
    tokens = dialog.texts_to_tokens(["[S1] Hello world. [S2] 你好。"])[0]
    assert tokens[0] == "[S1]"
    assert tokens.count("[S2]") == 1
    s2 = tokens.index("[S2]")
    english, chinese = tokens[1:s2], tokens[s2 + 1 :]
    assert english[:5] == ["h", "ə", "l", "ˈ", "o"]  # espeak en-us "hello"
    assert english[-1] == "."
    assert chinese == ["n0", "i2", "h0", "ao3", "."]  # tone sandhi: ni3 hao3 -> ni2 hao3
    ids = dialog.texts_to_token_ids(["[S1] Hello world. [S2] 你好。"])[0]
    assert ids[0] == dialog.spk_a_id and dialog.spk_b_id in ids
    assert len(ids) == len(tokens)  # every token is in this vocabulary


def test_dialog_whitespace_rule_versus_emilia(dialog_tokens):
    text = "[S1] 你好 [S2] 好的"
    # Chinese segments keep spaces as raw tokens, so the rule shows: dialog drops them around tags
    assert DialogTokenizer(dialog_tokens).texts_to_tokens([text])[0] == [
        "[S1]", "n0", "i2", "h0", "ao3", "[S2]", "h0", "ao3", "d0", "e5"]
    assert EmiliaTokenizer(dialog_tokens).texts_to_tokens([text])[0] == [
        "[S1]", " ", "n0", "i2", "h0", "ao3", " ", "[S2]", " ", "h0", "ao3", "d0", "e5"]
    assert DialogTokenizer(dialog_tokens).preprocess_text("[S1] Hi there \n[S2]  yes") == "[S1]Hi there[S2]yes"


def test_numbers_are_normalised(dialog):
    with_digit = dialog.texts_to_tokens(["I have 3 cats"])[0]
    spelled = dialog.texts_to_tokens(["I have three cats"])[0]
    assert with_digit == spelled
    assert "θ" in with_digit
    norm = EnglishNormalizer()
    assert norm.normalize("I have 3 cats") == "I have three cats"
    assert norm.normalize("$3.50") == "three dollars, fifty cents"
    assert norm.normalize("the 21st time") == "the twenty-first time"
    assert norm.normalize("Dr. Smith paid 1,000 in 1984") == "doctor Smith paid one thousand in nineteen eighty-four"
    assert norm.normalize("50% of 1/2") == "fifty percent of one half"
    assert number_words(1234) == "one thousand two hundred thirty-four"
    assert number_words(2_000_017) == "two million seventeen"
    assert ordinal_words(112) == "one hundred twelfth" and ordinal_words(40) == "fortieth"


def test_tags_pinyin_and_oov(dialog):
    tokens = dialog.texts_to_tokens(["[S1]我[laugh]好[unknowntag]<zhong4>"])[0]
    assert tokens == ["[S1]", "w0", "o3", "[laugh]", "h0", "ao3", "[unknowntag]", "zh0", "ong4"]
    ids = dialog.texts_to_token_ids(["[S1]我[laugh]好[unknowntag]<zhong4>"])[0]
    assert len(ids) == len(tokens) - 1  # [unknowntag] is not in tokens.txt: dropped silently
    assert dialog.token2id["[laugh]"] in ids


def test_punctuation_map_and_segments():
    assert map_punctuations("你好，世界！真的？‘a’“b”...") == "你好,世界!真的?'a'\"b\"…"
    segs = EmiliaTokenizer.get_segments("Hello 你好 OK<ni3>[tag]")
    assert segs == [("Hello ", "en"), ("你好 ", "zh"), ("OK", "en"), ("<ni3>", "pinyin"), ("[tag]", "tag")]


def test_simple_and_espeak_tokenizers(tmp_path):
    texts = ["abca", "ba!"]
    table = build_char_token_table(texts)
    assert table == {"_": 0, "a": 1, "b": 2, "!": 3, "c": 4}
    path = tmp_path / "chars.txt"
    write_tokens(path, table)
    simple = get_tokenizer("simple", path)
    assert isinstance(simple, SimpleTokenizer)
    assert simple.texts_to_token_ids(["abz"]) == [[1, 2]]  # z is OOV
    espeak_path = tmp_path / "espeak.txt"
    write_tokens(espeak_path, build_espeak_token_table())
    esp = get_tokenizer("espeak", espeak_path)
    assert isinstance(esp, EspeakTokenizer)
    assert esp.texts_to_tokens(["cat"])[0] == ["k", "ˈ", "æ", "t"]
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("bpe", path)
