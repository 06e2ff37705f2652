"""Hanlin: an open, self-hostable large-model stack."""

from hanlin.api import LoadedModel, load, save
from hanlin.config import ModelConfig, MoEConfig, RopeConfig
from hanlin.engine.sampling import SamplingParams
from hanlin.llm import LLM, Completion

__all__ = ["LLM", "Completion", "LoadedModel", "SamplingParams", "ModelConfig", "MoEConfig", "RopeConfig", "load", "save"]
__version__ = "0.1.0"
