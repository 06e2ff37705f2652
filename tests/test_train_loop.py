"""hanlin.train config / loop / optim / checkpoint / pretrain: the single-process training loop, on tiny models."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import torch_threads
from hanlin.config import ModelConfig
from hanlin.errors import HanlinError
from hanlin.train.batch import IGNORE_INDEX, LMBatch
from hanlin.train.config import ScheduleConfig, TrainConfig, load_config
from hanlin.train.init import build_model, init_weights
from hanlin.train.loop import Trainer
from hanlin.train.losses import lm_loss, lm_loss_with
from hanlin.train.optim import build_optimizer, lr_factor

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
TINY_MOE = dict(TINY, moe=dict(num_experts=4, top_k=2, expert_dim=32, router_bias=True))


class ToyBatches:
    """A deterministic BatchSource: each row holds two 'documents', arithmetic sequences mod the vocabulary,
    with a random-length prefix that carries no loss (so micro-batches have different item counts). Global row
    k is the same whatever the micro-batch size, accumulation or rank split."""

    def __init__(self, vocab: int = 64, seq_len: int = 16, batch: int = 4, seed: int = 0, rank: int = 0,
                 world: int = 1, delay_s: float = 0.0) -> None:
        self.vocab, self.seq_len, self.batch, self.seed = vocab, seq_len, batch, seed
        self.rank, self.world, self.delay_s = rank, world, delay_s
        self.position = 0

    def _row(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        half = self.seq_len // 2
        inputs, labels, docs = [], [], []
        for doc in range(2):
            start = int(torch.randint(self.vocab, (1,), generator=g))
            stride = int(torch.randint(1, 4, (1,), generator=g))
            seq = (start + stride * torch.arange(half + 1)) % self.vocab
            inputs.append(seq[:-1])
            labels.append(seq[1:].clone())
            docs.append(torch.full((half,), doc))
        labels_T = torch.cat(labels)
        labels_T[: int(torch.randint(0, half, (1,), generator=g))] = IGNORE_INDEX
        return torch.cat(inputs), labels_T, torch.cat(docs)

    def next_batch(self) -> LMBatch:
        if self.delay_s:
            time.sleep(self.delay_s)
        first = self.position * self.batch * self.world + self.rank * self.batch
        rows = [self._row(first + j) for j in range(self.batch)]
        self.position += 1
        return LMBatch(*(torch.stack(parts) for parts in zip(*rows)))

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def make_config(**overrides) -> TrainConfig:
    data = {"model": TINY, "data": {"path": "toy", "seq_len": 16, "micro_batch_size": 4}, "steps": 6,
            "log_every": 1, "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2}}
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return TrainConfig.from_dict(data)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def train(config: TrainConfig, run_dir: Path, batch: int = 4, validation=None) -> tuple[Trainer, dict[int, float]]:
    torch.manual_seed(0)
    _, model = build_model(config)
    trainer = Trainer(config, model, ToyBatches(batch=batch), lm_loss_with(config.moe), run_dir, validation)
    trainer.fit()
    return trainer, step_losses(run_dir)


# ---- the loop -----------------------------------------------------------------------------------------------
def test_loss_goes_down_and_metrics_are_logged(tmp_path: Path) -> None:
    config = make_config(steps=40, log_every=5, eval_every=20, optim={"lr": 1e-2}, schedule={"warmup_steps": 4},
                         progress=True)
    validation = lambda: [ToyBatches(seed=99).next_batch() for _ in range(2)]  # noqa: E731
    trainer, losses = train(config, tmp_path, validation=validation)
    records = read_metrics(tmp_path)
    assert records[0]["step"] == 0 and records[0]["peak_gflops"] > 0  # the measured peak, stated once
    assert losses[40] < 0.6 * losses[1]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    for record in logged:
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1 and record["grad_norm"] > 0
    assert logged[-1]["tokens"] == 40 * 4 * 16
    validations = [r for r in records if "validation_loss" in r]
    assert [r["step"] for r in validations] == [20, 40]
    assert validations[-1]["validation_loss"] < validations[0]["validation_loss"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["steps"] == 40
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-40"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["peak_gflops"] == pytest.approx(records[0]["peak_gflops"]) and summary["tokens"] == 40 * 64
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    big, big_losses = train(make_config(steps=4), tmp_path / "big", batch=4)
    small, small_losses = train(make_config(steps=4, data={"micro_batch_size": 2, "grad_accum": 2}),
                                tmp_path / "small", batch=2)
    assert small_losses == pytest.approx(big_losses, rel=1e-5)
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


class PlainBatches(ToyBatches):
    """The same rows in a batch type without `items`: the loop learns the item count only from the loss."""

    def next_batch(self):
        batch = super().next_batch()
        return (batch.input_ids, batch.labels, batch.document_ids)


def tuple_loss(model, batch):
    return lm_loss(model, LMBatch(*batch))


def test_batches_without_an_item_count_are_normalised_the_same(tmp_path: Path) -> None:
    config = make_config(steps=3, data={"micro_batch_size": 2, "grad_accum": 2})
    _, reference = train(config, tmp_path / "items", batch=2)
    _, model = build_model(config)
    Trainer(config, model, PlainBatches(batch=2), tuple_loss, tmp_path / "plain").fit()
    assert step_losses(tmp_path / "plain") == pytest.approx(reference, rel=1e-5)


def test_activation_checkpointing_gives_the_same_training(tmp_path: Path) -> None:
    _, plain = train(make_config(steps=3), tmp_path / "plain")
    _, checkpointed = train(make_config(steps=3, activation_checkpointing=True), tmp_path / "ckpt")
    assert checkpointed == pytest.approx(plain, rel=1e-6)


def test_clip_norm_is_applied(tmp_path: Path) -> None:
    # beta1 = beta2 = 0 and eps >> |g| make AdamW's update -lr * g / (|g| + eps) ≈ -g: the parameter change is
    # the (clipped) gradient itself.
    common = {"weight_decay": 0.0, "betas": [0.0, 0.0], "eps": 1e4, "lr": 1e4}
    deltas = {}
    for clip in (0.0, 0.05):
        config = make_config(steps=1, optim={**common, "grad_clip": clip}, schedule={"kind": "constant",
                                                                                       "warmup_steps": 0})
        _, model = build_model(config)
        before = [p.detach().clone() for p in model.parameters()]
        Trainer(config, model, ToyBatches(), lm_loss, tmp_path / f"clip{clip}").fit()
        change = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        deltas[clip] = (change.norm().item(), read_metrics(tmp_path / f"clip{clip}")[1]["grad_norm"])
    raw_change, raw_norm = deltas[0.0]
    clipped_change, _ = deltas[0.05]
    assert raw_norm > 0.05
    assert raw_change == pytest.approx(raw_norm, rel=1e-2)
    assert clipped_change == pytest.approx(0.05, rel=1e-2)


def test_moe_training_balances_and_logs_expert_load(tmp_path: Path) -> None:
    config = make_config(model=TINY_MOE, steps=4, moe={"bias_update_rate": 0.01, "expert_lr_scale": 0.5})
    trainer, losses = train(config, tmp_path)
    record = read_metrics(tmp_path)[-1]
    for layer in (0, 1):
        assert record[f"moe/layer{layer}/max_load"] >= 1.0
        assert len(record[f"moe/layer{layer}/load"]) == 4
        assert f"moe/layer{layer}/cv" in record
    assert record["moe/aux_loss"] > 0 and "moe/z_loss" in record
    biases = [layer.router.selection_bias for layer in trainer.model.moe_layers()]
    assert all(b.abs().sum() > 0 for b in biases)  # moved by the routing-bias updates
    expert_groups = [g for g in trainer.optimizer.param_groups
                     if any(p is e for p in g["params"] for e in trainer.model.layers[0].mlp.experts.parameters())]
    dense_group = next(g for g in trainer.optimizer.param_groups if g not in expert_groups and g["weight_decay"] > 0)
    assert expert_groups and all(g["lr"] == pytest.approx(0.5 * dense_group["lr"]) for g in expert_groups)


# ---- schedules and parameter groups -----------------------------------------------------------------------------
def test_schedule_values_at_key_steps() -> None:
    cosine = ScheduleConfig(kind="cosine", warmup_steps=10)
    assert lr_factor(0, cosine, 110, 0.1) == pytest.approx(0.1)  # (s + 1) / warmup
    assert lr_factor(9, cosine, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(59, cosine, 110, 0.1) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_factor(109, cosine, 110, 0.1) == pytest.approx(0.1)  # ends at min_lr_ratio
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2)
    assert lr_factor(10, wsd, 100, 0.0) == 1.0 and lr_factor(79, wsd, 100, 0.0) == 1.0  # stable
    assert lr_factor(89, wsd, 100, 0.0) == pytest.approx(0.5)  # linear decay over the last 20 steps
    assert lr_factor(99, wsd, 100, 0.0) == pytest.approx(0.0)
    constant = ScheduleConfig(kind="constant", warmup_steps=4)
    assert [lr_factor(s, constant, 10, 0.1) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]


def test_weight_decay_groups() -> None:
    config = make_config(model=dict(TINY, tie_embeddings=True, attention_bias=True))
    _, model = build_model(config)
    optimizer = build_optimizer(model, config, model.config)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "layers.0.attn.qkv_proj.weight" in decay and "layers.1.mlp.down_proj.weight" in decay
    assert {"embed_tokens.weight", "norm.weight", "layers.0.input_norm.weight",
            "layers.0.attn.qkv_proj.bias"} <= no_decay
    assert "lm_head.weight" not in decay | no_decay  # tied: the embedding's parameter, counted once
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_init_is_seeded_and_scales_residual_projections() -> None:
    config = ModelConfig(vocab_size=64, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=4,
                         intermediate_size=512)
    from hanlin.models import Transformer

    a, b = Transformer(config), Transformer(config)
    init_weights(a, seed=3)
    init_weights(b, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.layers[0].attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert a.layers[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(a.layers[0].input_norm.weight, torch.ones(256))


# ---- config errors ----------------------------------------------------------------------------------------------
def test_config_file_overrides_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text('steps = 5\n[model]\nvocab_size = 64\nhidden_size = 32\nnum_layers = 2\nnum_heads = 4\n'
                    'num_kv_heads = 2\nintermediate_size = 64\n[data]\npath = "x"\n')
    config = load_config(path, ["optim.lr=1e-3", "schedule.kind=wsd", "model.moe.num_experts=4",
                                "model.moe.top_k=1", "model.moe.expert_dim=16"])
    assert config.optim.lr == 1e-3 and config.schedule.kind == "wsd" and config.model_config().moe.num_experts == 4
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    cases = {
        "optim.lrr=1": "unknown config key optim.lrr; valid keys in optim: lr, min_lr_ratio",
        "optim.lr=fast": "config key optim.lr: expected a number, got 'fast'",
        "steps=0": "steps must be > 0",
        "steps=2.5": "config key steps: expected an integer, got 2.5",
        "distributed=mpi": "config key distributed: expected one of 'none', 'ddp', 'fsdp'",
        "model.hidden=3": "unknown config key model.hidden",
        "model.num_kv_heads=3": "num_heads 4 is not a multiple of num_kv_heads 3",
        "nonsense": "expected key=value",
    }
    for override, message in cases.items():
        with pytest.raises(HanlinError, match=re.escape(message)):
            load_config(path, [override])
    with pytest.raises(HanlinError, match="no such config file"):
        load_config(tmp_path / "missing.yaml", [])


# ---- checkpoints and resume ---------------------------------------------------------------------------------------
RESUME_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_train_loop import resume_run
resume_run(sys.argv[1], delay_s=float(sys.argv[2]), resume=sys.argv[3] == "1")
"""


