"""Multi-level instance optimisation: Adam on a transform, one jitted ``lax.scan`` per level.

The moving image enters on the fixed grid (already resampled through the two
image affines, see :mod:`jaxreg.io`). An optional affine stage (centre-of-mass
initialisation, then Adam on the affine parameters at the coarse levels) is
followed by a deformable stage on a Gaussian pyramid: a stationary velocity
field (diffeomorphic, default) or a displacement field, optimised coarse to
fine and upsampled between levels.

Speed (docs/design.md, shared PERF_NOTES): the similarity's features (e.g.
MIND-SSC descriptors) are computed once per level from the *fixed* and
*affinely resampled moving* images, so the loss only needs the gradient of the
warp with respect to the sampling coordinates (cheap gathers), never into the
moving image; the velocity lives on a control grid (``control_spacing``
finest-level voxels) where scaling and squaring (whose backward pass
scatters) is cheap, and its displacement is interpolated linearly; on large
levels voxel-wise similarities are evaluated on a fresh random subset of
``num_samples`` voxels per step (stochastic gradient descent).

References:
  Mok, Tian, Chung, "Modality-Agnostic Structural Image Representation
  Learning for Deformable Multi-Modality Medical Image Registration", CVPR
  2024, Sec. 4 and Table 4 (three-level instance optimisation: learning rates
  [1e-2, 5e-3, 3e-3], iterations [100, 80, 50], smoothness [0.6, 0.5, 0.4]).
  Heinrich et al., "MIND: Modality independent neighbourhood descriptor",
  MedIA 2012 (MIND-based registration).
  Arsigny et al., MICCAI 2006 (stationary velocity fields).
"""
import concurrent.futures
import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.ndimage as ndi
from jaxtyping import Array, Float

from jaxreg import losses as L
from jaxreg import programs
from jaxreg.programs import bucket_shape, bucket_size, pad_high, program, to_device  # noqa: F401 - re-exported
from jaxreg.spatial import (
    affine_to_disp,
    gaussian_blur,
    gaussian_downsample,
    identity_grid,
    identity_params,
    integrate,
    invert,
    num_params,
    params_to_matrix,
    resize_disp,
    sample,
)

