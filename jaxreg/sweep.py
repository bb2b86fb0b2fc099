"""Lambda sweeps of lambda-conditioned networks (ContraReg's evaluation protocol, MICCAI 2022, Sec. 3-4).

A hypernetwork-conditioned model is one registration network per lambda. It
is evaluated at 17 lambdas, dense in [0, 0.2) and sparse in [0.2, 1]
(:data:`LAMBDA_SWEEP`), and tabled at the lambda that keeps folding below
0.5 % of the voxels with the best accuracy (ContraReg Table 1, following
Rohé et al.). :func:`select_lambda` makes that choice; :func:`plot_sweep`
draws accuracy, folding and SDlogJ against lambda.
"""
from __future__ import annotations

import math
import pathlib

LAMBDA_SWEEP = (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175,
                0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def parse_lambdas(spec: str) -> tuple[float, ...]:
    """``"sweep"`` -> :data:`LAMBDA_SWEEP`; else comma-separated values in [0, 1], sorted and deduplicated.

    Raises:
      ValueError: a value that is not a number in [0, 1], or an empty list.
    """
    if spec.strip() == "sweep":
        return LAMBDA_SWEEP
    try:
        vals = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--lambdas must be 'sweep' or comma-separated numbers in [0, 1], got {spec!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 or not math.isfinite(v) for v in vals):
        raise ValueError(f"--lambdas must be 'sweep' or comma-separated numbers in [0, 1], got {spec!r}")
    return tuple(sorted(set(vals)))


def select_lambda(rows: list[dict], *, score: str = "dice", higher_is_better: bool = True,
                  folding_key: str = "folding_percent", folding_limit: float = 0.5) -> dict | None:
    """The row (one per lambda, with ``lambda``) with the best ``score`` among those with folding < limit.

    Rows without a finite ``score`` are skipped. Returns None when no row
    qualifies (every lambda folds too much, or no scores).
    """
    ok = [r for r in rows if r.get(folding_key) is not None and r[folding_key] < folding_limit
          and r.get(score) is not None and math.isfinite(r[score])]
    if not ok:
        return None
    return (max if higher_is_better else min)(ok, key=lambda r: r[score])


def plot_sweep(rows: list[dict], path, *, scores=("dice",), title: str = "") -> pathlib.Path:
    """PNG of ``scores``, % folding and SDlogJ against lambda (one panel each); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in (*scores, "folding_percent", "sdlogj") if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    lams = [r["lambda"] for r in rows]
    for ax, k in zip(axes[0], keys):
        ax.plot(lams, [r.get(k) if r.get(k) is not None else float("nan") for r in rows], "o-", ms=3)
        if k == "folding_percent":
            ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("lambda")
        ax.set_title(k)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
