"""The router's policies, prefix index, circuit breaker and canary controller, without Ray."""

from __future__ import annotations

import pytest

from loom.serving.breaker import CircuitBreaker
from loom.serving.canary import CanaryController, p95
from loom.serving.policy import CacheAwarePolicy, RoundRobinPolicy, RouteInfo
from loom.serving.prefix import PrefixIndex, block_hashes, request_text


def chat(*contents: str) -> dict:
    roles = ["system"] + ["user", "assistant"] * len(contents)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)]}


def route(body: dict, request_id: str = "r", **kwargs) -> RouteInfo:
    return RouteInfo(request_id, block_hashes=block_hashes(request_text(body), 8), **kwargs)


# ---- prefix hashing -----------------------------------------------------------------------------


def test_equal_prefixes_share_leading_block_hashes_and_differ_after():
    a = block_hashes(request_text(chat("system prompt " * 10, "first question here")), 8)
    b = block_hashes(request_text(chat("system prompt " * 10, "other question, longer")), 8)
    shared = len("system:" + "system prompt " * 10) // 8
    assert a[:shared] == b[:shared]
    assert len(a) > shared + 1 and a[shared + 1 :] != b[shared + 1 : len(a)]
    assert len(block_hashes("x" * 17, 8)) == 2  # the partial last block is left out


def test_request_text_ignores_sampling_fields_and_separates_messages():
    body = chat("sys", "hi")
    assert request_text(body) == request_text({**body, "max_tokens": 5, "temperature": 0.3})
    assert request_text(chat("ab", "c")) != request_text(chat("a", "bc"))
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert request_text(parts) == request_text({"messages": [{"role": "user", "content": "hi"}]})
    assert request_text({"prompt": [1, 2, 3]}) == "1,2,3"


def test_prefix_index_is_bounded_and_evicts_chains_from_their_tails():
    index = PrefixIndex(capacity=6)
    first = block_hashes("a" * 40, 8)  # 5 blocks
    index.insert(first)
    assert index.match(first) == (5, True)
    second = block_hashes("b" * 32, 8)  # 4 more: 3 of the first chain's go, deepest first
    index.insert(second)
    assert len(index) == 6
    assert index.match(second)[0] == 4
    assert index.match(first)[0] == 2


# ---- cache-aware policy -------------------------------------------------------------------------


def test_program_id_pins_calls_to_the_replica_that_served_the_program():
    policy = CacheAwarePolicy()
    first = policy.choose(RouteInfo("1", program_id="p"), {"a": 0, "b": 0})
    again = policy.choose(RouteInfo("2", program_id="p"), {"a": 3, "b": 0})
    assert again.ranked[0] == first.ranked[0] and again.reason == "program"


def test_a_conversation_stays_where_its_history_is_while_balanced():
    policy = CacheAwarePolicy(abs_threshold=4)
    first = policy.choose(route(chat("s" * 200, "turn one"), "1"), {"a": 0, "b": 0})
    follow = chat("s" * 200, "turn one", "answer", "turn two")
    again = policy.choose(route(follow, "2"), {first.ranked[0]: 3, "b" if first.ranked[0] == "a" else "a": 0})
    assert again.ranked[0] == first.ranked[0] and again.reason == "prefix"


def test_new_conversations_on_a_shared_prefix_go_to_the_least_loaded_replica():
    policy = CacheAwarePolicy(abs_threshold=8)
    policy.on_routed(route(chat("s" * 200, "session one"), "1"), "a")
    # Only "a" holds the system prompt, but "b" is idler: SGLang would pick "a" (load gap 1 < 8).
    fresh = policy.choose(route(chat("s" * 200, "session two"), "2"), {"a": 1, "b": 0})
    assert fresh.ranked[0] == "b" and fresh.reason == "shared_prefix"
    # Equal load: the replica holding the prefix wins the tie.
    policy2 = CacheAwarePolicy()
    policy2.on_routed(route(chat("s" * 200, "session one"), "1"), "b")
    assert policy2.choose(route(chat("s" * 200, "session two"), "2"), {"a": 0, "b": 0}).ranked[0] == "b"


def test_prefix_index_tells_a_continuation_from_a_branch():
    index = PrefixIndex(capacity=100)
    turn1 = block_hashes("s" * 64 + "u" * 32, 8)
    index.insert(turn1)
    assert index.match(block_hashes("s" * 64 + "u" * 32 + "a" * 40, 8)) == (12, True)
    assert index.match(block_hashes("s" * 64 + "v" * 32, 8)) == (8, False)
    assert index.match(block_hashes("t" * 64, 8)) == (0, False)


def test_imbalance_falls_back_to_the_least_loaded_replica():
    policy = CacheAwarePolicy(abs_threshold=4, rel_threshold=1.5)
    body = chat("s" * 200, "q")
    policy.on_routed(route(body, "0"), "a")
    assert policy.choose(route(body, "1"), {"a": 4, "b": 0}).ranked[0] == "a"  # 4 - 0 is not > 4
    imbalanced = policy.choose(route(body, "2"), {"a": 5, "b": 0})
    assert imbalanced.ranked == ["b", "a"] and imbalanced.reason == "imbalanced"
    assert not policy.imbalanced({"a": 9, "b": 7})  # over the absolute gap but not 1.5x


