"""Read-only reports: `status` of an output folder, `validate` of an input file.

Owns: text for those two commands. Does not own: the commit protocol
(checkpoint.py) or row rules (render.py; validate uses them without a model).
"""

from __future__ import annotations

from pathlib import Path


from . import source
from .checkpoint import MANIFEST, journal_rows, lock_holder, read_manifest, read_state
from .errors import InputFileError, RowError
from .job import JobSpec
from .ids import IdSet, written_id
from .render import Renderer, raw_id
from .stats import fmt_duration


def job_status(folder: Path) -> str:
    if not (folder / MANIFEST).exists():
        raise InputFileError(f"{folder}: not an mlxbatch output folder (no {MANIFEST})")
    manifest = read_manifest(folder)
    state = read_state(folder)  # {} when damaged: counters unknown, rows still come from the journal
    holder = lock_holder(folder)
    done = journal_rows(folder)  # the journal is the truth; the state file may lag
    total = state.get("rows_total", "?")
    complete = state.get("complete", False) and done == total
    secs = state.get("seconds", 0)
    lines = [
        f"folder:    {folder}",
        f"input:     {manifest['input']['path']}",
        f"model:     {manifest['model']['name']} ({manifest['model']['dtype']})",
        f"rows:      {done:,} / {total:,} done" if isinstance(total, int) else f"rows:      {done:,} done",
        f"errors:    {state.get('errors', 0):,} (see errors.jsonl)",
        f"tokens:    {state.get('generated_tokens', 0):,} generated, {state.get('prompt_tokens', 0):,} prompt",
        f"time:      {fmt_duration(secs)} over all runs, "
        f"{state.get('generated_tokens', 0) / secs if secs else 0:,.1f} gen tok/s overall",
        f"status:    {'complete' if complete else 'incomplete'}",
    ]
    if state.get("constrained"):
        lines.insert(-1, f"structured: {state['constrained']:,} constrained outputs, {state.get('constrained_truncated', 0):,} "
                     "cut off by max_tokens before they closed (parsed: null)")
    if holder:
        lines.append(f"running:   pid {holder} holds this folder (a run is writing to it)")
    elif not complete:
        lines.append(f"resume:    mlxbatch run {manifest['input']['path']} --output {folder} "
                     "(with the same options as the first run)")
    return "\n".join(lines)


def validate_input(spec: JobSpec, *, max_problems: int) -> tuple[str, int]:
    """Every row of `spec.input` through the same rules a run applies, except token counts."""
    path, id_field = spec.input, spec.id_field
    renderer = Renderer(spec, None, context_length=1 << 62)
    problems, shown, rows, seen = 0, [], 0, IdSet()
    for row in source.read_rows(path):
        rows += 1
        try:
            rid = written_id(row, id_field)  # as `run` does: ids compared as written, before other checks
            if rid is not None and not seen.add(rid):
                raise RowError("duplicate_id", f"line {row.line}: id {raw_id(row, id_field)!r} appeared earlier "
                               "in the input (ids are compared as written: 77 and \"77\" are one id)")
            if isinstance(err := renderer.render_many([row])[0], RowError):
                raise err
        except RowError as err:
            problems += 1
            if len(shown) < max_problems:
                shown.append(f"  {path}:{row.line}: [{err.code}] {err.message}")
    head = f"{path}: {rows:,} rows, {problems:,} with problems"
    more = [f"  ... and {problems - len(shown):,} more"] if problems > len(shown) else []
    return "\n".join([head, *shown, *more]), problems