SIMILARITIES = ("mind", "dns", "mi", "nmi", "ngf", "lncc", "mse")
TRANSFORMS = ("svf", "disp", "affine", "rigid")
LINEAR_TRANSFORMS = ("affine", "rigid")  # no deformable stage
AFFINE_INITS = ("auto", "upright", "header", "com")


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    """Options of :func:`register_instance` (all static: they fix shapes and loops).

    Attributes:
      similarity: one of ``SIMILARITIES``; ``"mind"`` compares MIND-SSC
        descriptors by mean squared difference (Heinrich et al. 2013);
        ``"dns"`` compares learned descriptors (the ``feature_fn`` of
        :func:`register_instance`, e.g. MASR-Net's DSIR) by negated cosine
        similarity after Gaussian smoothing (DNS Sec. 3.4 eq. 5).
      transform: ``"svf"`` (default, diffeomorphic), ``"disp"``, ``"affine"``
        or ``"rigid"`` (the last two: affine stage only).
      affine: run the affine stage before a deformable transform.
      levels: number of pyramid levels (DNS Table 4: 3); level ``l`` is
        downsampled by ``2 ** (levels - 1 - l)``.
      iterations: Adam steps per level, coarse to fine (DNS Table 4: 100, 80, 50).
      learning_rates: per level, in the paper's normalised coordinates
        ([-1, 1] across the grid; DNS Table 4: 1e-2, 5e-3, 3e-3). We
        parametrise the velocity in voxels of the level grid, so the rate used
        is ``lr * (mean level size) / 2``: the same step in physical terms.
        Default 2e-2, 1e-2, 6e-3 (twice DNS's), with ``relative_eps`` 3: the
        normalised steps are smaller than plain Adam's, and the doubled rate
        brought the known-deformation endpoint errors back (below).
      smoothness: regulariser weight per level (DNS Table 4: 0.6, 0.5, 0.4)
        for the diffusion energy of the velocity/displacement measured in the
        paper's normalised coordinates, i.e. ``sum |grad u|^2 * (2/N)^2``;
        multiplied by ``smoothness_scale`` (our calibration for our
        similarities' scales; see docs/design.md "instance optimisation").
      smoothness_scale: global multiplier of ``smoothness``. Default 30
        (issue 17): in DNS's units (differences of the normalised field
        between neighbouring voxels, ``(2/N)^2`` of ours) the prior is about
        1e-4 of the MIND-SSC similarity at N ~ 100 and barely acts; x10 /
        x30 / x100 changed IXI Dice by < 0.005. Measured with the mask and
        ``field_extension`` (2 IXI pairs, 2 mm; brats parts a / s, 3 pairs
        each): x1 SDlogJ over the grid 0.177 / 0.204 (mono / cross), inside
        the brain 0.150 / 0.159, Dice 0.580 / 0.580, EPE 1.37 / 1.00 mm;
        x30: 0.164 / 0.179, 0.137 / 0.142, 0.581 / 0.579, 1.36 / 1.00 mm.
      field_decay: weight of a zero-order prior, the mean squared control
        field in normalised units (``(2/N)^2`` times its squared length in
        level voxels), added to the diffusion prior. It penalises
        large-scale displacement, which the diffusion prior hardly does.
        Default 0. On same-subject pairs (ms_native/patient01, against the
        reference transforms) 100 cut the svf's mean error from 0.75 to
        0.60 mm, but it cost 0.025 of IXI inter-subject Dice (0.579 ->
        0.554 over 3 pairs), so it is an option for longitudinal or
        within-session pairs, not the default
        (docs/experiments/issue17_regularity.md, session 20).
      control_spacing: spacing, in voxels of the finest level, of the grid
        on which the velocity (or displacement) is optimised, integrated and
        then upsampled linearly (never finer than the level's own grid).
      field_sigma: Gaussian smoothing (control-grid voxels) applied to the
        optimised field before integration: the parametrisation is ``v = G * p``
        (a low-pass prior, as ANTs SyN smooths its update field and
        ConvexAdam box-filters its displacement). With the defaults
        (4 voxels x sigma 2) the field varies on a ~16 mm scale at 2 mm.
        Measured on brats_space T2 -> T1 at 2 mm (known 2.3 mm deformation,
        MIND): sigma 0 made the error worse (2.32 -> 2.85 mm), sigma 2
        reduced it to 1.56 mm.
      num_samples: voxels of the foreground bounding box drawn at random per
        Adam step to evaluate voxel-wise similarities (``mind``, ``mse``,
        ``mi``, ``nmi``) on large levels, as in stochastic-gradient
        registration (Klein et al., IEEE TIP 2009); 0 uses every voxel.
        LNCC and NGF always use the whole grid.
      integration_steps: scaling-and-squaring steps (VoxelMorph uses 7).
        Default 5: the velocity lives on the smooth control grid, where
        ``v / 2^5`` is a small fraction of a control voxel; on the brats
        known-deformation pairs (benchmark part a) 7, 5 and 4 steps gave
        the same endpoint error (1.423 / 1.423 / 1.422 mm) and 5 steps
        took 1.4 s less per pair than 7 (measured with
        ``integration_grad="exact"``, when integration under ``grad`` was
        most of an Adam step's cost).
      integration_grad: how the deformable stage differentiates the
        integrated ``svf`` displacement with respect to its velocity.
        ``"identity"`` (default): the similarity's gradient with respect to
        the displacement is applied to the velocity unchanged, i.e.
        ``d exp(v) / dv`` is taken as the identity. That is the first-order
        BCH update of log-domain demons (``v <- v + u``; Vercauteren et al.,
        "Symmetric log-domain diffeomorphic registration", MICCAI 2008,
        Sec. 2), exact at ``v = 0``. The map itself is still the exact
        ``exp(v)``, so it stays diffeomorphic. ``"exact"``: backpropagate
        through scaling and squaring, whose backward pass (a scatter per
        squaring) was ~60 % of an Adam step. Measured with
        ``benchmarks/io_registration.py --parts a,s,b --ixi-pairs 3
        --methods io-mind`` (2026-12-03, 2 cores), exact -> identity: brats
        EPE 1.36 -> 1.36 mm (real contrasts) and 1.00 -> 1.00 mm (synthetic
        contrast), IXI Dice 0.579 -> 0.580 (mono) and 0.576 -> 0.578
        (cross), SDlogJ over the grid / inside the brain 0.171 / 0.147 ->
        0.176 / 0.147 (mono), no folding; the deformable levels of the IXI
        pair took 4.1 -> 2.3 s.
      mind_radius, mind_dilation: MIND-SSC patch radius and neighbour
        distance. Default dilation 1 (the SSC pairs 1 voxel apart): on the
        brats known-deformation pairs at 2 mm (benchmark part a, 3 levels)
        dilation 1 reduced the endpoint error by 39-46 % of the error
        before, dilation 2 by 26-32 %.
      feature_sigma: Gaussian smoothing (level voxels) of descriptor features
        before optimisation (DNS Sec. 4: instance optimisation on
        Gaussian-smoothed descriptors), which widens their capture range.
        Default 0: smoothing the descriptors (sigma 1) or the images
        blurred the alignment of fine structure and cost 10-15 points of
        endpoint-error reduction on the brats pairs; the capture range
        comes from the pyramid and the smooth control-grid velocity.
      dns_sigma: Gaussian smoothing (level voxels) of learned descriptors for
        ``"dns"`` (DNS eq. 5 ``psi_sigma``; Table 3: smoothing added +0.22
        Dice there; the paper gives no value). Default 0: on two IXI
        cross-contrast pairs outside the benchmark (IXI033 -> IXI034,
        IXI034 -> IXI039, sin-remapped fixed) sigma 0 gave Dice 0.5863 and
        sigma 1 0.5832, and smoothing the 24-channel stacks cost ~2 s per pair.
      lncc_window: LNCC window (voxels).
      mi_bins: Parzen histogram bins for MI/NMI.
      mi_kernel: Parzen window of MI/NMI (:func:`jaxreg.losses.mutual_information`):
        ``"bspline"`` (default; cubic B-spline, as Mattes MI in ANTs) or
        ``"gaussian"``. The B-spline's gradient took 11 ms against the
        Gaussian softmax's 45 ms for 65k samples on 2 cores, which made the
        affine stage's finest levels ~4x cheaper.
      ngf_epsilon: NGF edge parameter (relative to the image range).
      foreground_mask: evaluate the deformable similarity only inside the
        union of the two images' head masks (:func:`_foreground`: > 5 % of
        the normalised range, opened by a voxel, small components dropped,
        holes filled), dilated by ``foreground_dilation`` voxels. Default on
        (issue 17): MIND-SSC of the noise in the air drove the field there.
        On IXI pairs (IXI012 -> IXI013, IXI013 -> IXI014, 2 mm) SDlogJ over
        the grid fell from 0.294 to 0.242 (in the air 0.32 -> 0.24) at Dice
        0.582 -> 0.585. (With plain Adam, before ``relative_eps``, it did not
        help: Adam's per-parameter normalisation gave the tiny gradients
        left in the air full-size steps.) A threshold without the opening
        kept 12 % of the air of a sin-remapped T1 (noise lifted by the
        remap); with it, cross-contrast SDlogJ 0.232 -> 0.204 (with
        ``field_extension``). Points outside the moving scan's field of
        view (``moving_mask``, eroded by ``FOV_EROSION`` voxels, the reach
        of the descriptors) never count, whatever this option.
      foreground_dilation: voxels (working grid) of that dilation. Default
        2, the reach of MIND-SSC (radius + dilation): the similarity keeps
        the image edges. Dilation 0 cost the brats known-deformation pairs
        (skull-stripped, benchmark part a) 1.40 -> 1.49 mm.
      field_extension: Jacobi sweeps of :func:`harmonic_extension` applied
        to the field after each level where the similarity has no data
        (outside the similarity mask: the air with ``foreground_mask``, the
        moving scan's missing field of view), 0 = off. There the field is
        set by the regulariser alone, which 230 Adam steps do not bring near
        its minimiser; the extension puts it there (the field's harmonic
        continuation), so the air carries the head's deformation smoothly
        instead of blobs of expansion and compression. Default 200 (the
        control grids have ~30 points per axis). Measured (io-mind, 2 IXI
        pairs, 2 mm, with the mask): SDlogJ over the grid 0.242 -> 0.183,
        in the air 0.24 -> 0.15, Dice 0.585 -> 0.583; brats part a EPE
        1.40 -> 1.37 mm, synthetic contrast 1.03 -> 1.00 mm.
      relative_eps: if > 0, the deformable stage's Adam sees the gradient
        divided by its running RMS over the whole field and uses this eps:
        parameters whose gradient is well below the field's RMS (air,
        scalp, flat regions) then take steps proportional to it instead of
        Adam's full-size steps; 0 = plain Adam. Default 3 (with the doubled
        ``learning_rates``). Measured with benchmarks/io_registration.py
        (io-mind; parts a and s, 3 pairs each; part b, the first 2 IXI pairs;
        /tmp sweep of 2026-12-01): plain Adam EPE 1.40 / 1.00 mm (real /
        synthetic contrast), IXI Dice 0.576 / 0.572 (mono / cross), SDlogJ
        over the grid 0.49 / 0.55, inside the brain 0.180 / 0.188; eps 1:
        1.37 / 1.02 mm, 0.583 / 0.577, 0.34 / 0.38, 0.150 / 0.157; eps 3 with
        the doubled rates: 1.38 / 1.02 mm, 0.583 / 0.578, 0.32 / 0.36, 0.150 /
        0.160; eps 3 at DNS's rates (6 IXI pairs): 1.43 / 1.10 mm. Earlier,
        one pair (IXI012
        -> IXI013 (2 mm): eps 1 / 3 / 10 gave Dice 0.587 / 0.581 / 0.571 and
        SDlogJ over the grid 0.315 / 0.242 / 0.155 (inside the brain 0.176 /
        0.142 / 0.103) against Dice 0.580-0.584 and SDlogJ 0.41-0.43 (0.19-
        0.20) with plain Adam (mono); cross-contrast eps 3 Dice 0.578 vs 0.570,
        SDlogJ 0.266 vs 0.46-0.48; ms_native s1 T1 -> FLAIR 0.86 vs 1.02 mm
        and session 2 -> 1 0.64 vs 0.69 mm from the reference.
      affine_iterations: most Adam steps of the affine stage at each of its
        levels (cycled if shorter); a level stops earlier when the parameters
        have converged (``affine_tolerance``).
      affine_levels: number of pyramid levels of the affine stage, coarse to
        fine, downsampled by ``2 ** (affine_levels - 1 - i) *
        affine_finest_factor``. Defaults: factors 8, 4, 2, 1 (16 to 2 mm on the
        2 mm working grid), ending at the working resolution: stopping at 8 mm
        (the former default) left the rigid stage 1.6 mm (T1 -> FLAIR) and
        4.5 mm (session to session) from the reference on ms_native/patient01
        (benchmarks/results/rigid_reference.md).
      affine_finest_factor: downsampling of the affine stage's finest level.
      affine_similarity: similarity of the affine stage. ``"auto"`` (default):
        ``"mse"`` when the deformable similarity is ``"mse"`` (the user says
        the intensities match), else global Parzen ``"mi"`` as ANTs'
        Mattes-MI affine stage; None = the deformable similarity. Measured on
        an IXI pair: the MIND affine stage reached Dice 0.25, MI 0.40 (ANTs
        affine 0.39). MI's entropy term rewards shrinking a mostly-background
        image: on the 24^3 synthetic blob pair of tests/test_cli.py the MI
        affine scaled by 0.84 and raised the MSE 10x over the headers, the MSE
        affine recovered the shift (MSE 0.0007 -> 0.00002).
      affine_learning_rate: first Adam step of each affine level, in voxels of
        that level; it decays by a cosine to 1 % of itself. Parameters are in
        mm of displacement (translations in mm; rotations, scales and shears
        in units of 1 mm at the fixed foreground's RMS radius).
      affine_tolerance: a level stops once an exponential average of the
        largest parameter change per step is below this fraction of its
        first step (0.02 = 0.01 mm at 2 mm with the default step).
      affine_samples: fixed voxels (drawn once per level inside the foreground
        box) where the affine similarity is evaluated; all of them if the
        box is smaller. Rigid error on ms_native/patient01 (s1 T1 -> FLAIR,
        session 2 -> 1, s1 T2 -> FLAIR; mm): 2^14 0.42 / 0.25 / 0.59, 2^15
        0.39 / 0.26 / 0.60, 2^16 (default) 0.38 / 0.26 / 0.59 at twice the cost
        per step; s2 T1 -> FLAIR 0.47 with 2^15, 0.34 with 2^16.
      affine_deformable_factor: before a deformable stage (``svf``, ``disp``)
        the affine stage stops at this downsampling (default 2: 4 mm on the
        2 mm grid). Measured on ms_native/patient01 (io-mind svf, mm from the
        reference): stopping at 4 mm gave 1.02 (T1 -> FLAIR) and 0.69
        (session 2 -> 1) against 1.11 and 0.73 after a 2 mm affine finish,
        and saved ~3 s per pair; the deformable stage refines the rest.
      affine_deformable_samples: ``affine_samples`` of that pre-alignment
        (default 2^14, a quarter of the cost per step of the rigid/affine
        default). Against 2^15 (`benchmarks/io_registration.py --parts a,s,b
        --ixi-pairs 3`, one session): brats EPE 1.35 / 0.99 mm (2^15: 1.36 /
        1.00), IXI Dice 0.583 / 0.577 (0.580 / 0.579), 0.3 s less per IXI pair.
      affine_model: the pre-alignment of the deformable transforms,
        ``"affine"`` (default) or ``"rigid"``.
      affine_init: ``"auto"`` (default): refine the headers' alignment, the
        centre-of-mass translation and the 4 principal-axes rotations
        (:func:`principal_axes_starts`) at the coarsest level and keep the
        best fit, so an aligned pair is never moved away by a centre of mass
        skewed by a different field of view, a pair whose headers are far off
        still starts close, and a head rotated by any angle is found (IXI
        pairs rotated 90-180 degrees about random axes: io-mind Dice
        0.003-0.010 with header and com only, 0.582-0.585 with the axes,
        0.579 unrotated; benchmarks/keymorph_rotation.py); ``"upright"``: the
        headers and the centre of mass only, for scans known to share an
        orientation (the pre-alignment of training subjects: at 4 mm the
        principal-axes starts of two near-symmetric skull-stripped brains turned
        3 of 7 IXI subjects by ~180 degrees); ``"header"`` or ``"com"``: only that.
      grid_buckets: zero-pad the grid at the high end of each axis to
        :func:`bucket_shape` (at most 25 % more voxels per axis), with the
        padding outside both masks, so scans of different sizes in one size
        class share every compiled program (issue 18). The step sizes and
        regularisation follow the unpadded grid, so padding changes only the
        control grid's extent and the random samples.
    """

    similarity: str = "mind"
    transform: str = "svf"
    affine: bool = True
    levels: int = 3
    iterations: tuple = (100, 80, 50)
    learning_rates: tuple = (2e-2, 1e-2, 6e-3)
    smoothness: tuple = (0.6, 0.5, 0.4)
    smoothness_scale: float = 30.0
    field_decay: float = 0.0
    control_spacing: int = 4
    field_sigma: float = 2.0
    num_samples: int = 2 ** 15
    integration_steps: int = 5
    integration_grad: str = "identity"
    mind_radius: int = 1
    feature_sigma: float = 0.0
    mind_dilation: int = 1
    dns_sigma: float = 0.0
    lncc_window: int = 5
    mi_bins: int = 32
    mi_kernel: str = "bspline"
    ngf_epsilon: float = 0.05
    foreground_mask: bool = True
    relative_eps: float = 3.0
    foreground_dilation: int = 2
    field_extension: int = 200
    affine_iterations: tuple = (100, 100, 80, 60)
    affine_levels: int = 4
    affine_finest_factor: int = 1
    affine_learning_rate: float = 0.25
    affine_similarity: str | None = "auto"
    affine_tolerance: float = 0.02
    affine_samples: int = 2 ** 16
    affine_init: str = "auto"
    affine_model: str = "affine"
    affine_deformable_factor: int = 2
    affine_deformable_samples: int = 2 ** 14
    grid_buckets: bool = True

    @property
    def rigid_affine(self) -> bool:
        """Whether the affine stage is rigid: ``transform="rigid"``, or a deformable transform whose
        pre-alignment is ``affine_model="rigid"``."""
        return self.transform == "rigid" or (self.transform != "affine" and self.affine_model == "rigid")

    def __post_init__(self):
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.affine_similarity not in (None, "auto") + SIMILARITIES:
            raise ValueError(f"affine_similarity must be None, 'auto' or one of {SIMILARITIES}, "
                             f"got {self.affine_similarity!r}")
        if self.affine_similarity == "dns" or (self.affine_similarity is None and self.similarity == "dns"):
            raise ValueError("the affine stage needs an image similarity (affine_similarity='mi', ...), not 'dns'")
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        for name in ("iterations", "learning_rates", "smoothness"):
            if len(getattr(self, name)) != self.levels:
                raise ValueError(f"{name} needs one value per level ({self.levels}), got {getattr(self, name)}")
        if self.field_decay < 0:
            raise ValueError(f"field_decay must be >= 0, got {self.field_decay}")
        if self.control_spacing < 1:
            raise ValueError(f"control_spacing must be >= 1, got {self.control_spacing}")
        if self.affine_levels < 1 or self.affine_finest_factor < 1:
            raise ValueError(f"affine_levels and affine_finest_factor must be >= 1, got "
                             f"{self.affine_levels}, {self.affine_finest_factor}")
        if self.mi_kernel not in L.mi.KERNELS:
            raise ValueError(f"mi_kernel must be one of {L.mi.KERNELS}, got {self.mi_kernel!r}")
        if self.affine_deformable_samples < 0:
            raise ValueError(f"affine_deformable_samples must be >= 0, got {self.affine_deformable_samples}")
        if self.affine_deformable_factor < 1:
            raise ValueError(f"affine_deformable_factor must be >= 1, got {self.affine_deformable_factor}")
        if self.affine_model not in ("affine", "rigid"):
            raise ValueError(f"affine_model must be 'affine' or 'rigid', got {self.affine_model!r}")
        if self.affine_init not in AFFINE_INITS:
            raise ValueError(f"affine_init must be one of {AFFINE_INITS}, got {self.affine_init!r}")
        if not self.affine_tolerance >= 0 or self.affine_samples < 0:
            raise ValueError(f"affine_tolerance and affine_samples must be >= 0, got {self.affine_tolerance}, "
                             f"{self.affine_samples}")
        if not self.relative_eps >= 0:
            raise ValueError(f"relative_eps must be >= 0, got {self.relative_eps}")
        if self.field_extension < 0:
            raise ValueError(f"field_extension must be >= 0, got {self.field_extension}")
        if self.integration_grad not in ("identity", "exact"):
            raise ValueError(f"integration_grad must be 'identity' or 'exact', got {self.integration_grad!r}")
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")


