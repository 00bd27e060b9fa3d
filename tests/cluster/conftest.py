"""Clusters of real processes (Redis, token, prompt, cache store, gateway) for the cluster tests."""

from __future__ import annotations

import re

import httpx
import pytest

from dejavu.cluster import Cluster

# Every KV payload through the shared-memory rings (common/kv/shm.py): the tiny model's are smaller
# than the 64 KiB from which the services use them by default. test_transport covers rings off.
CLUSTER_ENV = {"DEJAVU_MAX_SEQS": "8", "DEJAVU_MAX_MODEL_LEN": "1024", "DEJAVU_THREADS": "1",
               "DEJAVU_LOG_LEVEL": "info", "DEJAVU_KV_SHM_MIN_KIB": "0"}


@pytest.fixture(scope="module", params=["tcp", "ucx"])
def tiny_cluster(request, tiny_model_path, redis_server):
    """The tiny model behind the full disaggregated path, once per KV transport."""
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": request.param}
    with Cluster(str(tiny_model_path), port=0, cache_stores=1, redis_url=redis_server.url, env=env,
                 echo_logs=False) as cluster:
        cluster.transport = request.param
        yield cluster
    redis_server_flush(redis_server)


def redis_server_flush(server) -> None:
    import redis

    redis.Redis.from_url(server.url).flushdb()


def metric(url: str, name: str) -> float:
    """One unlabelled sample from a service's Prometheus /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    if match is None:
        raise AssertionError(f"metric {name} not found at {url}/metrics")
    return float(match.group(1))


# Variants the default run (CI) leaves to the full one (`pytest -m 'full or not full'`), to keep CI
# within ~25 minutes: each is covered in another form by the default run, named beside it. Listed by
# id because each pairs a fixture's parameter with a test's, which pytest.param cannot mark.
FULL_ONLY = {
    # every pipeline layout still loses a stage in the default run, and each kind of victim is killed
    # in at least two layouts (the 3-stage one loses its last and its middle stage)
    "test_pipeline.py::test_a_stage_killed_mid_stream_costs_a_pause[2-stages-tcp-last]":
        "a last stage killed: 2-stages-colocated, 3-stages-ucx-swap-2-prompt-stages",
    "test_pipeline.py::test_a_stage_killed_mid_stream_costs_a_pause[2-stages-colocated-head-or-middle]":
        "a head killed: 2-stages-tcp, 2-stages-tcp-swap-3-prompt-stages",
    "test_pipeline.py::test_a_stage_killed_mid_stream_costs_a_pause[2-stages-tcp-swap-3-prompt-stages-last]":
        "a last stage killed with --swap: 3-stages-ucx-swap-2-prompt-stages",
    "test_pipeline.py::test_seeded_sampling_is_identical_across_a_stage_failure[2-stages-tcp]":
        "seeded across a stage failure: 2-stages-colocated, 3-stages-ucx-swap-2-prompt-stages",
    "test_pipeline.py::test_seeded_sampling_is_identical_across_a_stage_failure[2-stages-tcp-swap-3-prompt-stages]":
        "seeded across a stage failure with --swap: 3-stages-ucx-swap-2-prompt-stages",
    # a hung token service is detected the same way whatever the recovery path; [replica-hung] stays
    # in the default run: only there does the woken owner find a store that refuses it as fenced
    "test_failover.py::test_greedy_stream_survives_a_token_service_failure[reprefill-hung]":
        "hung: [replica-hung]; the re-prefill path: [reprefill-killed]",
    # with no token service left the request ends in an error event, whichever path it was on
    "test_failover.py::test_a_request_that_cannot_be_saved_ends_with_an_error_event[reprefill]":
        "the same error event: [replica]",
    # an API's stream meets the recovery below it, the same whichever path that takes: each API keeps
    # one path (two each), and the paths themselves are checked on /v1/completions, greedy and seeded
    "test_failover.py::test_a_responses_api_stream_survives_a_token_service_failure[reprefill]":
        "Responses: [replica]; the re-prefill path: test_seeded_sampling_is_identical_across_a_failover[reprefill]",
    "test_failover.py::test_an_anthropic_messages_stream_survives_a_token_service_failure[replica]":
        "Messages: [reprefill]; the replica path: test_seeded_sampling_is_identical_across_a_failover[replica]",
    "test_failover.py::test_an_sglang_generate_stream_survives_a_token_service_failure[reprefill]":
        "/generate: [replica]; the re-prefill path: test_seeded_sampling_is_identical_across_a_failover[reprefill]",
    "test_failover.py::test_the_choices_of_one_request_survive_a_token_service_failure[replica]":
        "n = 2: [reprefill]; the replica path: test_seeded_sampling_is_identical_across_a_failover[replica]",
}


@pytest.hookimpl(tryfirst=True)  # before the -m selection reads the marks
def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.rpartition("cluster/")[2] in FULL_ONLY:
            item.add_marker(pytest.mark.full)
