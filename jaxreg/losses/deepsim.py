"""DeepSim: mean cosine similarity of learned feature maps over layers (Czolbe et al., MIDL 2021, eq. 5)."""
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxreg.losses.dns import cosine_similarity_loss


def deepsim(fixed_layers, warped_layers, *, mask=None) -> Float[Array, ""]:
    """DeepSim similarity of one pair: ``(1/L) sum_l mean_p cos(F^l_p(warped), F^l_p(fixed))`` (eq. 5).

    Args:
      fixed_layers, warped_layers: sequences of ``L`` feature maps
        ``(*spatial_l, C_l)`` of the fixed and of the warped moving image
        (e.g. :meth:`jaxreg.nn.DeepSimNet.encode`, unbatched).
      mask: optional full-resolution ``(*spatial)`` weights in [0, 1],
        linearly resized to each layer's grid (the paper averages over the
        whole image: no mask).

    Returns:
      Scalar in ``[-1, 1]``, 1 when the features agree in direction
      everywhere (e.g. an image with itself); a zero vector counts with
      cosine 0 (:func:`jaxreg.losses.cosine_similarity_loss`). Loss: ``1 - deepsim``.

    Raises:
      ValueError: layer lists of different lengths or shapes.
    """
    if len(fixed_layers) != len(warped_layers) or not fixed_layers:
        raise ValueError(f"deepsim needs two non-empty layer lists of one length, got {len(fixed_layers)} "
                         f"and {len(warped_layers)}")
    total = 0.0
    for a, b in zip(fixed_layers, warped_layers):
        if a.shape != b.shape:
            raise ValueError(f"deepsim layer shapes differ: {a.shape} and {b.shape}")
        m = None
        if mask is not None:
            m = jnp.asarray(mask, a.dtype)
            m = m if m.shape == a.shape[:-1] else jax.image.resize(m, a.shape[:-1], "linear")
        total = total - cosine_similarity_loss(a, b, mask=m)
    return total / len(fixed_layers)
