"""Deep neighbourhood self-similarity (DNS) of a feature map, and the DSIR cosine similarity.

References:
  Mok, Li, Bai, Zhang, Liu, Zhou, Yan, Jin, Shi, Yin, Lu, Zhang,
  "Modality-Agnostic Structural Image Representation Learning for Deformable
  Multi-Modality Medical Image Registration", CVPR 2024, Sec. 3.2 eq. (1)
  (DNS), Sec. 3.4 eq. (5) (negated cosine similarity of smoothed DSIRs).
"""
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxreg.losses._utils import Mask, _check_pair, _mask_weights, _weighted_mean
from jaxreg.losses.mind import _NEIGHBOURS_2D, _NEIGHBOURS_3D, _ssc_pairs

DNS_EPS = 1e-6  # added to the noise estimate sigma^2 (constant features: S = exp(0) = 1)


def dns_pairs(ndim: int, dilations=(1, 2)) -> tuple:
    """Offset pairs ``(a, b)`` of every layout: the SSC pairs of the 2D/3D neighbourhood scaled by each dilation.

    3D: the 6-neighbourhood's 12 pairs at distance ``sqrt(2)`` per layout
    (24 for the direct + dilated layouts ``N`` and ``N_d``); 2D: the
    4-neighbourhood's 4 pairs per layout (8).
    """
    base = _ssc_pairs(_NEIGHBOURS_3D if ndim == 3 else _NEIGHBOURS_2D)
    return tuple(tuple(tuple(d * o for o in off) for off in pair) for d in dilations for pair in base)


def _layout_distances(features, dilations):
    """Per layout, the list of ``(h(x + a) - h(x + b))^2`` over its pairs, each channel-first ``(C, *spatial)``.

    ``features`` is ``(*spatial, C)``; the result is channel-first so that XLA
    fuses per-channel work into loops over contiguous voxels (``dns_squeezed``).
    """
    if features.ndim not in (3, 4):
        raise ValueError(f"features must be (*spatial, C) with 2 or 3 spatial axes, got {features.shape}")
    dilations = tuple(dilations)
    if not dilations or any(int(d) != d or d < 1 for d in dilations):
        raise ValueError(f"dilations must be positive ints, got {dilations}")
    h = jnp.moveaxis(features, -1, 0)  # (C, *spatial)
    spatial = h.shape[1:]
    ndim = len(spatial)
    r = max(dilations)
    padded = jnp.pad(h, [(0, 0)] + [(r, r)] * ndim, mode="edge")

    def shift(offset):  # h(x + offset), edge-clamped
        return padded[(slice(None),) + tuple(slice(r + o, r + o + n) for o, n in zip(offset, spatial))]

    per_layout = len(dns_pairs(ndim, (1,)))
    pairs = dns_pairs(ndim, dilations)
    return [[jnp.square(shift(a) - shift(b)) for a, b in pairs[li * per_layout:(li + 1) * per_layout]]
            for li in range(len(dilations))]


def dns(
    features: Float[Array, "*spatial C"], *, dilations: tuple = (1, 2)
) -> Float[Array, "*spatial C K"]:
    """Deep neighbourhood self-similarity of a feature map (DNS eq. 1), per feature channel.

    For each layout (the 2D/3D neighbourhood scaled by a dilation) and each
    pair ``(a, b)`` of neighbours at distance ``sqrt(2) * dilation`` (the
    SSC pairs, which leave out the patch centre), with ``h`` the feature map
    (edge-replicated at the border)::

        d_k(x, c) = (h_c(x + a_k) - h_c(x + b_k))^2
        sigma^2(x, c) = mean over the layout's pairs of d_k(x, c)
        S_k(x, c) = exp(-d_k(x, c) / (sigma^2(x, c) + 1e-6))

    ``sigma^2`` is the paper's noise estimate ("the mean of all patch
    distances"), taken over the pairs of the same layout.

    Args:
      features: ``(*spatial, C)`` float feature map ``h`` (2 or 3 spatial axes).
      dilations: one layout per dilation (Python ints; DNS: direct and
        dilated 6-NH, ``(1, 2)``).

    Returns:
      ``(*spatial, C, K)`` float in (0, 1]; ``K = 12 * len(dilations)`` in
      3D (24 by default), ``4 * len(dilations)`` in 2D. Pairs are ordered by
      layout, then as :func:`jaxreg.losses.mind_ssc`'s (2D) / the SSC
      enumeration (3D). Invariant to ``a * h + b`` (``a != 0``) per channel.

    Raises:
      ValueError: if ``features`` is not ``(*spatial, C)`` with 2 or 3
        spatial axes, or a dilation is not a positive int.
    """
    out = []
    for d in _layout_distances(features, dilations):
        d = jnp.stack(d, axis=-1)  # (C, *spatial, pairs)
        sigma2 = jnp.mean(d, axis=-1, keepdims=True) + DNS_EPS
        out.append(jnp.exp(-d / sigma2))
    return jnp.moveaxis(jnp.concatenate(out, axis=-1), 0, -2)  # (*spatial, C, K)