def test_low_match_goes_to_the_least_loaded_and_retries_avoid_the_last_replica():
    policy = CacheAwarePolicy(cache_threshold=0.5)
    policy.on_routed(route(chat("x" * 40, "y" * 400), "0"), "a")
    low = policy.choose(route(chat("x" * 40, "z" * 400), "1"), {"a": 1, "b": 2})
    assert low.reason == "least_loaded" and low.ranked[0] == "a"
    retry = policy.choose(route(chat("x" * 40, "z" * 400), "1", attempt=1), {"a": 0, "b": 5})
    assert retry.ranked == ["b"] and retry.reason == "retry"
    avoided = policy.choose(RouteInfo("5", avoid=("a",)), {"a": 0, "b": 5})
    assert avoided.ranked == ["b"]
    assert policy.choose(RouteInfo("6", avoid=("a", "b")), {"a": 0, "b": 5}).ranked[0] == "a"


def test_a_removed_replica_loses_its_programs_and_prefixes():
    policy = CacheAwarePolicy()
    policy.on_routed(RouteInfo("1", program_id="p", block_hashes=(1, 2)), "a")
    policy.remove_replica("a")
    assert "p" not in policy.programs and "a" not in policy.indexes


def test_round_robin_cycles_through_replicas():
    policy = RoundRobinPolicy()
    firsts = [policy.choose(RouteInfo(str(i)), {"a": 0, "b": 0, "c": 0}).ranked[0] for i in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


# ---- circuit breaker ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_once_per_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown_s=5, clock=clock)
    for _ in range(2):
        breaker.record("a", ok=False)
    assert breaker.blocked() == ()
    breaker.record("a", ok=True)  # a success resets the count
    for _ in range(3):
        breaker.record("a", ok=False)
    assert breaker.blocked() == ("a",) and breaker.opened == 1
    clock.now = 5.0
    assert breaker.blocked() == ()  # the probe may go
    assert breaker.blocked() == ("a",)  # ...but only one
    breaker.record("a", ok=True)
    assert breaker.blocked() == () and not breaker.is_open("a")


# ---- canary -------------------------------------------------------------------------------------


def canary(clock: Clock, **kwargs) -> CanaryController:
    args = dict(weight=30, step=35, step_interval_s=10, window_s=60, min_requests=5) | kwargs
    return CanaryController("stable", "canary", clock=clock, **args)


def test_canary_split_is_sticky_per_key_and_near_the_weight():
    c = canary(Clock())
    picks = [c.pick(f"session-{i}") for i in range(2000)]
    assert 0.25 < picks.count("canary") / len(picks) < 0.35
    assert all(c.pick(f"session-{i}") == picks[i] for i in range(200))
    c.weight = 65  # growing the weight never moves a canary session back to stable
    assert all(c.pick(f"session-{i}") == "canary" for i in range(200) if picks[i] == "canary")


def test_canary_rolls_back_on_errors_and_stable_takes_everything():
    clock = Clock()
    c = canary(clock)
    for _ in range(10):
        c.record("stable", error=False, ttft_s=0.1)
    for _ in range(4):
        c.record("canary", error=True, ttft_s=None)
    assert c.state == "canary"  # not judged below min_requests
    c.record("canary", error=True, ttft_s=None)
    assert c.state == "rolled_back" and c.weight == 0 and "5xx" in c.reason
    assert {c.pick(f"s{i}") for i in range(50)} == {"stable"}


def test_canary_rolls_back_on_slow_first_tokens_and_is_promoted_in_steps_when_healthy():
    clock = Clock()
    slow = canary(clock, ttft_margin=0.5)
    for _ in range(5):
        slow.record("stable", error=False, ttft_s=0.1)
        slow.record("canary", error=False, ttft_s=0.2)
    assert slow.state == "rolled_back" and "TTFT" in slow.reason

    healthy = canary(clock)
    for _ in range(3):
        clock.now += 11
        for _ in range(5):
            healthy.record("stable", error=False, ttft_s=0.1)
            healthy.record("canary", error=False, ttft_s=0.11)
    assert healthy.state == "promoted" and healthy.weight == 100
    assert healthy.pick("anyone") == "canary"


def test_window_forgets_old_samples_and_p95():
    clock = Clock()
    c = canary(clock)
    c.record("stable", error=True, ttft_s=None)
    clock.now = 61
    c.evaluate()
    assert c.window("stable").requests == 0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([]) is None


@pytest.mark.parametrize("version", ["canary", "stable"])
def test_retry_target_is_stable_for_canary_failures_only(version):
    c = canary(Clock())
    assert c.other(version) == ("stable" if version == "canary" else None)