class InstanceResult(NamedTuple):
    """Output of :func:`register_instance` (all on the fixed grid, voxel units).

    Attributes:
      matrix: ``(D+1, D+1)`` affine, fixed voxel -> moving voxel (identity if
        no affine stage).
      disp: ``(*spatial, D)`` deformable displacement ``u``; the whole map is
        ``y = matrix @ (x + u(x))``.
      total_disp: ``(*spatial, D)`` displacement of the whole map, ``y - x``.
      inverse_disp: ``(*spatial, D)`` displacement of the inverse whole map
        (``svf``: exact ``exp(-v)``; ``disp``: fixed-point inverse; affine:
        the inverse matrix), or None.
      velocity: the optimised velocity on its coarse grid (``svf``), else None;
        with ``grid_buckets`` that grid spans the padded :func:`bucket_shape`
        (its high end lies outside the input grid).
      losses: tuple of per-level ``(iterations,)`` loss curves (affine stage
        first), float32 numpy arrays.
    """

    matrix: np.ndarray
    disp: Array
    total_disp: Array
    inverse_disp: Array | None
    velocity: Array | None
    losses: tuple


# ----------------------------------------------------------------------------- pyramid and features


def _level_shape(shape, factor):
    """The grid of pyramid level ``factor`` (:func:`_downsample`'s output): the grid itself at factor 1."""
    if factor == 1:
        return tuple(shape)
    return tuple(max(4, int(round(s / factor))) for s in shape)


def _downsample(image, factor):
    """Anti-aliased downsampling of ``(*spatial, C)`` by ``factor``."""
    if factor == 1:
        return image
    shape = _level_shape(image.shape[:-1], factor)
    if all(n == m * factor for n, m in zip(image.shape[:-1], shape)):  # the same operator, only outputs computed
        return gaussian_downsample(image, 0.5 * factor, factor)
    blurred = gaussian_blur(image, 0.5 * factor)
    return jax.image.resize(blurred, shape + image.shape[-1:], method="linear", antialias=False)


_downsample_jit = jax.jit(_downsample, static_argnames=("factor",))


@program(static_argnames=("levels",), quick=True)
def _binary_level_masks(mask, *, levels):
    """A ``(*spatial)`` mask at each ``(factor, pad_to)`` of ``levels``: downsampled to pyramid level ``factor``,
    binarised at 0.5 and zero-padded at the high end to ``pad_to`` (if not None). One program for a stage's
    levels (one compilation instead of one per level: issue 18)."""
    return tuple(_pad_high((_downsample(mask[..., None], f)[..., 0] > 0.5).astype(jnp.float32), p, "constant")
                 for f, p in levels)


@program(static_argnames=("factor", "cfg", "pad_to"), quick=True)
def _level_features(image, *, factor, cfg: InstanceConfig, pad_to=None):
    """Features of ``image`` at pyramid level ``factor`` (MIND-SSC, the image itself, or smoothed learned
    descriptors: for ``"dns"`` ``image`` is already the full-resolution descriptor stack, which is
    downsampled as DNS's IO pyramid, supplementary B.1); edge-padded at the high end to ``pad_to``, if given
    (sampled deformable levels, :func:`_sampled_level`)."""
    image = _downsample(image, factor)
    if cfg.similarity == "dns":
        image = gaussian_blur(image, cfg.dns_sigma)
    elif cfg.similarity == "mind":
        image = gaussian_blur(L.mind_ssc(image, radius=cfg.mind_radius, dilation=cfg.mind_dilation),
                              cfg.feature_sigma)
    return _pad_high(image, pad_to)


def similarity_fn(cfg: InstanceConfig) -> Callable:
    """The configured similarity: ``(fixed_features, warped_moving_features, mask) -> scalar`` to minimise.

    Features are the images themselves, MIND-SSC descriptors for ``"mind"``,
    or learned descriptors for ``"dns"`` (negated cosine similarity).
    """
    if cfg.similarity == "mind":
        return lambda f, m, mask: L.descriptor_mse(f, m, mask=mask)
    if cfg.similarity == "dns":
        return lambda f, m, mask: L.cosine_similarity_loss(f, m, mask=mask)
    if cfg.similarity == "mse":
        return lambda f, m, mask: L.mse(f, m, mask=mask)
    if cfg.similarity == "lncc":
        return lambda f, m, mask: L.lncc(f, m, window=cfg.lncc_window, mask=mask)
    if cfg.similarity == "mi":
        return lambda f, m, mask: L.mutual_information(f, m, bins=cfg.mi_bins, mask=mask, kernel=cfg.mi_kernel)
    if cfg.similarity == "nmi":
        return lambda f, m, mask: L.nmi(f, m, bins=cfg.mi_bins, mask=mask, kernel=cfg.mi_kernel)
    return lambda f, m, mask: L.ngf(f, m, epsilon=cfg.ngf_epsilon, mask=mask)


def normalize_intensity(image: Float[Array, "*spatial C"], *, lower=0.5, upper=99.5) -> Float[Array, "*spatial C"]:
    """Map the ``[lower, upper]`` percentiles of each channel to ``[0, 1]`` and clip.

    Args:
      image: ``(*spatial, C)`` float image.
      lower, upper: percentiles (0-100).

    Returns:
      ``(*spatial, C)`` float32 image in ``[0, 1]`` (constant channels map to 0).

    Concrete inputs are normalised on the host (``np.percentile``,
    partition-based: ~20 ms for a 2 mm brain, where XLA's CPU sort took
    0.7 s; and no program compiled per image shape); traced inputs use
    ``jnp.percentile``. Both interpolate linearly.
    """
    axes = tuple(range(jnp.ndim(image) - 1))
    if isinstance(image, jax.core.Tracer):
        x = jnp.asarray(image, jnp.float32)
        lo = jnp.percentile(x, lower, axis=axes, keepdims=True)
        hi = jnp.percentile(x, upper, axis=axes, keepdims=True)
        return apply_intensity_range(x, lo, hi)
    # all on the host: no program to compile per image shape
    host = np.asarray(image, np.float32)
    return to_device(apply_intensity_range(host, *intensity_range(host, lower=lower, upper=upper), xp=np))


def intensity_range(image, *, lower=0.5, upper=99.5) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``: the ``lower`` and ``upper`` percentiles of each channel of a ``(*spatial, C)`` image, on the
    host (float32 ``(1, ..., 1, C)`` NumPy arrays; :func:`normalize_intensity` maps them to 0 and 1)."""
    host = np.asarray(image, np.float32)
    lo, hi = np.percentile(host, [lower, upper], axis=tuple(range(host.ndim - 1)), keepdims=True).astype(np.float32)
    return lo, hi


def apply_intensity_range(x, lo, hi, *, xp=jnp):
    """``clip((x - lo) / (hi - lo), 0, 1)`` per channel, 0 where ``hi == lo`` (``xp``: ``jnp`` or ``np``)."""
    span = hi - lo
    safe = xp.where(span > 0, span, xp.float32(1.0))
    return xp.where(span > 0, xp.clip((x - lo) / safe, xp.float32(0.0), xp.float32(1.0)), xp.float32(0.0))


def center_of_mass(image: Float[Array, "*spatial C"], *, threshold: float | None = 0.05) -> Float[Array, "D"]:
    """Centre of mass in voxel coordinates.

    Args:
      image: ``(*spatial, C)`` image (channels summed).
      threshold: if given, the centre of the foreground ``image > threshold *
        max`` (contrast-independent, used to initialise multi-modal affine
        alignment); None weights voxels by their (non-negative) intensity.

    Returns:
      ``(D,)`` float32 voxel coordinates.
    """
    if not isinstance(image, jax.core.Tracer):  # host: no program compiled per image shape
        w = np.sum(np.maximum(np.asarray(image, np.float32), 0.0), axis=-1)
        if threshold is not None:
            n, mean, _ = _mask_moments(w > threshold * np.max(w))
            return to_device(mean if n > 0 else np.zeros(w.ndim), np.float32)
        if not w.sum() > 0:
            return jnp.zeros(w.ndim, jnp.float32)
        return to_device(ndi.center_of_mass(w), np.float32)
    w = jnp.sum(jnp.maximum(image, 0.0), axis=-1)
    if threshold is not None:
        w = (w > threshold * jnp.max(w)).astype(jnp.float32)
    grid = identity_grid(w.shape)
    return jnp.sum(grid * w[..., None], axis=tuple(range(w.ndim))) / jnp.maximum(jnp.sum(w), 1e-12)


def _mask_moments(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``(count, (D,) mean voxel index, (D, D) covariance of the indices)`` (float64, covariance with ``ddof=1``
    as ``np.cov``; NaN for fewer than 2 voxels) of a boolean host mask, exact, from its sums along all axes but
    one or two (listing a 2 mm head's ~700k voxels took ~50 ms per image; issue 18)."""
    d = mask.ndim
    idx = [np.arange(n, dtype=np.float64) for n in mask.shape]
    def marginal(*axes):  # the sums over every other axis
        return np.sum(mask, axis=tuple(a for a in range(d) if a not in axes), dtype=np.int64)

    pair = {(k, l): marginal(k, l) for k, l in itertools.combinations(range(d), 2)}
    first = [marginal(k) for k in range(d)]
    n = int(first[0].sum())
    s1 = np.array([idx[k] @ first[k] for k in range(d)])
    s2 = np.diag([(idx[k] ** 2) @ first[k] for k in range(d)])
    for (k, l), p in pair.items():
        s2[k, l] = s2[l, k] = idx[k] @ p @ idx[l]
    mean = s1 / max(n, 1)
    cov = (s2 - n * np.outer(mean, mean)) / (n - 1) if n > 1 else np.full((d, d), np.nan)
    return n, mean, cov


def principal_axes_starts(fixed, moving, spacing=None, *, threshold: float = 0.05) -> dict:
    """Rigid starts that align the principal axes of the two foregrounds (voxel matrices, fixed -> moving).

    Each image's foreground (``> threshold * max``, contrast-independent, as
    :func:`center_of_mass`) has a centroid ``c`` and a covariance whose
    eigenvectors ``U`` (columns, ascending eigenvalues) are its principal
    axes, in mm (``spacing``: mm per voxel, one grid for both images). The
    rotations ``R = U_m D U_f^T`` with ``D`` a diagonal of signs and
    ``det R = +1`` (4 of them: the axes' signs are not determined by the
    moments) map the fixed axes onto the moving ones; the maps are
    ``x_m = c_m + R (x_f - c_f)`` in mm, returned in voxels. Any rotation of
    the moving head, up to 180 degrees about any axis, is one of them to
    within the axes' own uncertainty, which the MI refinement of the affine
    stage then removes; used as extra candidates of ``affine_init="auto"``.

    Args:
      fixed, moving: ``(*spatial, C)`` images on one grid (2D or 3D).
      spacing: ``(D,)`` mm per voxel (None: 1).

    Returns:
      ``{"axes1": M, ...}``, each ``(D + 1, D + 1)`` float32; empty when a
      foreground has fewer than ``2 D`` voxels.
    """
    d = fixed.ndim - 1
    sp = np.ones(d) if spacing is None else np.asarray(spacing, np.float64).reshape(d)

    def moments(image):
        w = np.sum(np.maximum(np.asarray(image, np.float32), 0.0), axis=-1)
        n, mean, cov = _mask_moments(w > threshold * np.max(w))
        if n < 2 * d:
            return None
        _, u = np.linalg.eigh(cov * np.outer(sp, sp))  # the covariance of the voxels' mm positions
        return mean * sp, u

    mf, mm = moments(fixed), moments(moving)
    if mf is None or mm is None:
        return {}
    (cf, uf), (cm, um) = mf, mm
    out = {}
    parity = np.sign(np.linalg.det(um) * np.linalg.det(uf))  # det R = parity * prod(signs) must be +1
    for signs in itertools.product((1.0, -1.0), repeat=d - 1):
        r = um @ np.diag(list(signs) + [parity * np.prod(signs)]) @ uf.T
        mat = np.eye(d + 1)
        mat[:d, :d] = np.diag(1.0 / sp) @ r @ np.diag(sp)
        mat[:d, d] = (cm - r @ cf) / sp
        out[f"axes{len(out) + 1}"] = mat.astype(np.float32)
    return out


