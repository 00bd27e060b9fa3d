"""What an operator sees of a running cluster: the gateway's GET /cluster and `dejavu status
[--json]`, both read from the Redis registry, list every service the cluster started, with fresh
leases."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

KINDS = ("cache_store", "gateway", "prompt", "token")  # the order /cluster sorts them in


def dejavu_status(redis_url: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dejavu", "status", "--redis-url", redis_url, *flags],
                          capture_output=True, text=True, timeout=60)


def assert_lists_every_child(services: list[dict], cluster) -> None:
    by_pid = {s["pid"]: s for s in services}
    assert sorted(by_pid) == sorted(c.pid for c in cluster.children), services
    for child in cluster.children:
        s = by_pid[child.pid]
        assert s["kind"] == child.kind and s["id"].startswith(child.name + "-") and s["url"] == child.url, s
        assert 0 <= s["lease_age_s"] < 5, s
        if child.kind in ("token", "cache_store"):  # they receive KV: an address to send it to
            assert s["kv_address"] and s["kv_transport"] == cluster.transport and s["kv_bytes_free"] > 0, s
    assert [(s["kind"], s["id"]) for s in services] == sorted((s["kind"], s["id"]) for s in services)


def test_get_cluster_lists_every_service(tiny_cluster):
    resp = httpx.get(tiny_cluster.url + "/cluster", timeout=10)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["counts"] == {"gateway": 1, "prompt": 1, "token": 1, "cache_store": 1, "stage": 0}
    assert [s["kind"] for s in body["services"]] == list(KINDS)
    assert_lists_every_child(body["services"], tiny_cluster)


def test_dejavu_status_lists_what_get_cluster_lists(tiny_cluster):
    done = dejavu_status(tiny_cluster.redis_url, "--json")
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)
    assert_lists_every_child(services, tiny_cluster)
    over_http = httpx.get(tiny_cluster.url + "/cluster", timeout=10).json()["services"]
    without_age = lambda rows: [{k: v for k, v in r.items() if k != "lease_age_s"} for r in rows]  # noqa: E731
    assert without_age(services) == without_age(over_http)  # an idle cluster: nothing else moves

    table = dejavu_status(tiny_cluster.redis_url)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["KIND", "ID", "URL", "PID", "ACTIVE", "KV", "USED", "KV", "FREE", "LEASE"]
    assert [line.split()[:4] for line in lines] == [[s["kind"], s["id"], s["url"], str(s["pid"])] for s in services]


def test_dejavu_status_without_redis_says_so():
    done = dejavu_status("redis://127.0.0.1:1/0", "--json")
    assert done.returncode == 1 and "Redis" in done.stderr and done.stdout == ""
