"""The commit protocol: torn tails, garbage, and a property test of commit/crash/resume."""

import os

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxbatch.output.checkpoint import ERRORS, RESULTS, Checkpoint

MANIFEST = {"input": {"sha256": "x"}, "settings": {}}


def record(row: int) -> bytes:
    return orjson.dumps({"id": f"r{row}", "output": "o" * (row % 5)}) + b"\n"


def ids(folder):
    out = []
    for name in ("results.jsonl", "errors.jsonl"):
        p = folder / name
        if p.exists():
            out += [orjson.loads(x)["id"] for x in p.read_bytes().splitlines()]
    return out


def test_commit_and_resume(tmp_path):
    cp = Checkpoint.open(tmp_path, MANIFEST)
    for r in range(5):
        cp.add(r, RESULTS if r % 2 else ERRORS, record(r))
    cp.commit()
    cp.add(5, RESULTS, record(5))  # never committed
    cp.close()
    cp = Checkpoint.open(tmp_path, MANIFEST)
    assert [cp.is_done(r) for r in range(6)] == [True] * 5 + [False]
    assert sorted(ids(tmp_path)) == [f"r{r}" for r in range(5)]


def test_torn_tail_every_offset(tmp_path):
    base = tmp_path / "base"
    cp = Checkpoint.open(base, MANIFEST)
    for r in range(4):
        cp.add(r, RESULTS, record(r))
        cp.commit()
    cp.close()
    data = (base / "results.jsonl").read_bytes()
    lines = data.splitlines(keepends=True)
    start = len(data) - len(lines[-1]) - len(lines[-2])
    for cut in range(start, len(data) + 1):
        folder = tmp_path / f"cut{cut}"
        folder.mkdir()
        for name in os.listdir(base):
            (folder / name).write_bytes((base / name).read_bytes())
        with open(folder / "results.jsonl", "r+b") as f:
            f.truncate(cut)
        cp = Checkpoint.open(folder, MANIFEST)
        kept = ids(folder)
        assert kept == [f"r{r}" for r in range(len(kept))]  # a clean prefix
        assert all(cp.is_done(r) == (r < len(kept)) for r in range(4))
        assert len(kept) == (4 if cut == len(data) else 3 if cut >= len(data) - len(lines[-1]) else 2)
        cp.close()


def test_garbage_and_zero_tails_are_dropped(tmp_path):
    for junk in (b"\x00" * 37, b'{"id": "half', b"garbage\n\xff\xfe\n"):
        folder = tmp_path / str(len(junk))
        cp = Checkpoint.open(folder, MANIFEST)
        cp.add(0, RESULTS, record(0))
        cp.commit()
        cp.close()
        for name in ("results.jsonl", "errors.jsonl", "done.idx"):
            with open(folder / name, "ab") as f:
                f.write(junk)
        cp = Checkpoint.open(folder, MANIFEST)
        assert ids(folder) == ["r0"] and cp.is_done(0) and not cp.is_done(1)
        cp.add(1, RESULTS, record(1))
        cp.commit()
        cp.close()
        assert ids(folder) == ["r0", "r1"]


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 4)),
    st.just(("commit",)),
    st.tuples(st.just("crash"), st.sampled_from(["clean", "torn", "garbage"]), st.integers(1, 60)),
), max_size=25)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_property_never_lost_never_duplicated(tmp_path_factory, steps):
    folder = tmp_path_factory.mktemp("prop")
    cp = Checkpoint.open(folder, MANIFEST)
    committed, queued, next_row = set(), [], 0
    for step in steps:
        if step[0] == "add":
            for _ in range(step[1]):
                row = next_row
                next_row += 1
                if not cp.is_done(row):
                    cp.add(row, RESULTS if row % 3 else ERRORS, record(row))
                    queued.append(row)
        elif step[0] == "commit":
            cp.commit()
            committed |= set(queued)
            queued = []
        else:
            pending = b"".join(record(r) for r in queued)
            cp.close()
            _crash(folder, step[1], step[2], pending)
            cp = Checkpoint.open(folder, MANIFEST)
            queued, next_row = [], 0  # a rerun starts from the top of the input
            on_disk = ids(folder)
            assert len(on_disk) == len(set(on_disk)), "duplicate record"
            assert committed <= {int(i[1:]) for i in on_disk}, "lost a committed record"
            committed = {int(i[1:]) for i in on_disk}
    cp.close()


def _crash(folder, kind, n, pending: bytes):
    """What a power cut can leave: part of an uncommitted write, or junk past the end."""
    if kind == "torn":
        with open(folder / "results.jsonl", "ab") as f:
            f.write(pending[:n])
        with open(folder / "done.idx", "ab") as f:
            f.write(os.urandom(n % 16))
    elif kind == "garbage":
        for name in ("results.jsonl", "errors.jsonl", "done.idx"):
            with open(folder / name, "ab") as f:
                f.write(os.urandom(n))
