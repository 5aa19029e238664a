"""Settings: one rule set for options, job files and rows; help; resume; import graph; export order."""

import ast
import gc
import subprocess
import sys

import orjson
import pytest
import typer
from conftest import ROOT, cli, read_jsonl, write_jsonl
from typer.testing import CliRunner

from mlxbatch import models
from mlxbatch.cli import app
from mlxbatch.errors import UsageError
from mlxbatch.job.spec import RULES, SAMPLING_KEYS, JobSpec, build_spec
from mlxbatch.output.checkpoint import ERRORS, RESULTS, Checkpoint
from mlxbatch.types import SamplingParams

TINY = ["--model", "random:tiny", "--max-tokens", "3", "-q"]


# ------------------------------------------------------------ job-level values: exit 2, named, before loading
@pytest.mark.parametrize("args,name", [
    (["--max-tokens", "2000000"], "--max-tokens"),
    (["--temperature", "150"], "--temperature"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--top-k", "2000000000"], "--top-k"),
    (["--stop", ""], "--stop"),
    (["--top-p", "0"], "--top-p"),
    (["--n", "0"], "--n"),
    (["--top-logprobs", "21"], "--top-logprobs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--dtype", "fp64"], "--dtype"),
    (["--output-format", "xml"], "--output-format"),
    (["--id-field", ""], "--id-field"),
])
def test_bad_option_is_a_usage_error_before_the_model_loads(two_rows, tmp_path, no_model, args, name):
    res = cli("run", two_rows, "-o", tmp_path / "out", "--model", "random:tiny", "-q", *args)
    assert res.exit_code == 2, res.output
    assert f"error: {name} must be" in res.output
    assert not (tmp_path / "out").exists()  # the folder is not bound to the bad settings


@pytest.mark.parametrize("line,key", [
    ("stop = 5", "stop"),
    ("keep_fields = 5", "keep_fields"),
    ("batch_size = 1.5", "batch_size"),
    ('seed = "x"', "seed"),
    ("n = 2.0", "n"),
    ("system = 5", "system"),
    ("max_tokens = 2000000", "max_tokens"),
    ('stop = ["ok", ""]', "stop"),
])
def test_bad_job_file_value_is_a_usage_error(two_rows, tmp_path, no_model, line, key):
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{two_rows.name}"\nmodel = "random:tiny"\n{line}\n')
    res = cli("run", "--job", job, "-q")
    assert res.exit_code == 2, res.output
    assert f"job.toml: {key} must be" in res.output


def test_validate_checks_the_job_file_with_the_same_rules(two_rows, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("temperature = 150\n")
    res = cli("validate", two_rows, "--job", job)
    assert res.exit_code == 2 and "job.toml: temperature must be a number in [0, 100]" in res.output


def test_row_values_stay_error_records_with_line_and_field(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "ok", "prompt": "x", "max_tokens": 5, "temperature": None},  # null: the job's value
        {"id": "big", "prompt": "x", "max_tokens": 2000000},
        {"id": "hot", "prompt": "x", "temperature": 150},
        {"id": "stop", "prompt": "x", "stop": [""]},
        {"id": "k", "prompt": "x", "top_k": 2000000000},
        {"id": "lp", "prompt": "x", "logprobs": "yes"},
    ])
    res = cli("validate", src)
    assert res.exit_code == 1
    assert "5 with problems" in res.output
    assert "in.jsonl:2: [invalid_field] line 2: field 'max_tokens' must be an integer in [1, 1000000]" in res.output
    assert "line 3: field 'temperature' must be a number in [0, 100]" in res.output
    assert "line 4: field 'stop' must be" in res.output and "line 5: field 'top_k'" in res.output
    assert "line 6: field 'logprobs' must be true or false" in res.output


def test_one_rule_table_covers_every_key():
    spec_keys = {f for f in JobSpec.__dataclass_fields__ if f != "sampling"}
    assert set(RULES) == spec_keys | set(SAMPLING_KEYS) | {"logprobs", "top_logprobs"}
    assert set(SAMPLING_KEYS) | {"logprobs", "constraint"} == set(SamplingParams.__dataclass_fields__)


