"""Workflows as DAGs: named nodes (llm, agent, tool, python) with dependencies, and their validation.

A node's dependencies are the names it lists in `deps` plus every node its templates reference, so
`prompt="Summarize {a} and {b.title}"` depends on `a` and `b` without saying so twice. Everything that
can be checked before a run is checked in `Workflow.validate`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loom.agent.errors import WorkflowError
from loom.agent.template import INPUT, Ref, references, value_references

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REQUIRED: Any = inspect.Parameter.empty
"""Default of an input that has none: the caller must supply it."""
ROLES = ("system", "user", "assistant")

Messages = tuple[tuple[str, str], ...]


def make_messages(
    prompt: str | None = None, system: str | None = None, messages: Iterable[Mapping[str, str]] | None = None
) -> Messages:
    """(role, content template) pairs: `system` first, then `messages`, then `prompt` as a user turn."""
    out: list[tuple[str, str]] = []
    if system is not None:
        out.append(("system", system))
    for m in messages or ():
        if set(m) != {"role", "content"} or m["role"] not in ROLES or not isinstance(m["content"], str):
            raise WorkflowError(f"a message must be {{role: {'|'.join(ROLES)}, content: str}}, got {m!r}")
        out.append((m["role"], m["content"]))
    if prompt is not None:
        out.append(("user", prompt))
    if not out:
        raise WorkflowError("an llm or agent node needs a prompt, a system prompt or messages")
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Node:
    """What every node has: a name, dependencies, and how hard to try."""

    kind: ClassVar[str] = ""
    name: str
    deps: tuple[str, ...] = ()
    """Nodes that must finish first; template references are added automatically."""
    timeout: float | None = None
    """Seconds one attempt may take; None is no limit."""
    retries: int = 0
    """Further attempts after a failure (WorkflowErrors are never retried)."""
    backoff: float = 0.5
    """Seconds before the first retry; doubled before each next one."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name) or self.name == INPUT:
            raise WorkflowError(f"node name {self.name!r} must be an identifier other than {INPUT!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise WorkflowError(f"node {self.name!r}: timeout must be > 0, got {self.timeout}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise WorkflowError(f"node {self.name!r}: retries must be an integer >= 0, got {self.retries!r}")
        if self.backoff < 0:
            raise WorkflowError(f"node {self.name!r}: backoff must be >= 0, got {self.backoff}")
        refs = [r.root for r in self.references() if r.root != INPUT]
        # Frozen: normalizing deps once here keeps equality and validation simple.
        object.__setattr__(self, "deps", tuple(dict.fromkeys([*self.deps, *refs])))

    def references(self) -> list[Ref]:
        """Every `{...}` reference in this node's templates (parsing them raises on a bad template)."""
        return []


@dataclass(frozen=True, kw_only=True)
class LLMNode(Node):
    """One chat request; output is the reply text, or the parsed JSON when `json`/`schema` is set.

    With `tools` the model may answer with tool calls instead; the output is then
    `{"content": str, "tool_calls": [{"name": str, "arguments": dict}]}` (calls are not run: use an
    agent node for that).
    """

    kind: ClassVar[str] = "llm"
    messages: Messages
    tools: tuple[str, ...] = ()
    json: bool = False
    schema: dict | None = None
    """JSON schema the parsed output must match (implies json). The engine enforces it while generating
    (structured output); the reply is still checked after."""
    regex: str | None = None
    """A regular expression the whole reply must match, enforced by the engine; the output is the text."""
    grammar: str | None = None
    """A Lark (or GBNF) grammar the reply must match, enforced by the engine; the output is the text."""
    sampling: dict = field(default_factory=dict)
    """Sampling parameters (max_tokens, temperature, seed, ...), over the workflow's defaults."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", tuple(self.tools))
        object.__setattr__(self, "json", self.json or self.schema is not None)
        given = [k for k in ("schema", "regex", "grammar") if getattr(self, k) is not None]
        if len(given) > 1:
            raise WorkflowError(f"node {self.name!r}: give at most one of schema, regex and grammar")
        if self.tools and (self.regex is not None or self.grammar is not None):
            raise WorkflowError(f"node {self.name!r}: a regex or grammar cannot be combined with tools")
        super().__post_init__()

    @property
    def constraint(self) -> dict | None:
        """What the engine constrains the reply to, as vLLM's structured_outputs (None: free text)."""
        if self.schema is not None:
            return {"json": self.schema}
        if self.regex is not None:
            return {"regex": self.regex}
        if self.grammar is not None:
            return {"grammar": self.grammar}
        return None

    def references(self) -> list[Ref]:
        return [r for _, content in self.messages for r in references(content)]


@dataclass(frozen=True, kw_only=True)
class AgentNode(LLMNode):
    """A tool-calling loop: model -> tool calls -> results -> model, until it answers or max_steps."""

    kind: ClassVar[str] = "agent"
    max_steps: int = 8
    """Most model calls; still calling tools after that is a MaxStepsExceeded failure."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise WorkflowError(f"node {self.name!r}: max_steps must be an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class ToolNode(Node):
    """Calls a registered tool with `args` (templates filled in, then checked against the tool's schema)."""

    kind: ClassVar[str] = "tool"
    tool: str
    args: dict = field(default_factory=dict)

    def references(self) -> list[Ref]:
        return value_references(self.args)


@dataclass(frozen=True, kw_only=True)
class PythonNode(Node):
    """Calls `fn` (sync or async) with each dependency's output as a keyword argument named after it,
    plus `inputs=` (the workflow inputs) if fn has that parameter. Without `deps`, the function's
    parameter names are its dependencies."""

    kind: ClassVar[str] = "python"
    fn: Callable[..., Any]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise WorkflowError(f"python node {self.name!r}: fn must be callable, got {self.fn!r}")
        if not self.deps:
            # `def merge(a, b)` depends on nodes a and b unless deps say otherwise.
            params = inspect.signature(self.fn).parameters.values()
            named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            object.__setattr__(self, "deps", tuple(n for n in named if n != "inputs"))
        super().__post_init__()

    def accepts(self, name: str) -> bool:
        params = inspect.signature(self.fn).parameters
        return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


NODE_KINDS: dict[str, type[Node]] = {c.kind: c for c in (LLMNode, AgentNode, ToolNode, PythonNode)}


@dataclass
class Workflow:
    """A DAG of nodes, built in Python (`wf.llm(...)`, `@wf.node(...)`) or loaded from YAML."""

    name: str = "workflow"
    inputs: dict[str, Any] = field(default_factory=dict)
    """Declared inputs, name -> default (REQUIRED when the caller must give it)."""
    sampling: dict = field(default_factory=dict)
    """Default sampling parameters of every llm and agent node."""
    nodes: dict[str, Node] = field(default_factory=dict)

    def add(self, node: Node) -> Node:
        if node.name in self.nodes:
            raise WorkflowError(f"duplicate node name {node.name!r} in workflow {self.name!r}")
        self.nodes[node.name] = node
        return node

    def llm(
        self,
        name: str,
        prompt: str | None = None,
        *,
        system: str | None = None,
        messages: Iterable[Mapping[str, str]] | None = None,
        tools: Iterable[str] = (),
        json: bool = False,
        schema: dict | None = None,
        regex: str | None = None,
        grammar: str | None = None,
        deps: Iterable[str] = (),
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 0.5,
        **sampling: Any,
    ) -> LLMNode:
        """Add an llm node; extra keyword arguments are sampling parameters (max_tokens=...)."""
        return self.add(
            LLMNode(
                name=name,
                messages=make_messages(prompt, system, messages),
                tools=tuple(tools),
                json=json,
                schema=schema,
                regex=regex,
                grammar=grammar,
                sampling=sampling,
                deps=tuple(deps),
                timeout=timeout,
                retries=retries,
                backoff=backoff,
            )
        )

    def agent(
        self,
        name: str,
        prompt: str | None = None,
        *,
        tools: Iterable[str],
        max_steps: int = 8,
        system: str | None = None,
        messages: Iterable[Mapping[str, str]] | None = None,
        deps: Iterable[str] = (),
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 0.5,
        **sampling: Any,
    ) -> AgentNode:
        """Add an agent node (a tool-calling loop of at most max_steps model calls)."""
        return self.add(
            AgentNode(
                name=name,
                messages=make_messages(prompt, system, messages),
                tools=tuple(tools),
                max_steps=max_steps,
                sampling=sampling,
                deps=tuple(deps),
                timeout=timeout,
                retries=retries,
                backoff=backoff,
            )
        )

    def tool(
        self,
        name: str,
        tool: str,
        args: dict | None = None,
        *,
        deps: Iterable[str] = (),
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 0.5,
    ) -> ToolNode:
        """Add a tool node calling the registered tool `tool` with templated `args`."""
        return self.add(
            ToolNode(
                name=name,
                tool=tool,
                args=dict(args or {}),
                deps=tuple(deps),
                timeout=timeout,
                retries=retries,
                backoff=backoff,
            )
        )

    def python(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        deps: Iterable[str] = (),
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 0.5,
    ) -> PythonNode:
        """Add a python node running fn(**{dep: output})."""
        return self.add(
            PythonNode(name=name, fn=fn, deps=tuple(deps), timeout=timeout, retries=retries, backoff=backoff)
        )

    def node(
        self,
        *,
        deps: Iterable[str] = (),
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 0.5,
    ) -> Callable[[Callable], Callable]:
        """Decorator form of `python`: `@wf.node(deps=["a"])` adds the function as a node named after it."""

        def register(fn: Callable) -> Callable:
            self.python(name or fn.__name__, fn, deps=deps, timeout=timeout, retries=retries, backoff=backoff)
            return fn

        return register

    # ---- validation ----------------------------------------------------------------------------

    def validate(self, inputs: Mapping[str, Any] | None = None, tools: Any = None) -> list[str]:
        """Check the graph (and the inputs and tools when given); return the node names in a topological order.

        Raises WorkflowError on an unknown dependency, a cycle, an unknown tool, a python node that
        cannot take its dependencies, or (with inputs) a missing or unknown input.
        """
        for node in self.nodes.values():
            for dep in node.deps:
                if dep not in self.nodes:
                    raise WorkflowError(f"node {node.name!r} depends on unknown node {dep!r}")
            if isinstance(node, PythonNode):
                for dep in node.deps:
                    if not node.accepts(dep):
                        raise WorkflowError(
                            f"python node {node.name!r}: its function takes no argument {dep!r}"
                        )
            if tools is not None:
                names = [node.tool] if isinstance(node, ToolNode) else getattr(node, "tools", ())
                for t in names:
                    if t not in tools:
                        raise WorkflowError(f"node {node.name!r} uses unknown tool {t!r}")
        order = self._topological_order()
        if inputs is not None:
            self.resolve_inputs(inputs)
        return order

    def input_uses(self) -> dict[str, list[str]]:
        """Input name -> the nodes whose templates read it."""
        uses: dict[str, list[str]] = {}
        for node in self.nodes.values():
            for ref in node.references():
                if ref.root == INPUT:
                    key = ref.path[0] if ref.path else ""
                    uses.setdefault(key, []).append(node.name)
        return uses

    def resolve_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The inputs with defaults filled in; raise WorkflowError if one is missing or unknown."""
        uses = self.input_uses()
        if "" in uses:
            raise WorkflowError(f"nodes {uses['']} reference {{input}} as a whole; name a key: {{input.key}}")
        if self.inputs:
            unknown = sorted(set(inputs) - set(self.inputs))
            if unknown:
                raise WorkflowError(f"unknown inputs {unknown} (declared: {sorted(self.inputs)})")
            undeclared = sorted(set(uses) - set(self.inputs))
            if undeclared:
                raise WorkflowError(f"inputs {undeclared} are used by nodes but not declared in inputs")
        resolved = {k: v for k, v in self.inputs.items() if v is not REQUIRED} | dict(inputs)
        needed = {k for k, v in self.inputs.items() if v is REQUIRED} | set(uses)
        missing = sorted(needed - set(resolved))
        if missing:
            used_by = "; ".join(f"{k} used by {', '.join(uses.get(k, [])) or 'no node'}" for k in missing)
            raise WorkflowError(f"missing input {', '.join(map(repr, missing))} ({used_by})")
        return resolved

    def dependents(self) -> dict[str, list[str]]:
        """Node name -> the nodes that depend on it directly."""
        out: dict[str, list[str]] = {name: [] for name in self.nodes}
        for node in self.nodes.values():
            for dep in node.deps:
                out[dep].append(node.name)
        return out

    def _topological_order(self) -> list[str]:
        """Dependencies before dependents, otherwise in declaration order. Iterative: a chain of
        thousands of nodes declared in reverse order would overflow Python's stack if this recursed."""
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        order: list[str] = []
        end = object()
        for start in self.nodes:
            if start in state:
                continue
            state[start] = 1
            path = [start]
            pending = [iter(self.nodes[start].deps)]  # the deps still to visit, per node on the path
            while path:
                dep = next(pending[-1], end)
                if dep is end:
                    name = path.pop()
                    pending.pop()
                    state[name] = 2
                    order.append(name)
                elif state.get(dep) == 1:
                    cycle = path[path.index(dep) :] + [dep]
                    raise WorkflowError(f"dependency cycle: {' -> '.join(cycle)} (x -> y: x depends on y)")
                elif dep not in state:
                    state[dep] = 1
                    path.append(dep)
                    pending.append(iter(self.nodes[dep].deps))
        return order
