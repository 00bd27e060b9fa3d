"""SGLang's native /generate on the gateway (gateway/generate_api.py): what a request becomes on
completions, what it refuses (in SGLang's names), and its answer, whole and streamed (cumulative,
as SGLang's and as its bench_serving reads it)."""

from __future__ import annotations

import asyncio
import json

import pytest

from common.errors import BadRequest, ContextLengthExceeded
from common.protocol import PromptLogprob, TokenEvent, TopLogprob
from gateway.generate_api import GenerateForm, GenerateRequest
from gateway.jobs import chat_jobs, deltas
from gateway.openai_types import ChatRequest
from gateway.responses import Totals
from tests.unit.test_gateway_requests import Replay
from tests.unit.test_responses_api import limits_of, tokenizer  # noqa: F401 - a fixture


def jobs_of(body: dict, tokenizer, **limits):
    form = GenerateForm(GenerateRequest(**body))
    return form, form.jobs(tokenizer, limits_of(tokenizer, **limits))


class Scored(Replay):
    """Replay, the first event with the prompt's scores and every event with logprobs where asked."""

    async def generate(self, request_id, prompt_ids, sampling, prompt_logprobs=None):
        async for event in super().generate(request_id, prompt_ids, sampling, prompt_logprobs):
            update = {}
            if sampling.logprobs is not None:
                update |= {"logprob": -0.5 - event.index,
                           "top_logprobs": [TopLogprob(token_id=event.token_id, logprob=-0.5 - event.index),
                                            TopLogprob(token_id=7, logprob=-3.0)][:sampling.logprobs]}
            if event.index == 0 and prompt_logprobs is not None:
                update["prompt_logprobs"] = [PromptLogprob(token_id=t, logprob=-1.0 - i, rank=1 + i,
                                                           top_logprobs=[TopLogprob(token_id=t, logprob=-1.0 - i)])
                                             for i, t in enumerate(prompt_ids[1:])]
            yield event.model_copy(update=update)


def run(form: GenerateForm, job, tokenizer, ids: list[int]):
    """The job's deltas when the model says `ids`: (its SSE events as parsed, the whole answer)."""
    async def go():
        return [d async for d in deltas(Scored(ids), tokenizer, job)]

    out, totals = asyncio.run(go()), Totals()
    writer = form.writer(job, tokenizer)
    events = writer.first(out[0]) + [writer.delta(d) for d in out] + [writer.end(totals), writer.done()]
    for d in out:
        totals.add(d)
    parsed = [json.loads(e.removeprefix("data: ")) for e in events if e and e != "data: [DONE]\n\n"]
    assert events[-1] == "data: [DONE]\n\n"
    return parsed, form.body(job, totals, tokenizer)


