"""`mlxbatch status`: what an output folder holds, as text.

Owns: the status report. Counts rows through the journal's reader (output/journal.py), as a
resume does. Does not own: the commit protocol.
"""

from __future__ import annotations

from pathlib import Path

from mlxbatch.errors import InputFileError
from mlxbatch.output import journal
from mlxbatch.output.checkpoint import read_state
from mlxbatch.output.fs import lock_holder
from mlxbatch.output.manifest import MANIFEST
from mlxbatch.output.manifest import read as read_manifest
from mlxbatch.ui.stats import fmt_duration


def job_status(folder: Path) -> str:
    if not (folder / MANIFEST).exists():
        raise InputFileError(f"{folder}: not an mlxbatch output folder (no {MANIFEST})")
    manifest = read_manifest(folder)
    state = read_state(folder)  # {} when damaged: counters unknown, rows still come from the journal
    holder = lock_holder(folder)
    done = journal.read(folder).num_rows  # the journal, as a resume reads it, is the truth; the state may lag
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
    if "kv_peak_mb_last_run" in state:
        lines.insert(-1, f"kv cache:  {state.get('kv_format') or 'model dtype'}; last run peak "
                     f"{state['kv_peak_mb_last_run']:,.1f} MB held of a {state.get('kv_budget_mb_last_run', 0):,.0f} MB budget"
                     + (f"; {state['oom_retries']} out-of-memory retries" if state.get("oom_retries") else ""))
    if holder:
        lines.append(f"running:   pid {holder} holds this folder (a run is writing to it)")
    elif not complete:
        lines.append(f"resume:    mlxbatch run {manifest['input']['path']} --output {folder} "
                     "(with the same options as the first run)")
    return "\n".join(lines)
