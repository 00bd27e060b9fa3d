"""An engine process's model: a Llama-family checkpoint read straight from its files, or else the
Hugging Face model.

`transformers` reads the config, the tokenizer and the weights; but importing its model classes
(`AutoConfig`, `from_pretrained`) pulls in torch.distributed's tensors, dynamo and sympy: ~2.4 s
of the ~7.5 an engine process took to start on a 2-core VM (`-X importtime`), more than the tiny
model's whole load, and an engine restarts (`dejavu up`) or starts per pipeline stage (10 for the
largest test layout). Our forward needs none of it: config.json's numbers, the safetensors tensors
and RoPE's inverse frequencies. So where a checkpoint is plain, `load_for_engine` returns a
`Checkpoint` and reads only the tensors of the layers it is asked for (a pipeline stage reads its
own). Plain: a supported model_type; a config.json that gives every number itself (where it leaves
one out, transformers takes its class's default, and those differ by class); default RoPE; and
safetensors files holding exactly the tensors transformers would build for that config, under its
names, in its shapes, floating point. Anything else, and `--compile` (which traces HF's modules),
gets `common.model.load_model`'s Hugging Face model as before. `tests/unit/test_checkpoint.py`
holds the two to the same RoPE and logits, bit for bit, and both to transformers' own forward.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from common.model import engine_dtype
from engine.model import SUPPORTED

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors' names

# What a plain config.json gives itself: where one is missing, transformers takes its model class's
# default, and those differ by class (Mistral's sliding_window 4096, Qwen's 32 KV heads, Qwen3's
# head_dim 128), so a config that leaves one out goes to transformers.
REQUIRED_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",  # numbers, not null
                 "num_key_value_heads", "rms_norm_eps", "vocab_size")
TYPE_KEYS = {"mistral": ("sliding_window",), "qwen3": ("head_dim",)}
LEFTOVERS = ("rotary_emb.inv_freq",)  # in some older files; transformers ignores them, so do we


class NotPlain(Exception):
    """This checkpoint needs transformers to read it (its reason in the message)."""


@dataclass(frozen=True)
class Stored:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...


class Checkpoint:
    """config.json as attributes (`config`), the dtype and device the engine runs in, and the
    tensors by their Hugging Face names, read from the safetensors files when asked for."""

    def __init__(self, path: Path, config: dict, stored: dict[str, Stored], dtype: torch.dtype, device: str):
        self.path, self.stored, self.dtype, self.device = path, stored, dtype, torch.device(device)
        self.config = SimpleNamespace(**config)
        self.config.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if config["model_type"] in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
            self.config.sliding_window = None  # as their configs clear it
        self.vocab_size = stored["model.embed_tokens.weight"].shape[0]

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor `name` in the engine's dtype and device, or None where the checkpoint has none
        (a bias the model has not; the LM head of tied embeddings: the caller takes the embedding)."""
        from safetensors import safe_open

        if name not in self.stored:
            return None
        # a file opened for each tensor: a handle kept open for them all kept the file's pages it
        # had read resident (a SmolLM2 runner, built alone: 1348 MiB against 973)
        with safe_open(self.stored[name].file, framework="pt") as f:
            return f.get_tensor(name).to(self.device, self.dtype)

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
    """The RoPE parameters as transformers 5 reads them: rope_scaling, where there is one, in place
    of rope_parameters; the type from either spelling; the top-level rope_theta where they have none."""
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    if "rope_theta" not in rope and "rope_theta" in config:
        rope["rope_theta"] = config["rope_theta"]
    return rope


def _engine_dtype(dtype: str, device: str, config: dict, stored: dict[str, Stored]) -> torch.dtype:
    """common.model.engine_dtype's rule; where the config names no dtype, the weights' (all one:
    of mixed ones transformers takes the first it loads)."""
    name = engine_dtype(dtype, device, config.get("dtype") or config.get("torch_dtype"))
    if name is None:
        kinds = {s.dtype for s in stored.values()}
        if len(kinds) > 1:
            raise NotPlain(f"weights of mixed dtypes {sorted(kinds)} and no dtype in config.json")
        return STORED[kinds.pop()]
    if name not in DTYPES:
        raise NotPlain(f"dtype {name!r}")
    return DTYPES[name]


