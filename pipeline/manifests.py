"""Typed Parquet schemas: the interface between pipeline stages.

Every manifest row carries the ``recording_id`` (and, for segments, ``start``/``end`` in seconds of
the source file), so any output row traces back to its source audio through the recordings
manifest. Each schema is versioned; ``read_manifest`` checks the version and the columns and names
the file and the problem when they do not match.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write

SCHEMA_VERSION_KEY = b"opendialog.schema"
STATUSES = ("ok", "rejected", "failed")
LEDGER_STATUSES = ("kept", "rejected", "failed", "pending")


class ManifestError(ValueError):
    """A manifest file is missing, unreadable, of another schema or of another version."""


# ----------------------------------------------------------------------------- the row contract
# The nested values that flow between stages, each defined once: the TypedDict is what stage code
# reads and writes, the Arrow struct derived from it is how manifests store it.


class Span(TypedDict):
    """A stretch of a recording in seconds (VAD speech, overlaps)."""

    start: float
    end: float


class Turn(Span):
    """A diarization turn: who speaks in the span."""

    speaker: str


class Utterance(Turn):
    """A transcribed turn (ASR): its text, language and the backend's 0..1 confidence."""

    text: str
    language: str | None
    confidence: float | None


class SpeakerDuration(TypedDict):
    speaker: str
    duration: float


class SegmentTurn(TypedDict):
    """One [S1]/[S2] turn of a segment and its span in the source file."""

    speaker: str
    start: float
    end: float
    text: str


class Segment(TypedDict):
    """A <= 30 s dialogue piece of a recording (segments stage); ``start``/``end`` in seconds of the
    source file. Later stages update ``status``/``reason`` and add their fields (``SegmentScores``)."""

    segment_id: str
    recording_id: str
    start: float
    end: float
    duration: float | None
    text: str | None
    num_turns: int | None
    language: str | None
    speakers: list[str] | None  # the diarization speaker behind [S1], [S2], ...
    turns: list[SegmentTurn] | None  # the [S1]/[S2] turns with their spans
    agreement: float | None  # WhisperD tags vs diarization, 0..1
    source: str | None  # "whisperd" or "diarization"
    status: str
    reason: str | None


class SegmentScores(TypedDict, total=False):
    """What rules, quality and export add to a segment."""

    metrics: dict  # rules: every rule metric (stored as the RULE_METRICS struct)
    dnsmos_ovrl: float
    dnsmos_sig: float
    dnsmos_bak: float
    path: str  # export: relative to the export root
    exported_duration: float


_ARROW = {float: pa.float64(), str: pa.string(), int: pa.int32(), bool: pa.bool_()}


def _arrow_type(hint) -> pa.DataType:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return pa.list_(_arrow_type(args[0]))
    if args:  # X | None: nullable X
        return _arrow_type(args[0])
    if isinstance(hint, type) and hint in _ARROW:
        return _ARROW[hint]
    return arrow_struct(hint)


def arrow_struct(cls: type) -> pa.StructType:
    """The Arrow struct of a row TypedDict, fields in declaration order."""
    return pa.struct([(name, _arrow_type(hint)) for name, hint in typing.get_type_hints(cls).items()])


def _fields(cls: type, required: tuple[str, ...] = ()) -> list[pa.Field]:
    return [pa.field(name, _arrow_type(hint), nullable=name not in required)
            for name, hint in typing.get_type_hints(cls).items()]


SPAN = arrow_struct(Span)


