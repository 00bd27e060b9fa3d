"""ModelRunner: one per engine process (prompt or token service), the only way they run the model.

    runner = ModelRunner(load_for_engine(path, dtype=...), block_size=16)  # engine/checkpoint.py
    pool = runner.new_pool(num_blocks)                       # token services: the paged KV pool
    logits = runner.forward(segments, pool)                  # decode steps, chunks, restores
    logits = runner.prefill(prompts, on_layer)               # prompt services: no pool, K/V streamed
    logits = await runner.run(runner.forward, segments, pool)  # from a service's event loop

`run` hands the work to the runner's one engine thread. Every forward of a process runs on that
same thread: each thread that calls into torch on CPU gets an OpenMP team of its own, and with
asyncio.to_thread's pool the steps hopped between threads, whose idle teams spun on the cores the
working one needed (a 1-sequence decode step took 44 ms in the token service, 34 ms in process).
The engine thread leads the process's only team: a service calls `teams_on_engine_threads_only`
before it loads the model (see there why a second team, even an idle one, costs a third).
With `turns` (a lock file, `dejavu up --cpu-placement turns`), each call on that thread first
waits for this process's turn on the host's cores (engine/turns.py).

A forward takes any mix of segments (engine/attention.py): prompts from scratch, single decode
tokens, tokens after KV that is there already; it returns float32 logits of each segment's last
token, (len(segments), vocab). Llama-family models run our own forward (engine/model.py); any
other causal LM runs its Hugging Face modules (engine/hf.py), slower.

KV pool, one tensor per service: (layers, 2, num_blocks * block_size, kv_heads, head_dim), token-
major so that a token range of a block table is one indexed copy; [:, 0] keys, [:, 1] values.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from common.protocol import PromptLogprob
from common.sampling import prompt_logprobs
from engine.attention import AttentionBatch, Segment
from engine.checkpoint import Checkpoint
from engine.compiled import CompiledDecode
from engine.graphs import DecodeGraphs
from engine.kernels import paged_attention
from engine.model import LayerCallback, LlamaForward, Unsupported, check_supported
from engine.turns import Turns

log = logging.getLogger(__name__)
SCORE_ROWS = 256  # prompt logprobs: the LM head over this many rows at a time (SmolLM2: 50 MB of float32 logits)


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> "KVShape":
        return cls.of_config(model.config, model.dtype)

    @classmethod
    def of_config(cls, c, dtype: torch.dtype) -> "KVShape":
        """From a Hugging Face config alone (`dejavu up` checks its flags with it, loading no weights)."""
        heads = c.num_attention_heads
        return cls(c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads,
                   getattr(c, "head_dim", None) or c.hidden_size // heads, dtype)

    @property
    def bytes_per_token(self) -> int:  # K and V, every layer
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def stage_block_bytes(self, stages: int, block_size: int) -> int:
        """A block of the largest stage's layers (the first's): what --kv-device-bytes counts."""
        return self.bytes_per_token // self.layers * len(stage_layers(self.layers, stages, 0)) * block_size


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """The decoder layers of pipeline stage `stage` of `stages`: an even split, the first stages
    taking one more when it does not divide (the last also runs the LM head). Raises ValueError."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"{stages} stages for a model of {num_layers} layers (each stage needs one at least)")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} of {stages} (stages count from 0)")
    size, extra = divmod(num_layers, stages)
    start = stage * size + min(stage, extra)
    return range(start, start + size + (stage < extra))


