"""Dense-prediction heads over a backbone's feature pyramid (``features_only=True``).

- :class:`SemanticFPNHead`: FPN neck + Panoptic-FPN semantic branch (Kirillov et al., 2019).
- :class:`UperNetHead`: pyramid pooling on the last level + FPN fusion (Xiao et al., 2018).
- :class:`FCNHead`: the small auxiliary head used next to UperNet.
- :class:`SimplePyramid`: turns single-stride (plain ViT) features into a 4-level pyramid.
"""
from .fpn import FPN, ConvNormAct, SemanticFPNHead
from .pyramid import SimplePyramid
from .upernet import FCNHead, PyramidPooling, UperNetHead

__all__ = ["ConvNormAct", "FPN", "FCNHead", "PyramidPooling", "SemanticFPNHead", "SimplePyramid", "UperNetHead"]
