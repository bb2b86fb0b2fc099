"""Global mutual information (Parzen-window joint histogram) and NMI."""
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxreg.losses._utils import (
    Image,
    Mask,
    Weights,
    _check_int,
    _check_pair,
    _mask_weights,
    _safe_div,
    _xlogx,
)


def _check_sigma_ratio(sigma_ratio) -> None:
    if isinstance(sigma_ratio, (int, float)) and not sigma_ratio > 0:
        raise ValueError(f"sigma_ratio must be > 0, got {sigma_ratio}")


def _normalise(image: Image, w: Weights) -> Float[Array, "*spatial C"]:
    """Min-max normalises each channel to [0, 1] using the masked min and max.

    Masked-out voxels are clipped into [0, 1] (they get zero histogram weight
    anyway). A constant (or empty) channel maps to 0.
    """
    axes = tuple(range(w.ndim))
    inside = (w > 0)[..., None]
    lo = jnp.min(jnp.where(inside, image, jnp.inf), axis=axes)
    hi = jnp.max(jnp.where(inside, image, -jnp.inf), axis=axes)
    span = hi - lo
    ok = jnp.isfinite(span) & (span > 0)
    lo = jnp.where(ok, lo, 0)
    x = jnp.where(ok, (image - lo) / jnp.where(ok, span, 1), 0)
    return jnp.clip(x, 0, 1)


KERNELS = ("gaussian", "bspline")


def _check_kernel(kernel, bins) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "bspline" and bins < 4:
        raise ValueError(f"the bspline kernel needs bins >= 4, got {bins}")


def _parzen_weights(
    image: Image, w: Weights, *, bins: int, sigma_ratio: float, kernel: str = "gaussian"
) -> Float[Array, "*spatial C bins"]:
    """Soft assignment of every voxel to ``bins`` equally spaced bin centres.

    The image is min-max normalised (per channel, on the mask) to [0, 1].
    ``"gaussian"``: bin centres are ``k / (bins - 1)``, and a Gaussian kernel
    of width ``sigma = sigma_ratio / (bins - 1)`` (bin spacings) is evaluated
    on the centres and normalised to sum to 1 per voxel (a softmax, so it
    cannot underflow to an all-zero row). ``"bspline"`` (Mattes et al. 2003):
    the cubic B-spline ``beta3(t - k)`` with ``t = 1 + x (bins - 3)``, so the
    end bins pad the range and every row sums to 1 exactly (partition of
    unity); each voxel touches at most 4 bins, and its gradient costs a
    quarter of the Gaussian's softmax on the CPU.
    """
    return _bin_weights(_normalise(image, w), bins, sigma_ratio, kernel)


def _bin_weights(x, bins, sigma_ratio, kernel):
    """Bin weights of values already in [0, 1] (see :func:`_parzen_weights`)."""
    if kernel == "bspline":
        t = jnp.abs(1.0 + x[..., None] * (bins - 3) - jnp.arange(bins, dtype=x.dtype))
        inner = 2.0 / 3.0 - t**2 + 0.5 * t**3
        outer = jnp.maximum(2.0 - t, 0.0) ** 3 / 6.0
        return jnp.where(t < 1.0, inner, outer)
    centres = jnp.linspace(0, 1, bins, dtype=x.dtype)
    sigma = sigma_ratio / (bins - 1)
    logits = -0.5 * jnp.square((x[..., None] - centres) / sigma)
    return jax.nn.softmax(logits, axis=-1)


def _joint_histogram(
    a_f: Float[Array, "N C bins"],
    a_m: Float[Array, "N C bins"],
    w: Float[Array, "N"],
) -> Float[Array, "C bins bins"]:
    """Joint probability ``p(i, j) = sum_x w(x) a_f[x, i] a_m[x, j] / sum_x w``.

    A batched GEMM over voxels. HIGHEST precision: the default float32 matmul
    on GPUs/TPUs rounds inputs to TF32/bfloat16, which biases the entropies.
    """
    joint = jnp.einsum(
        "nci,ncj->cij",
        a_f * w[:, None, None],
        a_m,
        precision=jax.lax.Precision.HIGHEST,
    )
    return _safe_div(joint, jnp.sum(w))


def _entropies(
    joint: Float[Array, "*batch bins bins"],
) -> tuple[Array, Array, Array]:
    """Marginal and joint entropies (nats) ``H(F), H(M), H(F, M)``."""
    p_f = jnp.sum(joint, axis=-1)
    p_m = jnp.sum(joint, axis=-2)
    h_f = -jnp.sum(_xlogx(p_f), axis=-1)
    h_m = -jnp.sum(_xlogx(p_m), axis=-1)
    h_fm = -jnp.sum(_xlogx(joint), axis=(-2, -1))
    return h_f, h_m, h_fm


def _loss_from_joint(joint, normalized: bool) -> Array:
    """``-MI`` (or ``-NMI``) of ``(C, bins, bins)`` joint distributions, averaged over channels."""
    h_f, h_m, h_fm = _entropies(joint)
    if normalized:
        return -jnp.mean(_nmi_from_entropies(h_f, h_m, h_fm))
    return -jnp.mean(h_f + h_m - h_fm)