def test_job_file_stays_flat_and_options_override_it(two_rows, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{two_rows.name}"\nmax_tokens = 7\ntemperature = 0.5\nstop = "END"\n'
                   'keep_fields = "a,b"\nlogprobs = true\ntop_logprobs = 3\n')
    spec = build_spec(job, {"temperature": 0.25})
    assert spec.input == two_rows.resolve()
    assert spec.sampling == SamplingParams(max_tokens=7, temperature=0.25, stop=("END",), logprobs=3)
    assert spec.keep_fields == ("a", "b")
    job.write_text("[sampling]\nmax_tokens = 7\n")  # the layout is flat: no tables
    with pytest.raises(UsageError, match="unknown key"):
        build_spec(job, {})


# ------------------------------------------------------------ resume
def test_resume_settings_are_derived_from_the_fields():
    settings = JobSpec(model="random:tiny").resume_settings()
    # constraint only when set: folders of jobs without one resume as before it existed
    assert set(SamplingParams.__dataclass_fields__) - {"constraint"} <= set(settings)
    assert {"system", "raw", "n", "keep_fields", "ignore_eos", "output_format"} <= set(settings)
    assert not {"input", "output", "batch_size", "max_kv_gb", "restart", "commit_seconds", "sampling"} & set(settings)


def test_explicit_ignore_eos_on_a_random_model_resumes(two_rows, tmp_path):
    out = tmp_path / "out"
    assert cli("run", two_rows, "-o", out, *TINY).exit_code == 0
    res = cli("run", two_rows, "-o", out, *TINY, "--ignore-eos")  # the default for random: models, typed
    assert res.exit_code == 0, res.output
    res = cli("run", two_rows, "-o", out, *TINY, "--stop-at-eos")  # a real change is still refused
    assert res.exit_code == 1 and "ignore_eos: True -> False" in res.output


# ------------------------------------------------------------ help
def _run_command():
    return typer.main.get_command(app).commands["run"]


def test_run_help_has_text_and_defaults_for_every_option():
    params = {p.name: p for p in _run_command().params}
    missing = [name for name, p in params.items() if not getattr(p, "help", None) and name != "input"]
    assert missing == []
    assert all("%%" not in (p.help or "") for p in params.values())
    assert "40% of memory" in params["max_kv_gb"].help
    assert "256" in params["max_tokens"].help and "default: 0" in params["seed"].help
    res = CliRunner().invoke(app, ["run", "--help"], terminal_width=240)
    assert res.exit_code == 0 and "40%%" not in res.output and "40% of memory" in res.output


# ------------------------------------------------------------ no process-wide side effects
def test_random_preset_leaves_the_global_rng_alone():
    import mlx.core as mx

    mx.random.seed(7)
    expected = mx.random.uniform(shape=(4,)).tolist()
    mx.random.seed(7)
    lm = models.load("random:tiny", dtype="fp32")
    assert mx.random.uniform(shape=(4,)).tolist() == expected
    again = models.load("random:tiny", dtype="fp32")  # and the preset's weights are still fixed
    w = lambda m: m.model.parameters()["model"]["embed_tokens"]["weight"][:2, :4].tolist()  # noqa: E731
    assert w(lm) == w(again)


def test_run_job_does_not_freeze_the_collector_but_the_cli_does(two_rows, tmp_path, tiny, monkeypatch):
    from mlxbatch.runner import run_job

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(1))
    spec = JobSpec(input=two_rows, output=tmp_path / "lib", model="random:tiny",
                   sampling=SamplingParams(max_tokens=2)).validate()
    run_job(spec, lm=tiny)
    assert calls == []
    assert cli("run", two_rows, "-o", tmp_path / "cli", *TINY).exit_code == 0
    assert calls == [1]


