"""The model from the paper, its baselines, presets, LR synthesis and checkpoint I/O."""

from gemx.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gemx.model.config import PRESETS, ModelConfig, preset
from gemx.model.lr import downsample, synthesize_lr, upsample_bicubic
from gemx.model.network import GeminoAttention, ReferenceCache, build_model

__all__ = [
    "PRESETS", "Checkpoint", "GeminoAttention", "ModelConfig", "ReferenceCache", "build_model",
    "downsample", "load_checkpoint", "preset", "save_checkpoint", "synthesize_lr", "upsample_bicubic",
]
