"""What the gateway makes of a request's length fields (gateway/jobs.py), against the bundled
model's tokenizer: a prompt that alone fills the context names the prompt (no max_tokens could
help), and chat's max_completion_tokens wins over the deprecated max_tokens, as at OpenAI."""

from __future__ import annotations

import json

import pytest
from fastapi import Request
from pydantic import BaseModel, ValidationError

from common.errors import BadRequest, ContextLengthExceeded
from common.model import load_tokenizer
from gateway.jobs import Limits, chat_jobs, completion_jobs
from gateway.openai_types import ChatRequest, CompletionRequest


@pytest.fixture(scope="module")
def tokenizer(bundled_path):
    return load_tokenizer(bundled_path)


def limits_of(tokenizer, context: int = 64) -> Limits:
    return Limits("m", context, len(tokenizer), [2], 256, max(map(len, tokenizer.get_vocab())))


def test_a_prompt_that_alone_fills_the_context_names_the_prompt(tokenizer):
    limits = limits_of(tokenizer)
    for body, make, param in ((CompletionRequest(prompt=list(range(10, 80)), max_tokens=4), completion_jobs, "prompt"),
                              (ChatRequest(messages=[{"role": "user", "content": "word " * 80}]), chat_jobs, "messages")):
        with pytest.raises(ContextLengthExceeded, match="the prompt alone has") as info:
            make(body, tokenizer, limits)
        assert info.value.param == param
    with pytest.raises(ContextLengthExceeded, match="lower max_tokens") as info:  # room, but not for that many
        completion_jobs(CompletionRequest(prompt=list(range(10, 40)), max_tokens=50), tokenizer, limits)
    assert info.value.param == "max_tokens"


def test_max_completion_tokens_wins_over_max_tokens(tokenizer):
    limits = limits_of(tokenizer, 512)
    both = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=6, max_completion_tokens=3)
    assert chat_jobs(both, tokenizer, limits)[0].sampling.max_tokens == 3
    old = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert chat_jobs(old, tokenizer, limits)[0].sampling.max_tokens == 6
    for value in (0, -1):  # the 400 names the field that was sent
        with pytest.raises(BadRequest, match="'max_completion_tokens' = ") as info:
            chat_jobs(ChatRequest(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=value), tokenizer,
                      limits)
        assert info.value.param == "max_completion_tokens"
    with pytest.raises(ContextLengthExceeded, match="lower max_completion_tokens$") as info:  # and where it is too many
        chat_jobs(ChatRequest(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=600), tokenizer, limits)
    assert info.value.param == "max_completion_tokens"


def test_null_is_a_fields_default_and_text_parts_are_joined_by_lines(tokenizer):
    """OpenAI's spec marks its optional fields nullable and vLLM reads null as unset: clients send
    `"stream": null`. A field that takes null keeps it. Text parts are one text, a line apart, as
    vLLM joins them (words at the parts' edges stay apart)."""
    limits = limits_of(tokenizer, 512)
    nulls = {k: None for k in ("stream", "n", "echo", "ignore_eos", "skip_special_tokens", "stream_options",
                               "include_stop_str_in_output", "max_tokens", "temperature", "stop", "logprobs")}
    [job] = completion_jobs(CompletionRequest.model_validate({"prompt": "Hi", **nulls}), tokenizer, limits)
    [plain] = completion_jobs(CompletionRequest(prompt="Hi"), tokenizer, limits)
    assert (job.stream, job.echo_text, job.skip_special, job.sampling.max_tokens) == (False, "", True, 16)
    assert job.sampling.model_copy(update={"seed": 0}) == plain.sampling.model_copy(update={"seed": 0})
    chat = ChatRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "text", "text": "A"},
                                                                                 {"type": "text", "text": "B"}],
                                                     "name": None, "tool_calls": None}],
                                       "logprobs": None, "add_generation_prompt": None, "include_reasoning": None,
                                       "stream": True, "stream_options": {"include_usage": None}})
    [job] = chat_jobs(chat, tokenizer, limits)
    [lines] = chat_jobs(ChatRequest(messages=[{"role": "user", "content": "A\nB"}]), tokenizer, limits)
    assert job.prompt_ids == lines.prompt_ids and job.sampling.logprobs is None and not job.include_usage
    with pytest.raises(ValidationError) as info:  # a required field stays required
        ChatRequest.model_validate({"messages": [{"role": None, "content": "x"}]})
    assert info.value.errors()[0]["type"] == "missing"


@pytest.mark.parametrize("field, value", [("function_call", {"name": "f"}), ("functions", [{"name": "f"}]),
                                          ("top_logprobs", 2), ("echo", True)])
