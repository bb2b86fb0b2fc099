"""MSE and NCC baselines of the 3D DeepSim IXI comparison (same network, data, steps, batch as configs/deepsim_ixi3d.py).

Commands::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/vxm_ixi3d.py --workdir runs/vxm_mse_ixi3d --config.model.similarity=mse \
        --config.model.reg_scale=0.01
    ... --config.model.similarity=lncc --workdir runs/vxm_ncc_ixi3d      # reg_scale 1

Measured (2026-12-03, NCC, 2 cores, ~2 steps/s): validation Dice mono 0.455 before, 0.242 / 0.472 / 0.471 at
steps 500 / 1000 / 1500 (sin-remapped fixed 0.400 at 1500): the 3D network dips before it learns
(docs/experiments/issue14_controlled.md).
MSE with ``reg_scale`` 1 (session 19, 1000 steps) never left the identity (Dice 0.455 at every lambda): MSE
changes by ~0.004 between the identity and a good alignment, against a diffusion term of ~0.03 for a useful
field. With ``--config.model.reg_scale=0.01`` the field moves (mono Dice 0.439 at step 400, the early dip the NCC
run also shows). With ``--config.model.hyper=False --config.model.reg_weight=0.01`` the mono Dice is 0.465 at
step 400 (session 20; docs/experiments/issue14_controlled.md, last section). Run MSE with
``--config.model.reg_scale=0.01``: after 1000 steps (9 min alone) its best mono Dice over the 17 lambdas is
0.464 (lambda 0.4), NCC's 0.473 (lambda 0.1); the comparison is in configs/deepsim_ixi3d.py.
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
