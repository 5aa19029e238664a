"""Engine steps under a server's traffic: prefill interleaved with decode, bounded compiled shapes."""

from mlxbatch.engine import Engine, Request, SamplingParams


def _first_token_step(eng: Engine, key) -> int:
    """Steps until the row `key` has a token (it is then streamed)."""
    for n in range(1, 200):
        eng.step()
        if any(k == key and toks for k, toks, _ in eng.live()):
            return n
    raise AssertionError("no first token in 200 steps")


def test_short_request_first_token_within_bounded_steps_while_long_prompt_prefills(tiny):
    eng = Engine(tiny, max_batch=8, max_step_tokens=256)  # the server's CPU budget (is_interactive)
    long_prompt = tiny.tokenizer.encode("the lighthouse keeper counted ships " * 800)[:4000]
    eng.add(Request("long", long_prompt, SamplingParams(max_tokens=4)))
    eng.step()  # the long prompt's prefill has begun
    eng.add(Request("short", tiny.tokenizer.encode("Say hi."), SamplingParams(max_tokens=4)))
    # One step to start its unit and prefill it (before the long prompt's next chunk), one to read it.
    assert _first_token_step(eng, "short") <= 3
    assert any(k == "long" for k, _, _ in eng.live()) is False  # the long prompt is still prefilling
    assert eng.stats.step_max_prefill_tokens <= eng.max_step_tokens + 16


def _run(eng: Engine, batches: list) -> dict:
    """Add each group of requests, then step a few times: rows join and leave at every turn."""
    done = {}
    for group in batches:
        for r in group:
            eng.add(r)
        for _ in range(3):
            done.update({c.key: c.tokens for c in eng.step()})
    while eng.has_work:
        done.update({c.key: c.tokens for c in eng.step()})
    return done


def test_no_compiles_after_warm_up_as_batch_sizes_and_shared_prefix_units_change(tiny):
    tok = tiny.tokenizer
    system = "You are a careful assistant who answers in one short sentence. " * 6
    batches, i = [], 0
    for size in (1, 3, 2, 7, 5, 1, 11, 4):
        group = []
        for _ in range(size):
            shared = i % 2 == 0
            text = (system if shared else "") + f"question {i} " + "word " * (i % 7)
            group.append(Request(i, tok.encode(text), SamplingParams(max_tokens=3 + i % 9)))
            i += 1
        batches.append(group)
    eng = Engine(tiny, max_batch=16)
    assert eng.warm_up() >= 0
    traces = eng.stats.traces
    done = _run(eng, batches)
    assert len(done) == i
    assert eng.stats.traces == traces == 0, "a changing batch compiled new shapes after the warm-up"
    # The same rows one at a time (batch 1 after the warm-up): the same tokens.
    alone = Engine(tiny, max_batch=1)
    for group in batches:
        for r in group:
            assert _run(alone, [[Request(r.key, r.tokens, r.params)]])[r.key] == done[r.key]
