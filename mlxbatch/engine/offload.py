"""Models larger than memory: the plan of what stays resident and what streams each step.

Owns: OffloadPlan, made once from the model's sizes (the always-resident part: embeddings, final
norm, head; each layer's bytes), the KV bytes a row needs and the memory cap: which layers stay
resident, which are read from the model's safetensors every forward pass, the KV budget, the rows
per block (decode runs them all through a layer before the next one is read; a prefill unit is a
block of rows) and the prefill tokens per pass; the expected step time from a measured read
bandwidth; and the engine settings the plan implies. Why the split: with the I/O as the bound a
step moves `streamed_bytes` whatever the batch, so tok/s ~ rows x bandwidth / streamed_bytes:
KV gets what the block of rows needs and every other byte keeps a layer resident.
Does not own: reading the weights (engine/streaming.py), loading the model (models/streamed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mlxbatch.errors import UsageError

STREAM_BUFFERS = 2  # one layer computing while the next is read (double buffering)
WORKSPACE_SHARE = 0.15  # of the cap, at most, for activations (prefill blocks, logits)
MIN_PREFILL_TOKENS = 64
STREAM_PREFILL_CHUNK = 2048  # columns per prefill pass: a prompt goes through each layer once


@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs of a model, in bytes of the dtype it runs in."""

    fixed_bytes: int  # embeddings, final norm, head: read every step, kept resident
    layer_bytes: tuple[int, ...]
    kv_bytes_per_token: int  # every layer's keys and values for one token of one row
    act_bytes_per_token: int  # activations one prefill token holds inside a layer
    logits_bytes_per_row: int  # a decoded row's logits and sampling temporaries

    @property
    def weight_bytes(self) -> int:
        return self.fixed_bytes + sum(self.layer_bytes)


@dataclass(frozen=True)
class OffloadPlan:
    cap_bytes: int
    sizes: ModelSizes
    streamed: tuple[int, ...]  # layers read from the files each pass; the others stay resident
    kv_bytes: int  # the KV budget
    max_batch: int  # rows per block
    prefill_tokens: int  # tokens per prefill pass (a unit of rows)
    workspace_bytes: int
    bandwidth: float | None = None  # measured bytes/s of the streamed reads (set after the probe)

    @property
    def is_streaming(self) -> bool:
        return bool(self.streamed)

    @property
    def streamed_bytes(self) -> int:
        """Bytes read per forward pass (a decode step, a prefill pass)."""
        return sum(self.sizes.layer_bytes[i] for i in self.streamed)

    @property
    def resident_bytes(self) -> int:
        return self.sizes.weight_bytes - self.streamed_bytes

    @property
    def buffer_bytes(self) -> int:
        return STREAM_BUFFERS * max((self.sizes.layer_bytes[i] for i in self.streamed), default=0)

    @property
    def resident_share(self) -> float:
        return self.resident_bytes / self.sizes.weight_bytes

    @property
    def expected_step_s(self) -> float | None:
        """The I/O bound of one pass: streamed bytes over the measured bandwidth."""
        return self.streamed_bytes / self.bandwidth if self.bandwidth and self.streamed else None

    def describe(self) -> str:
        s = self.sizes
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        if not self.streamed:
            return (f"offload: the model fits ({gb(s.weight_bytes)} of weights under a cap of {gb(self.cap_bytes)}): "
                    f"nothing streamed, KV budget {gb(self.kv_bytes)}")
        step = (f"; read at {self.bandwidth / 1e9:.2f} GB/s a step takes >= {self.expected_step_s * 1e3:.0f} ms, "
                f"so <= {self.max_batch / self.expected_step_s:,.0f} tok/s at {self.max_batch} rows") if self.bandwidth else ""
        return (f"offload: cap {self.cap_bytes / 1e9:g} GB; weights {gb(s.weight_bytes)}, resident {gb(self.resident_bytes)} "
                f"({100 * self.resident_share:.0f}%: head + {len(s.layer_bytes) - len(self.streamed)} of "
                f"{len(s.layer_bytes)} layers), streamed {gb(self.streamed_bytes)} per step ({len(self.streamed)} "
                f"layers, {STREAM_BUFFERS} buffers of {gb(self.buffer_bytes / STREAM_BUFFERS)}); KV budget "
                f"{gb(self.kv_bytes)}, blocks of {self.max_batch} rows, prefill {self.prefill_tokens:,} tokens a "
                f"pass, workspace {gb(self.workspace_bytes)}" + step)

    def with_bandwidth(self, bandwidth: float) -> OffloadPlan:
        return replace(self, bandwidth=bandwidth)

    # ------------------------------------------------------------ planning
    @classmethod
    def make(cls, sizes: ModelSizes, *, cap_bytes: int, row_tokens: int, max_batch: int,
             max_prefill_tokens: int, max_kv_bytes: int | None = None) -> OffloadPlan:
        """The plan for a cap: nothing streamed when weights, workspace and the KV fit; else the
        fewest streamed layers that leave KV for `max_batch` rows of `row_tokens` (or `max_kv_bytes`).
        A cap that cannot hold the resident part, two layer buffers and one row is a usage error."""
        max_batch, work, tokens = _workspace(sizes, cap_bytes, max_batch, max_prefill_tokens)
        row = sizes.kv_bytes_per_token * row_tokens
        want_kv = max_kv_bytes or row * max_batch
        free = cap_bytes - work - sizes.fixed_bytes
        if sum(sizes.layer_bytes) + want_kv <= free:
            return cls(cap_bytes, sizes, (), min(want_kv, free - sum(sizes.layer_bytes)) if max_kv_bytes
                       else free - sum(sizes.layer_bytes), max_batch, tokens, work)
        buffers = STREAM_BUFFERS * max(sizes.layer_bytes)
        if free - buffers < row:
            raise UsageError(_too_small(sizes, cap_bytes, work, buffers, row))
        kv = max(row, min(want_kv, free - buffers))
        # The block's rows are the workspace's; the KV budget admits as many as really fit (rows
        # shorter than `row_tokens` pack more).
        streamed = _streamed_layers(sizes.layer_bytes, free - buffers - kv)
        return cls(cap_bytes, sizes, streamed, kv, max_batch, tokens, work)

    def engine_settings(self, *, max_batch: int | None, max_kv_gb: float | None) -> dict:
        """What the engine takes from the plan (a user's own batch or KV setting, if smaller, wins)."""
        kv = self.kv_bytes if not max_kv_gb else min(self.kv_bytes, int(max_kv_gb * 1e9))
        out = {"max_kv_bytes": kv}
        if self.streamed:  # large blocks: each pass reads the streamed weights once for all its rows
            out.update(max_batch=min(max_batch or self.max_batch, self.max_batch),
                       max_prefill_tokens=self.prefill_tokens, prefill_chunk=STREAM_PREFILL_CHUNK)
        return out