def test_chat_fields_we_do_not_implement_are_refused_not_ignored(tokenizer, field, value):
    from common.errors import BadRequest

    body = ChatRequest(messages=[{"role": "user", "content": "hi"}], **{field: value})
    with pytest.raises(BadRequest) as info:
        chat_jobs(body, tokenizer, limits_of(tokenizer, 512))
    assert info.value.param == field
    # their empty or default forms are fine
    for harmless in ({"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}},
                     {"top_logprobs": 2, "logprobs": True}, {"echo": False}):
        [job] = chat_jobs(ChatRequest(messages=[{"role": "user", "content": "hi"}], **harmless), tokenizer,
                          limits_of(tokenizer, 512))
        assert job.tools is None


def test_structured_output_fields_become_one_grammar_and_bad_ones_a_400_naming_them(tokenizer):
    """OpenAI's response_format and vLLM's structured_outputs and guided_* (on chat and completions)
    each give the job a grammar; two at once, or one that does not compile, is a 400 naming it."""
    from common.errors import BadRequest

    limits, hi = limits_of(tokenizer, 512), [{"role": "user", "content": "hi"}]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    nested = {"type": "string"}
    for _ in range(400):
        nested = {"type": "object", "properties": {"a": nested}}
    asks = [{"response_format": {"type": "json_object"}},
            {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}},
            {"structured_outputs": {"json": schema}}, {"structured_outputs": {"regex": "[0-9]+"}},
            {"structured_outputs": {"choice": ["yes", "no"]}}, {"structured_outputs": {"json_object": True}},
            {"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, {"guided_json": schema},
            {"guided_json": '{"type": "integer"}'}, {"guided_regex": "[a-z]{3}"}, {"guided_choice": ["x", "y"]},
            {"guided_grammar": 'start: "a" | "b"'}, {"guided_regex": "[a-z]", "guided_decoding_backend": "xgrammar"}]
    texts = []
    for ask in asks:
        [job] = chat_jobs(ChatRequest(messages=hi, **ask), tokenizer, limits)
        [completion] = completion_jobs(CompletionRequest(prompt="hi", **ask), tokenizer, limits)
        assert job.sampling.grammar and job.sampling.grammar == completion.sampling.grammar, ask
        texts.append(job.sampling.grammar)
    assert texts[0] == texts[5] and texts[1] == texts[2] == texts[7]  # the same asked in another field's words
    assert len(set(texts)) == len(asks) - 3
    for plain in ({}, {"response_format": {"type": "text"}}, {"structured_outputs": {}}):
        assert chat_jobs(ChatRequest(messages=hi, **plain), tokenizer, limits)[0].sampling.grammar == ""
    # vLLM's JSON options: the whitespace between tokens, none at all, objects closed
    options = [{"guided_json": schema, "guided_whitespace_pattern": " ?"},
               {"structured_outputs": {"json": schema, "whitespace_pattern": " ?"}},
               {"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
               {"structured_outputs": {"json": schema, "disable_additional_properties": True}}]
    made = [chat_jobs(ChatRequest(messages=hi, **ask), tokenizer, limits)[0].sampling.grammar for ask in options]
    assert made[0] == made[1] and len({*made, texts[1]}) == 4
    assert '"whitespace_pattern":" ?"' in made[0] and '"whitespace_flexible":false' in made[2]
    assert '"additionalProperties":false' in made[3]
    bad = [({"response_format": {"type": "xml"}}, "response_format"),
           ({"response_format": {"type": "json_schema"}}, "response_format"),
           ({"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "objectx"}}}},
            "response_format"),
           ({"guided_regex": "(("}, "guided_regex"), ({"guided_grammar": "start: nothing_here"}, "guided_grammar"),
           ({"guided_choice": []}, "guided_choice"), ({"guided_json": "{not json"}, "guided_json"),
           ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
           ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
           ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
           ({"guided_json": schema, "guided_whitespace_pattern": "(("}, "guided_json"),
           ({"structured_outputs": {"json": schema, "whitespace_pattern": 3}}, "structured_outputs"),
           ({"guided_json": '{"items": ' * 3000 + "{}" + "}" * 3000}, "guided_json"),  # nested past Python's stack
           ({"structured_outputs": {"json": nested, "disable_additional_properties": True}}, "structured_outputs"),
           ({"structured_outputs": {"grammar": 5}}, "structured_outputs"), ({"structured_outputs": {"choice": "ab"}},
                                                                             "structured_outputs")]
    for ask, param in bad:
        with pytest.raises(BadRequest) as info:
            chat_jobs(ChatRequest(messages=hi, **ask), tokenizer, limits)
        assert info.value.param == param, ask


def test_echo_with_logprobs_asks_for_the_prompts_and_max_tokens_0_only_with_echo(tokenizer):
    """As at OpenAI and vLLM (lm-evaluation-harness's loglikelihood requests): echo with logprobs
    scores the prompt; max_tokens 0 is the prompt back alone (one token drawn at prefill, dropped),
    and a 400 without echo, or on chat."""
    from common.errors import BadRequest

    limits = limits_of(tokenizer, 512)
    [scored] = completion_jobs(CompletionRequest(prompt="The capital of France", echo=True, logprobs=2, max_tokens=0),
                               tokenizer, limits)
    assert (scored.prompt_logprobs, scored.echo_only, scored.sampling.max_tokens) == (2, True, 1)
    assert scored.echo_text == "The capital of France"
    [plain] = completion_jobs(CompletionRequest(prompt="The capital", logprobs=2, max_tokens=3), tokenizer, limits)
    assert (plain.prompt_logprobs, plain.echo_only, plain.sampling.logprobs) == (None, False, 2)
    [echoed] = completion_jobs(CompletionRequest(prompt="The capital", echo=True, max_tokens=0), tokenizer, limits)
    assert (echoed.prompt_logprobs, echoed.echo_only) == (None, True)
    for body, make in ((CompletionRequest(prompt="The capital", max_tokens=0), completion_jobs),
                       (ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=0), chat_jobs)):
        with pytest.raises(BadRequest, match="only with 'echo'") as info:
            make(body, tokenizer, limits)
        assert info.value.param == "max_tokens"


def test_echo_with_logprobs_and_n_scores_a_prompt_once_and_offsets_run_on(tokenizer):
    """n > 1 with echo and logprobs: only each prompt's choice 0 asks for the prompt's scores (one
    forward's worth, not n), the other choices show that one's; the generated tokens' text_offset
    runs on from the end of the prompt tokens' texts, as vLLM's."""
    from common.protocol import PromptLogprob, TokenEvent
    from gateway.serving import share_prompt_scores
    from gateway.jobs import Delta
    from gateway.responses import completion_logprobs

    limits = limits_of(tokenizer, 512)
    jobs = completion_jobs(CompletionRequest(prompt=["The capital of France", "Water boils at"], n=3, echo=True,
                                             logprobs=1, max_tokens=2), tokenizer, limits)
    assert [(job.choice, job.scored) for job in jobs] == [(0, 1), (1, None), (2, None)] * 2  # what each asks
    assert all(job.prompt_logprobs == 1 for job in jobs)  # what each shows
    scores = [[PromptLogprob(token_id=t, logprob=-float(i)) for t in job.prompt_ids[1:]] for i, job in enumerate(jobs)]
    firsts = [Delta("x", [], None, scores[i] if job.choice == 0 else None) for i, job in enumerate(jobs)]
    share_prompt_scores(jobs, firsts)
    assert [d.prompt for d in firsts] == [scores[0]] * 3 + [scores[3]] * 3

    ids = jobs[0].prompt_ids
    generated = tokenizer(" Paris.")["input_ids"]
    out = completion_logprobs(tokenizer, [TokenEvent(request_id="r", index=i, token_id=t, logprob=-0.5)
                                          for i, t in enumerate(generated)], 12345, (ids, scores[0]))[0]
    assert len(out["tokens"]) == len(ids) + len(generated)
    ends = [offset + len(token) for offset, token in zip(out["text_offset"], out["tokens"])]
    assert out["text_offset"] == [0] + ends[:-1]  # no gap and no restart where the generated text begins
    assert "".join(out["tokens"]) == "The capital of France Paris."



def test_offsets_after_a_prompt_split_mid_character_count_its_tokens_texts(tokenizer):
    """A prompt whose emoji is two byte tokens: its logprob entries spell each as U+FFFD, one
    character more than the echoed text, and the generated tokens' offsets run on from the
    entries' end (as vLLM's), in the body and in the stream alike (choice 1's, with choice 0's scores)."""
    import json

    from common.protocol import PromptLogprob, TokenEvent
    from gateway.jobs import Delta
    from gateway.responses import ChunkWriter, completion_logprobs

    [_, job] = completion_jobs(CompletionRequest(prompt="Hi \U0001F600 there", echo=True, logprobs=1, max_tokens=2,
                                                 n=2, stream=True), tokenizer, limits_of(tokenizer, 512))
    ids = job.prompt_ids
    assert job.echo_text == "Hi \U0001F600 there" and job.scored is None  # choice 0 asks
    scores = [PromptLogprob(token_id=t, logprob=-1.0) for t in ids[1:]]
    event = TokenEvent(request_id="r", index=0, token_id=tokenizer(" now")["input_ids"][0], logprob=-0.5)
    body, _ = completion_logprobs(tokenizer, [event], len(job.echo_text), (ids, scores))
    assert "".join(body["tokens"][:-1]) == "Hi \ufffd\ufffd there"
    assert body["text_offset"][-1] == len(job.echo_text) + 1

    writer = ChunkWriter(job, tokenizer, chat=False, index=1)
    [echo] = writer.first(Delta("", [], None, scores))
    echoed = json.loads(echo[6:])["choices"][0]
    assert echoed["index"] == 1 and echoed["text"] == job.echo_text
    assert echoed["logprobs"]["tokens"] == body["tokens"][:-1]
    generated = json.loads(writer.delta(Delta(" now", [event], None))[6:])["choices"][0]
    assert generated["logprobs"]["text_offset"] == body["text_offset"][-1:]

    # generated text split mid-character: streamed offsets are the body's, though the stream holds
    # the emoji's first byte back (an empty delta) and sends its text whole with the second
    events = [TokenEvent(request_id="r", index=i, token_id=t, logprob=-0.5)
              for i, t in enumerate(tokenizer(" \U0001F600 ok")["input_ids"])]
    texts = ["", " \U0001F600", " ok"]
    assert len(events) == 3
    whole = completion_logprobs(tokenizer, events, len(job.echo_text), (ids, scores))[0]["text_offset"][len(ids):]
    writer = ChunkWriter(job, tokenizer, chat=False, index=1)
    writer.first(Delta("", [], None, scores))
    streamed = [json.loads(writer.delta(Delta(text, [e], None))[6:])["choices"][0]["logprobs"]["text_offset"][0]
                for text, e in zip(texts, events)]
    assert streamed == whole == [11, 13, 14]


def test_return_tokens_as_token_ids_names_logprobs_tokens_by_id(tokenizer):
    """vLLM's return_tokens_as_token_ids: every token of the logprobs (the alternatives too, the
    echoed prompt's too) is "token_id:N", in the body and the stream of completions and chat;
    completions' offsets still count the text, chat's bytes are still the token's."""
    import json

    from common.protocol import PromptLogprob, TokenEvent, TopLogprob
    from gateway.jobs import Delta
    from gateway.responses import ChunkWriter, Totals, chat_body, completion_body

    limits = limits_of(tokenizer, 512)
    [job] = completion_jobs(CompletionRequest(prompt="Hi \U0001F600", echo=True, logprobs=1, max_tokens=2,
                                              return_tokens_as_token_ids=True), tokenizer, limits)
    [plain] = completion_jobs(CompletionRequest(prompt="Hi \U0001F600", echo=True, logprobs=1, max_tokens=2),
                              tokenizer, limits)
    assert job.token_ids_as_names and not plain.token_ids_as_names
    ids = job.prompt_ids
    scores = [PromptLogprob(token_id=t, logprob=-1.0, top_logprobs=[TopLogprob(token_id=7, logprob=-0.1)])
              for t in ids[1:]]
    events = [TokenEvent(request_id="r", index=i, token_id=t, logprob=-0.5,
                         top_logprobs=[TopLogprob(token_id=t, logprob=-0.5), TopLogprob(token_id=9, logprob=-2.0)])
              for i, t in enumerate(tokenizer(" ok")["input_ids"])]
    totals = Totals(text=[" ok"], tokens=events, finish_reason="length", prompt=scores)
    named = completion_body(job, totals, tokenizer)["choices"][0]["logprobs"]
    texts = completion_body(plain, totals, tokenizer)["choices"][0]["logprobs"]
    every = ids + [e.token_id for e in events]
    assert named["tokens"] == [f"token_id:{t}" for t in every]
    assert named["text_offset"] == texts["text_offset"] and named["token_logprobs"] == texts["token_logprobs"]
    assert named["top_logprobs"][0] is None and named["top_logprobs"][1] == {f"token_id:{ids[1]}": -1.0, "token_id:7": -0.1}
    assert list(texts["top_logprobs"][1].values()) == [-1.0, -0.1]  # its own token first, then the likeliest
    assert named["top_logprobs"][-1] == {f"token_id:{events[-1].token_id}": -0.5, "token_id:9": -2.0}
    writer = ChunkWriter(job, tokenizer, chat=False)
    [echo] = writer.first(Delta("", [], None, scores))
    streamed = json.loads(echo[6:])["choices"][0]["logprobs"]["tokens"]
    for e in events:
        streamed += json.loads(writer.delta(Delta(" ok" if e is events[-1] else "", [e], None))[6:]
                               )["choices"][0]["logprobs"]["tokens"]
    assert streamed == named["tokens"]

    [chat] = chat_jobs(ChatRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2,
                                   return_tokens_as_token_ids=True, max_tokens=2), tokenizer, limits)
    content = chat_body(chat, Totals(text=[" ok"], tokens=events, finish_reason="length"),
                        tokenizer)["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{e.token_id}" for e in events]
    assert content[-1]["bytes"] == list(tokenizer.decode([events[-1].token_id]).encode())  # the token's own
    assert [t["token"] for t in content[-1]["top_logprobs"]] == [f"token_id:{events[-1].token_id}", "token_id:9"]
    writer = ChunkWriter(chat, tokenizer, chat=True)
    writer.first(Delta("", [], None))
    chunk = json.loads(writer.delta(Delta(" ok", events, None))[6:])["choices"][0]
    assert chunk["logprobs"]["content"] == content


def test_continuous_usage_stats_puts_usage_so_far_on_every_chunk(tokenizer):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): each chunk carries its
    choice's usage so far, the role chunk's 0 tokens; without it, chunks carry none."""
    import json

    from common.protocol import TokenEvent
    from gateway.jobs import Delta
    from gateway.responses import ChunkWriter

    limits = limits_of(tokenizer, 512)
    events = [TokenEvent(request_id="r", index=i, token_id=t) for i, t in enumerate(tokenizer(" a b c")["input_ids"])]
    for chat in (False, True):
        def body(**options):
            fields = {"stream": True, "max_tokens": 3, "stream_options": options}
            return (ChatRequest(messages=[{"role": "user", "content": "hi"}], **fields) if chat else
                    CompletionRequest(prompt="hi", **fields))
        make = chat_jobs if chat else completion_jobs
        [job] = make(body(include_usage=True, continuous_usage_stats=True), tokenizer, limits)
        writer = ChunkWriter(job, tokenizer, chat=chat)
        chunks = [json.loads(c[6:]) for c in writer.first(Delta("", [], None))]
        chunks += [json.loads(writer.delta(Delta(tokenizer.decode([e.token_id]), [e], "length" if e is events[-1]
                                                 else None))[6:]) for e in events]
        prompt = len(job.prompt_ids)
        assert [c["usage"]["completion_tokens"] for c in chunks] == ([0] if chat else []) + [1, 2, 3]
        assert all(c["usage"]["prompt_tokens"] == prompt and c["usage"]["total_tokens"] ==
                   prompt + c["usage"]["completion_tokens"] for c in chunks)
        for options in ({"include_usage": True}, {"continuous_usage_stats": True}):  # both are needed
            [job] = make(body(**options), tokenizer, limits)
            writer = ChunkWriter(job, tokenizer, chat=chat)
            assert "usage" not in json.loads(writer.delta(Delta(" a", events[:1], None))[6:])


@pytest.mark.parametrize("fields, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"repetition_penalty": 1e-46}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"logit_bias": {"05": 1, "5": 1}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    ({"min_tokens": 200}, "min_tokens"),  # more than the context leaves for the completion
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"-5": 1}}, "logit_bias"),
    ({"logit_bias": {"12": 101}}, "logit_bias"), ({"logit_bias": {"12": float("nan")}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),  # past the vocabulary
    ({"stop_token_ids": [49152]}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias")])
def test_penalties_and_biases_out_of_range_are_a_400_naming_them(tokenizer, fields, param):
    from common.errors import BadRequest

    for body in (CompletionRequest(prompt="Hello", **fields),
                 ChatRequest(messages=[{"role": "user", "content": "hi"}], **fields)):
        with pytest.raises(BadRequest) as info:
            (completion_jobs if isinstance(body, CompletionRequest) else chat_jobs)(body, tokenizer, limits_of(tokenizer, 128))
        assert info.value.param == param, info.value


def test_penalties_biases_min_tokens_and_min_p_reach_the_sampling_params(tokenizer):
    body = CompletionRequest(prompt="Hello", max_tokens=8, presence_penalty=0.5, frequency_penalty=-1,
                             repetition_penalty=1.2, logit_bias={"12": -100, "7": 2.5}, min_tokens=3, min_p=0.05,
                             stop_token_ids=[5, 9, 5], include_stop_str_in_output=True)
    job = completion_jobs(body, tokenizer, limits_of(tokenizer, 128))[0]
    p = job.sampling
    assert p.stop_token_ids == [5, 9] and p.eos_token_ids == [2] and job.include_stop
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert p.logit_bias == [(12, -100.0), (7, 2.5)] and (p.min_tokens, p.min_p) == (3, 0.05)
    assert p.penalized and p.processed
    plain = completion_jobs(CompletionRequest(prompt="Hello", presence_penalty=0, logit_bias={}), tokenizer,
                            limits_of(tokenizer, 128))[0].sampling
    assert not plain.penalized and not plain.processed  # zeros and empties are the defaults: nothing to do


class Replay:
    """A router that answers with given tokens (the gateway's side of a request alone)."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    async def generate(self, request_id, prompt_ids, sampling, prompt_logprobs=None):
        from common.protocol import TokenEvent

        for i, t in enumerate(self.ids):
            last = i == len(self.ids) - 1
            stop = last and (t in sampling.stop_token_ids or t in sampling.eos_token_ids)
            yield TokenEvent(request_id=request_id, index=i, token_id=t,
                             finish_reason=("stop" if stop else "length") if last else None)


def text_of(tokenizer, ids: list[int], **fields) -> tuple[str, str]:
    import asyncio

    from gateway.jobs import deltas

    job = completion_jobs(CompletionRequest(prompt="Hi", max_tokens=len(ids), **fields), tokenizer,
                          limits_of(tokenizer, 128))[0]

    async def run():
        return [d async for d in deltas(Replay(ids), tokenizer, job)]

    out = asyncio.run(run())
    return "".join(d.text for d in out), out[-1].finish_reason


def test_stop_strings_count_from_the_token_after_min_tokens_and_stop_tokens_leave_their_text(tokenizer):
    ids = tokenizer("a STOP b STOP c", add_special_tokens=False)["input_ids"]
    k = next(k for k in range(1, len(ids) + 1) if tokenizer.decode(ids[:k]).endswith("a STOP"))
    assert text_of(tokenizer, ids, stop=["STOP"]) == ("a ", "stop")
    # the first STOP ends with token k: min_tokens k leaves it (vLLM: only after more than k are out)
    assert text_of(tokenizer, ids, stop=["STOP"], min_tokens=k) == ("a STOP b ", "stop")
    assert text_of(tokenizer, ids, stop=["STOP"], min_tokens=k - 1) == ("a ", "stop")
    assert text_of(tokenizer, ids, stop=["STOP"], include_stop_str_in_output=True) == ("a STOP", "stop")
    # a stop token of the request's: its text left out, unless asked for
    assert text_of(tokenizer, ids, stop_token_ids=[ids[-1]]) == (tokenizer.decode(ids[:-1]), "stop")
    assert text_of(tokenizer, ids, stop_token_ids=[ids[-1]], include_stop_str_in_output=True) == (
        tokenizer.decode(ids), "stop")


TEMPLATE = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}{% for m in messages %}<{{ m.role }}>"
            "{{ m.content }}{% for c in m.tool_calls or [] %}(call {{ c.function.name }} {{ c.function.arguments.a }})"
            "{% endfor %}{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}{% endfor %}<assistant>")


