"""A gateway told to stop (SIGTERM: how docker, compose and Kubernetes stop it) takes no new
request and lets those in flight run for --stop-grace-s; one still running then ends with a 503
`shutting_down` (a stream's last event, then [DONE]), never a connection cut mid-body (a probe:
httpx's "incomplete chunked read", curl's exit 18, on every stream open at a stop)."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import redis

from common.metadata import PREFIX
from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV, metric


def test_a_stopping_gateway_ends_what_is_still_running_with_an_error_not_a_cut(tiny_model_path, redis_server):
    env = {**CLUSTER_ENV, "DEJAVU_STOP_GRACE_S": "2", "DEJAVU_INJECT_STEP_DELAY_MS": "20"}  # a stream outlasts it
    with Cluster(str(tiny_model_path), port=0, cache_stores=0, redis_url=redis_server.url, env=env,
                 echo_logs=False) as cluster:
        gateway, token = cluster.of("gateway")[0], cluster.of("token")[0]
        body = {"prompt": "Once upon a time", "max_tokens": 900, "temperature": 0, "ignore_eos": True}
        whole, events, stopped_at = [], [], None
        waiting = threading.Thread(target=lambda: whole.append(
            httpx.post(cluster.url + "/v1/completions", json=body, timeout=60)))
        with httpx.stream("POST", cluster.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
            stream_id = resp.headers["x-request-id"]
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        waiting.start()  # a request that is not streamed, in flight too
                    if len(events) == 5:
                        deadline = time.monotonic() + 30
                        while metric(cluster.url, "dejavu_gateway_in_flight_requests") < 2:
                            assert time.monotonic() < deadline and not whole, "the second request is not in flight"
                            time.sleep(0.05)
                        gateway.proc.send_signal(signal.SIGTERM)
                        stopped_at = time.monotonic()
        ended_after = time.monotonic() - stopped_at
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable", error
        assert len(events) > 20 and 1.5 < ended_after < 6  # tokens went on for the grace (20 ms a step)
        waiting.join(30)
        assert whole[0].status_code == 503 and whole[0].json()["error"]["code"] == "shutting_down", whole[0].text
        assert gateway.proc.wait(10) in (0, -signal.SIGTERM)  # (uvicorn ends by the signal it caught)
        records = redis.Redis.from_url(redis_server.url, decode_responses=True)
        for resp_id in (stream_id, whole[0].headers["x-request-id"]):  # each an error, not a client's leaving
            assert records.hget(PREFIX + "req:" + resp_id, "status") == "error", resp_id
        deadline = time.monotonic() + 10  # the gateway aborted both on its way out: no KV left
        while metric(token.url, "dejavu_token_sequences") > 0:
            assert time.monotonic() < deadline, "the token service still holds the requests' KV"
            time.sleep(0.1)
