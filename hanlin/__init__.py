"""Hanlin: an open, self-hostable large-model stack.

Names load on first use, so `hanlin keys ...` and other light commands start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "hanlin.llm",
    "Completion": "hanlin.llm",
    "LoadedModel": "hanlin.api",
    "load": "hanlin.api",
    "save": "hanlin.api",
    "SamplingParams": "hanlin.engine.sampling",
    "ModelConfig": "hanlin.config",
    "MoEConfig": "hanlin.config",
    "RopeConfig": "hanlin.config",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from hanlin.api import LoadedModel, load, save
    from hanlin.config import ModelConfig, MoEConfig, RopeConfig
    from hanlin.engine.sampling import SamplingParams
    from hanlin.llm import LLM, Completion


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hanlin' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
