"""ContraReg autoencoder and DeepSim feature network: layer shapes 2D/3D, heads, dropout only with a key, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg.nn import ContraRegAutoencoder, DeepSimNet


@pytest.mark.parametrize("shape", [(32, 48), (16, 16, 24)])
def test_contrareg_autoencoder_layers(shape):
    ae = ContraRegAutoencoder(len(shape), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, *shape, 1))
    rec, layers = ae(x)
    assert rec.shape == x.shape
    scales, widths = (0, 1, 2, 3, 2, 1), (32, 64, 128, 64, 32, 32)
    assert [l.shape for l in layers] == [(2, *(s // 2 ** k for s in shape), c) for k, c in zip(scales, widths)]
    for a, b in zip(ae.encode(x), layers):  # encode stops after the sampled layers, same values
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 8"):
        ae(x[:, :-4])


@pytest.mark.parametrize("ndim,widths", [(2, (64, 128, 256)), (3, (32, 64, 128))])
def test_deepsim_default_widths_follow_the_paper(ndim, widths):
    net = DeepSimNet(ndim, rngs=nnx.Rngs(0))
    assert net.features == widths


@pytest.mark.parametrize("head,out", [("ae", 1), ("seg", 5)])
def test_deepsim_net_heads_and_encoder_layers(head, out):
    net = DeepSimNet(2, features=(4, 8, 16), head=head, out_channels=out if head == "seg" else None,
                     rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (2, 16, 24, 1))
    y, layers = net(x)
    assert y.shape == (2, 16, 24, out)
    if head == "ae":
        assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert [l.shape for l in layers] == [(2, 16, 24, 4), (2, 8, 12, 8), (2, 4, 6, 16)]
    # dropout only with a key; encode == the layers of the plain call
    for a, b in zip(net.encode(x), layers):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    _, dropped = net(x, jax.random.key(2))
    assert not np.allclose(np.asarray(dropped[0]), np.asarray(layers[0]))


def test_deepsim_net_errors():
    with pytest.raises(ValueError, match="head"):
        DeepSimNet(2, head="vgg", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="out_channels"):
        DeepSimNet(2, head="seg", rngs=nnx.Rngs(0))
    net = DeepSimNet(3, features=(2, 2, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\(B, \*spatial\[3\], 1\)"):
        net(jnp.zeros((1, 8, 8, 1)))
