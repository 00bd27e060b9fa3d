"""Settings: the one module that reads the environment.

Every service has one frozen dataclass. A field `foo_bar` is set, highest precedence first, by
the CLI flag `--foo-bar`, the environment variable `DEJAVU_FOO_BAR`, or its default. A tuple field
(e.g. `api_keys`) takes a repeatable flag of its own name (`--api-key K1 --api-key K2`) or a
comma-separated variable (`DEJAVU_API_KEYS=K1,K2`). Values are
validated when the dataclass is built; a bad one stops the service at start with a message that
names the flag and the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, TypeVar

ENV_PREFIX = "DEJAVU_"
SECRETS = ("api_keys", "cluster_token")  # never printed in an error
T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a bad value; the message names the flag and the environment variable."""


def setting(default: Any, help: str, choices: tuple | None = None, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # what a --redis-url may start with
STOP_GRACE_S = 5.0  # after SIGTERM/SIGINT, what is open may go on this long (the gateway's: --stop-grace-s)


@dataclass(frozen=True)
class ServiceSettings:
    """What every service process has."""

    host: str = setting("127.0.0.1", "interface to bind the HTTP server to")
    port: int = setting(0, "HTTP port (0 picks a free one)")
    advertise_host: str = setting("", "host other services use to reach this one (default: --host, or the hostname when --host is 0.0.0.0)")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis holding request metadata and the service registry")
    service_id: str = setting("", "unique id in the registry (default: KIND-HOSTNAME-PID)")
    lease_ttl_s: float = setting(3.0, "a service whose lease is older than this is dead (s)")
    lease_renew_s: float = setting(1.0, "how often the lease is renewed (s)")
    log_level: str = setting("info", "logging level", ("debug", "info", "warning", "error"))
    cluster_token: str = setting("", "the cluster's shared secret: required on every internal HTTP endpoint "
                                 "(X-Dejavu-Cluster-Token) and in the KV link's handshake; every service of "
                                 "a cluster needs the same one (dejavu up generates one; empty: none)")

    def __post_init__(self) -> None:
        _check(self, 0 <= self.port <= 65535, "port", "must be in 0..65535")
        _check(self, self.cluster_token.isascii() and self.cluster_token.isprintable() and " " not in self.cluster_token,
               "cluster_token", "must be printable ASCII without spaces (it travels in an HTTP header)")
        _check(self, self.lease_renew_s > 0, "lease_renew_s", "must be > 0")
        _check(self, self.lease_ttl_s > self.lease_renew_s, "lease_ttl_s", "must be greater than --lease-renew-s")
        _check(self, self.redis_url.startswith(REDIS_SCHEMES), "redis_url",
               "must start with redis://, rediss:// or unix://")

    @property
    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        return socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host


@dataclass(frozen=True)
class KVSettings(ServiceSettings):
    """Services that hold KV links: those that run the model, and cache stores."""

    kv_transport: str = setting("ucx", "KV transport", ("ucx", "tcp"))
    kv_port: int = setting(0, "KV transport port (0 picks a free one)")
    kv_shm_mib: int = setting(32, "shared-memory ring (MiB) each way of a KV link whose peer is on this host, made "
                              "when the link first sends a payload of --kv-shm-min-kib or more: such payloads "
                              "skip the loopback (x86-64; 0: never)")
    kv_shm_min_kib: int = setting(64, "smallest KV payload (KiB) that goes through the shared-memory ring: a smaller "
                                  "one rides in its frame (0: every payload)")
    kv_cma: bool = setting(True, "a KV link whose peer is on this host and may read this process's memory "
                           "(process_vm_readv: same user, no Yama ptrace restriction, one PID namespace) has its "
                           "payloads of 8 MiB or more read straight from the sender's memory, one copy, instead "
                           "of through the ring's two (false: rings only)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, 0 <= self.kv_port <= 65535, "kv_port", "must be in 0..65535")
        _check(self, 0 <= self.kv_shm_mib <= 1024, "kv_shm_mib", "must be in 0..1024")
        _check(self, 0 <= self.kv_shm_min_kib <= 1 << 20, "kv_shm_min_kib", "must be in 0..1048576")


@dataclass(frozen=True)
class ModelSettings(KVSettings):
    """Services that run the model."""

    model: str = setting("smollm2", "'smollm2' (the bundled model) or a Hugging Face model folder")
    max_model_len: int = setting(2048, "longest sequence (prompt + output tokens) served")
    threads: int = setting(0, "torch CPU threads (0: torch's default)")
    cpu_turns: str = setting("", "a lock file (and FILE.queue beside it) shared by the engines of one CPU host: "
                             "each forward waits for its turn on the cores (dejavu up sets it when its "
                             "--cpu-placement is turns, or auto on a small host; empty: no turns)")
    dtype: str = setting("auto", "weights, activations and KV: auto is the model's own dtype on CUDA and float32 "
                         "on CPU; every service of a cluster must use the same", ("auto", "float32", "bfloat16", "float16"))
    block_size: int = setting(16, "tokens per block of the paged KV pool")
    inject_kv_faults: float = setting(0.0, "testing: this fraction of outgoing KV transfers fail on purpose")
    stages: int = setting(1, "pipeline stages of this service: the model's layers split evenly over this many "
                          "processes (Llama-family models only), activations handed on over the KV transport; "
                          "stage 0 is the service the gateway sees, stages 1.. are started with --stage")
    stage: int = setting(0, "with --stages: which stage this process is (0: the head, which serves the API; 1..: a "
                         "stage worker that computes its layers for the head)")
    pipeline: str = setting("", "with --stages: the pipeline's id, the same on all of its stages (they find each "
                            "other by it in the registry)")
    prefix_cache_mib: int = setting(1024, "host memory for the KV of prompt blocks this service prefilled (a token "
                                    "service: with --colocated): a prompt that starts with the same tokens computes "
                                    "only the rest (0: off; not on pipelines, --stages)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, 16 <= self.max_model_len <= 1 << 20, "max_model_len", "must be in 16..1048576")
        _check(self, self.threads >= 0, "threads", "must be >= 0")
        _check(self, 1 <= self.block_size <= 1024, "block_size", "must be in 1..1024")
        _check(self, self.prefix_cache_mib >= 0, "prefix_cache_mib", "must be >= 0 (0: off)")
        _check(self, 0.0 <= self.inject_kv_faults < 1.0, "inject_kv_faults", "must be in [0, 1)")
        _check(self, 1 <= self.stages <= 64, "stages", "must be in 1..64")
        _check(self, 0 <= self.stage < self.stages, "stage", f"must be in 0..{self.stages - 1} (--stages {self.stages})")
        _check(self, self.stages == 1 or self.pipeline != "", "pipeline", "must be set when --stages is more than 1")
        _check(self, self.pipeline.isascii() and self.pipeline.replace("-", "").replace("_", "").isalnum()
               or self.pipeline == "", "pipeline", "must be letters, digits, - and _")


@dataclass(frozen=True)
class PromptSettings(ModelSettings):
    max_batch_tokens: int = setting(4096, "most prompt tokens prefilled in one forward pass")
    ack_timeout_s: float = setting(30.0, "how long to wait for the token service to acknowledge the KV (s)")
    kv_streaming: str = setting("layerwise", "when a prefill's KV goes out: each layer as soon as it is computed, "
                                "or all layers in one message once the last one is computed (for comparison)",
                                ("layerwise", "after_prefill"))
    kv_stream_layers: int = setting(0, "layer by layer: layers per KV message (1: each layer as soon as it is "
                                    "computed; 0: a fifth of the model's layers, rounded up: 6 of SmolLM2's 30)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, self.max_batch_tokens >= 16, "max_batch_tokens", "must be >= 16")
        _check(self, self.kv_stream_layers >= 0, "kv_stream_layers", "must be >= 0")


@dataclass(frozen=True)
class TokenSettings(ModelSettings):
    max_seqs: int = setting(16, "most sequences holding KV here at once (the largest decode batch)")
    kv_blocks: int = setting(0, "blocks of --block-size tokens in the KV pool (0: room for --max-seqs sequences of "
                             "--max-model-len tokens); a request is admitted while blocks for its prompt + "
                             "max_tokens are free")
    reservation_ttl_s: float = setting(120.0, "KV room reserved but never used is freed after this (s)")
    replicate_every: int = setting(16, "replicate a request's KV to a cache store every this many new tokens")
    colocated: bool = setting(False, "prefill requests here too: the gateway then sends this service the whole "
                              "request, no prompt service (colocated mode)")
    max_batch_tokens: int = setting(512, "with --colocated: most prompt tokens prefilled between two decode steps "
                                    "(at least one prompt; a longer batch stalls running decodes longer)")
    compile: bool = setting(False, "run decode steps of Llama-family models through torch.compile (measured no "
                            "faster on a 2-core CPU, 0.90-1.04x, for 35-62 s more at each start and restart)")
    enforce_eager: bool = setting(False, "on a GPU, run every decode step eagerly, kernel by kernel, instead of "
                                  "replaying a CUDA graph of it (captured at first use for each bucket of batch size "
                                  "and KV length: 1, 2, 4, multiples of 8 rows; 64-512, multiples of 512 up to 4096, "
                                  "then a quarter more each time), as vLLM's --enforce-eager")
    microbatches: int = setting(0, "decode steps in flight at once, each over its share of the running sequences "
                                "(0: one per stage of --stages, so every stage computes at once; 1: one step at a "
                                "time; more than the stages: with --swap, more sequences than the device holds)")
    kv_device_bytes: int = setting(0, "the device's KV budget in bytes, per process (each stage of a pipeline: the "
                                   "largest stage's layers count): without --swap the KV pool is this big (instead "
                                   "of --kv-blocks); with --swap it holds the steps being computed, and the pool "
                                   "lives in host memory (0: no budget)")
    inject_step_delay_ms: float = setting(0.0, "testing: a pause of this many ms after every decode step, the "
                                          "event loop serving meanwhile (paces streams that fault-injection tests act on)")
    swap: bool = setting(False, "microbatch KV swapping (DéjàVu): every sequence's KV in host memory (--kv-blocks), "
                         "only the microbatch being computed and the next one, prefetched, in the device's "
                         "--kv-device-bytes; each step copies back only the tokens it wrote. Needs --kv-device-bytes; "
                         "not with --colocated")

    @property
    def num_blocks(self) -> int:
        return self.kv_blocks or self.max_seqs * -(-self.max_model_len // self.block_size)

    @property
    def cuda_graphs(self) -> bool | None:
        """ModelRunner's cuda_graphs: None (wherever they run: our forward on CUDA), or off."""
        return False if self.enforce_eager else None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, 1 <= self.max_seqs <= 4096, "max_seqs", "must be in 1..4096")
        _check(self, self.kv_blocks >= 0, "kv_blocks", "must be >= 0")
        _check(self, self.num_blocks * self.block_size >= self.max_model_len, "kv_blocks",
               f"must hold one sequence of --max-model-len {self.max_model_len} tokens "
               f"(at least {-(-self.max_model_len // self.block_size)} blocks of {self.block_size})")
        _check(self, self.reservation_ttl_s > 0, "reservation_ttl_s", "must be > 0")
        _check(self, self.replicate_every >= 1, "replicate_every", "must be >= 1")
        _check(self, self.max_batch_tokens >= 16, "max_batch_tokens", "must be >= 16")
        _check(self, 0 <= self.microbatches <= 64, "microbatches", "must be in 0..64")
        _check(self, self.kv_device_bytes >= 0, "kv_device_bytes", "must be >= 0")
        _check(self, 0.0 <= self.inject_step_delay_ms <= 10_000, "inject_step_delay_ms", "must be in 0..10000")
        _check(self, not (self.kv_device_bytes and self.kv_blocks and not self.swap), "kv_device_bytes",
               "without --swap it sizes the KV pool: give it or --kv-blocks, not both")
        _check(self, self.kv_device_bytes > 0 or not self.swap, "swap", "needs --kv-device-bytes (the device's budget)")
        _check(self, not (self.swap and self.colocated), "swap", "not with --colocated (a prompt's chunks would need "
               "device room beside the microbatches')")


@dataclass(frozen=True)
class GatewaySettings(ServiceSettings):
    port: int = setting(8000, "HTTP port")
    model: str = setting("smollm2", "'smollm2' (the bundled model) or a Hugging Face model folder")
    served_model_name: str = setting("", "model name clients use (default: 'smollm2' or the folder name)")
    max_model_len: int = setting(2048, "longest sequence (prompt + output tokens) served")
    max_body_bytes: int = setting(4 << 20, "largest request body accepted (bytes)")
    max_tokens_default: int = setting(256, "max_tokens when a chat request gives none (a completion's default is "
                                    "16, as OpenAI's)")
    request_timeout_s: float = setting(600.0, "longest a request may take end to end (s)")
    route_timeout_s: float = setting(300.0, "longest a request waits in the admission queue for KV room on a token "
                                     "service before a 429 (s)")
    max_queued_requests: int = setting(1024, "requests that may wait for KV room at once; more get a 429 with "
                                       "Retry-After (a burst's, once a try finds no room)")
    token_timeout_s: float = setting(10.0, "a decode stream silent this long means a hung token service: resume elsewhere (s)")
    resume_wait_s: float = setting(60.0, "how long a request whose token service failed waits for another with room, "
                                   "or whose prefill failed on every prompt service waits for one that answers (one "
                                   "that failed may be starting again), before it ends in an error; a new request "
                                   "that finds no token service waits as long from when the gateway first found "
                                   "none (s)")
    resume_attempts: int = setting(3, "times token services may fail one request before it ends in an error "
                                      "(0: fault tolerance off, a failure ends the request)")
    stop_grace_s: float = setting(STOP_GRACE_S, "after SIGTERM or SIGINT, how long requests in flight may go on (new ones are "
                                  "no longer taken); one still running then ends with a 503 shutting_down (a "
                                  "stream's last event, then [DONE]) instead of a cut connection; keep it under "
                                  "the platform's stop timeout (docker and compose: 10 s) (s)")
    tool_call_parser: str = setting("auto", "how chat's tool_choice 'auto' finds tool calls in the output: hermes "
                                    "(<tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>, as Qwen2.5/3 and "
                                    "Hermes write them), llama3_json (an output that starts with {\"name\": ..., "
                                    "\"parameters\": ...}, Llama 3.1-3.3), mistral ([TOOL_CALLS] and the calls), none "
                                    "(tool_choice 'auto' is a 400; 'required' and a named function work with any "
                                    "model), auto (from what the model's chat template writes: <tool_call>, "
                                    "[TOOL_CALLS] or <|python_tag|>; else none)",
                                    choices=("auto", "hermes", "llama3_json", "mistral", "none"))
    reasoning_parser: str = setting("auto", "on chat, the text between <think> and </think> as the message's "
                                    "reasoning_content (and reasoning), the rest as its content: qwen3 and "
                                    "deepseek_r1 read alike (the prompt says whether the output starts inside the "
                                    "thinking), none leaves the text whole, auto is qwen3 where the model's chat "
                                    "template writes </think>, else none", choices=("auto", "deepseek_r1", "qwen3", "none"))
    prefix_routing: bool = setting(True, "send a prompt to the prompt service (colocated: the token service) that "
                                   "prefilled its longest prefix last (of 64 tokens and a quarter of the prompt at "
                                   "least), whose prefix cache likely holds it, unless that one has more than 2 "
                                   "requests in flight beyond the least loaded")
    api_keys: tuple[str, ...] = setting((), "an API key clients must send as 'Authorization: Bearer KEY' (or "
                                        "'x-api-key: KEY') on every route but /health and /metrics (repeat for "
                                        "several; none: no authentication)", flag="--api-key")
    allowed_origins: tuple[str, ...] = setting(("auto",), "an origin web pages may call the API from (CORS: the "
                                               "browser's preflight answered, Access-Control-Allow-Origin sent), as "
                                               "scheme://host[:port]; '*': any (vLLM's and SGLang's default); auto: "
                                               "any where --api-key is set, none without keys (a page must not drive "
                                               "a keyless server on your machine); repeat for several; none (an empty "
                                               "DEJAVU_ALLOWED_ORIGINS): no CORS", flag="--allowed-origin")
    responses_ttl_s: float = setting(3600.0, "how long a /v1/responses answer is kept in Redis, for "
                                     "previous_response_id and GET /v1/responses/{id} (s; 0: none kept, and 'store' "
                                     "is answered false)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, 16 <= self.max_model_len <= 1 << 20, "max_model_len", "must be in 16..1048576")
        _check(self, self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        _check(self, self.max_tokens_default >= 1, "max_tokens_default", "must be >= 1")
        _check(self, 0 <= self.responses_ttl_s < 10 ** 9, "responses_ttl_s", "must be >= 0 (0: no response kept) "
               "and finite")
        for name in ("request_timeout_s", "route_timeout_s", "token_timeout_s", "resume_wait_s"):
            _check(self, getattr(self, name) > 0, name, "must be > 0")
        _check(self, 0 <= self.stop_grace_s <= 3600, "stop_grace_s", "must be in 0..3600")
        _check(self, self.resume_attempts >= 0, "resume_attempts", "must be >= 0")
        _check(self, self.max_queued_requests >= 0, "max_queued_requests", "must be >= 0 (0: no queue, a 429 at once)")
        _check(self, all(k and k.isascii() and k.isprintable() and " " not in k for k in self.api_keys), "api_keys",
               "each key must be non-empty printable ASCII without spaces (it travels in an HTTP header)")

        for origin in self.allowed_origins:
            _check(self, origin in ("*", "auto") or re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin) is not None,
                   "allowed_origins", f"{origin!r}: an origin is scheme://host[:port] (no path, no trailing slash), "
                   "'*' or auto")

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))

    @property
    def cors_origins(self) -> list[str]:
        """The origins CORS lets call the API ([] for none): --allowed-origin, auto resolved."""
        if self.allowed_origins == ("auto",):
            return ["*"] if self.api_keys else []
        return [o for o in self.allowed_origins if o and o != "auto"]


@dataclass(frozen=True)
class CacheStoreSettings(KVSettings):
    memory_bytes: int = setting(2 << 30, "replica bytes kept in host memory, a hard cap: past it the oldest spill to "
                                "disk, and when the disk takes no more a replica is refused (its owner uses "
                                "another store)")
    spill_dir: str = setting("", "where replicas spill past --memory-bytes (default: a temporary folder)")
    replica_ttl_s: float = setting(600.0, "a replica nobody wrote to or fetched for this long is dropped: its owner "
                                   "and its gateway both died (a live owner writes every --replicate-every tokens) (s)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, self.memory_bytes >= 0, "memory_bytes", "must be >= 0 (0: every replica goes to disk)")
        _check(self, self.replica_ttl_s > 0, "replica_ttl_s", "must be > 0")


def kv_device_bytes_needed(max_model_len: int, block_size: int, block_bytes: int, swap: bool) -> int:
    """The least --kv-device-bytes a token engine accepts: one sequence of --max-model-len in whole
    blocks (of `block_bytes`: a block of the largest stage's layers), two with --swap (the step
    computing and the next one each get half the device)."""
    return -(-max_model_len // block_size) * (2 if swap else 1) * block_bytes


def cache_dir() -> str:
    """Where converted models live: $DEJAVU_CACHE_DIR, else $XDG_CACHE_HOME/dejavu, else ~/.cache/dejavu."""
    return os.environ.get(env_name("cache_dir")) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dejavu")


def _check(obj: Any, ok: bool, name: str, why: str) -> None:
    if not ok:
        value = "(secret, not shown)" if name in SECRETS else repr(getattr(obj, name))
        flag = next(f for f in dataclasses.fields(obj) if f.name == name).metadata.get("flag") or flag_name(name)
        raise SettingsError(f"{flag} / {env_name(name)} = {value}: {why}")


def _convert(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if kind is bool:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise SettingsError(f"{flag_name(f.name)} / {env_name(f.name)} = {raw!r}: must be true or false")
        return raw.lower() in ("1", "true", "yes")
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{flag_name(f.name)} / {env_name(f.name)} = {raw!r}: must be {kind.__name__}") from None


def _is_tuple(f: dataclasses.Field) -> bool:
    return f.type is tuple or str(f.type).startswith("tuple")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        flag = {"nargs": "?", "const": "true"} if f.type in (bool, "bool") else {}  # --colocated = --colocated true
        if _is_tuple(f):
            flag = {"action": "append", "metavar": "KEY" if f.name.endswith("keys") else None}
        parser.add_argument(f.metadata.get("flag") or flag_name(f.name), dest=f.name, default=None,
                            choices=f.metadata["choices"],
                            help=f"{f.metadata['help']} [env {env_name(f.name)}] (default: {f.default!r})", **flag)
    return parser


def load(cls: type[T], argv: list[str] | None = None, prog: str = "", description: str = "",
         environ: dict[str, str] | None = None) -> T:
    """Build `cls` from CLI flags, then DEJAVU_* variables, then defaults. Raises SettingsError."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser(cls, prog, description).parse_args(argv or []))
    values = {}
    for f in dataclasses.fields(cls):
        raw = args.get(f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        if _is_tuple(f):  # repeated flags, or one comma-separated variable
            values[f.name] = tuple(x.strip() for item in ([raw] if isinstance(raw, str) else raw)
                                   for x in item.split(","))
            if raw == "":  # DEJAVU_API_KEYS= (set, empty): none
                values[f.name] = ()
            continue
        choices = f.metadata["choices"]
        if choices and raw not in choices:
            raise SettingsError(f"{flag_name(f.name)} / {env_name(f.name)} = {raw!r}: must be one of {', '.join(choices)}")
        values[f.name] = _convert(f, raw)
    return cls(**values)


def is_loopback(host: str) -> bool:
    """Whether `host` (an --host value) is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
