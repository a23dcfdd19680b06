"""The MIRAGE model: layer gates, brain encoder, subject heads; reference loader; export."""

from mirage.model.export import load_exported, save_exported
from mirage.model.network import MirageModel, build_model, select_layers
from mirage.model.reference import load_reference, to_reference_state_dict

__all__ = [
    "MirageModel",
    "build_model",
    "load_exported",
    "load_reference",
    "save_exported",
    "select_layers",
    "to_reference_state_dict",
]
