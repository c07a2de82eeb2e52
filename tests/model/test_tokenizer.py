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


# (text, what the reference's EnglishTextNormalizer makes of it). Worked out by hand from its
# rules (fact sheet 2.2; inflect spells the numbers), not produced by this code.
NORMALIZER_TABLE = [
    # abbreviations: whole words, any case, the period stays; "btw" is in the list, "vs" is not
    ("Mr. Smith met Mrs. Jones.", "mister. Smith met misess. Jones."),
    ("Dr Who and Drs. Lee", "doctor Who and doctors. Lee"),
    ("St. Louis, Co. Ltd.", "saint. Louis, company. limited."),
    ("see Capt. Hook, Sgt. Pepper etc.", "see captain. Hook, sergeant. Pepper et cetera."),
    ("Btw, Lt. Dan is Jr.", "by the way, lieutenant. Dan is junior."),
    ("Esq. Col. Hon. Rev. Maj. Gen. Ft.", "esquire. colonel. honorable. reverend. major. general. fort."),
    ("cats vs dogs", "cats vs dogs"),
    ("MR. X", "mister. X"),
    ("mistral st", "mistral saint"),
    # every spelled number gets a space on each side, whatever touches it
    ("at 10:30 today", "at  ten : thirty  today"),
    ("I have 3 cats", "I have  three  cats"),
    ("2k run", " two k run"),
    ("4x4", " four x four "),
    # leading zeros vanish: the digit run is one number
    ("agent 007", "agent  seven "),
    ("room 0", "room  zero "),
    # digit-group commas go; inflect's comma after thousand/million stays; no "and"
    ("1,234 people", " twelve thirty-four  people"),
    ("12,345 votes", " twelve thousand, three hundred forty-five  votes"),
    ("1,000,000 stars", " one million  stars"),
    ("1234567 ants", " one million, two hundred thirty-four thousand, five hundred sixty-seven  ants"),
    ("101 dalmatians", " one hundred one  dalmatians"),
    # decimals: both sides read as whole numbers
    ("pi is 3.14", "pi is  three  point  fourteen "),
    ("0.5 percent", " zero  point  five  percent"),
    # fractions: halves and quarters named, other denominators a singular ordinal
    ("1/2 cup", " one half  cup"),
    ("2/3 of it", " two third  of it"),
    ("3/4 of it", " three quarters  of it"),
    ("1/3 left", " one third  left"),
    ("5/8 inch", " five eighth  inch"),
    # currency: dollars and pounds only (no euro rule)
    ("$5.50 please", "  five  dollars,  fifty  cents  please"),
    ("$1 only", "  one  dollar  only"),
    ("$0.99 each", "  ninety-nine  cents  each"),
    ("$2.01", "  two  dollars,  one  cent "),
    ("$1,250", "  twelve fifty  dollars "),
    ("£10 fee", " ten  pounds fee"),
    ("€20 fee", "€ twenty  fee"),
    # percent, ordinals
    ("50% off", " fifty  percent  off"),
    ("3.5% rate", " three  point  five  percent  rate"),
    ("the 21st time", "the  twenty-first  time"),
    ("the 2nd and 3rd", "the  second  and  third "),
    # 1001..2999 read as years
    ("1984 was", " nineteen eighty-four  was"),
    ("in 2005", "in  two thousand five "),
    ("in 2000", "in  two thousand "),
    ("1900 years", " nineteen hundred  years"),
    ("in 2010", "in  twenty ten "),
    ("3000 miles", " three thousand  miles"),
    ("1000 miles", " one thousand  miles"),
]


def test_english_normalizer_table():
    norm = EnglishNormalizer()
    got = [(text, norm.normalize(text)) for text, _ in NORMALIZER_TABLE]
    assert got == NORMALIZER_TABLE


def test_english_tokens_are_the_phonemes_of_the_normalised_text(dialog):
    from piper_phonemize import phonemize_espeak

    # A text without ASCII letters is no English segment: the reference drops it ("$2.01").
    rows = [(t, e) for t, e in NORMALIZER_TABLE if any(c.isascii() and c.isalpha() for c in t)]
    assert len(rows) >= 30
    tokens = dialog.texts_to_tokens([t for t, _ in rows])
    for (text, expected), toks in zip(rows, tokens):
        assert toks == [p for s in phonemize_espeak(expected, "en-us") for p in s], text
    assert dialog.texts_to_tokens(["$2.01"]) == [[]]
    # digits and their spelling give the same tokens; "vs" is not expanded
    assert dialog.texts_to_tokens(["I have 3 cats"]) == dialog.texts_to_tokens(["I have  three  cats"])
    assert dialog.texts_to_tokens(["cats vs dogs"]) != dialog.texts_to_tokens(["cats versus dogs"])


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
