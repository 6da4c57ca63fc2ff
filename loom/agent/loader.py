"""Workflows from YAML (or any dict): the same nodes the Python builder makes.

```yaml
name: example
inputs: [question]            # or {question: null, style: "short"}: null means required
sampling: {max_tokens: 64}    # defaults of every llm/agent node
nodes:
  - name: answer
    kind: llm                 # llm | agent | tool | python
    system: You are terse.
    prompt: "{input.question}"
  - name: double
    kind: tool
    tool: calculator
    args: {expression: "2 * ({answer.value})"}
```
Python nodes name a function from the `functions` mapping given to the loader (YAML never names code
to import). Unknown keys are errors, so a typo does not silently change a workflow.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from loom.agent.errors import WorkflowError
from loom.agent.graph import REQUIRED, AgentNode, LLMNode, Node, PythonNode, ToolNode, Workflow, make_messages

_COMMON = {"name", "kind", "deps", "timeout", "retries", "backoff"}
_LLM = _COMMON | {"prompt", "system", "messages", "tools", "output", "schema", "regex", "grammar", "sampling"}
_KEYS = {
    "llm": _LLM,
    "agent": _LLM | {"max_steps"},
    "tool": _COMMON | {"tool", "args"},
    "python": _COMMON | {"function"},
}


async def collect(**outputs: Any) -> dict[str, Any]:
    """Gather the dependencies' outputs into one dict, keyed by node name."""
    return outputs


BUILTIN_FUNCTIONS: Mapping[str, Callable[..., Any]] = types.MappingProxyType({"collect": collect})
"""Functions every YAML workflow may name in a python node."""


def _inputs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return dict.fromkeys(value, REQUIRED)
    if isinstance(value, dict):
        return {k: REQUIRED if v is None else v for k, v in value.items()}
    raise WorkflowError("inputs must be a list of names or a mapping of name -> default (null: required)")


def _node(spec: Any, functions: Mapping[str, Callable[..., Any]]) -> Node:
    if not isinstance(spec, dict) or "name" not in spec:
        raise WorkflowError(f"each node must be a mapping with a name, got {spec!r}")
    name, kind = spec["name"], spec.get("kind", "llm")
    if kind not in _KEYS:
        raise WorkflowError(f"node {name!r}: unknown kind {kind!r} (one of {', '.join(_KEYS)})")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise WorkflowError(
            f"node {name!r} ({kind}): unknown keys {unknown} (allowed: {sorted(_KEYS[kind])})"
        )
    common = {k: spec[k] for k in ("timeout", "retries", "backoff") if k in spec}
    deps = spec.get("deps", [])
    if isinstance(deps, str) or not isinstance(deps, list):
        raise WorkflowError(f"node {name!r}: deps must be a list of node names")
    common.update(name=name, deps=tuple(deps))
    try:
        if kind in ("llm", "agent"):
            output = spec.get("output", "text")
            if output not in ("text", "json"):
                raise WorkflowError(f"node {name!r}: output must be 'text' or 'json', got {output!r}")
            llm = dict(
                messages=make_messages(spec.get("prompt"), spec.get("system"), spec.get("messages")),
                tools=tuple(spec.get("tools", ())),
                json=output == "json",
                schema=spec.get("schema"),
                regex=spec.get("regex"),
                grammar=spec.get("grammar"),
                sampling=dict(spec.get("sampling") or {}),
            )
            if kind == "agent":
                return AgentNode(**common, **llm, max_steps=spec.get("max_steps", 8))
            return LLMNode(**common, **llm)
        if kind == "tool":
            if "tool" not in spec:
                raise WorkflowError(f"tool node {name!r} needs a `tool`")
            return ToolNode(**common, tool=spec["tool"], args=dict(spec.get("args") or {}))
        fn_name = spec.get("function")
        available = {**BUILTIN_FUNCTIONS, **functions}
        if fn_name not in available:
            raise WorkflowError(
                f"python node {name!r}: function {fn_name!r} is not among the functions given to the loader "
                f"({', '.join(sorted(available))})"
            )
        return PythonNode(**common, fn=available[fn_name])
    except TypeError as e:  # a wrong value type in the YAML, e.g. a list where a string belongs
        raise WorkflowError(f"node {name!r}: {e}") from e


def workflow_from_dict(
    data: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]] | None = None
) -> Workflow:
    """A Workflow from its dict form (what `yaml.safe_load` gives); raises WorkflowError when malformed."""
    if not isinstance(data, Mapping):
        raise WorkflowError(f"a workflow must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {"name", "description", "inputs", "sampling", "nodes"})
    if unknown:
        raise WorkflowError(f"unknown workflow keys {unknown}")
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise WorkflowError("a workflow needs `nodes`: a non-empty list of node mappings")
    wf = Workflow(
        name=data.get("name", "workflow"),
        inputs=_inputs(data.get("inputs")),
        sampling=dict(data.get("sampling") or {}),
    )
    for spec in nodes:
        wf.add(_node(spec, functions or {}))
    return wf


MAX_YAML_CHARS = 1 << 20
"""Longest workflow text accepted."""
MAX_YAML_NODES = 100_000
"""Most YAML values in a workflow with every alias expanded: a few anchors that repeat each other
("billion laughs") would otherwise expand to billions of values in whatever walks the result."""
MAX_YAML_DEPTH = 64
"""Deepest nesting accepted (composing a YAML document recurses once per level)."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents nesting deeper than MAX_YAML_DEPTH."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise WorkflowError(f"the workflow nests deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a composed document whose aliases expand past MAX_YAML_NODES values, or refer to
    themselves. An alias is the very node it repeats, so sizes are memoized per node: linear time."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] > MAX_YAML_NODES:
                raise WorkflowError(
                    f"the workflow expands to more than {MAX_YAML_NODES} values (aliases repeat what they "
                    "name: nested anchors multiply); refused"
                )
        elif key in on_path:
            raise WorkflowError("the workflow has an alias inside the value it names (a recursive structure)")
        elif key not in size:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in size)


def workflow_from_yaml(text: str, functions: Mapping[str, Callable[..., Any]] | None = None) -> Workflow:
    """A Workflow from YAML text: safe tags only (none build Python objects), and bounded in size,
    nesting and alias expansion, so a hostile file is refused at once rather than eating the machine."""
    if len(text) > MAX_YAML_CHARS:
        raise WorkflowError(f"the workflow is {len(text)} characters; the limit is {MAX_YAML_CHARS}")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        data = None
        if node is not None:
            _check_expansion(node)
            data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise WorkflowError(f"the workflow is not valid YAML: {e}") from e
    finally:
        loader.dispose()
    return workflow_from_dict(data, functions)


def load_workflow(path: str | Path, functions: Mapping[str, Callable[..., Any]] | None = None) -> Workflow:
    """Read a workflow YAML file."""
    path = Path(path)
    # UTF-8 takes at most 4 bytes a character: a file this large is over the limit without reading it.
    if path.stat().st_size > 4 * MAX_YAML_CHARS:
        raise WorkflowError(f"{path} is larger than {MAX_YAML_CHARS} characters")
    return workflow_from_yaml(path.read_text(), functions)
