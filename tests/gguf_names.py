"""llama.cpp's tensor names and Q/K row order, for tests that write GGUF files."""

from mlxbatch.models.gguf import arch as gguf_arch


def gguf_name(hf: str, arch: gguf_arch.Arch) -> str:
    """The GGUF name of a Hugging Face / mlx-lm parameter name."""
    inverse = {v: k for k, v in arch.layer_names.items()}
    top = {v: k for k, v in gguf_arch.TOP_NAMES.items()}
    base, _, suffix = hf.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{inverse[rest]}.{suffix}"
    return f"{top[base]}.{suffix}"


def permute(x, n_head):  # llama.cpp's Q/K row order (the inverse of gguf_arch.unpermute)
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