def weight_index(path: Path) -> dict[str, Stored]:
    """Every tensor of a safetensors checkpoint (one file, else shards with an index, as transformers
    prefers them) -> its file, shape and dtype, from the headers alone."""
    from safetensors import safe_open

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise NotPlain("no model.safetensors (nor an index of shards)")
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                out[name] = Stored(file, tuple(tensor.get_shape()), tensor.get_dtype())
    return out


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor transformers builds for this config (the LM head aside), with its shape: the
    projections and norms, and the biases and per-head norms its type and flags give."""
    t, H, I, V = config["model_type"], config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    D = config.get("head_dim") or H // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * D, config["num_key_value_heads"] * D
    attn_bias = t in ("llama", "qwen3") and bool(config.get("attention_bias"))  # on q, k, v and o
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out |= {f"{p}.self_attn.q_proj.weight": (q, H), f"{p}.self_attn.k_proj.weight": (kv, H),
                f"{p}.self_attn.v_proj.weight": (kv, H), f"{p}.self_attn.o_proj.weight": (H, q),
                f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H), f"{p}.mlp.down_proj.weight": (H, I),
                f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,)}
        if t == "qwen2" or attn_bias:
            out |= {f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.bias": (kv,),
                    f"{p}.self_attn.v_proj.bias": (kv,)}
        if attn_bias:
            out[f"{p}.self_attn.o_proj.bias"] = (H,)
        if t == "llama" and config.get("mlp_bias"):
            out |= {f"{p}.mlp.gate_proj.bias": (I,), f"{p}.mlp.up_proj.bias": (I,), f"{p}.mlp.down_proj.bias": (H,)}
        if t == "qwen3":
            out |= {f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.k_norm.weight": (D,)}
    return out


def open_checkpoint(path: Path, dtype: str = "auto", device: str | None = None) -> Checkpoint:
    """A Checkpoint of the model at `path`, or NotPlain saying why transformers must read it: the
    config gives every number itself, RoPE is the default, and the files hold exactly the tensors
    transformers would build, in its shapes, floating point (an LM head beside them, or tied)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise NotPlain(f"config.json: {exc}") from None
    t = config.get("model_type")
    if t not in SUPPORTED:
        raise NotPlain(f"model_type {t!r} is not one of {SUPPORTED}")
    if config.get("quantization_config"):
        raise NotPlain("a quantized checkpoint")
    missing = [k for k in REQUIRED_KEYS if not isinstance(config.get(k), (int, float)) or isinstance(config[k], bool)]
    missing += [k for k in TYPE_KEYS.get(t, ()) if k not in config]
    if t in ("qwen2", "qwen3") and config.get("use_sliding_window") and not config.get("sliding_window"):
        missing.append("sliding_window")  # their configs' 4096 then
    if missing:
        raise NotPlain(f"config.json leaves {missing} to {t}'s defaults")
    rope = _rope(config)
    if rope["rope_type"] != "default" or "rope_theta" not in rope or set(rope) - {"rope_type", "type", "rope_theta"}:
        raise NotPlain(f"RoPE {rope} (ours computes the default only; transformers' for the others)")
    stored = weight_index(path)
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in stored:
            raise NotPlain(f"{name} is not in the files (under that name)")
        if stored[name].shape != shape or stored[name].dtype not in STORED:
            raise NotPlain(f"{name}: {stored[name].dtype} {stored[name].shape}, where {t} has {shape}")
    head = stored.get("lm_head.weight")
    if head is None and not config.get("tie_word_embeddings", False):
        raise NotPlain("no lm_head.weight and the embeddings are not tied")
    if head is not None and (head.shape != expected["model.embed_tokens.weight"] or head.dtype not in STORED):
        raise NotPlain(f"lm_head.weight: {head.dtype} {head.shape}")
    extra = [n for n in stored if n not in expected and n != "lm_head.weight" and not n.endswith(LEFTOVERS)]
    if extra:
        raise NotPlain(f"{len(extra)} tensors transformers would not read, e.g. {extra[0]}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Checkpoint(path, config, stored, _engine_dtype(dtype, device, config, stored), device)


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
