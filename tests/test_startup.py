"""Start-up (issue 26): no transformers/torch on the run path, and the same prompts token for token."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxbatch import models, startup
from mlxbatch.job import source
from mlxbatch.job.render import Item, Renderer
from mlxbatch.job.spec import JobSpec
from mlxbatch.models import tokenizer as tokenizers
from tests.conftest import ROOT, read_jsonl, write_jsonl

SAMPLES = ["chat.jsonl", "prompts.jsonl", "openai_batch.jsonl", "documents.jsonl", "bad_rows.jsonl"]
MULTI_TURN = [
    {"id": "t1", "messages": [{"role": "user", "content": "Hi! What's 2+2?"},
                              {"role": "assistant", "content": "4."},
                              {"role": "user", "content": "And 12345 * 678?  Think step by step.\n\n"}]},
    {"id": "t2", "messages": [{"role": "system", "content": "Tu es concis. Réponds en français. 日本語も 🙂"},
                              {"role": "user", "content": "Quelle heure est-il ?"},
                              {"role": "assistant", "content": "  Je ne sais pas.  "},
                              {"role": "user", "content": "Text with <|im_end|> and <|im_start|> inside."}]},
    {"id": "t3", "prompt": "   leading spaces, tabs\tand\r\nnewlines 0123456789"},
]

# A sitecustomize that records (and refuses) any import of transformers or torch in the child process.
BLOCKER = '''
import importlib.abc, os, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "torch"):
            with open(os.environ["BLOCKED_LOG"], "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"blocked by the test: {name}")
        return None
sys.meta_path.insert(0, _Block())
'''


def _spec(tmp_path, path: Path) -> JobSpec:
    return JobSpec(input=path, output=tmp_path / "o", model="x").validate()


def _rendered(tmp_path, tok, path: Path) -> list:
    """(kind, tokens) or ("error", code) per row, as the job would give them to the engine."""
    renderer = Renderer(_spec(tmp_path, path), tok, 8192)
    out = renderer.render_many(list(source.read_rows(path)))
    return [(x.kind, x.tokens) if isinstance(x, Item) else ("error", x.code) for x in out]


def _inputs(tmp_path) -> list[Path]:
    return [ROOT / "sample_data" / s for s in SAMPLES] + [write_jsonl(tmp_path / "multi.jsonl", MULTI_TURN)]


def _folders():
    yield models.random_tokenizer_dir()
    folder = models.models_dir() / "smollm2-135m"
    if (folder / "tokenizer.json").exists():  # the embedded model, where it is cached
        yield folder


@pytest.mark.parametrize("which", ["random", "smollm2"])
def test_plain_tokenizer_renders_as_transformers_does(tmp_path, which):
    folders = dict(zip(["random", "smollm2"], _folders()))
    if which not in folders:
        pytest.skip("smollm2-135m is not in the cache")
    folder = folders[which]
    assert tokenizers.why_not_plain(folder) is None
    ours = tokenizers.load_plain(folder, eos_token_ids=2)
    theirs = tokenizers.load_transformers(folder, why="the test's reference", eos_token_ids=2)
    for path in _inputs(tmp_path):
        a, b = _rendered(tmp_path, ours, path), _rendered(tmp_path, theirs, path)
        assert a == b, path.name
        assert any(kind == "chat" for kind, _ in a) or path.name != "chat.jsonl"
    ids = [t for kind, toks in _rendered(tmp_path, ours, tmp_path / "multi.jsonl") if kind != "error" for t in toks]
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode([ids[0]]) == theirs.decode([ids[0]])
    assert ours.eos_token_ids == theirs.eos_token_ids and ours.eos_token_id == theirs.eos_token_id
    assert len(ours) == len(theirs) and ours.special_tokens_map == theirs.special_tokens_map
    assert ours.chat_template == theirs.chat_template
    assert ours.encode("Hello 123") == list(theirs.encode("Hello 123"))


def test_template_sandbox_has_transformers_globals():
    tok = tokenizers.load_plain(models.random_tokenizer_dir())
    tok.chat_template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                         "{{ ns.n }} {{ messages | tojson }} {{ bos_token }}{{ strftime_now('%Y') | length }}"
                         "{% if messages[0].content == 'bad' %}{{ raise_exception('no bad rows') }}{% endif %}")
    text = tok.apply_chat_template([{"role": "user", "content": "é<x>"}], tokenize=False)
    assert text == '1 [{"role": "user", "content": "é<x>"}] <|im_start|>4'  # tojson keeps non-ASCII and <>
    with pytest.raises(Exception, match="no bad rows"):
        tok.apply_chat_template([{"role": "user", "content": "bad"}], tokenize=False)
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception):  # the sandbox refuses dunder attributes
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_folder_without_tokenizer_json_falls_back_with_a_log_line(tmp_path, capsys):
    src = models.random_tokenizer_dir()
    (tmp_path / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())
    assert tokenizers.why_not_plain(tmp_path) == "no tokenizer.json"
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizer"}))
    assert tokenizers.why_not_plain(tmp_path) == "tokenizer_class LlamaTokenizer"
    tok = tokenizers.load(tmp_path)
    assert isinstance(tok, tokenizers.TransformersTokenizer)
    assert "through transformers (tokenizer_class LlamaTokenizer)" in capsys.readouterr().err
    assert tok.encode_batch(["Hi there"], add_special_tokens=False) == [list(tok.encode("Hi there", add_special_tokens=False))]


def _run_blocked(tmp_path, name: str, model: str, src: Path, *extra, env_extra=None) -> tuple[list, str, str]:
    """`mlxbatch run` in a child whose sitecustomize refuses transformers/torch: (records, blocked, stderr)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / f"{name}.blocked"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "BLOCKED_LOG": str(log), **(env_extra or {})}
    out = tmp_path / name
    res = subprocess.run([sys.executable, "-m", "mlxbatch", "run", str(src), "-m", model, "-o", str(out), "-q",
                          "--max-tokens", "6", "--stop-at-eos", "--profile-start", *extra],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    blocked = log.read_text() if log.exists() else ""
    return read_jsonl(out / "results.jsonl"), blocked, res.stderr


def _reference(tmp_path, name: str, model: str, src: Path) -> list:
    """The same job through the transformers tokenizer (today's path), in a child without the blocker."""
    out = tmp_path / name
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLXBATCH_TOKENIZER": "transformers"}
    res = subprocess.run([sys.executable, "-m", "mlxbatch", "run", str(src), "-m", model, "-o", str(out), "-q",
                          "--max-tokens", "6", "--stop-at-eos"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "through transformers" in res.stderr
    return read_jsonl(out / "results.jsonl")


def _essence(records: list) -> list:
    return sorted((r["id"], r.get("output"), r.get("usage"), r.get("finish_reason")) for r in records)


@pytest.mark.slow
def test_run_imports_neither_transformers_nor_torch(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", read_jsonl(ROOT / "sample_data" / "chat.jsonl")[:3] + MULTI_TURN)
    records, blocked, err = _run_blocked(tmp_path, "ours", "random:tiny", src)
    assert blocked == "", f"imported: {blocked}"
    assert len(records) == len(MULTI_TURN) + 3
    assert "start-up phase" in err and "tokenizer" in err and "second engine step" in err
    assert _essence(records) == _essence(_reference(tmp_path, "ref", "random:tiny", src))


@pytest.mark.slow
@pytest.mark.realmodel
def test_embedded_model_run_imports_no_transformers_and_matches(tmp_path):
    if not (models.models_dir() / "smollm2-135m" / "config.json").exists():
        pytest.skip("smollm2-135m is not in the cache")
    rows = read_jsonl(ROOT / "sample_data" / "chat.jsonl")[:4] + read_jsonl(ROOT / "sample_data" / "prompts.jsonl")[:2]
    src = write_jsonl(tmp_path / "in.jsonl", rows + MULTI_TURN[:2])
    records, blocked, _ = _run_blocked(tmp_path, "ours", "smollm2-135m", src)
    assert blocked == "", f"imported: {blocked}"
    assert _essence(records) == _essence(_reference(tmp_path, "ref", "smollm2-135m", src))


def test_read_only_commands_start_without_openblas_or_mlx():
    code = ("import sys, mlxbatch.cli; maps = open('/proc/self/maps').read() if sys.platform == 'linux' else ''; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'transformers', 'jinja2')]; "
            "print(heavy, 'openblas' in maps); sys.exit(1 if heavy or 'openblas' in maps else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_startup_table_lists_phases_in_order():
    startup.mark("a phase")
    text = startup.table(total=startup.elapsed() + 1)
    assert text.splitlines()[1].startswith("python start") and "a phase" in text and "rest of the job" in text
