"""PNG figures for the diagnostics: spectra, cosine heatmaps, loss curves.

matplotlib is imported inside each function and drawn on an Agg canvas through the
object-oriented API (no pyplot, no global backend switch), so importing gti_jax never needs
matplotlib or a display, and callers' own pyplot state is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gti_jax.io.atomic import atomic_write

__all__ = ["plot_cosine_heatmap", "plot_loss_curves", "plot_spectra"]

# Floor for normalized singular values on the log axis (exact mean init gives ~1e-17).
_LOG_FLOOR = 1e-16


def _png_path(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(p)!r}; rename it.")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    """Writes the PNG atomically (a temporary file renamed into place)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)


def plot_spectra(
    spectra: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "Singular-value spectrum of new-token embeddings",
) -> Path:
    """Overlays normalized singular-value spectra ``s_i / s_0`` on a log axis, one per stage.

    Mean init shows one value then a cliff; GTI a slow decay.

    Args:
      spectra: label (e.g. ``"mean init"``, ``"after GTI"``) -> singular values, largest first
        (as from ``geometry.singular_values`` or ``summarize(...)["singular_values"]``).
      path: output ``.png``; parent folders are created.
      title: figure title.

    Returns:
      The path written.

    >>> import numpy as np, tempfile, os
    >>> out = plot_spectra({"random": [3.0, 2.0, 1.0]}, os.path.join(tempfile.mkdtemp(), "s.png"))
    >>> out.read_bytes()[:4]
    b'\\x89PNG'
    """
    if not spectra:
        raise ValueError("spectra is empty; pass {label: singular_values}.")
    curves = {}
    for label, s in spectra.items():
        a = np.asarray(s, dtype=np.float64).reshape(-1)
        if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"spectrum {label!r} must be non-empty, finite and >= 0.")
        if a.max() <= 0:
            raise ValueError(f"spectrum {label!r} is all zero; nothing to normalize.")
        a = np.sort(a)[::-1]
        curves[label] = np.maximum(a / a[0], _LOG_FLOOR)
    p = _png_path(path)
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    for label, a in curves.items():
        ax.plot(np.arange(a.size), a, marker="." if a.size <= 64 else None, label=str(label))
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_0")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, p)


def plot_cosine_heatmap(
    matrix: Any,
    path: str | Path,
    *,
    split: int | None = None,
    labels: Sequence[str] | None = None,
    order: Sequence[int] | np.ndarray | None = None,
    title: str = "Pairwise cosine similarity",
) -> Path:
    """Draws a cosine matrix as a heatmap on ``[-1, 1]``.

    Typical uses: 50 old + 50 new tokens at init with ``split=50`` (a line between the
    blocks); the new-new matrix after training with ``order`` sorting tokens by semantic ID so
    the code hierarchy shows as blocks.

    Args:
      matrix: ``[N, M]`` cosines (e.g. ``geometry.cosine_matrix(rows)``).
      path: output ``.png``; parent folders are created.
      split: draw lines after this many rows/columns (after reordering).
      labels: ``N`` tick labels (in the original order; shown when ``N <= 60``).
      order: a permutation of ``range(N)`` applied to rows and columns (square only).
      title: figure title.

    Returns:
      The path written.

    >>> import numpy as np, tempfile, os
    >>> m = np.eye(4)
    >>> out = plot_cosine_heatmap(m, os.path.join(tempfile.mkdtemp(), "c.png"), split=2)
    >>> out.stat().st_size > 0
    True
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"matrix must be a non-empty 2-D [N, M] array, got shape {m.shape}.")
    n, cols = m.shape
    tick_labels = None if labels is None else [str(x) for x in labels]
    if tick_labels is not None and len(tick_labels) != n:
        raise ValueError(f"labels has {len(tick_labels)} entries, the matrix has {n} rows.")
    if order is not None:
        perm = np.asarray(order, dtype=np.int64).reshape(-1)
        if n != cols:
            raise ValueError(f"order needs a square matrix, got shape {m.shape}.")
        if perm.size != n or not np.array_equal(np.sort(perm), np.arange(n)):
            raise ValueError(f"order must be a permutation of range({n}).")
        m = m[np.ix_(perm, perm)]
        if tick_labels is not None:
            tick_labels = [tick_labels[i] for i in perm]
    if split is not None and not 0 < split < max(n, cols):
        raise ValueError(f"split must be in (0, {max(n, cols)}), got {split}.")

    p = _png_path(path)
    side = float(np.clip(max(n, cols) / 12.0, 4.0, 12.0))
    fig = _new_figure((side + 1.2, side))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine")
    if split is not None:
        if split < n:
            ax.axhline(split - 0.5, color="black", linewidth=1.0)
        if split < cols:
            ax.axvline(split - 0.5, color="black", linewidth=1.0)
    if tick_labels is not None and n <= 60:
        ax.set_yticks(np.arange(n), tick_labels, fontsize=6)
        if n == cols:
            ax.set_xticks(np.arange(n), tick_labels, fontsize=6, rotation=90)
    ax.set_title(title)
    return _save(fig, p)


def plot_loss_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "Training loss",
    log_y: bool = False,
) -> Path:
    """Plots loss against step, one line per run or stage.

    Args:
      curves: label -> ``(steps, losses)`` of equal length.
      path: output ``.png``; parent folders are created.
      title: figure title.
      log_y: log-scale the loss axis.

    Returns:
      The path written.

    >>> import tempfile, os
    >>> out = plot_loss_curves({"gti": ([0, 1, 2], [3.0, 2.0, 1.5])},
    ...                        os.path.join(tempfile.mkdtemp(), "l.png"))
    >>> out.suffix
    '.png'
    """
    if not curves:
        raise ValueError("curves is empty; pass {label: (steps, losses)}.")
    data = {}
    for label, pair in curves.items():
        if len(pair) != 2:
            raise ValueError(f"curve {label!r} must be a (steps, losses) pair.")
        steps = np.asarray(pair[0], dtype=np.float64).reshape(-1)
        losses = np.asarray(pair[1], dtype=np.float64).reshape(-1)
        if steps.size != losses.size or steps.size == 0:
            raise ValueError(
                f"curve {label!r}: steps and losses must be non-empty and of equal length, "
                f"got {steps.size} and {losses.size}."
            )
        data[label] = (steps, losses)
    p = _png_path(path)
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    for label, (steps, losses) in data.items():
        ax.plot(steps, losses, label=str(label))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, p)
