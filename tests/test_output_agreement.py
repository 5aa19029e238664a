"""Resume, `status` and `export` agree on which rows a damaged output folder has committed.

All three read the folder through output/journal.py's one reader; each damage the journal tests
know is applied to a committed folder, then the three answers are compared.
"""

import os
import re
import shutil

import orjson
import pytest

from mlxbatch.errors import OutputError
from mlxbatch.output.checkpoint import ERRORS, RESULTS, Checkpoint
from mlxbatch.output.export import records_in_input_order
from mlxbatch.output.status import job_status

MANIFEST = {"input": {"path": "in.jsonl", "sha256": "x"}, "model": {"name": "m", "dtype": "fp32"}, "settings": {}}
NUM_ROWS = 40


def _committed_folder(folder):
    cp = Checkpoint.open(folder, MANIFEST)
    for batch in range(4):  # four commits: damage can land in any of them
        for row in range(batch * 10, batch * 10 + 10):
            fid = ERRORS if row % 7 == 3 else RESULTS
            cp.add(row, fid, orjson.dumps({"id": f"r{row}", "output": "x" * (row % 5)}) + b"\n")
        cp.commit({})
    cp.close()


def _torn_tail(folder):
    with open(folder / "results.jsonl", "ab") as f:
        f.write(b'{"id": "r99", "outp')  # a record cut by a crash, never journalled
    with open(folder / "done.idx", "ab") as f:
        f.write(b"\x01\x02\x03")  # part of an entry


def _nul_bytes(folder):
    path = folder / "results.jsonl"
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    data[at:at + 64] = bytes(64)  # a lost page: zeros where records were
    path.write_bytes(bytes(data))


def _truncated_records(folder):
    path = folder / "results.jsonl"
    path.write_bytes(path.read_bytes()[:-30])


def _bad_journal_entry(folder):
    path = folder / "done.idx"
    data = bytearray(path.read_bytes())
    data[20 * 20 + 5] ^= 0xFF  # the 21st entry's checksum fails: it and all after are junk
    path.write_bytes(bytes(data))


def _garbage_record(folder):
    path = folder / "errors.jsonl"
    data = bytearray(path.read_bytes())
    data[-2] = ord(",")  # the newest error record loses its closing brace: it no longer parses
    path.write_bytes(bytes(data))


DAMAGES = [_torn_tail, _nul_bytes, _truncated_records, _bad_journal_entry, _garbage_record]


def _status_rows(folder) -> int:
    return int(re.search(r"rows:\s+([\d,]+)", job_status(folder)).group(1).replace(",", ""))


def _export_ids(folder) -> set:
    return {r["id"] for r in records_in_input_order(folder)}


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_resume_status_and_export_agree_on_a_damaged_folder(tmp_path, damage):
    folder = tmp_path / "job"
    _committed_folder(folder)
    damage(folder)
    shown, exported = _status_rows(folder), _export_ids(folder)  # read-only: before the resume truncates
    cp = Checkpoint.open(folder, MANIFEST)
    kept = {f"r{row}" for row in range(NUM_ROWS) if cp.is_done(row)}
    cp.close()
    assert 0 < len(kept) < NUM_ROWS or damage is _torn_tail  # the damage cost rows (a torn tail costs none)
    assert shown == cp.num_done == len(kept)
    assert exported == kept
    assert _export_ids(folder) == kept and _status_rows(folder) == len(kept)  # and after the resume's truncation


@pytest.mark.parametrize("name", ["results.jsonl", "errors.jsonl", "done.idx"])
def test_a_symlinked_file_is_refused_by_resume_status_and_export(tmp_path, name):
    folder = tmp_path / "job"
    _committed_folder(folder)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(folder / name, elsewhere)
    os.symlink(elsewhere, folder / name)
    for read in (_status_rows, _export_ids, lambda f: Checkpoint.open(f, MANIFEST)):
        with pytest.raises(OutputError, match="symbolic link"):
            read(folder)
    assert (tmp_path / "elsewhere").read_bytes()  # the link's target is untouched
