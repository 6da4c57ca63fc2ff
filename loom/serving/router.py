"""loom's policies as a Ray Serve request router (`RequestRouterConfig(request_router_class=...)`).

Ray calls `choose_replicas` with the replicas it may use (running ones: a loom replica is running only
once its model has loaded) and the pending request, whose first argument is the ingress's RouteInfo.
We return one rank per replica, best first; Ray sends the request to the first rank whose replica is
under max_ongoing_requests, so a full favourite falls through to the next one rather than waiting.

Load here is what this router has in flight on each replica: exact for the requests it sent, cheap
(no probe RPC), and what an ingress replica can know without asking.
"""

from __future__ import annotations

import logging
from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from loom.serving.policy import CacheAwarePolicy, RoundRobinPolicy, RouteInfo

logger = logging.getLogger(__name__)


class LoomRequestRouter(RequestRouter):
    """Routes with CacheAwarePolicy (or RoundRobinPolicy); kwargs come from request_router_kwargs."""

    def initialize_state(
        self,
        policy: str = "cache_aware",
        abs_threshold: int = 8,
        rel_threshold: float = 1.5,
        cache_threshold: float = 0.3,
        blocks_per_replica: int = 65536,
    ) -> None:
        if policy == "round_robin":
            self.policy = RoundRobinPolicy()
        else:
            self.policy = CacheAwarePolicy(abs_threshold, rel_threshold, cache_threshold, blocks_per_replica)
        self.loads: Counter[str] = Counter()
        self.assigned: dict[str, str] = {}
        """Ray's internal request id -> replica it was sent to (until it completes)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        route = _route_of(pending_request)
        if route is None or not by_id:
            # Not a loom request (a health probe, a broadcast): any replica will do.
            return [candidate_replicas]
        choice = self.policy.choose(route, {r: self.loads[r] for r in by_id})
        if choice.ranked:
            self._assign(pending_request.metadata.internal_request_id, choice.ranked[0])
        return [[by_id[r]] for r in choice.ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        # Ray may have used a lower rank than our first choice (the first was full): count it there.
        self._assign(pending_request.metadata.internal_request_id, replica_id.unique_id)
        route = _route_of(pending_request)
        if route is not None and hasattr(self.policy, "on_routed"):
            self.policy.on_routed(route, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        replica = self.assigned.pop(internal_request_id, None)
        if replica is not None and self.loads[replica] > 0:
            self.loads[replica] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = {r.unique_id for r in self._replica_id_set}
        super().update_replicas(replicas)
        for gone in before - {r.unique_id for r in self._replica_id_set}:
            self._forget(gone)

    def _assign(self, request_id: str, replica: str) -> None:
        previous = self.assigned.get(request_id)
        if previous == replica:
            return
        if previous is not None and self.loads[previous] > 0:
            self.loads[previous] -= 1
        self.assigned[request_id] = replica
        self.loads[replica] += 1

    def _forget(self, replica: str) -> None:
        logger.info("replica %s left the rotation", replica)
        self.policy.remove_replica(replica)
        self.loads.pop(replica, None)


def _route_of(pending_request: PendingRequest | None) -> RouteInfo | None:
    if pending_request is None or not pending_request.args:
        return None
    route = pending_request.args[0]
    return route if isinstance(route, RouteInfo) else None
