"""Distributed training on 2 CPU processes (gloo): DDP equals single-process training, FSDP2 trains and saves a full
state dict that one process loads, and an MoE model trains under DDP."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import torch_threads
from hanlin.train.init import build_model, load_training_checkpoint
from hanlin.train.loop import Trainer
from hanlin.train.losses import lm_loss_with
from test_train_loop import TINY, TINY_MOE, ToyBatches, make_config, step_losses

WORLD = 2
DDP_STEPS = 5
TIMEOUT_S = 150


def ddp_config(**overrides):
    return make_config(steps=DDP_STEPS, data={"micro_batch_size": 4 // WORLD}, distributed="ddp", **overrides)


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        scenarios = {
            "ddp": ddp_config(),
            "fsdp": make_config(steps=12, data={"micro_batch_size": 1, "grad_accum": 2}, distributed="fsdp",
                                optim={"lr": 1e-2},
                                model=dict(TINY, tie_embeddings=True), activation_checkpointing=True, eval_every=6,
                                checkpoint_every=6),
            "ddp-moe": make_config(steps=3, data={"micro_batch_size": 2, "grad_accum": 2}, distributed="ddp",
                                   model=TINY_MOE, moe={"bias_update_rate": 0.01}),
            # Tiny micro-batches leave some experts without tokens on one rank but not the other.
            "fsdp-moe": make_config(steps=3, data={"micro_batch_size": 1, "seq_len": 4}, distributed="fsdp",
                                    model=dict(TINY_MOE, moe=dict(TINY_MOE["moe"], num_experts=8, top_k=1)),
                                    moe={"bias_update_rate": 0.01}),
        }
        for name, config in scenarios.items():
            _, model = build_model(config)
            batches = ToyBatches(batch=config.data.micro_batch_size, rank=rank, world=WORLD)
            # Validation: rank r sees its own batches; rank 1 has one more, which all ranks skip (FSDP forwards are
            # collective, so every rank runs as many).
            validation = lambda: [ToyBatches(batch=2, seed=7, rank=rank, world=WORLD).next_batch()  # noqa: E731
                                  for _ in range(1 + rank)]
            Trainer(config, model, batches, lm_loss_with(config.moe), Path(root) / name, validation).fit()
            if name.endswith("moe"):
                biases = torch.stack([m.router.selection_bias for m in model.moe_layers()])
                gathered = [torch.zeros_like(biases) for _ in range(WORLD)]
                dist.all_gather(gathered, biases)
                (Path(root) / f"{name}-biases-agree-{rank}").write_text(str(torch.equal(gathered[0], gathered[1])))
        _resume_fsdp(rank, Path(root), scenarios["fsdp"])
    finally:
        dist.destroy_process_group()


def _resume_fsdp(rank: int, root: Path, config) -> None:
    """A copy of the FSDP run rolled back to its step-6 checkpoint, resumed on 2 processes."""
    if rank == 0:
        shutil.copytree(root / "fsdp", root / "fsdp-resumed")
        shutil.rmtree(root / "fsdp-resumed" / "checkpoints" / "step-12")
        (root / "fsdp-resumed" / "checkpoints" / "latest").write_text("step-6\n")
    dist.barrier()
    _, model = build_model(config)
    batches = ToyBatches(batch=config.data.micro_batch_size, rank=rank, world=WORLD)
    Trainer(config, model, batches, lm_loss_with(config.moe), root / "fsdp-resumed", resume=True).fit()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        context = mp.start_processes(_worker, args=(str(root),), nprocs=WORLD, start_method="spawn", join=False)
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=1):  # raises when a worker fails
            if time.monotonic() > deadline:  # a collective mismatch that hangs instead of failing
                for process in context.processes:
                    process.kill()
                pytest.fail(f"distributed workers still running after {TIMEOUT_S} s")
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return root


def test_ddp_loss_curve_equals_single_process(runs: Path, tmp_path: Path) -> None:
    with torch_threads(1):
        config = make_config(steps=DDP_STEPS)  # the same global batch (4 rows) in one process
        _, model = build_model(config)
        Trainer(config, model, ToyBatches(batch=4), lm_loss_with(config.moe), tmp_path).fit()
    single, ddp = step_losses(tmp_path), step_losses(runs / "ddp")
    assert list(ddp) == list(range(1, DDP_STEPS + 1))
    assert list(ddp.values()) == pytest.approx(list(single.values()), rel=1e-5)
    header = json.loads((runs / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == WORLD
    assert sorted(p.name for p in (runs / "ddp" / "checkpoints" / f"step-{DDP_STEPS}").glob("rank-*.json")) == [
        "rank-0.json", "rank-1.json"]


def test_fsdp2_trains_and_saves_a_full_state_dict(runs: Path) -> None:
    losses = step_losses(runs / "fsdp")
    assert losses[12] < losses[1]
    records = [json.loads(line) for line in (runs / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if "validation_loss" in r]
    assert [r["step"] for r in validation] == [6, 12]
    assert validation[1]["validation_loss"] < validation[0]["validation_loss"]
    checkpoint = runs / "fsdp" / "checkpoints" / "step-12"
    model_config, model = load_training_checkpoint(checkpoint)  # one process reads the 2-process checkpoint
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding, stored once
            continue
        assert saved[name].shape == tensor.shape, name
    assert model_config.tie_embeddings and model.lm_head.weight is model.embed_tokens.weight
    assert step_losses(runs / "fsdp-resumed") == losses  # resumed from step 6 on 2 processes: the same steps 7-12
    # A single process can train on from it (init_from reads the run directory's latest checkpoint).
    config = make_config(model=None, init_from=str(runs / "fsdp"), steps=1)
    _, again = build_model(config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("name,experts", [("ddp-moe", 4), ("fsdp-moe", 8)])
def test_moe_trains_distributed_with_identical_routing_biases(runs: Path, name: str, experts: int) -> None:
    losses = step_losses(runs / name)
    assert list(losses) == [1, 2, 3]
    assert all((runs / f"{name}-biases-agree-{r}").read_text() == "True" for r in range(WORLD))
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    record = [r for r in records if "loss" in r][-1]
    assert len(record["moe/layer0/load"]) == experts
