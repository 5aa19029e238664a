"""`mlxbatch export`: a finished job's records -> train/valid files for finetuning.

Owns: reading results.jsonl of a job written with --output-format chat,
completions or text (or results, exported as completions when the input had
prompts), filtering (token-limit hits, exact duplicates), a seeded split, and
writing JSONL (and Parquet if asked) in the shapes mlx-lm's LoRA trainer and
TRL read; `--order input` streams the records in input-row order (the journal
sorted by row, records read by offset). Does not own: generating the records
(runner.py) or the journal (output/journal.py, whose reader gives the committed rows).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import orjson

from mlxbatch.errors import InputFileError, UsageError
from mlxbatch.output import fs, journal
from mlxbatch.output.fs import create_temp, io_error, publish
from mlxbatch.output.journal import FILES, JOURNAL, RESULTS, RESULTS_FILE

SHAPES = {"chat": ("messages",), "completions": ("prompt", "completion"), "text": ("text",)}
_BOOKKEEPING = ("finish_reason", "sample", "adapter", "reasoning")
REASONING = ("keep", "drop")
ORDERS = ("shuffled", "input")
SPLIT_NAMES = ("train", "valid", "test")


def _records(folder: Path):
    """Committed records only: a running (or killed) job's uncommitted tail is never read."""
    if not os.path.lexists(folder / RESULTS_FILE):  # a link is refused by the journal's reader
        raise InputFileError(f"{folder}: no {RESULTS_FILE} (is this a job output folder?)")
    for line in journal.read(folder).lines(RESULTS):
        yield orjson.loads(line)


def adapter_names(folder: Path) -> list[str]:
    """The adapters named in a job's records, in order of first appearance."""
    seen = {}
    for rec in _records(folder):
        if isinstance(rec.get("adapter"), str):
            seen.setdefault(rec["adapter"], None)
    return list(seen)


def _parse_split(split: str) -> list[float]:
    try:
        parts = [float(x) for x in split.split(",")]
    except ValueError:
        raise UsageError(f"--split must be fractions like 0.9,0.1, not {split!r}") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise UsageError(f"--split needs 1 to 3 fractions summing to 1, got {split!r}")
    return parts


def export(folder: Path, *, fmt: str, split: str, to: Path, drop_truncated: bool, dedupe: bool,
           seed: int = 0, parquet: bool = False, order: str = "shuffled", adapter: str | None = None,
           by_adapter: bool = False, reasoning: str = "keep") -> dict:
    """`adapter`: only the records that adapter made; `by_adapter`: one folder of splits per adapter;
    `reasoning`: keep a thinking model's reasoning in the training text, or drop it."""
    if by_adapter:
        names = adapter_names(folder)
        if not names:
            raise InputFileError(f"{folder}: no record names an adapter (was the job run with --adapter?)")
        return {name: export(folder, fmt=fmt, split=split, to=to / name, drop_truncated=drop_truncated,
                             dedupe=dedupe, seed=seed, parquet=parquet, order=order, adapter=name,
                             reasoning=reasoning)
                for name in names}
    if fmt not in (*SHAPES, "records"):
        raise UsageError(f"--format must be one of {', '.join(SHAPES)}, records")
    if reasoning not in REASONING:
        raise UsageError(f"--reasoning must be one of {', '.join(REASONING)}, not {reasoning!r}")
    if order not in ORDERS:
        raise UsageError(f"--order must be one of {', '.join(ORDERS)}, not {order!r}")
    fractions = _parse_split(split)
    dropped = {"truncated": 0, "duplicate": 0, "other_shape": 0}
    records = records_in_input_order(folder) if order == "input" else _records(folder)
    if adapter is not None:
        records = (r for r in records if r.get("adapter") == adapter)
    if fmt != "records":
        records = (_with_reasoning(r, reasoning == "keep") for r in records)
    kept = _kept(records, fmt, drop_truncated=drop_truncated, dedupe=dedupe, dropped=dropped)
    if order == "input":
        to.mkdir(parents=True, exist_ok=True)
        spool = to / ".export-spool.jsonl"  # streamed through a file: never all records in memory
        total = _spool(kept, spool)
    else:
        keep = list(kept)
        total = len(keep)
    if not total:
        raise InputFileError(f"{folder}: no {fmt!r} records to export (dropped: {dropped}); "
                             f"run the job with --output-format {fmt}")
    if order == "input":
        return _split_spool(spool, total, fractions, to, parquet) | {"dropped": dropped}
    random.Random(seed).shuffle(keep)
    return _write_splits(keep, fractions, to, parquet) | {"dropped": dropped}