# ----------------------------------------------------------------------------- affine stage


def _affine_geometry(fixed, spacing):
    """``(center_mm, radius_mm)``: centre of the fixed foreground and its RMS radius, in mm of the grid axes
    (on the host: float32 arrays)."""
    f = np.asarray(fixed, np.float32)
    idx = np.nonzero(np.sum(np.maximum(f, 0.0), -1) > 0.05 * np.max(f))
    if len(idx[0]) == 0:
        return to_device(np.zeros(f.ndim - 1), np.float32), to_device(1.0, np.float32)
    x = np.stack(idx, -1).astype(np.float64) * np.asarray(spacing, np.float64)
    c = x.mean(0)
    r = np.sqrt(np.mean(np.sum((x - c) ** 2, -1)))
    return to_device(c, np.float32), to_device(max(r, 1.0), np.float32)


def _affine_units(ndim: int, radius, rigid: bool):
    """Per-parameter size of one raw unit (1 mm of displacement at the foreground's RMS radius) and the mask
    of trained parameters (rigid: translation and rotation only, so no scale or shear can leak in)."""
    n = num_params(ndim)
    units = jnp.concatenate([jnp.ones(n["translation"]), jnp.full(n["rotation"] + n["scale"] + n["shear"],
                                                                  1.0 / radius)])
    trainable = np.ones(sum(n.values()), np.float32)
    if rigid:
        trainable[n["translation"] + n["rotation"]:] = 0.0
    return units, to_device(trainable)


@program(static_argnames=("rigid",), quick=True)
def _raw_to_matrix(raw, spacing, center_mm, radius, *, rigid):
    """Voxel-space matrix of raw affine parameters acting in mm about ``center_mm``: ``S^-1 A_mm S``."""
    d = spacing.shape[0]
    units, trainable = _affine_units(d, radius, rigid)
    a_mm = params_to_matrix(identity_params(d) + raw * units * trainable, ndim=d, center=center_mm)
    s = jnp.concatenate([spacing, jnp.ones(1)])
    return a_mm * (s[None, :] / s[:, None])  # (S^-1 A S)_ij = A_ij s_j / s_i, S = diag(spacing, 1)


AFFINE_SLOTS = 8  # candidate starts one affine-level program refines at once (3D "auto": 6)


def _affine_points(level_shape, box, n_points, *, seed):
    """``(points, weights)``: ``n_points`` level-voxel points where the affine similarity is evaluated.

    They are a random subset of the foreground ``box`` drawn once per level
    on the host (NumPy, seeded: the same points at every step, so the
    objective is deterministic), or, when the box holds fewer voxels, all of
    them, padded with zero-weight repeats: the count depends only on the
    caller, so one compiled program serves every level and scan.
    """
    count = int(n_points)
    lo, hi = np.asarray(box[0]), np.asarray(box[1])
    sizes = tuple(int(s) for s in hi - lo + 1)
    total = int(np.prod(sizes))
    if total >= count:
        flat = np.random.default_rng(seed).choice(total, count, replace=False)
        weights = np.ones(count, np.float32)
    else:
        flat = np.concatenate([np.arange(total), np.zeros(count - total, np.int64)])
        weights = (np.arange(count) < total).astype(np.float32)
    idx = np.stack(np.unravel_index(flat, sizes), -1) + lo
    return idx.astype(np.int32), weights


@program(static_argnames=("cfg", "max_iterations", "rigid"))
def _affine_level(raw, init, owner, fixed_f, moving_f, valid, points, weights, ratio, spacing, center_mm, radius,
                  step0, iterations, *, cfg, max_iterations, rigid):
    """Adam on the raw affine parameters of ``S`` candidate slots at one pyramid level, with a stopping rule.

    ``raw`` ``(S, P)``, ``init`` ``(S, D+1, D+1)``: each slot's parameters and initial voxel matrix; its map
    is ``init @ A(raw)``. The fixed level-voxel ``points`` ``(S, N, D)`` (``weights`` ``(S, N)``) come in
    ``S`` groups, group ``g`` mapped by slot ``owner[g]``: at the coarsest level each candidate start owns
    one group (the same points), at the finer levels one candidate owns them all. A slot's loss is the
    similarity over its groups' points (fixed values exact, moving sampled at the mapped points), weighted
    by the moving scan's field-of-view mask ``valid`` sampled at the same points, so points that map outside
    the moving scan do not count. The step starts at ``step0`` mm and decays by a cosine to 1 % of it; a
    slot stops when an exponential average of its largest parameter change per step (mm at the foreground
    radius) falls below ``cfg.affine_tolerance * step0`` (a slot that owns no group does not move), and
    the loop when every slot has. ``iterations`` (at most ``max_iterations``) is traced, and the level's
    grid enters only through the arrays' shapes and ``ratio``, so every level, padded to one grid, shares
    the program (issue 18). Returns ``(raw, curves (S, max_iterations), steps (S,), A(raw) (S, D+1, D+1))``
    (the voxel matrices of the raw parameters, without ``init``); unused curve entries repeat the last loss.
    Each slot's result equals a separate run of it alone (the steps of the others are masked out).
    """
    n_slots, n, d = points.shape
    sim = similarity_fn(cfg)
    onehot = jax.nn.one_hot(owner, n_slots, dtype=jnp.float32)  # (groups, slots)
    owned = jnp.sum(onehot, 0) > 0
    x_fine = (points.astype(jnp.float32) + 0.5) * ratio - 0.5  # working-grid voxels of the level points
    f = fixed_f[tuple(points[..., i] for i in range(d))]  # (groups, N, C)
    # MI/NMI: the fixed points' bin weights are computed once (the images are normalised to [0, 1], so the
    # bins stay put), which halves the cost of a step
    fast_mi = cfg.similarity in ("mi", "nmi") and fixed_f.shape[-1] == 1
    if fast_mi:
        a_f = L.parzen_weights(f[..., 0], bins=cfg.mi_bins, kernel=cfg.mi_kernel)

    def schedule(i):  # optax.cosine_decay_schedule(1, iterations, alpha=0.01), with a traced length
        t = jnp.minimum(i, iterations).astype(jnp.float32) / iterations.astype(jnp.float32)
        return 0.01 + 0.99 * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

    opt = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(lambda i: -step0 * schedule(i)))

    def losses(raw):
        mats = jax.vmap(lambda r, m: m @ _raw_to_matrix(r, spacing, center_mm, radius, rigid=rigid))(raw, init)
        a = mats[owner]  # (groups, D+1, D+1)
        y = ((jnp.einsum("gni,gji->gnj", x_fine, a[:, :d, :d]) + a[:, None, :d, d]) + 0.5) / ratio - 0.5
        m = sample(moving_f, y.reshape(-1, d), padding="zeros").reshape(n_slots, n, -1)
        # points leave or enter the moving field of view without a gradient (as ITK's metrics drop them)
        w = jax.lax.stop_gradient(sample(valid, y.reshape(-1, d), padding="zeros")[:, 0]).reshape(n_slots, n)
        w = w * weights
        if fast_mi:
            out = L.mi_of_sample_groups(a_f, m[..., 0], w, owner, n_slots, kernel=cfg.mi_kernel,
                                        normalized=cfg.similarity == "nmi")
        else:
            fc, mc = f.reshape(-1, 1, f.shape[-1]), m.reshape(-1, 1, m.shape[-1])
            out = jax.vmap(lambda k: sim(fc, mc, (w * onehot[:, k, None]).reshape(-1, 1)))(jnp.arange(n_slots))
        return jnp.where(owned, out, 0.0)

    def cond(carry):
        return jnp.any(carry[-1])

    def body(carry):
        raw, state, i, change, curve, steps, active = carry
        vals, vjp = jax.vjp(losses, raw)  # the slots' losses are independent: one pullback of ones
        grad = vjp(jnp.ones_like(vals))[0]
        upd, state = opt.update(grad, state, raw)
        upd = jnp.where(active[:, None], upd, 0.0)
        change = jnp.where(active, 0.8 * change + 0.2 * jnp.max(jnp.abs(upd), axis=-1), change)
        curve = jnp.where(active[:, None] & (jnp.arange(max_iterations) >= i), vals[:, None], curve)
        steps = steps + active.astype(jnp.int32)
        i = i + 1
        active = active & (i < iterations) & ((i < 10) | (change > cfg.affine_tolerance * step0))
        return optax.apply_updates(raw, upd), state, i, change, curve, steps, active

    start = (raw, opt.init(raw), jnp.int32(0), jnp.full(n_slots, step0, jnp.float32),
             jnp.zeros((n_slots, max_iterations), jnp.float32), jnp.zeros(n_slots, jnp.int32),
             owned & (iterations > 0))
    raw, _, _, _, curve, steps, _ = jax.lax.while_loop(cond, body, start)
    return raw, curve, steps, jax.vmap(lambda r: _raw_to_matrix(r, spacing, center_mm, radius, rigid=rigid))(raw)


# ----------------------------------------------------------------------------- deformable stage


_SAMPLED = ("mind", "dns", "mse", "mi", "nmi")


def _field_disp_at(disp_field, points, level_shape):
    """Linear interpolation of a control-grid displacement at level-voxel ``points``, in level voxels.

    Same convention as :func:`resize_disp` (voxel centres aligned, border
    values held), so it agrees with ``resize_disp(disp_field, level_shape)``; ``level_shape`` may be traced.
    """
    ratio = jnp.asarray(disp_field.shape[:-1], jnp.float32) / jnp.asarray(level_shape, jnp.float32)
    coords = (points + 0.5) * ratio - 0.5
    return sample(disp_field, coords, padding="border") / ratio


def _box_points(key, box, n):
    """``(n, D)`` int32 voxels drawn uniformly from the box ``box[0] <= x <= box[1]`` (``(2, D)`` int32).

    One 32-bit draw per point, taken modulo the box's voxel count and unravelled (the modulo's bias is below
    ``voxels / 2**32``, < 0.5 % for a 256^3 box): ``jax.random.randint`` per axis drew six times the bits
    and took 1.4 ms of an 11.8 ms deformable step on 2 CPU cores, this 0.3 ms (issue 18).
    """
    ext = (box[1] - box[0] + 1).astype(jnp.uint32)
    r = jax.random.bits(key, (n,), jnp.uint32) % jnp.prod(ext)
    coords = []
    for i in range(box.shape[-1] - 1, 0, -1):
        coords.append(r % ext[i])
        r = r // ext[i]
    coords.append(r)
    return box[0] + jnp.stack(coords[::-1], axis=-1).astype(jnp.int32)


def _pad_high(x, shape, mode="edge"):
    """Pad ``(*spatial, ...)`` at the high end of its first ``len(shape)`` axes to ``shape`` (traceable)."""
    if shape is None or tuple(x.shape[:len(shape)]) == tuple(shape):
        return x
    pad = [(0, n - s) for n, s in zip(shape, x.shape)] + [(0, 0)] * (x.ndim - len(shape))
    return jnp.pad(x, pad, mode=mode)


