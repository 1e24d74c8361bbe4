"""The networks: NTRENet++ (image and video) and their blocks; ``ARCHS`` maps each registered
``arch`` name to its builder."""
from .backbone import BackboneWeightsError, backbone_of, build_backbone, load_backbone_weights
from .ntrenet import NTRENetPP, parameter_counts
from .registry import ARCHS, build_ntrenetpp

__all__ = ["ARCHS", "NTRENetPP", "backbone_of", "build_backbone", "build_ntrenetpp", "load_backbone_weights",
           "BackboneWeightsError", "parameter_counts"]
