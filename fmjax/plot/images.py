"""Image grids: flat samples (n, H*W*C) shown as H x W pictures, e.g. digits from a flow."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from jaxtyping import ArrayLike, Float
from matplotlib.figure import Figure

from fmjax import _checks
from fmjax.plot._style import _finish, styled

__all__ = ["image_rows"]


@styled
def image_rows(
    rows: Mapping[str, Float[ArrayLike, "n d"]],
    image_shape: tuple[int, int, int],
    *,
    ncols: int = 10,
    lim: tuple[float, float] = (-1.0, 1.0),
    title: str = "Images",
    size: float = 0.7,
    path: str | os.PathLike | None = None,
) -> Figure:
    """One row of ``ncols`` images per entry of ``rows`` (label -> flat images), grey scale.

    Args:
        rows: mapping from a row label to (n, H*W*C) flat images (or (n, H, W, C)); the first
            ``ncols`` are shown.
        image_shape: (H, W, C) with C = 1 (grey) or 3 (RGB).
        ncols: images per row.
        lim: (black, white) pixel values; values outside are clipped.
        title: figure title.
        size: inches per image.
        path: PNG path to write, or None.

    Returns:
        the Figure.
    """
    fn = "plot.image_rows"
    _checks.check_instance(fn, "rows", rows, Mapping, "a mapping label -> (n, d) images")
    if not rows:
        _checks.fail(fn, "rows", "a non-empty mapping label -> (n, d) images", rows)
    ncols = _checks.check_int(fn, "ncols", ncols)
    h, w, c = (int(v) for v in image_shape)
    if c not in (1, 3):
        _checks.fail(fn, "image_shape", "(H, W, C) with C = 1 or 3", image_shape)
    fig = Figure(figsize=(size * ncols + 1.2, size * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for i, (label, x) in enumerate(rows.items()):
        x = np.asarray(x, float).reshape(-1, h, w, c)
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < x.shape[0]:
                img = np.clip((x[j] - lim[0]) / (lim[1] - lim[0]), 0.0, 1.0)
                ax.imshow(img[..., 0] if c == 1 else img, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_ylabel(str(label), rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title)
    return _finish(fig, path)
