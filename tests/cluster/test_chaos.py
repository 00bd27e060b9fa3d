"""Chaos (issue #10's proof), the CI-sized run of bench.chaos, over TCP and over UCX: concurrent
streams on 3 token services, 2 prompt services and 2 cache stores (tiny model) while, at random
moments (seeded), token services are SIGKILLed, then a cache store, a prompt service, and Redis
restarts empty; killed services start again, as under `dejavu up`. Every request completes, every
greedy output equals its failure-free output, and once it is over no KV is held anywhere. The full
run (100 streams) is `dejavu bench chaos`, figures in docs/BENCHMARKS.md."""

from __future__ import annotations

import asyncio

import pytest

from bench.chaos import Plan, cluster_for, run
from tests.cluster.conftest import CLUSTER_ENV

PLAN = Plan(streams=36, max_tokens=96, token_kills=3, store_kills=1, prompt_kills=1, redis_restarts=1, seed=3)


@pytest.mark.parametrize("transport", [pytest.param("tcp", marks=pytest.mark.full), "ucx"])  # tcp: the full run only
def test_every_request_survives_the_chaos(tiny_model_path, transport):
    with cluster_for(str(tiny_model_path), transport, {**CLUSTER_ENV, "DEJAVU_MAX_SEQS": "16"}) as cluster:
        report = asyncio.run(run(cluster, PLAN, transport))
    summary = report.summary()
    assert [f.kind for f in report.faults].count("token") == 3 and len(report.faults) == 6, summary
    failed = [(s.index, s.error) for s in report.streams if s.error]
    assert not failed, f"{len(failed)} requests failed: {failed[:5]}"
    assert report.greedy_exact, [s.index for s in report.streams if s.body % 2 == 0 and not s.exact]
    assert all(s.tokens == PLAN.max_tokens for s in report.streams)
    assert sum(report.recoveries.values()) >= 3, summary  # every token kill cost its requests a resume
    assert not report.kv_held_after, report.kv_held_after
