"""After training: `hanlin plot` PNGs from metrics.jsonl and the Chinchilla approach-3 scaling fit."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from hanlin.cli_analysis import register
from hanlin.config import ModelConfig, MoEConfig
from hanlin.errors import HanlinError
from hanlin.train.plot import plot_runs, read_metrics
from hanlin.train.scaling import RunPoint, ScalingFit, fit_scaling, non_embedding_params, read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Hoffmann et al. 2022's fitted values (eq. 10).
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def app() -> typer.Typer:
    cli = typer.Typer()
    register(cli)
    return cli


def write_metrics(run_dir: Path, rows: list[dict], extra_lines: list[str] = ()) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row) for row in rows] + list(extra_lines)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run_dir


def training_rows(steps: int = 30, moe_layers: int = 0, experts: int = 4, scale: float = 1.0) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": scale * (5.0 / math.sqrt(step) + 2.0), "lr": 3e-4 * min(1.0, step / 5),
               "tokens": step * 2048, "tokens_per_s": 1000.0, "mfu": 0.3}
        for layer in range(moe_layers):
            load = [1.0 + 0.5 * math.sin(step + layer + e) for e in range(experts)]
            total = sum(load)
            row[f"moe/layer{layer}/load"] = [x / total for x in load]
            row[f"moe/layer{layer}/max_load"] = max(load) / total * experts
        rows.append(row)
        if step % 10 == 0:  # evaluation, logged on its own line for the same step
            rows.append({"step": step, "validation_loss": row["loss"] + 0.1})
    return rows


# ---- plot ----------------------------------------------------------------------------------------------


def test_plot_writes_loss_lr_and_expert_load_pngs(tmp_path: Path):
    dense = write_metrics(tmp_path / "dense", training_rows())
    moe = write_metrics(tmp_path / "moe", training_rows(moe_layers=2, scale=0.9))
    rows = read_metrics(dense)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[9]["validation_loss"] == pytest.approx(rows[9]["loss"] + 0.1) and "lr" in rows[9]

    written = plot_runs([dense, moe], tmp_path / "plots")
    assert sorted(p.name for p in written) == ["expert_load-moe.png", "loss.png", "lr.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000

    result = CliRunner().invoke(app(), ["plot", str(moe)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (moe / "plots").iterdir()) == ["expert_load.png", "loss.png", "lr.png"]


def test_plot_merges_a_resumed_runs_repeated_steps(tmp_path: Path):
    rows = training_rows(steps=10)
    resumed = [dict(r, loss=r.get("loss", 0) + 1) for r in rows if r["step"] > 6 and "loss" in r]
    run = write_metrics(tmp_path / "run", rows + resumed)
    merged = read_metrics(run)
    assert [r["step"] for r in merged] == list(range(1, 11))
    assert merged[-1]["loss"] == resumed[-1]["loss"] and merged[-1]["validation_loss"] == rows[-1]["validation_loss"]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "metrics.jsonl: empty"),
        (['{"step": 1, "loss": 3.0}', '{"step": 2, "loss": '], "metrics.jsonl, line 2: not valid JSON"),
        (['{"step": 1, "loss": 3.0}', "[1, 2]"], "metrics.jsonl, line 2: expected a JSON object"),
        (['{"step": 1, "loss": 3.0}', "", '{"loss": 2.0}'], "metrics.jsonl, line 3: no integer 'step'"),
        (['{"step": 1, "lr": 0.1}'], "no 'loss' values to plot"),
    ],
)
def test_plot_names_the_file_and_line_of_bad_metrics(tmp_path: Path, lines: list[str], message: str):
    run = write_metrics(tmp_path / "run", [], lines)
    with pytest.raises(HanlinError, match=message):
        plot_runs([run], tmp_path / "plots")


def test_plot_skips_an_unfinished_last_line(tmp_path: Path):
    """A line still being written (or cut by a kill) has no newline yet: it is left out, not an error."""
    run = write_metrics(tmp_path / "run", training_rows(steps=3))
    with (run / "metrics.jsonl").open("a") as file:
        file.write('{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_plot_missing_run_directory_or_metrics(tmp_path: Path):
    with pytest.raises(HanlinError, match="no such run directory"):
        plot_runs([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app(), ["plot", str(tmp_path / "empty")])
    assert isinstance(result.exception, HanlinError)
    assert "metrics.jsonl: no such file" in str(result.exception)


# ---- scaling fit -----------------------------------------------------------------------------------------


def chinchilla_loss(N: float, D: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / N ** c["alpha"] + c["B"] / D ** c["beta"]


def synthetic_sweep(noise: float, seed: int = 0) -> list[RunPoint]:
    """5 model sizes x 5 token counts, losses from the known law times exp(N(0, noise))."""
    rng = random.Random(seed)
    return [
        RunPoint(Path(f"run-{i}-{j}"), N, D, chinchilla_loss(N, D) * math.exp(rng.gauss(0.0, noise)))
        for i, N in enumerate(10 ** (6 + 0.5 * k) for k in range(5))
        for j, D in enumerate(10 ** (8 + 0.5 * k) for k in range(5))
    ]


def test_fit_recovers_known_parameters_quickly():
    start = time.perf_counter()
    exact = fit_scaling(synthetic_sweep(noise=0.0))
    assert time.perf_counter() - start < 5.0
    for name, value in CHINCHILLA.items():
        assert getattr(exact, name) == pytest.approx(value, rel=1e-3), name
    start = time.perf_counter()
    noisy = fit_scaling(synthetic_sweep(noise=0.005))
    assert time.perf_counter() - start < 5.0
    assert noisy.alpha == pytest.approx(CHINCHILLA["alpha"], abs=0.02)
    assert noisy.beta == pytest.approx(CHINCHILLA["beta"], abs=0.02)
    assert noisy.E == pytest.approx(CHINCHILLA["E"], rel=0.05)
    assert max(abs(r) for r in noisy.residuals()) < 0.02
    assert noisy.predict(1e9, 1e11) == pytest.approx(chinchilla_loss(1e9, 1e11), rel=0.02)  # extrapolated


def test_compute_optimal_split_is_on_budget_and_minimal():
    fit = ScalingFit(**CHINCHILLA, objective=0.0)
    for flops in (1e18, 1e21, 1e24):
        N, D = fit.compute_optimal(flops)
        assert 6 * N * D == pytest.approx(flops, rel=1e-9)
        for shift in (0.8, 1.25):
            assert fit.predict(N, D) < fit.predict(N * shift, D / shift)
    N, D = fit.compute_optimal(5.76e23)  # Chinchilla's budget: their approach-3 fit puts N_opt near 40B
    assert 2e10 < N < 8e10


def test_fit_needs_five_runs_varying_both_axes():
    points = synthetic_sweep(noise=0.0)
    with pytest.raises(HanlinError, match="needs at least 5 runs; got 4"):
        fit_scaling(points[:4])
    same_size = [p for p in points if p.params == points[0].params]
    with pytest.raises(HanlinError, match="vary both the model size"):
        fit_scaling(same_size)


def write_sweep_run(run_dir: Path, model: dict, tokens: int, loss: float) -> Path:
    rows = [{"step": 1, "loss": loss + 1.0, "lr": 1e-3, "tokens": tokens // 2},
            {"step": 2, "loss": loss + 0.5, "lr": 1e-3, "tokens": tokens},
            {"step": 2, "validation_loss": loss}]
    write_metrics(run_dir, rows)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": model, "steps": 2}))
    return run_dir


def test_scaling_fit_cli_reads_runs_and_writes_json_and_png(tmp_path: Path):
    runs = []
    for i, hidden in enumerate((32, 48, 64, 96, 128)):
        model = dict(vocab_size=256, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=hidden * 3)
        params = non_embedding_params(ModelConfig.from_dict(model))
        for j, tokens in enumerate((10**6, 4 * 10**6)):
            runs.append(write_sweep_run(tmp_path / f"run-{i}-{j}", model, tokens, chinchilla_loss(params, tokens)))
    point = read_run(runs[0])
    assert point.tokens == 10**6 and point.loss == pytest.approx(chinchilla_loss(point.params, 10**6))
    assert point.params == 2 * (4 * 32 * 8 * 2 + 2 * 32 * 8 * 2 + 3 * 32 * 96 + 2 * 32) + 32

    result = CliRunner().invoke(app(), ["scaling", "fit", *map(str, runs), "--out", str(tmp_path / "fit"),
                                        "--budget", "1e15", "--budget", "1e17"])
    assert result.exit_code == 0, result.output
    assert "compute-optimal" in result.output and "L(N, D) =" in result.output
    fit = json.loads((tmp_path / "fit" / "scaling.json").read_text())
    assert [row["flops"] for row in fit["compute_optimal"]] == [1e15, 1e17]
    assert max(abs(row["log_residual"]) for row in fit["runs"]) < 1e-3
    assert (tmp_path / "fit" / "scaling.png").read_bytes()[:8] == PNG_MAGIC


def test_scaling_run_errors_name_the_run(tmp_path: Path):
    run = write_metrics(tmp_path / "no-eval", [{"step": 1, "loss": 3.0, "tokens": 100}])
    with pytest.raises(HanlinError, match="no-eval/metrics.jsonl: no validation_loss"):
        read_run(run)
    run = write_metrics(tmp_path / "no-config", [{"step": 1, "validation_loss": 3.0, "tokens": 100}])
    with pytest.raises(HanlinError, match="no config.yaml and no recorded 'params'"):
        read_run(run)
    run = write_metrics(tmp_path / "recorded", [{"step": 1, "validation_loss": 3.0, "tokens": 100, "params": 1234}])
    assert read_run(run).params == 1234
    result = CliRunner().invoke(app(), ["scaling", "fit", str(run), str(run)])
    assert "needs at least 5 runs; got 2" in str(result.exception)


def test_moe_runs_count_active_non_embedding_parameters():
    dense = ModelConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32)
    moe = ModelConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32,
                      moe=MoEConfig(num_experts=8, top_k=2, expert_dim=16))
    attention_and_norms = 4 * 16 * 16 + 3 * 16
    assert non_embedding_params(dense) == attention_and_norms + 3 * 16 * 32
    assert non_embedding_params(moe) == attention_and_norms + 2 * 3 * 16 * 16 + 8 * 16
