"""`hanlin scaling fit`: L(N, D) = E + A / N^alpha + B / D^beta over a sweep of runs (Chinchilla approach 3).

Hoffmann et al. 2022, appendix D.2: with a = log A, b = log B, e = log E, minimise over the runs
sum Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L), delta = 1e-3, with L-BFGS from a grid of
initialisations, and keep the best optimum. Here the whole grid's objective is evaluated at once and L-BFGS
starts from the best few grid points (the grid's other points end in the same or worse optima).

N is the non-embedding parameter count (active parameters for MoE, so that C = 6 N D holds for both), D the
tokens trained and L the final validation loss.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hanlin.config import ModelConfig
from hanlin.errors import HanlinError
from hanlin.train.plot import METRICS_FILE, read_metrics

HUBER_DELTA = 1e-3
FIT_PARAMETERS = 5
RUN_CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# Hoffmann et al.'s initialisation grid: alpha, beta, e, a, b.
_GRID = (
    (0.0, 0.5, 1.0, 1.5, 2.0),
    (0.0, 0.5, 1.0, 1.5, 2.0),
    (-1.0, -0.5, 0.0, 0.5, 1.0),
    (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
)


@dataclass
class RunPoint:
    directory: Path
    params: float  # N: non-embedding (active) parameters
    tokens: float  # D: tokens trained
    loss: float  # L: final validation loss


@dataclass
class ScalingFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # the Huber sum at the optimum
    points: list[RunPoint] = field(default_factory=list)

    def predict(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def residuals(self) -> list[float]:
        """log L - log L_fit per run (the quantity the fit minimises a Huber loss of)."""
        return [math.log(p.loss) - math.log(self.predict(p.params, p.tokens)) for p in self.points]

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising the fitted loss at compute C = 6 N D (Hoffmann et al. eq. 4)."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        return G * (flops / 6.0) ** (b / (a + b)), (flops / 6.0) ** (a / (a + b)) / G

    def to_dict(self, budgets: list[float] = ()) -> dict[str, Any]:
        residuals = self.residuals()
        return {
            "E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
            "huber_objective": self.objective,
            "runs": [
                {"run": str(p.directory), "params": p.params, "tokens": p.tokens, "loss": p.loss,
                 "fitted_loss": self.predict(p.params, p.tokens), "log_residual": r}
                for p, r in zip(self.points, residuals)
            ],
            "compute_optimal": [
                {"flops": c, "params": n, "tokens": d, "loss": self.predict(n, d)}
                for c in budgets for n, d in [self.compute_optimal(c)]
            ],
        }  # fmt: skip


# ---- reading runs ----------------------------------------------------------------------------------------


def non_embedding_params(config: ModelConfig) -> int:
    """Active parameters per token minus the embedding and (untied) output matrices."""
    _, active = config.parameter_counts()
    return active - config.vocab_size * config.hidden_size * (1 if config.tie_embeddings else 2)


def read_run(run_dir: str | Path) -> RunPoint:
    directory = Path(run_dir)
    rows = read_metrics(directory)
    evaluated = [r for r in rows if _positive(r.get("validation_loss"))]
    if not evaluated:
        raise HanlinError(
            f"{directory / METRICS_FILE}: no validation_loss; the fit needs each run's final validation loss "
            "(train with data.validation_path set)"
        )
    final = evaluated[-1]
    tokens = final.get("tokens") if _positive(final.get("tokens")) else max(
        (r["tokens"] for r in rows if _positive(r.get("tokens"))), default=None
    )
    if tokens is None:
        raise HanlinError(f"{directory / METRICS_FILE}: no 'tokens' count; cannot tell how many tokens the run saw")
    return RunPoint(directory, float(_params(directory, rows)), float(tokens), float(final["validation_loss"]))


def _params(directory: Path, rows: list[dict[str, Any]]) -> int:
    """N from a `params` value the run recorded, else from its config.yaml's model (or init_from) section."""
    summary = directory / SUMMARY_FILE
    if summary.is_file():
        try:
            value = json.loads(summary.read_text()).get("params")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as error:
            raise HanlinError(f"{summary}: not a JSON object ({error})") from None
        if _positive(value):
            return int(value)
    recorded = [r["params"] for r in rows if _positive(r.get("params"))]
    if recorded:
        return int(recorded[-1])
    path = directory / RUN_CONFIG_FILE
    if not path.is_file():
        raise HanlinError(f"{directory}: no {RUN_CONFIG_FILE} and no recorded 'params'; cannot count the parameters")
    from hanlin.train.config import model_config_from_dict, read_config_file

    data = read_config_file(path)
    if isinstance(data.get("model"), dict):

        return non_embedding_params(model_config_from_dict(data["model"]))
    if data.get("init_from"):
        from hanlin.api import load_config

        return non_embedding_params(load_config(data["init_from"])[0])
    raise HanlinError(f"{path}: neither a `model` section nor `init_from`; cannot count the parameters")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# ---- the fit -----------------------------------------------------------------------------------------------


