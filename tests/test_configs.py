"""Every training config in configs/ builds, names a known method and gives options its method's Config accepts.

``compare_*.py`` are ``jaxreg compare`` configs (tests/test_compare.py).
"""
import importlib
import pathlib

import pytest

from jaxreg.methods import method_config

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.stem != "__init__" and not p.stem.startswith("compare_"))  # compare_*: jaxreg compare configs


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_a_valid_method_config(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    mod, cfg = method_config(c.method, dict(c.model))
    assert cfg.ndim in (2, 3) and c.batch_size >= 1 and c.num_train_steps >= 1
    if "data" in c and c.data.get("kind") in ("crossreg", "slices"):
        assert not set(c.data.train_cases) & set(c.data.val_cases)  # held-out cases are never trained on