def _sampled_level(cfg: InstanceConfig, level_shape) -> bool:
    """Whether a deformable level evaluates its similarity at random samples (else at every voxel).

    Sampled levels only gather from their arrays, so those are padded (edge
    values) to the finest level's grid and the level is described by traced
    values (:func:`_level_hyper`): with the default control grid, whose size is
    the same at every level, one compiled program serves every sampled level
    (issue 18). A level with no more voxels than ``num_samples`` is evaluated
    densely on its own grid (padding it would make its gathers slower: IXI
    2 mm, 32x32x24 level, 5 -> 12 ms per Adam step).
    """
    return cfg.similarity in _SAMPLED and 0 < cfg.num_samples < int(np.prod(level_shape))


def _level_hyper(cfg: InstanceConfig, level: int, level_shape, field_shape, n_mean: float) -> dict:
    """The traced per-level inputs of :func:`_deformable_level` (host-side, float32 / int32 / bool)."""
    spacing = float(np.mean(np.asarray(level_shape, np.float32) / np.asarray(field_shape, np.float32)))
    return {
        # the paper's normalised step: lr * (mean level size) / 2 in level voxels
        "lr": np.float32(cfg.learning_rates[level] * n_mean / 2.0),
        # diffusion of the level displacement in the paper's normalised units, (2/N)^2 |grad u|^2 per level
        # voxel; the field is `spacing` times coarser
        "lam": np.float32(cfg.smoothness[level] * cfg.smoothness_scale * (2.0 / n_mean) ** 2 / spacing ** 2),
        "decay": np.float32(cfg.field_decay * (2.0 / n_mean) ** 2),
        "iterations": np.int32(cfg.iterations[level]),
        "shape": np.asarray(level_shape, np.int32),
        "level": np.int32(level),  # folded into the key inside the program (an eager fold_in compiles)
    }


def _resize_to(x, level_shape, out_shape):
    """Linear resize (no antialiasing) of the ``level_shape`` corner of a padded ``(*spatial)`` array to ``out_shape``.

    Equals ``jax.image.resize(x[:level_shape], out_shape, "linear", antialias=False)`` for ``out_shape <=
    level_shape`` (the samples never reach the padding), with ``level_shape`` traced.
    """
    scale = jnp.asarray(out_shape, jnp.float32) / level_shape.astype(jnp.float32)
    return jax.image.scale_and_translate(x, out_shape, tuple(range(x.ndim)), scale, jnp.zeros_like(scale),
                                         method="linear", antialias=False)


@program(static_argnames=("cfg", "sampled"), donate_argnums=(0,))
def _deformable_level(field, fixed_f, moving_f, mask, box, key, hyper, *, cfg, sampled):
    """Adam on the control-grid velocity/displacement at one pyramid level; returns (field, losses).

    ``box`` is ``(2, D)`` int32 (low, high) of the foreground bounding box
    where random similarity samples are drawn. ``hyper`` (:func:`_level_hyper`)
    holds the level's step, regulariser weights, iteration count and grid
    shape, all traced, so levels (and scans of one size class) whose arrays
    have equal shapes share this program: on ``sampled`` levels
    (:func:`_sampled_level`) the features and ``mask`` are padded to the
    finest level's grid. ``losses`` is ``(max(cfg.iterations),)``; entries
    from ``hyper["iterations"]`` on are 0. The samples' key is ``key`` folded with
    ``hyper["level"]`` and the step.
    """
    d = field.ndim - 1
    lr = hyper["lr"]
    level_key = jax.random.fold_in(key, hyper["level"])
    sim = similarity_fn(cfg)
    if cfg.relative_eps > 0:  # Adam on the gradient divided by its global RMS, with eps in those units
        opt = optax.chain(_scale_by_global_rms(), optax.adam(lr, eps=cfg.relative_eps))
    else:
        opt = optax.adam(lr)
    level_shape = hyper["shape"]

    def field_disp(field):
        v = gaussian_blur(field, cfg.field_sigma)
        if cfg.transform == "svf" and cfg.integration_grad == "identity":
            # integrate a constant: traced under grad, the integration's samples would otherwise take the
            # differentiated (per-corner) form whose tangents stop_gradient then drops (issue 18)
            v0 = jax.lax.stop_gradient(v)
            return v + (_integrate_field(v0, cfg) - v0)
        return _integrate_field(v, cfg)

    def loss_fn(field, step_key):
        disp_field = field_disp(field)
        if sampled:
            pts = _box_points(step_key, box, cfg.num_samples)
            ptsf = pts.astype(jnp.float32)
            u = _field_disp_at(disp_field, ptsf, level_shape)
            # gathers by linear index into (voxels, C) rows: ~1 ms of the 11 ms step cheaper than by 3 indices
            lin = jnp.ravel_multi_index(tuple(pts.T), fixed_f.shape[:-1], mode="clip")
            f = fixed_f.reshape(-1, fixed_f.shape[-1])[lin][:, None, :]
            m = sample(moving_f, ptsf + u, padding="border")[:, None, :]
            w = None if mask is None else mask.reshape(-1)[lin][:, None]
            value = sim(f, m, w)
        else:
            disp = resize_disp(disp_field, fixed_f.shape[:-1])
            warped = sample(moving_f, identity_grid(fixed_f.shape[:-1]) + disp, padding="border")
            value = sim(fixed_f, warped, mask)
        # Regularise the control-grid field (velocity for svf): exact and cheap.
        reg = hyper["lam"] * L.diffusion(field)
        if cfg.field_decay > 0:
            reg = reg + hyper["decay"] * jnp.mean(jnp.sum(field**2, axis=-1))
        return value + reg

    def step(i, carry):
        field, state, curve = carry
        loss, g = jax.value_and_grad(loss_fn)(field, jax.random.fold_in(level_key, i))
        upd, state = opt.update(g, state, field)
        return optax.apply_updates(field, upd), state, curve.at[i].set(loss)

    curve = jnp.zeros((max(cfg.iterations),), jnp.float32)
    field, _, curve = jax.lax.fori_loop(0, hyper["iterations"], step, (field, opt.init(field), curve))
    field = gaussian_blur(field, cfg.field_sigma)
    if cfg.field_extension > 0 and mask is not None:
        weight = _resize_to(mask, level_shape, field.shape[:-1])
        field = harmonic_extension(field, jnp.clip(weight, 0.0, 1.0), iterations=cfg.field_extension)
    return field, curve


def harmonic_extension(field: Float[Array, "*spatial C"], weight: Float[Array, "*spatial"], *,
                       iterations: int) -> Float[Array, "*spatial C"]:
    """Replace ``field`` where ``weight`` < 1 by its smoothest continuation from where ``weight`` = 1.

    Jacobi iterations of ``u <- w f + (1 - w) mean_nb(u)`` (``mean_nb``: the
    mean of the 2 x D face neighbours, borders replicated, i.e. zero normal
    derivative): at convergence ``u = f`` where ``w = 1`` and ``u`` is
    harmonic (the minimiser of the diffusion energy ``sum |grad u|^2``) where
    ``w = 0``, as if the regulariser alone had been optimised to convergence
    there. Starts from ``f``.

    Args:
      field: ``(*spatial, C)`` float field (e.g. a control-grid velocity).
      weight: ``(*spatial)`` in [0, 1], the data's weight per point (1 = keep).
      iterations: number of Jacobi sweeps (static).

    Returns:
      Array of ``field``'s shape and dtype.

    References:
      Jacobi relaxation of Laplace's equation (Press et al., Numerical
      Recipes, 3rd ed., Sec. 20.5); why and what it bought: docs/experiments/
      issue17_regularity.md and :class:`InstanceConfig` ``field_extension``.
    """
    d = field.ndim - 1
    w = weight[..., None].astype(field.dtype)
    keep = w * field

    def sweep(_, u):
        acc = jnp.zeros_like(u)
        for ax in range(d):
            pad = [(0, 0)] * u.ndim
            pad[ax] = (1, 1)
            up = jnp.pad(u, pad, mode="edge")
            n = u.shape[ax]
            acc = acc + jax.lax.slice_in_dim(up, 0, n, axis=ax) + jax.lax.slice_in_dim(up, 2, n + 2, axis=ax)
        return keep + (1 - w) * acc / (2 * d)

    return jax.lax.fori_loop(0, iterations, sweep, field)


def _scale_by_global_rms(decay: float = 0.99, eps: float = 1e-12) -> optax.GradientTransformation:
    """Divide the gradient by a running, bias-corrected RMS over all of its entries (one scale for the field)."""

    def init(params):
        del params
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)

    def update(updates, state, params=None):
        del params
        nu, count = state
        count = count + 1
        sq = sum(jnp.mean(jnp.square(u)) for u in jax.tree_util.tree_leaves(updates))
        nu = decay * nu + (1 - decay) * sq
        scale = 1.0 / (jnp.sqrt(nu / (1 - decay ** count.astype(jnp.float32))) + eps)
        return jax.tree_util.tree_map(lambda u: u * scale, updates), (nu, count)

    return optax.GradientTransformation(init, update)


def _integrate_field(field, cfg: InstanceConfig):
    """Displacement of a (smoothed) field: ``exp(v)`` for ``svf``, the field itself for ``disp``."""
    return integrate(field, steps=cfg.integration_steps) if cfg.transform == "svf" else field


def _field_to_disp(field, level_shape, cfg: InstanceConfig):
    return resize_disp(_integrate_field(field, cfg), level_shape)


def _level_box(box_fine, ratio, level_shape):
    """A fine-grid ``(2, D)`` box on a level grid ``ratio`` times coarser (per axis), clipped to it."""
    return np.stack([np.floor(box_fine[0] / ratio), np.minimum(np.ceil(box_fine[1] / ratio),
                                                               np.asarray(level_shape) - 1)]).astype(np.int32)


def _foreground_box(fixed, moving, margin=4):
    """(2, D) int32 bounding box of voxels above 5 % of the range in either (normalised) image."""
    fg = np.maximum(np.max(np.asarray(fixed), -1), np.max(np.asarray(moving), -1)) > 0.05
    if not fg.any():
        fg = np.ones_like(fg)
    idx = np.nonzero(fg)
    lo = np.maximum(np.array([i.min() for i in idx]) - margin, 0)
    hi = np.minimum(np.array([i.max() for i in idx]) + margin, np.asarray(fg.shape) - 1)
    return np.stack([lo, hi]).astype(np.int32)


FEATURE_MARGIN = 8    # voxels of context around the foreground box given to a learned feature function
FEATURE_MULTIPLE = 8   # box sizes are rounded up to this (fewer distinct shapes to compile; MASR-Net's stride)


def _feature_box(images, extent=None):
    """Slices of the common foreground box of ``images`` where a learned feature function is run.

    The box (voxels above 5 % of the range in any of the normalised images,
    plus ``FEATURE_MARGIN``, within ``extent``: the unpadded grid, when the
    images are padded to a size class) is rounded up to a multiple of
    ``FEATURE_MULTIPLE`` voxels (clipped to the grid).
    """
    first, *rest = images
    shape = first.shape[:-1]
    union = functools.reduce(jnp.maximum, rest, first)
    box = _foreground_box(first, union, margin=FEATURE_MARGIN)
    if extent is not None:
        box[1] = np.minimum(box[1], np.asarray(extent) - 1)
    size = np.minimum(np.ceil((box[1] - box[0] + 1) / FEATURE_MULTIPLE) * FEATURE_MULTIPLE, shape).astype(int)
    lo = np.clip(np.minimum(box[0], np.asarray(shape) - size), 0, None).astype(int)
    return tuple(slice(int(a), int(a + n)) for a, n in zip(lo, size))


