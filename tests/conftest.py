"""Shared test fixtures: real-data location, float tolerances, CPU device count."""
import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)
# The CLI persists XLA executables (~/.cache/jaxreg/xla); tests use a cache of their own session, so that
# they neither read nor fill the user's (a full run once segfaulted in JAX reading an entry of that shared cache).
if "JAXREG_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAXREG_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxreg-test-xla-")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("JAXREG_DATA", ROOT.parent / "shared" / "data"))

# Tolerances keyed by dtype (absolute, relative).
TOL = {np.dtype("float32"): (1e-5, 1e-5), np.dtype("float64"): (1e-10, 1e-10)}


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """Root of the real images (../shared/data or $JAXREG_DATA).

    Missing data skips the test locally but fails it in CI (CI=true), so a
    broken data mount never passes silently.
    """
    if not DATA.is_dir():
        msg = f"real data not found at {DATA} (set JAXREG_DATA)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return DATA
