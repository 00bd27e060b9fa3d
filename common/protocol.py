"""Typed messages for every hop between services (HTTP/JSON control plane).

gateway -> token service   POST /reserve  ReserveRequest -> Reservation        (503 kv_full when full)
gateway -> prompt service  POST /prefill  PrefillRequest -> PrefillResult      (KV goes P -> T directly)
gateway -> token service   POST /decode   DecodeRequest  -> NDJSON DecodeEvent lines
gateway -> token service   POST /restore  RestoreRequest -> RestoreResult      (recovery: KV from a replica)
gateway -> any engine      POST /abort    AbortRequest   -> AbortResult
gateway -> any engine      POST /prefix_cache/reset  (no body) -> PrefixCacheReset
token service, gateway -> cache store  POST /drop  DropRequest -> AbortResult
every service -> Redis     ServiceInfo (the registry lease)

Token positions: output index i is the i-th generated token (0 is the one the prompt service
samples); the token at output index i sits at sequence position len(prompt) + i.
"""

from __future__ import annotations

import array
import hashlib
from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Every internal endpoint validates what it is sent, as the gateway does at the public one: a
# request id ends up in log lines and Redis keys; sizes bound what a service allocates.
RequestId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]
MAX_SEQUENCE = 1 << 20  # tokens: longer than any --max-model-len accepted


class ServiceKind(str, Enum):
    GATEWAY = "gateway"
    PROMPT = "prompt"
    TOKEN = "token"
    CACHE_STORE = "cache_store"
    STAGE = "stage"  # a token pipeline's stage 1.. (token_service/pipeline.py): its head is the TOKEN service


# The internal protocol's version (these messages, the KV wire): engines publish it, and a gateway
# routes only to engines of its own, so a rolling upgrade never pairs a gateway and an engine that
# misread each other. Bump it with any change an older peer would refuse or misread.
PROTOCOL = 8  # 2: DecodeRequest.replay (a resumed request's tokens replayed by decode steps); 3: KV routes;
#              4: prompt logprobs (PrefillRequest.prompt_logprobs, TokenEvent.prompt_logprobs);
#              5: penalties, logit bias, min_tokens, min_p (SamplingParams), DecodeRequest.history;
#              6: SamplingParams.grammar (structured output); 7: TokenEvent.grammar_error;
#              8: ReserveRequest.attempt, AbortRequest.attempt


class ServiceInfo(Message):
    kind: ServiceKind
    id: str
    url: str                      # base URL of its HTTP API
    host: str
    pid: int
    model: str = ""               # model folder it serves ("" for gateway/cache_store)
    model_id: str = ""            # model_fingerprint of that model: the gateway routes only to its own
    protocol: int = 0             # PROTOCOL of an engine (0: one from before versions were published)
    kv_address: str = ""          # "host:port" of its KV transport listener ("" if none)
    kv_transport: str = ""        # "ucx" | "tcp"
    max_model_len: int = 0        # tokens per sequence
    active_requests: int = 0
    kv_bytes_used: int = 0        # bytes
    kv_bytes_free: int = 0        # bytes
    colocated: bool = False       # a token service that prefills its own requests (no prompt service)
    dtype: str = ""               # an engine's weights, activations and KV ("float32", "bfloat16", ...)
    cluster: str = ""             # fingerprint of its cluster token (cluster_fingerprint): who it works with
    pipeline: str = ""            # a token pipeline's id (--pipeline), on its head and its stages
    stage: int = 0                # which stage of it (0: the head)
    stages: int = 1               # how many stages it has
    layer_start: int = 0          # the stage's layers [layer_start, layer_end)
    layer_end: int = 0
    block_size: int = 0           # a stage's KV pool: tokens per block, and blocks (the head's must match)
    num_blocks: int = 0
    started_at: float = 0.0       # unix s
    renewed_at: float = 0.0       # unix s


CLUSTER_TOKEN_HEADER = "X-Dejavu-Cluster-Token"  # every internal HTTP call carries the cluster token in it


def cluster_fingerprint(token: str) -> str:
    """What a service publishes of its cluster token in the registry: enough to tell clusters that
    share one Redis apart, nothing that would give the token away. "" without a token."""
    return hashlib.sha256(b"dejavu-cluster:" + token.encode()).hexdigest()[:16] if token else ""


def block_keys(ids: list[int], block_size: int) -> list[bytes]:
    """The key of each whole block of `ids`: a hash of its tokens and of its parent's key. A prompt
    service's prefix cache names its blocks so, and the gateway's prefix routing guesses by them."""
    keys, parent = [], b""
    tokens = array.array("q", ids).tobytes()  # int64, native order
    for start in range(0, (len(ids) - block_size + 1) * 8, block_size * 8):
        parent = hashlib.blake2b(parent + tokens[start:start + block_size * 8], digest_size=16).digest()
        keys.append(parent)
    return keys


FETCH_TIMEOUT_S = 30.0  # a KV fetch from a cache store: connect + fetch + receive (common/kv/fetch.py); the
#                         gateway's restore call outlasts it (gateway/recovery.py)
STAGE_MARGIN_S = 10.0  # a token stage's fetch, on top: its turn in the pipeline and its report's way to the head


