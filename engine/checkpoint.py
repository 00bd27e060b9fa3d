"""An engine process's model: a Llama-family checkpoint read straight from its files, or else the
Hugging Face model.

`transformers` reads the config, the tokenizer and the weights; but importing its model classes
(`AutoConfig`, `from_pretrained`) pulls in torch.distributed's tensors, dynamo and sympy: ~2.4 s
of the ~6.5 an engine process took to start on a 2-core VM, more than the tiny model's whole load,
and an engine restarts (`dejavu up`) or starts per pipeline stage (10 for the largest test layout).
Our forward needs none of it: config.json's numbers, the safetensors tensors and RoPE's inverse
frequencies. So where a checkpoint is one our forward runs, as plainly as this file can be sure of
(a supported model_type, default RoPE, safetensors, every tensor named as Hugging Face names it),
`load_for_engine` returns a `Checkpoint` and reads only the tensors of the layers it is asked for
(a pipeline stage reads its own); anything else, and `--compile` (which traces HF's modules), gets
`common.model.load_model`'s Hugging Face model as before. `tests/unit/test_checkpoint.py` holds
the two to the same tensors, RoPE and logits, bit for bit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from common.model import engine_dtype
from engine.model import SUPPORTED

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NotPlain(Exception):
    """This checkpoint needs transformers to read it (its reason in the message)."""


class Checkpoint:
    """config.json as attributes (`config`), the dtype and device the engine runs in, and the
    tensors by their Hugging Face names, read from the safetensors files when asked for."""

    def __init__(self, path: Path, config: dict, files: dict[str, Path], dtype: torch.dtype, device: str):
        self.path, self.files, self.dtype, self.device = path, files, dtype, torch.device(device)
        self.config = SimpleNamespace(**config)
        self.config.num_key_value_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        self.config.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.config.rms_norm_eps = config.get("rms_norm_eps", 1e-6)
        self.vocab_size = self.shape("model.embed_tokens.weight")[0]

    def shape(self, name: str) -> list[int]:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return f.get_slice(name).get_shape()

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor `name` in the engine's dtype and device, or None where the checkpoint has none
        (a bias the model has not; the LM head of tied embeddings: the caller takes the embedding)."""
        from safetensors import safe_open

        if name not in self.files:
            return None
        with safe_open(self.files[name], framework="pt") as f:
            t = f.get_tensor(name)
        return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)

    def hf_model(self):
        """The same model loaded by transformers, in this dtype: for the paths that run its modules."""
        from common.model import load_model

        return load_model(self.path, 0, str(self.dtype).removeprefix("torch."))

    def rope(self) -> tuple[torch.Tensor, float]:
        """RoPE's inverse frequencies (head_dim / 2,), float32, and the cos/sin scale: default RoPE,
        computed as transformers' LlamaRotaryEmbedding computes it, op for op."""
        c = self.config
        base, dim = _rope(vars(c))["rope_theta"], c.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


def _rope(config: dict) -> dict:
    """The RoPE parameters however the config spells them (transformers 5's rope_parameters, or the
    older rope_theta and rope_scaling)."""
    rope = dict(config.get("rope_parameters") or {})
    if "rope_theta" not in rope and "rope_theta" in config:
        rope["rope_theta"] = config["rope_theta"]
    scaling = config.get("rope_scaling") or {}
    rope.setdefault("rope_type", scaling.get("rope_type") or scaling.get("type") or "default")
    return rope


def _engine_dtype(dtype: str, device: str, config: dict, files: dict[str, Path]) -> torch.dtype:
    """common.model.engine_dtype's rule; where the config names no dtype, the stored embedding's."""
    name = engine_dtype(dtype, device, config.get("dtype") or config.get("torch_dtype"))
    if name in DTYPES:
        return DTYPES[name]
    if name is not None:
        raise NotPlain(f"dtype {name!r}")
    from safetensors import safe_open

    with safe_open(files["model.embed_tokens.weight"], framework="pt") as f:
        stored = f.get_slice("model.embed_tokens.weight").get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def weight_files(path: Path) -> dict[str, Path]:
    """Every tensor name of a safetensors checkpoint (one file, or shards with an index) -> its file."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise NotPlain("no model.safetensors (nor an index of shards)")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def required_names(config: dict, layers: range) -> list[str]:
    """The tensors our forward reads for `layers` (biases and per-head norms are optional)."""
    names = [f"model.layers.{i}.{part}.weight" for i in layers for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    names.append("model.embed_tokens.weight")
    if layers.stop == config["num_hidden_layers"]:
        names.append("model.norm.weight")
    return names


def open_checkpoint(path: Path, dtype: str = "auto", device: str | None = None) -> Checkpoint:
    """A Checkpoint of the model at `path`, or NotPlain saying why transformers must read it."""
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") not in SUPPORTED:
        raise NotPlain(f"model_type {config.get('model_type')!r} is not one of {SUPPORTED}")
    if config.get("quantization_config"):
        raise NotPlain("a quantized checkpoint")
    rope = _rope(config)
    if rope["rope_type"] != "default" or "rope_theta" not in rope or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotPlain(f"RoPE {rope} (ours computes the default only; transformers' for the others)")
    files = weight_files(path)
    missing = [n for n in required_names(config, range(config["num_hidden_layers"])) if n not in files]
    if "lm_head.weight" not in files and not config.get("tie_word_embeddings", False):
        missing.append("lm_head.weight")
    if missing:
        raise NotPlain(f"{len(missing)} tensors not under their Hugging Face names, e.g. {missing[0]}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Checkpoint(path, config, files, _engine_dtype(dtype, device, config, files), device)


def load_for_engine(path: Path, dtype: str = "auto", compile: bool = False):
    """What an engine process hands ModelRunner: a Checkpoint where our forward runs it from its
    files, else (and for --compile) the Hugging Face model."""
    if not compile:
        try:
            return open_checkpoint(path, dtype)
        except NotPlain as why:
            log.info("loading the model through transformers: %s", why)
    from common.model import load_model

    return load_model(path, 0, dtype)
