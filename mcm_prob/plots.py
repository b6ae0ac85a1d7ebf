"""Pictures of samples: grids of images, one row per sampler when several are compared."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._checks import integer

__all__ = ["image_grid"]


def _images(name: str, x, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(x, np.float64)
    size = shape[0] * shape[1]
    if arr.ndim == 3 and arr.shape[1:] == shape:
        arr = arr.reshape(arr.shape[0], size)
    if arr.ndim != 2 or arr.shape[1] != size or arr.shape[0] == 0:
        raise ValueError(
            f"`{name}` must have shape (n, {size}) or (n, {shape[0]}, {shape[1]}) with n >= 1 "
            f"for images of shape {shape}, got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite")
    return arr.reshape(-1, *shape)


def image_grid(
    samples,
    shape: tuple[int, int] = (8, 8),
    *,
    ncols: int = 10,
    limits: tuple[float, float] | None = None,
    cmap: str = "gray_r",
    cell: float = 0.6,
):
    """A figure of images: `samples` of shape (n, h * w) or (n, h, w) as a grid of `ncols`
    columns, or a dict label -> samples as one row of up to `ncols` images per label, the label
    on the left (e.g. the exact-flow sampler's draws above those of learned samplers).

    - `shape`: (h, w) of one image (default 8 x 8, the digits).
    - `limits`: the grey scale's (low, high), shared by every image; default the range of all
      samples shown (pass the data's range, e.g. (-1, 1), to compare figures).
    - `cmap`: matplotlib colour map (``"gray_r"``: high values dark, ink on paper).
    - `cell`: inches per image.

    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if not (isinstance(shape, (tuple, list)) and len(shape) == 2):
        raise ValueError(f"`shape` must be (height, width), got {shape!r}")
    shape = (integer("shape[0]", shape[0]), integer("shape[1]", shape[1]))
    ncols = integer("ncols", ncols)
    if isinstance(samples, Mapping):
        if not samples:
            raise ValueError("`samples` must not be an empty dict")
        rows = {str(k): _images(f"samples[{k!r}]", v, shape)[:ncols] for k, v in samples.items()}
        ncols = max(len(v) for v in rows.values())
        grid = list(rows.items())
    else:
        imgs = _images("samples", samples, shape)
        ncols = min(ncols, len(imgs))
        grid = [(None, imgs[i : i + ncols]) for i in range(0, len(imgs), ncols)]
    if limits is None:
        every = np.concatenate([g[1].ravel() for g in grid])
        limits = (float(every.min()), float(every.max()))
    low, high = limits
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"`limits` must be finite (low, high) with low < high, got {limits!r}")
    labelled = any(label is not None for label, _ in grid)
    fig, axes = plt.subplots(
        len(grid),
        ncols,
        figsize=(cell * ncols + (1.2 if labelled else 0.0), cell * len(grid)),
        squeeze=False,
    )
    for r, (label, imgs) in enumerate(grid):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c], cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
            else:
                ax.axis("off")
        if label is not None:
            axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.2 if labelled else 0.02, right=0.98)
    return fig