def _features_in_box(feature_fn, image, sl):
    """``feature_fn`` on ``image[sl]``, zero-padded back to the grid of ``image``."""
    f = feature_fn(image[sl])
    pad = [(s.start, n - s.stop) for s, n in zip(sl, image.shape[:-1])] + [(0, 0)]
    return jnp.pad(f, pad)


def _box_features(feature_fn, fixed, *others, extent=None):
    """Learned features of ``fixed`` and each of ``others``, computed only inside their common foreground box.

    One box (:func:`_feature_box`) serves all images, so one compiled network
    serves the pair; features outside it are zero (cosine 0: no pull). On the
    brats 2 mm grid (120x120x78) the box holds ~40 % of the voxels: 2.4x less
    network time; on IXI (120x120x90, padded to 128x128x96) the box is the
    unpadded grid rounded to 120x120x96 instead of the whole padded grid.
    """
    sl = _feature_box((fixed, *others), extent)
    return [_features_in_box(feature_fn, image, sl) for image in (fixed, *others)]


def _in_thread(fn, *args) -> concurrent.futures.Future:
    """``fn(*args)`` in a new thread; the future's ``result()`` waits and re-raises."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)  # the thread ends with the task; nothing waits for it here
    return future


def _in_background(fn, device) -> concurrent.futures.Future:
    """``fn()`` in a thread on ``device`` (JAX's default there); the future's ``result()`` waits and re-raises.

    The learned descriptors of the fixed image do not depend on the affine
    stage, whose many small programs leave a core idle on the CPU: io-dns
    computes them meanwhile (IXI 2 mm pair, 2 cores: see docs/design.md,
    issue 12 "Speed").
    """
    def run():
        with jax.default_device(device):
            return jax.block_until_ready(fn())

    return _in_thread(run)


@program(static_argnames=("factors", "cfg"))
def _affine_pyramid(fixed, moving, valid, mask=None, *, factors, cfg):
    """Fixed, moving and field-of-view images at every affine level (one compiled program), and the fixed
    ``mask`` ``(*spatial)`` at every level as :func:`_binary_level_masks` gives it (None without one).

    Every level is zero-padded at its high end to the last level's grid, so all levels share one
    :func:`_affine_level` program (issue 18). The padding is exact: the fixed image is read only inside the
    foreground box, and the moving image and field of view are sampled with zero padding. The masks are not
    padded; they are here rather than in a program of their own: one compilation less (issue 18).
    """
    out = tuple(tuple(_level_features(x, factor=f, cfg=cfg) if k < 2 else _downsample(x, f) for f in factors)
                for k, x in enumerate((fixed, moving, valid)))
    last = out[0][-1].shape[:-1]
    masks = None if mask is None else _binary_level_masks(mask, levels=tuple((f, None) for f in factors))
    return *(tuple(_pad_high(y, last, mode="constant") for y in levels) for levels in out), masks


def _affine_similarity(cfg) -> str:
    if cfg.affine_similarity == "auto":
        return "mse" if cfg.similarity == "mse" else "mi"
    return cfg.affine_similarity or cfg.similarity


def _affine_plan(cfg: InstanceConfig, fine_shape) -> tuple:
    """``(factors, group)``: the affine stage's pyramid factors, coarse to fine, and the points of each of the
    ``AFFINE_SLOTS`` point groups (every level evaluates slots x group points: at the coarsest level one group
    per candidate start, at the finer levels all groups belong to the chosen start)."""
    factors = [2 ** (cfg.affine_levels - 1 - i) * cfg.affine_finest_factor for i in range(cfg.affine_levels)]
    n_points = cfg.affine_samples
    if cfg.transform in ("svf", "disp"):  # a deformable stage follows: the affine need not reach the finest grid
        factors = [f for f in factors if f >= cfg.affine_deformable_factor] or factors[:1]
        n_points = cfg.affine_deformable_samples
    n_last = n_points if n_points > 0 else int(np.prod(_level_shape(fine_shape, factors[-1])))
    return tuple(factors), max(1, -(-n_last // AFFINE_SLOTS))


def _prepare_affine(cfg: InstanceConfig, image_shape, *, has_mask: bool) -> None:
    """Compile the affine stage's programs in the background (:func:`jaxreg.programs._prepare`) while the host
    prepares the images and the starts: the pyramid, the level masks (``has_mask``: a fixed mask, e.g. the
    size-class padding) and the level program, described as :func:`_affine_stage` will pass them."""
    if not (cfg.affine or cfg.transform in LINEAR_TRANSFORMS) or programs.store_dir() is None:
        return
    fine_shape = tuple(image_shape[:-1])
    d = len(fine_shape)
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    acfg = dataclasses.replace(cfg, similarity=_affine_similarity(cfg))
    factors, group = _affine_plan(cfg, fine_shape)
    image, valid = f32(tuple(image_shape)), f32(fine_shape + (1,))
    mask = f32(fine_shape) if has_mask else None
    levels = _affine_pyramid.output_shape(image, image, valid, mask, factors=factors, cfg=acfg)
    _affine_pyramid.prepare(image, image, valid, mask, factors=factors, cfg=acfg)
    s, n_raw = AFFINE_SLOTS, sum(num_params(d).values())
    _affine_level.prepare(f32((s, n_raw)), f32((s, d + 1, d + 1)), i32((s,)), levels[0][0], levels[1][0],
                          levels[2][0], i32((s, group, d)), f32((s, group)), f32((d,)), f32((d,)), f32((d,)), f32(()),
                          f32(()), np.int32(0), cfg=acfg, max_iterations=max(cfg.affine_iterations),
                          rigid=cfg.rigid_affine)


def _affine_stage(fixed, moving, candidates, cfg, spacing, moving_mask, mask, report):
    """Coarse-to-fine affine (or rigid) stage; returns ``(matrix, curves, chosen initialisation)``.

    Each candidate initial matrix (headers, centre of mass, a given one) is
    refined at the coarsest level; the one with the lowest final similarity
    goes on to the finer levels. Parameters act in mm about the fixed
    foreground's centre (``spacing``: mm per grid voxel), so ``"rigid"`` is
    exactly rigid in world space on anisotropic grids. ``mask``: the fixed
    mask ``(*spatial)`` (the user's, or the size-class padding's) or None.

    Guard: a level whose result has a linear part with determinant outside
    ``AFFINE_DET_RANGE`` (a reflection, det <= 0, or a collapse) is rejected:
    a rejected candidate cannot be chosen (if all are, the best unrefined
    initialisation is kept), and a rejected finer level keeps the coarser
    result. Measured: at an 8 mm working grid the unguarded stage returned a
    reflection on IXI002 T2 -> T1 (94 % folding after the network).
    """
    fine_shape = fixed.shape[:-1]
    d = len(fine_shape)
    rigid = cfg.rigid_affine
    acfg = dataclasses.replace(cfg, similarity=_affine_similarity(cfg))
    spacing = to_device(np.ones(d) if spacing is None else np.reshape(np.asarray(spacing), d), np.float32)
    valid = to_device(np.ones(fine_shape + (1,)) if moving_mask is None
                      else np.reshape(np.asarray(moving_mask), fine_shape + (1,)), np.float32)
    center_mm, radius = _affine_geometry(fixed, spacing)
    factors, group = _affine_plan(cfg, fine_shape)
    fixed_levels, moving_levels, valid_levels, masks = _affine_pyramid(fixed, moving, valid, mask, factors=factors,
                                                                       cfg=acfg)
    masks = [None] * len(factors) if masks is None else list(masks)
    n_raw = sum(num_params(d).values())
    slots = AFFINE_SLOTS

    def run_level(i, inits, raws=()):
        """Refine the starts ``inits`` (<= ``slots``; one at the finer levels) from ``raws`` (default zeros) at
        level ``i``; returns ``(raw, curve, A(raw))`` of each. At level 0 start ``k`` owns group ``k``, after it
        the one start owns every group."""
        owner = np.where(np.arange(slots) < len(inits), np.arange(slots), 0) if i == 0 else np.zeros(slots)
        fixed_f, moving_f = fixed_levels[i], moving_levels[i]
        level_shape = _level_shape(fine_shape, factors[i])
        ratio = np.asarray(fine_shape, np.float32) / np.asarray(level_shape, np.float32)
        box = _level_box(box_fine, ratio, level_shape)
        if i == 0:  # each start's group: the same points (groups of unused slots weigh nothing)
            pts, wts = _affine_points(level_shape, box, group, seed=i)
            pts = np.broadcast_to(pts, (slots,) + pts.shape)
            wts = wts[None] * (np.arange(slots) < len(inits))[:, None].astype(np.float32)
        else:
            pts, wts = _affine_points(level_shape, box, slots * group, seed=i)
            pts, wts = pts.reshape(slots, group, d), wts.reshape(slots, group)
        lm = masks[i]
        if lm is not None:
            wts = wts * np.asarray(lm)[tuple(pts[..., k] for k in range(d))]
        step0 = cfg.affine_learning_rate * float(np.mean(np.asarray(spacing) * ratio))
        iters = np.int32(cfg.affine_iterations[i % len(cfg.affine_iterations)])
        raw0 = np.zeros((slots, n_raw), np.float32)
        raw0[: len(raws)] = np.reshape(np.asarray(raws, np.float32), (len(raws), n_raw))
        init0 = np.broadcast_to(np.eye(d + 1, dtype=np.float32), (slots, d + 1, d + 1)).copy()
        init0[: len(inits)] = np.asarray(inits, np.float32)
        raw, curve, n, amat = _affine_level(to_device(raw0), to_device(init0), to_device(np.asarray(owner, np.int32)),
                                      fixed_f, moving_f, valid_levels[i], to_device(pts, np.int32),
                                      to_device(wts, np.float32), to_device(ratio), spacing, center_mm, radius,
                                      to_device(step0, np.float32), iters, cfg=acfg,
                                      max_iterations=max(cfg.affine_iterations), rigid=rigid)
        raw, curve, n, amat = np.asarray(raw), np.asarray(curve), np.asarray(n), np.asarray(amat, np.float64)
        return [(raw[k], curve[k][: max(int(n[k]), 1)], amat[k]) for k in range(len(inits))]

    box_fine = _foreground_box(fixed, moving)
    results = {}
    names = list(candidates)
    for first in range(0, len(names), slots):  # all starts in one call (up to `slots` of them)
        batch = names[first: first + slots]
        outs = run_level(0, [candidates[k] for k in batch])
        for name, (raw, curve, amat) in zip(batch, outs):
            ok = plausible_affine(np.asarray(candidates[name], np.float64) @ amat)
            results[name] = (float(curve[-1]) if ok else np.inf, raw, curve, amat)
            report(f"affine level 1/{len(factors)} from {name}: loss {float(curve[0]):.4g} -> {float(curve[-1]):.4g} "
                   f"({len(curve)} steps)" + ("" if ok else "; rejected (determinant out of range)"))
    plausible = {k: v for k, v in results.items() if np.isfinite(v[0])}
    if not plausible:  # every refinement degenerated: keep the best unrefined, plausible initialisation
        starts = {k: v for k, v in results.items() if plausible_affine(candidates[k])} or results
        chosen = min(starts, key=lambda k: float(starts[k][2][0]))
        report(f"affine stage rejected: every level-1 result had a determinant outside {AFFINE_DET_RANGE}; "
               f"keeping the {chosen} initialisation")
        return np.asarray(candidates[chosen]), [results[chosen][2][:1]], chosen
    chosen = min(plausible, key=lambda k: plausible[k][0])
    _, raw, curve, amat = plausible[chosen]
    start = np.asarray(candidates[chosen], np.float64)
    curves = [curve]
    for i in range(1, len(factors)):
        ((new_raw, curve, new_amat),) = run_level(i, [candidates[chosen]], [raw])
        curves.append(curve)
        ok = plausible_affine(start @ new_amat)
        report(f"affine level {i + 1}/{len(factors)}: loss {float(curve[0]):.4g} -> {float(curve[-1]):.4g} "
               f"({len(curve)} steps)" + ("" if ok else "; rejected (determinant out of range), keeping level "
                                          f"{i}"))
        if not ok:
            break
        raw, amat = new_raw, new_amat
    return start @ amat, curves, chosen


AFFINE_DET_RANGE = (0.125, 8.0)


def plausible_affine(matrix, det_range=None) -> bool:
    """Whether an affine is a usable registration: finite, with ``det(linear part)`` in ``det_range``.

    Args:
      matrix: ``(D+1, D+1)`` homogeneous matrix (voxel or world coordinates;
        the determinant is the volume ratio either way when both grids share
        the spacing).
      det_range: ``(low, high)`` accepted determinants; the default
        (``AFFINE_DET_RANGE``, ``(1/8, 8)``) admits a factor of 2 per axis in 3D and excludes every
        reflection (det <= 0).

    Returns:
      ``True`` if the matrix passes.
    """
    m = np.asarray(matrix, np.float64)
    if not np.isfinite(m).all():
        return False
    low, high = AFFINE_DET_RANGE if det_range is None else det_range
    det = float(np.linalg.det(m[:-1, :-1]))
    return bool(low <= det <= high)


FOV_EROSION = 3


def _deformable_mask(fixed, moving_aff, mask, moving_mask, matrix, cfg, fixed_head=None):
    """Where the deformable similarity counts (float ``(*spatial)`` or None for everywhere): the user's
    ``mask`` x the moving field of view after the affine stage x (``cfg.foreground_mask``) the union of
    both foregrounds, dilated by ``cfg.foreground_dilation`` voxels. ``fixed_head``: the fixed image's
    :func:`_head_mask`, if already computed."""
    parts = [] if mask is None else [mask]
    if moving_mask is not None:
        parts.append(_moving_fov(np.reshape(np.asarray(moving_mask), fixed.shape[:-1] + (1,)), matrix))
    if cfg.foreground_mask:
        parts.append(_foreground(fixed, moving_aff, cfg.foreground_dilation, fixed_head))
    if not parts:
        return None
    if len(parts) == 1 and mask is not None:  # the mask alone, as given
        return mask
    # the product on the host: a program for it compiled on the main thread (0.05-0.1 s of a cold call; issue 18)
    return to_device(functools.reduce(np.multiply, (np.asarray(x, np.float32) for x in parts)))


def _moving_fov(moving_mask, matrix):
    """The moving field of view ``(*spatial)`` after the affine ``matrix``, eroded by ``FOV_EROSION`` (float32, host).

    The resampling is the moving image's own stored program (same shape); the erosion, a box maximum of the
    outside with the grid's border counted as inside, runs on the host: one program less to compile
    (0.24 s of a cold call; issue 18).
    """
    fov = np.asarray(_resample_affine(to_device(moving_mask, np.float32), matrix, padding="zeros"))[..., 0]
    outside = ndi.maximum_filter((fov <= 0.99).astype(np.float32), size=2 * FOV_EROSION + 1, mode="constant")
    return 1.0 - outside


def _head_mask(image) -> np.ndarray:
    """One image's head/body mask (bool ``(*spatial)``, host-side): voxels above 5 % of the normalised range,
    opened by one voxel (isolated noise speckles in the air go; on a sin-remapped IXI T1 12 % of the air
    exceeded 5 %), connected components of at least 5 % of the largest one, holes filled (dark ventricles and
    CSF stay inside)."""
    ball = ndi.generate_binary_structure(image.ndim - 1, 1)
    m = ndi.binary_opening(np.max(np.asarray(image), -1) > 0.05, structure=ball)
    lab, n = ndi.label(m)
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        m = np.concatenate([[False], sizes >= 0.05 * sizes.max()])[lab]
    return ndi.binary_fill_holes(m)


def _foreground(fixed, moving_aff, dilation, fixed_head=None):
    """Union of the two images' :func:`_head_mask`, dilated by ``dilation`` voxels (float ``(*spatial)``,
    host-side); ``fixed_head``: the fixed image's, if already computed."""
    out = (_head_mask(fixed) if fixed_head is None else fixed_head) | _head_mask(moving_aff)
    if dilation > 0:
        out = ndi.maximum_filter(out, size=2 * dilation + 1)
    return out.astype(np.float32)


