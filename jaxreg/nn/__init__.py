"""Flax NNX modules: conv blocks, VoxelMorph-style U-Net / SVF network, lambda hypernetwork (FiLM), MASR-Net (DNS), KeyMorph keypoint detector, CAR Siamese network, ContraReg autoencoder and DeepSim feature network."""
from jaxreg.nn.blocks import ConvBlock, max_pool, upsample_to
from jaxreg.nn.conv import conv3d
from jaxreg.nn.features import ContraRegAutoencoder, DeepSimNet
from jaxreg.nn.film import HyperFiLM, sample_lambda
from jaxreg.nn.keypoints import KeypointDetector, center_of_mass_points
from jaxreg.nn.masr import MASRNet, blur_pool
from jaxreg.nn.siamese import SiameseRegNet
from jaxreg.nn.unet import SVFNet, UNet

__all__ = ["ContraRegAutoencoder", "ConvBlock", "DeepSimNet", "conv3d", "HyperFiLM", "KeypointDetector", "MASRNet", "center_of_mass_points", "blur_pool", "SVFNet", "SiameseRegNet", "UNet", "max_pool", "sample_lambda", "upsample_to"]