def resume_run(run_dir: str | Path, delay_s: float = 0.0, resume: bool = False) -> None:
    config = make_config(model=TINY_MOE, steps=10, checkpoint_every=3, keep_checkpoints=2)
    _, model = build_model(config)
    Trainer(config, model, ToyBatches(delay_s=delay_s), lm_loss, run_dir, resume=resume).fit()


def test_resume_after_sigkill_is_bit_exact(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(REPO_ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}

    def run(run_dir: Path, delay: float, resume: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(run_dir), str(delay), "1" if resume else "0"],
                                env=env, stderr=subprocess.PIPE, text=True)

    killed = tmp_path / "killed"
    victim = run(killed, 0.3, False)
    with torch_threads(1):  # as in the subprocesses
        resume_run(tmp_path / "straight")  # the uninterrupted run, in this process meanwhile
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and victim.poll() is None:  # kill -9 after step 7, past the step-6 save
        if (killed / "metrics.jsonl").exists() and max(step_losses(killed), default=0) >= 7:
            break
        time.sleep(0.05)
    assert victim.poll() is None, victim.stderr.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (killed / "checkpoints" / "latest").read_text().strip() in ("step-6", "step-9")
    resumed = run(killed, 0.0, True)
    assert resumed.wait(timeout=60) == 0, resumed.stderr.read()
    expected = step_losses(tmp_path / "straight")
    assert list(expected) == list(range(1, 11))
    assert step_losses(killed) == expected  # bit for bit: floats compared with ==
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["latest", "step-10", "step-9"]


