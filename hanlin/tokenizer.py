"""Text ↔ token ids: a `tokenizers.Tokenizer` with special tokens, chat templates and streaming decode.

Built from a Hugging Face directory (tokenizer.json + tokenizer_config.json) or from a GGUF file's
metadata (byte-level BPE only, split the way llama.cpp splits for the file's `tokenizer.ggml.pre`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from hanlin.chat_template import compile_chat_template
from hanlin.errors import ChatTemplateError, CheckpointError, UnsupportedModelError

# Tokens that end a turn or a document in the chat formats we know; they stop generation when the
# vocabulary has them as special tokens.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>",
    "<|end|>", "</s>", "<eos>", "<|eot|>", "<|END_OF_TURN_TOKEN|>", "<｜end▁of▁sentence｜>",
    "<|return|>", "<|call|>",
)

# Regexes from the models' own tokenizer.json files, as llama.cpp applies them for each pre-type.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    splits: tuple[str, ...]  # applied in order, each cutting the pieces of the previous one
    ignore_merges: bool = False  # a piece that is itself a token is not merged up from bytes
    add_bos_default: bool = False  # when the file has no tokenizer.ggml.add_bos_token


def _same(spec: PreTokenizerSpec, *names: str) -> dict[str, PreTokenizerSpec]:
    return dict.fromkeys(names, spec)


GGUF_PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **_same(PreTokenizerSpec((_GPT2_SPLIT,)), "gpt-2", "phi-2", "mpt", "olmo"),
    **_same(PreTokenizerSpec((r"\p{N}", _GPT2_SPLIT)),
            "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
    **_same(PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True, add_bos_default=True),
            "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"),
    **_same(PreTokenizerSpec((_LLAMA3_SPLIT,)), "dbrx", "smaug-bpe"),
    **_same(PreTokenizerSpec((_QWEN2_SPLIT,)), "qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"),
    **_same(PreTokenizerSpec((_GPT4O_SPLIT,)), "gpt-4o", "llama4"),
    "tekken": PreTokenizerSpec((_TEKKEN_SPLIT,), ignore_merges=True, add_bos_default=True),
}

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table: printable Latin-1 bytes stand for themselves."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    for shift, byte in enumerate(b for b in range(256) if b not in table):
        table[byte] = chr(256 + shift)
    return table


@functools.cache
def _byte_decoder() -> dict[str, int]:
    return {char: byte for byte, char in _byte_alphabet().items()}


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | dict[str, str] | None = None,
        extra_stop_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        named = {"default": chat_template} if isinstance(chat_template, str) else dict(chat_template or {})
        self.chat_templates: dict[str, str] = named
        self._vocab_size = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True))
        extra = set(extra_stop_token_ids)
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else min(extra, default=None)
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None
        self.special_token_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        turn_ends = {self.token_to_id(name) for name in END_OF_TURN_TOKENS} & self.special_token_ids
        self.stop_token_ids: set[int] = {i for i in (self.eos_token_id, *extra, *turn_ends) if i is not None}
        with_specials = backend.encode("", add_special_tokens=True).ids
        self.add_bos_token = self.bos_token_id is not None and with_specials[:1] == [self.bos_token_id]

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, directory: str | Path) -> Tokenizer:
        """A Hugging Face tokenizer directory: tokenizer.json, and optionally tokenizer_config.json,
        chat_template.jinja, additional_chat_templates/*.jinja and generation_config.json."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise CheckpointError(f"{directory}: no tokenizer.json (only fast tokenizers are supported)")
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = _read_json(directory / "tokenizer_config.json")
        specials = {name: _token_content(config.get(name)) for name in _SPECIAL_TOKEN_NAMES}
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values() if t])
        if "add_bos_token" in config or "add_eos_token" in config:  # as in transformers, they replace tokenizer.json's
            bos = specials["bos_token"] if config.get("add_bos_token") else None
            eos = specials["eos_token"] if config.get("add_eos_token") else None
            backend.post_processor = _special_tokens_processor(backend, bos, eos)
        generation = _read_json(directory / "generation_config.json").get("eos_token_id")
        eos_ids = generation if isinstance(generation, list) else [generation] if generation is not None else []
        return cls(backend, **specials, chat_template=_chat_templates(directory, config), extra_stop_token_ids=eos_ids)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file describes (see `read_gguf_metadata`)."""
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedModelError(
                f"GGUF tokenizer model {model!r} is not supported; Hanlin supports 'gpt2' (byte-level BPE)."
                " Load the model's Hugging Face directory (with tokenizer.json) instead"
            )
        pre = meta.get("tokenizer.ggml.pre") or "default"  # llama.cpp's choice when the key is missing
        spec = GGUF_PRE_TOKENIZERS.get(pre)
        if spec is None:
            supported = ", ".join(sorted(GGUF_PRE_TOKENIZERS))
            raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {supported}")
        backend, spelled = _gguf_byte_level_backend(meta, spec)

        def named(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return spelled[index] if index is not None and 0 <= index < len(spelled) else None

        specials = {"bos_token": named("bos_token_id"), "eos_token": named("eos_token_id"),
                    "pad_token": named("padding_token_id"), "unk_token": named("unknown_token_id")}
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values() if t])
        add_bos = meta.get("tokenizer.ggml.add_bos_token", spec.add_bos_default)
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        backend.post_processor = _special_tokens_processor(
            backend, specials["bos_token"] if add_bos else None, specials["eos_token"] if add_eos else None
        )
        templates = {key.removeprefix("tokenizer.chat_template."): value for key, value in meta.items()
                     if key.startswith("tokenizer.chat_template.")}
        if meta.get("tokenizer.chat_template"):
            templates["default"] = meta["tokenizer.chat_template"]
        stops = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(backend, **specials, chat_template=templates, extra_stop_token_ids=stops, vocab_size=len(spelled))

    def save(self, directory: str | Path) -> None:
        """Writes tokenizer.json and tokenizer_config.json, which transformers and `from_file` load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name in _SPECIAL_TOKEN_NAMES:
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        if list(self.chat_templates) == ["default"]:
            config["chat_template"] = self.chat_templates["default"]
        elif self.chat_templates:
            config["chat_template"] = [{"name": name, "template": t} for name, t in self.chat_templates.items()]
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a byte-level BPE token may hold part of a character)."""
        piece = self.id_to_token(token_id)
        if piece is not None and token_id not in self.special_token_ids and self._byte_level:
            byte_of = _byte_decoder()
            if all(c in byte_of for c in piece):
                return bytes(byte_of[c] for c in piece)
        return self.decode([token_id]).encode("utf-8")

    @functools.cached_property
    def _byte_level(self) -> bool:
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
        return "ByteLevel" in kinds

    # ---- text ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special tokens written in `text` (like `<|im_start|>`) become their single ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """Renders `messages` with the model's chat template the way transformers does."""
        template = (tools is not None and self.chat_templates.get("tool_use")) or self.chat_template
        if template is None:
            raise ChatTemplateError("this model has no chat template; pass plain text prompts instead")
        specials = {name: getattr(self, name) for name in _SPECIAL_TOKEN_NAMES if getattr(self, name) is not None}
        variables = {**specials, **extra}
        compiled = compile_chat_template(template)
        try:
            text = compiled.render(
                messages=messages, tools=tools, documents=variables.pop("documents", None),
                add_generation_prompt=add_generation_prompt, **variables,
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            raise ChatTemplateError(f"the chat template failed to render: {error}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


class StreamDecoder:
    """Incremental detokenizer: `push` returns the text completed by each new token and holds back
    the bytes of a character not yet complete; all pushes plus `flush()` equal `decode(all_ids)`.

    It decodes only a short window of recent tokens. The window always starts where the decoded text
    ended on a whole character, and keeps a few visible tokens before the new ones, so decoders that
    strip a leading space from the first token (SentencePiece) still see their context.
    """

    _CONTEXT_TOKENS = 4
    _SLIDE_AT = 16
    _MAX_WINDOW = 256  # even when most tokens are special tokens being skipped
    _MAX_PENDING = 64  # past this many incomplete tokens in a row, emit U+FFFD rather than grow forever

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._backend = tokenizer.backend
        self._skip_special_tokens = skip_special_tokens
        self._hidden = tokenizer.special_token_ids if skip_special_tokens else set()
        self._ids: list[int] = []
        self._clean = [0]  # window positions where the decoded text ended on a whole character
        self._emitted = 0  # characters of decode(self._ids) already returned

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        pending = len(text) - len(text.rstrip("\ufffd"))
        if pending and len(self._ids) - self._clean[-1] < self._MAX_PENDING:
            stable = len(text) - pending
        else:
            stable = len(text)
            self._clean.append(len(self._ids))
        new_text = text[self._emitted : stable]
        self._emitted = max(self._emitted, stable)
        if stable == len(text) and len(self._ids) >= self._SLIDE_AT:
            self._slide()
        return new_text

    def flush(self) -> str:
        """The held-back remainder (U+FFFD for an unfinished character)."""
        text = self._decode(self._ids)
        self._clean.append(len(self._ids))
        new_text, self._emitted = text[self._emitted :], len(text)
        return new_text

    def _slide(self) -> None:
        visible = [p for p, token_id in enumerate(self._ids) if token_id not in self._hidden]
        limit = visible[-self._CONTEXT_TOKENS] if len(visible) >= self._CONTEXT_TOKENS else 0
        limit = max(limit, len(self._ids) - self._MAX_WINDOW)
        keep_from = max(p for p in self._clean if p <= limit)
        if keep_from == 0:
            return
        self._ids = self._ids[keep_from:]
        self._clean = [p - keep_from for p in self._clean if p >= keep_from]
        self._emitted = len(self._decode(self._ids))


# ---- helpers ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable JSON: {error}") from None


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores a special token as a string or as a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_templates(directory: Path, config: dict[str, Any]) -> dict[str, str]:
    value = config.get("chat_template")
    if isinstance(value, list):
        templates = {entry["name"]: entry["template"] for entry in value}
    else:
        templates = {"default": value} if value else {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    for path in sorted((directory / "additional_chat_templates").glob("*.jinja")):
        templates[path.stem] = path.read_text(encoding="utf-8")
    return templates


def _special_tokens_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    first = [bos] if bos else []
    last = [eos] if eos else []
    single = [*(f"{t}:0" for t in first), "$A:0", *(f"{t}:0" for t in last)]
    pair = [*single, *(f"{t}:1" for t in first), "$B:1", *(f"{t}:1" for t in last)]
    used = {t: backend.token_to_id(t) for t in first + last}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(used.items()))


def _gguf_byte_level_backend(meta: dict[str, Any], spec: PreTokenizerSpec) -> tuple[tokenizers.Tokenizer, list[str]]:
    """The BPE model, pre-tokenizer and control tokens; also each id's spelling in the vocabulary."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.merges" not in meta:
        raise CheckpointError("GGUF byte-level tokenizer has no tokenizer.ggml.merges")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # Ordinary tokens are spelled in the byte alphabet, but a few writers store them as plain text.
    # Control and user-defined tokens keep their text: they are matched whole in the input.
    spelled = [
        token if kind in (_CONTROL, _USER_DEFINED) or letters.issuperset(token)
        else "".join(alphabet[byte] for byte in token.encode("utf-8"))
        for token, kind in zip(tokens, types)
    ]
    vocab: dict[str, int] = {}
    for index, token in enumerate(spelled):
        vocab.setdefault(token, index)
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    try:
        bpe = BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=spec.ignore_merges)
    except Exception as error:  # tokenizers raises its own exception type for merges outside the vocabulary
        raise CheckpointError(f"GGUF tokenizer is inconsistent: {error}") from None
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    kinds = list(zip(spelled, types))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in kinds if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in kinds if kind == _USER_DEFINED])
    return backend, spelled
