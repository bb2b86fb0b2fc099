"""Tiny real-data training configs (brats_space slices at 8 mm) for the training-stack tests."""
import pytest


def tiny_config(data_dir, **overrides):
    """configs/vxm_brats2d.py shrunk: 8 mm axial slices (32x32), narrow U-Net, a few steps."""
    from configs import vxm_brats2d

    c = vxm_brats2d.get_config()
    c.num_train_steps = 6
    c.batch_size = 4
    c.log_every = 1
    c.checkpoint_every = 3
    c.eval_every = 0
    c.quiet = True
    c.num_devices = 1
    c.learning_rate = 3e-3
    c.schedule = "constant"
    c.model.enc_features = (8, 8, 8, 8)
    c.model.dec_features = (8, 8, 8, 8)
    c.model.final_features = (8, 8)
    c.data.root = str(data_dir)
    c.data.resolution = 8.0
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


@pytest.fixture
def make_config(data_dir):
    return lambda **kw: tiny_config(data_dir, **kw)
