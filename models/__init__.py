"""qwen2rt.models: Qwen2 / Qwen2-MoE configuration, weights, model definition and the backend interface."""

from .backend import AttentionMetadata, Backend, TorchBackend, get_backend, register_backend
from .config import BUILTIN_CONFIGS, ConfigError, Qwen2Config, builtin_config, config_from_dict, load_config
from .loader import CheckpointError, load_weights
from .quant import QuantConfig, QuantizationError
from .qwen2 import ModelWeights, Qwen2Model, random_weights
from .rope import RotaryTables

__all__ = [
    "AttentionMetadata", "Backend", "TorchBackend", "get_backend", "register_backend",
    "BUILTIN_CONFIGS", "ConfigError", "Qwen2Config", "builtin_config", "config_from_dict", "load_config",
    "CheckpointError", "load_weights", "ModelWeights", "Qwen2Model", "random_weights", "RotaryTables",
    "QuantConfig", "QuantizationError",
]
