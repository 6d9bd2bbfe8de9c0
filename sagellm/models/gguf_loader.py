"""Load a llama.cpp GGUF file as Hugging Face Llama-style tensors plus a ModelShape.

Tensors are dequantized with `gguf.quants.dequantize` to float32, converted to the requested
dtype, renamed to Hugging Face names and, for the llama architecture, the rows of the Q and K
projections are un-permuted (llama.cpp's converter interleaves the two RoPE halves of each head;
Hugging Face models expect them as two contiguous halves).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from sagellm.models.errors import ModelLoadError
from sagellm.models.gguf_check import check_gguf_file
from sagellm.models.shape import ModelShape, RopeScaling

# general.architecture -> ModelShape.architecture (llama.cpp writes Mistral models as "llama").
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose Q/K rows llama.cpp's converter permuted.
_PERMUTED = {"llama"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_ROPE_FREQS = "rope_freqs.weight"


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None if it is not a known one."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for a weight [n_heads*head_dim, in] or bias [n_heads*head_dim].

    llama.cpp stores, within each head, HF row `k*head_dim/2 + j` (k in {0,1}) at row `2*j + k`;
    this maps the rows back. Pass the KV head count for K.
    """
    half = w.shape[0] // n_heads // 2
    if half * 2 * n_heads != w.shape[0]:
        raise ValueError(f"{w.shape[0]} rows do not split into {n_heads} heads of even size")
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[ModelShape, dict[str, torch.Tensor]]:
    """Read a GGUF file into (ModelShape, {Hugging Face tensor name: tensor in `dtype`}).

    Weights have Hugging Face layout [out_features, in_features]. `lm_head.weight` is present only
    if the file has `output.weight`; otherwise `shape.tie_word_embeddings` is True. Raises
    ModelLoadError naming the path for a truncated or corrupt file, an unsupported architecture,
    an unknown tensor, or a quantization type `gguf` cannot dequantize. Does not check that every
    expected tensor is present (see `sagellm.models.loader`).
    """
    path = Path(path)
    check_gguf_file(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # GGUFReader raises ValueError, IndexError, KeyError, ... on bad input
        raise ModelLoadError(f"{path}: corrupt GGUF file: {type(e).__name__}: {e}") from e
    shape = shape_from_reader(path, reader)
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue  # folded into shape.rope_scaling by shape_from_reader
        name = hf_tensor_name(t.name)
        if name is None:
            raise ModelLoadError(
                f"{path}: unexpected tensor {t.name!r} (type {t.tensor_type.name}): not part of a "
                f"{shape.architecture} model this loader supports"
            )
        w = _tensor_data(path, t)
        if shape.architecture in _PERMUTED and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = shape.num_heads if ".attn_q." in t.name else shape.num_kv_heads
            try:
                w = unpermute_rope_rows(w, heads)
            except ValueError as e:
                raise ModelLoadError(f"{path}: tensor {t.name}: {e}") from e
        weights[name] = w.to(dtype)
    return shape, weights


def _tensor_data(path: Path, t: Any) -> torch.Tensor:
    """Dequantize one ReaderTensor to a float32 torch tensor of HF shape (reversed GGUF dims)."""
    block, type_size = GGML_QUANT_SIZES[t.tensor_type]
    n_elements = math.prod(int(d) for d in t.shape)
    if t.data.nbytes != n_elements // block * type_size:
        raise ModelLoadError(
            f"{path}: truncated or corrupt GGUF file: tensor {t.name} has {t.data.nbytes} bytes of data, "
            f"{t.tensor_type.name} {list(t.shape)} needs {n_elements // block * type_size}"
        )
    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(
            f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which gguf cannot "
            "dequantize; re-quantize the model with a supported type (e.g. Q4_K_M, Q8_0, F16)"
        ) from e
    except Exception as e:
        raise ModelLoadError(f"{path}: corrupt GGUF data in tensor {t.name}: {type(e).__name__}: {e}") from e
    hf_shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    arr = np.asarray(arr, dtype=np.float32)
    if not arr.flags.writeable or not arr.flags.c_contiguous:  # F32 data is a view of the read-only memmap
        arr = np.array(arr, dtype=np.float32, order="C")
    return torch.from_numpy(arr.reshape(hf_shape))


def _meta(reader: GGUFReader, key: str) -> Any:
    """A scalar metadata value (str, int, float or bool), or None if the key is absent or an array."""
    field = reader.fields.get(key)
    if field is None or not field.types or field.types[0] == GGUFValueType.ARRAY:
        return None
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0]