def _workspace(sizes: ModelSizes, cap: int, rows: int, max_tokens: int) -> tuple[int, int, int]:
    """(rows per block, bytes set aside for activations, prefill tokens per pass) within the
    workspace share of the cap: half of it at most for the block's logits, the rest for prefill."""
    share = int(cap * WORKSPACE_SHARE)
    rows = max(1, min(rows, share // (2 * sizes.logits_bytes_per_row)))
    room = share - rows * sizes.logits_bytes_per_row
    tokens = max(MIN_PREFILL_TOKENS, min(max_tokens, room // max(1, sizes.act_bytes_per_token)))
    return rows, rows * sizes.logits_bytes_per_row + tokens * sizes.act_bytes_per_token, tokens


def _streamed_layers(layer_bytes: tuple, room: int) -> tuple[int, ...]:
    """Which layers to stream when `room` bytes hold resident layers: as many resident as fit,
    spread evenly, so the reader has a resident layer's compute to hide each read behind."""
    n = len(layer_bytes)
    resident = 0
    while resident < n and sum(sorted(layer_bytes)[: resident + 1]) <= room:
        resident += 1
    if resident == n:
        return ()
    keep = {round((k + 0.5) * n / resident - 0.5) for k in range(resident)} if resident else set()
    while sum(layer_bytes[i] for i in keep) > room:  # uneven sizes: drop the largest kept
        keep.discard(max(keep, key=lambda i: layer_bytes[i]))
    return tuple(i for i in range(n) if i not in keep)


def _too_small(sizes: ModelSizes, cap: int, work: int, buffers: int, row: int) -> str:
    need = sizes.fixed_bytes + work + buffers + row
    return (f"--max-memory-gb {cap / 1e9:g} is too small for this model: it needs at least {need / 1e9:.2f} GB "
            f"(embeddings and head {sizes.fixed_bytes / 1e9:.2f} GB resident, {buffers / 1e9:.2f} GB for two "
            f"streamed layers, one row's KV {row / 1e9:.3f} GB, activations {work / 1e9:.2f} GB)")
