"""What a run did, node by node: when (relative to the run's start), how many tokens, retries, errors.
Serializes to JSON and draws a Gantt-like timeline."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUS_COLORS = {
    "ok": "#4c9f70",
    "failed": "#d1495b",
    "cancelled": "#8d99ae",
    "skipped": "#d9d9d9",
    "running": "#edae49",
    "pending": "#d9d9d9",
}


@dataclass
class Attempt:
    """One try of a node: [start, end] in seconds since the run started, and its error if it failed."""

    start: float
    end: float | None = None
    error: str | None = None


@dataclass
class NodeRecord:
    """One node's part of a run. Times are monotonic seconds since the run started."""

    name: str
    kind: str
    deps: list[str] = field(default_factory=list)
    status: str = "pending"
    """pending, running, ok, failed, skipped (an upstream node failed) or cancelled."""
    start: float | None = None
    end: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    llm_calls: int = 0
    tool_calls: int = 0
    error: str | None = None

    @property
    def retries(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def duration(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start


@dataclass
class RunRecord:
    """The record of one run of a workflow."""

    run_id: str
    program_id: str
    workflow: str
    started_at: float
    """Wall-clock time (time.time()) the run started; every other time is relative to it."""
    status: str = "running"
    """running, ok, failed, cancelled or deadline_exceeded."""
    duration: float | None = None
    nodes: dict[str, NodeRecord] = field(default_factory=dict)

    @property
    def totals(self) -> dict[str, int]:
        keys = ("prompt_tokens", "completion_tokens", "cached_tokens", "llm_calls", "tool_calls")
        return {k: sum(getattr(n, k) for n in self.nodes.values()) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name, node in self.nodes.items():
            data["nodes"][name]["retries"] = node.retries
            data["nodes"][name]["duration"] = node.duration
        data["totals"] = self.totals
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def timeline_png(self, path: str | Path, title: str | None = None) -> None:
        """Draw one row per node (in start order), one bar per attempt, coloured by outcome."""
        # The object API with an explicit Agg canvas: no pyplot, so no global backend or figure state.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        rows = sorted(self.nodes.values(), key=lambda n: (n.start is None, n.start or 0.0, n.name))
        end = max([self.duration or 0.0] + [n.end or 0.0 for n in rows]) or 1.0
        fig = Figure(figsize=(10, 1.2 + 0.4 * len(rows)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for y, node in enumerate(rows):
            for i, attempt in enumerate(node.attempts):
                last = i == len(node.attempts) - 1
                status = node.status if last else "failed"
                stop = attempt.end if attempt.end is not None else end
                ax.barh(
                    y,
                    stop - attempt.start,
                    left=attempt.start,
                    height=0.6,
                    color=STATUS_COLORS.get(status, "#999999"),
                    hatch=None if last else "//",
                    edgecolor="black",
                    linewidth=0.5,
                )
            label = node.kind
            if node.llm_calls:
                label += (
                    f"  in {node.prompt_tokens} (cached {node.cached_tokens}) out {node.completion_tokens}"
                )
            if node.retries:
                label += f"  retries {node.retries}"
            x = node.end if node.end is not None else (node.start or 0.0)
            ax.text(x + end * 0.01, y, label, va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [n.name for n in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, end * 1.35)
        ax.set_xlabel("seconds since the run started")
        ax.set_title(title or f"{self.workflow} ({self.status}, {end:.2f} s)")
        ax.legend(
            handles=[
                Patch(color=c, label=s) for s, c in STATUS_COLORS.items() if s not in ("pending", "running")
            ],
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            ncol=4,
            fontsize=7,
            frameon=False,
        )
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(str(path), dpi=120)