def test_resume_refuses_incompatible_config_and_overwrites_nothing(tmp_path: Path) -> None:
    train(make_config(steps=2), tmp_path)
    saved = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    changes = {
        "model.hidden_size differs (checkpoint 32, this run 48)": {"model": dict(TINY, hidden_size=48)},
        "data.seq_len differs (checkpoint 16, this run 32)": {"data": {"seq_len": 32}},
        "data.micro_batch_size differs (checkpoint 4, this run 2)": {"data": {"micro_batch_size": 2}},
    }
    for message, change in changes.items():
        config = make_config(steps=4, **change)
        _, model = build_model(config)
        trainer = Trainer(config, model, ToyBatches(), lm_loss, tmp_path, resume=True)
        with pytest.raises(HanlinError, match=r"cannot resume from .*step-2: " + re.escape(message)):
            trainer.fit()
    config = make_config(steps=4)
    _, model = build_model(config)
    with pytest.raises(HanlinError, match="already holds checkpoints .*--resume"):
        Trainer(config, model, ToyBatches(), lm_loss, tmp_path).fit()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == saved


def test_init_from_a_training_checkpoint(tmp_path: Path) -> None:
    trainer, _ = train(make_config(steps=2), tmp_path / "run")
    config = make_config(model=None, init_from=str(tmp_path / "run"))
    model_config, model = build_model(config)
    assert model_config == trainer.model_config
    for (name, a), b in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


