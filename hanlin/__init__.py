"""Hanlin: an open, self-hostable large-model stack."""

from hanlin.api import LoadedModel, load, save
from hanlin.config import ModelConfig, MoEConfig, RopeConfig

__all__ = ["LoadedModel", "ModelConfig", "MoEConfig", "RopeConfig", "load", "save"]
__version__ = "0.1.0"
