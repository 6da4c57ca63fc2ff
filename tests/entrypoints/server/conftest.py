"""Real `loom serve` processes on loopback for the server tests, started once and in parallel
(the launcher is the shared `launch_server` fixture of tests/conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from server_faults import ENTRY as FAULTS_ENTRY

API_KEY = "sk-loom-test"
MAX_BODY_BYTES = 65536


@pytest.fixture(scope="session")
def servers(launch_server) -> Iterator[dict]:
    """All server processes the tests use, launched together so their model loads overlap."""
    yield {
        "main": launch_server("main", "--max-body-bytes", str(MAX_BODY_BYTES), api_key=API_KEY),
        "limited": launch_server(
            "limited",
            "--max-waiting",
            "2",
            "--max-waiting-tokens",
            "200",
            "--grammar-compile-timeout-s",
            "0.05",
        ),
        "drain": launch_server("drain", "--drain-timeout", "60"),
        # Short contexts keep every generation the fuzzer asks for short.
        "edge": launch_server(
            "edge",
            "--max-model-len",
            "64",
            "--allowed-hosts",
            "models.internal, *.corp.example",
            entry=FAULTS_ENTRY,
        ),
    }


@pytest.fixture(scope="session")
def server(servers: dict):
    """The main server: API key required, 64 KiB body limit, default backpressure limits."""
    return servers["main"].wait_ready()


@pytest.fixture(scope="session")
def limited_server(servers: dict):
    """No API key; at most 2 requests / 200 prompt tokens in flight; grammars compile within 50 ms or 400."""
    return servers["limited"].wait_ready()


@pytest.fixture
def drain_server(servers: dict):
    """A server the test may SIGTERM (it is not usable afterwards)."""
    return servers["drain"].wait_ready()


@pytest.fixture
def drain_cut_server(launch_server):
    """A server whose drain times out after 2 s; the test may SIGTERM it. Started only for its one test,
    so that it does not add to the start-up of the others."""
    return launch_server("drain-cut", "--drain-timeout", "2").wait_ready()


@pytest.fixture(scope="session")
def edge_server(servers: dict):
    """No API key, extra --allowed-hosts, a 64-token context (the schemathesis target: every generation
    is short), and the test-only fault route of server_faults.py (hidden from the OpenAPI document)."""
    return servers["edge"].wait_ready()


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def wait_for():
    """wait_for(predicate, timeout=30) -> whether it became true in time."""
    return _wait_for
