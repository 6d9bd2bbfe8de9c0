"""Llama, Mistral and Qwen2 checkpoints (tiny, random) match transformers' own implementation.

Each model is built by transformers, saved as a Hugging Face directory (config.json + safetensors),
loaded by sagellm, and compared on prefill logits and greedy continuations through the engine.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sagellm import SageLLMConfig  # noqa: E402
from sagellm.engine import GenerateRequest, SageLLMEngine  # noqa: E402

COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
)

FAMILIES = {
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "llama3-scaled": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=False, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2-bias": (transformers.Qwen2Config, dict(tie_word_embeddings=True, use_sliding_window=False)),
}


def build(tmp_path, family):
    cls, extra = FAMILIES[family]
    cfg = cls(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # make small random weights produce non-degenerate distributions
        for p in model.parameters():
            p.normal_(0, 0.08)
    out = tmp_path / family
    model.save_pretrained(out, safe_serialization=True)
    save_word_tokenizer(out, COMMON["vocab_size"])
    return model, out


def save_word_tokenizer(path, vocab_size):
    """A real (word-level) `tokenizers` tokenizer over words w3..wN, saved beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(tmp_path, family):
    ref, path = build(tmp_path, family)
    engine = SageLLMEngine(SageLLMConfig.from_dict({
        "model": {"model_id": str(path), "max_model_len": 256},
        "kv_cache": {"num_blocks": 64, "block_size": 4},
        "scheduler": {"max_num_batched_tokens": 7},  # forces chunked prefill over several steps
    })).initialize()
    try:
        if family == "qwen2-bias":
            assert engine.shape.attention_bias
        else:
            # (transformers maps model_type qwen2 to its own tokenizer class, which rebuilds this
            # word-level test tokenizer differently; real Qwen2 checkpoints ship their own.)
            assert engine.tokenizer.encode("w5 w7") == [5, 7]
        prompts = [[5 + (i * 37 + j * 11) % 300 for j in range(10 + 9 * i)] for i in range(4)]
        outs = engine.generate_batch([
            GenerateRequest(prompt_token_ids=p, max_new_tokens=12, temperature=0.0, ignore_eos=True)
            for p in prompts
        ])
        for p, o in zip(prompts, outs):
            with torch.no_grad():
                want = ref.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                    pad_token_id=0)[0, len(p):].tolist()
            assert list(o.token_ids) == want, family
    finally:
        engine.shutdown()
