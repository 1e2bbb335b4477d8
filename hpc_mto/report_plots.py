"""The report's PNG figures: validation curves with transfer events, the CV matrix, who fed whom.

Figures are built with matplotlib's object API on a Figure of their own (rendered by Agg), never
through pyplot: no global backend switch, no display needed, nothing left open between calls.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atomic import atomic_write

ANNOTATE_MAX_CELLS = 200  # beyond this the numbers in the cells are unreadable anyway


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def curves(d) -> bytes:
    """Validation accuracy per task against epochs completed (training accuracy for tasks without a
    validation set); a dot where the task adopted a transfer."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    key = "val_acc" if d.cfg.data.val_fraction > 0 else "train_acc"
    for t, metrics in enumerate(d.metrics):
        val = {m.epochs_done: getattr(m, key) for m in metrics}
        (line,) = ax.plot(list(val), list(val.values()), label=f"task {t}")
        # A transfer at epoch E follows the evaluation of the E-th epoch: mark that point.
        adopted = [r.epoch for r in d.transfers[t] if r.accepted and r.epoch in val]
        ax.plot(adopted, [val[e] for e in adopted], "o", color=line.get_color())
    if not any(d.metrics):
        ax.text(0.5, 0.5, "no epoch finished yet", ha="center", va="center", transform=ax.transAxes)
    ax.plot([], [], "o", color="gray", label="transfer accepted")
    what = "validation accuracy" if key == "val_acc" else "training accuracy (no validation sets)"
    ax.set(xlabel="epochs completed", ylabel=what, title=f"{what} per task")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return png(fig)


def heatmap(values: np.ndarray, row_labels, col_labels, title: str, fmt: str, highlight: int | None = None) -> bytes:
    rows, cols = values.shape
    fig = Figure(figsize=(1.2 + 0.8 * cols, 1.2 + 0.45 * rows))
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(cols), col_labels)
    ax.set_yticks(range(rows), row_labels)
    ax.set_title(title)
    if values.size <= ANNOTATE_MAX_CELLS:
        mid = (np.nanmax(values) + np.nanmin(values)) / 2
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                    color="black" if v > mid else "white")
    if highlight is not None:
        ax.add_patch(_row_box(highlight, cols))
    return png(fig)


def _row_box(row: int, cols: int):
    from matplotlib.patches import Rectangle

    return Rectangle((-0.5, row - 0.5), cols, 1, fill=False, edgecolor="red", linewidth=2.5)


def cv_matrix(cv: dict) -> bytes:
    acc = np.asarray(cv["acc"])
    labels = [f"{name} (mean {m:.3f})" for name, m in zip(cv["rows"], cv["row_means"])]
    return heatmap(acc, labels, [f"val {j}" for j in range(acc.shape[1])],
                   "CV accuracy: candidate x validation set (red: selected)", ".3f", cv["selected"])


def transfer_matrix(counts: list[list[int]]) -> bytes:
    k = len(counts)
    return heatmap(np.asarray(counts), [f"from task {i}" for i in range(k)], [f"to {j}" for j in range(k)],
                   "accepted transfers: source -> target", "d")


def figures(d, s: dict) -> dict[str, bytes]:
    out = {"val_curves.png": curves(d), "transfers.png": transfer_matrix(s["transfer_counts"])}
    if s["cv"] is not None:
        out["cv_matrix.png"] = cv_matrix(s["cv"])
    return out


def write_all(d, s: dict, directory: Path) -> dict[str, bytes]:
    """Render every figure, write each into ``directory``, and return them for embedding."""
    images = figures(d, s)
    for name, data in images.items():
        with atomic_write(directory / name) as f:
            f.write(data)
    return images
