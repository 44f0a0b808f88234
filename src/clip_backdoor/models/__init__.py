"""CLIP models: ModifiedResNet / ViT image towers, the causal text tower, a registry of configs.

Parameter names and shapes match open_clip's CLIP for the same config (checked against reference
state-dict listings in the tests), so weights move between the two without renaming.
"""

from clip_backdoor.models.clip import CLIP
from clip_backdoor.models.factory import create_model, get_model_config, list_models, load_weights

__all__ = ["CLIP", "create_model", "get_model_config", "list_models", "load_weights"]
