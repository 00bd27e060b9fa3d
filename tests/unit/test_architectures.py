"""The Llama family our forward claims (engine/model.py SUPPORTED and the README): Llama with
llama3 RoPE scaling, Mistral, Qwen2 (biases on q, k and v), Qwen3 (RMSNorm per head on q and k, a
head_dim that is not hidden / heads), each a tiny random model built from its config (no weights
for them exist here). Through our forward (not the Hugging Face fallback): a batched prefill into
scattered blocks, then paged decode steps, equal `generate` token for token, in float32 with our
kernels and without them, and in float16 (no kernel runs it: PyTorch's ops, as HF runs them)."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine.attention import Segment
from engine.runner import ModelRunner

SHAPE = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
MODELS = {
    "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_scaling=LLAMA3_ROPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=False)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=32, use_sliding_window=False)),
}
PROMPTS, TABLES = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], [[3, 1, 7, 0], [2, 5, 6, 4]]
NEW = 8


def model_of(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    if name == "qwen2":  # its biases start at zero: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.to(dtype)


def generate(model) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           do_sample=False, max_new_tokens=NEW, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def decode(runner) -> list[list[int]]:
    pool = runner.new_pool(16)
    out = [[t] for t in runner.forward([Segment(p, 0, t) for p, t in zip(PROMPTS, TABLES)], pool).argmax(-1).tolist()]
    while len(out[0]) < NEW:
        segments = [Segment([o[-1]], len(p) + len(o) - 1, t) for p, o, t in zip(PROMPTS, out, TABLES)]
        for o, token in zip(out, runner.forward(segments, pool).argmax(-1).tolist()):
            o.append(token)
    return out


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("name", MODELS)
def test_the_llama_family_decodes_like_generate(name, kernels):
    model = model_of(name, torch.float32)
    runner = ModelRunner(model, block_size=4, kernels=kernels)
    assert runner.llama is not None, "our forward, not the Hugging Face fallback"
    assert decode(runner) == generate(model)


@pytest.mark.parametrize("name", MODELS)
def test_float16_decodes_like_generate(name):
    model = model_of(name, torch.float16)
    runner = ModelRunner(model, block_size=4)
    assert runner.llama is not None and runner.dtype == torch.float16
    assert decode(runner) == generate(model)


def test_llama3_rope_scaling_changes_the_output():
    """The scaled frequencies are the model's, not plain RoPE's: without them the tokens differ."""
    scaled = model_of("llama3-rope", torch.float32)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_theta=500000.0)).eval()
    plain.load_state_dict(scaled.state_dict(), strict=False)  # the same weights; inv_freq its own
    assert not torch.equal(plain.model.rotary_emb.inv_freq, scaled.model.rotary_emb.inv_freq)
    assert decode(ModelRunner(scaled, block_size=4)) != decode(ModelRunner(plain, block_size=4))
