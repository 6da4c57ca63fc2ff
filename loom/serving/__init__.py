"""Scale-out on Ray Serve, above the server: an HTTP ingress that routes each request to a replica (a
whole loom server, in-process in a Ray actor) with a cache-aware policy, retries before the first token,
a circuit breaker per replica, and a canary version with automatic rollback.

Nothing here is imported by the engine or the single-process server; Ray is needed only by `router`,
`replica`, `ingress` and `app` (the `loom[ray]` extra). The policy, prefix index, breaker and canary
controller are plain Python, tested without Ray.
"""
