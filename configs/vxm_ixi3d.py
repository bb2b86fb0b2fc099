"""MSE and NCC baselines of the 3D DeepSim IXI comparison (same network, data, steps, batch as configs/deepsim_ixi3d.py).

Commands::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/vxm_ixi3d.py --workdir runs/vxm_mse_ixi3d --config.model.similarity=mse
    ... --config.model.similarity=lncc --workdir runs/vxm_ncc_ixi3d

Measured (2026-12-03, NCC, 2 cores, ~2 steps/s): validation Dice mono 0.455 before, 0.242 / 0.472 / 0.471 at
steps 500 / 1000 / 1500 (sin-remapped fixed 0.400 at 1500): the 3D network dips before it learns
(docs/experiments/issue14_controlled.md, last section).
"""
import ml_collections

from configs import deepsim_ixi3d as d3
from configs import vxm_ixi2d as v2


def get_config() -> ml_collections.ConfigDict:
    c = v2.get_config()
    c.model.ndim = 3
    c.update(d3.STEPS)
    c.data = d3.ixi_data3d()
    return c
