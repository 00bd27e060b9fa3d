"""cluster_status: the body of GET /cluster and the rows of `dejavu status --json`."""

from __future__ import annotations

from common.protocol import ServiceInfo, ServiceKind, cluster_status

NOW = 1_700_000_000.0  # unix s


def info(kind: str, id: str, **fields) -> ServiceInfo:
    return ServiceInfo(kind=ServiceKind(kind), id=id, url=f"http://h:1/{id}", host="h", pid=len(id),
                       renewed_at=NOW - 0.25, **fields)


def test_sorted_by_kind_then_id_and_counted():
    status = cluster_status([info("token", "t-b"), info("token", "t-a"), info("gateway", "g"),
                             info("cache_store", "c")], NOW)
    assert [(s["kind"], s["id"]) for s in status["services"]] == [
        ("cache_store", "c"), ("gateway", "g"), ("token", "t-a"), ("token", "t-b")]
    assert status["counts"] == {"gateway": 1, "prompt": 0, "token": 2, "cache_store": 1, "stage": 0}


def test_a_row_has_the_lease_age_and_only_the_optional_fields_set():
    token = info("token", "t", model="/m", kv_address="h:9", kv_transport="ucx", active_requests=2,
                 kv_bytes_used=1 << 20, kv_bytes_free=3 << 20, max_model_len=1024, started_at=NOW - 60)
    row, = cluster_status([token], NOW)["services"]
    assert row == {"kind": "token", "id": "t", "url": "http://h:1/t", "host": "h", "pid": 1, "active_requests": 2,
                   "kv_bytes_used": 1 << 20, "kv_bytes_free": 3 << 20, "lease_age_s": 0.25, "model": "/m",
                   "kv_address": "h:9", "kv_transport": "ucx"}
    row, = cluster_status([info("cache_store", "c")], NOW)["services"]
    assert not {"model", "kv_address", "kv_transport"} & row.keys()


def test_no_services():
    assert cluster_status([], NOW) == {"services": [], "counts": {"gateway": 0, "prompt": 0, "token": 0,
                                                                   "cache_store": 0, "stage": 0}}


def test_a_token_pipeline_says_its_stages_and_layers():
    head = info("token", "t", pipeline="p", stages=2, layer_start=0, layer_end=15)
    stage = info("stage", "s", pipeline="p", stage=1, stages=2, layer_start=15, layer_end=30)
    rows = cluster_status([head, stage, info("token", "u")], NOW)["services"]
    assert [(r["id"], r.get("pipeline"), r.get("stage"), r.get("stages"), r.get("layers")) for r in rows] == [
        ("s", "p", 1, 2, [15, 30]), ("t", "p", None, 2, [0, 15]), ("u", None, None, None, None)]
