"""A prompt service as a pipeline of 2 stages (prompt_service/pipeline.py), in process over a real
TCP transport on the tiny model (3 layers: the head [0, 2), stage 1 [2, 3)), streaming to a token
side of another shape: layer 0 to one receiver, layers 1-2 to another (the routes of a token
pipeline that splits at 1, not at 2). The first tokens equal one model's; every layer's K/V
reaches the receiver that owns it, to the bit, for whole prompts batched together and for a
prompt in chunks; a route that refuses fails its requests only, and the stage holds nothing after."""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.kv import make_transport
from common.kv.peers import Peers
from common.kv.receiver import kv_server
from common.kv.wire import as_tensor
from common.protocol import PrefillRequest, SamplingParams
from common.settings import PromptSettings
from engine.runner import ModelRunner, stage_layers
from prompt_service.engine import PrefillEngine
from prompt_service.pipeline import PromptPipeline, PromptStage
from token_service.pipeline import StageInfo

pytestmark = pytest.mark.asyncio
SETTINGS = dict(max_batch_tokens=16, kv_stream_layers=1, ack_timeout_s=10)


class Receiver:
    """A token side's process: keeps every KV message it acknowledges, by (request, layer)."""

    def __init__(self, refuse: str = ""):
        self.kv: dict[tuple[str, int], torch.Tensor] = {}
        self.refuse = refuse
        self.transport = make_transport("tcp", "secret")

    def store(self, header, payload) -> None:
        if header.request_id == self.refuse:
            raise ValueError("refused on purpose")
        kv = as_tensor(header, payload)
        for i, layer in enumerate(range(header.layer_start, header.layer_end)):
            old = self.kv.get((header.request_id, layer))
            part = kv[i]  # (2, tokens, heads, D)
            assert old is None or old.shape[1] == header.token_start, "tokens out of order"
            self.kv[(header.request_id, layer)] = part.clone() if old is None else torch.cat([old, part], 1)

    async def listen(self) -> str:
        return await self.transport.listen(kv_server(self.store, (ValueError,)), "127.0.0.1")


async def test_a_prompt_pipeline_streams_each_layer_to_its_owner(tiny_oracle):
    model, layers = tiny_oracle.model, tiny_oracle.model.config.num_hidden_layers
    whole = ModelRunner(model, block_size=4)
    head = ModelRunner(model, block_size=4, layers=stage_layers(layers, 2, 0))
    settings = PromptSettings(**SETTINGS)
    stage_transport, head_transport = make_transport("tcp", "secret"), make_transport("tcp", "secret")
    stage = PromptStage(ModelRunner(model, block_size=4, layers=stage_layers(layers, 2, 1)), 1, 2, "m",
                        stage_transport, settings)
    address = await stage_transport.listen(stage.handle, "127.0.0.1")
    first, second = Receiver(), Receiver(refuse="refused")
    routes = [(await first.listen(), 0, 1), (await second.listen(), 1, 3)]
    peers = Peers(head_transport)
    engine = PrefillEngine(head, settings, peers)
    engine.pipeline = PromptPipeline(head_transport, head, [StageInfo(0, "", head.layers), StageInfo(1, address, stage.runner.layers)],
                                     on_broken=lambda: None)
    loop = None
    try:
        await engine.pipeline.open({"pipeline": "p", "model_id": "m", "dtype": head.dtype_name, "block_size": 4,
                                    "num_blocks": 0, "stages": 2, "device_blocks": 0})
        loop = asyncio.create_task(engine.run())
        prompts = {"a": "Hi there", "b": "The capital of France is",
                   "long": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                        "seventeen eighteen nineteen twenty",
                   "refused": "Water boils at"}
        ids = {rid: tiny_oracle.tokenizer(text)["input_ids"] for rid, text in prompts.items()}
        assert len(ids["long"]) > 16  # chunks of 16 through both stages

        def request(rid):
            return PrefillRequest(request_id=rid, prompt_ids=ids[rid], sampling=SamplingParams(), target_service_id="t",
                                  target_kv_address=routes[0][0], target_kv_routes=routes)

        results = await asyncio.gather(*(engine.submit(request(rid)) for rid in ids), return_exceptions=True)
        got = dict(zip(ids, results))
        assert "refused on purpose" in str(got.pop("refused"))  # stage 1's layer went to the refusing receiver
        for rid, result in got.items():
            seen = {}
            logits = whole.prefill([ids[rid]], lambda layer, k, v: seen.setdefault(layer, torch.stack([k, v])))
            assert result.first.token_id == int(logits[0].argmax()), rid
            for layer in range(layers):
                owner = first if layer < 1 else second
                assert torch.equal(owner.kv[(rid, layer)], seen[layer]), (rid, layer)
                assert (rid, layer) not in (second if owner is first else first).kv
        assert stage.steps >= 3 and not stage.pools and stage.linked
    finally:
        if loop is not None:
            loop.cancel()
        await engine.pipeline.close()
        await peers.close()
        await stage.close()
        for t in (stage_transport, head_transport, first.transport, second.transport):
            await t.close()
