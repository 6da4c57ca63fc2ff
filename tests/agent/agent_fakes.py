"""A scripted ChatClient for the agent tests (imported as `agent_fakes`: this directory is on sys.path)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loom.agent.clients import ChatResult, ToolCall, Usage

Reply = str | ChatResult | Exception


@dataclass
class FakeClient:
    """A ChatClient whose replies are scripted: a test double for the model's *output*.

    `replies` is a list consumed in order (the last one repeats) or a function of the messages.
    """

    replies: list[Reply] | Callable[[list[dict]], Reply] = field(default_factory=lambda: ["ok"])
    delay: float = 0.0
    calls: list[dict[str, Any]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)

    def end_program(self, program_id: str) -> None:
        self.ended.append(program_id)

    async def chat(self, messages, tools=None, *, program_id=None, on_token=None, **sampling) -> ChatResult:
        self.calls.append(
            {"messages": messages, "tools": tools, "program_id": program_id, "sampling": sampling}
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if callable(self.replies):
            reply = self.replies(messages)
        else:
            reply = self.replies[min(len(self.calls), len(self.replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, str):
            reply = ChatResult(reply, usage=Usage(len(str(messages)), len(reply.split()), 0, calls=1))
        if on_token is not None:
            for word in reply.content.split(" "):
                on_token(word)
        return reply


def tool_call_reply(name: str, arguments: str, call_id: str = "call_1") -> ChatResult:
    return ChatResult("", [ToolCall(call_id, name, arguments)], Usage(10, 5, 0, calls=1), "tool_calls")
