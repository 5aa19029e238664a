"""LoRA/DoRA adapters from mlx-lm: outputs equal mlx-lm's with the adapter, rows of several adapters in
one batch equal each adapter alone, jobs record them, bad adapters are refused with clear messages."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import orjson
import pytest
from adapter_files import write_adapter, write_model_dir
from conftest import cli, read_jsonl, write_jsonl
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate
from test_engine import run_engine

from mlxbatch import models
from mlxbatch.engine import Engine, Request, SamplingParams
from mlxbatch.engine.config import EngineConfig
from mlxbatch.engine.model_runner import ForwardOptions
from mlxbatch.engine.scheduler import Scheduler
from mlxbatch.errors import ModelError
from mlxbatch.models import adapters as adapter_files

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def base(tiny_dir):
    return models.load(str(tiny_dir), dtype="fp32")


@pytest.fixture(scope="module")
def random_adapters(tmp_path_factory, base):
    """Three adapters of different shapes: LoRA r4 on every linear layer, DoRA r8 on the last layer,
    LoRA r2 on q/v only (saved as a checkpoint file)."""
    root = tmp_path_factory.mktemp("adapters")
    a = write_adapter(root / "a", base.model, rank=4, seed=1)
    d = write_adapter(root / "d", base.model, rank=8, kind="dora", seed=2, num_layers=1)
    q = write_adapter(root / "q", base.model, rank=2, seed=3, keys=("self_attn.q_proj", "self_attn.v_proj"),
                      name="0000100_adapters.safetensors")
    return {"a": a, "d": d, "q": q / "0000100_adapters.safetensors"}


def prompts(tok, n: int = 16) -> list[list[int]]:
    doc = "The lighthouse keeper counted ships each night and wrote their names in a ledger. " * 3
    out = []
    for i in range(n):  # a third share a long document (a shared prefix), the rest vary in length
        text = doc + f"Question {i}: what did he count?" if i % 3 == 0 else f"Prompt {i} " + "more words " * (i % 5)
        out.append(tok.encode(text))
    return out


def mlx_lm_outputs(model_dir: Path, adapter_path: Path | None, token_lists, max_tokens: int = MAX_TOKENS):
    model, tok = mlx_lm_load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None)
    outs = [[r.token for r in stream_generate(model, tok, t, max_tokens=max_tokens)] for t in token_lists]
    return [o[:-1] if o and o[-1] in tok.eos_token_ids else o for o in outs]  # mlx-lm yields the EOS it stops at


def with_adapters(lm, pairs):
    opened = adapter_files.open_all(pairs)
    for a in opened:
        adapter_files.load_weights(a, lm.model)
    lm.adapters = opened
    return lm


def run(lm, requests, **kw):
    done, eng = run_engine(lm, requests, **kw)
    return {k: c.tokens for k, c in done.items()}, eng


def _options(**over):
    return replace(ForwardOptions.for_backend("cpu"), min_shared_tokens=8, **over)


# ------------------------------------------------------------ equal to mlx-lm
@pytest.mark.parametrize("which", ["a", "d", "q"])
def test_one_adapter_equals_mlx_lm(tiny_dir, random_adapters, which, tmp_path):
    path = random_adapters[which]
    if path.is_file():  # mlx-lm reads a folder: the checkpoint under the folder's weights name
        (tmp_path / "adapters.safetensors").write_bytes(path.read_bytes())
        (tmp_path / "adapter_config.json").write_bytes((path.parent / "adapter_config.json").read_bytes())
        ref_path = tmp_path
    else:
        ref_path = path
    lm = with_adapters(models.load(str(tiny_dir), dtype="fp32"), [(which, str(path))])
    toks = prompts(lm.tokenizer)
    want = mlx_lm_outputs(tiny_dir, ref_path, toks)
    base_out = mlx_lm_outputs(tiny_dir, None, toks[:4])
    assert any(w != b for w, b in zip(want, base_out)), "the adapter should change some outputs"
    for fuse in (True, False):  # folded into the weights, and applied per row
        done, eng = run(lm, [Request(i, t, SamplingParams(max_tokens=MAX_TOKENS)) for i, t in enumerate(toks)],
                        max_batch=5, prefill_chunk=16, options=_options(fuse_adapter=fuse))
        assert ("fused into the weights" in eng.stats.forward) == fuse
        assert eng.stats.prefix_hit_tokens > 0
        assert [done[i] for i in range(len(toks))] == want, (which, fuse)


MIXED = ["base", "a", "d", "q"]


def _mixed_rows(toks) -> list[tuple[int, int]]:
    """(prompt, adapter) pairs: every prompt under two or four of the adapters."""
    return [(i, k) for i in range(len(toks)) for k in range(len(MIXED)) if (i + k) % 2 == 0 or i % 3 == 0]


@pytest.fixture(scope="module")
def mixed_refs(tiny_dir, random_adapters, base):
    """What mlx-lm gives each (prompt, adapter) with that adapter alone."""
    toks = prompts(base.tokenizer, 12)
    rows = _mixed_rows(toks)
    want = {}
    for k, name in enumerate(MIXED):
        path = random_adapters.get(name)
        ref_dir = None if path is None else path if path.is_dir() else _as_folder(path)
        mine = [i for i, kk in rows if kk == k]
        want.update({(i, k): o for i, o in zip(mine, mlx_lm_outputs(tiny_dir, ref_dir, [toks[i] for i in mine]))})
    return toks, want


@pytest.mark.parametrize("layout", ["cpu", "cpu-uncompiled", "cuda", "mlx-lm-layers", "gather"])
def test_mixed_adapters_equal_each_alone(tiny_dir, random_adapters, mixed_refs, layout):
    """Three adapters and the base model in one batch (rows joining mid-decode, shared prefixes):
    each row gets what mlx-lm gives it with its adapter alone."""
    pairs = [("base", None)] + [(n, str(random_adapters[n])) for n in MIXED[1:]]
    opts = {"cpu": _options(), "cpu-uncompiled": _options(compiled_decode=False), "cuda": replace(ForwardOptions.for_backend("cuda"), min_shared_tokens=8),
            "mlx-lm-layers": _options(fused=False), "gather": _options(adapter_mode="gather")}[layout]
    lm = with_adapters(models.load(str(tiny_dir), dtype="fp32"), pairs)
    toks, want = mixed_refs
    reqs = [Request((i, k), toks[i], SamplingParams(max_tokens=MAX_TOKENS), adapter=k) for i, k in want]
    done, eng = run(lm, reqs, max_batch=6, prefill_chunk=16, options=opts)
    assert eng.stats.prefix_hit_tokens > 0
    assert "per row" in eng.stats.forward
    assert done == want, layout


def _as_folder(checkpoint: Path) -> Path:
    folder = checkpoint.parent / "as-folder"
    folder.mkdir(exist_ok=True)
    (folder / "adapters.safetensors").write_bytes(checkpoint.read_bytes())
    (folder / "adapter_config.json").write_bytes((checkpoint.parent / "adapter_config.json").read_bytes())
    return folder


def test_rows_share_a_prefix_only_with_their_adapter():
    s = Scheduler()
    tokens = list(range(100, 160))
    for adapter in (1, 0, 1, 2):  # the oldest (the anchor) of adapter 1
        s.add(Request(adapter, tokens + [adapter], SamplingParams(), adapter=adapter))
    units = []
    while len(s):
        units.append(s.next_unit(max_rows=8, max_prefill_tokens=10_000))
    for u in units:
        if u.prefix_len:
            assert len({r.adapter for r in u.requests}) == 1
    assert any(u.prefix_len == 60 and len(u.requests) == 2 for u in units)  # the two rows of adapter 1


def test_removing_a_waiting_row_with_an_adapter_takes_out_that_row_only():
    """remove() finds a row by the key add() sorted it under (tagged for adapters other than the first)."""
    s = Scheduler()
    tokens = list(range(100, 160))
    for key, adapter in (("a1", 1), ("b0", 0), ("c2", 2), ("d1", 1)):
        s.add(Request(key, tokens + [len(key)], SamplingParams(), adapter=adapter))
    assert s.remove("a1") and s.remove("c2") and not s.remove("a1")
    assert len(s._queues[0]._sorted) == len(s) == 2  # no entry left behind for a removed row
    taken = []
    while len(s):
        taken += [r.key for r in s.next_unit(max_rows=8, max_prefill_tokens=10_000).requests]
    assert sorted(taken) == ["b0", "d1"]


def test_dense_and_gather_agree(base, random_adapters):
    pairs = [("a", str(random_adapters["a"])), ("d", str(random_adapters["d"]))]
    lm = with_adapters(models.load(str(base.path), dtype="fp32"), pairs)
    toks = prompts(lm.tokenizer, 6)
    reqs = [Request((i, k), t, SamplingParams(max_tokens=6), adapter=k) for i, t in enumerate(toks) for k in (0, 1)]
    dense, _ = run(lm, reqs, options=_options(adapter_mode="dense"))
    gather, _ = run(lm, reqs, options=_options(adapter_mode="gather"))
    assert dense == gather


def test_detach_gives_the_base_model_back(base, random_adapters):
    lm = with_adapters(models.load(str(base.path), dtype="fp32"), [("a", str(random_adapters["a"]))])
    before = {k: v for k, v in _flat(lm.model).items()}
    eng = Engine(lm, options=_options())
    assert eng.runner.bank.is_fused
    eng.runner.close()
    after = _flat(lm.model)
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)


def _flat(model):
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


# ------------------------------------------------------------ jobs
def test_job_with_adapters_each_adapter_records_and_export(tiny_dir, random_adapters, tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Tell me about item {i}"} for i in range(4)]
    rows.append({"id": "pick", "prompt": "Only adapter a", "adapter": "a"})
    rows.append({"id": "bad", "prompt": "Unknown adapter", "adapter": "nope"})
    rows.append({"id": "two", "prompt": "Two samples each", "n": 2, "temperature": 0.9})
    rows.append({"id": "js", "prompt": "JSON please", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}})
    rows.append({"custom_id": "oa", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "d", "messages": [{"role": "user", "content": "hi"}]}})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = ["run", str(src), "-m", str(tiny_dir), "-o", str(out), "--max-tokens", "6", "-q", "--dtype", "fp32",
            "--ignore-eos", "--adapter", "base=none", "--adapter", f"a={random_adapters['a']}",
            "--adapter", f"d={random_adapters['d']}", "--each-adapter"]
    res = cli(*args)
    assert res.exit_code == 0, res.output
    recs = read_jsonl(out / "results.jsonl")
    by = {}
    for r in recs:
        by.setdefault(r.get("id") if "custom_id" not in r else r["custom_id"], []).append(r)
    assert [r["adapter"] for r in by["r0"]] == ["base", "a", "d"]
    assert [r["adapter"] for r in by["pick"]] == ["a"]
    assert [(r["adapter"], r["sample"]) for r in by["two"]] == [(n, s) for n in ("base", "a", "d") for s in (0, 1)]
    assert [r["adapter"] for r in by["js"]] == ["base", "a", "d"] and all("parsed" in r for r in by["js"])
    assert [r["response"]["body"]["model"] for r in by["oa"]] == ["d"]
    assert len({r["output"] for r in by["r1"]}) > 1, "adapters should change the output"
    errors = read_jsonl(out / "errors.jsonl")
    assert [e["error"]["code"] for e in errors] == ["invalid_field"]
    assert "'nope'" in errors[0]["error"]["message"] and "base, a, d" in errors[0]["error"]["message"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["name"] for a in manifest["adapters"]] == ["base", "a", "d"]
    assert manifest["adapters"][1]["sha256"] == models.sha256_file(random_adapters["a"] / "adapters.safetensors")
    # Each row under one adapter equals that adapter run alone (fused into the weights there).
    alone = tmp_path / "alone"
    res = cli("run", str(src), "-m", str(tiny_dir), "-o", str(alone), "--max-tokens", "6", "-q",
                                   "--dtype", "fp32", "--ignore-eos", "--adapter", f"d={random_adapters['d']}")
    alone_recs = {r["id"]: r for r in read_jsonl(alone / "results.jsonl") if "custom_id" not in r}
    assert all(r["adapter"] == "d" for r in alone_recs.values())
    for rid in ("r0", "r1", "r2", "r3", "js"):
        assert by[rid][2]["output"] == alone_recs[rid]["output"]
    assert [r["output"] for r in by["two"][4:]] == [r["output"] for r in read_jsonl(alone / "results.jsonl")
                                                    if r.get("id") == "two"]  # sampled: the same seeds
    res = cli("export", str(out), "--format", "records", "--by-adapter", "--to",
                                   str(tmp_path / "ex"), "--split", "1.0")
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "ex").iterdir()} == {"base", "a", "d"}
    assert len(read_jsonl(tmp_path / "ex" / "a" / "train.jsonl")) == 8  # r0-r3, pick, two (2 samples), js


def test_validate_checks_rows_adapter_names(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hi", "adapter": "step1"},
                                              {"id": "b", "prompt": "Hi", "adapter": "step2"}])
    res = cli("validate", src, "--adapter", "step1=none")
    assert res.exit_code == 1 and "'step2', no adapter of this job" in res.output and "step1'" not in res.output


def test_quantized_weights_keep_the_per_row_update(tiny_dir, random_adapters):
    """q8 weights: a lone adapter is not folded in (requantizing would change the rounding); mixed rows
    equal each adapter alone."""
    lm = with_adapters(models.load(str(tiny_dir), dtype="q8"), [("a", str(random_adapters["a"])),
                                                              ("d", str(random_adapters["d"]))])
    toks = prompts(lm.tokenizer, 4)
    mixed, eng = run(lm, [Request((i, k), t, SamplingParams(max_tokens=6), adapter=k)
                          for i, t in enumerate(toks) for k in (0, 1)], options=_options())
    assert "per row" in eng.stats.forward
    for k, name in enumerate(("a", "d")):
        alone_lm = with_adapters(models.load(str(tiny_dir), dtype="q8"), [(name, str(random_adapters[name]))])
        alone, eng = run(alone_lm, [Request((i, k), t, SamplingParams(max_tokens=6)) for i, t in enumerate(toks)],
                         options=_options())
        assert "per row" in eng.stats.forward
        assert all(mixed[(i, k)] == alone[(i, k)] for i in range(len(toks))), name


def test_resume_with_a_changed_adapter_is_refused(tiny_dir, base, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}])
    ad = write_adapter(tmp_path / "ad", base.model, seed=5)
    args = ["run", str(src), "-m", str(tiny_dir), "-o", str(tmp_path / "o"), "--max-tokens", "3", "-q",
            "--adapter", str(ad)]
    assert cli(*args).exit_code == 0
    write_adapter(tmp_path / "ad", base.model, seed=6)  # retrained: same path, other weights
    src.write_text(src.read_text() + json.dumps({"id": "b", "prompt": "More"}) + "\n")
    res = cli(*args)
    assert res.exit_code != 0 and "adapters" in res.output, res.output


def test_job_file_table_of_adapters(tmp_path, base):
    from mlxbatch.job.spec import build_spec

    write_adapter(tmp_path / "runs" / "a", base.model)
    (tmp_path / "job.toml").write_text('input = "in.jsonl"\neach_adapter = true\n[adapters]\n'
                                       'base = "none"\nstep = "runs/a"\n')
    spec = build_spec(tmp_path / "job.toml", {})
    assert spec.adapter == (("base", None), ("step", str(tmp_path / "runs" / "a")))
    assert spec.each_adapter


# ------------------------------------------------------------ bad input
def _cli_run(tmp_path, *extra):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}])
    return cli("run", src, "-o", tmp_path / "o", "-m", "random:tiny", "-q", *extra)


def test_not_an_adapter_folder_is_refused_before_the_model_loads(tmp_path, no_model):
    (tmp_path / "empty").mkdir()
    res = _cli_run(tmp_path, "--adapter", str(tmp_path / "empty"))
    assert res.exit_code == 1 and "not an mlx-lm adapter folder (no adapter_config.json" in res.output
    res = _cli_run(tmp_path, "--adapter", str(tmp_path / "missing"))
    assert "no such adapter folder or file" in res.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full"}))
    (tmp_path / "full" / "adapters.safetensors").write_bytes(b"")
    res = _cli_run(tmp_path, "--adapter", str(tmp_path / "full"))
    assert "fine_tune_type is \"full\"" in res.output and "adapter_config.json" in res.output
    res = _cli_run(tmp_path, "--each-adapter")
    assert res.exit_code == 2 and "--each-adapter needs adapters" in res.output
    res = _cli_run(tmp_path, "--adapter", "x=none", "--adapter", "x=none")
    assert res.exit_code == 2 and "twice" in res.output


def test_config_errors_name_the_file_and_key(tmp_path, base):
    ad = write_adapter(tmp_path / "ad", base.model)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["lora_parameters"] = {"rank": 4, "alpha": 16}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"adapter_config.json: lora_parameters.scale .*'scale', not 'alpha'"):
        adapter_files.open_adapter("x", ad)


def test_adapter_for_another_base_shape_is_refused(tmp_path, base):
    other = write_model_dir(tmp_path / "other", hidden_size=128, intermediate_size=256)  # hidden 128, not 64
    ad = write_adapter(tmp_path / "ad", models.load(str(other), dtype="fp32").model)
    opened = adapter_files.open_adapter("x", ad)
    with pytest.raises(ModelError, match=r"adapters.safetensors: model.layers.\d.\w+.\w+: the adapter is for a \d+ -> "
                                         r"\d+ layer, the model's is \d+ -> \d+ \(an adapter for another base model"):
        adapter_files.load_weights(opened, base.model)


def test_rank_and_target_the_engine_cannot_apply(tmp_path, base):
    ad = write_adapter(tmp_path / "ad", base.model, rank=4)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 8
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="rank 4, but adapter_config.json says lora_parameters.rank 8"):
        adapter_files.load_weights(adapter_files.open_adapter("x", ad), base.model)
    ad = write_adapter(tmp_path / "emb", base.model, rank=4)
    weights = mx.load(str(ad / "adapters.safetensors"))
    weights["model.embed_tokens.lora_a"] = mx.zeros((49152, 4))
    weights["model.embed_tokens.lora_b"] = mx.zeros((4, 64))
    mx.save_safetensors(str(ad / "adapters.safetensors"), weights)
    with pytest.raises(ModelError, match=r"model.embed_tokens: a Embedding; mlxbatch applies adapters to linear"):
        adapter_files.load_weights(adapter_files.open_adapter("x", ad), base.model)
    weights = {"model.layers.0.mlp.down_proj.lora_q": mx.zeros((2, 2))}
    mx.save_safetensors(str(ad / "adapters.safetensors"), weights)
    with pytest.raises(ModelError, match=r"key 'model.layers.0.mlp.down_proj.lora_q' is not a lora parameter"):
        adapter_files.load_weights(adapter_files.open_adapter("x", ad), base.model)


def test_checkpoint_file_without_config_and_folder_of_checkpoints(tmp_path, base):
    ad = write_adapter(tmp_path / "ad", base.model, name="0000200_adapters.safetensors")
    with pytest.raises(ModelError, match=r"no adapters.safetensors; checkpoints here: 0000200_adapters.safetensors"):
        adapter_files.open_adapter("x", ad)
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "0000300_adapters.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no adapter_config.json beside this checkpoint"):
        adapter_files.open_adapter("x", tmp_path / "lone" / "0000300_adapters.safetensors")
    opened = adapter_files.open_adapter("x", ad / "0000200_adapters.safetensors")
    assert opened.kind == "lora" and opened.rank == 4


# ------------------------------------------------------------ trained by the real mlx_lm.lora
@pytest.mark.slow
def test_adapter_trained_by_mlx_lm_lora_equals_mlx_lm_generate(tiny_dir, tmp_path):
    """Data written by `mlxbatch export`, a few iterations of `python -m mlx_lm lora --train`, then
    mlxbatch's greedy outputs equal mlx-lm's `generate` with that adapter_path (16 prompts, shared
    prefixes, rows joining mid-decode), for the final adapter and a --save-every checkpoint."""
    rows = [{"id": i, "prompt": f"Write a line about the number {i}."} for i in range(24)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    res = cli("run", str(src), "-m", str(tiny_dir), "-o", str(tmp_path / "gen"), "-q",
                                   "--max-tokens", "12", "--output-format", "chat", "--dtype", "fp32")
    assert res.exit_code == 0, res.output
    res = cli("export", str(tmp_path / "gen"), "--to", str(tmp_path / "data"))
    assert res.exit_code == 0, res.output
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", str(tiny_dir), "--data",
           str(tmp_path / "data"), "--iters", "4", "--batch-size", "2", "--num-layers", "-1", "--val-batches", "1",
           "--steps-per-eval", "100", "--save-every", "2", "--learning-rate", "5e-3",
           "--adapter-path", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    checkpoint = tmp_path / "runs" / "0000002_adapters.safetensors"
    assert checkpoint.is_file()
    lm = with_adapters(models.load(str(tiny_dir), dtype="fp32"),
                       [("final", str(tmp_path / "runs")), ("step2", str(checkpoint)), ("base", None)])
    toks = prompts(lm.tokenizer)
    want = {0: mlx_lm_outputs(tiny_dir, tmp_path / "runs", toks), 1: mlx_lm_outputs(tiny_dir, _as_folder(checkpoint), toks),
            2: mlx_lm_outputs(tiny_dir, None, toks)}
    assert want[0] != want[2], "the trained adapter should change some outputs"
    reqs = [Request((i, k), t, SamplingParams(max_tokens=MAX_TOKENS), adapter=k) for i, t in enumerate(toks) for k in want]
    done, eng = run(lm, reqs, max_batch=7, prefill_chunk=16, options=_options())
    assert eng.stats.prefix_hit_tokens > 0
    for k, outs in want.items():
        assert [done[(i, k)] for i in range(len(toks))] == outs, k


def test_worker_loads_the_jobs_adapters(tiny_dir, random_adapters):
    from mlxbatch.cluster.actor import Worker

    pairs = (("base", None), ("a", str(random_adapters["a"])))
    w = Worker(str(tiny_dir), dtype="fp32", ignore_eos=True, config=EngineConfig(max_batch=4, adapters=pairs))
    info = w.start()
    assert info["adapters_sha256"] == adapter_files.digest(adapter_files.open_all(pairs))
    toks = prompts(w.tokenizer, 3)
    done, _, _ = w.work([((i, 1), t, SamplingParams(max_tokens=MAX_TOKENS), 1) for i, t in enumerate(toks)], 60)
    want = mlx_lm_outputs(tiny_dir, random_adapters["a"], toks)
    assert [c.tokens for c in sorted(done, key=lambda c: c.key)] == want


def test_records_name_adapter_in_openai_lines_per_adapter():
    from mlxbatch.output.records import RecordMaker
    from mlxbatch.types import Completion, Item

    item = Item(0, 1, "x", "openai-chat", [1], SamplingParams(), 1, [{"role": "user", "content": "hi"}],
                custom_id="x", adapters=(0, 1))
    maker = RecordMaker(None, "m", None, ("base", "a"))
    lines = maker.records(item, [Completion("k", "one", [1], "stop", 1), Completion("k", "two", [2], "stop", 1)])
    recs = [orjson.loads(x) for x in lines.splitlines()]
    assert [r["response"]["body"]["model"] for r in recs] == ["base", "a"]
    assert [r["response"]["body"]["choices"][0]["message"]["content"] for r in recs] == ["one", "two"]
