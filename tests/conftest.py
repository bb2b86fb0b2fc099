"""Shared test fixtures: real-data location, float tolerances, CPU device count."""
import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)
# The CLI persists XLA executables (~/.cache/jaxreg/xla, jaxreg.cli._enable_compilation_cache), and once a
# test has called jaxreg.cli.main every later jit of the pytest process writes and reads that cache. Two full runs
# crashed inside JAX reading an entry back (a segfault in compilation_cache.get_executable_and_time, first with
# the user's cache, then with a per-session one; the last CI run aborted late in the suite, where not shown), so tests run without the persistent
# cache unless JAXREG_CACHE_DIR is set explicitly.
os.environ.setdefault("JAXREG_CACHE_DIR", "")

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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module, so that one pytest process does not keep every
    executable of the suite (the full suite in one process crashed inside XLA late in the run)."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture
def compiled_by(tmp_path, monkeypatch):
    """A store of programs in ``tmp_path`` and the ``(program name, thread name)`` of every executable compiled or
    loaded through it (jaxreg.programs), in order."""
    import threading

    from jaxreg import programs

    monkeypatch.setattr(programs, "store_dir", lambda: tmp_path)
    seen = []
    original = programs._load_or_compile

    def spy(fn, *args, **kwargs):
        seen.append((fn.__name__, threading.current_thread().name))
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(programs, "_load_or_compile", spy)
    return seen
