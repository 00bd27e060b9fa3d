"""Reasoning apart from the answer (gateway/reasoning.py, --reasoning-parser): the thinking
between <think> and </think> is the message's reasoning_content, the rest its content; where the
output starts is read off the prompt; streamed pieces add up to the whole answer's for any
chunking; an answer after the thinking still has its tool calls read."""

from __future__ import annotations

import json
import random
from copy import deepcopy

import pytest

from common.model import load_tokenizer
from gateway import reasoning
from gateway.jobs import Delta, Limits, chat_jobs
from gateway.openai_types import ChatRequest

CASES = [  # (the prompt left a <think> open, output text, reasoning, content)
    (False, "<think>\nLet me see.\n</think>\n\nParis.", "Let me see.", "Paris."),       # Qwen3 writing its own
    (False, "Paris.", "", "Paris."),                                                     # thinking off
    (True, "Let me see.\n</think>\n\nParis.", "Let me see.", "Paris."),                  # opened by the template
    (True, "Let me see, and see again", "Let me see, and see again", ""),                # cut short while thinking
    (False, "  <think>a</think>b", "a", "b"),
    (False, "<thin", "", "<thin"),                                                       # no tag after all
    (False, "<think>a</thi", "a</thi", ""),                                              # a tag cut short
    (False, "x <think>a</think>", "", "x <think>a</think>"),                             # only at the very start
    (True, "a\n\n  \nb \n</think>", "a\n\n  \nb", ""),
    (True, "</think>answer </think> ", "", "answer </think> "),                          # the first one closes it
    (False, "", "", ""),
    (False, "    return 1\n", "", "    return 1\n"),                                   # no thinking: left as it is
    (True, "<think>\nHmm.\n</think>\nYes", "Hmm.", "Yes"),                            # a <think> again: dropped
    (True, "  <thi", "<thi", ""),
]


@pytest.mark.parametrize("open_, text, thought, content", CASES)
def test_the_thinking_and_the_answer_alike_whole_or_in_any_pieces(open_, text, thought, content):
    assert reasoning.split_whole(open_, text) == (thought, content)
    rng = random.Random(text)
    for _ in range(60):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        thinking, said = reasoning.Thinking(open_), []
        for piece in pieces:
            said.append(thinking.push(piece))
        said.append(thinking.finish())
        assert ("".join(r for r, _ in said), "".join(c for _, c in said)) == (thought, content), pieces


@pytest.fixture(scope="module")
def tokenizer(bundled_path):
    return load_tokenizer(bundled_path)


def test_the_prompt_says_whether_the_output_starts_inside_the_thinking(tokenizer):
    ids = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    assert reasoning.opens_thinking(tokenizer, ids("<|im_start|>assistant\n<think>\n"))
    assert not reasoning.opens_thinking(tokenizer, ids("<|im_start|>assistant\n<think>\n\n</think>\n\n"))
    assert not reasoning.opens_thinking(tokenizer, ids("<|im_start|>assistant\n"))
    asked = "<|im_start|>user\nWhat does the <think> tag do?<|im_end|>\n<|im_start|>assistant\n"
    assert not reasoning.opens_thinking(tokenizer, ids(asked))  # a <think> the user wrote opens nothing
    # continue_final_message: the assistant's message being continued says it, however long
    assert reasoning.opens_thinking(tokenizer, ids("long " * 60), "<think>\n" + "long " * 60)
    assert not reasoning.opens_thinking(tokenizer, ids("x"), "<think>a</think>\n\nThe answer")
    assert reasoning.parser_for("{{ '<think>' }}...{{ '</think>' }}") == "qwen3"
    assert reasoning.parser_for(tokenizer.chat_template) == "none"  # SmolLM2 does not think


