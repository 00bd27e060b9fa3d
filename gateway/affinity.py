"""Prefix-aware routing: send a prompt to the service that prefilled its prefix last, where that
service's prefix cache (engine/prefix_cache.py) most likely still holds the KV, so a chat's later
turns are not computed again on another service. Dynamo's KV-aware router and SGLang's
cache-aware router do this from what each worker reports it holds; here the gateway remembers
where it sent each prefix instead: no service reports anything, and a guess that turns out wrong
(the blocks evicted, the service restarted) costs what no routing costs, a prefill of the whole
prompt.

A prompt's prefixes are its whole blocks of BLOCK_TOKENS tokens, each keyed by a hash of its tokens
and every token before it (as the caches key theirs); the gateway keeps the service of the last
prefill of each key, least recently used out past `capacity` keys. The home of a prompt is the
service of its longest remembered prefix, if that prefix is worth a detour: at least MIN_TOKENS
and a quarter of the prompt (a chat template's system header alone is a block or two, and would
make every new conversation follow the last one). Load comes first: the router takes the home
only while it has at most SLACK requests in flight more than the least loaded candidate
(gateway/router.py).
"""

from __future__ import annotations

import collections

from common.protocol import block_keys

BLOCK_TOKENS = 16  # the services' default --block-size: a prefix shorter than that is no reason to route
SLACK = 2          # requests in flight a home may have beyond the least loaded service's (a judgment, not measured)
MIN_TOKENS = 64    # the shortest prefix worth routing for (a judgment: longer than chat templates' headers)


class PrefixHomes:
    def __init__(self, capacity: int = 1 << 17):
        self.capacity = capacity  # keys: 16 bytes and a service id each, ~200 bytes with the dict's own
        self.homes: collections.OrderedDict[bytes, str] = collections.OrderedDict()  # least recently used first

    def home(self, ids: list[int]) -> tuple[str | None, int]:
        """(the service that last prefilled the longest remembered prefix of `ids`, its tokens)."""
        found, length = None, 0
        for i, key in enumerate(block_keys(ids, BLOCK_TOKENS)):
            service = self.homes.get(key)
            if service is None:
                break
            found, length = service, (i + 1) * BLOCK_TOKENS
        return found, length

    def home_worth_it(self, ids: list[int]) -> str | None:
        """The home of `ids` where its prefix there is at least MIN_TOKENS and a quarter of it."""
        found, length = self.home(ids)
        return found if length >= max(MIN_TOKENS, len(ids) / 4) else None

    def clear(self) -> None:
        """The services' caches were reset: no prefix has a home."""
        self.homes.clear()

    def record(self, ids: list[int], service_id: str) -> None:
        """`service_id` has prefilled `ids`: it is the home of each of its prefixes now."""
        for key in reversed(block_keys(ids, BLOCK_TOKENS)):  # the first blocks most recently used: evicted last
            self.homes[key] = service_id
            self.homes.move_to_end(key)
        while len(self.homes) > self.capacity:
            self.homes.popitem(last=False)