def test_tools_reach_the_chat_template_and_a_forced_call_its_grammar(tokenizer):
    """The tools, an assistant's earlier calls (arguments as an object) and a tool's answer reach the
    chat template; a named function or 'required' is a grammar, 'none' and 'auto' are not; 'auto'
    needs a tool-call parser; a tool grammar and another structured output at once are a 400."""
    from copy import deepcopy

    from common.errors import BadRequest

    own = deepcopy(tokenizer)
    own.chat_template = TEMPLATE
    fn = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    talk = [{"role": "user", "content": "add"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 7}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "7"}]
    limits, hermes = limits_of(tokenizer, 512), Limits(**{**limits_of(tokenizer, 512).__dict__, "tool_parser": "hermes"})
    jobs = {}
    for choice in ("none", "auto", "required", {"type": "function", "function": {"name": "add"}}):
        [job] = chat_jobs(ChatRequest(messages=talk, tools=[fn], tool_choice=choice), own, hermes)
        assert own.decode(job.prompt_ids) == "[tool add]<user>add<assistant>(call add 7)<tool>7(for c1)<assistant>"
        jobs[str(choice)] = job
    assert jobs["none"].tools is None and not jobs["none"].sampling.grammar
    assert jobs["auto"].tools.mode == "auto" and not jobs["auto"].sampling.grammar
    # a model's tags may be special tokens: auto keeps them in the text, as vLLM's hermes parser does
    assert not jobs["auto"].skip_special and jobs["required"].skip_special
    assert jobs["required"].tools.mode == "required" and jobs["required"].sampling.grammar
    named = jobs[str({"type": "function", "function": {"name": "add"}})]
    assert named.tools.mode == "named" and named.sampling.grammar
    assert named.sampling.grammar == chat_jobs(ChatRequest(messages=talk, guided_json=fn["function"]["parameters"]),
                                               own, limits)[0].sampling.grammar
    assert chat_jobs(ChatRequest(messages=talk, tools=[fn], tool_choice="required"), own, limits)[0].tools  # any model
    deep = [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "add",  # not JSON Python reads
                                                                          "arguments": "[" * 3000 + "]" * 3000}}]}]
    [job] = chat_jobs(ChatRequest(messages=talk[:1] + deep, tools=[fn], tool_choice="none"), own, limits)
    assert "(call add )" in own.decode(job.prompt_ids)  # the arguments handed over as the text they are
    for ask, param in (({"tools": [fn]}, "tool_choice"),  # auto, and no parser for it
                       ({"tools": [fn], "tool_choice": "required", "guided_regex": "a"}, "tools"),
                       ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
                         "tool_choice": "required"}, "tools"),
                       ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}]}, "messages"),
                       ({"messages": [{"role": "user", "content": "x", "tool_calls": talk[1]["tool_calls"]}]},
                        "messages"),
                       ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$defs": []}}}],
                         "tool_choice": "required"}, "tools")):
        with pytest.raises(BadRequest) as info:
            chat_jobs(ChatRequest(**{"messages": talk, **ask}), own, limits)
        assert info.value.param == param, ask


