"""Workload generators and the arrival schedule of `loom bench serve` (no server needed)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from loom.bench.serve import arrival_times
from loom.bench.workloads import (
    WORDS,
    DagProgram,
    Request,
    Session,
    WorkloadOptions,
    load_length_table,
    make_workload,
)
from loom.errors import InvalidRequest


def intervals(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_keep_the_requested_mean_rate(burstiness: float):
    rate = 10.0
    times = arrival_times(20001, rate, burstiness, seed=3)
    assert times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))
    gaps = intervals(times)
    assert 20000 / times[-1] == pytest.approx(rate, rel=0.05)
    # A gamma interval of shape k has coefficient of variation 1/sqrt(k): Poisson is 1, bursts are more.
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_arrivals_are_seeded_and_inf_rate_sends_all_at_once():
    assert arrival_times(50, 4.0, 1.0, seed=1) == arrival_times(50, 4.0, 1.0, seed=1)
    assert arrival_times(50, 4.0, 1.0, seed=1) != arrival_times(50, 4.0, 1.0, seed=2)
    assert arrival_times(7, math.inf) == [0.0] * 7


def test_random_workload_lengths_and_seed():
    opts = WorkloadOptions(input_len=40, output_len=20, range_ratio=0.5)
    w = make_workload("random", 30, seed=5, opts=opts)
    assert w.num_requests == 30 and all(isinstance(r, Request) for r in w.items)
    for r in w.items:
        assert 20 <= len(r.prompt.split()) <= 60 and set(r.prompt.split()) <= set(WORDS)
        assert 10 <= r.max_tokens <= 30
    assert len({r.max_tokens for r in w.items}) > 1  # the range is used, not just its middle
    again = make_workload("random", 30, seed=5, opts=opts)
    assert [r.prompt for r in again.items] == [r.prompt for r in w.items]
    other = make_workload("random", 30, seed=6, opts=opts)
    assert [r.prompt for r in other.items] != [r.prompt for r in w.items]


def test_random_workload_token_ids():
    w = make_workload("random", 5, seed=0, opts=WorkloadOptions(input_len=12, token_ids_vocab=100))
    for r in w.items:
        assert isinstance(r.prompt, list) and len(r.prompt) == 12
        assert all(isinstance(t, int) and 0 <= t < 100 for t in r.prompt)


def test_sharegpt_like_draws_pairs_from_the_committed_table():
    table = load_length_table()
    assert 40 <= len(table) <= 60
    w = make_workload("sharegpt-like", 40, seed=0)
    pairs = {(len(r.prompt.split()), r.max_tokens) for r in w.items}
    assert pairs <= set(table)
    assert len(pairs) > 10


def test_shared_prefix_groups():
    opts = WorkloadOptions(num_groups=3, prefix_len=50, input_len=10, output_len=7)
    w = make_workload("shared-prefix", 9, seed=0, opts=opts)
    prefixes = [r.prompt.split("\n\n")[0] for r in w.items]
    assert len(set(prefixes)) == 3
    assert all(prefixes[i] == prefixes[i % 3] for i in range(9))
    assert len({r.prompt for r in w.items}) == 9  # same prefix, different requests
    assert all(len(p.split()) == 50 for p in prefixes) and all(r.max_tokens == 7 for r in w.items)


def test_agent_sessions_build_history_from_answers():
    opts = WorkloadOptions(num_turns=3, system_len=30, input_len=5, output_len=9)
    w = make_workload("agent", 7, seed=0, opts=opts)
    assert [len(s.user_turns) for s in w.items] == [3, 3, 1] and w.num_requests == 7
    s = w.items[0]
    assert isinstance(s, Session) and {x.system for x in w.items} == {s.system}
    req = s.request(2, ["first answer", "second answer"])
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert req.messages[2]["content"] == "first answer" and req.messages[4]["content"] == "second answer"
    assert req.messages[-1]["content"] == s.user_turns[2]
    assert (req.session_id, req.turn, req.max_tokens) == (0, 2, 9)
    with pytest.raises(ValueError):
        s.request(2, ["only one answer"])


def test_dag_programs_fan_out_over_their_own_document_then_fan_in():
    opts = WorkloadOptions(num_branches=3, prefix_len=20, input_len=5, output_len=6)
    w = make_workload("dag", 9, seed=0, opts=opts)
    # 9 requests in programs of 3 branches + 1 summary: rounded up to 3 whole programs.
    assert len(w.items) == 3 and w.num_requests == 12 and w.name == "dag"
    assert all(isinstance(p, DagProgram) and p.num_requests == 4 for p in w.items)
    assert [p.program_index for p in w.items] == [0, 1, 2]
    assert len({p.document for p in w.items}) == 3  # each program its own document
    p = w.items[0]
    assert len(p.document.split()) == 4 + 20 and all(len(q.split()) == 5 for q in p.questions)

    wf = p.to_workflow()
    branches = ["branch_0", "branch_1", "branch_2"]
    assert wf.validate() == [*branches, "summary"]
    assert list(wf.nodes["summary"].deps) == branches
    for b, name in enumerate(branches):
        node = wf.nodes[name]
        assert node.deps == () and node.retries == 0
        assert node.messages == (("system", p.document), ("user", p.questions[b]))
    assert wf.sampling == {"max_tokens": 6}
    first = p.first_request()
    assert first.messages == [
        {"role": "system", "content": p.document},
        {"role": "user", "content": p.questions[0]},
    ]
    assert (first.session_id, first.turn, first.max_tokens) == (0, 0, 6)

    again = make_workload("dag", 9, seed=0, opts=opts)
    assert [(q.document, q.questions) for q in again.items] == [(q.document, q.questions) for q in w.items]
    assert make_workload("dag", 9, seed=1, opts=opts).items[0].document != p.document
    assert make_workload("dag", 1, seed=0, opts=opts).num_requests == 4
    with pytest.raises(InvalidRequest, match="num_branches"):
        make_workload("dag", 4, seed=0, opts=WorkloadOptions(num_branches=0))


def test_jsonl_workload(tmp_path):
    path = tmp_path / "reqs.jsonl"
    lines = [
        {"prompt": "hello there", "max_tokens": 5},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": [1, 2, 3]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    w = make_workload(f"jsonl:{path}", 100, seed=0, opts=WorkloadOptions(output_len=11))
    assert [r.max_tokens for r in w.items] == [5, 11, 11]
    assert w.items[1].messages == lines[1]["messages"] and w.items[2].prompt == [1, 2, 3]
    assert make_workload(f"jsonl:{path}", 2, seed=0).num_requests == 2
    path.write_text('{"prompt": "ok"}\n{"max_tokens": 3}\n')
    with pytest.raises(InvalidRequest, match=":2:"):
        make_workload(f"jsonl:{path}", 10, seed=0)


def test_unknown_workload_is_refused():
    with pytest.raises(InvalidRequest, match="unknown workload"):
        make_workload("sharegpt", 10, seed=0)


def test_phone_agent_sessions_send_one_fresh_screenshot_per_step():
    import base64
    import io

    from PIL import Image

    opts = WorkloadOptions(num_turns=3, input_len=4, output_len=2, system_len=8, screen_size="120x260")
    wl = make_workload("phone-agent", 6, seed=5, opts=opts)
    assert wl.name == "phone-agent" and len(wl.items) == 2
    session = wl.items[0]
    answers = ["tap one", "tap two"]
    urls = []
    for turn in range(3):
        messages = session.request(turn, answers[:turn]).messages
        parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
        images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        # Only the newest user message carries a screenshot; earlier steps keep their text only.
        assert len(images) == 1 and isinstance(messages[-1]["content"], list)
        assert all(isinstance(m["content"], str) for m in messages[:-1])
        assert [m["content"] for m in messages if m["role"] == "assistant"] == answers[:turn]
        raw = base64.b64decode(images[0].split(",", 1)[1])
        assert Image.open(io.BytesIO(raw)).size == (120, 260)
        urls.append(images[0])
    assert len(set(urls)) == 3  # a fresh screen every step: never an encoder-cache hit by content
    with pytest.raises(InvalidRequest):
        make_workload("phone-agent", 2, seed=0, opts=WorkloadOptions(screen_size="big"))
