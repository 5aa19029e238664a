"""`mlxbatch bench kv-quality`: what compressing the KV cache costs in quality, measured.

Owns: the measurement. Windows of a shipped text (mlxbatch/assets/kv_quality.txt) are read by
the engine's own model runner, one token a step over a cache filled by a prefill, so every
token is predicted from compressed keys/values exactly as in generation. For each KV format:
the mean per-token loss (negative log-likelihood of the text's next token, nats), its change
against the model-dtype cache, how often the top choice equals the model-dtype one
(teacher-forced, so one flip does not change what follows), and the greedy agreement of free
generation over the same windows (the share of positions whose token equals the uncompressed
run's, and the mean length of the identical start). Does not own: the cache (engine/kvquant.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx

from mlxbatch import models
from mlxbatch.engine import Engine, Request, SamplingParams
from mlxbatch.errors import UsageError

TEXT = Path(__file__).resolve().parent.parent / "assets" / "kv_quality.txt"
# (key bits, value bits); 16: the model dtype, the reference.
FORMATS = ((16, 16), (8, 8), (8, 4), (4, 4))


def _windows(tokens: list[int], rows: int, prompt: int, steps: int) -> list[list[int]]:
    span = prompt + steps + 1
    last = max(len(tokens) - span, 0)
    starts = [round(i * last / max(rows - 1, 1)) for i in range(rows)]
    return [tokens[s : s + span] for s in starts if len(tokens[s : s + span]) == span]


def _teacher_forced(eng: Engine, windows: list[list[int]], prompt: int) -> tuple[list[float], list[list[int]]]:
    """Per position: mean loss over the rows, and each row's top choice."""
    runner = eng.runner
    cache = runner.new_cache(len(windows))
    text = mx.array(windows, dtype=mx.int32)
    cache.layout.begin(mx.ones((len(windows), prompt - 1), dtype=mx.bool_))
    runner.forward_hidden(text[:, : prompt - 1], cache)
    losses, tops = [], []
    for t in range(prompt - 1, text.shape[1] - 1):
        cache.layout.begin(mx.ones((len(windows), 1), dtype=mx.bool_))
        logits = runner.forward_last(text[:, t : t + 1], cache).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(logp, text[:, t + 1 : t + 2], axis=-1)[:, 0]
        top = mx.argmax(logits, axis=-1)
        mx.eval(nll, top, *cache.arrays())
        losses.append(nll.mean().item())
        tops.append(top.tolist())
    return losses, tops


def _greedy(eng: Engine, windows: list[list[int]], prompt: int, steps: int) -> dict:
    for i, w in enumerate(windows):
        eng.add(Request(i, w[:prompt], SamplingParams(max_tokens=steps)))
    done = {}
    while eng.has_work:
        for c in eng.step():
            done[c.key] = c.tokens
    return done


def _agreement(a: dict, b: dict) -> tuple[float, float]:
    """Share of positions with the same token, and the mean length of the identical start."""
    same = total = prefix = 0
    for k, ref in a.items():
        out = b[k]
        total += len(ref)
        same += sum(x == y for x, y in zip(ref, out))
        n = next((i for i, (x, y) in enumerate(zip(ref, out)) if x != y), min(len(ref), len(out)))
        prefix += n
    return same / max(total, 1), prefix / max(len(a), 1)


def run_kv_quality(*, model: str, dtype: str = "auto", rows: int = 8, prompt: int = 64, steps: int = 256,
                   formats=FORMATS, as_json: bool = False) -> str:
    lm = models.load(model, dtype=dtype, ignore_eos=True)  # every run makes `steps` tokens
    windows = _windows(lm.tokenizer.encode(TEXT.read_text(encoding="utf-8")), rows, prompt, steps)
    results, ref = [], None
    for kbits, vbits in formats:
        kw = {} if kbits == 16 else dict(kv_bits=kbits, kv_value_bits=vbits)
        t = time.perf_counter()
        try:
            eng = Engine(lm, max_batch=len(windows), **kw)
        except UsageError:  # mixed bits on a model outside the fused llama path
            continue
        losses, tops = _teacher_forced(eng, windows, prompt)
        greedy = _greedy(Engine(lm, max_batch=len(windows), **kw), windows, prompt, steps)
        row = {"key_bits": kbits, "value_bits": vbits, "kv_format": eng.stats.kv_format or "model dtype",
               "bytes_per_token": eng.runner.kv_bytes_per_token(), "loss": sum(losses) / len(losses),
               "seconds": round(time.perf_counter() - t, 1)}
        if ref is None:
            ref = (row, tops, greedy)
        base, base_tops, base_greedy = ref
        flat = [x for step in tops for x in step]
        base_flat = [x for step in base_tops for x in step]
        share, start = _agreement(base_greedy, greedy)
        row.update(loss_delta=row["loss"] - base["loss"],
                   top1_agreement=sum(x == y for x, y in zip(flat, base_flat)) / len(flat),
                   greedy_agreement=share, greedy_identical_start=start,
                   kv_ratio=base["bytes_per_token"] / row["bytes_per_token"])
        results.append(row)
    summary = {"model": lm.name, "dtype": lm.dtype, "device": f"{models.backend()} {mx.default_device()}",
               "text": TEXT.name, "rows": len(windows), "prompt_tokens": prompt, "steps": steps,
               "versions": {"mlx": mx.__version__, "mlx_lm": __import__("mlx_lm").__version__}, "results": results}
    if as_json:
        return json.dumps(summary)
    lines = [f"kv-quality: {lm.name} ({lm.dtype}) on {summary['device']}, {len(windows)} windows of {TEXT.name}, "
             f"{prompt} prompt tokens, {steps} tokens each",
             f"{'KV':38s} {'x less':>7s} {'loss':>8s} {'delta':>8s} {'top-1 same':>11s} {'greedy same':>12s} {'same start':>11s}"]
    for r in results:
        lines.append(f"{r['kv_format']:38s} {r['kv_ratio']:>6.2f}x {r['loss']:>8.4f} {r['loss_delta']:>+8.4f} "
                     f"{100 * r['top1_agreement']:>10.1f}% {100 * r['greedy_agreement']:>11.1f}% "
                     f"{r['greedy_identical_start']:>11.1f}")
    return "\n".join(lines)
