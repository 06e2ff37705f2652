"""`hanlin train pretrain|sft|dpo`: training from a YAML/TOML config with `--set key=value` overrides.

Under torchrun (`torchrun --nproc_per_node N -m hanlin.cli train pretrain ...`) the same commands train on every
process; the config's `distributed` (ddp or fsdp) decides how.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

stderr = Console(stderr=True, highlight=False)

train_app = typer.Typer(help="Train models: pretraining, supervised fine-tuning (SFT) and DPO.", no_args_is_help=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="HANLIN_TRAIN_CONFIG", show_envvar=True,
                 help="Training config file (.yaml, .yml or .toml)."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set optim.lr=1e-3 (repeatable)."),
]
RunDirOption = Annotated[
    Path,
    typer.Option("--run-dir", envvar="HANLIN_RUN_DIR", show_envvar=True,
                 help="Where metrics.jsonl, config.yaml, checkpoints/ and the final model go."),
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue from the run directory's latest checkpoint, exactly.")
]


def _run(kind: str, config_path: Path | None, overrides: list[str] | None, run_dir: Path, resume: bool) -> None:
    from hanlin.train import distributed
    from hanlin.train.config import load_config

    config = load_config(config_path, list(overrides or []))
    resume = resume or config.resume
    if kind == "pretrain":
        from hanlin.train.pretrain import run_pretrain as run
    elif kind == "sft":
        from hanlin.train.sft import run_sft as run
    else:
        from hanlin.train.dpo import run_dpo as run
    try:
        result = run(config, run_dir, resume)
        is_main = distributed.info().is_main
    finally:
        distributed.cleanup()
    if is_main:
        validation = "" if result.validation_loss is None else f", validation loss {result.validation_loss:.4f}"
        speed = (f"{result.tokens_per_s:,.0f} tokens/s, MFU {100 * result.mfu:.1f}% of a measured "
                 f"{result.peak_gflops:.0f} GFLOP/s per process")
        stderr.print(f"trained {result.step} steps: loss {result.loss:.4f}{validation}; {speed} → {run_dir}",
                     soft_wrap=True)


@train_app.command()
def pretrain(run_dir: RunDirOption, config: ConfigOption = None, set_: SetOption = None,
             resume: ResumeOption = False) -> None:
    """Pretrain (or continue training) a dense or MoE model on a dataset made by `hanlin data prepare`."""
    _run("pretrain", config, set_, run_dir, resume)


@train_app.command()
def sft(run_dir: RunDirOption, config: ConfigOption = None, set_: SetOption = None,
        resume: ResumeOption = False) -> None:
    """Supervised fine-tuning on chat JSONL (loss on assistant tokens only; LoRA optional)."""
    _run("sft", config, set_, run_dir, resume)


@train_app.command()
def dpo(run_dir: RunDirOption, config: ConfigOption = None, set_: SetOption = None,
        resume: ResumeOption = False) -> None:
    """Direct preference optimisation on preference-pair JSONL."""
    _run("dpo", config, set_, run_dir, resume)


def register(app: typer.Typer) -> None:
    """Add `train` (pretrain, sft, dpo) to the main app."""
    app.add_typer(train_app, name="train")
