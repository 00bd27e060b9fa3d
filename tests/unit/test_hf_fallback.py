"""The paper's other architectures (GPT-2, OPT) run through their Hugging Face modules behind the
same runner: a batched prefill into scattered blocks, then paged decode steps, equal `generate`.
Tiny random models built from configs (no weights exist for them here)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from engine.attention import Segment
from engine.runner import ModelRunner

MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                               initializer_range=0.2)),
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                            num_attention_heads=4, max_position_embeddings=256,
                                            word_embed_proj_dim=64, init_std=0.2)),
}


@pytest.mark.parametrize("name", MODELS)
def test_other_architectures_decode_like_generate(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    runner = ModelRunner(model, block_size=4)
    assert runner.name == "hf"
    prompts, tables = [[5, 6, 7, 8, 9], [10, 11, 12]], [[3, 1, 7, 0], [2, 5, 6, 4]]
    want = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           do_sample=False, max_new_tokens=8, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    pool = runner.new_pool(16)
    out = [[t] for t in runner.forward([Segment(p, 0, t) for p, t in zip(prompts, tables)], pool).argmax(-1).tolist()]
    while len(out[0]) < 8:
        segments = [Segment([o[-1]], len(p) + len(o) - 1, t) for p, o, t in zip(prompts, out, tables)]
        for o, token in zip(out, runner.forward(segments, pool).argmax(-1).tolist()):
            o.append(token)
    assert out == want
