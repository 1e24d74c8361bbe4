"""The NTRENet++ network: ``build_model(cfg)`` is the entry point."""
from .backbone import BackboneWeightsError, build_backbone, load_backbone_weights
from .ntrenet import NTRENetPP, build_model, parameter_counts

__all__ = ["build_model", "NTRENetPP", "build_backbone", "load_backbone_weights", "BackboneWeightsError",
           "parameter_counts"]