def _nmi_from_entropies(h_f: Array, h_m: Array, h_fm: Array) -> Array:
    """``(H(F) + H(M)) / H(F, M)`` in [1, 2]; 2 when ``H(F, M) = 0``."""
    ok = h_fm > 0
    return jnp.where(ok, (h_f + h_m) / jnp.where(ok, h_fm, 1), 2)


def mutual_information(
    fixed: Image,
    moving: Image,
    *,
    bins: int = 32,
    sigma_ratio: float = 0.5,
    mask: Mask = None,
    normalized: bool = False,
    kernel: str = "gaussian",
) -> Float[Array, ""]:
    """Negative global mutual information with Parzen-window histograms.

    Each image is min-max normalised to [0, 1] (per channel, min and max over
    the mask), every voxel is softly assigned to ``bins`` bin centres with a
    Gaussian kernel, ``a_f[x, i]`` and ``a_m[x, j]``, each row summing to 1,
    and the joint distribution is the mask-weighted average of their outer
    products::

        p(i, j) = sum_x w(x) a_f[x, i] a_m[x, j] / sum_x w(x)

    (one GEMM, ``[bins, N] @ [N, bins]``). Marginals are the sums of the
    joint, so ``MI = H(F) + H(M) - H(F, M) >= 0`` exactly. Multi-channel
    images are compared channel by channel and averaged.

    Args:
      fixed: ``[*spatial, C]`` float image, 2 or 3 spatial axes.
      moving: ``[*spatial, C]`` float image, same shape as ``fixed``.
      bins: number of histogram bins per image, a Python int >= 2 (static).
      sigma_ratio: Gaussian Parzen kernel width in units of the bin spacing
        (0.5 as in VoxelMorph's and DeepReg's MI losses).
      mask: optional ``[*spatial]`` or ``[*spatial, 1]`` bool or float weights
        in [0, 1]; masked-out voxels neither set the intensity range nor enter
        the histogram.
      normalized: if True return ``-NMI`` (see :func:`nmi`) instead of ``-MI``.
      kernel: Parzen window, ``"gaussian"`` (width ``sigma_ratio``) or
        ``"bspline"`` (cubic B-spline over 4 bins, as Mattes et al. and ANTs'
        Mattes MI; ``sigma_ratio`` is then unused; needs ``bins >= 4``).

    Returns:
      Scalar loss to minimise: ``-MI`` in nats, in ``[-log(bins), 0]``; 0 for
      independent images, ``-H(F)`` (minus the soft-binned entropy, somewhat
      less than it) for ``fixed == moving``. With ``normalized=True``: ``-NMI``
      in ``[-2, -1]``.

    Raises:
      ValueError: if the images are not ``(*spatial, C)`` with 2 or 3 spatial
        axes, their shapes differ, the mask shape does not match, ``bins`` is
        not an int >= 2 (>= 4 for ``"bspline"``), ``sigma_ratio <= 0``, or
        ``kernel`` is unknown.

    References:
      Viola & Wells, "Alignment by maximization of mutual information", IJCV
      24(2) 1997 (Parzen-window MI); Mattes et al., "PET-CT image registration
      in the chest using free-form deformations", IEEE TMI 22(1) 2003
      (joint histogram of Parzen-windowed samples with marginals taken from
      the joint; Mattes uses B-spline kernels, here Gaussian).
    """
    fixed, moving, spatial = _check_pair(fixed, moving)
    bins = _check_int(bins, "bins", minimum=2)
    _check_sigma_ratio(sigma_ratio)
    _check_kernel(kernel, bins)
    w = _mask_weights(mask, spatial, fixed.dtype)
    channels = fixed.shape[-1]
    a_f = _parzen_weights(fixed, w, bins=bins, sigma_ratio=sigma_ratio, kernel=kernel)
    a_m = _parzen_weights(moving, w, bins=bins, sigma_ratio=sigma_ratio, kernel=kernel)
    joint = _joint_histogram(
        a_f.reshape(-1, channels, bins), a_m.reshape(-1, channels, bins), w.reshape(-1)
    )
    return _loss_from_joint(joint, normalized)


