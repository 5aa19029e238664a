"""`mlxbatch status`: what an output folder holds, as text.

Owns: the status report. Reads rows through the journal (output/checkpoint.py), the one truth
of what is committed. Does not own: the commit protocol.
"""

from __future__ import annotations

from pathlib import Path

from mlxbatch.errors import InputFileError
from mlxbatch.output.checkpoint import (
    MANIFEST,
    journal_rows,
    lock_holder,
    read_manifest,
    read_state,
)
from mlxbatch.ui.stats import fmt_duration


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
