"""The figures of benchmarks/ablations.py, from its results:

* ``*_curves.png``: eval loss against tokens, one panel per group (seed 0);
* ``*_lr.png``: final eval loss against the peak learning rate per model, and each model's
  seeds at its best rate (mean ± standard deviation);
* ``*_diagnostics.png``: per layer over training, for the main models at 3e-3: the attention's
  entropy and top-key weight, the range of its scores (1% to 99%), the attention branch's size
  against the residual stream, and the gradient norms of the attention's projections;
* ``*_branch.png``: every trial's final eval loss against the size of block 0's attention branch
  (against the residual stream) early in training, log scale, diverged trials on top.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llama3.plot import pyplot, save_figure

PANELS = ("width", "branch", "init", "scale", "mixer", "lr", "context", "seeds")
LAYER_METRICS = (
    ("entropy", "attention entropy / log(keys)"),
    ("top_share", "largest weight of a row"),
    ("score_range", "scores: 1% to 99% quantile"),
    ("branch_ratio", "rms(attention branch) / rms(residual), log scale"),
)
GRADIENT_ROLES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo")


def write_figures(
    output: Path,
    results: list[dict[str, Any]],
    seeds: dict[str, Any],
    plan: Any,
    early: dict[str, Any],
) -> list[Path]:
    stem = Path(output).with_suffix("")
    what = (
        f"{plan.base['n_layers']} layers, dim {plan.base['dim']}, {plan.steps} steps of "
        f"{plan.batch_size * plan.context:,} tokens, CPU"
    )
    return [
        curves(f"{stem}_curves.png", results, seeds, what),
        rates(f"{stem}_lr.png", results, seeds, plan, what),
        diagnostics(f"{stem}_diagnostics.png", results, plan, what),
        branch(f"{stem}_branch.png", early, what),
    ]


def curves(path: str, results: list[dict[str, Any]], seeds: dict[str, Any], what: str) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(22, 9))
    for ax, group in zip(axes.flat, PANELS):
        if group == "seeds":
            _seed_curves(ax, seeds)
        for i, r in enumerate(r for r in results if group in r["groups"] and r["seed"] == 0):
            if group != "seeds":
                xs = [p["tokens"] for p in r["eval_curve"]]
                ax.plot(
                    xs,
                    [_nan(p["loss"]) for p in r["eval_curve"]],
                    color=f"C{i % 10}",
                    marker="o",
                    markersize=2,
                    linewidth=1,
                    label=_name(r, group),
                )
        ax.set_title(group)
        ax.set_xlabel("tokens trained on")
        ax.set_ylabel("eval loss (nats/token)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    return save_figure(fig, path, f"Ablations: eval loss against tokens ({what})")


def _seed_curves(ax: Any, seeds: dict[str, Any]) -> None:
    for i, (model, s) in enumerate(seeds.items()):
        xs = [p["tokens"] for p in s["curve"]]
        mean = [p["mean"] for p in s["curve"]]
        std = [p["std"] if p["std"] == p["std"] else 0.0 for p in s["curve"]]
        ax.plot(
            xs,
            mean,
            color=f"C{i}",
            linewidth=1,
            label=f"{model}, lr {s['lr']:g}: {s['mean']:.3f} ± {s['std']:.3f}",
        )
        ax.fill_between(
            xs,
            [m - d for m, d in zip(mean, std)],
            [m + d for m, d in zip(mean, std)],
            color=f"C{i}",
            alpha=0.25,
        )


def _name(r: dict[str, Any], group: str) -> str:
    extra = {"lr": f", lr {r['lr']:g}", "context": f", context {r['context']}"}.get(group, "")
    loss = r["final_eval_loss"]
    return f"{r['label']}{extra}: " + (
        f"{loss:.3f}" if loss is not None else f"diverged at step {r['diverged_at_step']}"
    )


def _nan(x: float | None) -> float:
    """A diverged evaluation (None) as a gap in the line."""
    return math.nan if x is None else x


def rates(
    path: str, results: list[dict[str, Any]], seeds: dict[str, Any], plan: Any, what: str
) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, model in enumerate(plan.models):
        sweep = sorted(
            (r for r in results if "lr" in r["groups"] and r["model"] == model),
            key=lambda r: r["lr"],
        )
        ax.plot(
            [r["lr"] for r in sweep],
            [_nan(r["final_eval_loss"]) for r in sweep],
            color=f"C{i}",
            marker="o",
            label=f"{model} (seed 0)"
            + "".join(f"; lr {r['lr']:g} diverged" for r in sweep if r["final_eval_loss"] is None),
        )
        if model in seeds:
            s = seeds[model]
            ax.errorbar(
                [s["lr"]],
                [s["mean"]],
                yerr=[s["std"]],
                color=f"C{i}",
                marker="s",
                capsize=4,
                markersize=7,
                label=f"{model}, {len(s['losses'])} seeds",
            )
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path, f"Learning-rate sweep ({what})")


def diagnostics(path: str, results: list[dict[str, Any]], plan: Any, what: str) -> Path:
    """Rows: layers, then gradient norms; columns: the metrics."""
    plt = pyplot()
    main = [
        r
        for r in results
        if "lr" in r["groups"] and r["lr"] == plan.lr and r["seed"] == 0 and r["diagnostics"]
    ]
    n_layers = plan.base["n_layers"]
    fig, axes = plt.subplots(
        n_layers + 1, len(LAYER_METRICS), figsize=(18, 3.2 * (n_layers + 1)), squeeze=False
    )
    for i, r in enumerate(main):
        steps = [d["step"] for d in r["diagnostics"]]
        for layer in range(n_layers):
            for ax, (metric, title) in zip(axes[layer], LAYER_METRICS):
                _layer_series(ax, steps, r, layer, metric, f"C{i}")
                ax.set_title(f"block {layer}: {title}", fontsize=9)
                if metric == "branch_ratio":  # spans two orders of magnitude between models
                    ax.set_yscale("log")
        for ax, role in zip(axes[n_layers], GRADIENT_ROLES):
            norms = [d["grad_norms"].get(role, float("nan")) for d in r["diagnostics"]]
            ax.plot(steps, norms, color=f"C{i}", marker="o", markersize=2, label=r["model"])
            ax.set_title(f"gradient norm of {role}", fontsize=9)
            ax.set_yscale("log")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path, f"What the attention does during training ({what})")


def _layer_series(
    ax: Any, steps: list[int], r: dict[str, Any], layer: int, metric: str, color: str
) -> None:
    values = [d["layers"][layer] for d in r["diagnostics"]]
    if metric == "score_range":
        ax.fill_between(
            steps,
            [v["score_q01"] for v in values],
            [v["score_q99"] for v in values],
            color=color,
            alpha=0.2,
        )
        ax.plot(steps, [v["score_q50"] for v in values], color=color, linewidth=1, label=r["model"])
        return
    ax.plot(
        steps, [v[metric] for v in values], color=color, marker="o", markersize=2, label=r["model"]
    )


def branch(path: str, early: dict[str, Any], what: str) -> Path:
    """Final eval loss against block 0's early branch ratio, one colour per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    rows = early["rows"]
    finite = [r["final_eval_loss"] for r in rows if r["final_eval_loss"] is not None]
    top = max(finite, default=1.0) + 0.1
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        for diverged in (False, True):
            points = [r for r in mine if (r["final_eval_loss"] is None) == diverged]
            if points:
                ax.scatter(
                    [r["block0_branch_ratio"] for r in points],
                    [top if diverged else r["final_eval_loss"] for r in points],
                    color=f"C{i % 10}",
                    marker="x" if diverged else "o",
                    label=model + (" (diverged, drawn at the top)" if diverged else ""),
                )
    ax.set_xscale("log")
    ax.set_xlabel(f"block 0: rms(attention branch) / rms(residual) at step {early['step']}")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_figure(fig, path, f"Final loss against block 0's branch size\n({what})")