def nmi(
    fixed: Image,
    moving: Image,
    *,
    bins: int = 32,
    sigma_ratio: float = 0.5,
    mask: Mask = None,
    kernel: str = "gaussian",
) -> Float[Array, ""]:
    """Negative normalised mutual information ``-(H(F) + H(M)) / H(F, M)``.

    Same Parzen joint histogram as :func:`mutual_information`; the overlap
    invariant normalisation of Studholme et al. Multi-channel images are
    compared channel by channel and averaged.

    Args:
      fixed: ``[*spatial, C]`` float image, 2 or 3 spatial axes.
      moving: ``[*spatial, C]`` float image, same shape as ``fixed``.
      bins: number of histogram bins per image, a Python int >= 2 (static).
      sigma_ratio: Gaussian Parzen kernel width in bin spacings.
      mask: optional ``[*spatial]`` or ``[*spatial, 1]`` bool or float weights
        in [0, 1]; masked-out voxels do not contribute.
      kernel: Parzen window, as :func:`mutual_information`.

    Returns:
      Scalar loss to minimise in ``[-2, -1]``: -1 for independent images,
      towards -2 for a deterministic one-to-one intensity relation (soft
      binning keeps it above -2). -2 if ``H(F, M) = 0`` (empty mask).

    Raises:
      ValueError: as :func:`mutual_information`.

    References:
      Studholme, Hill & Hawkes, "An overlap invariant entropy measure of 3D
      medical image alignment", Pattern Recognition 32(1) 1999 (the measure
      ``Y = (H(M) + H(N)) / H(M, N)``).
    """
    return mutual_information(
        fixed, moving, bins=bins, sigma_ratio=sigma_ratio, mask=mask, normalized=True, kernel=kernel
    )


def mi_of_samples(
    fixed_weights: Float[Array, "N bins"],
    moving: Float[Array, "N"],
    weights: Float[Array, "N"],
    *,
    kernel: str = "bspline",
    normalized: bool = False,
    sigma_ratio: float = 0.5,
) -> Float[Array, ""]:
    """Negative MI (or NMI) of point samples whose fixed Parzen weights are precomputed.

    For optimisers that evaluate the same fixed points at every step (e.g.
    an affine stage): the fixed side's bin weights are computed once with
    :func:`parzen_weights`, and the moving values are already on a fixed
    intensity range, so the bins do not move with the transform (as in
    Mattes MI, whose range comes from the image's minimum and maximum).

    Args:
      fixed_weights: ``(N, bins)`` :func:`parzen_weights` of the fixed samples.
      moving: ``(N,)`` moving samples in [0, 1] (clipped).
      weights: ``(N,)`` non-negative sample weights.
      kernel, sigma_ratio: the moving samples' Parzen window.
      normalized: return ``-NMI`` instead of ``-MI``.

    Returns:
      Scalar loss to minimise, as :func:`mutual_information`.
    """
    bins = fixed_weights.shape[-1]
    a_m = parzen_weights(moving, bins=bins, kernel=kernel, sigma_ratio=sigma_ratio)
    joint = _joint_histogram(fixed_weights[:, None, :], a_m[:, None, :], weights)
    return _loss_from_joint(joint, normalized)


def mi_of_sample_groups(
    fixed_weights: Float[Array, "G N bins"],
    moving: Float[Array, "G N"],
    weights: Float[Array, "G N"],
    owner: Int[Array, "G"],
    num_owners: int,
    *,
    kernel: str = "bspline",
    normalized: bool = False,
    sigma_ratio: float = 0.5,
) -> Float[Array, "num_owners"]:
    """:func:`mi_of_samples` of several registrations at once: ``G`` groups of ``N`` samples, each group owned
    by one of ``num_owners`` owners, whose loss pools the samples of every group it owns.

    For an affine stage that refines several candidate starts in one program (one group per candidate), or
    one candidate whose samples fill every group. An owner with no groups (or only zero weights) gets 0.

    Args:
      fixed_weights: ``(G, N, bins)`` :func:`parzen_weights` of the fixed samples.
      moving: ``(G, N)`` moving samples in [0, 1] (clipped).
      weights: ``(G, N)`` non-negative sample weights.
      owner: ``(G,)`` int32 owner of each group, in ``[0, num_owners)``.
      num_owners: number of losses returned (static).
      kernel, sigma_ratio, normalized: as :func:`mi_of_samples`.

    Returns:
      ``(num_owners,)`` losses; owner ``k``'s equals :func:`mi_of_samples` of its groups' samples concatenated.
    """
    bins = fixed_weights.shape[-1]
    a_m = parzen_weights(moving, bins=bins, kernel=kernel, sigma_ratio=sigma_ratio)
    joint = jnp.einsum("gni,gnj->gij", fixed_weights * weights[..., None], a_m, precision=jax.lax.Precision.HIGHEST)
    onehot = jax.nn.one_hot(owner, num_owners, dtype=joint.dtype)  # (G, owners)
    pooled = jnp.einsum("go,gij->oij", onehot, joint, precision=jax.lax.Precision.HIGHEST)
    total = onehot.T @ jnp.sum(weights, -1)
    pooled = _safe_div(pooled, total[:, None, None])
    return jnp.where(total > 0, jax.vmap(lambda j: _loss_from_joint(j[None], normalized))(pooled), 0.0)


def parzen_weights(x: Float[Array, "*shape"], *, bins: int = 32, kernel: str = "bspline",
                   sigma_ratio: float = 0.5) -> Float[Array, "*shape bins"]:
    """Parzen bin weights of values ``x`` in [0, 1] (clipped), each row summing to 1 (see :func:`mutual_information`).

    Raises:
      ValueError: unknown ``kernel``, or ``bins`` < 4 for ``"bspline"``.
    """
    _check_kernel(kernel, bins)
    return _bin_weights(jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0), bins, sigma_ratio, kernel)
