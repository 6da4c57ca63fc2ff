"""Workflow definitions: the builder and YAML agree, templates are data-only, bad graphs are refused."""

from __future__ import annotations

import pytest

from loom.agent.errors import TemplateError, WorkflowError
from loom.agent.graph import REQUIRED, Workflow
from loom.agent.loader import workflow_from_dict, workflow_from_yaml
from loom.agent.template import render, render_value


async def merge(draft: str, facts: dict) -> dict:
    return {"draft": draft, "facts": facts}


YAML = """
name: demo
inputs: {topic: null, style: short}
sampling: {max_tokens: 32}
nodes:
  - name: facts
    kind: tool
    tool: calculator
    args: {expression: "{input.topic}"}
    retries: 2
    backoff: 0.1
  - name: draft
    kind: llm
    system: Be {input.style}.
    prompt: "Write about {input.topic} using {facts}."
    sampling: {temperature: 0.5}
    timeout: 30
  - name: checker
    kind: agent
    tools: [calculator]
    max_steps: 3
    prompt: Check {draft}
  - name: plan
    kind: llm
    prompt: Plan {input.topic}
    schema: {type: object, required: [steps], properties: {steps: {type: array}}}
  - name: merge
    kind: python
    function: merge
"""


def python_workflow() -> Workflow:
    wf = Workflow("demo", inputs={"topic": REQUIRED, "style": "short"}, sampling={"max_tokens": 32})
    wf.tool("facts", "calculator", {"expression": "{input.topic}"}, retries=2, backoff=0.1)
    wf.llm(
        "draft",
        "Write about {input.topic} using {facts}.",
        system="Be {input.style}.",
        timeout=30,
        temperature=0.5,
    )
    wf.agent("checker", "Check {draft}", tools=["calculator"], max_steps=3)
    wf.llm(
        "plan",
        "Plan {input.topic}",
        schema={"type": "object", "required": ["steps"], "properties": {"steps": {"type": "array"}}},
    )
    wf.node()(merge)
    return wf


def test_yaml_and_python_definitions_make_the_same_graph():
    from_yaml = workflow_from_yaml(YAML, functions={"merge": merge})
    from_python = python_workflow()
    assert from_yaml == from_python
    assert from_yaml.nodes["draft"].deps == ("facts",)  # inferred from the template
    assert from_yaml.nodes["merge"].deps == ("draft", "facts")  # inferred from the parameters
    assert from_yaml.nodes["plan"].json
    assert from_yaml.validate() == ["facts", "draft", "checker", "plan", "merge"]


def test_unknown_dependency_is_refused():
    wf = Workflow()
    wf.llm("a", "hi", deps=["ghost"])
    with pytest.raises(WorkflowError, match="unknown node 'ghost'"):
        wf.validate()
    wf = Workflow()
    wf.llm("a", "use {ghost.field}")
    with pytest.raises(WorkflowError, match="unknown node 'ghost'"):
        wf.validate()


def test_duplicate_names_are_refused_in_python_and_yaml():
    wf = Workflow()
    wf.llm("a", "hi")
    with pytest.raises(WorkflowError, match="duplicate node name 'a'"):
        wf.llm("a", "again")
    with pytest.raises(WorkflowError, match="duplicate node name 'a'"):
        workflow_from_yaml("nodes: [{name: a, prompt: x}, {name: a, prompt: y}]")


def test_cycle_error_prints_the_cycle():
    wf = Workflow()
    wf.llm("a", "{b}")
    wf.llm("b", "{c}")
    wf.llm("c", "{a}")
    wf.llm("d", "independent")
    with pytest.raises(WorkflowError, match="a -> b -> c -> a"):
        wf.validate()
    wf = Workflow()
    wf.llm("selfish", "x", deps=["selfish"])
    with pytest.raises(WorkflowError, match="selfish -> selfish"):
        wf.validate()


def test_inputs_missing_unknown_and_defaults():
    wf = workflow_from_yaml(YAML, functions={"merge": merge})
    with pytest.raises(WorkflowError, match="missing input 'topic'.*facts"):
        wf.resolve_inputs({})
    with pytest.raises(WorkflowError, match="unknown inputs \\['topc'\\]"):
        wf.resolve_inputs({"topic": "x", "topc": "y"})
    assert wf.resolve_inputs({"topic": "x"}) == {"topic": "x", "style": "short"}
    undeclared = Workflow()
    undeclared.llm("a", "{input.q}")
    with pytest.raises(WorkflowError, match="missing input 'q'"):
        undeclared.validate(inputs={})


