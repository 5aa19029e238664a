"""GGUF tokenizers: llama.cpp's vocabulary metadata -> a `tokenizers.Tokenizer`.

Owns: BPE ("gpt2": byte-level, with llama.cpp's pre-tokenizer regexes) and
SentencePiece ("llama": merges by piece score, byte fallback) vocabularies,
their special tokens, and tokenizer_config.json (BOS/EOS, chat template).
Does not own: reading the file (models/gguf/__init__.py) or model weights.
"""

from __future__ import annotations

from mlxbatch.errors import ModelError

SUPPORTED_TOKENIZERS = ("gpt2", "llama")
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# llama.cpp's `tokenizer.ggml.pre` names -> the split regex it applies before byte-level BPE.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_REGEXES = {
    "llama-bpe": _LLAMA3_REGEX,
    "llama3": _LLAMA3_REGEX,
    "qwen2": _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"),
}
_GPT2_PRES = ("default", "gpt2", "smollm", None)

# Token types in `tokenizer.ggml.token_type` (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def build_tokenizer(md: dict):
    """A `tokenizers.Tokenizer` that encodes as llama.cpp does for this vocabulary."""
    kind = md.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _bpe_tokenizer(md)
    elif kind == "llama":
        tok = _spm_tokenizer(md)
    else:
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_TOKENIZERS)})")
    _add_specials(tok, md)
    _add_bos_processor(tok, md)
    return tok


def _tokens(md: dict) -> list[str]:
    if "tokenizer.ggml.tokens" not in md:
        raise ModelError("GGUF metadata lacks 'tokenizer.ggml.tokens' (no vocabulary in the file)")
    return md["tokenizer.ggml.tokens"]


def _bpe_tokenizer(md: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = _tokens(md)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    pre = md.get("tokenizer.ggml.pre")
    if pre in _PRE_REGEXES:
        steps = [pre_tokenizers.Split(Regex(_PRE_REGEXES[pre]), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    elif pre in _GPT2_PRES:
        # llama.cpp's "gpt2"/"smollm": GPT-2's regex; smollm splits every digit first.
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    else:
        known = sorted(set(_PRE_REGEXES) | {"default", "gpt2", "smollm"})
        raise ModelError(f"GGUF BPE pre-tokenizer {pre!r} is not supported (supported: {', '.join(known)})")
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece search: of the adjacent
    pairs whose concatenation is a normal piece, the highest-scoring merges first."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], left, right))
    ranked.sort()  # best score first; ties by piece id, then by split, so always the same order
    return [(left, right) for *_, left, right in ranked]


def _spm_tokenizer(md: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = _tokens(md)
    scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[md.get("tokenizer.ggml.unknown_token_id", 0)]
    tok = Tokenizer(models.BPE(vocab, spm_merges(tokens, scores, types), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    # Spaces become "▁"; llama.cpp prepends one to the text's start only when add_space_prefix.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, split=False,
                                                 prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_specials(tok, md: dict) -> None:
    """Control tokens are special (skipped on decode); user-defined ones match as whole
    pieces in raw text, as llama.cpp does before running the model's tokenizer."""
    from tokenizers import AddedToken

    tokens = _tokens(md)
    types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    tok.add_special_tokens(specials)
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if user:
        tok.add_tokens(user)


def _add_bos_processor(tok, md: dict) -> None:
    from tokenizers import processors

    if not md.get("tokenizer.ggml.add_bos_token", False) or "tokenizer.ggml.bos_token_id" not in md:
        return
    bos_id = md["tokenizer.ggml.bos_token_id"]
    bos = _tokens(md)[bos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])


def eos_token_ids(md: dict) -> list[int]:
    """EOS plus llama.cpp's end-of-turn tokens (EOT/EOM, or well-known names)."""
    tokens = _tokens(md)
    ids = [md.get("tokenizer.ggml.eos_token_id", 2)]
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in md:
            ids.append(md[key])
    types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    for i, t in enumerate(tokens):
        if t in ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>") and types[i] == CONTROL:
            ids.append(i)
    return sorted(set(ids), key=ids.index)


def tokenizer_config(md: dict, *, context_length: int) -> dict:
    tokens = _tokens(md)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[md.get("tokenizer.ggml.bos_token_id", 1)],
        "eos_token": tokens[md.get("tokenizer.ggml.eos_token_id", 2)],
        "unk_token": tokens[md.get("tokenizer.ggml.unknown_token_id", 0)],
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.ggml.padding_token_id" in md:
        config["pad_token"] = tokens[md["tokenizer.ggml.padding_token_id"]]
    if "tokenizer.chat_template" in md:
        config["chat_template"] = md["tokenizer.chat_template"]
    return config
