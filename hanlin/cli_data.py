"""`hanlin data prepare`: text, JSONL and Parquet files → token shards for training."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hanlin.cli_options import env_option

if TYPE_CHECKING:
    from hanlin.train.data import PrepareSummary

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)

data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `data` (with `prepare`) to the main app."""
    app.add_typer(data_app, name="data")


@data_app.command("prepare")
def prepare_command(
    inputs: Annotated[list[Path], typer.Argument(help="Text (.txt, .md), JSONL or Parquet files, or folders of them.", show_default=False)],
    out: Annotated[Path, env_option("--out", "-o", env="DATA_OUT", help="Directory to write the token shards to (new or empty).")],
    tokenizer: Annotated[str, env_option("--tokenizer", "-t", env="TOKENIZER", help="Model name (smollm2), .gguf file or Hugging Face directory whose tokenizer to use.")] = "smollm2",
    validation_fraction: Annotated[float, env_option("--validation-fraction", env="VALIDATION_FRACTION", help="Share of documents held out for validation, in [0, 1).")] = 0.01,
    seed: Annotated[int, env_option("--seed", env="DATA_SEED", help="Seed of the train/validation split.")] = 0,
    text_field: Annotated[str, env_option("--text-field", env="TEXT_FIELD", help="JSONL field / Parquet column holding the text.")] = "text",
    overwrite: Annotated[bool, env_option("--overwrite", env="OVERWRITE", help="Replace an existing dataset in --out.")] = False,
) -> None:
    """Tokenize documents into memory-mapped token shards, split into train/validation by document."""
    from hanlin.train.data import DataWarning, load_tokenizer, prepare

    loaded, source = load_tokenizer(tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        try:
            summary = prepare(
                inputs, out, loaded, validation_fraction=validation_fraction, seed=seed, text_field=text_field,
                overwrite=overwrite, progress=sys.stderr.isatty(), tokenizer_name=tokenizer, tokenizer_source=source,
            )
        finally:
            for warning in caught:
                stderr.print(f"[yellow]warning:[/] {escape(str(warning.message))}", soft_wrap=True)
    console = output_console()
    console.print(f"Prepared [bold]{escape(str(summary.out_dir))}[/]", soft_wrap=True)
    console.print(summary_table(summary))
    console.print(summary_line(summary), soft_wrap=True)


def summary_table(summary: PrepareSummary) -> Table:
    """Documents and tokens per split, and in total."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("split")
    table.add_column("documents", justify="right")
    table.add_column("tokens", justify="right")
    for split, counts in summary.splits.items():
        table.add_row(split, f"{counts.documents:,}", f"{counts.tokens:,}")
    table.add_section()
    table.add_row("total", f"{summary.documents:,}", f"{summary.tokens:,}", style="bold")
    return table


def summary_line(summary: PrepareSummary) -> str:
    return (
        f"tokenizer {escape(summary.tokenizer)} (vocabulary {summary.vocab_size:,}, {summary.dtype} tokens) · "
        f"{len(summary.sources)} file(s) read, {len(summary.skipped)} skipped · "
        f"{summary.seconds:.1f} s, {summary.tokens_per_s:,.0f} tokens/s"
    )


def output_console() -> Console:
    """stdout; piped output gets room for the whole table rather than the 80 columns assumed without a terminal."""
    return stdout if stdout.is_terminal else Console(highlight=False, width=max(stdout.width, 160))
