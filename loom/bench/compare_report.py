"""The result of `loom bench llama-server compare` (loom/bench/compare.py): the JSON schema (keys are only
ever added, with a new SCHEMA_VERSION, never renamed), the per-server summary and the table."""

from __future__ import annotations

import statistics

SCHEMA_VERSION = 1

COMPARE_SCHEMA: dict[str, str] = {
    "schema_version": "int: version of this schema",
    "benchmark": 'str: "compare"',
    "date": "str: ISO-8601 UTC time the run finished",
    "command": "str: the command line that reproduces this run",
    "machine": "object: platform, cpu_count, load_average_before/after ([1, 5, 15] min), the CPU's ISA flags",
    "settings": "object: model, workload, num_requests, rounds, concurrency, threads, seed, prompt_tokens and "
    "output_tokens of one round, agreement_prompts, agreement_tokens",
    "peers": "list: one object per server, in order: name, kind, command, log, plus what it reported "
    "(llama.cpp: system_info)",
    "agreement": "object: prompts, tokens (max per prompt), token_agreement (mean fraction of each output "
    "before the first differing token), identical (outputs that agree in full), how (what was compared)",
    "rounds": "list: one object per timed round in the order run, keys in ROUND_SCHEMA",
    "summary": "object: per peer name {output_tok_s, ttft_p50_ms, tpot_p50_ms} (medians over its rounds), "
    'and "ratio": the same keys, first peer / second peer',
}

ROUND_SCHEMA: dict[str, str] = {
    "round": "int: 0-based round; both servers get the same requests in a round",
    "peer": "str: the server's name",
    "seed": "int: the workload seed of this round",
    "completed": "int: requests that streamed their full output",
    "failed": "int: requests that did not",
    "duration_s": "float: seconds from the first request to the end of the last",
    "output_tokens": "int: completion tokens the server reported",
    "output_tok_s": "float: output tokens per second",
    "ttft_p50_ms": "float | null: median time to first token",
    "tpot_p50_ms": "float | null: median time per output token after the first",
    "other_load_cores": "float: CPU time of processes other than this one and the servers, in cores",
    "idle_peer_cores": "float: CPU time the other, idle server used meanwhile, in cores",
}


def _median(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if r[key] is not None]
    return statistics.median(values) if values else None


def summarize(names: list[str], rounds: list[dict]) -> dict:
    """Each server's medians over its rounds, and the first server's over the second's."""
    keys = ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms")
    out: dict = {}
    for name in names:
        mine = [r for r in rounds if r["peer"] == name]
        out[name] = {k: _median(mine, k) for k in keys}
    a, b = out[names[0]], out[names[1]]
    out["ratio"] = {k: (a[k] / b[k] if a[k] and b[k] else None) for k in keys}
    return out


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def format_compare(result: dict) -> str:
    """The terminal/README table: medians per server and the first / second ratio, then the rounds."""
    a, b = (p["name"] for p in result["peers"])
    s, summ, m = result["settings"], result["summary"], result["machine"]
    head = (
        f"{s['num_requests']} requests x {s['rounds']} rounds per server, {s['workload']} workload "
        f"({s['prompt_tokens']:,} prompt + {s['output_tokens']:,} output tokens in round 0), "
        f"concurrency {s['concurrency']}, greedy, ignore_eos"
    )
    lines = [head, "", f"| metric (median of rounds) | {a} | {b} | {a} / {b} |", "|---|---:|---:|---:|"]
    for key, label in (
        ("output_tok_s", "output tok/s"),
        ("ttft_p50_ms", "TTFT p50 (ms)"),
        ("tpot_p50_ms", "TPOT p50 (ms)"),
    ):
        ratio = summ["ratio"][key]
        lines.append(
            f"| {label} | {_fmt(summ[a][key])} | {_fmt(summ[b][key])} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} |"
        )
    lines += [
        "",
        "| round | server | out tok/s | TTFT p50 (ms) | TPOT p50 (ms) | done | other load (cores) |",
    ]
    lines.append("|---:|---|---:|---:|---:|---:|---:|")
    for r in result["rounds"]:
        lines.append(
            f"| {r['round']} | {r['peer']} | {_fmt(r['output_tok_s'])} | {_fmt(r['ttft_p50_ms'])} | "
            f"{_fmt(r['tpot_p50_ms'])} | {r['completed']}/{r['completed'] + r['failed']} | "
            f"{r['other_load_cores']:.2f} |"
        )
    ag = result["agreement"]
    if ag:
        lines.append(
            f"\ngreedy agreement {a} vs {b}: {100 * ag['token_agreement']:.0f}% of tokens, "
            f"{ag['identical']}/{ag['prompts']} outputs identical ({ag['tokens']} tokens max, {ag['how']})"
        )
    for p in result["peers"]:
        extra = f"; {p['system_info']}" if p.get("system_info") else ""
        lines.append(f"{p['name']}: {' '.join(map(str, p['command']))}{extra}")
    before, after = (
        " ".join(f"{x:.2f}" for x in m[k]) for k in ("load_average_before", "load_average_after")
    )
    lines.append(f"load average before {before}, after {after}; {m['cpu_count']} CPUs ({m['isa']})")
    if result["command"]:
        lines.append(f"reproduce: {result['command']}")
    return "\n".join(lines)