def _with_reasoning(rec: dict, is_kept: bool) -> dict:
    """A record's reasoning where trainers read it (the assistant's reasoning_content, which thinking
    templates render; a completion's <think> block), or gone."""
    if isinstance(rec.get("messages"), list) and not is_kept:
        rec["messages"] = [{k: v for k, v in m.items() if k != "reasoning_content"} if isinstance(m, dict) else m
                           for m in rec["messages"]]
    if is_kept and isinstance(rec.get("reasoning"), str) and isinstance(rec.get("completion"), str):
        rec["completion"] = f"<think>\n{rec['reasoning']}\n</think>\n\n{rec['completion']}"
    return rec


def _kept(records, fmt: str, *, drop_truncated: bool, dedupe: bool, dropped: dict):
    """The records worth exporting, bookkeeping stripped; counts what it drops in `dropped`."""
    seen = set()
    for rec in records:
        if fmt == "records":  # every record as the job wrote it, errors included
            yield rec
            continue
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
        yield clean


# ------------------------------------------------------------ input order, streaming
def records_in_input_order(folder: Path):
    """Every committed record (results and errors) in input-row order, read by offset, streaming."""
    if not os.path.lexists(folder / JOURNAL):
        raise InputFileError(f"{folder}: no {JOURNAL} (is this a job output folder?)")
    view = journal.read(folder)
    files = [fs.open_read(folder / name) if end else None for name, end in zip(FILES, view.ends)]
    try:
        for fid, start, end in view.spans():
            files[fid].seek(start)
            for line in files[fid].read(end - start).splitlines():
                if line.strip():
                    yield orjson.loads(line)
    finally:
        for f in files:
            if f:
                f.close()


def _spool(records, path: Path) -> int:
    num = 0
    with open(path, "wb") as f:
        for rec in records:
            f.write(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
            num += 1
    if not num:
        path.unlink()
    return num


def _split_spool(spool: Path, total: int, fractions: list[float], to: Path, parquet: bool) -> dict:
    """The spooled records split contiguously, train first; the spool is removed."""
    counts = {}
    with open(spool, "rb") as f:
        for name, size in zip(SPLIT_NAMES, _sizes(total, fractions)):
            with open(to / f"{name}.jsonl", "wb") as out:
                for _ in range(size):
                    out.write(f.readline())
            if parquet and size:
                _jsonl_to_parquet(to / f"{name}.jsonl")
            counts[name] = size
    spool.unlink()
    return counts


def _sizes(total: int, fractions: list[float]) -> list[int]:
    sizes = [round(frac * total) for frac in fractions[:-1]]
    return [*sizes, total - sum(sizes)]


def _jsonl_to_parquet(path: Path) -> None:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    pq.write_table(pj.read_json(path), path.with_suffix(".parquet"))  # one split in Arrow memory


def _write_splits(records: list, fractions: list[float], to: Path, parquet: bool) -> dict:
    """Every split goes to a temporary first; renamed into place only once all are written (no torn file)."""
    names = SPLIT_NAMES[: len(fractions)]
    to.mkdir(parents=True, exist_ok=True)
    counts, start, ready = {}, 0, []
    try:
        for i, (name, frac) in enumerate(zip(names, fractions)):
            end = len(records) if i == len(names) - 1 else start + round(frac * len(records))
            part = records[start:end]
            start = end
            _write_temp(ready, to / f"{name}.jsonl", lambda f, p=part: f.write(
                b"".join(orjson.dumps(r) + b"\n" for r in p)))
            if parquet and part:
                _write_temp(ready, to / f"{name}.parquet", lambda f, p=part: _parquet(p, f))
            counts[name] = len(part)
        for tmp, dest, handle in ready:
            publish(tmp, dest, handle)
    except OSError as exc:
        raise io_error(f"writing {to}", exc) from exc
    finally:
        for tmp, _, handle in ready:
            handle.close()
            tmp.unlink(missing_ok=True)
    return counts


def _write_temp(ready: list, dest: Path, fill) -> None:
    tmp, handle = create_temp(dest)
    ready.append((tmp, dest, handle))  # listed first, so a failing `fill` still has its temporary removed
    fill(handle)


def _parquet(part: list, handle) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(part), handle)
