"""Shared fixtures: a real Redis server, a tiny random Llama built from a config (with the
SmolLM2 tokenizer), clusters of real processes, and the HF `generate` oracle."""

from __future__ import annotations

import gc
import shutil
import sys
from pathlib import Path

import pytest

from dejavu.redis_server import RedisServer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module", autouse=True)
def _gc_frozen():
    """What earlier modules left alive (torch's, transformers' and the fuzzers' imports, session
    fixtures) is moved out of the collector's reach at each module's start, so that a full collection
    scans this module's objects only. UCX's reset collects twice (common.kv.ucx._Runtime.release)
    at every UCX transport's close: over the whole run's heap that took 2.5 s per unit test (51 such
    teardowns, 2 minutes of CI), against 0.1 s in the file alone. What is garbage is collected
    first, a failed test's traceback (pytest keeps it in sys.last_*) included; what is frozen alive
    and later dropped in a cycle stays, uncollected. Objects made from here on are collected as before."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        sys.__dict__.pop(name, None)
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def bundled_path() -> Path:
    from common.model import resolve_model_path

    return resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, bundled_path) -> Path:
    """A 3-layer Llama (pipelines of 1, 2 and 3 stages) with random weights (seeded, spread wide so greedy choices are clear-cut)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                         initializer_range=0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (bundled_path / name).exists():
            shutil.copy(bundled_path / name, folder / name)
    return folder


class Oracle:
    """Hugging Face `generate`, greedy, one request at a time: the correctness reference."""

    def __init__(self, path: Path):
        from common.model import load_model, load_tokenizer

        self.model, self.tokenizer = load_model(path), load_tokenizer(path)

    def generate_ids(self, prompt_ids: list[int], max_tokens: int, **kw) -> list[int]:
        """kw: more of generate's arguments (repetition_penalty, sequence_bias, min_new_tokens)."""
        import torch

        out = self.model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                  do_sample=False, max_new_tokens=max_tokens, **kw)
        return out[0, len(prompt_ids):].tolist()

    def penalized_ids(self, prompt_ids: list[int], max_tokens: int, frequency: float, presence: float) -> list[int]:
        """Greedy with OpenAI's frequency and presence penalties, which `generate` lacks: each step
        the model's logits of the whole sequence, less count x frequency + (count > 0) x presence
        for every token out so far."""
        import torch

        ids, out = list(prompt_ids), []
        with torch.no_grad():
            for _ in range(max_tokens):
                logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                for token in set(out):
                    logits[token] -= out.count(token) * frequency + presence
                out.append(int(logits.argmax()))
                ids.append(out[-1])
                if out[-1] == self.model.generation_config.eos_token_id:
                    break
        return out

    def text(self, prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
        ids = self.generate_ids(prompt_ids, max_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True), len(ids)


@pytest.fixture(scope="session")
def tiny_oracle(tiny_model_path) -> Oracle:
    return Oracle(tiny_model_path)


@pytest.fixture
def two_threads():
    """At least two threads, so that a batch runs on the OpenMP team and a row alone on the calling
    thread, whatever the machine's or OMP_NUM_THREADS' count (one thread would make a test of the
    two paths a test of one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def caplog_ids(caplog):
    """caplog whose records carry `request_id`, the id a service's log line would show (what
    common.service's filter reads: the request_id context variable when the line was logged)."""
    import logging

    from common.service import request_id_var

    class Named(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.request_id = request_id_var.get()
            return True

    caplog.handler.addFilter(named := Named())
    yield caplog
    caplog.handler.removeFilter(named)
