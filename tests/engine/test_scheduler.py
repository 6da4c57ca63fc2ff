"""Scheduler: exactly which (request, num_new_tokens) each step schedules under a token budget, sequence
cap and block pool, and whom it preempts. Each step runs the real loop through the typed boundary:
schedule(), a model-free runner that samples token 900 + the output index where a step reaches the end
of a sequence, then update_from_output()."""

from __future__ import annotations

import pytest
from step_loop import make_req, make_scheduler, run_step, step

from loom.engine.request import RequestStatus
from loom.engine.scheduler import Scheduler


def plan(out) -> list[tuple[str, int]]:
    return out.plan


# ---- budget, chunking, sequence cap -----------------------------------------------------------------


def test_running_first_then_new_prompts_under_budget():
    sched = make_scheduler(budget=8)
    a, b = make_req("a", range(6)), make_req("b", range(10, 16))
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert plan(out) == [("a", 6), ("b", 2)]
    assert out.sampled == [True, False]
    assert a.output_token_ids == [900] and b.num_computed_tokens == 2

    sched.add(make_req("c", range(20, 25)))
    # a's decode and b's remaining chunk come before the new prompt c, which gets what is left.
    out = run_step(sched)
    assert plan(out) == [("a", 1), ("b", 4), ("c", 3)]
    assert out.sampled == [True, True, False]
    assert step(sched) == [("a", 1), ("b", 1), ("c", 2)]
    assert step(sched) == [("a", 1), ("b", 1), ("c", 1)]
    assert sched.num_running == 3 and sched.num_waiting == 0


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    sched = make_scheduler(budget=4)
    a = make_req("a", range(10), max_tokens=2)
    sched.add(a)
    out = run_step(sched)
    assert plan(out) == [("a", 4)] and out.sampled == [False]
    assert a.num_output_tokens == 0
    out = run_step(sched)
    assert plan(out) == [("a", 4)] and out.sampled == [False]
    out = run_step(sched)
    assert plan(out) == [("a", 2)] and out.sampled == [True]
    assert a.output_token_ids == [900]
    assert step(sched) == [("a", 1)]
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.num_free_blocks == 64
    assert not sched.has_work()
    assert step(sched) == []


def test_a_long_chunk_keeps_newcomers_waiting_until_budget_frees():
    sched = make_scheduler(budget=4)
    sched.add(make_req("a", range(10)))
    sched.add(make_req("b", range(50, 52)))
    assert step(sched) == [("a", 4)]
    assert step(sched) == [("a", 4)]
    assert step(sched) == [("a", 2), ("b", 2)]
    assert step(sched) == [("a", 1), ("b", 1)]


def test_max_num_seqs_caps_running_requests():
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add(make_req(rid, range(3), max_tokens=2))
    assert step(sched) == [("a", 3), ("b", 3)]
    assert sched.num_waiting == 1
    assert step(sched) == [("a", 1), ("b", 1)]  # both finish (2 tokens each)
    assert step(sched) == [("c", 3)]


def test_budget_exhausted_by_running_requests_leaves_later_ones_unscheduled():
    sched = make_scheduler(budget=2)
    for rid in "abc":
        sched.add(make_req(rid, [1]))
    assert step(sched) == [("a", 1), ("b", 1)]
    assert step(sched) == [("a", 1), ("b", 1)]
    assert sched.num_waiting == 1


def test_no_chunking_a_prompt_waits_until_it_fits_whole():
    sched = make_scheduler(budget=8, chunked=False, max_model_len=8)
    sched.add(make_req("a", range(6)))
    sched.add(make_req("b", range(10, 16)))
    sched.add(make_req("c", [7]))
    # b (6 tokens) does not fit the 2 left; FCFS keeps c behind it.
    assert step(sched) == [("a", 6)]
    assert step(sched) == [("a", 1), ("b", 6), ("c", 1)]


def test_no_chunking_refuses_a_max_model_len_beyond_the_budget():
    # Without chunking a prompt longer than max_num_batched_tokens is never scheduled: it sits at the
    # head of the waiting queue forever and (FCFS) blocks everything behind it. The scheduler must not
    # be built in that state; the engine caps max_model_len (or the config is refused).
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_scheduler(budget=8, chunked=False, max_model_len=16)


