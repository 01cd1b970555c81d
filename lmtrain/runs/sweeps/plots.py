"""Plots as PNG files (matplotlib's Agg renderer: no window, works over SSH and in batch jobs).

loss.png for a run: training and validation loss against steps, the learning rate on a second axis.
summary.png for several runs: their validation curves overlaid and, when exactly one numeric parameter
varies, the objective against it.
"""

from __future__ import annotations

from pathlib import Path

from lmtrain.runs.sweeps.runs import Run


def _figure(width: float, height: float, columns: int = 1):
    """A figure and its axes, without pyplot: no global state, no window, no GUI backend to choose."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _xy(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig, path: Path) -> None:
    """Atomically: a viewer never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


def plot_run(run: Run, path: Path) -> None:
    """loss.png: train and validation loss against steps, learning rate on the right-hand axis."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = _figure(7, 4)
    if run.train_curve:
        ax.plot(*_xy(run.train_curve), label="train loss", color="tab:blue", linewidth=1)
    if run.val_curve:
        ax.plot(*_xy(run.val_curve), label="validation loss", color="tab:orange", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if run.lr_curve:
        lr_ax = ax.twinx()
        lr_ax.plot(*_xy(run.lr_curve), label="learning rate", color="tab:gray", linestyle="--", linewidth=1)
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, loc="best", fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    name = run.folder.name
    ax.set_title(name if len(name) <= 70 else name[:67] + "...", fontsize="small")
    _save(fig, path)


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _label(run: Run, keys: list[str]) -> str:
    name = f"job {run.job}" if run.job is not None else run.folder.name
    params = ", ".join(f"{k.rsplit('.', 1)[-1]}={run.overrides.get(k, '')}" for k in keys)
    label = f"{name}: {params}" if params else name
    return label if len(label) <= 60 else label[:57] + "..."


def plot_runs(runs: list[Run], keys: list[str], objective: str, path: Path) -> None:
    """summary.png: validation curves overlaid; beside them, the objective against the one numeric swept key."""
    from matplotlib.ticker import MaxNLocator, NullFormatter

    values = _numeric([r.overrides.get(keys[0], "") for r in runs]) if len(keys) == 1 else None
    fig, axes = _figure(12 if values else 7, 4.5, 2 if values else 1)
    curves = axes[0]
    for run in runs:
        if run.val_curve:
            style = "-" if run.status in ("completed", "-") else ":"
            curves.plot(*_xy(run.val_curve), style, marker="o", markersize=3, label=_label(run, keys))
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss")
    curves.set_title("validation loss (dotted: not completed)", fontsize="small")
    curves.grid(alpha=0.3)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize="small")
    if values:
        ax = axes[1]
        scored = [(x, r.metric(objective)) for x, r in zip(values, runs, strict=True)]
        points = sorted((x, y) for x, y in scored if y is not None)
        if points:
            ax.plot(*_xy(points), marker="o")
            best = min(points, key=lambda p: p[1])
            ax.annotate(f"best {best[1]:.4f}", best, textcoords="offset points", xytext=(5, 8), fontsize="small")
        failed = [x for x, y in scored if y is None]
        for x in failed:
            ax.axvline(x, color="tab:red", linestyle=":", linewidth=1)
        positive = [x for x in values if x > 0]
        if len(positive) == len(values) and max(positive) / min(positive) >= 10:
            ax.set_xscale("log")
        if len(set(values)) <= 12:  # ticks at the values tried, written as they were given
            ticks = dict(zip(values, (r.overrides.get(keys[0], "") for r in runs), strict=True))
            ax.set_xticks(list(ticks), list(ticks.values()))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(keys[0])
        ax.set_ylabel(objective)
        ax.set_title(f"{objective} against {keys[0]}" + (" (red: failed)" if failed else ""), fontsize="small")
        ax.grid(alpha=0.3)
    _save(fig, path)
