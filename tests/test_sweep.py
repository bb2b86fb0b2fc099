"""Lambda sweep helpers: the 17 lambdas of ContraReg's protocol, parsing, selection under the folding limit."""
import math

import pytest

from jaxreg.sweep import LAMBDA_SWEEP, parse_lambdas, plot_sweep, select_lambda


def test_the_sweep_is_17_lambdas_dense_below_0_2():
    assert len(LAMBDA_SWEEP) == 17 and LAMBDA_SWEEP == tuple(sorted(LAMBDA_SWEEP))
    assert sum(v < 0.2 for v in LAMBDA_SWEEP) == 8 and LAMBDA_SWEEP[0] == 0.0 and LAMBDA_SWEEP[-1] == 1.0
    dense = [b - a for a, b in zip(LAMBDA_SWEEP, LAMBDA_SWEEP[1:]) if b <= 0.2]
    sparse = [b - a for a, b in zip(LAMBDA_SWEEP, LAMBDA_SWEEP[1:]) if a >= 0.2]
    assert max(dense) < min(sparse)


def test_parse_lambdas():
    assert parse_lambdas("sweep") == LAMBDA_SWEEP
    assert parse_lambdas("0.5, 0.1,0.5") == (0.1, 0.5)
    for bad in ("", "a", "1.5", "-0.1", "nan"):
        with pytest.raises(ValueError):
            parse_lambdas(bad)


def test_select_lambda_respects_the_folding_limit_and_direction():
    rows = [{"lambda": 0.0, "dice": 0.8, "folding_percent": 2.0, "epe": 1.0},
            {"lambda": 0.1, "dice": 0.7, "folding_percent": 0.4, "epe": 1.5},
            {"lambda": 0.5, "dice": 0.6, "folding_percent": 0.0, "epe": 1.2},
            {"lambda": 1.0, "dice": math.nan, "folding_percent": 0.0, "epe": 3.0}]
    assert select_lambda(rows)["lambda"] == 0.1
    assert select_lambda(rows, score="epe", higher_is_better=False)["lambda"] == 0.5
    assert select_lambda(rows, folding_limit=0.1)["lambda"] == 0.5
    assert select_lambda(rows[:1]) is None


def test_plot_sweep_writes_a_png(tmp_path):
    rows = [{"lambda": v, "dice": v, "folding_percent": 1 - v, "sdlogj": 0.1} for v in (0.0, 0.5, 1.0)]
    path = plot_sweep(rows, tmp_path / "s.png", title="t")
    assert path.stat().st_size > 1000