def test_finish_removes_waiting_and_running_requests():
    sched = make_scheduler()
    a, b = make_req("a", range(5)), make_req("b", range(5))
    sched.add(a)
    assert step(sched) == [("a", 5)]
    sched.add(b)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    assert sched.kv.block_ids("a") == []
    assert sched.kv.num_free_blocks == 64
    assert not sched.has_work()
    assert step(sched) == []


def test_prefix_hit_shortens_the_scheduled_prompt():
    sched = make_scheduler()
    a = make_req("a", range(10))
    sched.add(a)
    assert step(sched) == [("a", 10)]
    b = make_req("b", [*range(10), 42, 43])
    sched.add(b)
    out = run_step(sched)
    assert plan(out) == [("a", 1), ("b", 4)]
    assert b.num_cached_tokens == 8
    assert sched.kv.block_ids("b")[:2] == sched.kv.block_ids("a")[:2]


# ---- preemption ------------------------------------------------------------------------------------


def test_preemption_takes_the_latest_admitted_and_it_resumes_on_its_own_cached_blocks():
    sched = make_scheduler(num_blocks=4)
    a = make_req("a", range(8), max_tokens=3)
    b = make_req("b", range(10, 18), max_tokens=3)
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 8), ("b", 8)]
    assert sched.kv.block_ids("a") == [0, 1] and sched.kv.block_ids("b") == [2, 3]
    sched.add(make_req("x", range(30, 33)))

    # a's decode needs a third block; none is free, so b (admitted last) is preempted.
    out = run_step(sched)
    assert plan(out) == [("a", 1)]
    assert out.preempted == ["b"]
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0
    assert b.output_token_ids == [900]  # kept: it is recomputed, not resampled
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert sched.kv.block_ids("b") == []
    assert [r.request_id for r in sched.waiting] == ["b", "x"]  # back at the head, ahead of x
    # b's blocks were freed tail first: a took b's tail (3); b's head block 2 is still cached.
    assert sched.kv.block_ids("a") == [0, 1, 3]

    # b would hit block 2 but needs 3 blocks with 1 free: it waits.
    assert step(sched) == [("a", 1)]
    assert a.status == RequestStatus.FINISHED_LENGTH

    out = run_step(sched)
    # b resumes: block 2 covers its first 4 tokens; it recomputes 4 prompt tokens + its 1 output token.
    assert plan(out) == [("b", 5), ("x", 3)]
    assert out.sampled == [True, True]
    assert sched.kv.block_ids("b")[0] == 2
    assert b.output_token_ids == [900, 901]


