"""A reasoning model's thinking, apart from its answer (--reasoning-parser): on chat, the text
between <think> and </think> is the message's `reasoning_content` (and `reasoning`, the name
vLLM uses now), the rest its `content`, streamed or not, as vLLM's and SGLang's reasoning parsers
give them (DeepSeek-R1, QwQ, Qwen3).

Where the output starts is read off the prompt, not guessed from the model's name: a generation
prompt that ends with an open <think> (DeepSeek-R1's, Qwen3-Thinking's templates) makes the output
start as reasoning (a <think> the model writes again is dropped); otherwise a <think> at the very
start of the output opens it (Qwen3 writing its own), and an output without one is all answer, left
as it is (Qwen3 with enable_thinking false, whose template writes an empty think block into the
prompt). With continue_final_message, the assistant's message being continued says it. An output
cut short inside its thinking is all reasoning and no content. Whitespace at either end of the
reasoning and at the start of an answer after it is dropped (Qwen3 writes
"<think>\n...\n</think>\n\n"). The output of a request held to a grammar (structured output, a
forced tool call) starts outside any <think> whatever the prompt says: the grammar holds it from
its first token (gateway/jobs.py), so it is all answer unless the grammar itself writes one.

The split is made in the gateway on the text after stop strings, like tool calls
(gateway/tools.py, which then reads the answer only), so a failover resumes thinking as exactly as
any text; streamed pieces add up to the whole answer's for any chunking of the text.
"""

from __future__ import annotations

from gateway.detokenizer import tag_start

START, END = "<think>", "</think>"


def parser_for(template: str) -> str:
    """--reasoning-parser auto: on where the model's chat template knows </think>."""
    return "qwen3" if END in (template or "") else "none"


def opens_thinking(tokenizer, prompt_ids: list[int], continued: str | None = None) -> bool:
    """Whether the output starts inside the thinking: the generation prompt ends with <think>
    (its template started it), or, continuing the assistant's message `continued`, that message
    has a <think> it did not close. (Not any <think> in the prompt: a user may ask about the tag.)"""
    if continued is not None:
        return continued.rfind(START) > continued.rfind(END)
    return tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False).rstrip().endswith(START)


class Thinking:
    """Reads an output's text, piece by piece, into (reasoning, content) to send now."""

    def __init__(self, open_: bool):
        self.state = "start"  # a <think> may still open the output (dropped, if the prompt opened it already)
        self.otherwise = "reasoning" if open_ else "content"  # what the output is if it does not
        self.buf = ""      # text held back: what may be the start of a tag, or whitespace at the end of reasoning
        self.lead = True   # at the start of the reasoning or of an answer after it: whitespace is dropped
        self.opened = False  # the output has been inside the thinking

    def push(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(START):
                    self.state, self.buf, self.lead, self.opened = "reasoning", head[len(START):], True, True
                    continue
                if START.startswith(head):  # nothing yet, or the start of a <think>
                    return reasoning, content
                self._settle()
            if self.state == "reasoning":
                end = self.buf.find(END)
                if end >= 0:
                    reasoning += self._said(self.buf[:end].rstrip())
                    self.state, self.buf, self.lead = "content", self.buf[end + len(END):], True
                    continue
                partial = tag_start(self.buf, END)
                safe = self.buf[:len(self.buf) - partial]
                said = safe.rstrip()
                self.buf = safe[len(said):] + self.buf[len(self.buf) - partial:]
                return reasoning + self._said(said), content
            content += self._said(self.buf)  # the answer: nothing is held back
            self.buf = ""
            return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held once the output has ended."""
        text, self.buf = self.buf, ""
        if self.state == "start":  # a start of a <think> that never came
            self._settle()
        if self.state == "reasoning":
            return self._said(text.rstrip()), ""
        return "", self._said(text)

    def _settle(self) -> None:
        """No <think> opens the output: it is what the prompt says (an answer with no thinking is
        left as it is, whitespace and all)."""
        self.state = self.otherwise
        self.lead = self.opened = self.state == "reasoning"

    def _said(self, text: str) -> str:
        if self.lead:
            text = text.lstrip()
            self.lead = not text
        return text


def split_whole(open_: bool, text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole output (the same as its streamed pieces add up to)."""
    thinking = Thinking(open_)
    reasoning, content = thinking.push(text)
    more_reasoning, more_content = thinking.finish()
    return reasoning + more_reasoning, content + more_content
