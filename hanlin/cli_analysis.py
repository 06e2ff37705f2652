"""`hanlin export`, `hanlin plot` and `hanlin scaling fit`: what comes after training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hanlin.cli_options import env_option
from hanlin.errors import HanlinError

stdout = Console(highlight=False)
scaling_app = typer.Typer(help="Scaling laws over a sweep of training runs.", no_args_is_help=True)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def register(app: typer.Typer) -> None:
    """Add `export`, `plot` and `scaling fit` to the main app."""
    app.command("export")(export)
    app.command("plot")(plot)
    app.add_typer(scaling_app, name="scaling")


def export(
    checkpoint: Annotated[str, typer.Argument(help="A training run directory (its latest checkpoint) or a checkpoints/step-N directory.")],
    out: Annotated[str, env_option("--out", "-o", env="EXPORT_OUT", help="Directory to write (replaced if it holds an earlier export).")],
    tokenizer: Annotated[str | None, env_option("--tokenizer", env="EXPORT_TOKENIZER", help="Tokenizer to ship with the model (default: the one the run's config.yaml names).")] = None,
    dtype: Annotated[str | None, env_option("--dtype", env="EXPORT_DTYPE", help="Stored dtype: float32, bfloat16 or float16 (default: as trained).")] = None,
) -> None:
    """Export a training checkpoint as a Hugging Face directory, which `hanlin serve --model DIR` also serves."""
    import torch

    from hanlin.train.export import export_from_checkpoint

    torch_dtype = None
    if dtype is not None:
        if dtype.lower() not in _DTYPES:
            raise HanlinError(f"--dtype {dtype!r}: expected one of float32, bfloat16, float16")
        torch_dtype = getattr(torch, _DTYPES[dtype.lower()])
    path = export_from_checkpoint(checkpoint, out, tokenizer=tokenizer, dtype=torch_dtype)
    stdout.print(f"exported {escape(checkpoint)} to {escape(str(path))} (serve it with: hanlin serve --model {escape(str(path))})")


def plot(
    run_dirs: Annotated[list[str], typer.Argument(help="Training run directories (each holds metrics.jsonl).")],
    out: Annotated[str | None, env_option("--out", "-o", env="PLOT_OUT", help="Directory for the PNGs (default: RUN_DIR/plots for one run, ./plots for several).")] = None,
) -> None:
    """Plot loss (train and validation, vs tokens and steps), learning rate and MoE expert load as PNGs."""
    from hanlin.train.plot import plot_runs

    for path in plot_runs(run_dirs, out):
        stdout.print(escape(str(path)))


@scaling_app.command("fit")
def scaling_fit(
    run_dirs: Annotated[list[str], typer.Argument(help="Training run directories of a sweep (at least 5), varying model size and tokens.")],
    out: Annotated[str, env_option("--out", "-o", env="SCALING_OUT", help="Directory for scaling.json and scaling.png.")] = "scaling",
    budget: Annotated[list[float] | None, env_option("--budget", env="SCALING_BUDGET", help="Compute budget C in FLOPs for the compute-optimal split (repeatable; default: powers of ten around the sweep).")] = None,
    json_output: Annotated[bool, env_option("--json", env="JSON", help="Print the fit as one JSON object.")] = False,
) -> None:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to the runs' final validation losses (Chinchilla approach 3)."""
    from hanlin.train.scaling import default_budgets, fit_scaling, plot_fit, read_run

    points = [read_run(run_dir) for run_dir in run_dirs]
    fit = fit_scaling(points)
    budgets = list(budget) if budget else default_budgets(points)
    if any(c <= 0 for c in budgets):
        raise HanlinError("--budget must be a positive number of FLOPs")
    directory = Path(out)
    if directory.is_file():
        raise HanlinError(f"{directory}: is a file; --out must be a directory")
    directory.mkdir(parents=True, exist_ok=True)
    result = fit.to_dict(budgets)
    (directory / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_fit(fit, directory / "scaling.png")
    if json_output:
        print(json.dumps(result))
        return
    stdout.print(
        f"L(N, D) = {fit.E:.4g} + {fit.A:.4g} / N^{fit.alpha:.4f} + {fit.B:.4g} / D^{fit.beta:.4f}"
        f"   (N: non-embedding active parameters, D: tokens; Huber objective {fit.objective:.3g})"
    )
    runs = Table(title="runs", title_justify="left")
    for column in ("run", "N", "D", "loss", "fitted", "log residual"):
        runs.add_column(column, justify="left" if column == "run" else "right")
    for row in result["runs"]:
        runs.add_row(escape(row["run"]), f"{row['params']:.4g}", f"{row['tokens']:.4g}", f"{row['loss']:.4f}",
                     f"{row['fitted_loss']:.4f}", f"{row['log_residual']:+.4f}")
    stdout.print(runs)
    optimal = Table(title="compute-optimal split (C = 6ND)", title_justify="left")
    for column in ("C (FLOPs)", "N_opt", "D_opt", "D/N", "fitted loss"):
        optimal.add_column(column, justify="right")
    for row in result["compute_optimal"]:
        optimal.add_row(f"{row['flops']:.3g}", f"{row['params']:.4g}", f"{row['tokens']:.4g}",
                        f"{row['tokens'] / row['params']:.3g}", f"{row['loss']:.4f}")
    stdout.print(optimal)
    stdout.print(f"wrote {escape(str(directory / 'scaling.json'))} and {escape(str(directory / 'scaling.png'))}")
