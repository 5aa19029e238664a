"""manifest.json: what a job folder was started with, so a resume never mixes two jobs' results.

Owns: the manifest's format, writing it on a folder's first run, and refusing a resume whose
settings differ (the message lists each change). Does not own: which settings go in it
(runner.build_manifest, from JobSpec's resume settings).
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from mlxbatch.errors import ResumeError
from mlxbatch.output import fs

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mlxbatch-manifest v1"


def check(folder: Path, manifest: dict, *, data_files: tuple) -> None:
    """Write the manifest into a new folder, or check an existing one against it."""
    path = folder / MANIFEST
    if not os.path.lexists(path):
        if any(os.path.lexists(folder / f) for f in data_files):
            raise ResumeError(f"{folder} holds results but no manifest; use another folder or --restart")
        fs.write_atomic(path, orjson.dumps({"format": MANIFEST_FORMAT, **manifest}, option=orjson.OPT_INDENT_2))
        return
    old = read(folder)
    if old.get("format") != MANIFEST_FORMAT:
        raise ResumeError(f"{path}: format {old.get('format')!r} is not {MANIFEST_FORMAT!r}; use --restart")
    changes = describe_changes(old, {"format": MANIFEST_FORMAT, **manifest})
    if changes:
        raise ResumeError(f"{folder} was started by a different job, so resuming would mix results:\n  "
                          + "\n  ".join(changes) + "\nrerun with --restart to start over (deletes its results), "
                          "or choose another --output folder")


def read(folder: Path) -> dict:
    """The manifest as a dict, or a ResumeError that says how to get out (damaged, not an object, a link)."""
    path = folder / MANIFEST
    try:
        old = orjson.loads(fs.read_bytes(path))
    except orjson.JSONDecodeError as exc:
        raise ResumeError(f"{path} is damaged ({exc}); use --restart to start over") from exc
    if not isinstance(old, dict) or not isinstance(old.get("input"), dict):
        raise ResumeError(f"{path} is damaged (not a manifest object); use --restart to start over")
    return old


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_changes(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("path",):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
