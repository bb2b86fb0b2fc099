"""Networks: shapes in 2D/3D, FiLM conditioning, SVF head identity at init and exact inverse."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg.nn import HyperFiLM, SVFNet, UNet, sample_lambda
from jaxreg.spatial import compose


@pytest.mark.parametrize("ndim, shape", [(2, (32, 48)), (3, (16, 16, 32))])
def test_unet_shapes(ndim, shape):
    net = UNet(ndim, 2, enc_features=(4, 8, 8, 8), dec_features=(8, 8, 8, 8), final_features=(8, 6),
               rngs=nnx.Rngs(0))
    y = net(jnp.ones((2, *shape, 2)))
    assert y.shape == (2, *shape, 6)
    assert len(net.conditioned_features) == 4 + 4 + 2


@pytest.mark.parametrize("out_level", [1, 2])
def test_unet_out_level_leaves_out_the_fine_decoder(out_level):
    kw = dict(enc_features=(4, 8, 8), dec_features=(8, 8, 8), final_features=(6,), rngs=nnx.Rngs(0))
    full, coarse = UNet(3, 2, **kw), UNet(3, 2, out_level=out_level, **kw)
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 32, 2))
    y = coarse(x)
    assert y.shape == (1, 16 >> out_level, 16 >> out_level, 32 >> out_level, 6)
    # The encoder is shared; the decoder blocks after the dropped joins see no skip channels.
    n_params = lambda m: sum(a.size for a in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n_params(coarse) < n_params(full)
    cost = lambda m: jax.jit(lambda a: m(a)).lower(x).compile().cost_analysis()
    ca_full, ca_coarse = cost(full), cost(coarse)
    if isinstance(ca_full, list):  # older JAX returns one dict per computation
        ca_full, ca_coarse = ca_full[0], ca_coarse[0]
    assert ca_coarse["flops"] < 0.5 * ca_full["flops"]


def test_unet_errors():
    net = UNet(2, 2, enc_features=(4, 4), dec_features=(4, 4), final_features=(4,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible"):
        net(jnp.ones((1, 30, 32, 2)))
    with pytest.raises(ValueError, match="expects"):
        net(jnp.ones((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="same non-zero length"):
        UNet(2, 1, enc_features=(4,), dec_features=(4, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="out_level"):
        UNet(2, 1, enc_features=(4, 4), dec_features=(4, 4), out_level=3, rngs=nnx.Rngs(0))


def test_film_changes_output_and_zero_film_is_identity():
    net = UNet(2, 1, enc_features=(4, 4), dec_features=(4, 4), final_features=(4,), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    base = net(x)
    zeros = [(jnp.zeros((2, f)), jnp.zeros((2, f))) for f in net.conditioned_features]
    np.testing.assert_allclose(np.asarray(net(x, zeros)), np.asarray(base), atol=1e-6)
    hyper = HyperFiLM(net.conditioned_features, head_scale=0.5, rngs=nnx.Rngs(1))
    y0, y1 = net(x, hyper(jnp.zeros(2))), net(x, hyper(jnp.ones(2)))
    assert float(jnp.max(jnp.abs(y0 - y1))) > 1e-3
    assert float(jnp.max(jnp.abs(y1 - base))) > 1e-3


def test_sample_lambda_ranges_and_errors():
    u = sample_lambda(jax.random.key(0), 1000, low=0.2, high=0.6)
    assert 0.2 <= float(u.min()) and float(u.max()) <= 0.6
    lu = sample_lambda(jax.random.key(0), 4000, low=1e-3, high=1.0, distribution="loguniform")
    # log-uniform: the median is the geometric mean of the bounds.
    assert abs(np.log10(float(jnp.median(lu))) - (-1.5)) < 0.1
    with pytest.raises(ValueError, match="low > 0"):
        sample_lambda(jax.random.key(0), 2, low=0.0, distribution="loguniform")
    with pytest.raises(ValueError, match="distribution"):
        sample_lambda(jax.random.key(0), 2, distribution="normal")


@pytest.mark.parametrize("int_downsize, out_level", [(1, 0), (2, 0), (2, 1)])
def test_svfnet_identity_at_init_and_inverse(int_downsize, out_level):
    net = SVFNet(2, 1, enc_features=(4, 4), dec_features=(4, 4), final_features=(4,), bidirectional=True,
                 int_downsize=int_downsize, out_level=out_level, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (1, 32, 32, 1))
    v, disp, inv = net(x, x[:, ::-1])
    assert v.shape == disp.shape == inv.shape == (1, 32, 32, 2)
    assert float(jnp.max(jnp.abs(disp))) < 1e-2  # flow conv initialised at N(0, 1e-5)
    # exp(v) and exp(-v) are inverse maps: check on a larger velocity.
    v_big = 1.5 * jax.random.normal(jax.random.key(2), (4, 4, 2))
    v_big = jax.image.resize(v_big, (32, 32, 2), "cubic")
    d, i = net._exp(v_big, (32, 32)), net._exp(-v_big, (32, 32))
    resid = jnp.linalg.norm(compose(i, d), axis=-1)[6:-6, 6:-6]
    # Integrating at half resolution adds the error of the linear resize of exp(v) and exp(-v).
    assert float(jnp.mean(resid)) < (0.05 if int_downsize == 1 else 0.08)
    if out_level:
        # A velocity predicted on the half grid is integrated there, exactly as a full-grid one resized to it.
        from jaxreg.spatial import resize_disp
        v_half = resize_disp(v_big, (16, 16))
        np.testing.assert_allclose(np.asarray(net._exp(v_half, (32, 32))), np.asarray(d), atol=1e-5)


def test_svfnet_velocity_sigma_smooths_the_predicted_velocity():
    from jaxreg.spatial import gaussian_blur

    kw = dict(enc_features=(4, 4), dec_features=(4, 4), final_features=(4,), out_level=1)
    plain = SVFNet(2, 1, **kw, rngs=nnx.Rngs(0))
    smooth = SVFNet(2, 1, **kw, velocity_sigma=1.5, rngs=nnx.Rngs(0))  # same weights
    big = jax.tree.map(lambda a: 1e4 * a, nnx.state(plain.flow))  # a visible velocity
    nnx.update(plain.flow, big)
    nnx.update(smooth.flow, big)
    x = jax.random.uniform(jax.random.key(1), (1, 32, 32, 1))
    y = jax.random.uniform(jax.random.key(3), (1, 32, 32, 1))
    v_half = plain.flow(plain.unet(jnp.concatenate([y, x], axis=-1)))  # the raw half-grid velocity
    v_s, d_s, _ = smooth(x, y)
    from jaxreg.spatial import resize_disp
    expected = resize_disp(gaussian_blur(v_half[0], 1.5), (32, 32))
    np.testing.assert_allclose(np.asarray(v_s[0]), np.asarray(expected), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d_s[0]), np.asarray(smooth._exp(gaussian_blur(v_half[0], 1.5), (32, 32))),
                               rtol=1e-4, atol=1e-5)
    v_p, _, _ = plain(x, y)
    grad = lambda v: float(jnp.mean(jnp.abs(jnp.diff(v[0], axis=0))))  # noqa: E731
    assert grad(v_s) < 0.7 * grad(v_p)  # smoother
    with pytest.raises(ValueError, match="velocity_sigma"):
        SVFNet(2, 1, **kw, velocity_sigma=-1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kernel", [(3, 3, 3), (1, 3, 5), (5, 1, 3)])
@pytest.mark.parametrize("channels", [(3, 4), (4, 3), (1, 5)])  # both stackings (input side if C < Co)
def test_conv3d_matches_lax_with_gradients(kernel, channels):
    from jaxreg.nn.conv import _conv3d_cpu

    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 9, channels[0]))
    w = jax.random.normal(jax.random.key(1), (*kernel, *channels))
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME",  # noqa: E731
                                                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    np.testing.assert_allclose(np.asarray(_conv3d_cpu(x, w)), np.asarray(ref(x, w)), rtol=1e-4, atol=1e-4)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    ga = jax.grad(loss(ref), argnums=(0, 1))(x, w)
    gb = jax.grad(loss(_conv3d_cpu), argnums=(0, 1))(x, w)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def test_conv3d_errors_and_routing():
    from jaxreg.nn.conv import conv3d, conv_general_dilated

    with pytest.raises(ValueError, match="odd"):
        conv3d(jnp.ones((1, 4, 4, 4, 2)), jnp.ones((2, 3, 3, 2, 2)))
    with pytest.raises(ValueError, match="expects"):
        conv3d(jnp.ones((4, 4, 4, 2)), jnp.ones((3, 3, 3, 2, 2)))
    # Strided / 2D convolutions go to XLA unchanged.
    x = jnp.ones((1, 8, 8, 8, 2))
    w = jnp.ones((3, 3, 3, 2, 1))
    out = conv_general_dilated(x, w, (2, 2, 2), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    assert out.shape == (1, 4, 4, 4, 1)


# ----------------------------------------------------------------------------- KeyMorph detector, CoM layer

def test_center_of_mass_layer_is_exact_and_shift_equivariant():
    from jaxreg.nn import center_of_mass_points

    maps = jnp.zeros((1, 8, 10, 6, 2)).at[0, 3, 4, 2, 0].set(1.0).at[0, 5, 1, 4, 1].set(2.0)
    pts = np.asarray(center_of_mass_points(maps, (8, 10, 6)))
    np.testing.assert_allclose(pts[0], [[3, 4, 2], [5, 1, 4]], atol=1e-6)
    blob = (jax.random.uniform(jax.random.key(0), (1, 16, 16, 3)) * (jnp.arange(16)[None, :, None, None] > 4)
            * (jnp.arange(16)[None, None, :, None] < 10))
    for shift in (1, 3):
        a = center_of_mass_points(blob, (16, 16))
        b = center_of_mass_points(jnp.roll(blob, shift, axis=2), (16, 16))  # mass stays inside the grid
        np.testing.assert_allclose(np.asarray(b - a), [[[0.0, shift]] * 3], atol=1e-4)
    coarse = jnp.zeros((1, 4, 4, 1)).at[0, 1, 2, 0].set(1.0)  # 4x downsampled: voxel i -> (i + .5) 4 - .5
    np.testing.assert_allclose(np.asarray(center_of_mass_points(coarse, (16, 16)))[0, 0], [5.5, 9.5], atol=1e-6)
    empty = center_of_mass_points(jnp.zeros((1, 4, 4, 1)), (16, 16))
    np.testing.assert_allclose(np.asarray(empty)[0, 0], [7.5, 7.5])


@pytest.mark.parametrize("ndim,shape", [(2, (32, 24)), (3, (16, 16, 12))])
def test_keypoint_detector_shapes(ndim, shape):
    from jaxreg.nn import KeypointDetector

    net = KeypointDetector(ndim, num_keypoints=5, widths=(4, 8), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (2, *shape, 1))
    pts = net(x)
    assert pts.shape == (2, 5, ndim)
    assert net.maps(x).shape == (2, *[s // 4 for s in shape], 5)
    assert np.all((np.asarray(pts) >= -0.5) & (np.asarray(pts) <= np.asarray(shape) - 0.5))
    with pytest.raises(ValueError, match="expects"):
        net(x[..., 0])


@pytest.mark.parametrize("shape", [(9, 8, 7), (8, 10, 6)])
def test_strided_conv_equals_xla_strided_same_conv(shape):
    """The CPU path (stride-1 conv sampled at the strided centres) is exactly XLA's strided "SAME" conv."""
    from jaxreg.nn.keypoints import strided_conv

    conv = nnx.Conv(2, 3, (3, 3, 3), padding="SAME", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, *shape, 2))
    ref = jax.lax.conv_general_dilated(x, conv.kernel[...], (2, 2, 2), "SAME",
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + conv.bias[...]
    np.testing.assert_allclose(np.asarray(strided_conv(conv, x, 2)), np.asarray(ref), atol=1e-5)


def test_keypoint_detector_downsample_option():
    from jaxreg.nn import KeypointDetector

    net = KeypointDetector(3, num_keypoints=3, widths=(4, 8, 8), downsample=(True, True, False), rngs=nnx.Rngs(0))
    assert net.maps(jnp.ones((1, 16, 16, 16, 1))).shape == (1, 4, 4, 4, 3)
    with pytest.raises(ValueError, match="one entry per stage"):
        KeypointDetector(3, widths=(4, 8), downsample=(True,), rngs=nnx.Rngs(0))
