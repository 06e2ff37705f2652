"""Exporting trained models: the HF directory loads in transformers and in Hanlin with identical logits, ships a
tokenizer transformers reads the same way, and is served by Hanlin's engine."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers
from typer.testing import CliRunner

import hanlin.api
from hanlin.config import ModelConfig, MoEConfig
from hanlin.errors import HanlinError
from hanlin.models import Transformer
from hanlin.tokenizer import Tokenizer
from hanlin.train.export import export_from_checkpoint, export_hf
from hanlin.train.init import init_weights

# transformers is the reference; imported where used, so the distributed workers (which import this module) skip it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
TOLERANCE = 1e-5

DENSE = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
MIXTRAL_LIKE = ModelConfig(
    vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
    moe=MoEConfig(num_experts=4, top_k=2, expert_dim=48, norm_topk_prob=True),
)  # fmt: skip
QWEN2_MOE_LIKE = ModelConfig(
    vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
    tie_embeddings=True,
    moe=MoEConfig(num_experts=8, top_k=2, expert_dim=32, shared_expert_dim=48, shared_expert_gate=True),
)  # fmt: skip


def word_tokenizer(vocab_size: int = VOCAB) -> Tokenizer:
    """Token i spells "<i>"; <1> ends a text."""
    backend = Backend(models.WordLevel(vocab={f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, eos_token="<1>")


def trained_like(config: ModelConfig, seed: int = 0) -> Transformer:
    """Fresh weights moved off their initial values a little, as training would (so norms matter)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    init_weights(model, std=0.1, seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def sample_ids(seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(model: torch.nn.Module, directory: Path, vocab: int = VOCAB) -> None:
    from transformers import AutoModelForCausalLM

    ids = sample_ids(vocab=vocab)
    expected = model(ids)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert (reference(input_ids=ids).logits - expected).abs().max().item() <= TOLERANCE
    loaded = hanlin.api.load(directory)
    assert (loaded.model(ids) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    "config, family", [(DENSE, "llama"), (MIXTRAL_LIKE, "mixtral"), (QWEN2_MOE_LIKE, "qwen2_moe")],
    ids=["dense", "mixtral-like", "qwen2-moe-like"],
)  # fmt: skip
def test_export_loads_in_transformers_and_hanlin_with_identical_logits(config, family, tmp_path: Path):
    model = trained_like(config)
    directory = export_hf(model, config, word_tokenizer(), tmp_path / "export")
    assert {p.name for p in directory.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
    }  # fmt: skip
    assert json.loads((directory / "config.json").read_text())["model_type"] == family
    assert json.loads((directory / "generation_config.json").read_text())["eos_token_id"] == 1
    assert_same_logits(model, directory)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "the temporary directory was left behind"


def test_wrapped_models_export_their_plain_weights(tmp_path: Path):
    """Activation-checkpoint wrappers and torch.compile add segments to the module names; LoRA adapters are
    folded into the weights they adapt."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from hanlin.models.transformer import Block
    from hanlin.train.lora import apply_lora

    model = trained_like(MIXTRAL_LIKE)
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.1)
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))
    compiled = torch.compile(model)  # a wrapper only: never run here
    assert any("_checkpoint_wrapped_module" in name for name, _ in compiled.named_modules())
    assert any(name.startswith("_orig_mod.") for name in compiled.state_dict())
    directory = export_hf(compiled, MIXTRAL_LIKE, word_tokenizer(), tmp_path / "export")
    assert_same_logits(model, directory)
    assert any(name.endswith("lora_A") for name, _ in model.named_parameters()), "export changed the model"


def test_reexport_replaces_an_earlier_export_and_refuses_other_directories(tmp_path: Path):
    first, second = trained_like(DENSE, seed=0), trained_like(DENSE, seed=1)
    directory = tmp_path / "export"
    export_hf(first, DENSE, word_tokenizer(), directory)
    export_hf(second, DENSE, word_tokenizer(), directory)
    assert_same_logits(second, directory)

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(HanlinError, match="not an exported model"):
        export_hf(first, DENSE, word_tokenizer(), precious)
    assert [p.name for p in precious.iterdir()] == ["todo.txt"]

    with pytest.raises(HanlinError, match="the tokenizer has 200 tokens but the model embeds only 128"):
        export_hf(first, DENSE, word_tokenizer(200), tmp_path / "other")
    assert not (tmp_path / "other").exists()


# ---- the embedded SmolLM2 tokenizer, serving -----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer, Transformer]:
    """A tiny model over SmolLM2's vocabulary, exported with SmolLM2's tokenizer (read from the embedded GGUF)."""
    from hanlin.train.data import load_tokenizer

    try:
        tokenizer, _ = load_tokenizer("smollm2")
    except HanlinError as error:
        pytest.skip(f"the embedded model is not installed: {error}")
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
        intermediate_size=64, tie_embeddings=True, max_position_embeddings=256,
    )  # fmt: skip
    model = trained_like(config)
    directory = export_hf(model, config, tokenizer, tmp_path_factory.mktemp("smollm2") / "export")
    return directory, tokenizer, model


TEXTS = [
    "Hello, world!",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "naïve café — 東京 🙂 1234567",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def test_smollm2_tokenizer_round_trips_through_transformers(smollm2_export):
    from transformers import AutoTokenizer

    directory, tokenizer, _ = smollm2_export
    reference = AutoTokenizer.from_pretrained(directory)
    reloaded = Tokenizer.from_file(directory)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert reference.encode(text, add_special_tokens=False) == ids, text
        assert reference.encode(text) == tokenizer.encode(text, add_special_tokens=True), text
        assert reloaded.encode(text) == ids, text
        assert reference.decode(ids) == tokenizer.decode(ids) == text
    assert reference.eos_token == tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Hi there"}]
    assert reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages)
    )
    generation = json.loads((directory / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert (eos if isinstance(eos, int) else eos[0]) == tokenizer.eos_token_id
    assert set([eos] if isinstance(eos, int) else eos) == tokenizer.stop_token_ids
    assert reloaded.stop_token_ids == tokenizer.stop_token_ids


def test_smollm2_sized_export_gives_identical_logits_and_is_served(smollm2_export):
    from hanlin.llm import LLM

    directory, tokenizer, model = smollm2_export
    assert_same_logits(model, directory, vocab=tokenizer.vocab_size)
    llm = LLM(model=str(directory), threads=1, kv_cache_mb=16, max_num_seqs=2)
    completion = llm.generate("Hello", max_tokens=5, temperature=0.0, ignore_eos=True)[0]
    assert len(completion.token_ids) == 5
    assert completion.text == tokenizer.decode(completion.token_ids)
    with torch.no_grad():  # greedy: the first token is the argmax of the model's own logits
        prompt = torch.tensor([tokenizer.encode("Hello")])
        assert completion.token_ids[0] == model(prompt)[0, -1].argmax().item()


# ---- training checkpoints and the CLI --------------------------------------------------------------------


def write_checkpoint(run_dir: Path, model: Transformer, config: ModelConfig, overrides: list[str]) -> Path:
    """A run directory with checkpoints/step-3, written by the trainer's own checkpoint code."""
    from hanlin.train.checkpoint import save_checkpoint
    from hanlin.train.config import load_config
    from hanlin.train.optim import build_optimizer, build_scheduler

    train_config = load_config(None, ["steps=3", *overrides])
    optimizer = build_optimizer(model, train_config, config)
    return save_checkpoint(run_dir, 3, model, optimizer, build_scheduler(optimizer, train_config), {}, train_config,
                           config)


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tokenizer"
    word_tokenizer().save(directory)
    return directory


def test_export_from_checkpoint_and_cli(tmp_path: Path, tokenizer_dir: Path):
    import typer

    from hanlin.cli_analysis import register

    model = trained_like(QWEN2_MOE_LIKE)
    step_dir = write_checkpoint(tmp_path / "run", model, QWEN2_MOE_LIKE, [f"tokenizer={tokenizer_dir}"])
    directory = export_from_checkpoint(tmp_path / "run", tmp_path / "from-run")
    assert_same_logits(model, directory)

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["export", str(step_dir), "--out", str(tmp_path / "cli"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "hanlin serve --model" in result.output
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["dtype"] == "bfloat16"
    assert hanlin.api.load(tmp_path / "cli").tokenizer.encode("<5> <7>") == [5, 7]

    with pytest.raises(HanlinError, match="not a training checkpoint"):
        export_from_checkpoint(tmp_path / "from-run", tmp_path / "again")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, HanlinError) and "no such directory" in str(result.exception)


def test_export_from_a_lora_checkpoint_merges_the_adapters(tmp_path: Path, tokenizer_dir: Path):
    from hanlin.train.lora import apply_lora

    model = trained_like(DENSE)
    torch.manual_seed(0)
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.1)
    overrides = [f"tokenizer={tokenizer_dir}", "sft.lora_rank=4", "sft.lora_alpha=8.0"]
    write_checkpoint(tmp_path / "run", model, DENSE, overrides)
    directory = export_from_checkpoint(tmp_path / "run", tmp_path / "export")
    assert_same_logits(model, directory)


# ---- DDP and FSDP2 (2 processes, gloo) -----------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from pathlib import Path
    torch.set_num_threads(1)
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from test_train_export import MIXTRAL_LIKE, trained_like, word_tokenizer
    from hanlin.train.export import export_hf
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    export_hf(DistributedDataParallel(trained_like(MIXTRAL_LIKE)), MIXTRAL_LIKE, word_tokenizer(), out / "ddp")
    sharded = trained_like(MIXTRAL_LIKE)
    for block in sharded.layers:
        fully_shard(block)
    fully_shard(sharded)
    assert export_hf(sharded, MIXTRAL_LIKE, word_tokenizer(), out / "fsdp") == out / "fsdp"
    assert (out / "fsdp" / "model.safetensors").is_file()  # every rank returns after rank 0 has written
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_models_export_full_weights_from_rank_0(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "TESTS_DIR": str(Path(__file__).parent), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), str(script), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = trained_like(MIXTRAL_LIKE)
    for kind in ("ddp", "fsdp"):
        assert_same_logits(expected, tmp_path / kind)
