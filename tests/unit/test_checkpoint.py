"""engine/checkpoint.py: an engine reads a plain Llama-family checkpoint from its files, without
transformers' model classes, and runs exactly what it ran from the Hugging Face model: the same
RoPE frequencies and the same logits, to the bit, for each architecture our forward claims, in
float32 and bf16, whole and as pipeline stages (which read only their own layers). Anything it
cannot be sure of goes to transformers, as before."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.model import engine_dtype, load_model
from engine.attention import Segment
from engine.checkpoint import Checkpoint, NotPlain, load_for_engine, open_checkpoint
from engine.runner import ModelRunner
from tests.unit.test_architectures import model_of

PROMPTS, TABLES = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], [[3, 1, 7, 0], [2, 5, 6, 4]]


def saved(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    model_of(name, torch.float32).save_pretrained(folder)
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3"])
def test_a_checkpoint_runs_what_the_hf_model_runs(tmp_path, name, dtype):
    folder = saved(tmp_path, name)
    checkpoint = load_for_engine(folder, dtype)
    assert isinstance(checkpoint, Checkpoint) and checkpoint.dtype == getattr(torch, dtype)
    hf = load_model(folder, 0, dtype)
    inv_freq, scale = checkpoint.rope()
    assert torch.equal(inv_freq, hf.model.rotary_emb.inv_freq.float()) and scale == hf.model.rotary_emb.attention_scaling
    assert torch.equal(logits(ModelRunner(checkpoint, block_size=4)), logits(ModelRunner(hf, block_size=4)))


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
    checkpoint = Recording(plain.path, vars(plain.config), plain.files, plain.dtype, "cpu")
    checkpoint.read = []
    middle = ModelRunner(checkpoint, block_size=4, layers=range(1, 2))
    assert {n.split(".")[2] for n in checkpoint.read if n.startswith("model.layers.")} == {"1"}
    assert "lm_head.weight" not in checkpoint.read
    # stage by stage: the hidden state of stage 0 through stage 1 into stage 2 gives the whole model's logits
    hf = load_model(tiny_model_path)
    whole, segments = ModelRunner(hf, block_size=4), [Segment(p, 0, t) for p, t in zip(PROMPTS, TABLES)]
    stages = [ModelRunner(open_checkpoint(tiny_model_path), block_size=4, layers=r) for r in (range(0, 1), range(2, 3))]
    h = stages[0].forward(segments, stages[0].new_pool(16))
    h = middle.forward(segments, middle.new_pool(16), hidden=h)
    assert torch.equal(stages[1].forward(segments, stages[1].new_pool(16), hidden=h), whole.forward(segments, whole.new_pool(16)))


def edited_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", ["llama3-rope", "quantized", "gpt2", "bin-weights", "renamed", "untied-no-head"])
def test_what_is_not_plain_goes_to_transformers(tmp_path, case):
    if case == "llama3-rope":
        folder = saved(tmp_path, "llama3-rope")
    else:
        folder = saved(tmp_path, "mistral")
    if case == "quantized":
        edited_config(folder, quantization_config={"quant_method": "gptq"})
    elif case == "gpt2":
        edited_config(folder, model_type="gpt2")
    elif case == "bin-weights":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif case in ("renamed", "untied-no-head"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        if case == "renamed":
            tensors = {k.replace("model.layers.", "transformer.h."): v for k, v in tensors.items()}
        else:
            tensors.pop("lm_head.weight")
            edited_config(folder, tie_word_embeddings=False)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NotPlain):
        open_checkpoint(folder)
    if case in ("llama3-rope", "renamed"):  # transformers can still load these two
        assert not isinstance(load_for_engine(folder), Checkpoint)


def test_auto_is_float32_on_cpu_and_the_models_own_on_cuda(tmp_path):
    assert [engine_dtype(*case) for case in (("auto", "cpu", "bfloat16"), ("auto", "cuda", "torch.bfloat16"),
                                             ("auto", "cuda", None), ("float16", "cpu", None))] == [
        "float32", "bfloat16", None, "float16"]
    folder = saved(tmp_path, "mistral")  # float32 weights
    assert open_checkpoint(folder, "auto", device="cpu").dtype == torch.float32
    edited_config(folder, dtype="bfloat16")
    assert open_checkpoint(folder, "auto", device="cuda").dtype == torch.bfloat16  # nothing is read onto it here
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    assert open_checkpoint(folder, "auto", device="cuda").dtype == torch.float32  # the weights' own


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