def dns_squeezed(
    features: Float[Array, "*spatial C"], weights: Float[Array, "C"], bias, *, dilations: tuple = (1, 2)
) -> Float[Array, "*spatial K"]:
    """``sum_c weights[c] * dns(features)[..., c, :] + bias``, without materialising the ``(C, K)`` stack.

    The feature-squeezing linear layer of MASR-Net (DNS Sec. 3.2) fused with
    :func:`dns`: one pass per pair, channel by channel on channel-first
    slices, so that XLA fuses each pair's ``C`` exponentials and their
    weighted sum into one loop over the voxels (a 2 mm brain with ``C = 8`` on
    2 CPU cores: 1.74 s for :func:`dns` then the layer, 0.71 s for one pass
    per pair on channel-last arrays, 0.38 s like this). Same arguments as
    :func:`dns`, plus the ``(C,)`` weights and scalar bias of the linear layer;
    returns ``(*spatial, K)``.
    """
    out = []
    for d in _layout_distances(features, dilations):
        inv = 1.0 / (sum(d) / len(d) + DNS_EPS)
        out += [sum(weights[c] * jnp.exp(-dk[c] * inv[c]) for c in range(features.shape[-1])) for dk in d]
    return jnp.stack(out, axis=-1) + bias


def dns_reference(features: np.ndarray, *, dilations=(1, 2)) -> np.ndarray:
    """Direct-loop NumPy version of :func:`dns` (float64; for tests on tiny arrays)."""
    h = np.asarray(features, np.float64)
    spatial = h.shape[:-1]
    ndim = len(spatial)
    per_layout = len(dns_pairs(ndim, (1,)))
    pairs = dns_pairs(ndim, dilations)
    out = np.zeros(spatial + (h.shape[-1], len(pairs)))
    clamp = lambda x: tuple(min(max(xi, 0), n - 1) for xi, n in zip(x, spatial))
    for x in np.ndindex(*spatial):
        for c in range(h.shape[-1]):
            for li in range(len(dilations)):
                layout = pairs[li * per_layout:(li + 1) * per_layout]
                dist = []
                for a, b in layout:
                    ya = clamp(tuple(xi + ai for xi, ai in zip(x, a)))
                    yb = clamp(tuple(xi + bi for xi, bi in zip(x, b)))
                    dist.append((h[ya + (c,)] - h[yb + (c,)]) ** 2)
                sigma2 = np.mean(dist) + DNS_EPS
                for k, dk in enumerate(dist):
                    out[x + (c, li * per_layout + k)] = np.exp(-dk / sigma2)
    return out


def cosine_similarity_loss(
    fixed_desc: Float[Array, "*spatial K"],
    moving_desc: Float[Array, "*spatial K"],
    *,
    mask: Mask = None,
) -> Float[Array, ""]:
    """Negated mean cosine similarity of two descriptor images (DNS eq. 5's ``L_sim``).

    ``-sum_x w(x) cos(F(x), M(x)) / sum_x w(x)``; a zero vector has cosine 0
    with anything (no NaN, finite gradients).

    Args:
      fixed_desc: ``[*spatial, K]`` float descriptors (e.g. Gaussian-smoothed DSIR).
      moving_desc: ``[*spatial, K]`` float descriptors of the warped moving image.
      mask: optional ``[*spatial]`` or ``[*spatial, 1]`` weights in [0, 1].

    Returns:
      Scalar loss to minimise in ``[-1, 1]``; ``-1`` for identical
      (non-zero) descriptors.

    Raises:
      ValueError: on mismatched shapes, as the other descriptor losses.

    References:
      Mok et al., CVPR 2024, Sec. 3.4 eq. (5).
    """
    fixed_desc, moving_desc, spatial = _check_pair(fixed_desc, moving_desc, names=("fixed_desc", "moving_desc"))
    w = _mask_weights(mask, spatial, fixed_desc.dtype)
    # contractions (dots) rather than multiply-and-reduce: on XLA:CPU the sampled IO loss (32768 x 24) with
    # its gradient took 7.7 instead of 16.3 ms per step
    def inner(a, b):
        return jnp.einsum("...k,...k->...", a, b)[..., None]

    dot = inner(fixed_desc, moving_desc)
    nf = inner(fixed_desc, fixed_desc)
    nm = inner(moving_desc, moving_desc)
    denom = nf * nm
    ok = denom > 1e-20
    cos = jnp.where(ok, dot / jnp.sqrt(jnp.where(ok, denom, 1.0)), 0.0)
    return -_weighted_mean(cos, w)
