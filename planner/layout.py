"""A layout: how many prompt and token services, and the settings of theirs that the simulator uses.

    Layout.parse("1+1")          # 1 prompt service, 1 token service (bench.load's "disaggregated")
    Layout.parse("2+3")          # 2 prompt services, 3 token services
    Layout.parse("colocated")    # 1 token service that prefills its own requests (`--colocated`)
    Layout.parse("colocated:2")  # 2 of them
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# prompt_service/engine.py's TURN_TOKENS: a prompt forward's tokens when engines take turns on one
# host's cores. Copied, not imported: that module imports torch.
TURN_TOKENS = 512


@dataclass(frozen=True)
class Layout:
    prompt_services: int              # 0: colocated (token services prefill)
    token_services: int
    max_seqs: int = 16                # `dejavu up --max-seqs`: sequences per token service
    prompt_batch_tokens: int = 4096   # a prompt service's forward (DEJAVU_MAX_BATCH_TOKENS)
    chunk_tokens: int = 512           # colocated: prompt tokens per step (the token service's max_batch_tokens)
    shared_host: bool = False         # every engine takes turns on one machine's cores (--cpu-placement turns)

    def __post_init__(self) -> None:
        if self.prompt_services < 0 or self.token_services < 1:
            raise ValueError(f"a layout needs >= 0 prompt services and >= 1 token service, not "
                             f"{self.prompt_services}+{self.token_services}")
        if min(self.max_seqs, self.prompt_batch_tokens, self.chunk_tokens) < 1:
            raise ValueError("max_seqs, prompt_batch_tokens and chunk_tokens must be >= 1")

    @classmethod
    def parse(cls, spec: str, **settings) -> Layout:
        """"P+T" or "colocated[:T]"; raises ValueError with the forms it takes."""
        text = spec.strip().lower()
        try:
            if text.startswith("colocated"):
                count = text.removeprefix("colocated").removeprefix(":") or "1"
                return cls(0, int(count), **settings)
            prompts, tokens = text.split("+")
            if int(prompts) < 1:
                raise ValueError
            return cls(int(prompts), int(tokens), **settings)
        except ValueError:
            raise ValueError(f"layout {spec!r}: give P+T (prompt + token services, e.g. 1+1) or "
                             f"colocated[:T] (e.g. colocated:2)") from None

    def with_settings(self, **settings) -> Layout:
        return replace(self, **settings)

    @property
    def colocated(self) -> bool:
        return self.prompt_services == 0

    @property
    def name(self) -> str:
        if self.colocated:
            return "colocated" if self.token_services == 1 else f"colocated:{self.token_services}"
        return f"{self.prompt_services}+{self.token_services}"

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens in one prompt-service forward (a turn's worth on a shared host)."""
        return min(self.prompt_batch_tokens, TURN_TOKENS) if self.shared_host else self.prompt_batch_tokens

    def machines(self, stages: int = 1) -> int:
        """Machines it occupies: one when every engine shares one host, else one per service (a
        token service of `stages` stages: that many)."""
        return 1 if self.shared_host else self.prompt_services + self.token_services * stages
