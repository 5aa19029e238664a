"""A model folder's tokenizer without transformers: `tokenizer.json` + chat template.

Owns: `Tokenizer` (the `tokenizers` library for encode/decode, the chat template through
Jinja's immutable sandbox with the globals and filters transformers gives templates, special
tokens and EOS ids as transformers + mlx-lm's TokenizerWrapper give them), the check of
which folders it reads exactly as transformers would, and the transformers fallback for the
others (logged, one line). Importing transformers costs ~2 s here and ~15 s where torch,
sympy and scikit-learn are installed (FINDINGS.md). Does not own: where a folder comes from
(models/__init__.py) or GGUF vocabularies (models/gguf/tokenizer.py writes tokenizer.json).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from functools import lru_cache
from pathlib import Path

# transformers classes that read tokenizer.json as it is (no per-class rebuild or pre-tokenizer patch).
PLAIN_CLASSES = {None, "PreTrainedTokenizerFast", "TokenizersBackend", "GPT2Tokenizer", "GPT2TokenizerFast",
                 "Qwen2Tokenizer", "Qwen2TokenizerFast"}
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_MISTRAL_TYPES = {"mistral", "mistral3", "voxtral", "ministral", "pixtral"}  # transformers patches their regex
# mlx-lm's TokenizerWrapper: a model "has thinking" when its vocabulary holds one of these.
_THINK_PAIRS = (("<think>", "</think>"), ("<longcat_think>", "</longcat_think>"),
                ("<|think:start|>", "<|think:end|>"), ("<|channel>", "<channel|>"))
_XTML = ("<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>")


class Tokenizer:
    """What the job needs of a tokenizer, with transformers' results for the folders `why_not_plain` accepts."""

    def __init__(self, backend, config: dict, *, eos_token_ids=(), chat_template: str | None = None,
                 path: Path | None = None):
        self.backend_tokenizer = backend
        self.path = path
        self.special_tokens_map = _special_tokens(config)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        _match_post_processor(backend, config, self.special_tokens_map)
        self.bos_token = self.special_tokens_map.get("bos_token")
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.bos_token_id = backend.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids = set(eos_token_ids) | ({self.eos_token_id} if self.eos_token_id is not None else set())
        self.has_thinking = _has_thinking(backend)
        self.chat_template = chat_template

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self._chat_template = value  # compiled on first use (cached per template text)
        self.has_chat_template = value is not None  # an attribute: mlx-lm's TokenizerWrapper sets it

    @property
    def vocab_size(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
        """Token ids of each text, encoded in parallel (what transformers' batch call does)."""
        return [e.ids for e in self.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str):
        return self.backend_tokenizer.token_to_id(token)

    def apply_chat_template(self, messages: list, *, add_generation_prompt: bool = False, tokenize: bool = True,
                            tools=None, documents=None, **kwargs):
        """transformers' `apply_chat_template` for one conversation (mlx-lm passes `enable_thinking`)."""
        kwargs.pop("return_dict", None)
        kwargs.setdefault("enable_thinking", self.has_thinking)
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers normalizes
        text = _compiled(self._chat_template).render(messages=_alias_reasoning(chat), tools=tools,
                                                     documents=documents, add_generation_prompt=add_generation_prompt,
                                                     **{**self.special_tokens_map, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def as_mlx_lm(self):
        """mlx-lm's own TokenizerWrapper for this folder (imports transformers): for mlx-lm's APIs only."""
        from mlx_lm.tokenizer_utils import load

        wrapper = load(self.path, eos_token_ids=sorted(self.eos_token_ids))
        wrapper.eos_token_ids = self.eos_token_ids
        return wrapper


class StreamingDecoder:
    """One stream's text, token by token, equal to a full decode of its tokens so far.

    Why: decoding all of a stream's tokens at every step is quadratic in its length. Each token
    decodes a short window (from the last two committed tokens); a character whose bytes are split
    over tokens (a trailing U+FFFD) waits for the rest, as TGI's and vLLM's incremental decoders do.
    """

    def __init__(self, tokenizer):
        self._decode = tokenizer.decode
        self.text = ""
        self._prefix = self._read = 0  # window start; end of the tokens already in `text`

    def add(self, tokens: list) -> str:
        """The new text `tokens` (all of the stream's tokens so far) add; '' while a character is split."""
        if len(tokens) <= self._read:
            return ""
        before = self._decode(tokens[self._prefix:self._read]) if self._read > self._prefix else ""
        after = self._decode(tokens[self._prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before) or not after.startswith(before):
            return ""
        new = after[len(before):]
        self._prefix, self._read = self._read, len(tokens)
        self.text += new
        return new

    def flush(self, tokens: list) -> str:
        """The rest at the stream's end, split characters included (as a full decode shows them)."""
        before = self._decode(tokens[self._prefix:self._read]) if self._read > self._prefix else ""
        after = self._decode(tokens[self._prefix:])
        new = after[len(before):] if after.startswith(before) else ""
        self._prefix = self._read = len(tokens)
        self.text += new
        return new


class TransformersTokenizer:
    """mlx-lm's TokenizerWrapper (transformers) behind the same interface, for folders only transformers reads."""

    def __init__(self, wrapper):
        self._wrapper = wrapper

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
        return [list(ids) for ids in self._wrapper._tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    def as_mlx_lm(self):
        return self._wrapper

    def __len__(self) -> int:
        return len(self._wrapper)

    def __getattr__(self, name):
        return getattr(self._wrapper, name)

    def __setattr__(self, name, value):
        if name == "_wrapper":
            object.__setattr__(self, name, value)
        else:
            setattr(self._wrapper, name, value)


def why_not_plain(path: Path, config: dict | None = None, defaults: dict | None = None) -> str | None:
    """None when `Tokenizer` reads this folder exactly as transformers + mlx-lm do, else why not."""
    if not (path / "tokenizer.json").exists():
        return "no tokenizer.json"
    tc = _read_json(path / "tokenizer_config.json")
    cls = tc.get("tokenizer_class")
    if cls not in PLAIN_CLASSES:
        return f"tokenizer_class {cls}"
    if (config or {}).get("model_type") in _MISTRAL_TYPES:
        return "a Mistral tokenizer (transformers patches its regex)"
    if "chat_template_type" in tc or defaults:
        return "mlx-lm's own chat template or tokenizer defaults for this model"
    if tc.get("clean_up_tokenization_spaces") and _model_kind(path) != "BPE":
        return "clean_up_tokenization_spaces on a non-BPE tokenizer"
    for key in ("add_prefix_space", "legacy", "split_special_tokens", "fix_mistral_regex"):
        if tc.get(key):
            return f"tokenizer_config.json sets {key}"
    return None


def load_plain(path: Path, *, eos_token_ids=None) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    config = _read_json(path / "tokenizer_config.json")
    backend = Backend.from_file(str(path / "tokenizer.json"))
    _add_declared_tokens(backend, config)
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    return Tokenizer(backend, config, eos_token_ids=eos_token_ids or (), chat_template=_chat_template(path, config),
                     path=path)


def load_transformers(path: Path, *, why: str, eos_token_ids=None) -> TransformersTokenizer:
    """The transformers path (mlx-lm's loader), for a folder `Tokenizer` cannot read exactly."""
    print(f"mlxbatch: loading the tokenizer through transformers ({why}); start-up is slower", file=sys.stderr)
    from mlx_lm.utils import load_tokenizer

    return TransformersTokenizer(load_tokenizer(path, None, eos_token_ids=eos_token_ids))


def load(path: Path, *, config: dict | None = None, defaults: dict | None = None, eos_token_ids=None):
    """The folder's tokenizer: `Tokenizer` where it is exact, else transformers (one log line says so).
    MLXBATCH_TOKENIZER=transformers forces the transformers path (how start-up was before, for comparisons)."""
    forced = os.environ.get("MLXBATCH_TOKENIZER") == "transformers"
    why = "MLXBATCH_TOKENIZER=transformers" if forced else why_not_plain(path, config, defaults)
    if why is None:
        return load_plain(path, eos_token_ids=eos_token_ids)
    return load_transformers(path, why=why, eos_token_ids=eos_token_ids)


# ---------------------------------------------------------------- what transformers does on load

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _model_kind(path: Path) -> str | None:
    return (_read_json(path / "tokenizer.json").get("model") or {}).get("type")


def _content(value) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict) -> dict:
    """transformers' `special_tokens_map`: the named special tokens as strings (what templates see)."""
    out = {}
    for name in SPECIAL_NAMES:
        if (value := _content(config.get(name))) is not None:
            out[name] = value
    return out


def _add_declared_tokens(backend, config: dict) -> None:
    """Tokens tokenizer_config.json declares that tokenizer.json lacks are added, special, as transformers does."""
    from tokenizers import AddedToken

    declared = [_content(t) for t in (config.get("added_tokens_decoder") or {}).values()]
    declared += [_content(config.get(n)) for n in SPECIAL_NAMES]
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    declared += [_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
    missing = [t for t in dict.fromkeys(declared) if t and backend.token_to_id(t) is None]  # no vocab dict: ~0.1 s
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _match_post_processor(backend, config: dict, specials: dict) -> None:
    """transformers rebuilds the post-processor when the config says add_bos/eos_token (or there is none)."""
    from tokenizers import processors

    if "add_bos_token" not in config and "add_eos_token" not in config and backend.post_processor is not None:
        return
    bos, eos = specials.get("bos_token"), specials.get("eos_token")
    add_bos = bool(config.get("add_bos_token")) and bos is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _chat_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json's; a named list gives its `default`."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template


def _has_thinking(backend) -> bool:
    def has(t):
        return backend.token_to_id(t) is not None

    return any(has(a) and has(b) for a, b in _THINK_PAIRS) or all(has(t) for t in _XTML)


def _alias_reasoning(chat: list) -> list:
    """transformers fills `reasoning_content` (and `thinking`, for gpt-oss templates) from older names."""
    out = []
    for m in chat:
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


# ---------------------------------------------------------------- the template sandbox

@lru_cache(maxsize=16)
def _compiled(template: str):
    """The template in Jinja's immutable sandbox, with transformers' settings, globals and filters."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks it for masks)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class(jinja2)
    return env.from_string(template)


class _TemplateDict:
    """`dict(...)` for templates without the class itself (no attribute escapes), as transformers gives."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _namespace_class(jinja2):
    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names (no way into CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    return TemplateNamespace
