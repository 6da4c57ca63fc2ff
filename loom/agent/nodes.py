"""One attempt of one node: fill its templates, call the model, the tool or the function, shape the output."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loom.agent.clients import ChatClient, ChatResult, ToolCall
from loom.agent.errors import MaxStepsExceeded, OutputError, SchemaError, ToolError, WorkflowError
from loom.agent.graph import AgentNode, LLMNode, Node, PythonNode, ToolNode
from loom.agent.record import NodeRecord
from loom.agent.schema import validate
from loom.agent.template import INPUT, render, render_value, to_text
from loom.agent.tools import ToolRegistry, parse_arguments

logger = logging.getLogger(__name__)


@dataclass
class NodeContext:
    """What one node attempt may see and use."""

    node: Node
    values: Mapping[str, Any]
    """Template context: {"input": the workflow inputs, dependency name: its output}."""
    client: ChatClient | None
    tools: ToolRegistry
    program_id: str
    sampling: dict
    """The workflow's default sampling parameters (the node's own override them)."""
    record: NodeRecord
    emit: Callable[[str, dict], None]
    """emit(kind, data): an event about this node."""


def parse_json_output(text: str, schema: dict | None) -> Any:
    """The JSON value in a model's reply (bare, or inside a ``` fence, or after some prose), checked
    against schema; raises OutputError."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        value = json.loads(body)
    except ValueError:
        # Models often say a few words first: take the first complete JSON value that starts a line or the text.
        starts = [i for i, c in enumerate(body) if c in "{[" and (i == 0 or body[i - 1] in "\n :")]
        for start in starts:
            try:
                value, _ = json.JSONDecoder().raw_decode(body, start)
                break
            except ValueError:
                continue
        else:
            raise OutputError(f"the reply is not JSON: {text[:200]!r}") from None
    if schema is not None:
        try:
            validate(value, schema)
        except SchemaError as e:
            raise OutputError(f"the reply does not match the output schema: {e}") from e
    return value


def _messages(node: LLMNode, values: Mapping[str, Any]) -> list[dict]:
    return [{"role": role, "content": render(content, values)} for role, content in node.messages]


async def _chat(
    ctx: NodeContext, node: LLMNode, messages: list[dict], tools: list[dict] | None
) -> ChatResult:
    if ctx.client is None:
        raise WorkflowError(f"node {node.name!r} needs a model, but the runtime has no client")
    sampling = {**ctx.sampling, **node.sampling}
    if node.constraint is not None:  # enforced while generating, rather than retried until it parses
        sampling["structured_outputs"] = node.constraint
    result = await ctx.client.chat(
        messages,
        tools,
        program_id=ctx.program_id,
        on_token=lambda text: ctx.emit("token", {"text": text}),
        **sampling,
    )
    usage, record = result.usage, ctx.record
    record.prompt_tokens += usage.prompt_tokens
    record.completion_tokens += usage.completion_tokens
    record.cached_tokens += usage.cached_tokens
    record.llm_calls += 1
    return result


def _answer(node: LLMNode, result: ChatResult) -> Any:
    return parse_json_output(result.content, node.schema) if node.json else result.content


async def run_llm(ctx: NodeContext, node: LLMNode) -> Any:
    specs = ctx.tools.specs(node.tools) if node.tools else None
    result = await _chat(ctx, node, _messages(node, ctx.values), specs)
    if specs and result.tool_calls:
        calls = [{"name": c.name, "arguments": parse_arguments(c.arguments)} for c in result.tool_calls]
        return {"content": result.content, "tool_calls": calls}
    return _answer(node, result)


async def _call_tool(ctx: NodeContext, node: AgentNode, call: ToolCall) -> str:
    """Run one tool call of an agent; a failure becomes the tool's reply, so the model can recover."""
    ctx.record.tool_calls += 1
    try:
        if call.name not in node.tools:
            raise ToolError(f"tool {call.name!r} is not available here (available: {', '.join(node.tools)})")
        result = to_text(await ctx.tools.call(call.name, call.arguments))
        ctx.emit("tool_call", {"tool": call.name, "arguments": call.arguments, "ok": True})
        return result
    except ToolError as e:
        ctx.emit("tool_call", {"tool": call.name, "arguments": call.arguments, "ok": False, "error": str(e)})
        return f"error: {e}"


async def run_agent(ctx: NodeContext, node: AgentNode) -> Any:
    messages = _messages(node, ctx.values)
    specs = ctx.tools.specs(node.tools) if node.tools else None
    for _ in range(node.max_steps):
        result = await _chat(ctx, node, messages, specs)
        if not result.tool_calls:
            return _answer(node, result)
        messages.append(result.message())
        replies = await asyncio.gather(*(_call_tool(ctx, node, c) for c in result.tool_calls))
        for call, reply in zip(result.tool_calls, replies, strict=True):
            messages.append({"role": "tool", "tool_call_id": call.id, "content": reply})
    raise MaxStepsExceeded(f"agent {node.name!r} still calling tools after {node.max_steps} model calls")


async def run_tool(ctx: NodeContext, node: ToolNode) -> Any:
    args = render_value(node.args, ctx.values)
    ctx.record.tool_calls += 1
    return await ctx.tools.call(node.tool, args)


async def run_python(ctx: NodeContext, node: PythonNode) -> Any:
    kwargs = {dep: ctx.values[dep] for dep in node.deps}
    if "inputs" in inspect.signature(node.fn).parameters and "inputs" not in kwargs:
        kwargs["inputs"] = ctx.values[INPUT]
    result = node.fn(**kwargs)
    return await result if inspect.isawaitable(result) else result


async def run_node(ctx: NodeContext) -> Any:
    """Run one attempt of ctx.node and return its output."""
    node = ctx.node
    if isinstance(node, AgentNode):
        return await run_agent(ctx, node)
    if isinstance(node, LLMNode):
        return await run_llm(ctx, node)
    if isinstance(node, ToolNode):
        return await run_tool(ctx, node)
    if isinstance(node, PythonNode):
        return await run_python(ctx, node)
    raise WorkflowError(f"node {node.name!r} has unknown kind {type(node).__name__}")