def fit_scaling(points: list[RunPoint], starts: int = 4) -> ScalingFit:
    """Chinchilla approach 3 over `points`; L-BFGS from the `starts` best points of the initialisation grid."""
    if len(points) < FIT_PARAMETERS:
        raise HanlinError(
            f"the fit has {FIT_PARAMETERS} parameters (E, A, B, alpha, beta) and needs at least {FIT_PARAMETERS} runs; "
            f"got {len(points)}"
        )
    if len({p.params for p in points}) < 2 or len({p.tokens for p in points}) < 2:
        raise HanlinError("the runs must vary both the model size (N) and the tokens trained (D) to fit L(N, D)")
    log_N = torch.tensor([math.log(p.params) for p in points], dtype=torch.float64)
    log_D = torch.tensor([math.log(p.tokens) for p in points], dtype=torch.float64)
    log_L = torch.tensor([math.log(p.loss) for p in points], dtype=torch.float64)

    def grid_objective(theta_G5: torch.Tensor) -> torch.Tensor:
        """The Huber sum for each row of parameters (alpha, beta, e, a, b)."""
        alpha, beta, e, a, b = (column[:, None] for column in theta_G5.unbind(-1))
        predicted_GR = torch.logaddexp(torch.logaddexp(a - alpha * log_N, b - beta * log_D), e)
        return F.huber_loss(predicted_GR, log_L.expand_as(predicted_GR), delta=HUBER_DELTA, reduction="none").sum(-1)

    def objective(theta_5: torch.Tensor) -> torch.Tensor:
        alpha, beta, e, a, b = theta_5.unbind()
        predicted_R = torch.logaddexp(torch.logaddexp(a - alpha * log_N, b - beta * log_D), e)
        return F.huber_loss(predicted_R, log_L, delta=HUBER_DELTA, reduction="sum")

    grid_G5 = torch.tensor(list(itertools.product(*_GRID)), dtype=torch.float64)
    best_starts = grid_G5[grid_objective(grid_G5).argsort()[:starts]]
    best: tuple[float, torch.Tensor] | None = None
    for start in best_starts:
        theta = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [theta], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-13, history_size=10,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = objective(theta)
            value.backward()
            return value

        optimizer.step(closure)
        with torch.no_grad():
            value = objective(theta).item()
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, theta.detach().clone())
    assert best is not None
    alpha, beta, e, a, b = best[1].tolist()
    return ScalingFit(math.exp(e), math.exp(a), math.exp(b), alpha, beta, best[0], list(points))


def default_budgets(points: list[RunPoint]) -> list[float]:
    """Powers of ten of compute from the sweep's smallest 6ND up to 100x its largest."""
    flops = [6.0 * p.params * p.tokens for p in points]
    low, high = math.floor(math.log10(min(flops))), math.ceil(math.log10(max(flops))) + 2
    step = max(1, (high - low) // 5)
    return [10.0**k for k in range(low, high + 1, step)]


def plot_fit(fit: ScalingFit, path: Path) -> Path:
    """Left: loss vs tokens per model size, observed (points) and fitted (lines). Right: fitted vs observed."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2)
    sizes = sorted({p.params for p in fit.points})
    palette = colormaps["viridis"]
    all_tokens = [p.tokens for p in fit.points]
    low, high = math.log(min(all_tokens)), math.log(max(all_tokens))
    curve = [math.exp(low + (high - low) * i / 99) for i in range(100)]
    for index, size in enumerate(sizes):
        color = palette(index / max(1, len(sizes) - 1))
        runs = sorted((p for p in fit.points if p.params == size), key=lambda p: p.tokens)
        left.scatter([p.tokens for p in runs], [p.loss for p in runs], color=color, s=18, zorder=3)
        left.plot(curve, [fit.predict(size, d) for d in curve], color=color, linewidth=1, label=f"N = {size:.3g}")
    left.set_xscale("log")
    left.set_xlabel("tokens trained (D)")
    left.set_ylabel("validation loss")
    left.set_title(
        f"L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}", fontsize="medium"
    )
    left.grid(alpha=0.3)
    left.legend(fontsize="x-small")
    observed = [p.loss for p in fit.points]
    fitted = [fit.predict(p.params, p.tokens) for p in fit.points]
    right.scatter(fitted, observed, s=18)
    span = [min(observed + fitted), max(observed + fitted)]
    right.plot(span, span, color="gray", linestyle=":", linewidth=1)
    right.set_xlabel("fitted loss")
    right.set_ylabel("observed loss")
    right.set_title("observed vs fitted")
    right.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    return path
