"""Typed errors of the agent runtime.

`WorkflowError` means the workflow itself is wrong (fix the definition or the inputs); it is raised
before anything runs and is never retried. The others describe one node's failure at run time.
"""

from __future__ import annotations

from loom.errors import LoomError


class AgentError(LoomError):
    """Base class of the agent runtime's errors."""


class WorkflowError(AgentError, ValueError):
    """The workflow definition or its inputs are invalid: unknown dependency, duplicate name, cycle,
    missing input, bad template, unknown tool."""


class TemplateError(WorkflowError):
    """A `{...}` reference in a template is malformed or names a value that does not exist."""


class SchemaError(AgentError, ValueError):
    """A value does not match its JSON schema. `path` locates the offending part, e.g. `$.steps[2]`."""

    def __init__(self, message: str, path: str = "$"):
        super().__init__(f"{path}: {message}")
        self.path = path


class ToolError(AgentError):
    """A tool call failed: unknown tool, bad arguments, or the tool raised."""


class ToolArgumentError(ToolError, ValueError):
    """A tool's arguments are not a JSON object or do not match its schema; they are never evaluated."""


class OutputError(AgentError, ValueError):
    """An llm node's output is not the JSON its schema asks for (retrying asks the model again)."""


class NodeTimeout(AgentError, TimeoutError):
    """One attempt of a node ran past the node's timeout."""


class MaxStepsExceeded(AgentError):
    """An agent node still wanted to call tools after `max_steps` model calls."""


class RunFailed(AgentError):
    """A run did not finish cleanly; `errors` maps each failed node to its error."""

    def __init__(self, message: str, errors: dict[str, BaseException]):
        super().__init__(message)
        self.errors = errors