def test_a_chat_answer_and_its_stream_carry_the_reasoning_and_the_calls_after_it(tokenizer):
    """A Qwen3-like template with thinking on and off, through chat_jobs, the whole body and the
    stream's chunks: reasoning_content (and reasoning) apart, the content and its tool calls the
    same streamed as whole; without a parser the text stays whole."""
    from common.protocol import TokenEvent
    from gateway.responses import ChunkWriter, Totals, chat_body

    own = deepcopy(tokenizer)
    own.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
                         "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}")
    base = Limits("m", 512, len(tokenizer), [2], 256, max(map(len, tokenizer.get_vocab())))
    limits = Limits(**{**base.__dict__, "reasoning_parser": "qwen3", "tool_parser": "hermes"})
    fn = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    hi = [{"role": "user", "content": "Weather in Paris?"}]
    text = 'The user wants the weather.\n</think>\n\nLet me look.\n<tool_call>\n{"name": "weather", ' \
           '"arguments": {"city": "Paris"}}\n</tool_call>'
    [job] = chat_jobs(ChatRequest(messages=hi, tools=[fn]), own, limits)
    assert job.thinking is True
    event = TokenEvent(request_id="r", index=0, token_id=5)
    totals = Totals(text=[text], tokens=[event], finish_reason="stop")
    message = chat_body(job, totals, own)["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == "The user wants the weather."
    assert message["content"] == "Let me look."
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "weather", "arguments": '{"city": "Paris"}'}]

    for size in (1, 3, 7, 20):
        writer = ChunkWriter(job, own, chat=True)
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        chunks = [writer.delta(Delta(p, [event], "stop" if i == len(pieces) - 1 else None))
                  for i, p in enumerate(pieces)]
        deltas = [json.loads(c[6:])["choices"][0] for c in chunks if c]
        said = lambda key: "".join(d["delta"].get(key) or "" for d in deltas)  # noqa: E731
        assert said("reasoning_content") == said("reasoning") == message["reasoning_content"]
        assert said("content") == message["content"]
        calls = [c for d in deltas for c in d["delta"].get("tool_calls", [])]
        assert [c["function"] for c in calls] == [c["function"] for c in message["tool_calls"]]
        assert deltas[-1]["finish_reason"] == "tool_calls"

    [off] = chat_jobs(ChatRequest(messages=hi, chat_template_kwargs={"enable_thinking": False}), own, limits)
    assert off.thinking is False
    body = chat_body(off, Totals(text=["It is sunny."], tokens=[event], finish_reason="stop"), own)
    assert body["choices"][0]["message"] | {"role": "assistant"} == {
        "role": "assistant", "content": "It is sunny.", "reasoning_content": None, "reasoning": None}
    for held in ({"tools": [fn], "tool_choice": "required"}, {"response_format": {"type": "json_object"}}):
        [forced] = chat_jobs(ChatRequest(messages=hi, **held), own, limits)  # a grammar from the first token
        assert forced.sampling.grammar and forced.thinking is False, held
        if "tools" in held:  # its calls are read from the answer, not taken for thinking
            called = chat_body(forced, Totals(text=['[{"name": "weather", "parameters": {}}]'], tokens=[event],
                                              finish_reason="stop"), own)["choices"][0]
            assert called["finish_reason"] == "tool_calls" and called["message"]["reasoning_content"] is None
    [plain] = chat_jobs(ChatRequest(messages=hi), own, base)
    assert plain.thinking is None
    message = chat_body(plain, totals, own)["choices"][0]["message"]
    assert message["content"] == text and "reasoning_content" not in message


def test_think_tags_that_decoding_skips_are_kept_in_the_text(tokenizer):
    """Tags added as special tokens (in added_tokens_decoder, not only the special-tokens map) are
    found, so the text the parser reads keeps them."""
    from tokenizers import AddedToken

    from common.settings import GatewaySettings
    from gateway.app import reasoning_parser

    settings = GatewaySettings(reasoning_parser="qwen3")
    assert reasoning_parser(settings, tokenizer) == ("qwen3", False)
    own = deepcopy(tokenizer)
    own.add_tokens([AddedToken("<think>", special=True), AddedToken("</think>", special=True)])
    assert own.decode(own("a<think>b</think>c")["input_ids"], skip_special_tokens=True) == "abc"
    assert reasoning_parser(settings, own) == ("qwen3", True)
    assert reasoning_parser(GatewaySettings(reasoning_parser="none"), own) == ("none", False)


def test_reasoning_effort_reaches_the_template_and_include_reasoning_false_leaves_the_thinking_out(tokenizer):
    """OpenAI's chat reasoning_effort is the template's `reasoning_effort` (chat_template_kwargs'
    own wins); vLLM's include_reasoning false: the answer alone, whole and streamed."""
    from common.errors import BadRequest
    from common.protocol import TokenEvent
    from gateway.responses import ChunkWriter, Totals, chat_body

    own = deepcopy(tokenizer)
    own.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "<|im_start|>assistant\n[effort {{ reasoning_effort | default('unset') }}]<think>\n")
    limits = Limits("m", 512, len(tokenizer), [2], 256, max(map(len, tokenizer.get_vocab())), reasoning_parser="qwen3")
    hi = [{"role": "user", "content": "Hi"}]
    for fields, said in (({}, "unset"), ({"reasoning_effort": "low"}, "low"),
                         ({"reasoning_effort": "low", "chat_template_kwargs": {"reasoning_effort": "high"}}, "high")):
        [job] = chat_jobs(ChatRequest(messages=hi, **fields), own, limits)
        assert f"[effort {said}]" in own.decode(job.prompt_ids), fields
    with pytest.raises(BadRequest) as info:
        chat_jobs(ChatRequest(messages=hi, reasoning_effort="extreme"), own, limits)
    assert info.value.param == "reasoning_effort"

    [job] = chat_jobs(ChatRequest(messages=hi, include_reasoning=False), own, limits)
    text, event = "Hm, a greeting.\n</think>\n\nHello!", TokenEvent(request_id="r", index=0, token_id=5)
    message = chat_body(job, Totals(text=[text], tokens=[event], finish_reason="stop"), own)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello!"}
    writer = ChunkWriter(job, own, chat=True)
    chunks = [writer.delta(Delta(c, [event], "stop" if i == len(text) - 1 else None)) for i, c in enumerate(text)]
    deltas = [json.loads(c[6:])["choices"][0]["delta"] for c in chunks if c]
    assert "".join(d.get("content", "") for d in deltas) == "Hello!"
    assert not any("reasoning_content" in d or "reasoning" in d for d in deltas)
