"""MSE and NCC baselines of the DeepSim IXI comparison (same network, data, steps, batch as configs/deepsim_ixi2d.py).

Commands::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/vxm_ixi2d.py --workdir runs/vxm_mse_ixi2d --config.model.similarity=mse
    ... --config.model.similarity=lncc --workdir runs/vxm_ncc_ixi2d

NCC is the local (windowed, 9 voxels) NCC of VoxelMorph, as DeepSim's baseline.
"""
import ml_collections

from configs import deepsim_ixi2d as ds
from configs import vxm_crossreg2d as vc


def get_config() -> ml_collections.ConfigDict:
    c = vc.get_config()
    c.model.similarity = "mse"
    c.model.reg_field = "disp"
    c.data = ds.ixi_data()
    # the DeepSim rows' budget (vc's 2000 steps leaked in until 2026-12-03: the baselines then trained twice as long)
    c.num_train_steps = ds.get_config().num_train_steps
    return c