def _f32(value: float) -> float:
    """The shortest decimal of a float32 metadata value (so 1e-5 stays 1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def shape_from_reader(path: Path, reader: GGUFReader) -> ModelShape:
    """ModelShape from the `{arch}.*` and `tokenizer.ggml.*` metadata and the tensor table."""
    arch = _meta(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r} (general.architecture); supported: "
            f"{', '.join(ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        value = _meta(reader, f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_meta(reader, f"{arch}.attention.head_count_kv") or heads)
    head_dim = _meta(reader, f"{arch}.attention.key_length") or _meta(reader, f"{arch}.rope.dimension_count")
    rope_dim = _meta(reader, f"{arch}.rope.dimension_count")
    if head_dim is not None and rope_dim is not None and int(rope_dim) != int(head_dim):
        raise ModelLoadError(f"{path}: partial rotary embeddings (rope dim {rope_dim} < head dim {head_dim})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: missing tensor token_embd.weight (the token embedding)")
    vocab = int(tensors["token_embd.weight"].shape[1])
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) > vocab:
        raise ModelLoadError(
            f"{path}: the tokenizer has {len(tokens.data)} tokens but token_embd.weight has only {vocab} rows"
        )
    theta = _f32(_meta(reader, f"{arch}.rope.freq_base") or 10000.0)
    head_dim = int(head_dim) if head_dim else hidden // heads
    eos = [_meta(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    bos = _meta(reader, "tokenizer.ggml.bos_token_id")
    try:
        return ModelShape(
            architecture=ARCHITECTURES[arch],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(need("context_length")),
            rms_norm_eps=_f32(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon") or 1e-5),
            rope_theta=theta,
            rope_scaling=_rope_scaling(path, reader, arch, tensors, theta, head_dim),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            name=_meta(reader, "general.name") or path.stem,
        )
    except ValueError as e:
        raise ModelLoadError(f"{path}: inconsistent model metadata: {e}") from e


def _rope_scaling(
    path: Path, reader: GGUFReader, arch: str, tensors: dict[str, Any], theta: float, head_dim: int
) -> RopeScaling | None:
    """RoPE scaling from `{arch}.rope.scaling.*` metadata, or Llama-3 style from a rope_freqs tensor."""
    kind = _meta(reader, f"{arch}.rope.scaling.type")
    factor = _meta(reader, f"{arch}.rope.scaling.factor") or _meta(reader, f"{arch}.rope.scale_linear")
    if _ROPE_FREQS in tensors:
        return _llama3_from_rope_freqs(path, tensors[_ROPE_FREQS], theta, head_dim)
    if kind in (None, "none"):
        if kind is None and factor and float(factor) != 1.0:  # old files: only rope.scale_linear
            return RopeScaling(kind="linear", factor=_f32(factor))
        return None
    if kind == "linear":
        if not factor:
            raise ModelLoadError(f"{path}: linear RoPE scaling without {arch}.rope.scaling.factor")
        return RopeScaling(kind="linear", factor=_f32(factor))
    raise ModelLoadError(f"{path}: unsupported RoPE scaling type {kind!r} (supported: linear, llama3)")


def _llama3_from_rope_freqs(path: Path, t: Any, theta: float, head_dim: int) -> RopeScaling:
    """Recognise the per-frequency factors llama.cpp writes for Llama 3.1-style RoPE scaling.

    llama.cpp's converter computes them with low_freq_factor=1, high_freq_factor=4 and an original
    context of 8192 (its defaults); the factor is the largest entry. Anything else is rejected.
    """
    try:
        found = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
    except Exception as e:
        raise ModelLoadError(f"{path}: unreadable tensor {_ROPE_FREQS}: {e}") from e
    if found.size != head_dim // 2:
        raise ModelLoadError(f"{path}: {_ROPE_FREQS} has {found.size} entries, expected {head_dim // 2}")
    scaling = RopeScaling(kind="llama3", factor=_f32(found.max()))
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    expected = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < high_wavelen:
            expected.append(1.0)
        elif wavelen > low_wavelen:
            expected.append(scaling.factor)
        else:
            smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            expected.append(1 / ((1 - smooth) / scaling.factor + smooth))
    if not np.allclose(found, expected, rtol=1e-4, atol=1e-5):
        raise ModelLoadError(
            f"{path}: tensor {_ROPE_FREQS} holds per-frequency RoPE factors that match no supported "
            "scaling (llama3 with low_freq_factor=1, high_freq_factor=4, original context 8192)"
        )
    return scaling
