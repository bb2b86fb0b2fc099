"""DeepSim-AE in 3D at 4 mm on the cross-contrast volumes (T2 / FLAIR / T1c -> T1), lambda-conditioned.

Needs ``configs/deepsim_features_brain3d.py``. Command::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/deepsim_brain3d.py --workdir runs/deepsim_ae_3d

The mono-contrast IXI comparison in 3D is ``configs/deepsim_ixi3d.py``. Not trained in a recorded run yet.
"""
import ml_collections

from configs import contrareg_brain3d as c3
from configs import deepsim_brain2d as d2


def get_config() -> ml_collections.ConfigDict:
    c = d2.get_config()
    c.model.ndim = 3
    c.model.feature_widths = ()
    c.model.features_checkpoint = "runs/deepsim_features_brain3d"
    c.batch_size = 1
    c.num_train_steps = 600
    c.data = c3.get_config().data
    return c
