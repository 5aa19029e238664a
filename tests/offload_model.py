"""A random model of a few hundred MB written as a safetensors folder (streaming reads from files)."""

import json
from pathlib import Path

# llama, untied, 24 layers of ~10 MB in float32 beside 100 MB of embeddings and head: 346 MB.
CONFIG = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 24, "intermediate_size": 3072,
          "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "vocab_size": 49152, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def write_model(dest: Path) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxbatch import models
    from mlxbatch.models import weights as weights_io

    dest.mkdir(parents=True, exist_ok=True)
    model_cls, args_cls = weights_io.model_classes(CONFIG)
    mx.random.seed(3)
    model = model_cls(args_cls.from_dict(CONFIG))
    flat = dict(tree_flatten(model.parameters()))
    flat["model.embed_tokens.weight"] = flat["model.embed_tokens.weight"] * 0.02  # as real models' init: the
    # layers then outweigh the token's own embedding, so outputs depend on the whole prompt
    for n in range(2):  # two shards, as a hub checkpoint has several
        part = {k: v for i, (k, v) in enumerate(sorted(flat.items())) if i % 2 == n}
        mx.save_safetensors(str(dest / f"model-{n + 1:05d}-of-00002.safetensors"), part)
    (dest / "config.json").write_text(json.dumps(CONFIG))
    tok = models.random_tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dest / f).write_bytes((tok / f).read_bytes())
    return dest
