"""Serving metrics, goodput and the result file of `loom bench serve`, on crafted per-request records."""

from __future__ import annotations

import json

import pytest

from loom.bench.metrics import RequestRecord, compute_metrics, meets_slos, parse_goodput
from loom.bench.report import REQUEST_SCHEMA, RESULT_SCHEMA, build_result, format_table, plot_result
from loom.bench.workloads import Request
from loom.errors import InvalidRequest


def rec(i: int, ttft: float, e2el: float, out: int, success: bool = True, itl=None) -> RequestRecord:
    return RequestRecord(
        index=i,
        request=Request(prompt="p", max_tokens=out),
        success=success,
        error=None if success else "HTTP 500: boom",
        start=0.1 * i,
        ttft=ttft,
        e2el=e2el,
        itl=itl or [],
        prompt_tokens=10,
        output_tokens=out,
        usage_reported=True,
    )


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        rec(0, 0.1, 1.0, 10, itl=[0.1] * 9),  # tpot 100 ms
        rec(1, 0.6, 1.0, 5),  # ttft 600 ms
        rec(2, 0.1, 3.0, 30),  # e2el 3000 ms
        rec(3, 0.1, 0.5, 41, itl=[0.01] * 40),  # tpot 10 ms: within everything
        rec(4, 0.01, 0.02, 5, success=False),  # fast, but failed: never good
        rec(5, 0.2, 0.2, 1),  # one token: no tpot
    ]


def test_tpot_excludes_the_first_token(records):
    assert records[0].tpot == pytest.approx(0.9 / 9)
    assert records[3].tpot == pytest.approx(0.4 / 40)
    assert records[5].tpot is None and records[4].tpot is None


def test_goodput_counts_only_requests_within_every_slo(records):
    assert [meets_slos(r, {"ttft": 500, "e2el": 2000}) for r in records] == [1, 0, 0, 1, 0, 1]
    slos = {"ttft": 500, "tpot": 50, "e2el": 2000}
    assert [meets_slos(r, slos) for r in records] == [0, 0, 0, 1, 0, 1]
    m = compute_metrics(records, duration=2.0, slos=slos)
    assert m.request_goodput == pytest.approx(2 / 2.0)
    assert compute_metrics(records, 2.0, {"tpot": 50}).request_goodput == pytest.approx(2 / 2.0)
    assert compute_metrics(records, 2.0, {"e2el": 2000}).request_goodput == pytest.approx(4 / 2.0)
    assert compute_metrics(records, 2.0).request_goodput is None


def test_aggregates_skip_failed_requests(records):
    m = compute_metrics(records, duration=2.0)
    assert (m.completed, m.failed) == (5, 1)
    assert m.total_output_tokens == 10 + 5 + 30 + 41 + 1
    assert m.total_input_tokens == 50
    assert m.request_throughput == pytest.approx(2.5)
    assert m.output_throughput == pytest.approx(87 / 2.0)
    assert m.total_token_throughput == pytest.approx(137 / 2.0)
    assert m.ttft.median == pytest.approx(100.0) and m.ttft.mean == pytest.approx(220.0)
    assert m.e2el.p99 == pytest.approx(1000 + 0.96 * 2000)  # numpy's linear interpolation
    assert m.tpot.count == 4  # the one-token answer has no TPOT
    assert m.itl.count == 49 and m.itl.median == pytest.approx(10.0)
    flat = m.flat()
    assert flat["mean_ttft_ms"] == pytest.approx(220.0) and flat["p90_itl_ms"] == pytest.approx(100.0)


def test_no_completed_requests_gives_empty_stats():
    m = compute_metrics([rec(0, 0.1, 0.2, 3, success=False)], duration=1.0)
    assert (m.completed, m.failed, m.request_throughput) == (0, 1, 0.0)
    assert m.ttft.mean is None and m.flat()["p99_e2el_ms"] is None


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "TPOT:12.5"]) == {"ttft": 500.0, "tpot": 12.5}
    assert parse_goodput(None) == {}
    for bad in ("ttft", "itl:5", "e2el:-1", "ttft:fast"):
        with pytest.raises(InvalidRequest):
            parse_goodput([bad])


def settings() -> dict:
    return {
        "base_url": "http://x",
        "model": "m",
        "endpoint": "chat",
        "workload": "random",
        "num_requests": 6,
        "warmup": 0,
        "request_rate": float("inf"),
        "burstiness": 1.0,
        "max_concurrency": None,
        "seed": 0,
        "temperature": 0.0,
        "ignore_eos": False,
        "extra_body": {},
        "goodput_slos_ms": {"ttft": 500.0},
    }


def test_result_has_the_documented_keys_and_is_strict_json(records, tmp_path):
    result = build_result(settings(), compute_metrics(records, 2.0, {"ttft": 500}), records)
    assert list(result) == list(RESULT_SCHEMA)
    assert all(list(r) == list(REQUEST_SCHEMA) for r in result["requests"])
    assert result["request_rate"] == "inf"
    json.dumps(result, allow_nan=False)  # loadable by any JSON parser
    table = format_table(result)
    assert "Request goodput (req/s)" in table and "2.00" in table and "Median TTFT (ms)" in table
    png = tmp_path / "r.png"
    plot_result(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_result_of_a_run_where_everything_failed(tmp_path):
    records = [rec(0, 0.1, 0.2, 3, success=False)]
    result = build_result(settings() | {"goodput_slos_ms": {}}, compute_metrics(records, 1.0), records)
    assert result["mean_e2el_ms"] is None and result["request_goodput"] is None
    assert "-" in format_table(result)
    plot_result(result, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0
