"""InfoNCE over sampled feature vectors, and a keyed sampler of locations inside a mask.

One implementation serves DNS (anatomy-aware contrastive learning of the
MASR-Net descriptors) and ContraReg's PatchNCE: the positive of a query is
the key vector at the same location (another contrast, another augmentation,
or the warped moving image); the negatives are the keys at the other sampled
locations.
"""
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray


def unit_normalize(x, eps=1e-8):
    """L2-normalise the last axis; zero vectors stay zero (double-where: no NaN gradient)."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    safe = jnp.where(sq > eps * eps, sq, 1.0)
    return jnp.where(sq > eps * eps, x / jnp.sqrt(safe), 0.0)


def infonce(
    query: Float[Array, "N C"],
    key_vectors: Float[Array, "N C"],
    *,
    temperature: float = 0.07,
    weights: Float[Array, "N"] | None = None,
) -> Float[Array, ""]:
    """InfoNCE / PatchNCE loss of ``N`` query vectors against ``N`` key vectors.

    Both sets are L2-normalised (cosine similarity); for query ``i`` the
    positive is key ``i`` and the negatives are the keys ``j != i``::

        l_i = -log( exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau) )

    The loss is the (weighted) mean of ``l_i``. ``weights`` (e.g. the
    validity flags of :func:`sample_in_mask`) drop queries and, with weight
    0, remove those keys from every denominator too.

    Args:
      query: ``(N, C)`` float query vectors (e.g. DSIR of the image).
      key_vectors: ``(N, C)`` float key vectors at the same locations
        (e.g. DSIR of the augmented image).
      temperature: ``tau`` (DNS Sec. 4.2: 0.07; ContraReg Sec. 3.2: 0.07).
      weights: optional ``(N,)`` non-negative weights (0 = absent sample).

    Returns:
      Scalar loss to minimise, ``>= 0``; ``log N`` for uninformative
      (identical) vectors, near 0 when each query matches only its positive.

    Raises:
      ValueError: if the shapes are not ``(N, C)`` and equal.

    References:
      van den Oord et al., "Representation learning with contrastive
      predictive coding", 2018 (InfoNCE); Mok et al., CVPR 2024, Sec. 3.3
      eq. (4); Park et al., "Contrastive learning for unpaired image-to-image
      translation", ECCV 2020 (PatchNCE), as used by Dey et al., MICCAI 2022.
    """
    if query.ndim != 2 or query.shape != key_vectors.shape:
        raise ValueError(f"infonce expects query and key_vectors of one shape (N, C), got "
                         f"{query.shape} and {key_vectors.shape}")
    q = unit_normalize(query.astype(jnp.float32))
    k = unit_normalize(key_vectors.astype(jnp.float32))
    logits = jnp.matmul(q, k.T, precision=jax.lax.Precision.HIGHEST) / temperature
    if weights is not None:
        w = jnp.asarray(weights, jnp.float32)
        logits = jnp.where(w[None, :] > 0, logits, -1e9)
    loss = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)
    if weights is None:
        return jnp.mean(loss)
    return jnp.sum(w * loss) / jnp.maximum(jnp.sum(w), 1e-12)


def sample_in_mask(
    key: PRNGKeyArray, mask: Bool[Array, "*spatial"], num: int
) -> tuple[Int[Array, "N D"], Float[Array, "N"]]:
    """Draw ``num`` distinct voxel locations uniformly inside ``mask`` (keyed, jittable).

    Gumbel top-k over the voxels (``log(mask) + Gumbel``): without
    replacement, uniform over the mask, static output shape. If the mask
    holds fewer than ``num`` voxels, the surplus samples lie outside it and
    get weight 0.

    Args:
      key: PRNG key.
      mask: ``(*spatial)`` bool or float mask (> 0 = inside).
      num: number of samples (Python int; DNS Sec. 4.2: 8196).

    Returns:
      ``(points, weights)``: ``(num, D)`` int32 voxel indices and ``(num,)``
      float32 weights, 1 inside the mask, 0 for surplus samples.

    Raises:
      ValueError: ``num`` < 1 or larger than the number of voxels.
    """
    shape = mask.shape
    n_vox = 1
    for s in shape:
        n_vox *= int(s)
    if int(num) != num or not 1 <= num <= n_vox:
        raise ValueError(f"num must be an int in [1, {n_vox}] for a mask of shape {shape}, got {num}")
    inside = (jnp.asarray(mask) > 0).reshape(-1)
    score = jnp.where(inside, jax.random.gumbel(key, (n_vox,)), -jnp.inf)
    _, flat = jax.lax.top_k(score, int(num))
    points = jnp.stack(jnp.unravel_index(flat, shape), axis=-1).astype(jnp.int32)
    return points, inside[flat].astype(jnp.float32)


def resize_mask(mask, shape) -> Bool[Array, "*shape"]:
    """A ``(*spatial)`` mask on a feature layer's grid ``shape`` (linear resize, inside where >= 0.5)."""
    m = jnp.asarray(mask, jnp.float32)
    if tuple(m.shape) == tuple(shape):
        return m > 0.5
    return jax.image.resize(m, tuple(shape), method="linear") >= 0.5


