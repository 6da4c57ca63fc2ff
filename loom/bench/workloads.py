"""Workloads for `loom bench serve`: seeded, generated locally (nothing is downloaded), and the same for
every engine they are run against.

A workload is a list of items: a `Request` is sent once, when it arrives; a `Session` (the `agent`
workload) is a conversation whose turn k+1 is built from turn k's answer, so the load generator sends it
only after turn k finished; a `DagProgram` (the `dag` workload) is a fan-out/fan-in workflow run through
loom's agent runtime: questions about one document asked in parallel, then a summary of their answers.
Prompt text is made of common English words, about one token each in the usual BPE vocabularies:
lengths are only roughly the requested token counts, which is why the metrics take token counts from
the server's `usage`, never from these numbers.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from loom.agent.graph import Workflow
from loom.errors import InvalidRequest

WORKLOADS = ("random", "sharegpt-like", "shared-prefix", "agent", "phone-agent", "dag", "jsonl:PATH")
SHAREGPT_LENGTHS = Path(__file__).resolve().parent / "data" / "sharegpt_lengths.csv"

# Short, frequent words: each is a single token (with its leading space) in GPT-2, Llama and Qwen
# vocabularies, so N words come to roughly N tokens.
WORDS = (
    "the of and to in is was for on that with as by at from it his an are were which be this had not "
    "but they have one their all new has been more its after first who when she also two time other "
    "into can would over her we most only some three out up them may about these than people such "
    "during year then him known city there state world under where team each many later used both "
    "part while school he so could made four through since before high five life work best "
    "between well small great long name game film book house music water light power land war line "
    "group early old back play side found home way place day man end set good show right "
    "river road field north south west east area run open hand form market price study plan step "
    "review draft table source value change period cost model engine cache block token queue policy "
    "program branch summary claim method risk number result trial sample error signal growth region "
    "supply demand report survey measure rate bridge stone summer valley garden window paper letter"
).split()


@dataclass(slots=True)
class Request:
    """One request to send: a completions `prompt` (text or token ids) or chat `messages`."""

    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int = 128
    session_id: int | None = None
    """The agent session or dag program this call belongs to (None outside those workloads)."""
    turn: int | None = None
    """0-based turn within its session (dag: 0 for a branch call, 1 for the summary)."""
    program_id: str | None = None
    """The agent program this call belongs to: sent as loom's `program_id` body field, to loom only."""

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("a benchmark request needs exactly one of prompt and messages")
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}", param="max_tokens")

    @property
    def num_requests(self) -> int:
        return 1

    def first_request(self) -> Request:
        return self


@dataclass(slots=True)
class Session:
    """An agent conversation: a (long, shared) system prompt and user turns sent one after another, each
    with the history so far, including the model's previous answers."""

    session_id: int
    system: str
    user_turns: list[str]
    max_tokens: int

    @property
    def num_requests(self) -> int:
        return len(self.user_turns)

    def first_request(self) -> Request:
        return self.request(0, [])

    def request(self, turn: int, answers: list[str]) -> Request:
        """Turn `turn`'s request, given the answers to turns 0..turn-1."""
        if len(answers) != turn:
            raise ValueError(f"turn {turn} needs the {turn} previous answers, got {len(answers)}")
        messages = [{"role": "system", "content": self.system}]
        for user, answer in zip(self.user_turns[:turn], answers, strict=True):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": self.user_turns[turn]})
        return Request(messages=messages, max_tokens=self.max_tokens, session_id=self.session_id, turn=turn)


@dataclass(slots=True)
class PhoneSession(Session):
    """An Open-AutoGLM-shaped session: every step sends a fresh screenshot with its text, and the
    screenshot of the step before is removed from the history (only its text stays), so each prompt
    shares the system prompt and text history with the previous one, up to where that image was."""

    screen: tuple[int, int] = (1080, 2400)
    seed: int = 0

    def request(self, turn: int, answers: list[str]) -> Request:
        from loom.bench.screens import data_url, screenshot

        if len(answers) != turn:
            raise ValueError(f"turn {turn} needs the {turn} previous answers, got {len(answers)}")
        messages: list[dict] = [{"role": "system", "content": self.system}]
        for user, answer in zip(self.user_turns[:turn], answers, strict=True):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        image = screenshot(*self.screen, seed=self.seed * 1000 + turn)
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": self.user_turns[turn]},
                ],
            }
        )
        return Request(messages=messages, max_tokens=self.max_tokens, session_id=self.session_id, turn=turn)


