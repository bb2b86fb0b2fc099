"""3D convolution for XLA:CPU built from 2D convolutions and GEMMs (custom VJP).

XLA's CPU backend runs 3D convolutions at ~20 GFLOP/s on the 2-core machines
here (PyTorch/oneDNN: ~70), forward and backward alike, while its 2D
convolution forward reaches ~37 GFLOP/s and its GEMMs ~120. For a stride-1
"SAME" 3D convolution with an odd ``kd x kh x kw`` kernel we therefore
compute

* forward: one 2D convolution of the depth slices (batch ``B * D``) with the
  ``kd`` depth taps stacked on the narrower side: as output channels, then a
  sum of the ``kd`` depth-shifted partial results (``C >= Co``), or as input
  channels, the ``kd`` depth-shifted inputs concatenated (``C < Co``);
* input gradient: the same forward with the flipped, in/out-transposed
  kernel (the adjoint of a stride-1 SAME convolution with an odd kernel);
* kernel gradient: one GEMM per tap, ``x_shifted^T @ grad_out``,
  contracting over all voxels (large-K GEMMs, XLA's fastest CPU path).

Measured (32 -> 32 channels, 96x112x96, 2 threads): lax.conv forward 2.76 s,
forward+backward 8.73 s; this: see benchmarks/results/train_step.md. On
GPUs/TPUs :func:`conv3d` is ``lax.conv_general_dilated`` (cuDNN etc.): the
choice is made at trace time from ``jax.default_backend()``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_DN2 = ("NHWC", "HWIO", "NHWC")
_DN3 = ("NDHWC", "DHWIO", "NDHWC")


def _forward(x, w):
    b, d, h, ww, c = x.shape
    kd, kh, kw, ci, co = w.shape
    p = kd // 2
    if ci < co:
        # depth taps stacked on the input side: one 2D convolution of kd * C channels, no partial sums
        # (8 -> 24 channels on 128x128x96: 0.30 s instead of 0.55 s; 1 -> 8: 0.05 instead of 0.14 s)
        xp = jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0), (0, 0))) if p else x
        xs = jnp.concatenate([xp[:, i:i + d] for i in range(kd)], axis=-1)  # (b, d, h, w, kd * C)
        k2 = jnp.concatenate([w[i] for i in range(kd)], axis=2)  # (kh, kw, kd * C, Co)
        r = jax.lax.conv_general_dilated(xs.reshape(b * d, h, ww, kd * c), k2, (1, 1), "SAME",
                                         dimension_numbers=_DN2)
        return r.reshape(b, d, h, ww, co)
    # depth taps stacked as output channels, then a sum of the kd depth-shifted partial results
    # (faster when C >= Co: 24 -> 8 channels 0.31 s instead of 0.58 s)
    k2 = jnp.concatenate([w[i] for i in range(kd)], axis=-1)  # (kh, kw, C, kd * Co)
    r = jax.lax.conv_general_dilated(x.reshape(b * d, h, ww, c), k2, (1, 1), "SAME", dimension_numbers=_DN2)
    r = r.reshape(b, d, h, ww, kd, co)
    if p:
        r = jnp.pad(r, ((0, 0), (p, p), (0, 0), (0, 0), (0, 0), (0, 0)))
    return sum(r[:, i:i + d, :, :, i, :] for i in range(kd))


@jax.custom_vjp
def _conv3d_cpu(x, w):
    return _forward(x, w)


def _fwd(x, w):
    return _forward(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    kd, kh, kw, ci, co = w.shape
    w_adj = jnp.flip(w, axis=(0, 1, 2)).swapaxes(3, 4)  # (kd, kh, kw, Co, C)
    gx = _forward(g, w_adj)
    pd, ph, pw = kd // 2, kh // 2, kw // 2
    xp = jnp.pad(x, ((0, 0), (pd, pd), (ph, ph), (pw, pw), (0, 0)))
    _, d, h, ww, _ = x.shape
    g2 = g.reshape(-1, co)
    b = x.shape[0]
    offsets = jnp.asarray([(i, j, k) for i in range(kd) for j in range(kh) for k in range(kw)], jnp.int32)

    def tap(o):  # one shifted view at a time (lax.map is a scan): memory stays ~ one activation
        xs = jax.lax.dynamic_slice(xp, (0, o[0], o[1], o[2], 0), (b, d, h, ww, ci)).reshape(-1, ci)
        return jax.lax.dot_general(xs, g2, (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)

    gw = jax.lax.map(tap, offsets).reshape(kd, kh, kw, ci, co)
    return gx.astype(x.dtype), gw.astype(w.dtype)


_conv3d_cpu.defvjp(_fwd, _bwd)


def conv3d(x, w):
    """Stride-1 "SAME" 3D convolution, ``(B, D, H, W, C) x (kd, kh, kw, C, Co) -> (B, D, H, W, Co)``.

    Odd kernel sizes. Numerically equal to ``lax.conv_general_dilated`` (float32
    round-off); on CPU it uses the 2D-conv/GEMM formulation above.

    Raises:
      ValueError: wrong ranks, channel mismatch or even kernel sizes.
    """
    if x.ndim != 5 or w.ndim != 5 or x.shape[-1] != w.shape[3]:
        raise ValueError(f"conv3d expects x (B,D,H,W,C) and w (kd,kh,kw,C,Co), got {x.shape} and {w.shape}")
    if any(k % 2 == 0 for k in w.shape[:3]):
        raise ValueError(f"conv3d needs odd kernel sizes, got {w.shape[:3]}")
    if jax.default_backend() == "cpu":
        return _conv3d_cpu(x, w)
    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=_DN3)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` (``nnx.Conv(conv_general_dilated=...)``).

    Routes stride-1, undilated, ungrouped 3D "SAME" convolutions with odd
    kernels to :func:`conv3d`; everything else to XLA's convolution.
    """
    simple = (lhs.ndim == 5 and tuple(window_strides) == (1, 1, 1) and feature_group_count == 1
              and batch_group_count == 1 and all(k % 2 == 1 for k in rhs.shape[:3])
              and (lhs_dilation is None or all(v == 1 for v in lhs_dilation))
              and (rhs_dilation is None or all(v == 1 for v in rhs_dilation))
              and (padding == "SAME" or tuple(map(tuple, padding)) == tuple((k // 2, k // 2) for k in rhs.shape[:3])))
    if simple and kwargs.get("out_sharding") is None and (dimension_numbers is None
                                                           or _is_channels_last(dimension_numbers)):
        return conv3d(lhs, rhs)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                        precision=precision, preferred_element_type=preferred_element_type, **kwargs)


@functools.lru_cache(maxsize=None)
def _channels_last_spec():
    return jax.lax.conv_dimension_numbers((1, 2, 2, 2, 1), (3, 3, 3, 1, 1), _DN3)


def _is_channels_last(dn) -> bool:
    if isinstance(dn, tuple) and all(isinstance(s, str) for s in dn):
        return tuple(dn) == _DN3
    return dn == _channels_last_spec()
