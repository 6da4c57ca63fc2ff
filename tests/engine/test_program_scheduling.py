"""Engine awareness of agent programs: program-level least-attained-service scheduling and KV pinning
between the calls of one program."""

from __future__ import annotations

import random

import pytest
from step_loop import make_req, make_scheduler, run_step

from loom import LLM, SamplingParams
from loom.engine.request import Request
from loom.engine.scheduler import Scheduler


def sched_with(policy: str, max_num_seqs: int = 1, num_blocks: int = 64) -> Scheduler:
    return make_scheduler(num_blocks=num_blocks, max_num_seqs=max_num_seqs, policy=policy)


def call(rid: str, program: str, n: int, arrival: float, max_tokens: int = 4) -> Request:
    prompt = [hash((rid, k)) % 1000 + 3 for k in range(n)]
    return make_req(rid, prompt, max_tokens=max_tokens, arrival=arrival, program=program)


def test_least_attained_service_program_goes_first():
    sched = sched_with("program")
    sched.program_service["long"] = 500  # the long workflow has already run 500 tokens
    sched.add(call("long-3", "long", 8, arrival=1.0))
    sched.add(call("short-1", "short", 8, arrival=2.0))
    assert run_step(sched).plan == [("short-1", 8)]
    assert sched.program_service["short"] == 8


def test_fcfs_ignores_programs():
    sched = sched_with("fcfs")
    sched.program_service["long"] = 500
    sched.add(call("long-3", "long", 8, arrival=1.0))
    sched.add(call("short-1", "short", 8, arrival=2.0))
    assert run_step(sched).plan == [("long-3", 8)]


def test_victim_is_the_most_served_program():
    sched = sched_with("program", max_num_seqs=4, num_blocks=6)
    sched.program_service.update({"a": 10, "b": 900})
    sched.add(call("b-1", "b", 8, arrival=1.0, max_tokens=16))
    sched.add(call("a-1", "a", 8, arrival=2.0, max_tokens=16))
    preempted = []
    for _ in range(10):  # decode until two growing sequences outgrow 6 blocks of 4 tokens
        preempted += run_step(sched).preempted
        if preempted:
            break
    assert preempted == ["b-1"], "the program with the most attained service is preempted"
    assert [r.request_id for r in sched.running] == ["a-1"]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", num_blocks=48, program_pin_ttl_s=60)


def flood(llm: LLM, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2):  # 2 x 4 x 150 tokens: 80 blocks through a 48-block pool
        prompts = [[rng.randrange(3, 2000) for _ in range(150)] for _ in range(4)]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2))


def test_program_kv_survives_other_traffic_until_released(llm):
    rng = random.Random(0)
    context = [rng.randrange(3, 2000) for _ in range(96)]
    params = SamplingParams(temperature=0, max_tokens=4, extra={"program_id": "run-1"})
    llm.generate([context + [7]], params)
    assert llm.engine.kv.num_pinned_blocks == 6
    flood(llm, 1)  # everything unpinned is evicted
    again = llm.generate([context + [8]], params)[0]
    assert again.num_cached_tokens == 96, "the program's context should have stayed cached"
    assert llm.engine.release_program("run-1")
    assert llm.engine.kv.num_pinned_blocks == 0
    flood(llm, 2)
    plain = llm.generate([context + [9]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert plain.num_cached_tokens == 0, "after release the blocks are ordinary LRU and were evicted"


def test_pins_yield_to_real_memory_pressure(llm):
    rng = random.Random(3)
    for k in range(6):  # six programs pin 6 blocks each: 36 of 48 blocks
        ctx = [rng.randrange(3, 2000) for _ in range(96)]
        llm.generate([ctx + [1]], SamplingParams(max_tokens=1, extra={"program_id": f"p{k}"}))
    assert llm.engine.kv.num_pinned_blocks == 36
    big = [rng.randrange(3, 2000) for _ in range(600)]  # needs 38 blocks
    out = llm.generate([big], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.outputs[0].token_ids) == 4
    assert llm.engine.kv.num_pinned_blocks < 36
    for k in range(6):
        llm.engine.release_program(f"p{k}")
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks
