"""`hanlin plot`: PNG plots of training runs' metrics.jsonl (loss, learning rate, MoE expert load).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hanlin.errors import HanlinError

METRICS_FILE = "metrics.jsonl"
_MOE_LOAD_KEY = re.compile(r"moe/layer(\d+)/(?:max_)?load")


@dataclass
class Run:
    """One run's metrics: one dict per step (lines logged for the same step merged, later keys winning)."""

    directory: Path
    label: str
    rows: list[dict[str, Any]]

    def series(self, x: str, y: str) -> tuple[list[float], list[float]]:
        """(x, y) over the steps whose row has both keys as finite numbers."""
        pairs = [(r[x], r[y]) for r in self.rows if _number(r.get(x)) and _number(r.get(y))]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def has(self, key: str) -> bool:
        return any(_number(r.get(key)) for r in self.rows)

    def moe_layers(self) -> list[int]:
        layers = {int(m[1]) for r in self.rows for k in r if (m := _MOE_LOAD_KEY.fullmatch(k))}
        return sorted(layers)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of run_dir/metrics.jsonl, sorted by step (a step logged twice, e.g. after a resume, merged)."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise HanlinError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise HanlinError(f"{path}: no such file; point at a training run directory (it holds {METRICS_FILE})")
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise HanlinError(f"{path}: unreadable ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline yet: a line being written, or cut short by a kill
                break
            raise HanlinError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise HanlinError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise HanlinError(f"{path}, line {number}: no integer 'step' (got {step!r})")
        by_step.setdefault(step, {}).update(row)
    if not by_step:
        raise HanlinError(f"{path}: empty; the run has logged no metrics yet")
    return [by_step[step] for step in sorted(by_step)]


def read_runs(run_dirs: list[str | Path]) -> list[Run]:
    if not run_dirs:
        raise HanlinError("give at least one run directory")
    paths = [Path(d) for d in run_dirs]
    names = [p.resolve().name for p in paths]
    labels = [n if names.count(n) == 1 else str(p) for p, n in zip(paths, names)]
    return [Run(p, label, read_metrics(p)) for p, label in zip(paths, labels)]


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Writes loss.png, lr.png and (for MoE runs) expert-load PNGs; returns their paths.

    out_dir defaults to RUN_DIR/plots for one run and ./plots for several.
    """
    runs = read_runs(run_dirs)
    out = Path(out_dir) if out_dir is not None else (runs[0].directory / "plots" if len(runs) == 1 else Path("plots"))
    if out.is_file():
        raise HanlinError(f"{out}: is a file; --out must be a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not any(run.has("loss") or run.has("validation_loss") for run in runs):
        raise HanlinError(f"{', '.join(str(r.directory / METRICS_FILE) for r in runs)}: no 'loss' values to plot")
    written = [_plot_loss(runs, out / "loss.png")]
    if any(run.has("lr") for run in runs):
        written.append(_plot_lr(runs, out / "lr.png"))
    for run in runs:
        if run.moe_layers():
            suffix = "" if len(runs) == 1 else "-" + re.sub(r"[^\w.-]+", "_", run.label)
            written.append(_plot_expert_load(run, out / f"expert_load{suffix}.png"))
    return written


# ---- figures -------------------------------------------------------------------------------------------


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _plot_loss(runs: list[Run], path: Path) -> Path:
    with_tokens = any(run.has("tokens") for run in runs)
    figure, axes = _figure(12 if with_tokens else 6.5, 4.5, 2 if with_tokens else 1)
    x_keys = (["tokens"] if with_tokens else []) + ["step"]
    colors = _colors(len(runs))
    for ax, x in zip(axes, x_keys):
        for run, color in zip(runs, colors):
            xs, ys = run.series(x, "loss")
            if xs:
                ax.plot(xs, ys, color=color, linewidth=1.2, label=f"{run.label} train")
            xs, ys = run.series(x, "validation_loss")
            if xs:
                ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=3, label=f"{run.label} validation")
        ax.set_xlabel("tokens" if x == "tokens" else "step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"loss vs {x}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def _plot_lr(runs: list[Run], path: Path) -> Path:
    figure, (ax,) = _figure(6.5, 4)
    for run, color in zip(runs, _colors(len(runs))):
        xs, ys = run.series("step", "lr")
        if xs:
            ax.plot(xs, ys, color=color, label=run.label)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def _plot_expert_load(run: Run, path: Path) -> Path:
    """Left: each MoE layer's max load over steps (1 = perfectly balanced). Right: the last logged
    per-expert loads as a layer × expert heatmap, each divided by its layer's mean."""
    layers = run.moe_layers()
    last = _last_loads(run, layers)
    figure, axes = _figure(12 if last else 6.5, 4.5, 2 if last else 1)
    for layer, color in zip(layers, _colors(len(layers))):
        xs, ys = _max_load_series(run, layer)
        if xs:
            axes[0].plot(xs, ys, color=color, linewidth=1, label=f"layer {layer}")
    axes[0].axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("max expert load / mean")
    axes[0].set_title(f"{run.label}: max expert load per layer")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize="x-small", ncol=2)
    if last:
        step, rows = last
        width = max(len(r) for r in rows.values())
        grid = [[math.nan] * width for _ in layers]
        for i, layer in enumerate(layers):
            for j, value in enumerate(_relative(rows.get(layer, []))):
                grid[i][j] = value
        image = axes[1].imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        axes[1].set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axes[1].set_xlabel("expert")
        axes[1].set_ylabel("layer")
        axes[1].set_title(f"expert load / mean at step {step}")
        figure.colorbar(image, ax=axes[1])
    figure.savefig(path, dpi=120)
    return path


def _max_load_series(run: Run, layer: int) -> tuple[list[float], list[float]]:
    xs, ys = run.series("step", f"moe/layer{layer}/max_load")
    if xs:
        return xs, ys
    key = f"moe/layer{layer}/load"
    points = [(r["step"], max(_relative(r[key]))) for r in run.rows if _loads(r.get(key)) and sum(r[key]) > 0]
    return [p[0] for p in points], [p[1] for p in points]


def _last_loads(run: Run, layers: list[int]) -> tuple[int, dict[int, list[float]]] | None:
    for row in reversed(run.rows):
        rows = {layer: row[f"moe/layer{layer}/load"] for layer in layers if _loads(row.get(f"moe/layer{layer}/load"))}
        if rows:
            return row["step"], rows
    return None


def _relative(loads: list[float]) -> list[float]:
    mean = sum(loads) / len(loads) if loads else 0.0
    return [value / mean if mean > 0 else math.nan for value in loads]


def _loads(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_number(v) for v in value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "viridis"]
    return [palette(i if count <= 10 else i / max(1, count - 1)) for i in range(count)]
