"""What `loom bench throughput` prints and draws: the table, the roofline report, the PNG of throughput
bars, and how far outputs agree between systems."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.bench.roofline import Roofline, flops_per_token, weight_bytes
from loom.bench.systems import Request
from loom.models.config import ModelConfig


@dataclass
class Row:
    system: str
    dtype: str
    seconds: float | None = None
    prompt_tokens: int = 0
    useful_output_tokens: int = 0
    note: str = ""
    outputs: list[list[int]] | None = field(default=None, repr=False)
    foreign_load: float | None = None
    """Cores other processes kept busy during the timed run (see ForeignLoad)."""
    steps: int | None = None
    """Forward passes (loom and HF static; HF static counts one per generated position per batch)."""

    @property
    def ok(self) -> bool:
        return self.seconds is not None

    def output_tps(self) -> float:
        return self.useful_output_tokens / self.seconds

    def total_tps(self) -> float:
        return (self.prompt_tokens + self.useful_output_tokens) / self.seconds


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over requests of the fraction of output tokens before the first difference."""
    fracs = []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        fracs.append(n / max(len(x), 1))
    return sum(fracs) / len(fracs)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def table(rows: list[Row], roofs: dict[str, Roofline], cfg: ModelConfig) -> str:
    head = (
        "| system | dtype | time (s) | useful out tok/s | total tok/s | vs hf-static "
        "| % of compute roofline | other load (cores) | notes |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.system} | {r.dtype} | - | - | - | - | - | - | {r.note} |")
            continue
        static = next((s for s in rows if s.system == "hf-static" and s.dtype == r.dtype and s.ok), None)
        vs = f"{r.output_tps() / static.output_tps():.2f}x" if static else "-"
        lines.append(
            f"| {r.system} | {r.dtype} | {r.seconds:.1f} | {fmt_rate(r.output_tps())} | {fmt_rate(r.total_tps())} "
            f"| {vs} | {100 * roofline_fraction(r, roofs[r.dtype], cfg):.1f}% | {r.foreign_load:.2f} | {r.note} |"
        )
    return "\n".join(lines)


def roofline_report(roof: Roofline, cfg: ModelConfig, reqs: list[Request], loom: Row | None) -> str:
    tokens = sum(len(r.prompt) + r.output_len for r in reqs)
    peak = roof.peak_flops
    best = flops_per_token(cfg) * tokens / peak
    shapes = ", ".join(f"M={m}: {f / 1e9:.0f}" for m, f in roof.model_flops.items())
    wbytes = weight_bytes(cfg, roof.dtype)
    step_floor = wbytes / roof.memory_bandwidth
    lines = [
        f"[{roof.dtype}, {roof.num_threads} threads] matmul GFLOP/s: {roof.square_size}^3 square "
        f"{roof.square_flops / 1e9:.0f}; model shapes {shapes}; peak {peak / 1e9:.0f}",
        f"  compute roofline: {flops_per_token(cfg) / 1e6:.0f} MFLOP/token -> {peak / flops_per_token(cfg):,.0f} "
        f"tok/s; the workload's {tokens:,} prompt+output tokens need >= {best:.2f} s",
        f"  memory bandwidth {roof.memory_bandwidth / 1e9:.1f} GB/s (copy, read+write); decode reads "
        f"{wbytes / 1e6:.0f} MB of weights per step -> >= {1e3 * step_floor:.2f} ms/step, "
        f"<= {1 / step_floor:,.0f} steps/s",
    ]
    if loom is not None and loom.ok:
        ms = 1e3 * loom.seconds / loom.steps
        lines.append(
            f"  loom: {loom.seconds:.2f} s = {100 * best / loom.seconds:.1f}% of compute roofline; "
            f"{loom.steps} steps at {ms:.1f} ms/step = {100 * step_floor * 1e3 / ms:.1f}% of the bandwidth floor"
        )
    return "\n".join(lines)


def roofline_fraction(row: Row, roof: Roofline, cfg: ModelConfig) -> float:
    """The compute-bound minimum time of the row's tokens over its measured time."""
    return (
        flops_per_token(cfg) * (row.prompt_tokens + row.useful_output_tokens) / roof.peak_flops / row.seconds
    )


def plot(rows: list[Row], roofs: dict[str, Roofline], cfg: ModelConfig, path: str, title: str) -> None:
    """Bars of useful output tokens/s per system, one group per dtype, labelled with the speed-up over
    hf-static and the fraction of the compute roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    systems = list(dict.fromkeys(r.system for r in rows))
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(2.2 + 1.3 * len(systems) * len(dtypes), 4.5))
    for j, system in enumerate(systems):
        for i, dtype in enumerate(dtypes):
            row = next((r for r in rows if r.system == system and r.dtype == dtype), None)
            if row is None or not row.ok:
                continue
            x = i + (j - (len(systems) - 1) / 2) * width
            ax.bar(x, row.output_tps(), width, color=f"C{j}", label=system)
            static = next((s for s in rows if s.system == "hf-static" and s.dtype == dtype and s.ok), None)
            label = f"{100 * roofline_fraction(row, roofs[dtype], cfg):.0f}%"
            if static is not None:
                label = f"{row.output_tps() / static.output_tps():.2f}x\n" + label
            ax.annotate(label, (x, row.output_tps()), ha="center", va="bottom", fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(
        unique.values(),
        unique.keys(),
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08),
        ncol=len(unique),
    )
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.set_ylabel("useful output tokens / s")
    ax.set_title(
        title + "\n(labels: speed-up over hf-static, % of the measured compute roofline)", fontsize=9
    )
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
