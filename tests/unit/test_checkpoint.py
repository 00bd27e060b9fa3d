"""engine/checkpoint.py: an engine reads a plain Llama-family checkpoint from its files, without
transformers' model classes, and runs exactly what it ran from the Hugging Face model: the same
RoPE frequencies and the same logits, to the bit, for each architecture our forward claims, in
float32 and bf16, whole and as pipeline stages (which read only their own layers); and both are
transformers' own forward to float rounding. Whatever transformers would read otherwise than the
file says plainly goes to transformers, as before."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from common.model import engine_dtype, load_model
from engine.attention import Segment
from engine.checkpoint import Checkpoint, NotPlain, _rope, load_for_engine, open_checkpoint
from engine.runner import ModelRunner
from tests.unit.test_architectures import MODELS, SHAPE, model_of

PROMPTS, TABLES = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], [[3, 1, 7, 0], [2, 5, 6, 4]]
EXTRA = {  # beyond test_architectures' four: plain Llama (an LM head of its own), with biases, tied
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "llama-biases": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)),
}


def saved(tmp_path: Path, name: str, **kwargs) -> Path:
    folder = tmp_path / name
    if name in MODELS:
        model = model_of(name, torch.float32)
    else:
        torch.manual_seed(0)
        model = EXTRA[name]().eval()
        with torch.no_grad():  # biases start at zero: make them count
            for p in model.parameters():
                if p.dim() == 1 and not p.any():
                    p.normal_(0, 0.5)
    model.save_pretrained(folder, **kwargs)
    return folder


def edit_config(folder: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in drop:
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def edit_tensors(folder: Path, edit) -> Path:
    tensors = load_file(folder / "model.safetensors")
    save_file(edit(tensors), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def logits(runner: ModelRunner, steps: int = 3) -> torch.Tensor:
    """A batched prefill into scattered blocks, then greedy decode steps: every step's logits."""
    pool, out = runner.new_pool(16), []
    step = runner.forward([Segment(p, 0, t) for p, t in zip(PROMPTS, TABLES)], pool)
    lengths = [len(p) for p in PROMPTS]
    for _ in range(steps):
        out.append(step)
        segments = [Segment([int(t)], n, table) for t, n, table in zip(step.argmax(-1), lengths, TABLES)]
        lengths = [n + 1 for n in lengths]
        step = runner.forward(segments, pool)
    return torch.stack(out)


def assert_runs_like_transformers(folder: Path, dtype: str = "float32") -> None:
    checkpoint = load_for_engine(folder, dtype)
    assert isinstance(checkpoint, Checkpoint) and checkpoint.dtype == getattr(torch, dtype)
    hf = load_model(folder, 0, dtype)
    inv_freq, scale = checkpoint.rope()
    assert torch.equal(inv_freq, hf.model.rotary_emb.inv_freq.float()) and scale == hf.model.rotary_emb.attention_scaling
    runner = ModelRunner(checkpoint, block_size=4)
    assert runner.llama is not None  # our forward ran it, not transformers' modules
    ours = logits(runner)
    assert torch.equal(ours, logits(ModelRunner(hf, block_size=4)))
    if dtype == "float32":  # and transformers' own forward, not only ours from its weights
        with torch.inference_mode():
            theirs = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in PROMPTS])
        torch.testing.assert_close(ours[0], theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["llama", "llama-biases", "llama-tied", "mistral", "qwen2", "qwen3"])
def test_a_checkpoint_runs_what_the_hf_model_runs(tmp_path, name, dtype):
    assert_runs_like_transformers(saved(tmp_path, name), dtype)


def test_a_tied_config_with_a_head_of_its_own_uses_the_head_as_transformers_does(tmp_path):
    folder = edit_tensors(saved(tmp_path, "llama-tied"),
                          lambda t: {**t, "lm_head.weight": torch.randn_like(t["model.embed_tokens.weight"])})
    assert_runs_like_transformers(folder)


