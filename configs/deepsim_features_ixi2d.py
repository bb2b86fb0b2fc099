"""Pretraining of DeepSim's feature extractors on IXI T1 slices at 2 mm: segmentation (148 labels) or auto-encoder.

Paper: Czolbe et al., "DeepSim", MIDL 2021, Sec. 3 ("Feature extraction":
DeepSim-seg on a supplementary segmentation task, DeepSim-AE on an
auto-encoding task) and Sec. 4. Commands::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/deepsim_features_ixi2d.py --workdir runs/deepsim_features_ixi2d_seg
    ... --config.model.kind=deepsim_ae --workdir runs/deepsim_features_ixi2d_ae

Data: IXI 014, 015, 033, 034, 039 (skull-stripped by their labels, affinely
aligned, 148 DLMUSE labels remapped to 1..148; 149 classes with the
background), random axial slices, flipped; validation on IXI012 (held out,
as IXI013). CPU scale: widths 32-64-128 (the paper's 3D widths), batch 8,
600 steps.
"""
import ml_collections

from configs import contrareg_features_brain2d as fb

IXI_TRAIN = ("ixi/IXI014-HH-1236", "ixi/IXI015-HH-1258", "ixi/IXI033-HH-1259", "ixi/IXI034-HH-1260",
             "ixi/IXI039-HH-1261")
IXI_VAL = ("ixi/IXI012-HH-1211", "ixi/IXI013-HH-1212")


def get_config() -> ml_collections.ConfigDict:
    c = fb.get_config()
    c.batch_size = 8
    c.num_train_steps = 600
    c.eval_every = 300
    c.model.kind = "deepsim_seg"
    c.model.contrasts = ("t1",)
    c.model.features = (32, 64, 128)
    c.model.num_classes = 149
    c.data.train_cases = IXI_TRAIN
    c.data.val_cases = IXI_VAL[:1]
    c.data.crop = (96, 112, 96)
    return c
