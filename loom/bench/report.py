"""The results of `loom bench serve`: the JSON result file (a stable, documented schema), the terminal
table and the PNG (latency CDFs and throughput).

The JSON keys below are a contract: tools comparing runs read them, so keys are only ever added (with a
new SCHEMA_VERSION), never renamed. Metric keys are vLLM benchmark_serving's names.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from pathlib import Path

from loom.bench.metrics import LATENCY_METRICS, STATS, RequestRecord, ServeMetrics

SCHEMA_VERSION = 1

RESULT_SCHEMA: dict[str, str] = {
    "schema_version": "int: version of this schema",
    "benchmark": 'str: "serve"',
    "date": "str: ISO-8601 UTC time the run finished",
    "base_url": "str: the server benchmarked",
    "model": "str: the model name sent",
    "endpoint": 'str: "chat" or "completions"',
    "workload": 'str: the workload ("random", "sharegpt-like", "shared-prefix", "agent", "phone-agent", '
    '"dag", "jsonl:PATH")',
    "num_requests": "int: requests in the timed run (warm-up excluded)",
    "warmup": "int: warm-up requests sent first and not measured",
    "request_rate": 'float | "inf": mean arrivals per second',
    "burstiness": "float: gamma shape of arrival intervals (1 = Poisson)",
    "max_concurrency": "int | null: cap on requests in flight",
    "seed": "int: seed of the workload and the arrival schedule",
    "temperature": "float: sampling temperature sent",
    "ignore_eos": "bool: whether ignore_eos was sent",
    "extra_body": "object: fields merged into every request body",
    "goodput_slos_ms": "object: {ttft|tpot|e2el: ms} SLOs for request_goodput (empty: none given)",
    "completed": "int: requests that streamed an answer",
    "failed": "int: requests that did not (HTTP error, broken stream, or not sent: an earlier agent turn or "
    "dag call it needed failed)",
    "duration": "float: seconds from the first arrival to the end of the last request",
    "total_input_tokens": "int: prompt tokens of completed requests (server usage)",
    "total_output_tokens": "int: completion tokens of completed requests (server usage)",
    "request_throughput": "float: completed requests per second",
    "request_goodput": "float | null: completed requests per second within every SLO (null: no SLO given)",
    "output_throughput": "float: output tokens per second",
    "total_token_throughput": "float: (input + output) tokens per second",
    "usage_missing": "int: completed requests without server usage (their output counts are chunk counts)",
    **{
        f"{s}_{m}_ms": f"float | null: {s} of {m.upper()} in ms (null: no samples)"
        for m in LATENCY_METRICS
        for s in STATS
    },
    "ttft_by_turn_ms": "object | null: {turn: median TTFT in ms} of completed requests of session workloads "
    "(agent, phone-agent), null otherwise",
    "server_stats": "object | null: what a loom server counted during the timed run (deltas of its /metrics: "
    "prefix-cache queries and hits in tokens, encoder-cache queries and hits, images encoded, vision encode "
    "seconds, engine steps); null for other servers",
    "requests": "list: one object per timed request, keys in REQUEST_SCHEMA",
}

REQUEST_SCHEMA: dict[str, str] = {
    "index": "int: position in the workload (the turns of an agent session, and the calls of a dag program, "
    "are consecutive)",
    "session_id": "int | null: agent session or dag program (null: not sent, or neither workload)",
    "turn": "int | null: 0-based turn within the session (dag: 0 for a branch call, 1 for the summary)",
    "success": "bool",
    "error": "str | null: why it failed",
    "start_s": "float: when it was sent, seconds after the run began",
    "ttft_ms": "float | null",
    "tpot_ms": "float | null: null for answers of fewer than 2 tokens",
    "e2el_ms": "float | null",
    "itl_ms": "list[float]: gaps between streamed chunks",
    "prompt_tokens": "int | null: server usage",
    "output_tokens": "int | null: server usage (chunk count when usage_reported is false)",
    "usage_reported": "bool",
    "max_tokens": "int | null: max_tokens sent",
}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def request_json(record: RequestRecord) -> dict:
    req = record.request
    return {
        "index": record.index,
        "session_id": req.session_id if req else None,
        "turn": req.turn if req else None,
        "success": record.success,
        "error": record.error,
        "start_s": record.start,
        "ttft_ms": _ms(record.ttft),
        "tpot_ms": _ms(record.tpot),
        "e2el_ms": _ms(record.e2el),
        "itl_ms": [gap * 1000 for gap in record.itl],
        "prompt_tokens": record.prompt_tokens,
        "output_tokens": record.output_tokens,
        "usage_reported": record.usage_reported,
        "max_tokens": req.max_tokens if req else None,
    }


def build_result(settings: dict, metrics: ServeMetrics, records: list[RequestRecord]) -> dict:
    """The JSON result: `settings` holds the run's settings (keys of RESULT_SCHEMA from base_url to
    goodput_slos_ms, and server_stats), then the metrics and the per-request records."""
    settings = dict(settings)
    server_stats = settings.pop("server_stats", None)
    rate = settings.get("request_rate", math.inf)
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "serve",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **settings,
        # JSON has no infinity; vLLM writes the string "inf" too.
        "request_rate": "inf" if math.isinf(rate) else rate,
        **metrics.flat(),
        "ttft_by_turn_ms": ttft_by_turn(records),
        "server_stats": server_stats,
        "requests": [request_json(r) for r in records],
    }


def ttft_by_turn(records: list[RequestRecord]) -> dict[str, float] | None:
    by_turn: dict[int, list[float]] = {}
    for r in records:
        if (
            r.success
            and r.request is not None
            and r.request.turn is not None
            and r.request.session_id is not None
        ):
            by_turn.setdefault(r.request.turn, []).append(r.ttft * 1000)
    if not by_turn:
        return None
    return {str(turn): statistics.median(v) for turn, v in sorted(by_turn.items())}


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def _fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """The result as plain text, laid out like vLLM's benchmark_serving summary."""
    width = 50
    rows: list[tuple[str, object]] = [
        ("Server", result["base_url"]),
        ("Model / endpoint", f"{result['model']} / {result['endpoint']}"),
        ("Workload", result["workload"]),
        ("Request rate / burstiness", f"{result['request_rate']} / {result['burstiness']}"),
        ("Max concurrency", result["max_concurrency"] or "unlimited"),
        ("Successful requests", result["completed"]),
        ("Failed requests", result["failed"]),
        ("Benchmark duration (s)", _fmt(result["duration"])),
        ("Total input tokens", result["total_input_tokens"]),
        ("Total generated tokens", result["total_output_tokens"]),
        ("Request throughput (req/s)", _fmt(result["request_throughput"])),
    ]
    if result["request_goodput"] is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in result["goodput_slos_ms"].items())
        rows += [("Goodput SLOs (ms)", slos), ("Request goodput (req/s)", _fmt(result["request_goodput"]))]
    rows += [
        ("Output token throughput (tok/s)", _fmt(result["output_throughput"])),
        ("Total token throughput (tok/s)", _fmt(result["total_token_throughput"])),
    ]
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=width, c="=")]
    lines += [f"{name:<36}{value!s:>14}" for name, value in rows]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)"}
    titles |= {"itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for metric in LATENCY_METRICS:
        lines.append("{s:{c}^{n}}".format(s=f" {titles[metric]} ", n=width, c="-"))
        for s in STATS:
            name = f"{s.capitalize() if s[0] != 'p' else 'P' + s[1:]} {metric.upper()} (ms)"
            lines.append(f"{name:<36}{_fmt(result[f'{s}_{metric}_ms']):>14}")
    if result.get("ttft_by_turn_ms"):
        lines.append("{s:{c}^{n}}".format(s=" Median TTFT by turn (ms) ", n=width, c="-"))
        lines += [f"{'turn ' + turn:<36}{_fmt(ms):>14}" for turn, ms in result["ttft_by_turn_ms"].items()]
    if result.get("server_stats"):
        lines.append("{s:{c}^{n}}".format(s=" Server (loom) during the run ", n=width, c="-"))
        lines += [f"{name:<36}{_fmt(value):>14}" for name, value in result["server_stats"].items()]
    if result["usage_missing"]:
        lines.append(
            f"note: {result['usage_missing']} answers had no usage; their token counts are chunk counts"
        )
    lines.append("=" * width)
    return "\n".join(lines)


def plot_result(result: dict, path: str | Path) -> None:
    """A PNG of the result: CDFs of TTFT and E2EL over completed requests, and the throughputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in result["requests"] if r["success"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "e2el_ms", "E2E latency")):
        values = sorted(r[key] for r in done)
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post")
            ax.axvline(result[f"median_{key.removesuffix('_ms')}_ms"], ls="--", lw=0.8, color="gray")
        ax.set(title=f"{title} CDF ({len(values)} requests)", xlabel="ms", ylabel="fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    names = ["output tok/s", "total tok/s"]
    values = [result["output_throughput"], result["total_token_throughput"]]
    bars = axes[2].bar(names, values, color=["tab:blue", "tab:gray"])
    axes[2].bar_label(bars, fmt="%.1f")
    axes[2].set_ylim(0, max(values + [1.0]) * 1.15)  # room for the labels
    goodput = result["request_goodput"]
    req = f"{result['request_throughput']:.2f} req/s" + (
        f", goodput {goodput:.2f}" if goodput is not None else ""
    )
    axes[2].set(title=f"Throughput ({req})", ylabel="tokens / s")
    rate = result["request_rate"]
    fig.suptitle(
        f"loom bench serve: {result['model']} @ {result['base_url']} | {result['workload']}, "
        f"{result['num_requests']} requests, rate {rate}, concurrency {result['max_concurrency'] or 'unlimited'}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