def test_shards_with_an_index_and_a_single_file_first(tmp_path):
    folder = saved(tmp_path, "qwen3", max_shard_size="100KB")
    assert not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").exists()
    assert_runs_like_transformers(folder)
    # a single file beside an index is what transformers reads: so do we (here a 1-layer model's)
    edit_config(saved(tmp_path / "one", "qwen3"), num_hidden_layers=1)
    edit_tensors(tmp_path / "one" / "qwen3", lambda t: {k: v for k, v in t.items() if ".layers.1." not in k})
    (tmp_path / "one" / "qwen3" / "model.safetensors").rename(folder / "model.safetensors")
    edit_config(folder, num_hidden_layers=1)
    assert open_checkpoint(folder).stored["model.norm.weight"].file.name == "model.safetensors"


def test_rope_read_as_transformers_reads_it():
    assert _rope({"rope_parameters": {"type": "linear"}})["rope_type"] == "linear"
    assert _rope({"rope_parameters": {"rope_type": "default", "rope_theta": 1.0},
                  "rope_scaling": {"rope_type": "yarn"}})["rope_type"] == "yarn"  # rope_scaling wins
    assert _rope({"rope_theta": 5.0}) == {"rope_type": "default", "rope_theta": 5.0}


def test_the_tiny_models_and_the_bundled_models_rope_equal_transformers(tiny_model_path, bundled_path):
    for path in (tiny_model_path, bundled_path):
        inv_freq, _ = open_checkpoint(path).rope()
        assert torch.equal(inv_freq, load_model(path).model.rotary_emb.inv_freq.float()), path


class Recording(Checkpoint):
    def get(self, name):
        self.read.append(name)
        return super().get(name)


def test_a_stage_reads_only_its_layers_and_computes_what_the_whole_model_does(tiny_model_path):
    plain = open_checkpoint(tiny_model_path)
    config = json.loads((tiny_model_path / "config.json").read_text())
    checkpoint = Recording(plain.path, config, plain.stored, plain.dtype, "cpu")
    checkpoint.read = []
    middle = ModelRunner(checkpoint, block_size=4, layers=range(1, 2))
    assert {n.split(".")[2] for n in checkpoint.read if n.startswith("model.layers.")} == {"1"}
    assert "lm_head.weight" not in checkpoint.read and "model.embed_tokens.weight" not in checkpoint.read
    # stage by stage: the hidden state of stage 0 through stage 1 into stage 2 gives the whole model's logits
    hf = load_model(tiny_model_path)
    whole, segments = ModelRunner(hf, block_size=4), [Segment(p, 0, t) for p, t in zip(PROMPTS, TABLES)]
    stages = [ModelRunner(open_checkpoint(tiny_model_path), block_size=4, layers=r) for r in (range(0, 1), range(2, 3))]
    h = stages[0].forward(segments, stages[0].new_pool(16))
    h = middle.forward(segments, middle.new_pool(16), hidden=h)
    assert torch.equal(stages[1].forward(segments, stages[1].new_pool(16), hidden=h), whole.forward(segments, whole.new_pool(16)))


def _bias_on_q(t):
    return {**t, "model.layers.0.self_attn.q_proj.bias": torch.ones(t["model.layers.0.self_attn.q_proj.weight"].shape[0])}