GREEDY_BELOW = 1e-5
MAX_LOGIT_BIAS = 1024          # token ids a request may bias
MAX_STOP_TOKENS = 64           # token ids a request may stop at
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # a logit times or over it stays finite
MAX_GRAMMAR_CHARS = 100_000    # a structured output's grammar text (a large JSON schema fits)


class SamplingParams(Message):
    temperature: float = Field(0.0, ge=0, le=2, allow_inf_nan=False)  # below GREEDY_BELOW: greedy
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)  # 0 or -1 = off
    seed: int = Field(0, ge=-(1 << 63), lt=1 << 64)  # the RNG of output index i is derived from (seed, i) only
    max_tokens: int = Field(16, ge=1, le=MAX_SEQUENCE)  # output tokens, EOS included
    eos_token_ids: list[TokenId] = Field(default_factory=list, max_length=64)  # the model's EOS ids: they end it unless ignore_eos
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKENS)  # the request's: end it always
    logprobs: int | None = Field(None, ge=0, le=20)  # None: none; k >= 0: the sampled token's logprob + top k
    # What changes the logits before the pick (common/sampling.py, `process`), greedy or not; the
    # logprobs reported stay the model's own (vLLM's default). OpenAI's penalties count the output
    # tokens so far; the repetition penalty (vLLM's, Hugging Face's) every token of prompt and output.
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)  # 1: off
    logit_bias: list[tuple[TokenId, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]]] = Field(
        default_factory=list, max_length=MAX_LOGIT_BIAS)
    min_tokens: int = Field(0, ge=0, le=MAX_SEQUENCE)  # stop tokens are masked before output index min_tokens
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)  # drop tokens below min_p x the likeliest's probability
    # structured output (common/grammar.py): llguidance's grammar text the picks follow; "" = free text
    grammar: str = Field("", max_length=MAX_GRAMMAR_CHARS)

    @property
    def greedy(self) -> bool:
        """Temperatures this small are greedy (as vLLM's 1e-5): dividing logits by 1e-320 gives
        infinities, and the probabilities NaN."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Its penalties count the tokens before the pick."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_history(self) -> bool:
        """Its pick depends on the tokens before it (penalties, a grammar): the token service needs
        them (DecodeRequest.history)."""
        return self.penalized or bool(self.grammar)

    @property
    def stops(self) -> list[int]:
        """The tokens that end it: its own, and the model's EOS unless ignore_eos."""
        return self.stop_token_ids + ([] if self.ignore_eos else self.eos_token_ids)

    @property
    def processed(self) -> bool:
        """Some of its logits change before the pick."""
        return self.needs_history or bool(self.logit_bias) or (self.min_tokens > 0 and bool(self.stops))


class ReserveRequest(Message):
    request_id: RequestId
    prompt_tokens: int = Field(ge=1, le=MAX_SEQUENCE)   # tokens
    max_tokens: int = Field(ge=1, le=MAX_SEQUENCE)      # tokens
    attempt: RequestId | None = None  # this one call's id: an /abort naming it may overtake it (AbortRequest)


