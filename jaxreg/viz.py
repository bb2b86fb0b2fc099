"""Matplotlib quality-control figures for a registration."""
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _slice(volume, axis=-1, index=None):
    """Middle slice of a 2D/3D array (2D passes through) as float."""
    v = np.asarray(volume, np.float32)
    if v.ndim == 2:
        return v
    axis = axis % 3
    index = v.shape[axis] // 2 if index is None else index
    return np.take(v, index, axis=axis)


def _norm(img):
    lo, hi = np.percentile(img, [1, 99])
    return np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)


def checkerboard(a, b, tiles: int = 8):
    """Checkerboard of two equally shaped 2D images (``tiles`` per side)."""
    ys, xs = np.indices(a.shape)
    board = ((ys * tiles // a.shape[0]) + (xs * tiles // a.shape[1])) % 2 == 0
    return np.where(board, _norm(a), _norm(b))


def qc_figure(fixed, moving, warped, disp, jacobian_det, path, *, overwrite: bool = False, title: str = "",
              keypoints=None, slab: float = 5.0):
    """Save a QC figure: overlays and checkerboards before/after, deformed grid, Jacobian map.

    All inputs live on the fixed grid (``moving`` already resampled into it).

    Args:
      fixed, moving, warped: ``(*spatial)`` images (2D or 3D; 3D shows the
        middle slice of the last axis, axial for RAS scans).
      disp: ``(*spatial, D)`` displacement (voxels) used to draw the deformed grid.
      jacobian_det: ``(*spatial)`` Jacobian determinant of the map.
      path: output PNG path, written atomically.
      overwrite: replace an existing file.
      title: figure title.
      keypoints: optional ``(moving_kp, fixed_kp)``, each ``(N, D)`` in fixed
        voxel coordinates: the moving keypoints (through the headers only) are
        drawn as green dots on "overlay before", the fixed keypoints as
        magenta crosses on "overlay after" (KeyMorph); for 3D, those within
        ``slab`` voxels of the shown slice.

    Raises:
      FileExistsError: if ``path`` exists and ``overwrite`` is False.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (use overwrite)")
    f, m, w = (_slice(x) for x in (fixed, moving, warped))
    j = _slice(jacobian_det)
    u = np.asarray(disp, np.float32)
    d = u.shape[-1]
    if d == 3:
        k = u.shape[2] // 2
        u2 = u[:, :, k, :2]
    else:
        u2 = u
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    overlay = lambda a, b: np.stack([_norm(a), _norm(b), _norm(a)], -1)  # noqa: E731  magenta/green
    panels = [
        (overlay(f, m), "overlay before (fixed magenta, moving green)"),
        (checkerboard(f, m), "checkerboard before"),
        (None, "deformed grid"),
        (overlay(f, w), "overlay after"),
        (checkerboard(f, w), "checkerboard after"),
        (None, "Jacobian determinant"),
    ]
    for ax, (img, name) in zip(axes.ravel(), panels):
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        if img is not None:
            if img.ndim == 3:
                ax.imshow(np.transpose(img, (1, 0, 2)), origin="lower")
            else:
                ax.imshow(img.T, origin="lower", cmap="gray")
    if keypoints is not None:
        for ax, pts, style in ((axes[0, 0], keypoints[0], "g."), (axes[1, 0], keypoints[1], "mx")):
            pts = np.asarray(pts, np.float64)
            if d == 3:
                pts = pts[np.abs(pts[:, 2] - k) <= slab]
            ax.plot(pts[:, 0], pts[:, 1], style, ms=4)
            ax.set_xlim(-0.5, f.shape[0] - 0.5)
            ax.set_ylim(-0.5, f.shape[1] - 0.5)
    ax = axes[0, 2]
    ax.imshow(_norm(w).T, origin="lower", cmap="gray")
    step = max(1, min(u2.shape[:2]) // 24)
    ys, xs = np.meshgrid(np.arange(u2.shape[0]), np.arange(u2.shape[1]), indexing="ij")
    gy, gx = ys + u2[..., 0], xs + u2[..., 1]
    for i in range(0, u2.shape[0], step):
        ax.plot(gy[i, :], gx[i, :], "y-", lw=0.5)
    for i in range(0, u2.shape[1], step):
        ax.plot(gy[:, i], gx[:, i], "y-", lw=0.5)
    ax = axes[1, 2]
    im = ax.imshow(j.T, origin="lower", cmap="RdBu_r", vmin=0, vmax=2)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
