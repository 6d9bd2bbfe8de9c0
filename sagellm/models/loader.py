"""One entry point for model weights: GGUF file or Hugging Face directory, validated against the shape."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from sagellm.models import weight_cache
from sagellm.models.errors import ModelLoadError
from sagellm.models.gguf_check import check_gguf_file
from sagellm.models.gguf_loader import GGUFReader, load_gguf, shape_from_reader
from sagellm.models.safetensors_loader import load_hf_dir, read_hf_config
from sagellm.models.shape import ModelShape


def expected_tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of `shape` needs, by Hugging Face name, with its [out, in] shape.

    Includes q/k/v biases iff `shape.attention_bias` and `lm_head.weight` iff the embedding is not
    tied. This is the single definition of the Llama-family parameter layout.
    """
    h, inter, vocab = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    q, kv = shape.q_size, shape.kv_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if shape.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (inter, h)
        out[p + "mlp.up_proj.weight"] = (inter, h)
        out[p + "mlp.down_proj.weight"] = (h, inter)
    out["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = (vocab, h)
    return out


def validate_weights(path: Path, shape: ModelShape, weights: dict[str, torch.Tensor]) -> None:
    """Raise ModelLoadError unless `weights` has exactly the tensors of `expected_tensor_shapes(shape)`.

    The message names the path and the first missing, unexpected or mis-shaped tensor.
    """
    expected = expected_tensor_shapes(shape)
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{path}: missing tensor {missing[0]}{more}")
    unexpected = sorted(n for n in weights if n not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelLoadError(
            f"{path}: unexpected tensor {unexpected[0]}{more} for a {shape.architecture} model with "
            f"{shape.num_layers} layers"
        )
    for name, want in expected.items():
        got = tuple(weights[name].shape)
        if got != want:
            raise ModelLoadError(f"{path}: shape mismatch for tensor {name}: expected {want}, found {got}")


def load_model_weights(path: Path, dtype: torch.dtype) -> tuple[ModelShape, dict[str, torch.Tensor]]:
    """Load (ModelShape, weights) from a GGUF file or a Hugging Face directory, fully validated.

    A file is read as GGUF, a directory as config.json + *.safetensors. On return the weight dict
    holds exactly `expected_tensor_shapes(shape)` with those shapes, floating tensors in `dtype`,
    on the CPU. Raises ModelLoadError naming the path and the problem otherwise.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory; nothing is downloaded from a hub")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path}: not a Hugging Face model directory: it has no config.json "
                "(expected config.json and *.safetensors, or give a .gguf file)"
            )
        shape, weights = load_hf_dir(path, dtype)
    else:
        cached = weight_cache.load_cached(path, dtype) if weight_cache.cache_enabled() else None
        if cached is not None:
            shape, weights = cached
        else:
            shape, weights = load_gguf(path, dtype)
            if weight_cache.cache_enabled():
                weight_cache.store(path, shape, weights)
    validate_weights(path, shape, weights)
    return shape, weights


def read_model_shape(path: Path) -> ModelShape:
    """Only the shape of the model at `path` (GGUF metadata or config.json), without loading weights.
    A GGUF file's shape is read once per version of the file (path, size, modification time):
    parsing its metadata takes seconds, and an experiment resolves the same model's shape for every
    simulation."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory; nothing is downloaded from a hub")
    if path.is_dir():
        return read_hf_config(path)
    stat = path.stat()
    return _read_gguf_shape(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_gguf_shape(path: Path, size: int, mtime_ns: int) -> ModelShape:
    check_gguf_file(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # GGUFReader raises many exception types on bad input
        raise ModelLoadError(f"{path}: corrupt GGUF file: {type(e).__name__}: {e}") from e
    return shape_from_reader(path, reader)
