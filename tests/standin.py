"""A stand-in engine with Engine's interface: answers instantly, for runner-only tests."""

from mlxbatch.engine import Completion, EngineStats


class EchoEngine:
    workers = ()

    def wait_started(self, while_waiting=lambda: False):
        pass

    def close(self):
        pass

    def __init__(self, lm, config=None):  # config: the job's EngineConfig
        self.max_batch = (config.max_batch if config else None) or 256
        self.stats = EngineStats(capacity=self.max_batch)
        self._queue = []

    def add(self, request):
        self._queue.append(request)
        self.stats.prompt_tokens += len(request.tokens)

    @property
    def num_waiting(self):
        return len(self._queue)

    @property
    def has_work(self):
        return bool(self._queue)

    def step(self):
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
        self.stats.generated_tokens += len(batch)
        return [Completion(r.key, f"echo {len(r.tokens)}", [1], "length", len(r.tokens)) for r in batch]