# ---- pretraining on a prepared dataset --------------------------------------------------------------------------
def byte_tokenizer_dir(directory: Path) -> Path:
    import tokenizers
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from hanlin.tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | {"<eos>": 256}
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<eos>", special=True, normalized=False)])
    Tokenizer(backend, eos_token="<eos>").save(directory)
    return directory


def test_pretrain_end_to_end_and_data_errors(tmp_path: Path) -> None:
    from hanlin.train.data import load_tokenizer, prepare
    from hanlin.train.pretrain import run_pretrain

    tokenizer_dir = byte_tokenizer_dir(tmp_path / "tok")
    tokenizer, _ = load_tokenizer(tokenizer_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: the cat sat on the mat. " * 3}) + "\n"
                              for i in range(40)))
    prepare([corpus], tmp_path / "data", tokenizer, validation_fraction=0.2, progress=False)
    model = dict(TINY, vocab_size=264)
    base = {"model": model, "tokenizer": str(tokenizer_dir), "steps": 8, "log_every": 4,
            "data": {"path": str(tmp_path / "data"), "seq_len": 32, "micro_batch_size": 2}}
    result = run_pretrain(TrainConfig.from_dict(base), tmp_path / "run")
    assert result.step == 8 and result.validation_loss is not None and math.isfinite(result.validation_loss)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    from hanlin.api import load

    loaded = load(tmp_path / "run" / "final")
    assert loaded.config.hidden_size == 32
    with pytest.raises(HanlinError, match="no such dataset directory"):
        run_pretrain(TrainConfig.from_dict({**base, "data": {"path": str(tmp_path / "nothing")}}), tmp_path / "r2")
    with pytest.raises(HanlinError, match="model.vocab_size is 64"):
        run_pretrain(TrainConfig.from_dict({**base, "model": TINY}), tmp_path / "r3")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_cli_train_pretrain(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from hanlin.cli_train import register

    app = typer.Typer()
    register(app)
    help_text = CliRunner().invoke(app, ["train", "--help"]).output
    assert all(command in help_text for command in ("pretrain", "sft", "dpo"))
    (tmp_path / "bad.yaml").write_text("steps: 3\noptim: {learning_rate: 0.1}\n")
    result = CliRunner().invoke(app, ["train", "pretrain", "--config", str(tmp_path / "bad.yaml"),
                                      "--run-dir", str(tmp_path / "run")])
    assert isinstance(result.exception, HanlinError)
    assert "unknown config key optim.learning_rate" in str(result.exception)
    result = CliRunner().invoke(app, ["train", "pretrain", "--config", str(tmp_path / "bad.yaml"),
                                      "--set", "optim={}", "--set", "data.path=" + str(tmp_path / "none"),
                                      "--set", f"model={json.dumps(TINY)}", "--run-dir", str(tmp_path / "run")])
    assert isinstance(result.exception, HanlinError) and "no such dataset directory" in str(result.exception)
