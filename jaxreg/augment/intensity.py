"""Keyed, jittable intensity augmentation of ``(*spatial, C)`` images in [0, 1] (labels are unaffected)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def random_gamma(key: PRNGKeyArray, image: Float[Array, "*spatial C"], *, log_gamma_std: float = 0.3):
    """``image ** gamma`` with ``log(gamma) ~ N(0, log_gamma_std)`` (image clipped to [0, 1] first)."""
    g = jnp.exp(log_gamma_std * jax.random.normal(key, ()))
    return jnp.clip(image, 0.0, 1.0) ** g


def random_bias_field(key: PRNGKeyArray, image: Float[Array, "*spatial C"], *, strength: float = 0.3,
                      control_points: int = 4):
    """Multiply by a smooth field ``exp(b)``, ``b`` = cubic upsampling of N(0, strength) on a
    ``control_points^D`` grid (an MRI bias field)."""
    d = image.ndim - 1
    coarse = strength * jax.random.normal(key, (control_points,) * d)
    field = jnp.exp(jax.image.resize(coarse, image.shape[:-1], "cubic"))
    return image * field[..., None]


def random_noise(key: PRNGKeyArray, image: Float[Array, "*spatial C"], *, std: float = 0.02):
    """Add white Gaussian noise with standard deviation ``U(0, std)``."""
    k1, k2 = jax.random.split(key)
    return image + jax.random.uniform(k1, (), maxval=std) * jax.random.normal(k2, image.shape)


def bezier_control_points(key: PRNGKeyArray, *, num_points: int = 4) -> Float[Array, "n 2"]:
    """Random monotone control points ``P_0 .. P_n`` of a Bezier intensity curve in ``[0, 1]^2``.

    ``P_0 = (0, 0)`` and ``P_n = (1, 1)``; the inner points' x and y
    coordinates are drawn uniformly in [0, 1] and sorted separately, so both
    coordinates are non-decreasing along the control polygon, which makes
    the curve monotone (Bernstein polynomials preserve monotone coefficients).

    Args:
      key: PRNG key.
      num_points: ``n + 1`` control points (Python int >= 2; DNS Sec. 4.2:
        n = 3, i.e. 4 points).

    Returns:
      ``(num_points, 2)`` float32 control points ``(x, y)``.

    Raises:
      ValueError: ``num_points < 2``.

    References:
      Mok et al., CVPR 2024, Sec. 3.3 eq. (2) ("control points uniformly
      sampled within [0, 1] and a monotonic non-linear transformation").
    """
    if int(num_points) != num_points or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2, got {num_points}")
    inner = jnp.sort(jax.random.uniform(key, (2, num_points - 2)), axis=-1)
    zero, one = jnp.zeros((2, 1)), jnp.ones((2, 1))
    return jnp.concatenate([zero, inner, one], axis=-1).T


def bezier_curve(points: Float[Array, "n 2"], t: Float[Array, "T"]) -> Float[Array, "T 2"]:
    """Evaluate the Bezier curve ``B(t) = sum_i P_i b_{i,n}(t)`` (DNS eq. 2) at ``t`` in [0, 1]."""
    n = points.shape[0] - 1
    i = jnp.arange(n + 1, dtype=jnp.float32)
    log_binom = (jax.scipy.special.gammaln(n + 1.0) - jax.scipy.special.gammaln(i + 1.0)
                 - jax.scipy.special.gammaln(n - i + 1.0))
    t = t[:, None]
    # t**i (1-t)**(n-i) with 0**0 = 1 at the end points
    basis = jnp.exp(log_binom) * jnp.where(i == 0, 1.0, t ** i) * jnp.where(i == n, 1.0, (1.0 - t) ** (n - i))
    return basis @ points


def random_bezier(key: PRNGKeyArray, image: Float[Array, "*spatial C"], *, num_points: int = 4,
                  invert_prob: float = 0.5, resolution: int = 256) -> Float[Array, "*spatial C"]:
    """Stochastic non-linear intensity transform of an image in [0, 1] by a monotone Bezier curve.

    ``I' = B(I)`` with probability ``1 - invert_prob``, else ``I' = B(1 - I)``
    (DNS eq. 3, ``p <= delta`` inverts). The curve is sampled at
    ``resolution`` values of ``t`` and applied by linear interpolation of
    ``y`` over ``x`` (both monotone), so ``B(0) = 0``, ``B(1) = 1`` and the
    map is non-decreasing; with inversion it is non-increasing. The image is
    clipped to [0, 1] first.

    Args:
      key: PRNG key (the curve and the inversion are drawn from it).
      image: ``(*spatial, C)`` float image in [0, 1].
      num_points: control points ``n + 1`` (DNS: 4).
      invert_prob: probability ``delta`` of inverting the intensities (DNS: 0.5).
      resolution: samples of the curve (Python int).

    Returns:
      ``(*spatial, C)`` float32 image in [0, 1].

    References:
      Mok et al., "Modality-Agnostic Structural Image Representation
      Learning for Deformable Multi-Modality Medical Image Registration",
      CVPR 2024, Sec. 3.3 eqs. (2)-(3) and Sec. 4.2 (n = 3, delta = 0.5).
    """
    k_pts, k_inv = jax.random.split(key)
    curve = bezier_curve(bezier_control_points(k_pts, num_points=num_points),
                         jnp.linspace(0.0, 1.0, resolution))
    x = jnp.clip(jnp.asarray(image, jnp.float32), 0.0, 1.0)
    x = jnp.where(jax.random.uniform(k_inv, ()) < invert_prob, 1.0 - x, x)
    return jnp.interp(x, curve[:, 0], curve[:, 1]).astype(jnp.float32)


def random_convolution(key: PRNGKeyArray, image: Float[Array, "*spatial C"], *, layers: int = 4,
                       channels: int = 8, kernel_size: int = 1, weight_range: tuple = (0.0, 10.0),
                       bias_std: float = 1.0, negative_slope: float = 0.2) -> Float[Array, "*spatial 1"]:
    """Random-convolution (RC) contrast augmentation: a random contrast of the same anatomy (CAR Sec. 2.1).

    ``layers`` random convolutions (``C -> channels -> ... -> channels -> 1``)
    with kernel weights drawn from ``U(weight_range)`` and then zero-centred
    (the distribution's mean subtracted, CAR Sec. 3 "Implementation details":
    U(0, 10), re-shifted to zero centre), a bias ``N(0, bias_std)`` per
    output channel (the official code's shift; the paper is silent), each
    followed by LeakyReLU(``negative_slope``) (0.2, CAR Sec. 3); the result
    is min-max normalised to [0, 1] (as the official code's ``imgnorm``).
    With ``kernel_size = 1`` (CAR's choice) the map is pointwise: it changes
    contrast without blurring and commutes with any warp. ``kernel_size = 3``
    is the paper's RC-3 ablation (Table 3), zero padding ("same").

    Args:
      key: PRNG key (all weights are drawn from it; deterministic for a key).
      image: ``(*spatial, C)`` float image (2D or 3D), e.g. in [0, 1].
      layers: number of RC layers (>= 1; CAR: 4).
      channels: intermediate channels (the official code: 8).
      kernel_size: odd spatial kernel size (1 = CAR, 3 = RC-3).
      weight_range: ``(low, high)`` of the uniform weight distribution before centring.
      bias_std: standard deviation of the biases (0 = none).
      negative_slope: LeakyReLU slope.

    Returns:
      ``(*spatial, 1)`` float32 image in [0, 1] (constant images give 0).

    Raises:
      ValueError: ``layers < 1``, an even or non-positive ``kernel_size``, ``channels < 1``.

    References:
      Wang et al., "CAR: Contrast-Agnostic Deformable Medical Image
      Registration with Contrast-Invariant Latent Regularization", WBIR
      2024, Sec. 2.1 and 3; random convolutions: Xu et al., ICLR 2021.
    """
    if int(layers) != layers or layers < 1:
        raise ValueError(f"layers must be an int >= 1, got {layers}")
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    if int(channels) != channels or channels < 1:
        raise ValueError(f"channels must be an int >= 1, got {channels}")
    x = jnp.asarray(image, jnp.float32)
    d = x.ndim - 1
    lo, hi = float(weight_range[0]), float(weight_range[1])
    widths = [x.shape[-1]] + [int(channels)] * (int(layers) - 1) + [1]
    keys = jax.random.split(key, 2 * int(layers))
    for i in range(int(layers)):
        cin, cout = widths[i], widths[i + 1]
        w = jax.random.uniform(keys[2 * i], (kernel_size,) * d + (cin, cout), minval=lo, maxval=hi) - 0.5 * (lo + hi)
        b = bias_std * jax.random.normal(keys[2 * i + 1], (cout,))
        if kernel_size == 1:
            x = jnp.einsum("...i,io->...o", x, w.reshape(cin, cout))
        else:
            spatial = "DHW"[3 - d:]
            x = jax.lax.conv_general_dilated(x[None], w, (1,) * d, "SAME",
                                             dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))[0]
        x = jax.nn.leaky_relu(x + b, negative_slope)
    lo_x, hi_x = jnp.min(x), jnp.max(x)
    span = hi_x - lo_x
    return jnp.where(span > 0, (x - lo_x) / jnp.where(span > 0, span, 1.0), 0.0).astype(jnp.float32)