@dataclass(slots=True)
class DagProgram:
    """A fan-out/fan-in agent program: one call per question about the document (the document is their
    shared system prompt), all at once, then a summary call whose prompt holds every answer."""

    program_index: int
    document: str
    questions: list[str]
    max_tokens: int

    @property
    def num_requests(self) -> int:
        return len(self.questions) + 1

    def branch_messages(self, branch: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.document},
            {"role": "user", "content": self.questions[branch]},
        ]

    def first_request(self) -> Request:
        """The first branch call as a plain request (for warm-up)."""
        return Request(
            messages=self.branch_messages(0),
            max_tokens=self.max_tokens,
            session_id=self.program_index,
            turn=0,
        )

    def to_workflow(self) -> Workflow:
        """Nodes branch_0.. (no deps) and summary, which reads each of them, so depends on all."""
        wf = Workflow(f"dag-{self.program_index}", sampling={"max_tokens": self.max_tokens})
        for b in range(len(self.questions)):
            # Node messages are templates: WORDS hold no braces, so the text is taken literally.
            wf.llm(f"branch_{b}", messages=self.branch_messages(b))
        notes = "\n".join(f"Answer {b + 1}: {{branch_{b}}}" for b in range(len(self.questions)))
        wf.llm("summary", f"Write one short summary of these answers about one document.\n{notes}")
        return wf


Item = Request | Session | PhoneSession | DagProgram


@dataclass
class Workload:
    name: str
    items: list[Item]

    @property
    def num_requests(self) -> int:
        return sum(it.num_requests for it in self.items)


@dataclass
class WorkloadOptions:
    """Shape of the generated workloads; each field is a `loom bench serve` flag."""

    input_len: int = 256
    """random / shared-prefix / agent / dag: prompt words per request (agent: per user turn; dag: per
    question)."""
    output_len: int = 128
    """max_tokens of each request (jsonl: when a line gives none)."""
    range_ratio: float = 0.0
    """random: lengths drawn uniformly from [len * (1 - r), len * (1 + r)]."""
    num_groups: int = 4
    """shared-prefix: groups of requests, each group sharing one prefix."""
    prefix_len: int = 1024
    """shared-prefix / dag: words in each group's shared prefix (dag: in each program's document)."""
    num_turns: int = 4
    """agent: turns per session."""
    system_len: int = 1024
    """agent: words in the system prompt all sessions share."""
    num_branches: int = 4
    """dag: questions each program asks about its document in parallel, before its summary call."""
    screen_size: str = "1080x2400"
    """phone-agent: the screenshots' width x height in pixels (the server's max_pixels decides how many
    image tokens each becomes)."""
    token_ids_vocab: int | None = None
    """random: send prompts as token ids drawn from [0, vocab) instead of text (completions endpoint only)."""


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=max(1, n)))


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    return max(1, rng.randint(math.floor(mean * (1 - ratio)), math.ceil(mean * (1 + ratio))))


def random_workload(n: int, opts: WorkloadOptions, seed: int) -> Workload:
    """Independent prompts of random words (or token ids) with lengths around opts.input_len."""
    if not 0 <= opts.range_ratio < 1:
        raise InvalidRequest(f"range_ratio must be in [0, 1), got {opts.range_ratio}", param="range_ratio")
    rng = random.Random(seed)
    items: list[Item] = []
    for _ in range(n):
        prompt_len = _length(rng, opts.input_len, opts.range_ratio)
        max_tokens = _length(rng, opts.output_len, opts.range_ratio)
        if opts.token_ids_vocab:
            prompt: str | list[int] = [rng.randrange(opts.token_ids_vocab) for _ in range(prompt_len)]
        else:
            prompt = words(rng, prompt_len)
        items.append(Request(prompt=prompt, max_tokens=max_tokens))
    return Workload("random", items)


def load_length_table(path: Path = SHAREGPT_LENGTHS) -> list[tuple[int, int]]:
    """(prompt_len, output_len) rows of a CSV with that header; `#` lines are comments."""
    with path.open() as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [(int(r["prompt_len"]), int(r["output_len"])) for r in rows]


def sharegpt_like_workload(n: int, opts: WorkloadOptions, seed: int) -> Workload:
    """Prompt/output length pairs drawn (with replacement) from the committed table of chat lengths."""
    rng = random.Random(seed)
    table = load_length_table()
    items: list[Item] = []
    for prompt_len, output_len in rng.choices(table, k=n):
        items.append(Request(prompt=words(rng, prompt_len), max_tokens=output_len))
    return Workload("sharegpt-like", items)


def shared_prefix_workload(n: int, opts: WorkloadOptions, seed: int) -> Workload:
    """Requests in opts.num_groups groups; a group's requests share a long prefix, then differ. Requests
    are interleaved across groups (request i is in group i % G), as concurrent users of G documents."""
    if opts.num_groups < 1:
        raise InvalidRequest(f"num_groups must be >= 1, got {opts.num_groups}", param="num_groups")
    rng = random.Random(seed)
    prefixes = [words(rng, opts.prefix_len) for _ in range(opts.num_groups)]
    items: list[Item] = []
    for i in range(n):
        suffix = words(rng, opts.input_len)
        items.append(
            Request(prompt=f"{prefixes[i % opts.num_groups]}\n\n{suffix}", max_tokens=opts.output_len)
        )
    return Workload("shared-prefix", items)


