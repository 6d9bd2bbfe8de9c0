"""Shapes of well-known Llama-family models, for simulating models whose weights are not here.

Numbers are from each model's published `config.json` (Hugging Face model cards). Only the shape
matters to the simulator, so no weights are needed.
"""

from __future__ import annotations

from sagellm.models.shape import ModelShape, RopeScaling

MODEL_PRESETS: dict[str, ModelShape] = {
    "smollm2-135m": ModelShape(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True, eos_token_ids=(2,), name="smollm2-135m",
    ),
    "llama-2-7b": ModelShape(
        architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096, eos_token_ids=(2,),
        name="llama-2-7b",
    ),
    "llama-2-13b": ModelShape(
        architecture="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
        num_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=4096, eos_token_ids=(2,),
        name="llama-2-13b",
    ),
    "llama-3.1-8b": ModelShape(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), eos_token_ids=(128001, 128008, 128009),
        name="llama-3.1-8b",
    ),
    "qwen2-7b": ModelShape(
        architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, max_position_embeddings=32768, rope_theta=1000000.0,
        attention_bias=True, rms_norm_eps=1e-6, eos_token_ids=(151643,), name="qwen2-7b",
    ),
}


def model_shape(name: str) -> ModelShape:
    """The preset called `name`; raises ValueError listing the presets otherwise."""
    try:
        return MODEL_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}") from None