NOT_PLAIN = {  # case: (model, what is done to its folder)
    "llama3-rope": ("llama3-rope", lambda f: f),
    "rope_scaling-over-default-parameters": ("llama", lambda f: edit_config(f, rope_scaling={"type": "linear", "factor": 4.0})),
    "rope-type-spelled-type": ("llama", lambda f: edit_config(f, rope_parameters={"type": "linear", "factor": 4.0, "rope_theta": 1e4})),
    "quantized": ("mistral", lambda f: edit_config(f, quantization_config={"quant_method": "gptq"})),
    "gpt2": ("mistral", lambda f: edit_config(f, model_type="gpt2")),
    "mistral-window-left-to-default": ("mistral", lambda f: edit_config(f, drop=("sliding_window",))),
    "qwen3-head_dim-left-to-default": ("qwen3", lambda f: edit_config(f, drop=("head_dim",))),
    "kv-heads-left-to-default": ("qwen2", lambda f: edit_config(f, drop=("num_key_value_heads",))),
    "kv-heads-null": ("qwen2", lambda f: edit_config(f, num_key_value_heads=None)),
    "qwen-window-on-without-its-size": ("qwen2", lambda f: edit_config(f, use_sliding_window=True, drop=("sliding_window",))),
    "bin-weights": ("mistral", lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin")),
    "renamed": ("mistral", lambda f: edit_tensors(f, lambda t: {k.replace("model.layers.", "transformer.h."): v
                                                                 for k, v in t.items()})),
    "untied-no-head": ("llama", lambda f: edit_tensors(f, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})),
    "a-bias-transformers-ignores": ("llama", lambda f: edit_tensors(f, _bias_on_q)),
    "qwen3-without-its-norms": ("qwen3", lambda f: edit_tensors(f, lambda t: {k: v for k, v in t.items()
                                                                              if "_norm." not in k or "layernorm" in k})),
    "shapes-not-the-configs": ("llama", lambda f: edit_config(f, intermediate_size=96)),
    "integer-weights": ("llama", lambda f: edit_tensors(f, lambda t: {**t, "model.norm.weight": t["model.norm.weight"].int()})),
}


@pytest.mark.parametrize("case", NOT_PLAIN)
def test_what_is_not_plain_goes_to_transformers(tmp_path, case):
    name, edit = NOT_PLAIN[case]
    folder = saved(tmp_path, name)
    edit(folder)
    with pytest.raises(NotPlain):
        open_checkpoint(folder)
    if case in ("llama3-rope", "a-bias-transformers-ignores", "mistral-window-left-to-default"):
        assert not isinstance(load_for_engine(folder), Checkpoint)  # transformers loads these


def test_qwen_without_use_sliding_window_has_no_window_as_in_transformers(tmp_path):
    folder = edit_config(saved(tmp_path, "qwen2"), drop=("use_sliding_window",), sliding_window=64)
    assert open_checkpoint(folder).config.sliding_window is None
    assert ModelRunner(open_checkpoint(folder), block_size=4, max_model_len=256).llama is not None


def test_auto_is_float32_on_cpu_and_the_models_own_on_cuda(tmp_path):
    assert [engine_dtype(*case) for case in (("auto", "cpu", "bfloat16"), ("auto", "cuda", "torch.bfloat16"),
                                             ("auto", "cuda", None), ("float16", "cpu", None))] == [
        "float32", "bfloat16", None, "float16"]
    folder = tmp_path / "bf16"
    torch.manual_seed(0)
    EXTRA["llama"]().to(torch.bfloat16).save_pretrained(folder)  # bf16 weights
    assert open_checkpoint(folder, "auto", device="cpu").dtype == torch.float32
    edit_config(folder, dtype="float16")
    assert open_checkpoint(folder, "auto", device="cuda").dtype == torch.float16  # nothing is read onto it here
    edit_config(folder, drop=("dtype", "torch_dtype"))
    assert open_checkpoint(folder, "auto", device="cuda").dtype == torch.bfloat16  # the weights' own
    edit_tensors(folder, lambda t: {**t, "model.norm.weight": t["model.norm.weight"].float()})
    with pytest.raises(NotPlain, match="mixed"):
        open_checkpoint(folder, "auto", device="cuda")


def test_compile_loads_the_hf_model(tiny_model_path):
    assert not isinstance(load_for_engine(tiny_model_path, compile=True), Checkpoint)


def test_an_engine_process_starts_without_transformers_model_code(tiny_model_path):
    """What the start-up gains: a runner built from a checkpoint never imports transformers (~2.4 s
    of an engine process's start on a 2-core VM)."""
    code = (f"import sys; from engine.checkpoint import load_for_engine; from engine.runner import ModelRunner; "
            f"r = ModelRunner(load_for_engine(__import__('pathlib').Path({str(tiny_model_path)!r})));"
            f"import token_service.app, prompt_service.app; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
