"""Redis restarted empty (`redis-cli SHUTDOWN NOSAVE`, then started again) or paused (SIGSTOP)
past the lease TTL, mid-stream (issue #10 item 9): the stream goes on without a failover and the
services register again. After a restart replication goes on too: when the token service is then
killed, the request resumes from a replica recorded after the restart; the text equals HF `generate`.

Before, the owner's first index update after a restart found no record and read it as "fenced":
it stopped replicating for good, and the kill cost a re-prefill."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest
import redis as redis_lib

from dejavu.cluster import Cluster
from dejavu.redis_server import RedisServer
from tests.cluster.conftest import CLUSTER_ENV, metric
from tests.cluster.test_failover import PROMPT, assert_no_kv_held_on, serving, stream

MAX_TOKENS = 900


@pytest.fixture
def cluster(tiny_model_path):
    server = RedisServer()
    # Leases renewed every 0.25 s: the services are listed again within ~0.3 s of a restart, and
    # each decode step waits 2 ms more (900 tokens: ~4 s on the tiny model, not ~2): before both,
    # the request could end before the test saw everyone registered again, and there was no owner
    # left to kill (CI failed so once).
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_TOKEN_TIMEOUT_S": "3", "DEJAVU_REPLICATE_EVERY": "4",
           "DEJAVU_LEASE_RENEW_S": "0.25", "DEJAVU_INJECT_STEP_DELAY_MS": "2"}
    c = Cluster(str(tiny_model_path), port=0, token_services=2, cache_stores=1, redis_url=server.url, env=env,
                echo_logs=False)
    c.redis_server = server
    try:
        c.start()
        yield c
    finally:
        c.stop()
        c.redis_server.stop()


def restart(cluster) -> None:
    port = cluster.redis_server.port
    subprocess.run(["redis-cli", "-p", str(port), "SHUTDOWN", "NOSAVE"], capture_output=True, timeout=10)
    cluster.redis_server.proc.wait(10)
    cluster.redis_server = RedisServer(port=port)


def pause(cluster) -> None:
    cluster.redis_server.proc.send_signal(signal.SIGSTOP)
    time.sleep(3.0 + 2.0)  # past the lease TTL (3 s): every lease has lapsed when Redis wakes up
    cluster.redis_server.proc.send_signal(signal.SIGCONT)


def replicated_after_the_outage(cluster) -> None:
    """Wait until Redis records a replicated index again, and every service is registered."""
    client = redis_lib.Redis.from_url(cluster.redis_server.url, decode_responses=True)
    deadline = time.monotonic() + 20
    while True:
        keys = client.keys("dejavu:req:*")
        index = int(client.hget(keys[0], "replicated") or 0) if keys else 0
        registered = len(client.smembers("dejavu:svcs"))
        if index > 0 and registered == 5:  # gateway, prompt, 2 token services, cache store
            return
        assert time.monotonic() < deadline, f"replication did not resume: index {index}, {registered} services"
        time.sleep(0.05)


def test_a_redis_restart_stops_neither_the_stream_nor_replication(cluster, tiny_oracle):
    victims = []

    def restart_then_kill(c):
        restart(c)
        replicated_after_the_outage(c)
        assert metric(c.url, "dejavu_gateway_recoveries_total" + '{path="replica"}') == 0, "a false failover"
        victims.append(serving(c))
        c.kill(victims[-1], signal.SIGKILL)

    ids = tiny_oracle.tokenizer(PROMPT)["input_ids"]
    want, n = tiny_oracle.text(ids, MAX_TOKENS)
    text, usage, _ = stream(cluster, {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
                            at={10: restart_then_kill})
    assert victims, "the owner was never killed"
    assert text == want and usage["completion_tokens"] == n
    assert metric(cluster.url, "dejavu_gateway_recoveries_total" + '{path="replica"}') == 1
    assert metric(cluster.url, "dejavu_gateway_recoveries_total" + '{path="reprefill"}') == 0
    assert_no_kv_held_on(cluster)


def test_a_redis_paused_past_the_lease_ttl_costs_no_stream(cluster, tiny_oracle):
    """Every lease lapses the moment Redis wakes up; nothing in flight is taken for dead, the
    services register again, and the next request is served."""
    ids = tiny_oracle.tokenizer(PROMPT)["input_ids"]
    want, n = tiny_oracle.text(ids, MAX_TOKENS)
    text, usage, _ = stream(cluster, {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}, at={10: pause})
    assert text == want and usage["completion_tokens"] == n
    for path in ("replica", "reprefill"):
        assert metric(cluster.url, "dejavu_gateway_recoveries_total" + f'{{path="{path}"}}') == 0, "a false failover"
    assert all(c.proc.poll() is None for c in cluster.children)
    deadline = time.monotonic() + 20
    while (resp := httpx.post(cluster.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8,
                                                                     "temperature": 0}, timeout=30)).status_code != 200:
        assert resp.status_code == 503 and time.monotonic() < deadline, resp.text  # until they registered again
        time.sleep(0.2)
    assert_no_kv_held_on(cluster)