def test_several_victims_return_in_admission_order():
    sched = make_scheduler(num_blocks=3)
    reqs = [make_req(rid, range(i * 10, i * 10 + 4)) for i, rid in enumerate("abc")]
    for r in reqs:
        sched.add(r)
    assert step(sched) == [("a", 4), ("b", 4), ("c", 4)]
    out = run_step(sched)
    # a needs a block: c goes; b then needs one too, and is itself the last admitted.
    assert plan(out) == [("a", 1)]
    assert out.preempted == ["c", "b"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert [r.request_id for r in sched.running] == ["a"]


def test_no_new_admissions_in_a_step_that_preempted():
    sched = make_scheduler(num_blocks=3)
    sched.add(make_req("a", range(4)))
    sched.add(make_req("b", range(10, 14)))
    assert step(sched) == [("a", 4), ("b", 4)]
    sched.add(make_req("y", [5]))  # would fit in b's freed block
    out = run_step(sched)
    assert plan(out) == [("a", 1)]
    assert out.preempted == ["b"]
    assert [r.request_id for r in sched.waiting] == ["b", "y"]


# ---- priority policy -------------------------------------------------------------------------------


def test_waiting_order_fcfs_vs_priority():
    specs = [("a", 2, 0.0), ("b", 0, 1.0), ("c", 1, 2.0), ("d", 0, 3.0)]
    for policy, expected in [("fcfs", ["a", "b", "c", "d"]), ("priority", ["b", "d", "c", "a"])]:
        sched = make_scheduler(policy=policy)
        for rid, prio, t in specs:
            sched.add(make_req(rid, [1, 2], priority=prio, arrival=t))
        assert [r.request_id for r in sched.waiting] == expected
        assert step(sched) == [(rid, 2) for rid in expected]


def test_priority_ties_break_on_arrival_not_insertion():
    sched = make_scheduler(policy="priority", max_num_seqs=1)
    sched.add(make_req("late", [1], priority=0, arrival=5.0))
    sched.add(make_req("early", [1], priority=0, arrival=1.0))
    assert step(sched) == [("early", 1)]


def _victim_scenario(policy: str, b_priority: int, b_arrival: float) -> tuple[Scheduler, object]:
    """b is admitted first (alone), then a and c; in step 3 a's decode needs a block and none is free."""
    sched = make_scheduler(num_blocks=4, policy=policy)
    sched.add(make_req("b", range(4), priority=b_priority, arrival=b_arrival))
    assert step(sched) == [("b", 4)]
    sched.add(make_req("a", range(10, 14), arrival=1.0))
    sched.add(make_req("c", range(20, 24), arrival=2.0))
    assert step(sched) == [("b", 1), ("a", 4), ("c", 4)]
    assert sched.kv.num_free_blocks == 0
    return sched, run_step(sched)


def test_priority_victim_is_the_lowest_priority_even_if_already_scheduled():
    sched, out = _victim_scenario("priority", b_priority=5, b_arrival=0.0)
    # b was scheduled first in this step; it is unscheduled and its token given back to the budget.
    assert plan(out) == [("a", 1), ("c", 1)]
    assert out.preempted == ["b"]
    assert [r.request_id for r in sched.running] == ["a", "c"]


def test_priority_victim_among_equals_is_the_latest_arrival():
    sched, out = _victim_scenario("priority", b_priority=0, b_arrival=10.0)
    assert plan(out) == [("a", 1), ("c", 1)]
    assert out.preempted == ["b"]


def test_fcfs_victim_is_the_latest_admitted():
    sched, out = _victim_scenario("fcfs", b_priority=5, b_arrival=10.0)
    assert plan(out) == [("b", 1), ("a", 1)]
    assert out.preempted == ["c"]


def test_unscheduled_victim_leaves_no_cached_block_with_unwritten_kv():
    # Allocation indexes a block as soon as the step's tokens will fill it (the forward writes the KV).
    # If that request is then preempted in the same step, the forward never writes it: the block must not
    # stay in the prefix cache, or a later request with that prefix reads garbage KV.
    sched = make_scheduler(num_blocks=5, budget=10, policy="priority")
    b = make_req("b", [1, 2], priority=5)
    sched.add(b)
    assert step(sched) == [("b", 2)]
    sched.add(make_req("c", [40, 41, 42, 43], priority=0))
    sched.add(make_req("a", range(60, 76), priority=1))
    assert step(sched) == [("b", 1), ("c", 4), ("a", 5)]
    assert b.all_token_ids == [1, 2, 900, 901]

    out = run_step(sched)
    # b's decode of token 901 fills block 0, then a's chunk finds no blocks: b (lowest priority) is
    # unscheduled, a still does not fit and is preempted too. Only c runs: token 901 is never computed.
    assert plan(out) == [("c", 1)]
    assert out.preempted == ["b", "a"]
    probe = make_req("d", [1, 2, 900, 901, 7])
    assert sched.kv.get_computed_blocks(probe).num_tokens == 0


def test_prefix_cache_stats_count_each_admission_once():
    # b is looked up while it waits for blocks (steps 1-3) and again when admitted (step 4). Only the
    # lookup that admits it should count, or the hit rate reflects memory pressure, not reuse.
    sched = make_scheduler(num_blocks=4)
    sched.add(make_req("a", range(12), max_tokens=3))
    sched.add(make_req("b", [*range(8), 50, 51, 52, 53, 54]))
    assert step(sched) == [("a", 12)]
    assert step(sched) == [("a", 1)]
    assert step(sched) == [("a", 1)]
    assert step(sched) == [("b", 5)]
    stats = sched.kv.stats
    assert (stats.queries, stats.hits) == (12 + 13, 8)


def test_decode_groups_split_where_padding_costs_more_than_a_group():
    from loom.engine.runner import group_by_length

    # Longest first; (12 - 3) blocks x 3 sequences left = 27 > 20: a new group starts at the 3-block one.
    assert group_by_length([3, 12, 11, 3, 2], group_cost=20) == [[1, 2], [0, 3, 4]]
    assert group_by_length([3, 12, 11, 3, 2], group_cost=1000) == [[1, 2, 0, 3, 4]]
    assert group_by_length([3, 12, 11, 3, 2], group_cost=0) == [[1], [2], [0, 3], [4]]
    assert group_by_length([], group_cost=0) == []