def _check_pair(fixed, moving, mask):
    if fixed.ndim not in (3, 4):
        raise ValueError(f"fixed must be (*spatial, C) with 2 or 3 spatial axes, got {fixed.shape}")
    if moving.shape != fixed.shape:
        raise ValueError(f"moving must be on the fixed grid: fixed {fixed.shape} vs moving {moving.shape}")
    if mask is not None and mask.shape[: fixed.ndim - 1] != fixed.shape[:-1]:
        raise ValueError(f"mask {mask.shape} does not match the fixed grid {fixed.shape[:-1]}")


def register_instance(
    fixed: Float[Array, "*spatial C"],
    moving: Float[Array, "*spatial C"],
    *,
    config: InstanceConfig = InstanceConfig(),
    mask: Float[Array, "*spatial"] | None = None,
    init_matrix: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
    feature_fn: Callable | None = None,
    spacing: Sequence[float] | None = None,
    moving_mask: Float[Array, "*spatial"] | None = None,
) -> InstanceResult:
    """Register ``moving`` to ``fixed`` (same grid) by multi-level instance optimisation.

    Each level is one jitted ``lax.scan`` of Adam steps, compiled once per
    (shape, config); repeated calls with the same shapes do not retrace.

    Args:
      fixed: ``(*spatial, C)`` float fixed image (D = 2 or 3); intensities
        are normalised internally (0.5-99.5 percentiles to [0, 1]).
      moving: ``(*spatial, C)`` moving image already resampled onto the fixed
        grid (e.g. with :func:`jaxreg.io.resample_to_grid`).
      config: :class:`InstanceConfig`.
      mask: optional ``(*spatial)`` fixed-grid mask where the similarity is
        evaluated (e.g. the fixed foreground).
      init_matrix: optional ``(D+1, D+1)`` initial affine (fixed voxel ->
        moving voxel). With ``config.affine_init="auto"`` (default) it is one
        more start of the affine stage, refined at the coarsest level next to
        the headers and the centre of mass, and the best fit goes on (a wrong
        given start is not used: measured, KeyMorph's affine 20 mm off on
        same-subject T2 -> T1 pairs had taken io-mind to 26 mm); with
        ``"header"`` or ``"com"`` it replaces that start. Without it:
        ``config.affine_init`` (headers, centre of mass, or whichever of the
        two fits better at the coarsest level).
      progress: optional callback receiving a message after each stage.
      feature_fn: for ``similarity="dns"``: ``(*spatial, 1)`` normalised
        image in [0, 1] -> ``(*spatial, K)`` descriptors (e.g.
        :func:`jaxreg.methods.dns.feature_fn`), called once on the fixed
        image (in a background thread while the affine stage runs) and once
        on the affinely resampled moving image, both inside the box of the
        foregrounds of the fixed and the (header-aligned) moving image
        (:func:`_feature_box`; zero outside); the pyramid
        levels downsample these descriptors (DNS supplementary B.1).
      spacing: ``(D,)`` voxel size (mm) of the grid along its axes; the
        affine stage's parameters act in mm, so rotations are rigid in world
        space on anisotropic grids (default: 1, i.e. voxel units).
      moving_mask: optional ``(*spatial)`` field of view of the moving scan on
        the fixed grid (1 inside, 0 where the moving scan has no data); the
        similarity ignores points that map outside it.

    Returns:
      :class:`InstanceResult` on the fixed grid.

    Raises:
      ValueError: on mismatched shapes or invalid options, or ``"dns"``
        without a ``feature_fn``.
    """
    _check_pair(fixed, moving, mask)
    if config.similarity == "dns" and feature_fn is None:
        raise ValueError("similarity 'dns' needs a feature_fn (e.g. jaxreg.methods.dns.feature_fn(model))")
    cfg = config
    fixed = normalize_intensity(fixed)
    moving = normalize_intensity(moving)
    true_shape = fixed.shape[:-1]
    d = len(true_shape)
    mask_f = None if mask is None else to_device(np.asarray(mask, np.float32).reshape(true_shape))
    # compile the later programs in the background while the host prepares the starts (issue 18)
    _prepare_stages(cfg, true_shape, fixed.shape[-1], mask=mask is not None, moving_mask=moving_mask is not None)
    if cfg.grid_buckets and bucket_shape(true_shape) != tuple(true_shape):
        # zero padding at the high end keeps every voxel index (so the matrix) and is outside both masks
        shape = bucket_shape(true_shape)
        fixed, moving = _pad_to(fixed, shape), _pad_to(moving, shape)
        inside = _pad_to(np.ones(true_shape + (1,), np.float32), shape, channels=False)
        mask_f = inside if mask_f is None else _pad_to(mask_f[..., None], shape, channels=False)
        moving_mask = inside if moving_mask is None else _pad_to(
            np.asarray(moving_mask, np.float32).reshape(true_shape + (1,)), shape, channels=False)
    fine_shape = fixed.shape[:-1]
    factors = [2 ** (cfg.levels - 1 - lvl) for lvl in range(cfg.levels)]
    report = progress or (lambda _: None)
    curves = []

    def level_masks(plan, full=mask_f):
        """``full`` (default: the user's mask) at each ``(factor, pad_to)`` of ``plan``, binarised; Nones for no
        mask."""
        if full is None:
            return [None] * len(plan)
        return list(_binary_level_masks(full, levels=tuple(plan)))

    # -- affine stage
    run_affine = cfg.affine or cfg.transform in LINEAR_TRANSFORMS
    eye = np.eye(d + 1, dtype=np.float32)
    if init_matrix is not None and not (run_affine and cfg.affine_init == "auto"):
        candidates = {"given": np.asarray(init_matrix, np.float32)}
    elif run_affine:
        com = eye.copy()
        com[:d, d] = np.asarray(center_of_mass(moving)) - np.asarray(center_of_mass(fixed))
        candidates = {"header": eye, "com": com}
        if cfg.affine_init == "auto":  # any rotation of the head (issue 13): principal-axes starts compete too
            candidates.update(principal_axes_starts(fixed, moving, spacing))
        if cfg.affine_init in ("header", "com"):
            candidates = {cfg.affine_init: candidates[cfg.affine_init]}
        elif init_matrix is not None:  # a given start competes with the headers and the centre of mass
            candidates = {"given": np.asarray(init_matrix, np.float32), **candidates}
    else:
        candidates = {"header": eye}
    matrix = next(iter(candidates.values()))
    fixed_desc_job = None
    if cfg.similarity == "dns" and cfg.transform not in LINEAR_TRANSFORMS:
        # the fixed image's descriptors while the affine stage runs, on the box of the foregrounds of both images
        # as the headers place them (the affine stage brings the moving head into the fixed one's box)
        feature_box = _feature_box((fixed, moving), true_shape)
        device = next(iter(fixed.devices())) if hasattr(fixed, "devices") else jax.devices()[0]
        fixed_desc_job = _in_background(lambda: _features_in_box(feature_fn, fixed, feature_box), device)
    fixed_head = None
    if cfg.foreground_mask and cfg.transform not in LINEAR_TRANSFORMS:
        # host work that does not depend on the affine stage, done while that stage runs in XLA (issue 18)
        fixed_head = _in_thread(_head_mask, fixed)
    if run_affine:
        matrix, aff_curves, chosen = _affine_stage(fixed, moving, candidates, cfg, spacing, moving_mask, mask_f,
                                                   report)
        curves.extend(aff_curves)
        report(f"affine initialisation: {chosen}")

    matrix = np.asarray(matrix, np.float64)
    if cfg.transform in LINEAR_TRANSFORMS:
        affine_disp = affine_to_disp(to_device(matrix, np.float32), true_shape)
        inv = np.linalg.inv(matrix)
        return InstanceResult(matrix, jnp.zeros_like(affine_disp), affine_disp,
                              affine_to_disp(to_device(inv, np.float32), true_shape), None, tuple(curves))

    # -- deformable stage on the affinely resampled moving image
    moving_aff = _resample_affine(moving, to_device(matrix, np.float32), padding="zeros")
    field = None
    box_fine = _foreground_box(fixed, moving_aff)
    sim_mask = _deformable_mask(fixed, moving_aff, mask_f, moving_mask, to_device(matrix, np.float32), cfg,
                                None if fixed_head is None else fixed_head.result())
    key = _deformable_key()
    if cfg.similarity == "dns":
        moving_desc = _features_in_box(feature_fn, moving_aff, feature_box)
        fixed_desc = fixed_desc_job.result()
        # the descriptor pyramid is built by successive 2x downsampling (the full-resolution 24-channel
        # stacks are blurred once, not once per level)
        pyramid = {1: (fixed_desc, moving_desc)}
        for f in sorted(factors)[1:]:
            prev = pyramid[f // 2]
            pyramid[f] = tuple(_downsample_jit(x, factor=2) for x in prev)
        report(f"descriptors: {fixed_desc.shape[-1]} channels")
    plan = _deformable_plan(cfg, fine_shape)
    sim_masks = level_masks(plan, sim_mask)
    for lvl in range(cfg.levels):
        factor, pad_to = plan[lvl]
        level_shape = _level_shape(fine_shape, factor)
        sampled = pad_to is not None
        if cfg.similarity == "dns":
            fixed_f, moving_f = (_level_features(x, factor=1, cfg=cfg, pad_to=pad_to) for x in pyramid[factor])
        else:
            fixed_f = _level_features(fixed, factor=factor, cfg=cfg, pad_to=pad_to)
            moving_f = _level_features(moving_aff, factor=factor, cfg=cfg, pad_to=pad_to)
        field_shape = _field_shape(cfg, level_shape, factor)
        box = _level_box(box_fine, factor, level_shape)
        if field is None:
            field = to_device(np.zeros(field_shape + (d,)), np.float32)
        elif field.shape[:-1] != field_shape:
            field = resize_disp(field, field_shape)
        hyper = _level_hyper(cfg, lvl, level_shape, field_shape, float(np.mean(_level_shape(true_shape, factor))))
        field, curve = _deformable_level(field, fixed_f, moving_f, sim_masks[lvl],
                                         to_device(box), key, hyper, cfg=cfg,
                                         sampled=sampled)
        curve = np.asarray(curve)[:cfg.iterations[lvl]]
        curves.append(curve)
        report(f"deformable level {lvl + 1}/{cfg.levels} {level_shape}: loss {float(curve[0]):.4g} -> {float(curve[-1]):.4g}")

    disp, total, inverse = _finish_deformable(field, to_device(matrix, np.float32),
                                              to_device(np.linalg.inv(matrix), np.float32),
                                              cfg=cfg, fine_shape=fine_shape)
    if fine_shape != tuple(true_shape):  # crop the padding on the host (an eager slice compiles per shape)
        crop = tuple(slice(0, n) for n in true_shape)
        disp, total, inverse = (to_device(np.asarray(x)[crop]) for x in (disp, total, inverse))
    velocity = field if cfg.transform == "svf" else None
    return InstanceResult(matrix, disp, total, inverse, velocity, tuple(curves))


def _deformable_key() -> jax.Array:
    """The deformable levels' sample key, ``key(0)`` made on the host (folded with each level and step)."""
    return jax.random.wrap_key_data(np.zeros(2, np.uint32), impl="threefry2x32")


def _prepare_stages(cfg: InstanceConfig, true_shape, channels: int, *, mask: bool, moving_mask: bool) -> None:
    """Compile :func:`register_instance`'s programs ahead, in the background, for images of the grid ``true_shape``
    with ``channels`` channels, a fixed ``mask`` or not and a ``moving_mask`` or not: the affine stage's, then the
    deformable stage's (:func:`_prepare_affine`, :func:`_prepare_deformable`; issue 18). The grid is padded to
    its size class as :func:`register_instance` pads it, and the padding is a mask of both images."""
    true_shape = tuple(true_shape)
    shape = bucket_shape(true_shape) if cfg.grid_buckets else true_shape
    padded = shape != true_shape
    _prepare_affine(cfg, shape + (channels,), has_mask=mask or padded)
    _prepare_deformable(cfg, shape + (channels,), true_shape,
                        has_mask=mask or moving_mask or padded or cfg.foreground_mask)


def _deformable_plan(cfg: InstanceConfig, fine_shape) -> list:
    """``(factor, pad_to)`` of each deformable level, coarse to fine: one program serves the sampled levels, whose
    arrays are padded to the finest grid ``pad_to`` (None: a dense level on its own grid; issue 18)."""
    factors = [2 ** (cfg.levels - 1 - lvl) for lvl in range(cfg.levels)]
    return [(f, tuple(fine_shape) if _sampled_level(cfg, _level_shape(fine_shape, f)) else None) for f in factors]


def _field_shape(cfg: InstanceConfig, level_shape, factor) -> tuple:
    """The control grid of a deformable level (``cfg.control_spacing`` fine voxels, at least one level voxel)."""
    spacing = max(1.0, cfg.control_spacing / factor)
    return tuple(max(2, int(np.ceil(s / spacing))) for s in level_shape)


def _prepare_deformable(cfg: InstanceConfig, image_shape, true_shape, *, has_mask: bool) -> None:
    """Compile the deformable stage's programs in a background thread while the affine stage runs
    (:func:`jaxreg.programs._prepare`; a no-op when they are stored or prepared already, or the store is off).

    The arguments are described by their shapes and dtypes only, as :func:`register_instance` will pass them
    (``image_shape``: the padded ``(*spatial, C)`` images; ``true_shape``: the unpadded grid; ``has_mask``:
    whether the similarity has a mask): the level features, the level masks, each distinct deformable level
    program and the finishing one, in the order the stage calls them. Learned descriptors (``"dns"``) and
    linear transforms are left out.
    """
    if cfg.similarity == "dns" or cfg.transform in LINEAR_TRANSFORMS or programs.store_dir() is None:
        return
    d = len(true_shape)
    key = _deformable_key()
    fine_shape = tuple(image_shape[:-1])
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    image = f32(tuple(image_shape))
    plan = _deformable_plan(cfg, fine_shape)
    _resample_affine.prepare(image, f32((d + 1, d + 1)), padding="zeros")  # in the order the stage calls them
    masks = [None] * len(plan)
    if has_mask:
        masks = _binary_level_masks.output_shape(f32(fine_shape), levels=tuple(plan))
        _binary_level_masks.prepare(f32(fine_shape), levels=tuple(plan))
    field = None
    for lvl, (factor, pad_to) in enumerate(plan):
        features = _level_features.output_shape(image, factor=factor, cfg=cfg, pad_to=pad_to)
        _level_features.prepare(image, factor=factor, cfg=cfg, pad_to=pad_to)
        level_shape = _level_shape(fine_shape, factor)
        field_shape = _field_shape(cfg, level_shape, factor)
        field = f32(field_shape + (d,))
        hyper = _level_hyper(cfg, lvl, level_shape, field_shape, float(np.mean(_level_shape(true_shape, factor))))
        _deformable_level.prepare(field, features, features, masks[lvl], jax.ShapeDtypeStruct((2, d), jnp.int32),
                                  key, hyper, cfg=cfg, sampled=pad_to is not None)
    _finish_deformable.prepare(field, f32((d + 1, d + 1)), f32((d + 1, d + 1)), cfg=cfg, fine_shape=fine_shape)


@program(static_argnames=("padding",), quick=True)
def _resample_affine(image, matrix, *, padding):
    """``image(A x)`` on its own grid (one fused pass; eager ops took 0.55 s at 2 mm)."""
    shape = image.shape[:-1]
    return sample(image, identity_grid(shape) + affine_to_disp(matrix, shape), padding=padding)


@program(static_argnames=("cfg", "fine_shape"), quick=True)
def _finish_deformable(field, matrix, inv_matrix, *, cfg, fine_shape):
    """Fine-grid deformable displacement and the whole map and its inverse (one compiled call)."""
    disp = _field_to_disp(field, fine_shape, cfg)
    inv_local = _field_to_disp(-field, fine_shape, cfg) if cfg.transform == "svf" else invert(disp)
    total, inverse = _compose(matrix, inv_matrix, disp, inv_local)
    return disp, total, inverse


def _pad_to(x, shape, *, channels=True):
    """Zero-pad ``(*spatial, C)`` at the high end of each axis to ``shape`` (on the host); ``channels=False``
    returns ``(*shape)`` (the single channel dropped on the host: an eager squeeze compiles per shape)."""
    out = pad_high(np.asarray(x, np.float32), shape)
    return to_device(out if channels else out[..., 0])


def compose_affine_deformable(matrix, disp: Float[Array, "*spatial D"], inverse_disp: Float[Array, "*spatial D"]):
    """Whole map of an affine pre-alignment followed by a deformable stage, and its inverse.

    The deformable stage registers the affinely resampled moving image
    ``moving(A x)``, so the whole map is ``x -> A (x + disp(x))`` and its
    inverse ``y -> A^-1 y + inverse_disp(A^-1 y)``.

    Args:
      matrix: ``(D+1, D+1)`` voxel-space affine ``A`` (fixed voxel -> moving voxel).
      disp, inverse_disp: ``(*spatial, D)`` deformable displacement and its
        inverse (voxels), on the same grid.

    Returns:
      ``(total_disp, inverse_total_disp)``, both ``(*spatial, D)`` float32
      displacements (``y - x``) on that grid; ``inverse_disp`` is sampled
      with border padding where ``A^-1`` leaves the grid.
    """
    return _compose(to_device(matrix, np.float32),
                    to_device(np.linalg.inv(np.asarray(matrix, np.float64)), np.float32), disp, inverse_disp)


@jax.jit
def _compose(m32, inv_m, disp, inverse_disp):
    shape = disp.shape[:-1]
    d = len(shape)
    grid = identity_grid(shape)
    total = (grid + disp) @ m32[:d, :d].T + m32[:d, d] - grid
    pre = grid @ inv_m[:d, :d].T + inv_m[:d, d]  # A^-1 y on the fixed grid
    inverse = pre + sample(inverse_disp, pre, padding="border") - grid
    return total, inverse


# IO-DNS: the io-mind defaults (DNS supplementary Table 4's 3-level schedule) on DNS descriptors. On the
# brats known-deformation pairs (benchmarks/io_registration.py parts a and s, 2026-12-02) they gave
# 1.37 / 0.93 mm EPE and SDlogJ 0.08, against 1.43 / 1.00 mm and 0.25 with issue 12's first settings (plain
# Adam at DNS Table 4's rates, no foreground mask, no field extension, the prior x1).
DNS_CONFIG = InstanceConfig(similarity="dns")
