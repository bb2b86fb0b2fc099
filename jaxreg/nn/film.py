"""Hypernetwork conditioning on the regularisation weight lambda (HyperMorph / ContraReg).

A 4-layer 128-wide ReLU MLP maps ``lambda`` to an embedding; one linear head
per conditioned layer maps it to that layer's FiLM ``(gamma, beta)``.
Sources: Hoopes et al., "HyperMorph", IPMI 2021 (hypernetwork over lambda,
Sec. 3); Dey et al., "ContraReg", MICCAI 2022 (Sec. 2.3: FiLM-conditioned
registration network driven by a lambda MLP).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float


class HyperFiLM(nnx.Module):
    """``lambda (B,) -> [(gamma_i, beta_i)]`` for layers of widths ``features``.

    Args:
      features: output channels of each conditioned layer, in call order.
      hidden: MLP width (128) and ``depth`` layers (4), ReLU.
      head_scale: std of the heads' initial weights (small, so an untrained
        hypernetwork barely perturbs the base network).

    Returns (call): list of ``(gamma, beta)`` pairs, each ``(B, features[i])``
    float32.
    """

    def __init__(self, features, *, hidden: int = 128, depth: int = 4, head_scale: float = 1e-2,
                 rngs: nnx.Rngs):
        self.features = tuple(int(f) for f in features)
        dims = [1] + [hidden] * depth
        self.mlp = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        init = nnx.initializers.normal(head_scale)
        self.heads = nnx.List([nnx.Linear(hidden, 2 * f, kernel_init=init, rngs=rngs) for f in self.features])

    def __call__(self, lam: Float[Array, " B"]):
        h = jnp.asarray(lam, jnp.float32).reshape(-1, 1)
        for layer in self.mlp:
            h = jax.nn.relu(layer(h))
        out = []
        for head, f in zip(self.heads, self.features):
            gb = head(h)
            out.append((gb[:, :f], gb[:, f:]))
        return out


def sample_lambda(key, batch: int, *, low: float = 0.0, high: float = 1.0,
                  distribution: str = "uniform") -> Float[Array, " B"]:
    """``(batch,)`` float32 lambdas, ``U[low, high]`` or log-uniform on ``[low, high]`` (``low > 0``).

    Raises:
      ValueError: unknown distribution, ``low > high``, or ``low <= 0`` for log-uniform.
    """
    if low > high:
        raise ValueError(f"lambda range must have low <= high, got [{low}, {high}]")
    if distribution == "uniform":
        return jax.random.uniform(key, (batch,), minval=low, maxval=high)
    if distribution == "loguniform":
        if low <= 0:
            raise ValueError(f"log-uniform lambda needs low > 0, got {low}")
        u = jax.random.uniform(key, (batch,), minval=jnp.log(low), maxval=jnp.log(high))
        return jnp.exp(u)
    raise ValueError(f"distribution must be 'uniform' or 'loguniform', got {distribution!r}")
