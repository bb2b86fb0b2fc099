"""Fixtures for the loss tests: small smooth random 2D/3D images and shared,
compile-once evaluators.

XLA compilation dominates the run time of these tests on CPU (one to three
seconds per loss and shape, the arrays themselves are tiny), so:

* every test module evaluates losses through ``evaluator``: one jitted,
  vmapped ``value_and_grad`` per (loss, options, image shape), shared by all
  tests;
* inputs are built with NumPy, so no eager jnp op gets compiled;
* tests here compile with ``jax_disable_most_optimizations`` (set per test and
  restored), which cuts XLA compile time about threefold; the maths, and so
  every value the tests assert, is unchanged (up to float rounding).
"""
import functools

import jax
import numpy as np
import pytest
from scipy import ndimage

# Small shapes keep the whole losses suite well under a minute on 2 CPU cores.
SHAPES = {2: (24, 20), 3: (12, 10, 8)}
BATCH = 16  # every evaluator call is padded to this many pairs


def smooth_image(seed: int, spatial: tuple, channels: int = 1, sigma: float = 1.5) -> np.ndarray:
    """Periodic smooth random image in [0, 1], ``(*spatial, channels)`` float32.

    Periodic (wrap-mode blur) so that ``np.roll`` is an exact translation.
    """
    noise = np.asarray(jax.random.normal(jax.random.key(seed), (*spatial, channels)), np.float64)
    img = ndimage.gaussian_filter(noise, sigma=[sigma] * len(spatial) + [0], mode="wrap")
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dim(request) -> int:
    return request.param


@pytest.fixture
def spatial(dim) -> tuple:
    return SHAPES[dim]


@pytest.fixture
def make_image():
    """``make_image(seed, spatial, channels=1, sigma=1.5)`` -> smooth image."""
    return smooth_image


@pytest.fixture(autouse=True)
def _fast_compile():
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


class Evaluator:
    """Loss values and gradients wrt ``moving`` for up to ``BATCH`` triples.

    ``ev(pairs)`` takes a list of ``(fixed, moving)`` or ``(fixed, moving,
    mask)`` with equal shapes (mask: ``(*spatial)`` weights; default all
    ones) and returns NumPy ``(values[n], grads[n, *spatial, C])``. The
    jitted function is traced once per input shape; ``traced_shapes`` lists
    the ``moving`` shape of every trace.
    """

    def __init__(self, fn, grad: bool = True):
        self.traced_shapes = []

        def run(fixed, moving, mask):
            self.traced_shapes.append(moving.shape)
            loss = lambda f, m, w: fn(f, m, mask=w)  # noqa: E731
            if grad:
                return jax.vmap(jax.value_and_grad(loss, argnums=1))(fixed, moving, mask)
            return jax.vmap(loss)(fixed, moving, mask), moving  # no gradient compiled

        self._run = jax.jit(run)

    def __call__(self, pairs):
        n = len(pairs)
        assert 0 < n <= BATCH, n
        pairs = list(pairs) + [pairs[0]] * (BATCH - n)
        fixed = np.stack([np.asarray(p[0], np.float32) for p in pairs])
        moving = np.stack([np.asarray(p[1], np.float32) for p in pairs])
        spatial = fixed.shape[1:-1]
        ones = np.ones(spatial, np.float32)
        mask = np.stack([np.asarray(p[2], np.float32) if len(p) > 2 else ones for p in pairs])
        values, grads = self._run(fixed, moving, mask)
        return np.asarray(values[:n]), np.asarray(grads[:n])

    def values(self, pairs) -> np.ndarray:
        return self(pairs)[0]


@pytest.fixture(scope="session")
def evaluator():
    """``evaluator(fn, grad=True, **options)`` -> cached :class:`Evaluator` of
    ``partial(fn, **options)``; ``grad=False`` compiles values only (its
    "gradients" are the moving images)."""
    cache = {}

    def get(fn, grad=True, **options):
        key = (fn, grad, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = Evaluator(functools.partial(fn, **options) if options else fn, grad)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def jitted():
    """``jitted(fn, **options)`` -> cached ``jax.jit(partial(fn, **options))``,
    for functions that are not (fixed, moving) losses or need no gradient."""
    cache = {}

    def get(fn, **options):
        key = (fn, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = jax.jit(functools.partial(fn, **options) if options else fn)
        return cache[key]

    return get
