"""Policies for the agent loop: ``messages -> reply text``.

* :class:`EnginePolicy`: a local checkpoint through the generation engine (the embedded
  qwen2vl-nano by default, or ``--model DIR``). With ``constrain`` (hermes only) the reply is
  decoded under :class:`~qwen2vl.agent.constraint.ToolCallConstraint`: always one well-formed
  ``computer_use`` call, with the action and every coordinate digit the model's own choice.
* :class:`OpenAIPolicy`: any OpenAI-compatible server (``--base-url``), say vLLM or
  ``qwen2vl serve`` with a real Qwen2-VL-7B. The tool block travels in the system message as text
  (Qwen2-VL's own template has no tools branch) and the reply's content is parsed here; images go
  as data URLs.
* :class:`RandomPolicy`: the random-click baseline (uniform over the [0, 1000) grid).
"""

from __future__ import annotations

import base64
import mimetypes
import random
from pathlib import Path

from .actions import COMPUTER_USE
from .tools import call_arguments, format_call, stop_strings


class EnginePolicy:
    def __init__(self, engine, tool_format: str = "hermes", constrain: bool = True, actions: list[str] | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, seed: int | None = None):
        if constrain and tool_format != "hermes":
            raise ValueError("constrained decoding is written for the hermes tool format; use --no-constrain with qwen")
        self.engine, self.tool_format, self.constrain, self.actions = engine, tool_format, constrain, actions
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed

    def __call__(self, messages: list[dict]) -> str:
        extra = {}
        if self.constrain:
            from .constraint import ToolCallConstraint

            extra["constraint"] = ToolCallConstraint(self.engine.tokenizer, COMPUTER_USE, self.actions)
        result = self.engine.generate([messages], max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                      seed=self.seed, stop=stop_strings(self.tool_format) or None, **extra)[0]
        return result.text


def _data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def openai_messages(messages: list[dict]) -> list[dict]:
    """Our messages with image parts as OpenAI ``image_url`` data URLs."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": _data_url(p["image"])}} if p.get("type") == "image"
                       else p for p in content]
        out.append({**message, "content": content})
    return out


class OpenAIPolicy:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 max_tokens: int = 256, temperature: float = 0.0, timeout: float = 120.0):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout)
        self.model = model or self.client.models.list().data[0].id
        self.max_tokens, self.temperature = max_tokens, temperature

    def __call__(self, messages: list[dict]) -> str:
        response = self.client.chat.completions.create(model=self.model, messages=openai_messages(messages),
                                                       max_tokens=self.max_tokens, temperature=self.temperature)
        message = response.choices[0].message
        calls = getattr(message, "tool_calls", None) or []
        text = message.content or ""
        for k, call in enumerate(calls):  # a server that parsed the call itself: back to text for our parser
            try:
                name, arguments = call_arguments({"name": call.function.name, "arguments": call.function.arguments},
                                                 f"tool call {k}")
                text += "\n" + format_call(name, arguments)
            except ValueError:
                text += f"\n<tool_call>\n{call.function.arguments}\n</tool_call>"  # kept, as a malformed call
        return text


class RandomPolicy:
    """A click at a uniformly random bin: the random-click baseline."""

    def __init__(self, seed: int = 0, tool_format: str = "hermes"):
        self.rng, self.tool_format = random.Random(seed), tool_format

    def __call__(self, messages: list[dict]) -> str:
        point = [self.rng.randrange(1000), self.rng.randrange(1000)]
        return format_call("computer_use", {"action": "click", "coordinate": point}, self.tool_format)