_OUTCOME = [
    pa.field("recording_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
]

TURN = arrow_struct(Turn)
UTTERANCE = arrow_struct(Utterance)

SEGMENT_TURN = arrow_struct(SegmentTurn)
# The rule metrics of a segment (filters/rules.py): null where a rule is disabled.
RULE_METRICS = pa.struct(
    [
        ("turns", pa.int64()),
        ("events", pa.int64()),
        ("turns_per_second", pa.float64()),
        ("scripts", pa.map_(pa.string(), pa.float64())),
        ("foreign_share", pa.float64()),
        ("words", pa.int64()),
        ("words_per_second", pa.float64()),
        ("max_ngram_repeats", pa.int64()),
        ("max_token_run", pa.int64()),
        ("top_word_share", pa.float64()),
        ("max_word_chars", pa.int64()),
        ("unique_share", pa.float64()),
        ("longest_word_chars", pa.int64()),
        ("long_word_ratio", pa.float64()),
        ("hallucinated_phrase", pa.string()),
        ("agreement", pa.float64()),
        ("failed", pa.list_(pa.string())),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    # One row per input file.
    "recordings": pa.schema(
        _OUTCOME
        + [
            pa.field("source_path", pa.string(), nullable=False),
            pa.field("format", pa.string()),  # container as decoded, e.g. WAV, FLAC, MP3, mov,mp4,m4a
            pa.field("codec", pa.string()),  # e.g. PCM_16, VORBIS, aac
            pa.field("sample_rate", pa.int32()),
            pa.field("channels", pa.int32()),
            pa.field("duration", pa.float64()),
            pa.field("num_bytes", pa.int64()),
            pa.field("audio_path", pa.string()),  # 16 kHz mono analysis copy
        ]
    ),
    # One row per recording; speech spans in seconds.
    "vad": pa.schema(
        _OUTCOME
        + [
            pa.field("speech", pa.list_(SPAN)),
            pa.field("speech_duration", pa.float64()),
            pa.field("num_segments", pa.int32()),
        ]
    ),
    # One row per recording.
    "diarization": pa.schema(
        _OUTCOME
        + [
            pa.field("turns", pa.list_(TURN)),
            pa.field("exclusive_turns", pa.list_(TURN)),
            pa.field("overlaps", pa.list_(SPAN)),
            pa.field("num_speakers", pa.int32()),
            pa.field("speaker_durations", pa.list_(arrow_struct(SpeakerDuration))),
            pa.field("overlap_ratio", pa.float64()),
        ]
    ),
    # One row per recording: the speaker-attributed transcript.
    "asr": pa.schema(
        _OUTCOME
        + [
            pa.field("language", pa.string()),
            pa.field("language_probability", pa.float64()),
            pa.field("utterances", pa.list_(UTTERANCE)),
        ]
    ),
    # One row per recording.
    "classification": pa.schema(
        _OUTCOME
        + [
            pa.field("is_dialogue", pa.bool_()),
            pa.field("dialogue_score", pa.float64()),
            pa.field("backend", pa.string()),
            pa.field("model", pa.string()),
            pa.field("prompt_version", pa.string()),
            pa.field("answer", pa.string()),
        ]
    ),
    # One row per dialogue segment (<= 30 s) of a recording.
    "segments": pa.schema(_fields(Segment, ("segment_id", "recording_id", "start", "end", "status"))),
    # One row per segment: rule verdicts and the metrics behind them.
    "rules": pa.schema(
        [
            pa.field("segment_id", pa.string(), nullable=False),
            pa.field("recording_id", pa.string(), nullable=False),
            pa.field("start", pa.float64(), nullable=False),
            pa.field("end", pa.float64(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("reason", pa.string()),
            pa.field("metrics", RULE_METRICS),  # every rule metric
        ]
    ),
    # One row per segment scored by DNSMOS P.835.
    "quality": pa.schema(
        [
            pa.field("segment_id", pa.string(), nullable=False),
            pa.field("recording_id", pa.string(), nullable=False),
            pa.field("start", pa.float64(), nullable=False),
            pa.field("end", pa.float64(), nullable=False),
            pa.field("dnsmos_ovrl", pa.float64()),
            pa.field("dnsmos_sig", pa.float64()),
            pa.field("dnsmos_bak", pa.float64()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("reason", pa.string()),
        ]
    ),
    # One row per exported segment, with every metric gathered along the way.
    "export": pa.schema(
        [
            pa.field("segment_id", pa.string(), nullable=False),
            pa.field("recording_id", pa.string(), nullable=False),
            pa.field("source_path", pa.string()),
            pa.field("start", pa.float64(), nullable=False),
            pa.field("end", pa.float64(), nullable=False),
            pa.field("duration", pa.float64()),
            pa.field("language", pa.string()),
            pa.field("text", pa.string()),
            pa.field("num_turns", pa.int32()),
            pa.field("turns", pa.list_(SEGMENT_TURN)),
            pa.field("path", pa.string()),  # relative to the export root
            pa.field("audio_key", pa.string()),  # names the encoded audio: equal keys, identical files
            pa.field("agreement", pa.float64()),
            pa.field("dnsmos_ovrl", pa.float64()),
            pa.field("dnsmos_sig", pa.float64()),
            pa.field("dnsmos_bak", pa.float64()),
            pa.field("metrics", RULE_METRICS),
            pa.field("status", pa.string(), nullable=False),
            pa.field("reason", pa.string()),
        ]
    ),
    # One row per input file: where it left the pipeline and why.
    "ledger": pa.schema(
        [
            pa.field("source_path", pa.string(), nullable=False),
            pa.field("recording_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("stage", pa.string()),
            pa.field("reason", pa.string()),
            pa.field("duration", pa.float64()),
            pa.field("kept_segments", pa.int32()),
            pa.field("kept_duration", pa.float64()),
        ]
    ),
}

# Bump a schema's version when its meaning changes; readers refuse other versions.
VERSIONS: dict[str, int] = {name: 1 for name in SCHEMAS}
# 2: segment turns with spans, rule metrics as a struct (was a JSON string), export audio keys.
VERSIONS.update(segments=2, rules=2, export=2)

# Row key of each manifest (unique within a complete manifest).
KEYS: dict[str, tuple[str, ...]] = {
    name: ("segment_id",) if "segment_id" in schema.names else ("recording_id",)
    for name, schema in SCHEMAS.items()
}
KEYS["ledger"] = ("recording_id",)


def schema_for(name: str) -> pa.Schema:
    if name not in SCHEMAS:
        raise ManifestError(f"unknown manifest schema {name!r}; known: {sorted(SCHEMAS)}")
    meta = {SCHEMA_VERSION_KEY: json.dumps({"name": name, "version": VERSIONS[name]}).encode()}
    return SCHEMAS[name].with_metadata(meta)


def to_table(name: str, rows: list[dict], extra_metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """Rows (dicts) -> a table of exactly the schema ``name``; missing columns become nulls."""
    schema = schema_for(name)
    try:
        table = pa.Table.from_pylist(
            [{f: row.get(f) for f in schema.names} for row in rows], schema=schema
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ManifestError(f"rows do not fit the {name!r} schema: {e}") from e
    bad = set(table.column("status").to_pylist()) - set(
        LEDGER_STATUSES if name == "ledger" else STATUSES
    ) if "status" in schema.names else set()
    if bad:
        raise ManifestError(f"{name!r} rows have invalid status values {sorted(map(str, bad))}")
    if extra_metadata:
        table = table.replace_schema_metadata({**table.schema.metadata, **extra_metadata})
    return table


def validate(name: str, table: pa.Table, source: str = "<table>") -> pa.Table:
    """Check a table read from ``source`` against schema ``name``; return it cast to the schema."""
    meta = table.schema.metadata or {}
    raw = meta.get(SCHEMA_VERSION_KEY)
    if raw is None:
        raise ManifestError(f"{source}: not a manifest of this project (no schema metadata)")
    info = json.loads(raw)
    if info.get("name") != name:
        raise ManifestError(f"{source}: is a {info.get('name')!r} manifest, expected {name!r}")
    if info.get("version") != VERSIONS[name]:
        raise ManifestError(
            f"{source}: {name!r} schema version {info.get('version')}, this code reads version "
            f"{VERSIONS[name]}; re-run the stage into a new output directory"
        )
    expected = SCHEMAS[name]
    missing = [f for f in expected.names if f not in table.column_names]
    if missing:
        raise ManifestError(f"{source}: {name!r} manifest lacks columns {missing}")
    for field in expected:
        got = table.schema.field(field.name).type
        if got != field.type:
            raise ManifestError(
                f"{source}: column {field.name!r} has type {got}, expected {field.type}"
            )
    return table.select(expected.names).replace_schema_metadata(meta)


def write_table(table: pa.Table, path: Path) -> None:
    """Write atomically: a reader (or a resumed run) never sees a half-written file."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_manifest_file(name: str, path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise ManifestError(f"{path}: cannot read Parquet ({e})") from e
    return validate(name, table, str(path))


def read_manifest(output: str | Path, stage: str, schema: str | None = None) -> pa.Table:
    """All rows of a stage's manifest ``<output>/manifests/<stage>/*.parquet`` (``stage="ledger"``
    reads ``<output>/ledger.parquet``), validated, deduplicated by key (a row written twice, e.g.
    by a retried task, is kept once) and sorted by key. The schema is taken from the files'
    metadata unless ``schema`` names the one expected."""
    output = Path(output)
    if stage == "ledger":
        files = [output / "ledger.parquet"]
    else:
        files = sorted((output / "manifests" / stage).glob("*.parquet"))
    files = [f for f in files if f.exists()]
    if not files:
        raise ManifestError(f"{output}: no {stage!r} manifest (looked in {output / 'manifests' / stage})")
    name = schema or schema_name(files[0])
    tables = [read_manifest_file(name, f) for f in files]
    return dedupe(pa.concat_tables(tables), KEYS[name])


def read_stages(output: str | Path, columns: tuple[str, ...] = ("recording_id", "status", "reason")) -> pa.Table:
    """The ``columns`` every stage's manifest has (by default the verdicts), one table for all
    stages with the stage's name in a ``stage`` column, in pipeline order when the run recorded it.
    (A reader pointed at the whole ``manifests/`` folder would merge unrelated schemas: read one
    stage's folder, or this.)"""
    output = Path(output)
    try:
        order = [s["name"] for s in json.loads((output / "run_config.json").read_text())["stages"]]
    except (OSError, ValueError, KeyError):
        order = sorted(d.name for d in (output / "manifests").glob("*") if d.is_dir())
    tables = []
    for stage in order:
        t = read_manifest(output, stage)
        missing = [c for c in columns if c not in t.column_names]
        if missing:
            raise ManifestError(f"{output / 'manifests' / stage}: no columns {missing}")
        t = t.select(list(columns))
        tables.append(t.append_column("stage", pa.array([stage] * t.num_rows, pa.string())))
    if not tables:
        raise ManifestError(f"{output}: no manifests")
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def schema_name(path: Path) -> str:
    """The schema a manifest file declares in its metadata."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as e:
        raise ManifestError(f"{path}: cannot read Parquet ({e})") from e
    raw = meta.get(SCHEMA_VERSION_KEY)
    if raw is None:
        raise ManifestError(f"{path}: not a manifest of this project (no schema metadata)")
    return json.loads(raw).get("name", "?")


def dedupe(table: pa.Table, keys: tuple[str, ...]) -> pa.Table:
    """Keep the last row of each key, sorted by key."""
    if table.num_rows == 0:
        return table
    idx = pa.array(range(table.num_rows), pa.int64())
    t = table.append_column("__i", idx)
    last = t.group_by(list(keys)).aggregate([("__i", "max")]).column("__i_max")
    t = t.take(last).drop_columns(["__i"])
    return t.sort_by([(k, "ascending") for k in keys])