# ------------------------------------------------------------ import graph
def _module_imports(path, name: str) -> set:
    """mlxbatch modules `name` imports anywhere (lazy ones too: still a layering edge), except for type checking."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for sub in ast.walk(tree):
        if id(sub) in typing_only:
            continue
        if isinstance(sub, ast.ImportFrom) and sub.level:
            base = package.rsplit(".", sub.level - 1)[0] if sub.level > 1 else package
            target = f"{base}.{sub.module}" if sub.module else base
            out |= {f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in sub.names}
        elif isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("mlxbatch"):
            out |= {f"{sub.module}.{a.name}" if _is_module(f"{sub.module}.{a.name}") else sub.module for a in sub.names}
        elif isinstance(sub, ast.Import):
            out |= {a.name for a in sub.names if a.name.startswith("mlxbatch")}
    return out


def _is_module(name: str) -> bool:
    rel = ROOT.joinpath(*name.split("."))
    return rel.with_suffix(".py").exists() or (rel / "__init__.py").exists()


def _graph() -> dict:
    graph = {}
    for path in sorted((ROOT / "mlxbatch").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = _module_imports(path, name)
    return graph


def test_no_import_cycle_in_mlxbatch():
    graph, state, cycles = _graph(), {}, []

    def visit(node, trail):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(trail[trail.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("module", ["mlxbatch.output.status", "mlxbatch.job.validate", "mlxbatch.job.source", "mlxbatch.job.spec", "mlxbatch.output.export"])
def test_read_only_commands_import_no_mlx(module):
    code = (f"import sys, {module}; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('mlx', 'mlx_lm', 'transformers', 'torch')]; print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------ export in input order
def _folder_out_of_order(folder, num_rows: int, pad: int = 0):
    """A committed output folder whose rows were finished in a scrambled order, some rows errors."""
    cp = Checkpoint.open(folder, {"input": {"path": "x"}, "settings": {}})
    order = sorted(range(num_rows), key=lambda i: (i * 7919) % num_rows)
    for row in order:
        if row % 5 == 3:
            cp.add(row, ERRORS, orjson.dumps({"id": f"r{row}", "line": row + 1, "error": {"code": "x"}}) + b"\n")
        else:  # two samples: two lines for one row
            cp.add(row, RESULTS, b"".join(orjson.dumps({"id": f"r{row}", "sample": s, "output": "y" * pad,
                                                        "finish_reason": "stop"}) + b"\n" for s in range(2)))
    cp.commit({})
    cp.close()
    return order


def test_export_order_input_streams_records_in_input_order(tmp_path):
    folder = tmp_path / "job"
    order = _folder_out_of_order(folder, 50)
    assert order != sorted(order)
    res = cli("export", folder, "--format", "records", "--order", "input", "--split", "1", "--to", tmp_path / "d")
    assert res.exit_code == 0, res.output
    recs = read_jsonl(tmp_path / "d" / "train.jsonl")
    expected = [(f"r{i}", s) for i in range(50) for s in ((None,) if i % 5 == 3 else (0, 1))]
    assert [(r["id"], r.get("sample")) for r in recs] == expected
    res = cli("export", folder, "--format", "text", "--order", "input", "--to", tmp_path / "e")
    assert res.exit_code == 1 and "no 'text' records" in res.output


def test_export_order_input_holds_the_index_not_the_records(tmp_path):
    import tracemalloc

    from mlxbatch.output.export import export

    folder = tmp_path / "job"
    _folder_out_of_order(folder, 3000, pad=2000)  # ~12 MB of records
    size = (folder / "results.jsonl").stat().st_size
    tracemalloc.start()
    info = export(folder, fmt="records", split="0.5,0.5", to=tmp_path / "d", drop_truncated=False,
                  dedupe=False, order="input")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info["train"] + info["valid"] == 3000 * 2 - 600
    assert peak < size / 4, (peak, size)
    first = read_jsonl(tmp_path / "d" / "valid.jsonl")[0]
    assert first["id"] == "r1500"  # contiguous split: valid starts where train ended
