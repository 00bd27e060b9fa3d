"""Two models on one Redis never mix KV (issue #10 item 16): engines publish a fingerprint of their
model's config and tokenizer, and a gateway routes only to engines of its own model; and of its own
internal protocol version, so that a rolling upgrade never pairs peers that misread each other."""

from __future__ import annotations

import json
import shutil

import pytest

from common import metadata
from common.model import model_fingerprint
from common.protocol import PROTOCOL, ServiceInfo, ServiceKind
from common.settings import GatewaySettings
from gateway.router import Router


def test_the_fingerprint_tells_models_apart_but_not_copies(tiny_model_path, bundled_path, tmp_path):
    tiny = model_fingerprint(tiny_model_path)
    assert tiny != model_fingerprint(bundled_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"], config["_name_or_path"] = "0.0.1", "/elsewhere/on/another/host"
    (copy / "config.json").write_text(json.dumps(config, indent=4))
    assert model_fingerprint(copy) == tiny  # same model, saved by another version, in another folder
    config["num_hidden_layers"] += 1
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) != tiny


def engine(kind: ServiceKind, name: str, model_id: str, protocol: int = PROTOCOL) -> ServiceInfo:
    return ServiceInfo(kind=kind, id=name, url=f"http://{name}", host="h", pid=1, protocol=protocol,
                       kv_address=f"{name}:1", kv_transport="tcp", max_model_len=1024, model_id=model_id)


@pytest.mark.asyncio
async def test_a_gateway_routes_only_to_engines_of_its_model(redis_server):
    redis = metadata.connect(redis_server.url)
    registry = metadata.Registry(redis)
    services = [engine(ServiceKind.TOKEN, "token-mine", "aaaa"), engine(ServiceKind.TOKEN, "token-other", "bbbb"),
                engine(ServiceKind.PROMPT, "prompt-other", "bbbb"), engine(ServiceKind.PROMPT, "prompt-mine", "aaaa"),
                # mid-upgrade: an engine of an older protocol (0: before versions were published)
                engine(ServiceKind.TOKEN, "token-old", "aaaa", protocol=0),
                engine(ServiceKind.PROMPT, "prompt-old", "aaaa", protocol=PROTOCOL - 1),
                ServiceInfo(kind=ServiceKind.CACHE_STORE, id="store-any", url="http://s", host="h", pid=1)]
    try:
        for info in services:
            await registry.renew(info, ttl_s=60)
        router = Router(registry, None, GatewaySettings(), None, model_id="aaaa")
        assert [s.id for s in await router.services(ServiceKind.TOKEN)] == ["token-mine"]
        assert [s.id for s in await router.services(ServiceKind.PROMPT)] == ["prompt-mine"]
        assert [s.id for s in await router.services(ServiceKind.CACHE_STORE)] == ["store-any"]  # replicas are per request
    finally:
        for info in services:
            await registry.deregister(info.id)
        await redis.aclose()
