"""End to end on the real bundled model (SmolLM2-135M-Instruct), through the official openai SDK,
over the default UCX transport: greedy text equals Hugging Face `generate`, streamed or not."""

from __future__ import annotations

import openai
import pytest

from dejavu.cluster import Cluster
from tests.conftest import Oracle
from tests.cluster.conftest import CLUSTER_ENV
from tests.cluster.test_serving import assert_no_kv_held

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(redis_server):
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "ucx", "DEJAVU_THREADS": "0"}
    with Cluster("smollm2", port=0, cache_stores=1, redis_url=redis_server.url, env=env, echo_logs=False) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(bundled_path):
    return Oracle(bundled_path)


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_lists_the_bundled_model(client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]


@pytest.mark.parametrize("prompt", ["The capital of France is", "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n"])
def test_completion_equals_hf_generate(client, oracle, prompt):
    want, n = oracle.text(oracle.tokenizer(prompt)["input_ids"], 40)
    out = client.completions.create(model="smollm2", prompt=prompt, max_tokens=40, temperature=0)
    assert out.choices[0].text == want
    assert out.usage.completion_tokens == n
    streamed = client.completions.create(model="smollm2", prompt=prompt, max_tokens=40, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_chat_equals_hf_generate_and_stops_at_eos(client, oracle, cluster):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = oracle.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want, n = oracle.text(ids, 60)
    out = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=60, temperature=0)
    assert out.choices[0].message.content == want
    assert out.usage.completion_tokens == n
    if n < 60:
        assert out.choices[0].finish_reason == "stop"
    assert_no_kv_held(cluster)


def test_bad_request_through_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt="hi", max_tokens=100000)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")