def teams_on_engine_threads_only(threads: int = 0) -> int:
    """For an engine process, before it loads its model: from now on the calling thread, and every
    thread started later, computes with one thread; only ModelRunner's engine thread (its `threads`)
    leads an OpenMP team. Returns the count to give it: `threads`, or torch's default (the cores) if 0.

    libgomp counts every thread it manages, idle teams' too, and once they outnumber the cores it
    stops spinning between parallel regions: a team's workers sleep after every op and are woken for
    the next. A service loaded its model on asyncio.to_thread's thread (a team of 2, idle ever after)
    and then stepped on the engine thread (a second team of 2), 4 threads on a 2-core host: a
    1-sequence SmolLM2 step took 54 ms in the token service against 40 in a process of its own, a
    decode row's oneDNN linear 150-230 us against 50-90 (docs/BENCHMARKS.md §5)."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    torch.get_num_threads()  # torch fixes a thread's count at its first call, from the last set_num_threads
    return threads


def _lead_team(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.get_num_threads()  # fixed for this thread now, whatever set_num_threads comes later


def _engine_thread(threads: int) -> ThreadPoolExecutor:
    """The thread every step runs on, leading a team of `threads`, or of as many as the calling
    thread has."""
    caller = torch.get_num_threads()
    thread = ThreadPoolExecutor(1, thread_name_prefix="engine", initializer=_lead_team, initargs=(threads or caller,))
    thread.submit(int).result()  # its initializer has run
    torch.set_num_threads(caller)  # which set the count threads started later take: give it back
    return thread


class ModelRunner:
    def __init__(self, model, block_size: int = 16, max_model_len: int = 1 << 20, own_forward: bool = True,
                 kernels: bool = True, compile: bool = False, turns: str = "", layers: range | None = None,
                 threads: int = 0, gemm: bool = True, cuda_graphs: bool | None = None, max_batch: int = 256):
        """cuda_graphs: decode steps replayed from CUDA graphs (engine/graphs.py) for batches up to
        `max_batch`; None: where the model runs on CUDA, our forward runs it (the whole model or a
        pipeline stage) and not --compile. True on a CPU runs the same path without capturing (tests)."""
        self.kv = KVShape.of(model)  # the whole model's: what KV messages and replicas speak of
        # a pipeline stage (token_service/pipeline.py) holds and computes `layers` only; its pool too
        self.layers = range(self.kv.layers) if layers is None else layers
        if not (0 <= self.layers.start < self.layers.stop <= self.kv.layers and self.layers.step == 1):
            raise ValueError(f"layers {self.layers} of a {self.kv.layers}-layer model")
        self.first, self.last = self.layers.start == 0, self.layers.stop == self.kv.layers
        if isinstance(model, Checkpoint) and (compile or not own_forward):
            model = model.hf_model()  # --compile traces HF's modules; own_forward=False runs them
        self.vocab_size = (model.vocab_size if isinstance(model, Checkpoint)  # token ids a request may carry
                           else model.get_input_embeddings().num_embeddings)
        self.device, self.dtype, self.block_size = model.device, model.dtype, block_size
        self.llama: LlamaForward | None = None
        self.hf = None  # engine.hf.HFForward: the Hugging Face modules, for a model our forward does not run
        self.graphs: DecodeGraphs | None = None  # set last: --compile's warm-up makes a pool before
        try:
            if not own_forward:
                raise Unsupported("own_forward=False")
            self.llama = self._own_forward(model, max_model_len, kernels, gemm)
        except Unsupported as why:
            if len(self.layers) < self.kv.layers:
                raise ValueError(f"pipeline stages need a model our forward runs (Llama family): {why}") from None
            log.info("the model runs through its Hugging Face modules (slower): %s", why)
            from engine.hf import HFForward  # imports transformers' model code: only where it runs

            self.hf = HFForward(model.hf_model() if isinstance(model, Checkpoint) else model, block_size)
        self.thread = _engine_thread(threads)
        self.turns = Turns(turns) if turns else None  # the host's other engines compute in between
        # float32, one sequence: a batch of one is traced with static shapes, and inductor's GEMM
        # for those is MKL's, slower than oneDNN's prepacked one, let alone ours (engine/compiled.py)
        self.compiled_min_batch = 2 if self.dtype == torch.float32 else 1
        self.compiled: CompiledDecode | None = None
        if compile and self.llama is not None and CompiledDecode.supports(model) and len(self.layers) == self.kv.layers:
            self.compiled = CompiledDecode(model, self.llama.attention)
            self.thread.submit(self._call, self.compiled.warm_up, (self,)).result()  # on the thread that runs it
        elif compile:
            log.warning("--compile: this model's decode step runs eagerly (only plain Llama-family models compile, "
                        "not one stage of one)")
        ours = self.llama is not None and self.compiled is None
        if cuda_graphs is None:
            cuda_graphs = ours and self.device.type == "cuda"
        elif cuda_graphs and not ours:
            raise ValueError("CUDA graphs replay our forward (a whole model or a pipeline stage of it): not the "
                             "Hugging Face modules, nor --compile's")
        self.graphs = (DecodeGraphs(self.llama, self.device, block_size, max_batch, max_model_len,
                                    capture=self.device.type == "cuda") if cuda_graphs else None)

    def _own_forward(self, model, max_model_len: int, kernels: bool, gemm: bool) -> LlamaForward:
        """Our forward of this runner's layers; Unsupported for a model it does not run."""
        check_supported(model, max_model_len)
        # built here, at start-up, not in a first request
        kernel = paged_attention() if kernels and self.device.type == "cpu" else None
        # its linears through our GEMM where the kernel runs the dtype (gemm=False: oneDNN's, for bench.step)
        kernel_for_linears = kernel if gemm else None
        llama = (LlamaForward(model.config, model.get, model.rope(), self.layers, kernel_for_linears)
                 if isinstance(model, Checkpoint) else LlamaForward.of_hf(model, self.layers, kernel_for_linears))
        if kernel is not None and llama.fits_ops():
            llama.ops = kernel
            if self.kv.head_dim in kernel.HEAD_DIMS:
                llama.attention.kernel = kernel
            llama.use_decode_stack(kernel)
        return llama

    async def run(self, fn, *args):
        """fn(*args) on the engine thread, awaited from an event loop (see the module docstring)."""
        return await asyncio.get_running_loop().run_in_executor(self.thread, self._call, fn, args)

    def _call(self, fn, args):
        if self.turns is None:
            return fn(*args)
        with self.turns.hold():  # blocks this thread (not the loop) while another engine computes
            return fn(*args)

    @property
    def dtype_name(self) -> str:
        """The dtype as the wire and the registry name it: "float32", "bfloat16", ..."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def name(self) -> str:
        if self.llama is None:
            return "hf"
        return "own, paged attention kernel" if self.llama.attention.kernel is not None else "own"

    @property
    def pool_bytes_per_token(self) -> int:
        """K and V of this runner's layers (all of them, or one stage's)."""
        return self.kv.bytes_per_token * len(self.layers) // self.kv.layers

    def new_pool(self, num_blocks: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The paged KV of this runner's layers, on its device (or `device`: a swapped pool's host side).
        With CUDA graphs, a pool on the device has one slot more, past its blocks: the padding rows of a
        replayed step write there (engine/graphs.py), and decode steps over it replay graphs."""
        kv, slots = self.kv, num_blocks * self.block_size
        scratch = int(self.graphs is not None and device is None)
        pool = torch.zeros(len(self.layers), 2, slots + scratch, kv.kv_heads, kv.head_dim,
                           dtype=kv.dtype, device=self.device if device is None else device)
        if scratch:
            self.graphs.attach(pool, slots)
        return pool

    def check_tokens(self, ids: list[int], what: str) -> None:
        """ValueError for a token id past the vocabulary (the embedding would fail the whole step)."""
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{what}: token id {bad} is not in the model's vocabulary of {self.vocab_size}")

    def forward(self, segments: list[Segment], pool: torch.Tensor | None = None,
                on_layer: LayerCallback | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Every segment's new tokens in one pass; their K/V goes to `pool` at their blocks (if a
        pool is given) and to `on_layer` (layer, k, v) as each layer is computed, k and v (N,
        kv_heads, D) in segment order. Returns float32 logits of each segment's last token.
        A pipeline stage: a later stage than the first takes the previous one's output as `hidden`
        (N, hidden) and reads no token ids (its segments' `tokens` only count them); a stage before
        the last returns its residual stream (N, hidden), not logits."""
        if not segments or any(not s.tokens for s in segments):
            raise ValueError("a forward needs segments with at least one new token each")
        if not self.first:
            if hidden is None or hidden.shape != (sum(len(s.tokens) for s in segments), self.llama.hidden_size):
                raise ValueError(f"stage {self.layers}: hidden states of shape {None if hidden is None else tuple(hidden.shape)} "
                                 f"for {sum(len(s.tokens) for s in segments)} tokens")
            hidden = hidden.to(self.device, self.dtype)
        if self.hf is not None:
            return self.hf.run(segments, pool, on_layer)
        if self.graphs is not None and on_layer is None and self.graphs.fits(segments, pool):
            return self.graphs(segments, pool, hidden)
        batch, ids, positions = self._inputs(segments)
        if self.compiled and batch.decode_only and len(segments) >= self.compiled_min_batch and on_layer is None:
            return self.compiled(ids, positions, batch, pool)
        return self.llama(ids, positions, batch, pool, self._last_rows(batch, segments), on_layer, hidden)

    def _inputs(self, segments: list[Segment]) -> tuple[AttentionBatch, torch.Tensor | None, torch.Tensor]:
        """Our forward's inputs: the batch's attention layout, the new token ids (a first stage's;
        None for a later one) and their positions, (N,) each."""
        batch = AttentionBatch.build(segments, self.block_size, self.device)
        ids = torch.tensor([t for s in segments for t in s.tokens], device=self.device) if self.first else None
        positions = torch.tensor([p for s in segments for p in range(s.start, s.end)], device=self.device)
        return batch, ids, positions

    def _last_rows(self, batch: AttentionBatch, segments: list[Segment]) -> torch.Tensor:
        """Each segment's last new token's row: where its logits are taken."""
        return torch.tensor([o + len(s.tokens) - 1 for o, s in zip(batch.offsets, segments)], device=self.device)

    def forward_scored(self, segments: list[Segment], pool: torch.Tensor | None, on_layer: LayerCallback | None,
                       scored: dict[int, tuple[list[int], int]]) -> tuple[torch.Tensor, dict[int, list[PromptLogprob]]]:
        """`forward` of a whole model, which also scores prompt tokens (echo with logprobs): for
        segment i in `scored`, (targets, k): targets[j] is the token after the segment's j-th new
        one (len(targets) is its length, or one less at the prompt's end), each scored against the
        logits at that row, with the k likeliest tokens there. The last rows' logits come out as
        `forward`'s, to the bit, from our forward (so the first token does not depend on whether a
        request scores); from the Hugging Face modules, within float rounding."""
        if not (self.first and self.last):
            raise ValueError("prompt logprobs need the whole model in one process, not a pipeline stage")
        if any(not 0 <= len(segments[i].tokens) - len(t) <= 1 for i, (t, _) in scored.items()):
            raise ValueError("a scored segment's targets: one per new token, or one fewer")
        if self.hf is not None:
            return self.hf.run(segments, pool, on_layer, scored)
        batch, ids, positions = self._inputs(segments)
        final: list[torch.Tensor] = []
        logits = self.llama(ids, positions, batch, pool, self._last_rows(batch, segments), on_layer, None, final)
        scores = {}
        for i, (targets, k) in scored.items():
            rows = final[0][batch.offsets[i]: batch.offsets[i] + len(targets)]
            scores[i] = [p for at in range(0, len(targets), SCORE_ROWS)  # (rows, vocab) float32 a piece at most
                         for p in prompt_logprobs(self.llama.head(rows[at: at + SCORE_ROWS]),
                                                  targets[at: at + SCORE_ROWS], k)]
        return logits, scores

    def logits_all(self, tokens: list[int]) -> torch.Tensor:
        """Float32 logits at every position of one sequence from scratch, no pool: (len, vocab).
        For measurements (teacher-forced agreement), not serving."""
        if self.hf is not None:
            with torch.inference_mode():
                return self.hf.model(input_ids=torch.tensor([tokens], device=self.device)).logits[0].float()
        segment = [Segment(list(tokens))]
        batch = AttentionBatch.build(segment, self.block_size, self.device)
        ids = torch.tensor(tokens, device=self.device)
        positions = torch.arange(len(tokens), device=self.device)
        return self.llama(ids, positions, batch, None, positions)

    def prefill(self, prompts: list[list[int]], on_layer: LayerCallback) -> torch.Tensor:
        """Prompts from scratch with no pool (a prompt service): each layer's K/V of every prompt,
        (sum of lengths, kv_heads, D) in prompt order, goes to on_layer. -> (len(prompts), vocab)"""
        return self.forward([Segment(list(p)) for p in prompts], None, on_layer)