def test_bad_definitions_fail_at_definition_time():
    wf = Workflow()
    with pytest.raises(TemplateError):
        wf.llm("a", "{__import__('os').system('x')}")
    with pytest.raises(TemplateError):
        wf.llm("a", "a lone } brace")
    with pytest.raises(WorkflowError, match="identifier"):
        wf.llm("input", "reserved name")
    with pytest.raises(WorkflowError, match="unknown keys \\['promt'\\]"):
        workflow_from_yaml("nodes: [{name: a, promt: typo}]")
    with pytest.raises(WorkflowError, match="not among the functions"):
        workflow_from_yaml("nodes: [{name: a, kind: python, function: os.system}]")
    with pytest.raises(WorkflowError, match="not valid YAML"):
        workflow_from_yaml("nodes: [unclosed")
    with pytest.raises(WorkflowError, match="mapping"):
        workflow_from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_python_node_must_accept_its_dependencies_and_tools_must_exist():
    wf = Workflow()
    wf.llm("a", "x")
    wf.python("b", lambda other: other, deps=["a"])
    with pytest.raises(WorkflowError, match="takes no argument 'a'"):
        wf.validate()
    wf = Workflow()
    wf.tool("t", "nope")
    with pytest.raises(WorkflowError, match="unknown tool 'nope'"):
        wf.validate(tools={"calculator"})


def test_templates_read_data_only():
    context = {"input": {"q": "why"}, "plan": {"steps": ["one", "two"], "n": 2}, "text": "hello"}
    assert render("{{literal}} {input.q} {plan.steps.1} {text}", context) == "{literal} why two hello"
    assert render("{plan.steps}", context) == '["one", "two"]'
    assert render_value({"n": "{plan.n}", "s": "n={plan.n}"}, context) == {"n": 2, "s": "n=2"}
    # No attribute access: str.format would happily walk {text.__class__}.
    with pytest.raises(TemplateError, match="no field '__class__'"):
        render("{text.__class__}", context)
    with pytest.raises(TemplateError, match="has 2 items"):
        render("{plan.steps.5}", context)
    with pytest.raises(TemplateError):
        render("{text[0]}", context)


def _reverse_chain(n: int) -> str:
    """YAML of n python nodes, each depending on the next one declared: the whole chain in reverse."""
    lines = ["name: chain", "nodes:"]
    for i in range(n):
        deps = f"[n{i + 1}]" if i + 1 < n else "[]"
        lines.append(f"  - {{name: n{i}, kind: python, function: step, deps: {deps}}}")
    return "\n".join(lines)


def test_a_long_chain_declared_in_reverse_orders_and_runs():
    """1,500 nodes, each declared before its dependency: the recursive topological sort hit Python's
    recursion limit (RecursionError) here."""
    import asyncio

    from loom.agent.runtime import Runtime

    def step(**upstream: int) -> int:
        return 1 + sum(upstream.values())

    wf = workflow_from_yaml(_reverse_chain(1500), functions={"step": step})
    assert wf.validate() == [f"n{i}" for i in reversed(range(1500))]
    result = asyncio.run(Runtime().run(wf))
    assert result.ok and result.outputs["n0"] == 1500
    # A cycle closing such a chain is still reported, with its whole path.
    wf.nodes["n1499"] = type(wf.nodes["n1499"])(name="n1499", fn=step, deps=("n0",))
    with pytest.raises(WorkflowError, match=r"dependency cycle: n0 -> n1 -> .* -> n1499 -> n0"):
        wf.validate()


def _alias_bomb(levels: int) -> str:
    """The "billion laughs": each anchor repeats the one before 9 times (9**levels values)."""
    lines = ["name: bomb", "description:", "  l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    lines += [
        "nodes:",
        f"  - {{name: t, kind: tool, tool: calculator, args: {{expression: '1', junk: *l{levels}}}}}",
    ]
    return "\n".join(lines)


def test_yaml_alias_bombs_and_deep_nesting_are_refused():
    """9 levels of aliases expand to 387 million values: walking the tool's args took minutes. Now the
    expansion is counted (once per anchor) before anything is built."""
    with pytest.raises(WorkflowError, match="expands to more than 100000 values"):
        workflow_from_yaml(_alias_bomb(9))
    small = workflow_from_yaml(_alias_bomb(3))  # 9**4 = 6,561 values: fine
    assert small.nodes["t"].args["junk"][0][0][0] == ["x"] * 9
    with pytest.raises(WorkflowError, match="alias inside the value it names"):
        workflow_from_yaml("name: loop\nsampling: &s {again: *s}\nnodes: [{name: a, prompt: x}]")
    with pytest.raises(WorkflowError, match="nests deeper than 64"):
        workflow_from_yaml(
            "name: deep\ndescription: " + "[" * 5000 + "]" * 5000 + "\nnodes: [{name: a, prompt: x}]"
        )
    with pytest.raises(WorkflowError, match="characters; the limit is"):
        workflow_from_yaml("name: big\ndescription: '" + "x" * (1 << 20) + "'\nnodes: [{name: a, prompt: x}]")


def test_anchors_that_share_settings_still_work():
    wf = workflow_from_yaml(
        """
name: shared
nodes:
  - {name: a, prompt: one, sampling: &fast {max_tokens: 8, temperature: 0}}
  - {name: b, prompt: two, sampling: *fast}
"""
    )
    assert wf.nodes["a"].sampling == wf.nodes["b"].sampling == {"max_tokens": 8, "temperature": 0}
