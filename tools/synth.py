"""Synthetic speech with known truth: dialogues, monologues, meetings, silence.

Every pipeline stage is tested and benchmarked on audio made here (VAD boundaries, diarization
DER, ASR WER, dialogue classification, 30 s splitting), and the bundled example in `examples/`
is built by `python -m tools.synth example`. Voices come from espeak-ng, which is robotic
but deterministic, offline and clearly different between its male and female variants.

Truth (`Truth.to_dict()`, one JSON per audio file)::

    {"sample_rate": 16000, "duration": 41.2, "kind": "dialogue", "language": "en", "seed": 3,
     "speakers": {"S1": {"voice": "en-us+m3", "pitch": 40, "speed": 160, "gender": "male"}, ...},
     "turns": [{"speaker": "S1", "start": 0.61, "end": 3.12, "text": "...",
                "is_backchannel": false, "overlap": false}, ...],
     "transcript": "[S1] ... [S2] ...", "conditions": {"noise": {...}, "music": {...}},
     "file": {"name": "x.mp3", "format": "mp3", "channels": 1, "subtype": null}}  # by write_clip

Turn times are the trimmed extent of the turn's speech (espeak's own leading/trailing silence
removed, see `_trim`), exact to about 5 ms. `overlap` is true when the turn shares time with a
turn of another speaker. The transcript follows the paper's interleaving: utterances sorted by
start, adjacent utterances of the same speaker merged, back-channels kept as utterances.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from pipeline import clitools

ESPEAK_SR = 22050
SPEECH_DBFS = -23.0  # per-utterance RMS; leaves headroom for overlaps plus noise

# --------------------------------------------------------------------------------------------
# Text: templates + word lists. Every `{slot}` is drawn independently, so "{food} and {food}"
# gives two foods.

EN_SLOTS = {
    "name": "Anna David Maria Peter Lucy James Sarah Thomas Emma Daniel Kate Robert Helen Michael "
            "Laura Chris Oliver Grace Henry Alice Simon Rachel George Nina".split(),
    "place": ["the park", "the library", "the museum", "the beach", "the market", "the station",
              "the office", "the garden", "the river", "the mountains", "the city center",
              "the old bridge", "the coffee shop", "the bakery", "the hospital", "the school",
              "the airport", "the harbor", "the village", "the forest", "the theater",
              "the hotel", "the lake", "the farm", "the castle", "the stadium", "the zoo"],
    "food": "pasta soup bread cheese apples rice fish chicken salad cake coffee tea oranges "
            "potatoes carrots noodles pancakes cookies honey tomatoes lemons grapes butter "
            "chocolate beans mushrooms onions pizza sandwiches".split(),
    "activity": "walking cooking reading painting swimming running dancing singing fishing "
                "cycling writing drawing gardening climbing sailing skiing baking shopping "
                "traveling studying hiking knitting camping rowing".split(),
    "thing": ["a new bicycle", "a small boat", "an old piano", "a green jacket",
              "a blue umbrella", "a heavy box", "a paper map", "a silver watch",
              "a wooden chair", "a warm blanket", "a long letter", "a red kite",
              "a simple camera", "a leather bag", "a glass bottle", "a yellow tent",
              "a cheap radio", "a broken lamp", "a tiny garden", "a strange key",
              "a funny hat", "a golden ring", "a thick notebook", "a pair of boots"],
    "time": ["yesterday", "last week", "this morning", "tomorrow", "next month", "tonight",
             "on Sunday", "on Friday", "in the evening", "after lunch", "before dinner",
             "last summer", "every weekend", "in the spring", "last winter", "on Monday"],
    "adj": "beautiful quiet busy expensive cheap crowded lovely strange simple difficult easy "
           "wonderful boring exciting cold warm bright dark fresh noisy friendly careful "
           "happy tired clean dirty huge small modern ancient perfect terrible pleasant "
           "peaceful lively".split(),
    "verbed": "visited cleaned painted repaired bought sold found lost borrowed carried "
              "watched opened fixed built moved ordered packed planted washed delivered "
              "discovered tested".split(),
    "topic": ["the weather", "the new project", "the concert", "the football match",
              "the holiday", "the meeting", "the movie", "the book club", "the train schedule",
              "the exhibition", "the wedding", "the festival", "the election", "the lecture",
              "the new restaurant", "the storm", "the rent", "the traffic"],
    "job": "teacher doctor farmer pilot baker driver painter nurse engineer writer lawyer "
           "musician gardener chef scientist photographer".split(),
    "animal": "dog cat horse bird rabbit duck goat sheep fox owl turtle parrot".split(),
    "family": ["my brother", "my sister", "my mother", "my father", "my cousin", "my uncle",
               "my aunt", "my neighbor", "my friend", "my boss", "our teacher", "my grandmother"],
}

EN_QUESTIONS = [
    "Did you go to {place} {time}?",
    "What do you think about {topic}?",
    "Have you ever tried {activity} near {place}?",
    "Do you know where {name} put {thing}?",
    "How was {topic} {time}?",
    "Would you like some {food} with your {food}?",
    "Why was {place} so {adj} {time}?",
    "Can you help me carry {thing} to {place}?",
    "Is it true that {name} wants to become a {job}?",
    "When are you going to {place} again?",
    "Where did you buy {thing}?",
    "How long have you been {activity} with {name}?",
    "Does {family} still keep a {animal} at home?",
    "Who told you that {place} was {adj}?",
    "Are you coming to {place} with us {time}?",
    "What did {name} say about {topic}?",
    "Should we bring {food} or {food} to the party?",
    "Why did {family} sell {thing}?",
    "Which one do you prefer, {activity} or {activity}?",
    "Could you tell me how to get to {place}?",
    "Was {topic} really as {adj} as people say?",
    "Do you think {name} will like {thing}?",
]

EN_STATEMENTS = [
    "Yes, I went to {place} with {name} {time}.",
    "I think {topic} was {adj} but a little {adj}.",
    "{name} told me that {place} was very {adj}.",
    "We {verbed} {thing} and then walked to {place}.",
    "I usually eat {food} and {food} for breakfast.",
    "No, I have never tried {activity}, but {name} loves it.",
    "Actually {family} works as a {job} near {place}.",
    "The {animal} was sleeping next to {thing} all afternoon.",
    "To be honest, I found {topic} rather {adj}.",
    "{family} {verbed} {thing} {time}.",
    "It was {adj}, so we stayed at {place} until the evening.",
    "I am not sure, maybe {name} knows more about it.",
    "We should meet at {place} {time} and talk about {topic}.",
    "My favorite hobby is {activity}, especially in the spring.",
    "{name} bought {food} and {food} at {place}.",
    "I remember that {place} used to be much more {adj}.",
    "The {job} from {place} {verbed} {thing} for us.",
    "That sounds {adj}, I would love to join you {time}.",
    "Well, {family} prefers {activity} to {activity}.",
    "I think you should ask {name} before {time}.",
    "The road to {place} was {adj} and very {adj}.",
    "We saw a {animal} near {place} {time}.",
]

EN_BACKCHANNELS = ["Yeah.", "Mm-hmm.", "Right.", "Okay.", "I see.", "Uh-huh.", "Sure.", "Exactly.",
                   "Really?", "Oh, nice."]
EN_ANSWER_OPENERS = ["Yes, ", "No, ", "Well, ", "Hmm, ", "Oh, ", "Honestly, "]

ZH_SLOTS = {
    "name": "小明 小红 老王 李老师 张阿姨 小刚 王医生 陈经理 小李 刘奶奶".split(),
    "place": "公园 图书馆 超市 学校 火车站 博物馆 医院 饭店 机场 海边 山上 咖啡馆".split(),
    "food": "米饭 面条 饺子 苹果 包子 西瓜 鸡蛋 牛奶 蛋糕 豆腐 鱼 茶".split(),
    "time": "昨天 今天早上 明天 上个周末 下个月 晚上 星期天 去年夏天".split(),
    "activity": "跑步 游泳 看书 做饭 唱歌 画画 爬山 钓鱼 跳舞 骑车".split(),
    "adj": "热闹 安静 漂亮 干净 好吃 便宜 有意思 舒服".split(),
}

ZH_QUESTIONS = [
    "你{time}去{place}了吗？",
    "你觉得{place}怎么样？",
    "{name}喜欢吃{food}吗？",
    "你平时喜欢{activity}吗？",
    "我们{time}一起去{place}好不好？",
    "{name}是什么时候到{place}的？",
    "你想吃{food}还是{food}？",
    "这个周末你打算{activity}吗？",
]

ZH_STATEMENTS = [
    "我{time}和{name}一起去了{place}。",
    "那里很{adj}，人也不太多。",
    "{name}最喜欢吃{food}和{food}。",
    "我每天早上都去{place}{activity}。",
    "听说{place}旁边新开了一家店，特别{adj}。",
    "我不太喜欢{activity}，但是{name}很喜欢。",
    "{time}我在{place}买了一些{food}。",
    "好的，那我们{time}在{place}见面吧。",
]

ZH_BACKCHANNELS = ["嗯。", "对。", "是的。", "好的。", "对对对。", "没错。"]
ZH_ANSWER_OPENERS = ["嗯，", "对，", "是啊，"]

BANKS = {
    "en": (EN_SLOTS, EN_QUESTIONS, EN_STATEMENTS, EN_BACKCHANNELS, EN_ANSWER_OPENERS),
    "zh": (ZH_SLOTS, ZH_QUESTIONS, ZH_STATEMENTS, ZH_BACKCHANNELS, ZH_ANSWER_OPENERS),
}
_SLOT = re.compile(r"\{(\w+)\}")


def count_words(text: str, language: str = "en") -> int:
    """Words for English (whitespace), characters for Chinese (its WER is a CER)."""
    if language == "zh":
        return len(re.findall(r"[\u4e00-\u9fff]", text))
    return len(text.split())


class TextGen:
    """Deterministic sentences with question/answer flavour.

    `pool` > 0 draws every sentence from a fixed pool of that many questions and statements,
    so that very long audio reuses a few hundred synthesized utterances.
    """

    def __init__(self, language: str = "en", seed: int | np.random.Generator = 0, pool: int = 0):
        if language not in BANKS:
            raise ValueError(f"language must be one of {sorted(BANKS)}, got {language!r}")
        self.language = language
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.slots, self._questions, self._statements, self._backchannels, self._openers = BANKS[language]
        self._pool = None
        if pool:
            self._pool = {kind: [self._make(kind) for _ in range(pool)]
                          for kind in ("question", "statement", "answer")}

    def _fill(self, template: str) -> str:
        used: set[str] = set()

        def draw(m: re.Match) -> str:  # "{food} and {food}" never gives "tea and tea"
            while (word := str(self.rng.choice(self.slots[m.group(1)]))) in used:
                pass
            used.add(word)
            return word

        text = _SLOT.sub(draw, template)
        return text[0].upper() + text[1:]

    def _fresh(self, kind: str) -> str:
        templates = self._questions if kind == "question" else self._statements
        lo, hi = (5, 15) if self.language == "en" else (4, 20)
        while True:
            text = self._fill(str(self.rng.choice(templates)))
            if lo <= count_words(text, self.language) <= hi:
                return text

    def sentence(self, kind: str = "statement") -> str:
        """kind: 'question', 'statement' or 'answer' (a statement opened like a reply)."""
        if kind not in ("question", "statement", "answer"):
            raise ValueError(f"kind must be 'question', 'statement' or 'answer', got {kind!r}")
        if self._pool is not None:
            return str(self.rng.choice(self._pool[kind]))
        return self._make(kind)

    def _make(self, kind: str) -> str:
        text = self._fresh("question" if kind == "question" else "statement")
        if kind == "answer" and self.rng.random() < 0.6:
            text = self._open_reply(text)
        return text

    def _open_reply(self, text: str) -> str:
        first = text.split(",")[0].split()[0]
        if first.rstrip(",") in ("Yes", "No", "Well", "Actually", "To", "That") or text.startswith("好的"):
            return text  # already reads as a reply
        opener = str(self.rng.choice(self._openers))
        if self.language == "en" and first != "I" and first not in self.slots["name"]:
            text = text[0].lower() + text[1:]
        out = opener + text
        return out if count_words(out, self.language) <= (15 if self.language == "en" else 20) else text

    def pool_texts(self) -> list[str]:
        """Every sentence and back-channel this generator can return in pool mode."""
        return [t for texts in (self._pool or {}).values() for t in texts] + list(self._backchannels)

    def backchannel(self) -> str:
        return str(self.rng.choice(self._backchannels))

    def vocabulary(self) -> set[str]:
        """Every word the templates and slots can produce (English: lower-cased tokens)."""
        texts = [*self._questions, *self._statements, *self._backchannels, *self._openers]
        texts += [w for words in self.slots.values() for w in words]
        if self.language == "zh":
            return {c for t in texts for c in _SLOT.sub("", t) if "\u4e00" <= c <= "\u9fff"}
        return {w for t in texts for w in re.findall(r"[a-z]+(?:-[a-z]+)?", _SLOT.sub(" ", t).lower())}


# --------------------------------------------------------------------------------------------
# Voices and espeak-ng


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng voice+variant, e.g. "en-us+f3"
    pitch: int = 50  # espeak -p, 0..99
    speed: int = 160  # espeak -s, words per minute
    gender: str = "male"


# Male and female variants differ by about an octave in F0 (roughly 100 vs 200 Hz).
VOICES = {
    "en": {"male": [Voice("en-us+m3", 40, 155), Voice("en-us+m7", 30, 165), Voice("en-us+m1", 48, 150)],
           "female": [Voice("en-us+f3", 68, 170, "female"), Voice("en-us+f5", 60, 160, "female"),
                      Voice("en-us+f2", 75, 175, "female")]},
    # espeak counts a Chinese character as a word: ~4 characters/s is a natural rate.
    "zh": {"male": [Voice("cmn+m3", 40, 240), Voice("cmn+m1", 35, 230)],
           "female": [Voice("cmn+f3", 70, 250, "female"), Voice("cmn+f2", 62, 240, "female")]},
}

_CACHE: OrderedDict = OrderedDict()
_CACHE_MAX = 2048


def _espeak_raw(text: str, voice: Voice) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng); the synthetic "
                           "audio generator needs it")
    # Text goes through stdin so that a sentence starting with '-' is never read as an option.
    cmd = ["espeak-ng", "-b", "1", "-v", voice.name, "-p", str(voice.pitch), "-s", str(voice.speed),
           "--stdout"]
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng failed for voice {voice.name!r}: {proc.stderr.decode()[-300:]}")
    # --stdout writes a streaming header with a bogus length: take everything after "data".
    wav = proc.stdout
    at = wav.find(b"data")
    if wav[:4] != b"RIFF" or at < 0:
        raise RuntimeError(f"espeak-ng returned no WAV data for voice {voice.name!r}")
    rate = int.from_bytes(wav[24:28], "little")
    if rate != ESPEAK_SR:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_SR}")
    pcm = wav[at + 8:]
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def _trim(x: np.ndarray, sr: int, floor_db: float = -40.0) -> np.ndarray:
    """Cut espeak's leading/trailing silence: keep the 5 ms frames louder than peak + floor_db."""
    hop = int(0.005 * sr)
    n = len(x) // hop
    if n == 0:
        return x[:0]
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1))
    active = np.flatnonzero(rms > max(rms.max() * 10 ** (floor_db / 20), 1e-4))
    if active.size == 0:
        return x[:0]
    return x[active[0] * hop:(active[-1] + 1) * hop]


