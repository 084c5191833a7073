"""vitray models: timm ViT/DeiT backbones, vitray's small-image configs, task heads, the segmentation ViT.

This package imports no other vitray module (a model is usable on its own), except that ``export`` reads the
torch-free export format (``vitray.export_format``) and asks the torch-free task registry (``vitray.tasks``) which
task builds an export's architecture."""
from .checkpoint import CheckpointError, load_weights, read_state_dict
from .factory import UnknownModelError, create_model, create_model_from_config, feature_maps
from .heads import ClassificationHead
from .pos_embed import set_sincos_pos_embed, sincos_2d
from .zoo import VITRAY_MODELS, is_model, list_zoo, model_info

__all__ = [
    "CheckpointError", "ClassificationHead", "UnknownModelError", "VITRAY_MODELS", "create_model",
    "create_model_from_config", "feature_maps", "is_model", "list_zoo", "load_weights", "model_info",
    "read_state_dict", "set_sincos_pos_embed", "sincos_2d",
]
