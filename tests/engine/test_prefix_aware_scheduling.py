"""Cache-aware admission: within a bounded window, the waiting request with the longest cached prefix
goes first; the head of the queue is passed over a bounded number of times; FCFS otherwise."""

from __future__ import annotations

from step_loop import make_req, make_scheduler, run_step

from loom.engine.request import Request, RequestStatus
from loom.engine.scheduler import Scheduler

SHARED = list(range(100, 120))  # 5 full blocks


def setup(window: int, max_num_seqs: int = 1) -> Scheduler:
    return make_scheduler(max_num_seqs=max_num_seqs, prefix_aware_window=window, max_model_len=256)


def req(rid: str, prompt: list[int], arrival: float) -> Request:
    return make_req(rid, prompt, max_tokens=4, arrival=arrival)


def finish_running(sched: Scheduler) -> None:
    for r in list(sched.running):
        sched.finish(r, RequestStatus.FINISHED_STOPPED)


def warm(sched: Scheduler) -> None:
    """Compute SHARED once so its blocks sit in the prefix cache."""
    sched.add(req("warm", SHARED + [1], 0.0))
    run_step(sched)
    finish_running(sched)


def test_longest_cached_prefix_admitted_first():
    sched = setup(window=8)
    warm(sched)
    sched.add(req("cold", [7] * 21, 1.0))
    sched.add(req("hot", SHARED + [2], 2.0))
    out = run_step(sched)  # one sequence slot: exactly one is admitted
    assert out.plan == [("hot", 1)]
    assert sched.waiting.peek().request_id == "cold"


def test_window_off_keeps_arrival_order():
    sched = setup(window=0)
    warm(sched)
    sched.add(req("cold", [7] * 21, 1.0))
    sched.add(req("hot", SHARED + [2], 2.0))
    assert [rid for rid, _ in run_step(sched).plan] == ["cold"]


def test_requests_beyond_the_window_are_not_considered():
    sched = setup(window=3)
    warm(sched)
    for k in range(3):
        sched.add(req(f"cold{k}", [7 + k] * 21, 1.0 + k))
    sched.add(req("hot", SHARED + [2], 9.0))  # 4th in line, outside a window of 3
    assert [rid for rid, _ in run_step(sched).plan] == ["cold0"]


def test_head_is_passed_over_a_bounded_number_of_times():
    window = 2
    sched = setup(window=window)
    warm(sched)
    sched.add(req("cold", [7] * 21, 1.0))
    admitted = []
    for k in range(window + 1):
        sched.add(req(f"hot{k}", SHARED + [10 + k], 2.0 + k))
        admitted += [rid for rid, _ in run_step(sched).plan]
        finish_running(sched)
    assert admitted == ["hot0", "hot1", "cold"], "after `window` skips the head must go first"
