"""`mlxbatch export`: a finished job's records -> train/valid files for finetuning.

Owns: reading results.jsonl of a job written with --output-format chat,
completions or text (or results, exported as completions when the input had
prompts), filtering (token-limit hits, exact duplicates), a seeded split, and
writing JSONL (and Parquet if asked) in the shapes mlx-lm's LoRA trainer and
TRL read. Does not own: generating the records (runner.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import orjson

from .errors import InputFileError, UsageError

SHAPES = {"chat": ("messages",), "completions": ("prompt", "completion"), "text": ("text",)}
_BOOKKEEPING = ("finish_reason", "sample")


def _records(folder: Path):
    path = folder / "results.jsonl"
    if not path.exists():
        raise InputFileError(f"{folder}: no results.jsonl (is this a job output folder?)")
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def _parse_split(split: str) -> list[float]:
    try:
        parts = [float(x) for x in split.split(",")]
    except ValueError:
        raise UsageError(f"--split must be fractions like 0.9,0.1, not {split!r}") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise UsageError(f"--split needs 1 to 3 fractions summing to 1, got {split!r}")
    return parts


def export(folder: Path, *, fmt: str, split: str, to: Path, drop_truncated: bool, dedupe: bool,
           seed: int = 0, parquet: bool = False) -> dict:
    if fmt not in SHAPES:
        raise UsageError(f"--format must be one of {', '.join(SHAPES)}")
    fractions = _parse_split(split)
    keep, seen, dropped = [], set(), {"truncated": 0, "duplicate": 0, "other_shape": 0}
    for rec in _records(folder):
        if not all(k in rec for k in SHAPES[fmt]):
            dropped["other_shape"] += 1
            continue
        if drop_truncated and rec.get("finish_reason") == "length":
            dropped["truncated"] += 1
            continue
        clean = {k: v for k, v in rec.items() if k not in _BOOKKEEPING}
        key = orjson.dumps({k: clean[k] for k in SHAPES[fmt]})
        if dedupe and key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        keep.append(clean)
    if not keep:
        raise InputFileError(f"{folder}: no {fmt!r} records to export (dropped: {dropped}); "
                             f"run the job with --output-format {fmt}")
    random.Random(seed).shuffle(keep)
    return _write_splits(keep, fractions, to, parquet) | {"dropped": dropped}


def _write_splits(records: list, fractions: list[float], to: Path, parquet: bool) -> dict:
    names = ["train", "valid", "test"][: len(fractions)]
    to.mkdir(parents=True, exist_ok=True)
    counts, start = {}, 0
    for i, (name, frac) in enumerate(zip(names, fractions)):
        end = len(records) if i == len(names) - 1 else start + round(frac * len(records))
        part = records[start:end]
        start = end
        (to / f"{name}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in part))
        if parquet and part:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(part), to / f"{name}.parquet")
        counts[name] = len(part)
    return counts
