"""Load a Hugging Face model directory (config.json + *.safetensors, single or sharded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sagellm.models.errors import ModelLoadError
from sagellm.models.shape import ModelShape, RopeScaling

# config.json model_type -> ModelShape.architecture
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_ROPE_KINDS = ("linear", "llama3")
# Buffers some older checkpoints saved; recomputed by the model, never needed.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_hf_config(path: Path) -> ModelShape:
    """ModelShape from `path/config.json` (and eos ids from generation_config.json if present).

    Supports model_type llama, mistral and qwen2, and rope scaling types linear and llama3 (also
    under transformers 5's `rope_parameters`). `tie_word_embeddings` defaults to False.
    Raises ModelLoadError naming the file and the offending field.
    """
    cfg_path = path / "config.json"
    cfg = _read_json(cfg_path)
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"{cfg_path}: unsupported model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}"
        )

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ModelLoadError(f"{cfg_path}: required field {key!r} is missing")
        return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    eos = _id_list(cfg.get("eos_token_id"))
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        eos += _id_list(_read_json(gen_path).get("eos_token_id"))
    try:
        return ModelShape(
            architecture=MODEL_TYPES[model_type],
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(need("max_position_embeddings")),
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),  # transformers' default for all three
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(cfg_path, rope),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=next(iter(_id_list(cfg.get("bos_token_id"))), None),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            name=str(cfg.get("_name_or_path") or path.name),
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path}: invalid model configuration: {e}") from e


def load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[ModelShape, dict[str, torch.Tensor]]:
    """Read a Hugging Face directory into (ModelShape, {tensor name: tensor}).

    Reads every `*.safetensors` file in `path` (a tensor appearing in two shards is an error).
    Floating-point tensors are converted to `dtype`. Names are kept as they are; `lm_head.weight`
    is dropped when the config ties it to the embedding, and old `rotary_emb.inv_freq` buffers are
    dropped. Completeness and shapes are checked by `sagellm.models.loader`, not here.
    """
    path = Path(path)
    shape = read_hf_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files next to config.json")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name in weights:
                        raise ModelLoadError(f"{file}: tensor {name} also appears in another shard")
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    t = f.get_tensor(name)
                    weights[name] = t.to(dtype) if t.is_floating_point() else t
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{file}: corrupt or unreadable safetensors file: {e}") from e
    if shape.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return shape, weights


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _id_list(value: Any) -> list[int]:
    """An eos/bos field (None, int or list of ints) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope_scaling(cfg_path: Path, rope: dict[str, Any]) -> RopeScaling | None:
    """`rope_scaling` / `rope_parameters` -> RopeScaling; "default" or absent -> None."""
    if not isinstance(rope, dict):
        raise ModelLoadError(f"{cfg_path}: rope_scaling must be an object, found {rope!r}")
    kind = rope.get("rope_type") or rope.get("type")
    if kind in (None, "default"):
        return None
    if kind not in _ROPE_KINDS:
        raise ModelLoadError(
            f"{cfg_path}: unsupported rope_scaling type {kind!r}; supported: {', '.join(_ROPE_KINDS)}"
        )
    if rope.get("factor") is None:
        raise ModelLoadError(f"{cfg_path}: rope_scaling of type {kind!r} has no 'factor'")
    defaults = RopeScaling(kind=kind, factor=float(rope["factor"]))
    return RopeScaling(
        kind=kind,
        factor=float(rope["factor"]),
        low_freq_factor=float(rope.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(rope.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
        ),
    )
