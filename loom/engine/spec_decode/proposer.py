"""Draft proposers: n-gram prompt lookup in the request's own tokens, and suffix matching over the request
and the earlier requests of its agent program; plus the adaptive controller both share.

Proposers work on token lists only (the scheduler calls them while deciding a step: no tensors). Each
request's index is built incrementally, so a step costs a few dictionary operations per new token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from loom.engine.spec_decode.config import SpeculativeConfig
from loom.engine.spec_decode.suffix import SuffixAutomaton

# Programs whose earlier requests the suffix method keeps (least recently used dropped first).
MAX_PROGRAMS = 64


class NgramIndex:
    """For each n in [nmin, nmax], the latest position where each n-gram of a sequence ends."""

    __slots__ = ("nmin", "nmax", "tables", "upto")

    def __init__(self, nmin: int, nmax: int):
        self.nmin, self.nmax = nmin, nmax
        self.tables: list[dict[tuple[int, ...], int]] = [{} for _ in range(nmax + 1)]
        self.upto = 0

    def _extend(self, tokens: list[int], until: int) -> None:
        for end in range(max(self.upto + 1, self.nmin), until + 1):
            for n in range(self.nmin, min(self.nmax, end) + 1):
                self.tables[n][tuple(tokens[end - n : end])] = end
        self.upto = max(self.upto, until)

    def match(self, tokens: list[int]) -> tuple[int, int]:
        """(length, end) of the longest suffix of tokens that also ends earlier, at `end`; (0, 0) if none."""
        total = len(tokens)
        # Every end position but the last is indexed: the suffix must match strictly earlier text.
        self._extend(tokens, total - 1)
        for n in range(min(self.nmax, total - 1), self.nmin - 1, -1):
            end = self.tables[n].get(tuple(tokens[total - n :]))
            if end is not None:
                return n, end
        return 0, 0


class _Acceptance:
    """Per-request controller: an exponential average of the fraction of drafts accepted; a request whose
    drafts keep failing proposes less, then pauses for a doubling number of steps."""

    __slots__ = ("rate", "proposals", "pause", "backoff")

    def __init__(self) -> None:
        self.rate = 1.0
        self.proposals = 0
        self.pause = 0
        self.backoff = 1

    def update(self, proposed: int, accepted: int) -> None:
        self.proposals += 1
        self.rate = 0.7 * self.rate + 0.3 * (accepted / proposed)
        if self.proposals >= 3 and self.rate < 0.25:
            self.pause, self.backoff = self.backoff, min(self.backoff * 2, 64)
        elif accepted * 2 >= proposed:
            self.backoff = 1

    def budget(self, k: int) -> int:
        if self.pause > 0:
            self.pause -= 1
            return 0
        return k if self.rate >= 0.5 else max(1, k // 2)


@dataclass(slots=True)
class _CorpusMatch:
    """A request's running match against its program's automaton."""

    version: int
    state: int = 0
    length: int = 0
    seen: int = 0
    """Tokens of the request walked so far."""


class Proposer:
    """Proposes draft tokens for running requests and learns from how many were accepted."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self._indexes: dict[str, NgramIndex] = {}
        self._acceptance: dict[str, _Acceptance] = {}
        self._programs: OrderedDict[str, SuffixAutomaton] = OrderedDict()
        self._matches: dict[str, _CorpusMatch] = {}

    def propose(
        self, req_id: str, tokens: list[int], max_tokens: int, program_id: str | None = None
    ) -> list[int]:
        """Up to min(k, max_tokens) tokens likely to follow `tokens`; [] when there is no good guess."""
        cfg = self.config
        k = min(cfg.num_speculative_tokens, max_tokens)
        if cfg.adaptive:
            k = min(k, self._acceptance.setdefault(req_id, _Acceptance()).budget(cfg.num_speculative_tokens))
        if k <= 0:
            return []
        index = self._indexes.get(req_id)
        if index is None:
            index = self._indexes[req_id] = NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
        length, end = index.match(tokens)
        draft = tokens[end : end + k] if length else []
        if cfg.method == "suffix" and program_id is not None:
            corpus = self._programs.get(program_id)
            if corpus is not None:
                self._programs.move_to_end(program_id)
                theirs = self._corpus_match(req_id, corpus, tokens)
                # The longer match is the better evidence; the request's own text wins ties.
                if theirs[0] > length and theirs[0] >= cfg.prompt_lookup_min:
                    draft = corpus.continuation(theirs[1], k)
        return draft

    def _corpus_match(self, req_id: str, corpus: SuffixAutomaton, tokens: list[int]) -> tuple[int, int]:
        """(length, state) of the longest suffix of tokens found in the program's earlier sequences."""
        m = self._matches.get(req_id)
        if m is None or m.version != corpus.version or m.seen > len(tokens):
            # New, or the automaton grew (its states may have split): re-walk the recent tail from the
            # root; a match longer than that tail would not change the draft.
            m = self._matches[req_id] = _CorpusMatch(corpus.version, seen=max(0, len(tokens) - 256))
        for t in tokens[m.seen :]:
            m.state, m.length = corpus.step(m.state, m.length, t)
        m.seen = len(tokens)
        return m.length, m.state

    def observe(self, req_id: str, proposed: int, accepted: int) -> None:
        if proposed > 0 and self.config.adaptive:
            self._acceptance.setdefault(req_id, _Acceptance()).update(proposed, accepted)

    def finish(self, req_id: str, tokens: list[int] | None = None, program_id: str | None = None) -> None:
        """The request left: drop its state; the suffix method keeps its tokens for its program."""
        self._indexes.pop(req_id, None)
        self._acceptance.pop(req_id, None)
        self._matches.pop(req_id, None)
        if self.config.method == "suffix" and program_id is not None and tokens:
            corpus = self._programs.get(program_id)
            if corpus is None:
                corpus = self._programs[program_id] = SuffixAutomaton(self.config.max_program_tokens)
                while len(self._programs) > MAX_PROGRAMS:
                    self._programs.popitem(last=False)
            self._programs.move_to_end(program_id)
            corpus.add_sequence(tokens)

    def release_program(self, program_id: str) -> None:
        self._programs.pop(program_id, None)


def make_proposer(config: SpeculativeConfig | None) -> Proposer | None:
    return None if config is None else Proposer(config)