def test_a_chat_with_tools_streams_the_calls_its_whole_answer_has(tokenizer):
    """The gateway reads a model's hermes output into tool calls: the chunks a client gets add up to
    the whole answer's message, and the finish reason is 'tool_calls'."""
    import asyncio

    from gateway.jobs import deltas
    from gateway.responses import ChunkWriter, Totals, chat_body

    fn = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    hermes = Limits(**{**limits_of(tokenizer, 512).__dict__, "tool_parser": "hermes"})
    said = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    ids = tokenizer(said, add_special_tokens=False)["input_ids"]
    [job] = chat_jobs(ChatRequest(messages=[{"role": "user", "content": "1+2"}], tools=[fn], max_tokens=len(ids) + 1,
                                  stop_token_ids=[2]),
                      tokenizer, hermes)

    async def run():
        return [d async for d in deltas(Replay(ids + [2]), tokenizer, job)]

    out = asyncio.run(run())
    totals = Totals()
    for d in out:
        totals.add(d)
    assert totals.finish_reason == "stop"
    whole = chat_body(job, totals, tokenizer)["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Let me add."
    [call] = whole["message"]["tool_calls"]
    assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'} and call["type"] == "function"
    writer, content, calls, finish = ChunkWriter(job, tokenizer, chat=True), "", [], None
    for d in out:
        chunk = writer.delta(d)
        if chunk is None:
            continue
        choice = json.loads(chunk[6:])["choices"][0]
        content += choice["delta"].get("content", "")
        calls += choice["delta"].get("tool_calls", [])
        finish = choice["finish_reason"] or finish
    assert content == "Let me add." and finish == "tool_calls"
    assert [c["function"] for c in calls] == [call["function"]] and calls[0]["index"] == 0


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(tokenizer):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (-1: the context's), on completions
    and chat; text past the context is then tokenized, not refused; k past the context is a 400."""
    from common.errors import BadRequest

    limits = limits_of(tokenizer, 64)
    words = "one two three four five six seven eight nine ten " * 30
    whole = tokenizer(words)["input_ids"]
    [job] = completion_jobs(CompletionRequest(prompt=words, truncate_prompt_tokens=10, max_tokens=4, echo=True),
                            tokenizer, limits)
    assert job.prompt_ids == whole[-10:] and job.echo_text == tokenizer.decode(whole[-10:])
    short = completion_jobs(CompletionRequest(prompt="Hi there", truncate_prompt_tokens=50, echo=True), tokenizer,
                            limits)[0]
    assert short.prompt_ids == tokenizer("Hi there")["input_ids"] and short.echo_text == "Hi there"
    [chat] = chat_jobs(ChatRequest(messages=[{"role": "user", "content": words}], truncate_prompt_tokens=20,
                                   max_tokens=4), tokenizer, limits)
    full = tokenizer.apply_chat_template([{"role": "user", "content": words}], add_generation_prompt=True)
    assert chat.prompt_ids == list(full["input_ids"] if hasattr(full, "keys") else full)[-20:]
    for k in (-1, 64):  # the whole context: no room left to generate, and the message says why
        with pytest.raises(ContextLengthExceeded) as info:
            completion_jobs(CompletionRequest(prompt=words, truncate_prompt_tokens=k), tokenizer, limits)
        assert info.value.param == "truncate_prompt_tokens"
        assert f"keeps 64 of the prompt's {len(whole)} tokens" in info.value.message
    for k in (0, -2, 65):
        with pytest.raises(BadRequest) as info:
            completion_jobs(CompletionRequest(prompt=words, truncate_prompt_tokens=k), tokenizer, limits)
        assert info.value.param == "truncate_prompt_tokens"


def test_skip_special_tokens_false_keeps_them_in_the_text(tokenizer):
    """vLLM's skip_special_tokens (on by default): off, a special token the model writes stays in the
    text; EOS that ends the output is still left out, as a stop token is."""
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = tokenizer("a b", add_special_tokens=False)["input_ids"] + [special] + tokenizer("c", add_special_tokens=False)["input_ids"]
    assert text_of(tokenizer, ids) == ("a bc", "length")
    assert text_of(tokenizer, ids, skip_special_tokens=False) == ("a b<|im_start|>c", "length")
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"  # the EOS of limits_of
    assert text_of(tokenizer, ids + [2], skip_special_tokens=False) == ("a b<|im_start|>c", "stop")


def test_vllms_chat_template_fields_shape_the_prompt(tokenizer):
    """vLLM's add_generation_prompt, continue_final_message (the model goes on with the assistant's
    last message: a prefilled answer) and chat_template_kwargs (a template's own variables, e.g.
    Qwen3's enable_thinking) reach the chat template; a request's own template is refused."""
    from copy import deepcopy

    from common.errors import BadRequest

    own = deepcopy(tokenizer)
    own.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not "
                         "enable_thinking %}(no thinking){% endif %}{% endif %}")
    limits, hi = limits_of(tokenizer, 512), [{"role": "user", "content": "hi"}]

    def prompt(**fields) -> str:
        return own.decode(chat_jobs(ChatRequest(**{"messages": hi, **fields}), own, limits)[0].prompt_ids)

    assert prompt() == "<user>hi</user><assistant>"
    assert prompt(add_generation_prompt=False) == "<user>hi</user>"
    assert prompt(chat_template_kwargs={"enable_thinking": False}) == "<user>hi</user><assistant>(no thinking)"
    assert prompt(messages=hi + [{"role": "assistant", "content": "Hello! I am"}], add_generation_prompt=False,
                  continue_final_message=True) == "<user>hi</user><assistant>Hello! I am"
    for fields, param in (({"continue_final_message": True}, "continue_final_message"),  # with a generation prompt
                          ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),
                          ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
                          ({"chat_template": "{{ messages }}"}, "chat_template")):
        with pytest.raises(BadRequest) as info:
            prompt(**fields)
        assert info.value.param == param, fields


def test_usage_counts_each_prompt_and_its_cached_tokens_once_over_its_choices(tokenizer):
    """Two prompts, n = 2: prompt tokens and cached tokens (OpenAI's prompt_tokens_details, as the
    first token's event says) once a prompt, from its first choice; completion tokens every choice's."""
    from common.protocol import TokenEvent
    from gateway.responses import Totals, usage, usage_of

    jobs = completion_jobs(CompletionRequest(prompt=["one two three", "four"], n=2, max_tokens=3), tokenizer,
                           limits_of(tokenizer, 128))
    assert [j.choice for j in jobs] == [0, 1, 0, 1]

    def totals(cached: int | None, n: int) -> Totals:
        return Totals(tokens=[TokenEvent(request_id="r", index=i, token_id=5, cached_tokens=cached if i == 0 else None)
                              for i in range(n)])

    done = [totals(16, 3), totals(32, 2), totals(None, 1), totals(0, 3)]
    prompts = len(jobs[0].prompt_ids) + len(jobs[2].prompt_ids)
    assert usage_of(jobs, done) == {"prompt_tokens": prompts, "completion_tokens": 9, "total_tokens": prompts + 9,
                                    "prompt_tokens_details": {"cached_tokens": 16}}
    assert usage(jobs[1], done[1])["prompt_tokens_details"] == {"cached_tokens": 32}
    assert usage(jobs[0], Totals())["prompt_tokens_details"] == {"cached_tokens": 0}  # echo alone: no token


def test_request_ids_are_on_every_answer_once_served_a_bugs_500_too_and_at_most_sixteen():
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from gateway.serving import RequestIds

    async def served(request):
        request.state.request_ids = [f"id{i}" for i in range(int(request.query_params["n"]))]
        if request.query_params.get("bug"):
            raise RuntimeError("a bug")
        return JSONResponse({"ok": True})

    async def refused(request):  # before serving: no id yet
        return JSONResponse({"error": {"message": "no"}}, status_code=400)

    app = Starlette(routes=[Route("/served", served), Route("/refused", refused)],
                    middleware=[Middleware(RequestIds)])  # where the gateway has it: inside Starlette's 500 writer
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/served?n=2").headers["x-request-id"] == "id0, id1"
    bug = client.get("/served?n=1&bug=1")
    assert bug.status_code == 500 and bug.headers["x-request-id"] == bug.headers["request-id"] == "id0"
    assert bug.json()["error"]["type"] == "server_error"
    assert client.get("/served?n=40").headers["x-request-id"].split(", ") == [f"id{i}" for i in range(16)]
    assert "x-request-id" not in client.get("/refused").headers  # (the gateway's error handlers give one: common.errors)


class Sized(BaseModel):  # a body for the test below (at module level: the annotations are strings)
    n: int


def test_a_request_refused_before_it_was_served_gets_an_id_and_a_log_line_with_it(caplog):
    """A 4xx from checking a request (a probe: no x-request-id and no log line for any of them) gets
    an id of its own, on the answer and on the log line that says why; a request served has its ids."""
    import logging

    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from common.errors import install_error_handlers
    from gateway.serving import RequestIds

    app = FastAPI()
    install_error_handlers(app, public=True)
    app.add_middleware(RequestIds)

    @app.post("/checked")
    async def checked(body: Sized):
        raise BadRequest(f"'n' = {body.n}: too many", "n")

    @app.post("/served")
    async def served(request: Request):
        request.state.request_ids = ["id0"]
        raise BadRequest("the grammar failed", code="invalid_grammar")

    client = TestClient(app)
    with caplog.at_level(logging.INFO):
        bad = client.post("/checked", json={"n": 500}, headers={"X-Request-Id": "trace-1"})
        invalid = client.post("/checked", json={"n": "many"})
        late = client.post("/served", json={})
    assert bad.status_code == invalid.status_code == late.status_code == 400
    rid, other = bad.headers["x-request-id"], invalid.headers["x-request-id"]
    assert len(rid) == len(other) == 32 and rid != other and bad.headers["request-id"] == rid
    assert late.headers["x-request-id"] == "id0"
    lines = [r.getMessage() for r in caplog.records if r.name == "common.errors"]
    assert [line for line in lines if "'n' = 500: too many" in line and "'trace-1'" in line and "-> 400" in line]
    assert len([line for line in lines if "-> 400" in line]) == 2  # not the one served: its own code logged it


def test_the_key_a_request_is_known_by_is_the_copy_of_the_header_that_was_checked():
    """The Responses API's store scopes responses to the API key (gateway.app._owner): that key is
    the one RequireSecret checked, even when a request sends a header twice (a handler reading the
    other copy would let any valid key act as a revoked one)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from common.service import API_KEYS, RequireSecret, secret_digest
    from gateway.app import _owner

    async def whose(request):
        return JSONResponse({"owner": _owner(request)})

    app = Starlette(routes=[Route("/v1/x", whose)],
                    middleware=[Middleware(RequireSecret, **API_KEYS, secrets=("KEY_A",))])
    client = TestClient(app)
    want = secret_digest(b"KEY_A")
    for headers in ([("authorization", "Bearer KEY_B"), ("authorization", "Bearer KEY_A")],
                    [("x-api-key", "KEY_B"), ("x-api-key", "KEY_A")], [("x-api-key", "KEY_A")],
                    [("authorization", "Bearer KEY_A"), ("x-api-key", "KEY_B")]):
        resp = client.get("/v1/x", headers=headers)
        assert resp.status_code == 200 and resp.json() == {"owner": want}, headers
    assert client.get("/v1/x", headers=[("authorization", "Bearer KEY_A"), ("authorization", "Bearer KEY_B")]
                      ).status_code == 401
    assert TestClient(Starlette(routes=[Route("/v1/x", whose)])).get("/v1/x").json() == {"owner": ""}  # no keys
