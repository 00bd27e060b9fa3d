"""A reasoning model's thinking, apart from its answer (--reasoning-parser): on chat, the text
between <think> and </think> is the message's `reasoning_content` (and `reasoning`, the name
vLLM uses now), the rest its `content`, streamed or not, as vLLM's and SGLang's reasoning parsers
give them (DeepSeek-R1, QwQ, Qwen3).

Where the output starts is read off the prompt, not guessed from the model's name: a chat template
that ends the prompt inside an open <think> (DeepSeek-R1's, Qwen3-Thinking's) makes the output
start as reasoning; otherwise a <think> at the very start of the output opens it (Qwen3 writing
its own), and an output without one is all answer (Qwen3 with enable_thinking false, whose
template writes an empty think block into the prompt). An output cut short inside its thinking
is all reasoning and no content. Whitespace at either end of the reasoning and at the start of the
answer is dropped (Qwen3 writes "<think>\n...\n</think>\n\n").

The split is made in the gateway on the text after stop strings, like tool calls
(gateway/tools.py, which then reads the answer only), so a failover resumes thinking as exactly as
any text; streamed pieces add up to the whole answer's for any chunking of the text.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("auto", "deepseek_r1", "qwen3", "none")  # deepseek_r1 and qwen3 read alike (see above)


def parser_for(template: str) -> str:
    """--reasoning-parser auto: on where the model's chat template knows </think>."""
    return "qwen3" if END in (template or "") else "none"


def opens_thinking(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the prompt ends inside an open <think> (its template started the thinking)."""
    tail = tokenizer.decode(prompt_ids[-32:], skip_special_tokens=False)
    return tail.rfind(START) > tail.rfind(END)


class Thinking:
    """Reads an output's text, piece by piece, into (reasoning, content) to send now."""

    def __init__(self, open_: bool):
        self.state = "reasoning" if open_ else "start"  # start: a <think> may still open the output
        self.buf = ""      # text held back: what may be the start of a tag, or whitespace at the end of reasoning
        self.lead = True   # at the start of the reasoning or of the answer: whitespace is dropped

    def push(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(START):
                    self.state, self.buf, self.lead = "reasoning", head[len(START):], True
                    continue
                if START.startswith(head):  # nothing yet, or the start of a <think>
                    return reasoning, content
                self.state = "content"
            if self.state == "reasoning":
                end = self.buf.find(END)
                if end >= 0:
                    reasoning += self._said(self.buf[:end].rstrip())
                    self.state, self.buf, self.lead = "content", self.buf[end + len(END):], True
                    continue
                partial = next((k for k in range(len(END) - 1, 0, -1) if self.buf.endswith(END[:k])), 0)
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
        if self.state == "reasoning":
            return self._said(text.rstrip()), ""
        return "", self._said(text)  # a start of a <think> that never came is answer

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
