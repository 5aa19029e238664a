"""`mlxbatch validate`: every row of an input through the rules a run applies, without a model.

Owns: the problem list. Does not own: the row rules (job/render.py, job/ids.py).
"""

from __future__ import annotations

from mlxbatch.errors import RowError
from mlxbatch.job import source
from mlxbatch.job.ids import IdSet, written_id
from mlxbatch.job.render import Renderer, raw_id
from mlxbatch.job.spec import JobSpec


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
