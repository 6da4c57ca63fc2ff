"""Which replica gets a request: the cache-aware policy (and round robin, for comparison), in plain
Python so it is tested and benchmarked without Ray; `router.py` plugs it into Ray Serve.

The cache-aware policy follows SGLang's `cache_aware` router: when load is balanced, send the request
where its prefix is cached; when it is not, send it to the least-loaded replica. Before the prefix,
an agent program's id pins its calls to the replica that served the program last (its pinned KV
lives there). Unlike SGLang, a match that is only a prefix other conversations share (and branched
from) does not pin a new conversation to the prefix's first holder: see `choose`. Thresholds are ScaleOutConfig fields; the defaults are argued there and in the README.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from loom.serving.prefix import PrefixIndex

# How the last request was routed; counted in metrics, and asserted on by tests.
REASONS = ("program", "prefix", "shared_prefix", "least_loaded", "imbalanced", "round_robin", "retry")


@dataclass(slots=True)
class RouteInfo:
    """What the ingress tells the router about a request. It travels with the request to the replica,
    so it stays small: ids and hashes, never the prompt."""

    request_id: str
    program_id: str | None = None
    block_hashes: tuple[int, ...] = ()
    attempt: int = 0
    """0 for the first try; a retry avoids the replica the previous try went to."""
    avoid: tuple[str, ...] = field(default_factory=tuple)
    """Replicas not to use (circuit open, or already failed this request), unless no other is left."""
    reason: str = ""
    """Set by the router (in the ingress's process) to how it chose: one of REASONS."""


@dataclass(slots=True)
class Choice:
    ranked: list[str]
    """Replica ids, most preferred first."""
    reason: str


class CacheAwarePolicy:
    """Program affinity, then longest cached prefix, then least loaded; least loaded whenever load is
    imbalanced. State is per router process and bounded: `max_programs` program ids and
    `blocks_per_replica` block hashes per replica."""

    def __init__(
        self,
        abs_threshold: int = 8,
        rel_threshold: float = 1.5,
        cache_threshold: float = 0.3,
        blocks_per_replica: int = 65536,
        max_programs: int = 100_000,
    ):
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.cache_threshold = cache_threshold
        self.blocks_per_replica = blocks_per_replica
        self.max_programs = max_programs
        self.indexes: dict[str, PrefixIndex] = {}
        self.programs: OrderedDict[str, str] = OrderedDict()
        self.last_choice: OrderedDict[str, str] = OrderedDict()
        """request id -> replica its last try was sent to, so a retry can avoid it."""

    def imbalanced(self, loads: dict[str, int]) -> bool:
        """SGLang's test: both an absolute and a relative gap between the busiest and idlest replica."""
        if len(loads) < 2:
            return False
        high, low = max(loads.values()), min(loads.values())
        return high - low > self.abs_threshold and high > self.rel_threshold * low

    def choose(self, route: RouteInfo, loads: dict[str, int]) -> Choice:
        """Rank the replicas in `loads` (id -> requests in flight) for this request."""
        candidates = self._candidates(route, loads)
        by_load = sorted(candidates, key=lambda r: (candidates[r], len(self._index(r))))
        if route.attempt > 0:
            return self._record(route, Choice(by_load, "retry"))
        if self.imbalanced(candidates):
            return self._record(route, Choice(by_load, "imbalanced"))
        pinned = self.programs.get(route.program_id) if route.program_id else None
        if pinned in candidates:
            return self._record(route, Choice(_first(pinned, by_load), "program"))
        if route.block_hashes:
            matched = {r: self._index(r).match(route.block_hashes) for r in candidates}
            best = max(n for n, _ in matched.values())
            if best > 0 and best >= self.cache_threshold * len(route.block_hashes):
                # The request continues a conversation where its history is: stay there.
                here = [r for r in by_load if matched[r][0] >= best - 1 and matched[r][1]]
                if here:
                    return self._record(route, Choice(_first(here[0], by_load), "prefix"))
                # The match is a prefix other conversations share (a system prompt) and branched
                # from: SGLang would send every new conversation to its first holder until the load
                # gap passes its threshold. Send it to the least-loaded replica instead, the longest
                # match on ties: a hot prefix is copied to one more replica per step of load.
                shared = sorted(candidates, key=lambda r: (candidates[r], -matched[r][0]))
                return self._record(route, Choice(shared, "shared_prefix"))
        return self._record(route, Choice(by_load, "least_loaded"))

    def _candidates(self, route: RouteInfo, loads: dict[str, int]) -> dict[str, int]:
        avoid = set(route.avoid)
        if route.attempt > 0 and route.request_id in self.last_choice:
            avoid.add(self.last_choice[route.request_id])
        kept = {r: n for r, n in loads.items() if r not in avoid}
        return kept or dict(loads)

    def _record(self, route: RouteInfo, choice: Choice) -> Choice:
        """Remember the first choice as where this request's prefix (and program) now live."""
        route.reason = choice.reason
        if choice.ranked:
            self.on_routed(route, choice.ranked[0])
        return choice

    def on_routed(self, route: RouteInfo, replica: str) -> None:
        self._index(replica).insert(route.block_hashes)
        _put(self.last_choice, route.request_id, replica, self.max_programs)
        if route.program_id:
            _put(self.programs, route.program_id, replica, self.max_programs)

    def remove_replica(self, replica: str) -> None:
        """A replica died or was scaled away: forget its cache and the programs pinned to it."""
        self.indexes.pop(replica, None)
        for program in [p for p, r in self.programs.items() if r == replica]:
            del self.programs[program]

    def _index(self, replica: str) -> PrefixIndex:
        index = self.indexes.get(replica)
        if index is None:
            index = self.indexes[replica] = PrefixIndex(self.blocks_per_replica)
        return index


class RoundRobinPolicy:
    """Each request to the next replica in turn (the baseline the benchmark compares against)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, route: RouteInfo, loads: dict[str, int]) -> Choice:
        route.reason = "round_robin"
        replicas = sorted(r for r in loads if r not in route.avoid) or sorted(loads)
        if not replicas:
            return Choice([], "round_robin")
        start = next(self._counter) % len(replicas)
        return Choice(replicas[start:] + replicas[:start], "round_robin")

    def remove_replica(self, replica: str) -> None:
        pass


def _first(replica: str, ranked: list[str]) -> list[str]:
    return [replica] + [r for r in ranked if r != replica]


def _put(table: OrderedDict[str, str], key: str, value: str, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    if len(table) > limit:
        table.popitem(last=False)