def patchnce(
    query_layers,
    key_layers,
    key: PRNGKeyArray,
    *,
    num_samples: int = 1024,
    temperature: float = 0.007,
    mask=None,
    projections=None,
) -> Float[Array, ""]:
    """Multi-layer PatchNCE of one image pair: mean over layers of InfoNCE at sampled locations.

    For layer ``k``, ``num_samples`` locations ``i`` are drawn without
    replacement (inside ``mask`` resized to that layer's grid, if given:
    ContraReg's mCR) and the query vectors ``f_i = P_q(query_layers[k][i])``
    are contrasted with the keys ``f_j = P_k(key_layers[k][j])`` at the same
    locations: the positive of query ``i`` is key ``i`` (the same location,
    e.g. in the warped moving image), its ``num_samples - 1`` negatives are
    the keys at the other sampled locations (ContraReg Sec. 3, the equation
    of ``d_12``; Park et al., ECCV 2020).

    Args:
      query_layers, key_layers: sequences of ``(*spatial_k, C_k)`` feature
        maps of the two images (same shapes per layer).
      key: PRNG key (one subkey per layer).
      num_samples: sampled locations per layer (ContraReg: ``ns = 1024``
        negatives), capped at the layer's voxel count.
      temperature: ``tau`` (ContraReg Sec. 4: 0.007).
      mask: optional full-resolution ``(*spatial)`` mask (> 0.5 inside);
        samples are drawn inside it on every layer, and layers where it holds
        fewer voxels than ``num_samples`` give the surplus samples weight 0.
      projections: optional sequence of ``(P_q, P_k)`` pairs of callables
        ``(N, C_k) -> (N, P)`` per layer (ContraReg's MLPs ``F_1^k``,
        ``F_2^k``); identity if None. Vectors are L2-normalised after them.

    Returns:
      Scalar loss ``>= 0``; about ``log num_samples`` for unrelated features.

    Raises:
      ValueError: layer lists of different lengths or shapes.
    """
    if len(query_layers) != len(key_layers) or not query_layers:
        raise ValueError(f"patchnce needs two non-empty layer lists of one length, got {len(query_layers)} "
                         f"and {len(key_layers)}")
    if projections is not None and len(projections) != len(query_layers):
        raise ValueError(f"projections needs one (P_q, P_k) pair per layer ({len(query_layers)}), "
                         f"got {len(projections)}")
    keys = jax.random.split(key, len(query_layers))
    total = 0.0
    for k, (q, kv) in enumerate(zip(query_layers, key_layers)):
        if q.shape != kv.shape:
            raise ValueError(f"patchnce layer {k}: query {q.shape} and key {kv.shape} differ")
        shape = q.shape[:-1]
        n_vox = 1
        for s in shape:
            n_vox *= int(s)
        m = jnp.ones(shape, bool) if mask is None else resize_mask(mask, shape)
        pts, w = sample_in_mask(keys[k], m, min(int(num_samples), n_vox))
        idx = tuple(pts[:, a] for a in range(len(shape)))
        fq, fk = q[idx], kv[idx]
        if projections is not None:
            pq, pk = projections[k]
            fq, fk = pq(fq), pk(fk)
        total = total + infonce(fq, fk, temperature=temperature, weights=None if mask is None else w)
    return total / len(query_layers)