KVRoute = tuple[Annotated[str, StringConstraints(max_length=300)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]


class Reservation(Message):
    request_id: str
    service_id: str
    kv_address: str               # where the prompt service streams the KV
    kv_transport: str
    # a token pipeline (--stages): (address, layer_start, layer_end) of each stage, the KV of each
    # layer streamed straight to its stage; empty: every layer to kv_address
    kv_routes: list[KVRoute] = Field(default_factory=list, max_length=64)


class PrefillRequest(Message):
    request_id: RequestId
    epoch: int = Field(0, ge=0)
    prompt_ids: list[TokenId] = Field(min_length=1, max_length=MAX_SEQUENCE)
    sampling: SamplingParams
    target_service_id: str
    target_kv_address: str
    target_kv_routes: list[KVRoute] = Field(default_factory=list, max_length=64)  # Reservation.kv_routes
    # echo with logprobs: each prompt token's logprob after the ones before it, with the k likeliest
    # there; they come back on the first token's event (TokenEvent.prompt_logprobs)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)


class TopLogprob(Message):
    token_id: int
    logprob: float


class PromptLogprob(Message):
    """A prompt token's logprob given the tokens before it, and the likeliest tokens there."""
    token_id: int
    logprob: float                # natural log, float32's precision
    top_logprobs: list[TopLogprob] = Field(default_factory=list)  # the k likeliest there, likeliest first
    rank: int | None = None       # the token's rank there (1: the likeliest; ties first), as vLLM's prompt_logprobs


class TokenEvent(Message):
    request_id: str
    index: int                    # output index
    token_id: int
    logprob: float | None = None
    top_logprobs: list[TopLogprob] | None = None
    finish_reason: str | None = None   # "stop" (EOS) | "length" | None while going on
    # the first event of a prefill asked for them (PrefillRequest.prompt_logprobs): prompt tokens 1..
    prompt_logprobs: list[PromptLogprob] | None = None
    cached_tokens: int | None = None   # the first event of a prefill: prompt tokens whose KV a prefix cache had
    # the request's grammar failed on this token (grammar.Matcher.error): it ends the request
    # ("stop" here, so every service frees it as a finished one) and the gateway answers a 400
    grammar_error: str | None = None


class PrefillResult(Message):
    request_id: str
    first: TokenEvent             # output index 0
    prefill_ms: float             # forward pass, ms
    stream_tail_ms: float         # from the last layer computed to the last layer acknowledged, ms


class DecodeRequest(Message):
    """Start decoding a request whose KV is in its reserved row: the prompt's (on a resume, the
    row holds the original prompt plus every output token but the newest) but for the last
    len(replay) tokens. Those are the tokens already out after the replicated index, or after the
    prompt on a re-prefill: the token service feeds them first, one per decode step, emitting
    nothing, so that their KV is computed as it was the first time, to the bit."""

    request_id: RequestId
    epoch: int = Field(0, ge=0)
    replay: list[TokenId] = Field(default_factory=list, max_length=MAX_SEQUENCE)  # the row's last tokens
    first_token: TokenId          # the newest output token: the input of the first decode step after the replay
    first_index: int = Field(default=0, ge=0, le=MAX_SEQUENCE)  # its output index (> 0 when resuming elsewhere)
    sampling: SamplingParams
    # the prompt and the output tokens before first_token (first_index of them) when the penalties
    # or a grammar follow them (SamplingParams.needs_history), so that a resumed request picks as it
    # would have; else empty
    history: list[TokenId] = Field(default_factory=list, max_length=MAX_SEQUENCE)


class DecodeEvent(Message):
    """One NDJSON line of the decode stream: a token, or an error that ends the stream. Blank lines
    between them keep it alive while a resumed request replays the tokens already out."""

    token: TokenEvent | None = None
    error: str | None = None


class RestoreRequest(Message):
    """Recovery: rebuild a reserved row's KV [0, len(prompt_ids)) from a replica. The token service
    fetches tokens [0, replicated) from the cache store; the rest of prompt_ids (prompt + every
    output token but the newest) comes as the decode request's `replay`."""

    request_id: RequestId
    epoch: int = Field(ge=0)      # the request's epoch after fencing the old owner
    prompt_ids: list[TokenId] = Field(min_length=1, max_length=MAX_SEQUENCE)
    replicated: int = Field(ge=1)  # tokens the store acknowledged (Redis), capped at len(prompt_ids)
    store_id: str
    store_kv_address: str
    store_url: str = ""           # the store's HTTP API: where the replica is dropped when the request ends


class RestoreResult(Message):
    request_id: str
    fetched: int                  # tokens of KV fetched from the store
    recomputed: int               # tokens after them: their KV is for the decode to replay
    fetch_ms: float


class AbortRequest(Message):
    """Free a request's KV room. With an `attempt`, only the room that /reserve call took: the
    gateway gave the call up (unanswered), so it may not have come yet; if it comes later it is
    refused, where it used to hold its room until --reservation-ttl-s."""

    request_id: RequestId
    attempt: RequestId | None = None


class DropRequest(Message):
    """Free a request's replica on a cache store. With an epoch, only a replica of that epoch or
    older is dropped: a fenced owner cleaning up must not drop its successor's replica."""

    request_id: RequestId
    epoch: int | None = Field(None, ge=0)


class AbortResult(Message):
    request_id: str
    found: bool


class PrefixCacheReset(Message):
    """POST /prefix_cache/reset's answer: what the service's prefix cache forgot (0, 0 without one)."""
    blocks: int  # KV blocks of --block-size prompt tokens
    bytes: int   # their KV, in host memory


def cluster_status(services: list[ServiceInfo], now: float) -> dict:
    """What `GET /cluster` answers; `dejavu status --json` prints its "services". One entry per live
    service, sorted by (kind, id); lease_age_s is the time since it last renewed its lease (s, as
    seen by `now`'s clock); model, dtype, kv_address/kv_transport and colocated (true) only where the service
    has them; a token pipeline's head and stages: pipeline, stages, layers [start, end) and stage (not on the head)."""
    rows = [_status_row(s, now) for s in sorted(services, key=lambda s: (s.kind.value, s.id))]
    counts = {k.value: sum(s.kind == k for s in services) for k in ServiceKind}
    return {"services": rows, "counts": counts}


def _status_row(s: ServiceInfo, now: float) -> dict:
    row = s.model_dump(mode="json", include={"kind", "id", "url", "host", "pid", "active_requests",
                                             "kv_bytes_used", "kv_bytes_free"})
    optional = {"model": s.model, "dtype": s.dtype, "kv_address": s.kv_address, "kv_transport": s.kv_transport}
    if s.kind == ServiceKind.TOKEN:
        optional["colocated"] = s.colocated
    if s.stages > 1:  # a token pipeline's head or stage
        optional.update(pipeline=s.pipeline, stage=s.stage or None, stages=s.stages, layers=[s.layer_start, s.layer_end])
    return {**row, "lease_age_s": round(now - s.renewed_at, 3), **{k: v for k, v in optional.items() if v}}