def speak(text: str, voice: Voice, sample_rate: int = 16000) -> np.ndarray:
    """One utterance: trimmed, at SPEECH_DBFS RMS, resampled; cached per (voice, text, rate)."""
    key = (voice, text, sample_rate)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    x = _render(text, voice, sample_rate)
    _CACHE[key] = x
    if len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)
    return x


def prefetch(texts: list[str], voices: list[Voice], sample_rate: int) -> None:
    """Synthesize every (text, voice) not cached yet, espeak processes running in parallel."""
    todo = [(t, v) for v in voices for t in dict.fromkeys(texts) if (v, t, sample_rate) not in _CACHE]
    if len(todo) > _CACHE_MAX:
        return  # would evict itself; speak() renders on demand instead
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        waves = list(pool.map(lambda tv: _render(tv[0], tv[1], sample_rate), todo))
    for (t, v), x in zip(todo, waves):  # cache filled in a fixed order, from this thread only
        speak_key = (v, t, sample_rate)
        _CACHE[speak_key] = x
        if len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)


def _render(text: str, voice: Voice, sample_rate: int) -> np.ndarray:
    x = _trim(_espeak_raw(text, voice), ESPEAK_SR)
    if x.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {text!r} with voice {voice.name!r}")
    x = x * (10 ** (SPEECH_DBFS / 20) / np.sqrt(np.mean(x ** 2)))
    if sample_rate != ESPEAK_SR:
        x = soxr.resample(x, ESPEAK_SR, sample_rate, quality="HQ")
    # 2 ms ramps so that hard cuts at the trimmed edges do not click.
    ramp = min(int(0.002 * sample_rate), len(x) // 2)
    if ramp:
        w = np.linspace(0.0, 1.0, ramp, dtype=np.float32)
        x[:ramp] *= w
        x[len(x) - ramp:] *= w[::-1]
    x = np.ascontiguousarray(x, dtype=np.float32)
    x.flags.writeable = False  # shared through the cache
    return x


# --------------------------------------------------------------------------------------------
# Truth


@dataclass
class Turn:
    speaker: str
    start: float
    end: float
    text: str
    is_backchannel: bool = False
    overlap: bool = False


@dataclass
class Truth:
    sample_rate: int
    duration: float
    kind: str  # dialogue | monologue | meeting | silence
    language: str
    speakers: dict[str, dict]
    turns: list[Turn]
    transcript: str = ""
    seed: int | None = None
    conditions: dict = field(default_factory=dict)  # noise / music levels
    file: dict = field(default_factory=dict)  # set by write_clip: name, format, channels, subtype

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Truth":
        d = dict(d)
        d["turns"] = [Turn(**t) for t in d["turns"]]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n",
                              encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Truth":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def tagged_transcript(turns: list[Turn], language: str = "en") -> str:
    """`[S1] ... [S2] ...`: sorted by start, adjacent same-speaker utterances merged."""
    sep = "" if language == "zh" else " "
    merged: list[list] = []
    for t in sorted(turns, key=lambda t: (t.start, t.end)):
        if merged and merged[-1][0] == t.speaker:
            merged[-1][1].append(t.text)
        else:
            merged.append([t.speaker, [t.text]])
    return " ".join(f"[{spk}] {sep.join(texts)}" for spk, texts in merged)


@dataclass
class Clip:
    audio: np.ndarray  # float32 mono
    truth: Truth
    stems: dict[str, np.ndarray] | None = None  # per speaker, same scale as audio (keep_stems)

    @property
    def sample_rate(self) -> int:
        return self.truth.sample_rate


# --------------------------------------------------------------------------------------------
# Noise and music


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white or pink (1/f power) noise."""
    from scipy.signal import lfilter

    x = rng.standard_normal(n).astype(np.float32)
    if color == "pink":
        # A well-known 3-pole/3-zero fit of a -3 dB/octave slope (Julius O. Smith).
        b = [0.049922035, -0.095993537, 0.050612699, -0.004408786]
        a = [1.0, -2.494956002, 2.017265875, -0.522189400]
        x = lfilter(b, a, x).astype(np.float32)
    elif color != "white":
        raise ValueError(f"noise color must be 'white' or 'pink', got {color!r}")
    return x / max(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))), 1e-12)


_CHORDS = [(0, 4, 7), (5, 9, 12), (7, 11, 14), (9, 12, 16), (2, 5, 9), (4, 7, 11)]  # C F G Am Dm Em


def music_tones(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS music-like bed: triads of harmonic tones, each chord 1.5-3 s with attack/decay."""
    out = np.zeros(n, dtype=np.float32)
    pos = 0
    while pos < n:
        length = min(int(rng.uniform(1.5, 3.0) * sr), n - pos)
        chord = _CHORDS[int(rng.integers(len(_CHORDS)))]
        root = 220.0 * 2 ** (int(rng.integers(-3, 3)) / 12)
        t = np.arange(length, dtype=np.float32) / sr
        env = np.minimum(t / 0.04, 1.0) * np.exp(-t / 1.2) * np.minimum((length / sr - t) / 0.15, 1.0)
        seg = np.zeros(length, dtype=np.float32)
        for semis in chord:
            f = root * 2 ** (semis / 12)
            for h, amp in ((1, 1.0), (2, 0.4), (3, 0.2)):
                if f * h < sr / 2:
                    seg += amp * np.sin(2 * np.pi * f * h * t + rng.uniform(0, 2 * np.pi)).astype(np.float32)
        out[pos:pos + length] = seg * env
        pos += length
    return out / max(float(np.sqrt(np.mean(out.astype(np.float64) ** 2))), 1e-12)


def speech_mask(turns: list[Turn], n: int, sr: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for t in turns:
        mask[int(round(t.start * sr)):int(round(t.end * sr))] = True
    return mask


def speech_power(audio: np.ndarray, turns: list[Turn], sr: int) -> float:
    """Mean power of `audio` over the union of the turns: the reference of every SNR here."""
    mask = speech_mask(turns, len(audio), sr)
    return float(np.mean(audio[mask].astype(np.float64) ** 2)) if mask.any() else 0.0


# --------------------------------------------------------------------------------------------
# Conversations


def _voices_for(language: str, n: int, rng: np.random.Generator) -> list[Voice]:
    """n clearly different voices, genders alternating, first gender random."""
    pools = VOICES[language]
    first = "male" if rng.random() < 0.5 else "female"
    order = [first, "female" if first == "male" else "male"]
    picked = []
    for i in range(n):
        pool = pools[order[i % 2]]
        picked.append(pool[(i // 2) % len(pool)])
    return picked


def _conversation(kind: str, seed: int, *, n_speakers: int, language: str, sample_rate: int,
                  n_turns: int | None, duration: float | None, voices: list[Voice] | None,
                  pause: tuple[float, float], overlap_prob: float, overlap: tuple[float, float],
                  backchannel_prob: float, noise_snr_db: float | None, noise_color: str,
                  music_db: float | None, text_pool: int, keep_stems: bool) -> Clip:
    if (n_turns is None) == (duration is None):
        raise ValueError("give exactly one of n_turns and duration")
    if language not in VOICES:
        raise ValueError(f"language must be one of {sorted(VOICES)}, got {language!r}")
    if not (0 <= pause[0] <= pause[1]) or not (0 < overlap[0] <= overlap[1]):
        raise ValueError(f"bad pause {pause} or overlap {overlap} range (seconds, low <= high)")
    # Separate streams: adding noise or music never changes the speech of a given seed.
    r_text, r_time, r_noise, r_music = (np.random.default_rng([seed, k]) for k in range(4))
    text = TextGen(language, r_text, pool=text_pool)
    voices = list(voices) if voices else _voices_for(language, n_speakers, r_time)
    if len(voices) != n_speakers:
        raise ValueError(f"{kind} needs {n_speakers} voices, got {len(voices)}")
    labels = [f"S{i + 1}" for i in range(n_speakers)]
    sr = sample_rate
    if text_pool:
        prefetch(text.pool_texts(), voices, sr)

    placed: list[tuple[str, int, np.ndarray, str, bool]] = []  # speaker, start sample, wave, text, bc
    busy_until = {s: 0 for s in labels}  # a speaker never overlaps themself
    t_end = int(r_time.uniform(0.3, 0.8) * sr)  # end of the last floor turn (samples)
    prev: tuple[int, int] | None = None  # (start, end) of the last floor turn
    speaker, asked, spoken = labels[0], False, set()

    i = 0
    while (i < n_turns) if n_turns is not None else (t_end < (duration - 0.6) * sr):
        # Question/answer flavour: a question gets an answer, which may end with a new question.
        if kind == "monologue":
            parts = [text.sentence("question" if r_time.random() < 0.1 else "statement")]
        elif asked:
            parts = [text.sentence("answer")]
            if r_time.random() < 0.5:
                parts.append(text.sentence("question"))
        else:
            k = int(r_time.integers(1, 3))
            last = "question" if r_time.random() < 0.7 else "statement"
            parts = [text.sentence("statement") for _ in range(k - 1)] + [text.sentence(last)]
        utt = (" " if language == "en" else "").join(parts)
        asked = utt.endswith(("?", "？"))
        # Sentence by sentence, so that long audio reuses cached sentences, not whole turns.
        voice = voices[labels.index(speaker)]
        pieces = []
        for j, sentence in enumerate(parts):
            if j:
                pieces.append(np.zeros(int(r_time.uniform(0.25, 0.45) * sr), dtype=np.float32))
            pieces.append(speak(sentence, voice, sr))
        wave = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        start = t_end + int(r_time.uniform(*pause) * sr) if prev else t_end
        if prev and n_speakers > 1 and r_time.random() < overlap_prob:
            ov = int(r_time.uniform(*overlap) * sr)
            ov = min(ov, (prev[1] - prev[0]) // 2, len(wave) // 2)
            start = t_end - ov
        start = max(start, busy_until[speaker] + int(0.1 * sr))
        placed.append((speaker, start, wave, utt, False))
        spoken.add(speaker)
        busy_until[speaker] = start + len(wave)
        prev = (start, start + len(wave))
        t_end = max(t_end, prev[1])
        host = speaker

        # Next floor holder: alternate (dialogue), any other (meeting), the same (monologue).
        if n_speakers == 1:
            nxt = speaker
        else:
            others = [s for s in labels if s != speaker]
            silent = [s for s in others if s not in spoken]  # everyone in a meeting gets a say
            pick = silent or others
            nxt = pick[int(r_time.integers(len(pick)))]
        if n_speakers > 1 and len(wave) > 2.0 * sr and r_time.random() < backchannel_prob:
            listener = nxt
            bc = text.backchannel()
            bwave = speak(bc, voices[labels.index(listener)], sr)
            if r_time.random() < 0.6:  # inside the host's turn
                lo, hi = prev[0] + int(0.35 * len(wave)), prev[1] - len(bwave) - int(0.3 * sr)
                if hi > lo:
                    b0 = int(r_time.integers(lo, hi))
                    b0 = max(b0, busy_until[listener] + int(0.1 * sr))
                    placed.append((listener, b0, bwave, bc, True))
                    busy_until[listener] = b0 + len(bwave)
            else:  # in the pause, and the host keeps the floor
                b0 = max(t_end + int(r_time.uniform(0.15, 0.4) * sr), busy_until[listener] + int(0.1 * sr))
                placed.append((listener, b0, bwave, bc, True))
                busy_until[listener] = b0 + len(bwave)
                t_end = max(t_end, b0 + len(bwave))
                prev = (b0, b0 + len(bwave))
                nxt, asked = host, False
        speaker = nxt
        i += 1

    total = t_end + int(r_time.uniform(0.4, 1.0) * sr)
    audio = np.zeros(total, dtype=np.float32)
    stems = {s: np.zeros(total, dtype=np.float32) for s in labels} if keep_stems else None
    turns = []
    for spk, s0, wave, utt, is_bc in placed:
        audio[s0:s0 + len(wave)] += wave
        if stems is not None:
            stems[spk][s0:s0 + len(wave)] += wave
        turns.append(Turn(spk, round(s0 / sr, 4), round((s0 + len(wave)) / sr, 4), utt, is_bc))
    turns.sort(key=lambda t: (t.start, t.end))
    _mark_overlaps(turns)

    conditions = _add_background(audio, turns, sr, noise_snr_db, noise_color, music_db, r_noise, r_music)
    _limit_peak(audio, stems)
    speakers = {lab: {"voice": v.name, "pitch": v.pitch, "speed": v.speed, "gender": v.gender}
                for lab, v in zip(labels, voices)}
    truth = Truth(sr, round(total / sr, 4), kind, language, speakers, turns,
                  tagged_transcript(turns, language), seed, conditions)
    return Clip(audio, truth, stems)


def _mark_overlaps(turns: list[Turn]) -> None:
    for a in turns:
        a.overlap = any(b.speaker != a.speaker and b.start < a.end - 1e-3 and a.start < b.end - 1e-3
                        for b in turns)


def _add_background(audio, turns, sr, noise_snr_db, noise_color, music_db, r_noise, r_music) -> dict:
    conditions: dict = {}
    ref = speech_power(audio, turns, sr)
    if ref == 0.0:
        ref = 10 ** (SPEECH_DBFS / 10)  # no speech: levels are relative to the nominal speech level
    if music_db is not None:
        gain = np.float32(np.sqrt(ref * 10 ** (music_db / 10)))
        audio += music_tones(len(audio), sr, r_music) * gain
        conditions["music"] = {"level_db": music_db, "relative_to": "speech power over the turns"}
    if noise_snr_db is not None:
        gain = np.float32(np.sqrt(ref / 10 ** (noise_snr_db / 10)))
        audio += colored_noise(len(audio), noise_color, r_noise) * gain
        conditions["noise"] = {"snr_db": noise_snr_db, "color": noise_color,
                               "definition": "speech power over the turns / noise power"}
    return conditions


def _limit_peak(audio: np.ndarray, stems: dict | None, ceiling: float = 0.98) -> None:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > ceiling:
        g = np.float32(ceiling / peak)
        audio *= g
        for s in (stems or {}).values():
            s *= g


_CONV_DEFAULTS = dict(language="en", sample_rate=16000, voices=None, pause=(0.2, 0.8),
                      overlap_prob=0.0, overlap=(0.3, 0.8), backchannel_prob=0.0,
                      noise_snr_db=None, noise_color="white", music_db=None, text_pool=0,
                      keep_stems=False)


def synth_dialogue(seed: int = 0, *, n_turns: int | None = None, duration: float | None = None,
                   **opts) -> Clip:
    """Two speakers alternating. `duration` (seconds) keeps adding turns until it is reached
    (within one turn); else `n_turns` (default 8). Options (defaults in _CONV_DEFAULTS):
    language 'en'|'zh', sample_rate, voices [Voice, Voice], pause (lo, hi) s, overlap_prob,
    overlap (lo, hi) s, backchannel_prob, noise_snr_db, noise_color 'white'|'pink', music_db
    (music level relative to speech), text_pool (reuse N sentences), keep_stems."""
    if n_turns is None and duration is None:
        n_turns = 8
    return _conversation("dialogue", seed, n_speakers=2, n_turns=n_turns, duration=duration,
                         **{**_CONV_DEFAULTS, **opts})


def synth_meeting(seed: int = 0, *, n_speakers: int = 3, n_turns: int | None = None,
                  duration: float | None = None, **opts) -> Clip:
    """3-4 speakers; each turn goes to a random other speaker. Options as synth_dialogue."""
    if n_speakers not in (3, 4):
        raise ValueError(f"a meeting has 3 or 4 speakers, got {n_speakers}")
    if n_turns is None and duration is None:
        n_turns = 10
    return _conversation("meeting", seed, n_speakers=n_speakers, n_turns=n_turns,
                         duration=duration, **{**_CONV_DEFAULTS, **opts})


def synth_monologue(seed: int = 0, *, n_sentences: int | None = None, duration: float | None = None,
                    **opts) -> Clip:
    """One speaker, one turn per sentence, pauses between sentences (default 0.3-0.9 s)."""
    if n_sentences is None and duration is None:
        n_sentences = 6
    opts = {**_CONV_DEFAULTS, "pause": (0.3, 0.9), **opts}
    if opts.get("voices") and len(opts["voices"]) != 1:
        raise ValueError("a monologue has exactly one voice")
    return _conversation("monologue", seed, n_speakers=1, n_turns=n_sentences, duration=duration,
                         **opts)


def synth_silence(duration: float = 10.0, seed: int = 0, *, sample_rate: int = 16000,
                  noise_dbfs: float | None = None, noise_color: str = "pink",
                  music_dbfs: float | None = None) -> Clip:
    """No speech: digital silence, or low noise / music at an absolute RMS level (dBFS)."""
    n = int(round(duration * sample_rate))
    audio = np.zeros(n, dtype=np.float32)
    conditions: dict = {}
    if music_dbfs is not None:
        gain = np.float32(10 ** (music_dbfs / 20))
        audio += music_tones(n, sample_rate, np.random.default_rng([seed, 3])) * gain
        conditions["music"] = {"dbfs": music_dbfs}
    if noise_dbfs is not None:
        gain = np.float32(10 ** (noise_dbfs / 20))
        audio += colored_noise(n, noise_color, np.random.default_rng([seed, 2])) * gain
        conditions["noise"] = {"dbfs": noise_dbfs, "color": noise_color}
    truth = Truth(sample_rate, round(n / sample_rate, 4), "silence", "none", {}, [], "", seed, conditions)
    return Clip(audio, truth, None)


def synth_long(duration: float, seed: int = 0, *, kind: str = "dialogue", text_pool: int = 100,
               **opts) -> Clip:
    """Minutes to hours of audio; `text_pool` sentences are synthesized once and reused, which
    makes an hour take seconds. kind: dialogue | meeting | monologue."""
    makers = {"dialogue": synth_dialogue, "meeting": synth_meeting, "monologue": synth_monologue}
    if kind not in makers:
        raise ValueError(f"kind must be one of {sorted(makers)}, got {kind!r}")
    return makers[kind](seed, duration=duration, text_pool=text_pool, **opts)


# --------------------------------------------------------------------------------------------
# Writing

SF_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}
FFMPEG_CODECS = {".m4a": ("aac", 48), ".opus": ("libopus", 24)}  # codec, kbit/s per channel
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int, *, channels: int | None = None,
                subtype: str | None = None, target_sr: int | None = None) -> Path:
    """Write float audio in the format of the path's suffix.

    .wav/.flac/.ogg (vorbis)/.mp3 via soundfile; .m4a (AAC) and .opus via ffmpeg. `audio` is
    (n,) or (n, channels); mono is copied to `channels` channels. `target_sr` resamples first.
    subtype: soundfile subtype, e.g. 'PCM_16' (default for wav/flac), 'PCM_24', 'VORBIS'.
    Note that an opus file always decodes at 48 kHz, whatever rate went in.
    """
    path = Path(path)
    ext = path.suffix.lower()
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{path}: audio must be (n,) or (n, channels), got shape {x.shape}")
    if channels is not None and channels != x.shape[1]:
        if x.shape[1] != 1:
            raise ValueError(f"{path}: cannot turn {x.shape[1]} channels into {channels}")
        x = np.repeat(x, channels, axis=1)
    if target_sr and target_sr != sample_rate:
        x = soxr.resample(x, sample_rate, target_sr, quality="HQ").astype(np.float32)
        sample_rate = target_sr
    x = np.clip(x, -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext in SF_FORMATS:
        if ext == ".mp3" and sample_rate not in MP3_RATES:
            raise ValueError(f"{path}: mp3 cannot store {sample_rate} Hz")
        sf.write(str(path), x, sample_rate, format=SF_FORMATS[ext], subtype=subtype)
        return path
    if ext not in FFMPEG_CODECS:
        raise ValueError(f"{path}: unsupported audio suffix {ext!r}; use one of "
                         f"{sorted([*SF_FORMATS, *FFMPEG_CODECS])}")
    if shutil.which("ffmpeg") is None:
        raise RuntimeError(f"{path}: writing {ext} needs ffmpeg, which is not installed")
    if ext == ".opus" and sample_rate not in OPUS_RATES:
        x = soxr.resample(x, sample_rate, 48000, quality="HQ").astype(np.float32)
        sample_rate = 48000
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.wav"
        sf.write(str(src), x, sample_rate, subtype="PCM_24")
        # -bitexact and no metadata: the same samples give the same file bytes.
        cmd = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(src), "-map_metadata", "-1",
               "-fflags", "+bitexact", "-flags:a", "+bitexact", "-c:a", FFMPEG_CODECS[ext][0],
               "-b:a", f"{FFMPEG_CODECS[ext][1] * x.shape[1]}k", str(path)]
        proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{path}: ffmpeg failed: {proc.stderr.decode()[-300:]}")
    return path


def write_clip(clip: Clip, audio_path: str | Path, truth_path: str | Path | None = None, *,
               channels: int | None = None, subtype: str | None = None,
               target_sr: int | None = None) -> tuple[Path, Path]:
    """`<name>.<ext>` + truth JSON (default `<name>.json` beside it). The truth's sample_rate is
    the rate written; its `file` entry records format and channel count."""
    audio_path = Path(audio_path)
    truth_path = Path(truth_path) if truth_path else audio_path.with_suffix(".json")
    write_audio(audio_path, clip.audio, clip.sample_rate, channels=channels, subtype=subtype,
                target_sr=target_sr)
    truth = replace(clip.truth, sample_rate=target_sr or clip.sample_rate,
                    file={"name": audio_path.name, "format": audio_path.suffix.lower().lstrip("."),
                          "channels": channels or 1, "subtype": subtype})
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth.save(truth_path)
    return audio_path, truth_path


# --------------------------------------------------------------------------------------------
# The bundled example (examples/audio + examples/truth)

# name -> (maker, kwargs, write kwargs). Seeds were picked once so that durations land in range.
EXAMPLE = {
    "dlg_clean_en.wav": ("dialogue", dict(seed=101, duration=31.0, pause=(0.3, 0.9)), dict()),
    "dlg_backchannel_en.flac": ("dialogue", dict(seed=108, duration=32.0, backchannel_prob=0.6,
                                                 overlap_prob=0.3, overlap=(0.3, 0.6), sample_rate=44100),
                                dict(channels=2)),
    "dlg_noisy_en.mp3": ("dialogue", dict(seed=103, duration=38.0, noise_snr_db=15.0, noise_color="pink",
                                          sample_rate=22050), dict()),
    "dlg_long_en.ogg": ("dialogue", dict(seed=104, duration=67.0, pause=(0.2, 0.6), sample_rate=24000),
                        dict()),
    "dlg_zh.m4a": ("dialogue", dict(seed=105, duration=28.0, language="zh"), dict()),
    "monologue_en.opus": ("monologue", dict(seed=106, duration=28.0, sample_rate=24000), dict()),
    "meeting_en.mp3": ("meeting", dict(seed=107, duration=37.0, n_speakers=3, sample_rate=32000), dict()),
    "noise_only.wav": ("silence", dict(seed=108, duration=10.0, noise_dbfs=-55.0, sample_rate=8000), dict()),
}
BAD_INPUTS = {
    "empty.wav": "empty file (0 bytes)",
    "truncated.wav": "WAV header claims 5 s of 16 kHz PCM, only 0.5 s of data present",
    "not_audio.wav": "plain text renamed .wav",
    "notes.txt": "text file, not audio",
}
MAKERS = {"dialogue": synth_dialogue, "meeting": synth_meeting, "monologue": synth_monologue,
          "silence": synth_silence}


def build_example(out: str | Path = "examples/audio", truth_dir: str | Path | None = None) -> list[dict]:
    """Write the bundled example; returns one index row per file (also saved as index.json)."""
    out = Path(out)
    truth_dir = Path(truth_dir) if truth_dir else out.parent / "truth"
    if out.resolve() == truth_dir.resolve():
        raise ValueError("truth files must not sit in the audio folder (the pipeline ingests it all)")
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for name, (kind, kwargs, wkw) in EXAMPLE.items():
        clip = MAKERS[kind](**kwargs)
        write_clip(clip, out / name, truth_dir / (Path(name).stem + ".json"), **wkw)
        t = clip.truth
        index.append({"file": name, "kind": kind, "language": t.language, "duration": t.duration,
                      "sample_rate": t.sample_rate, "channels": wkw.get("channels", 1),
                      "speakers": len(t.speakers), "turns": len(t.turns),
                      "truth": f"{Path(name).stem}.json"})
    _write_bad_inputs(out)
    index += [{"file": name, "kind": "bad_input", "problem": why, "truth": None}
              for name, why in BAD_INPUTS.items()]
    (truth_dir / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1) + "\n",
                                          encoding="utf-8")
    return index


def _write_bad_inputs(out: Path) -> None:
    (out / "empty.wav").write_bytes(b"")
    sr = 16000
    header = (b"RIFF" + (36 + 5 * sr * 2).to_bytes(4, "little") + b"WAVEfmt "
              + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
              + sr.to_bytes(4, "little") + (sr * 2).to_bytes(4, "little") + (2).to_bytes(2, "little")
              + (16).to_bytes(2, "little") + b"data" + (5 * sr * 2).to_bytes(4, "little"))
    tone = (0.1 * np.sin(2 * np.pi * 440 * np.arange(sr // 2) / sr) * 32767).astype("<i2")
    (out / "truncated.wav").write_bytes(header + tone.tobytes())
    (out / "not_audio.wav").write_text("This is not audio. It is a text file with a .wav name.\n")
    (out / "notes.txt").write_text("Recording notes: the files in this folder are synthetic "
                                   "(espeak-ng); truth lives in ../truth/.\n")


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = clitools.parser("python -m tools.synth", __doc__.split("\n\n")[0])
    sub = clitools.subparsers(p, dest="cmd", required=True, metavar="KIND")
    ex = sub.add_parser("example", help="build the bundled example", description="Build the bundled example.")
    ex.add_argument("--out", default="examples/audio", help="audio folder")
    ex.add_argument("--truth", default=None, help="truth folder (default: <out>/../truth)")
    for kind in ("dialogue", "meeting", "monologue", "silence", "long"):
        q = sub.add_parser(kind, help=f"one {kind} clip: audio + truth JSON",
                           description=f"Write one {kind} clip and its truth JSON.")
        q.add_argument("--out", required=True, help="audio path; the suffix picks the format")
        q.add_argument("--truth", default=None, help="truth JSON path (default: beside the audio)")
        q.add_argument("--seed", type=int, default=0, help="random seed: same seed, same clip")
        q.add_argument("--duration", type=float, default=None,
                       help="seconds (default: from the number of turns; silence 10, long 3600)")
        q.add_argument("--sr", type=int, default=16000, help="sample rate of the written file (Hz)")
        q.add_argument("--channels", type=int, default=None,
                       help="channels of the written file (default: 1; copies of the mono signal)")
        q.add_argument("--subtype", default=None, help="soundfile subtype, e.g. PCM_24")
        if kind == "silence":
            q.add_argument("--noise-dbfs", type=float, default=None, help="add white noise at this level (dBFS)")
            q.add_argument("--music-dbfs", type=float, default=None, help="add music-like tones at this level (dBFS)")
            continue
        q.add_argument("--language", default="en", choices=sorted(VOICES), help="language of the text and voices")
        q.add_argument("--turns", type=int, default=None,
                       help="number of turns (default: 8 for a dialogue, 10 for a meeting) or sentences (monologue: 6)")
        q.add_argument("--pause", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                       help="range of the pause between turns in seconds (default: 0.2 0.8; monologue 0.3 0.9)")
        q.add_argument("--overlap-prob", type=float, default=0.0, help="probability that a turn overlaps the previous one")
        q.add_argument("--backchannel-prob", type=float, default=0.0,
                       help="probability of a short back-channel from the listener during or after a turn (of over 2 s)")
        q.add_argument("--snr", type=float, default=None, help="noise SNR in dB (default: no noise)")
        q.add_argument("--noise-color", default="white", choices=["white", "pink"], help="noise spectrum")
        q.add_argument("--music-db", type=float, default=None, help="music level re speech, dB (default: no music)")
        if kind in ("meeting", "long"):
            q.add_argument("--speakers", type=int, default=3, help="number of speakers of a meeting")
        if kind == "long":
            q.add_argument("--kind", default="dialogue", choices=["dialogue", "meeting", "monologue"],
                           help="what the long file contains")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    return clitools.run(lambda: _synth(a), a.debug)


def _synth(a) -> int:
    if a.cmd == "example":
        for row in build_example(a.out, a.truth):
            print(f"{row['file']:24s} {row.get('duration', '-')!s:>8} {row['kind']}")
        return 0
    if a.cmd == "silence":
        clip = synth_silence(a.duration or 10.0, a.seed, sample_rate=a.sr, noise_dbfs=a.noise_dbfs,
                             music_dbfs=a.music_dbfs)
    else:
        opts = dict(language=a.language, sample_rate=a.sr, overlap_prob=a.overlap_prob,
                    backchannel_prob=a.backchannel_prob, noise_snr_db=a.snr,
                    noise_color=a.noise_color, music_db=a.music_db)
        if a.pause:
            opts["pause"] = tuple(a.pause)
        if a.cmd == "long":
            if a.kind == "meeting":
                opts["n_speakers"] = a.speakers
            clip = synth_long(a.duration or 3600.0, a.seed, kind=a.kind, **opts)
        else:
            length = {"n_sentences" if a.cmd == "monologue" else "n_turns": a.turns, "duration": a.duration}
            if a.cmd == "meeting":
                opts["n_speakers"] = a.speakers
            clip = MAKERS[a.cmd](a.seed, **{k: v for k, v in length.items() if v is not None}, **opts)
    audio_path, truth_path = write_clip(clip, a.out, a.truth, channels=a.channels, subtype=a.subtype)
    print(f"{audio_path} ({clip.truth.duration:.1f} s, {len(clip.truth.turns)} turns), truth {truth_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
