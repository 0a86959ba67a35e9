"""CIFAR ResNets cut into client and server segments, and auxiliary heads for the cut."""

from models.aux_heads import AUX_HEADS, build_aux_head
from models.resnet import CifarResNet, check_cut, cut_shape, num_blocks, resnet, split_resnet

__all__ = [
    "AUX_HEADS",
    "CifarResNet",
    "build_aux_head",
    "check_cut",
    "cut_shape",
    "num_blocks",
    "resnet",
    "split_resnet",
]
