"""loom's agent runtime: workflows as DAGs of LLM, agent, tool and Python nodes, run as asyncio dataflow
on loom's in-process engine or any OpenAI-compatible API."""

from loom.agent.builtin_tools import builtin_tools, calculator, make_read_file
from loom.agent.clients import ChatClient, ChatResult, EngineClient, OpenAIClient, ToolCall, Usage
from loom.agent.errors import (
    AgentError,
    MaxStepsExceeded,
    NodeTimeout,
    OutputError,
    RunFailed,
    SchemaError,
    TemplateError,
    ToolArgumentError,
    ToolError,
    WorkflowError,
)
from loom.agent.events import Event
from loom.agent.graph import AgentNode, LLMNode, PythonNode, ToolNode, Workflow
from loom.agent.loader import load_workflow, workflow_from_dict, workflow_from_yaml
from loom.agent.record import NodeRecord, RunRecord
from loom.agent.runtime import CONTINUE, FAIL_FAST, RunHandle, RunResult, Runtime
from loom.agent.tools import Tool, ToolRegistry, tool

__all__ = [
    "CONTINUE",
    "FAIL_FAST",
    "AgentError",
    "AgentNode",
    "ChatClient",
    "ChatResult",
    "EngineClient",
    "Event",
    "LLMNode",
    "MaxStepsExceeded",
    "NodeRecord",
    "NodeTimeout",
    "OpenAIClient",
    "OutputError",
    "PythonNode",
    "RunFailed",
    "RunHandle",
    "RunRecord",
    "RunResult",
    "Runtime",
    "SchemaError",
    "TemplateError",
    "Tool",
    "ToolArgumentError",
    "ToolCall",
    "ToolError",
    "ToolNode",
    "ToolRegistry",
    "Usage",
    "Workflow",
    "WorkflowError",
    "builtin_tools",
    "calculator",
    "load_workflow",
    "make_read_file",
    "tool",
    "workflow_from_dict",
    "workflow_from_yaml",
]
