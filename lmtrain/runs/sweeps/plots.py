"""Plots as PNG files (matplotlib's Agg renderer: no window, works over SSH and in batch jobs).

loss.png for a run: training and validation loss against steps, the learning rate on a second axis.
summary.png for several runs: their validation curves overlaid and the objective against each swept parameter,
every axis chosen from the completed runs.
"""

from __future__ import annotations

import math
from pathlib import Path

from lmtrain.runs.sweeps.runs import Run, short_value


def _figure(width: float, height: float, columns: int = 1, rows: int = 1):
    """A figure and its axes (a flat list), without pyplot: no global state, no window, no GUI backend to choose."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, list(fig.subplots(rows, columns, squeeze=False).flat)


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
    params = ", ".join(f"{k.rsplit('.', 1)[-1]}={short_value(run.value(k))}" for k in keys)
    label = f"{name}: {params}" if params else name
    return label if len(label) <= 60 else label[:57] + "..."


def _log_scale(values: list[float]) -> bool:
    """A log axis for values that are all positive and span a decade or more."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 10


MAX_PARAMETER_PANELS = 6


def plot_runs(runs: list[Run], keys: list[str], objective: str, path: Path) -> None:
    """summary.png: validation curves overlaid; beside them, the objective against each swept parameter. Every
    axis is chosen from the completed runs, so a failed run's extreme value (lr=1e9) cannot squash the rest:
    a failed run is marked in red where its value falls, or at the edge of the axis beyond it."""
    panels = 1 + min(len(keys), MAX_PARAMETER_PANELS)
    columns = min(panels, 3)
    rows = -(-panels // columns)
    fig, axes = _figure(5.5 * columns if panels > 1 else 7, 4.5 * rows, columns, rows)
    _curves(axes[0], runs, keys)
    for ax, key in zip(axes[1:panels], keys, strict=False):
        _objective_against(ax, runs, key, objective, joined=len(keys) == 1)
    for ax in axes[panels:]:
        ax.set_visible(False)
    _save(fig, path)


def _curves(ax, runs: list[Run], keys: list[str]) -> None:
    from matplotlib.ticker import MaxNLocator

    done = [loss for r in runs if r.status in ("completed", "-") for _, loss in r.val_curve if math.isfinite(loss)]
    for run in runs:
        if run.val_curve:
            style = "-" if run.status in ("completed", "-") else ":"
            ax.plot(*_xy(run.val_curve), style, marker="o", markersize=3, label=_label(run, keys))
    if done:  # the completed runs' range: a diverged curve runs off the axis instead of flattening the others
        low, high = min(done), max(done)
        if _log_scale(done):
            ax.set_yscale("log")
            ax.set_ylim(low / 1.2, high * 1.2)
        else:
            margin = (high - low) * 0.1 or abs(high) * 0.05 or 0.1
            ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss (dotted: not completed)", fontsize="small")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _objective_against(ax, runs: list[Run], key: str, objective: str, joined: bool) -> None:
    """The objective of each completed run against its value of `key` (numbers on a linear or log axis, else
    categories); the others (failed, diverged, stopped) as red marks at the bottom."""
    from matplotlib.ticker import NullFormatter

    texts = [r.value(key) for r in runs]
    scored = [(t, r.metric(objective) if r.status in ("completed", "-") else None)
              for t, r in zip(texts, runs, strict=True)]
    good = [(t, y) for t, y in scored if y is not None]
    numbers = _numeric([t for t, _ in good]) if good else None
    if numbers is not None:
        position = {t: x for (t, _), x in zip(good, numbers, strict=True)}
        low, high = min(numbers), max(numbers)
        log = _log_scale(numbers)
        if log:
            ax.set_xscale("log")
        span = (high / low if log else high - low) or 1.0
        edges = (low / span ** 0.08, high * span ** 0.08) if log else (low - 0.08 * span, high + 0.08 * span)
        if low == high:
            edges = (low / 2, high * 2) if log else (low - 1, high + 1)
        ax.set_xlim(*edges)
        points = sorted((position[t], y) for t, y in good)
        ax.plot(*_xy(points), marker="o", linestyle="-" if joined else "none")
        distinct = sorted(set(numbers))
        if len(distinct) <= 12:  # ticks at the values tried, written as given (rounded when drawn by a search)
            shown = {position[t]: short_value(t) for t, _ in good}
            ax.set_xticks(distinct, [shown[x] for x in distinct])
            ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        categories = sorted(set(texts))
        position = {t: float(i) for i, t in enumerate(categories)}
        ax.set_xticks(range(len(categories)), [short_value(c) for c in categories], rotation=20)
        ax.plot([position[t] for t, _ in good], [y for _, y in good], marker="o", linestyle="none")
    if good:
        ys = [y for _, y in good]
        margin = (max(ys) - min(ys)) * 0.1 or abs(max(ys)) * 0.05 or 0.1
        ax.set_ylim(min(ys) - 2.5 * margin, max(ys) + 1.5 * margin)  # room below for the marks of failed runs
        best = min(good, key=lambda p: p[1])
        ax.annotate(f"best {best[1]:.4f}", (position[best[0]], best[1]), textcoords="offset points", xytext=(5, 8),
                    fontsize="small")
    failed = [t for t, y in scored if y is None]
    if failed:
        _mark_failed(ax, failed, position, numbers is not None)
    ax.set_xlabel(key)
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} against {key}" + (" (red: not completed)" if failed else ""), fontsize="small")
    ax.grid(alpha=0.3)


def _mark_failed(ax, failed: list[str], position: dict[str, float], numeric: bool) -> None:
    """Red marks at the bottom of the axis for runs without an objective: where their value falls, or at the
    edge of the axis (with the value written) when it lies beyond the completed runs' range."""
    low, high = ax.get_xlim()
    bottom = ax.get_xaxis_transform()  # x in data, y as a fraction of the axis height
    for text in failed:
        x = position.get(text)
        if x is None and numeric:
            try:
                x = float(text)
            except ValueError:
                x = high
        beyond = x is None or not low <= x <= high
        shown = min(max(x if x is not None else high, low), high)
        ax.plot([shown], [0.04], transform=bottom, marker=">" if beyond and shown == high else
                "<" if beyond else "x", color="tab:red", markersize=8, clip_on=False)
        if beyond:
            ax.annotate(short_value(text), (shown, 0.04), xycoords=bottom, textcoords="offset points",
                        xytext=(-4 if shown == high else 4, 8), ha="right" if shown == high else "left",
                        fontsize="x-small", color="tab:red")