def agent_workload(n: int, opts: WorkloadOptions, seed: int) -> Workload:
    """ceil(n / num_turns) sessions of num_turns turns (the last one shorter, so n requests in all), all
    with the same long system prompt, as many users of one agent."""
    if opts.num_turns < 1:
        raise InvalidRequest(f"num_turns must be >= 1, got {opts.num_turns}", param="num_turns")
    rng = random.Random(seed)
    system = "You are a research agent. " + words(rng, opts.system_len)
    items: list[Item] = []
    for s, start in enumerate(range(0, n, opts.num_turns)):
        turns = [words(rng, opts.input_len) for _ in range(min(opts.num_turns, n - start))]
        items.append(Session(s, system, turns, opts.output_len))
    return Workload("agent", items)


def phone_agent_workload(n: int, opts: WorkloadOptions, seed: int) -> Workload:
    """ceil(n / num_turns) phone-agent sessions of num_turns steps (as agent_workload), each step with a
    fresh synthetic screenshot of --screen-size, the previous one stripped from the history."""
    if opts.num_turns < 1:
        raise InvalidRequest(f"num_turns must be >= 1, got {opts.num_turns}", param="num_turns")
    try:
        width, height = (int(v) for v in opts.screen_size.lower().split("x"))
    except ValueError:
        raise InvalidRequest(
            f"screen_size must be WIDTHxHEIGHT, got {opts.screen_size!r}", "screen_size"
        ) from None
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise InvalidRequest(f"screen_size {width}x{height} is out of range (16-8192)", "screen_size")
    rng = random.Random(seed)
    system = (
        "You are a phone-operating agent. Each step you see the current screenshot and the task; answer "
        'with one action: do(action="Tap", element=[x, y]), do(action="Type", text="..."), or '
        'finish(message="..."). ' + words(rng, opts.system_len)
    )
    items: list[Item] = []
    for s, start in enumerate(range(0, n, opts.num_turns)):
        turns = [f"Step {k + 1}: {words(rng, opts.input_len)}" for k in range(min(opts.num_turns, n - start))]
        items.append(PhoneSession(s, system, turns, opts.output_len, (width, height), seed * 7919 + s))
    return Workload("phone-agent", items)


def dag_workload(n: int, opts: WorkloadOptions, seed: int) -> Workload:
    """ceil(n / (num_branches + 1)) programs of num_branches + 1 calls each, so n rounded up to whole
    programs. Each program has its own document: the cache can only help within a program, whose
    branches share their document as a prefix."""
    if opts.num_branches < 1:
        raise InvalidRequest(f"num_branches must be >= 1, got {opts.num_branches}", param="num_branches")
    rng = random.Random(seed)
    items: list[Item] = []
    for p in range(math.ceil(n / (opts.num_branches + 1))):
        document = "Answer from this document. " + words(rng, opts.prefix_len)
        questions = [words(rng, opts.input_len) for _ in range(opts.num_branches)]
        items.append(DagProgram(p, document, questions, opts.output_len))
    return Workload("dag", items)


def jsonl_workload(path: str | Path, n: int | None, opts: WorkloadOptions) -> Workload:
    """One request per line: {"prompt": str | [int]} or {"messages": [...]}, optional "max_tokens".
    The first n lines (all when n is None)."""
    items: list[Item] = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if n is not None and len(items) == n:
                break
            try:
                obj = json.loads(line)
                items.append(
                    Request(
                        prompt=obj.get("prompt"),
                        messages=obj.get("messages"),
                        max_tokens=int(obj.get("max_tokens", opts.output_len)),
                    )
                )
            except (ValueError, TypeError, AttributeError) as e:
                raise InvalidRequest(f"{path}:{lineno}: {e}") from e
    if not items:
        raise InvalidRequest(f"{path} holds no requests")
    return Workload(f"jsonl:{path}", items)


def make_workload(spec: str, n: int, seed: int, opts: WorkloadOptions | None = None) -> Workload:
    """The workload named by `spec` (one of WORKLOADS) with n requests."""
    opts = opts or WorkloadOptions()
    if n < 1:
        raise InvalidRequest(f"num_requests must be >= 1, got {n}", param="num_requests")
    if spec.startswith("jsonl:"):
        return jsonl_workload(spec.removeprefix("jsonl:"), n, opts)
    builders = {
        "random": random_workload,
        "sharegpt-like": sharegpt_like_workload,
        "shared-prefix": shared_prefix_workload,
        "agent": agent_workload,
        "phone-agent": phone_agent_workload,
        "dag": dag_workload,
    }
    if spec not in builders:
        raise InvalidRequest(f"unknown workload {spec!r}; choose one of {', '.join(WORKLOADS)}")
    return builders[spec](n, opts, seed)
