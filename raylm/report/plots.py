"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes."""

from __future__ import annotations

import io


def _figure(width: float = 6.4, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=100)


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _text(label) -> str:
    """A label as matplotlib shows it literally (a `$` would start its math mode)."""
    return str(label).replace("$", r"\$")


def curves(series: dict[str, list[tuple[float, float]]], ylabel: str, log: bool = False) -> bytes:
    """One line per named series of (step, value) points."""
    plt, fig, ax = _figure()
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(points) < 20 else None, markersize=3, label=_text(name))
    ax.set_xlabel("step")
    ax.set_ylabel(_text(ylabel))
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _png(plt, fig)


def bars(labels: list[str], values: list[float], ylabel: str) -> bytes:
    plt, fig, ax = _figure(max(4.0, 1.1 * len(labels) + 2), 3.0)
    ax.bar(range(len(labels)), values, color="#4c72b0")
    ax.set_xticks(range(len(labels)), [_text(label) for label in labels], rotation=20, ha="right")
    ax.set_ylabel(_text(ylabel))
    for i, value in enumerate(values):
        ax.annotate(f"{value:.4g}", (i, value), ha="center", va="bottom", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(plt, fig)


STATUS_COLOURS = {"complete": "#55a868", "running": "#4c72b0", "serving": "#4c72b0", "stopped": "#8c8c8c"}


def stage_graph(stages: dict[str, dict], order: list[str]) -> bytes:
    """The pipeline's stages as boxes in columns by depth, an arrow from each stage to each reader,
    coloured by status."""
    depth: dict[str, int] = {}
    for name in order:
        parents = [p["stage"] for p in stages[name].get("parents", []) if p["stage"] in depth]
        depth[name] = 1 + max((depth[p] for p in parents), default=-1)
    columns: dict[int, list[str]] = {}
    for name in order:
        columns.setdefault(depth[name], []).append(name)
    rows = max(len(c) for c in columns.values())
    plt, fig, ax = _figure(2.2 * len(columns) + 0.5, 1.0 * rows + 0.8)
    where = {}
    for column, names in columns.items():
        for i, name in enumerate(names):
            where[name] = (column * 2.2, (len(names) - 1) / 2 - i)
    for name in order:
        for parent in stages[name].get("parents", []):
            if parent["stage"] in where:
                (x0, y0), (x1, y1) = where[parent["stage"]], where[name]
                ax.annotate(
                    "", (x1 - 0.8, y1), (x0 + 0.8, y0), arrowprops={"arrowstyle": "->", "color": "#555"}
                )
    for name, (x, y) in where.items():
        status = stages[name].get("status", "not run")
        ax.text(
            x,
            y,
            _text(f"{name}\n{stages[name].get('kind')} · {status}"),
            ha="center",
            va="center",
            fontsize=8,
            color="white",
            bbox={
                "boxstyle": "round",
                "facecolor": STATUS_COLOURS.get(status, "#c44e52"),
                "edgecolor": "none",
            },
        )
    ax.set_xlim(-1.1, 2.2 * (len(columns) - 1) + 1.1)
    ax.set_ylim(-rows / 2 - 0.2, rows / 2 + 0.2)
    ax.axis("off")
    return _png(plt, fig)