def test_a_prompt_becomes_the_completion_its_sampling_params_say(tokenizer):
    form, [job] = jobs_of({"text": "Hello", "sampling_params": {
        "max_new_tokens": 7, "min_new_tokens": 2, "temperature": 0, "top_p": 0.9, "top_k": -1, "min_p": 0.1,
        "frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.1, "stop": ["x"],
        "stop_token_ids": [5], "ignore_eos": True, "skip_special_tokens": False, "no_stop_trim": True,
        "logit_bias": {"9": 2.0}, "sampling_seed": 42, "spaces_between_special_tokens": False,
        "stream_interval": 4, "custom_params": {"a": 1}}}, tokenizer)
    s = job.sampling
    assert job.prompt_ids == tokenizer("Hello")["input_ids"] and s.max_tokens == 7 and s.min_tokens == 2
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.0, 0.9, 0, 0.1)
    assert (s.frequency_penalty, s.presence_penalty, s.repetition_penalty) == (0.5, -0.5, 1.1)
    assert job.stops == ["x"] and s.stop_token_ids == [5] and s.ignore_eos and not job.skip_special
    assert job.include_stop and s.logit_bias == [(9, 2.0)] and s.seed == 42 and s.logprobs is None
    assert job.scored is None and not job.stream
    assert form.shown[job.request_id].rid == job.request_id and form.shown[job.request_id].index is None

    # defaults: SGLang's 128 tokens, temperature 1; null max_new_tokens: what the context leaves
    _, [job] = jobs_of({"input_ids": [1, 2, 3]}, tokenizer)
    assert job.prompt_ids == [1, 2, 3] and job.sampling.max_tokens == 128 and job.sampling.temperature == 1.0
    _, [job] = jobs_of({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": None}}, tokenizer)
    assert job.sampling.max_tokens == 512 - 3
    # both given: the ids are the prompt, as SGLang's
    _, [job] = jobs_of({"text": "Hello", "input_ids": [4, 5]}, tokenizer)
    assert job.prompt_ids == [4, 5]
    # structured output by SGLang's names
    _, [job] = jobs_of({"text": "Hi", "sampling_params": {"regex": "[ab]+"}}, tokenizer)
    assert job.sampling.grammar
    _, [job] = jobs_of({"text": "Hi", "sampling_params": {"json_schema": json.dumps({"type": "object"})}}, tokenizer)
    assert job.sampling.grammar


def test_a_batch_and_n_are_answered_as_a_list_prompt_by_prompt(tokenizer):
    form, jobs = jobs_of({"text": ["a", "b c"], "rid": "r", "sampling_params": [{"max_new_tokens": 2},
                                                                               {"max_new_tokens": 3, "n": 2}]},
                         tokenizer)
    assert [j.sampling.max_tokens for j in jobs] == [2, 3, 3] and [j.choice for j in jobs] == [0, 0, 1]
    shown = [form.shown[j.request_id] for j in jobs]
    assert [s.index for s in shown] == [0, 1, 2]
    assert shown[0].rid == "r_0" and shown[1].rid == jobs[1].request_id  # n > 1: ids of their own, as SGLang's
    form, jobs = jobs_of({"input_ids": [[1, 2], [3]], "rid": ["x", "y"]}, tokenizer)
    assert [form.shown[j.request_id].rid for j in jobs] == ["x", "y"] and [j.prompt_ids for j in jobs] == [[1, 2], [3]]
    form, [job] = jobs_of({"text": ["only"]}, tokenizer)  # a batch of one: still a list
    assert form.shown[job.request_id].index == 0


@pytest.mark.parametrize("body, param, words", [
    ({}, "text", "'text' or 'input_ids'"),
    ({"input_ids": []}, "input_ids", "empty"),
    ({"text": []}, "text", "no prompts"),
    ({"text": ["a", ""]}, "text", "empty prompt"),
    ({"text": "a", "sampling_params": {"seed": 3}}, "sampling_params", "sampling_seed"),
    ({"text": "a", "sampling_params": {"max_tokens": 3}}, "sampling_params", "unknown field 'max_tokens'"),
    ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "sampling_params", "at least 0"),
    ({"text": "a", "sampling_params": {"max_new_tokens": 1.5}}, "sampling_params", "max_new_tokens"),
    ({"text": "a", "sampling_params": {"max_new_tokens": ""}}, "sampling_params", "max_new_tokens"),
    ({"text": "a", "sampling_params": {"n": ""}}, "sampling_params", "'sampling_params.n'"),
    ({"text": "a", "sampling_params": {"top_p": 0}}, "sampling_params.top_p", "'sampling_params.top_p'"),
    ({"text": "a", "sampling_params": {"min_new_tokens": 9, "max_new_tokens": 2}}, "sampling_params.min_new_tokens",
     "'sampling_params.min_new_tokens'"),
    ({"text": "a", "sampling_params": {"stop_regex": "x+"}}, "sampling_params", "stop regexes"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params", "1 entries for 2 prompts"),
    ({"text": "a", "return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num", "between 0 and 20"),
    ({"text": "a", "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len", "-1"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 3}, "logprob_start_len", "past the end"),
    ({"input_ids": [1, 10 ** 9]}, "input_ids", "outside the vocabulary"),
    ({"text": "a", "image_data": "x.png"}, "image_data", "images"),
    ({"text": "a", "lora_path": "adapter"}, "lora_path", "LoRA"),
    ({"text": "a", "token_ids_logprob": [1]}, "token_ids_logprob", "not supported"),
    ({"text": "a", "sampling_params": {"n": 129}}, "sampling_params.n", "'sampling_params.n'"),
])
def test_bad_requests_are_400s_in_sglangs_names(tokenizer, body, param, words):
    with pytest.raises(BadRequest) as err:
        jobs_of(body, tokenizer)
    assert err.value.param == param and words in err.value.message


def test_a_prompt_too_long_says_max_new_tokens(tokenizer):
    with pytest.raises(ContextLengthExceeded) as err:
        jobs_of({"input_ids": [1] * 500, "sampling_params": {"max_new_tokens": 100}}, tokenizer)
    assert "max_new_tokens" in err.value.message and "max_tokens" not in err.value.message.replace("max_new_tokens", "")
    assert err.value.param == "sampling_params.max_new_tokens"


def test_the_answer_keeps_the_stop_token_in_output_ids_and_the_stream_is_cumulative(tokenizer):
    said = tokenizer(" one two three", add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({"text": "Count:", "rid": "abc", "stream": True}, tokenizer)
    events, whole = run(form, job, tokenizer, said + [2])  # then EOS (2 in limits_of)
    text = tokenizer.decode(said)
    assert [e["meta_info"]["completion_tokens"] for e in events] == list(range(1, len(said) + 2))
    assert events[-1]["text"] == text and events[-1]["output_ids"] == said + [2]
    assert all(text.startswith(e["text"]) for e in events) and "index" not in events[0]
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
    assert events[0]["meta_info"]["finish_reason"] is None and "e2e_latency" not in events[0]["meta_info"]
    assert events[-1]["meta_info"]["e2e_latency"] > 0
    meta = whole["meta_info"]
    assert whole["text"] == text and whole["output_ids"] == said + [2] and meta["id"] == "abc"
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (len(job.prompt_ids), 4, 0)
    assert "output_token_logprobs" not in meta

    # a stop string: matched, cut from the text (kept with no_stop_trim); the length: max_new_tokens
    form, [job] = jobs_of({"text": "Count:", "sampling_params": {"stop": " two"}}, tokenizer)
    _, whole = run(form, job, tokenizer, said)
    assert whole["text"] == " one" and whole["meta_info"]["finish_reason"] == {"type": "stop", "matched": " two"}
    assert whole["output_ids"] == said[:2] and whole["meta_info"]["completion_tokens"] == 2  # " two" completed it
    form, [job] = jobs_of({"text": "Count:", "sampling_params": {"stop": " two", "no_stop_trim": True}}, tokenizer)
    assert run(form, job, tokenizer, said)[1]["text"] == " one two"
    form, [job] = jobs_of({"text": "Count:", "sampling_params": {"max_new_tokens": 2}}, tokenizer)
    _, whole = run(form, job, tokenizer, said[:2])
    assert whole["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    form, [job] = jobs_of({"text": "Count:", "sampling_params": {"stop_token_ids": [said[1]]}}, tokenizer)
    _, whole = run(form, job, tokenizer, said[:2])
    assert whole["meta_info"]["finish_reason"] == {"type": "stop", "matched": said[1]}
    assert whole["text"] == tokenizer.decode(said[:1]) and whole["output_ids"] == said[:2]


def test_logprobs_are_sglangs_entries_for_the_output_and_the_prompt_from_its_start(tokenizer):
    said = tokenizer(" one two", add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({"input_ids": [11, 12, 13], "return_logprob": True, "top_logprobs_num": 2,
                           "logprob_start_len": 1, "return_text_in_logprobs": True,
                           "return_prompt_token_ids": True, "sampling_params": {"max_new_tokens": 2}}, tokenizer)
    assert job.sampling.logprobs == 2 and job.scored == 2
    events, whole = run(form, job, tokenizer, said)
    meta = whole["meta_info"]
    assert meta["output_token_logprobs"] == [[-0.5, said[0], tokenizer.decode(said[:1])],
                                             [-1.5, said[1], tokenizer.decode(said[1:])]]
    assert meta["output_top_logprobs"][1] == [[-1.5, said[1], tokenizer.decode(said[1:])],
                                              [-3.0, 7, tokenizer.decode([7])]]
    # tokens 1 and 2 of the prompt (start 1): the first null, as SGLang's, then each token's logprob
    # after those before it
    assert [e[:2] for e in meta["input_token_logprobs"]] == [[None, 12], [-2.0, 13]]
    assert meta["input_top_logprobs"][0] is None and [x[:2] for x in meta["input_top_logprobs"][1]] == [[-2.0, 13]]
    assert meta["output_token_logprobs_length"] == 2
    assert whole["prompt_token_ids"] == [11, 12, 13]
    for answer in (events[-1], whole):  # the stream ends with the whole answer
        answer["meta_info"].pop("e2e_latency")
    assert events[-1] == whole

    form, [job] = jobs_of({"input_ids": [11, 12, 13], "return_logprob": True, "logprob_start_len": 0}, tokenizer)
    _, whole = run(form, job, tokenizer, said)
    assert whole["meta_info"]["input_token_logprobs"][0] == [None, 11, None]
    assert "output_top_logprobs" not in whole["meta_info"]
    form, [job] = jobs_of({"input_ids": [11, 12, 13], "return_logprob": True}, tokenizer)  # start -1: the output's
    assert job.scored is None
    assert run(form, job, tokenizer, said)[1]["meta_info"]["input_token_logprobs"] == []


def test_max_new_tokens_0_scores_the_prompt_and_generates_nothing(tokenizer):
    form, [job] = jobs_of({"input_ids": [11, 12, 13], "return_logprob": True, "logprob_start_len": 0,
                           "sampling_params": {"max_new_tokens": 0}}, tokenizer)
    assert job.echo_only and job.scored == 0
    _, whole = run(form, job, tokenizer, [99])
    assert whole["text"] == "" and whole["output_ids"] == []
    assert whole["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert [e[:2] for e in whole["meta_info"]["input_token_logprobs"]] == [[None, 11], [-1.0, 12], [-2.0, 13]]


def test_a_batchs_whole_answers_are_merged_in_order(tokenizer):
    form, jobs = jobs_of({"input_ids": [[1, 2], [3]], "sampling_params": {"max_new_tokens": 1}}, tokenizer)
    totals = []
    for job in jobs:
        t = Totals()
        for d in asyncio.run(_all(deltas(Scored([42]), tokenizer, job))):
            t.add(d)
        totals.append(t)
    merged = form.merged(jobs, totals, tokenizer)
    assert [m["output_ids"] for m in merged] == [[42], [42]] and all("index" not in m for m in merged)
    assert [m["meta_info"]["prompt_tokens"] for m in merged] == [2, 1]


async def _all(gen):
    return [d async for d in gen]


def test_unset_values_are_not_given(tokenizer):
    """SGLang's clients send fields they do not use as null, false or empty (a list of nulls for a
    batch); an empty grammar is none."""
    _, [job] = jobs_of({"text": "a", "lora_path": [None], "image_data": None, "return_hidden_states": False,
                        "sampling_params": {"regex": "", "json_schema": None, "stop_regex": [], "top_p": None}},
                       tokenizer)
    assert not job.sampling.grammar and job.sampling.top_p == 1.0


def test_a_quiet_stream_sends_its_last_event_again_which_sglangs_client_skips(tokenizer):
    """The keep-alive of a failover's pause: an event, since SGLang's client reads every line as
    JSON (an SSE comment would fail the request), with no token more than the last."""
    from gateway.serving import keepalive
    from gateway.responses import CHAT

    said = tokenizer(" one two", add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({"text": "Count:", "stream": True}, tokenizer)
    writer = form.writer(job, tokenizer)
    assert keepalive(writer) == ": keep-alive\n\n"  # nothing sent yet (not reached: a stream starts with a token)

    async def go():
        return [d async for d in deltas(Scored(said), tokenizer, job)]

    first = writer.delta(asyncio.run(go())[0])
    assert keepalive(writer) == first and json.loads(first.removeprefix("data: "))["meta_info"]["completion_tokens"] == 1
    [chat] = chat_jobs(ChatRequest(messages=[{"role": "user", "content": "Hi"}], stream=True), tokenizer,
                       limits_of(tokenizer))
    assert keepalive(CHAT.writer(chat, tokenizer)) == ": keep-alive\n\n"  # the other APIs: an SSE comment


def test_e2e_latency_counts_from_the_request_not_the_job(tokenizer):
    form, [job] = jobs_of({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}, tokenizer)
    form.arrived -= 5.0  # as if tokenizing had taken 5 s
    t = Totals()
    for d in asyncio.run(_all(deltas(Scored([42]), tokenizer, job))):
        t.add(d)
    assert form.body(job, t, tokenizer)["meta_info"]["e2e_latency"] >= 5.0


class Held(Replay):
    """Replay, each token after `gap` s (forever, with gap None, before the first); `closed` once
    its generator has ended, however it ended."""

    def __init__(self, ids: list[int], gap: float | None):
        super().__init__(ids)
        self.gap, self.closed = gap, False

    async def generate(self, request_id, prompt_ids, sampling, prompt_logprobs=None):
        try:
            if self.gap is None:
                await asyncio.Event().wait()
            async for event in super().generate(request_id, prompt_ids, sampling, prompt_logprobs):
                await asyncio.sleep(self.gap)
                yield event
        finally:
            self.closed = True


def test_an_aborted_job_ends_with_what_it_has_and_its_request_is_closed_downstream(tokenizer):
    """/abort_request sets the job's event: its output ends there, finish_reason abort, and the
    router's generator is closed (which aborts it on the services), queued or mid-decode."""
    said = tokenizer(" one two three four five six", add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({"text": "Count:", "rid": "run-7", "sampling_params": {"max_new_tokens": 6}}, tokenizer)
    assert job.rid == "run-7" and job.abort is not None
    router = Held(said, 0.05)

    async def go():
        out = []
        async for d in deltas(router, tokenizer, job):
            out.append(d)
            if len(out) == 2:
                job.abort.set()
        return out

    out = asyncio.run(go())
    assert [d.finish_reason for d in out] == [None, None, "abort"] and router.closed
    totals = Totals()
    for d in out:
        totals.add(d)
    whole = form.body(job, totals, tokenizer)
    assert whole["output_ids"] == said[:2] and whole["text"] == tokenizer.decode(said[:2])
    assert whole["meta_info"]["finish_reason"]["type"] == "abort"

    _, [queued] = jobs_of({"text": "Count:"}, tokenizer)  # waiting for its first token (in admission, say)
    router = Held(said, None)

    async def waiting():
        asyncio.get_running_loop().call_later(0.05, queued.abort.set)
        return [d async for d in deltas(router, tokenizer, queued)]

    out = asyncio.run(waiting())
    assert [(d.text, d.tokens, d.finish_reason) for d in out] == [("", [], "abort")] and router.closed
