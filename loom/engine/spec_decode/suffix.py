"""A suffix automaton over the earlier sequences of one agent program, for the `suffix` proposer.

An agent's calls repeat each other: the same tool-call scaffolding, the same JSON keys, quotes of an
earlier answer. The automaton (built online, O(1) amortized per token) recognizes every substring of the
program's earlier sequences; walking it with a request's tokens keeps the longest suffix of that request
which occurred before, and where, so the tokens that followed it there are the draft.
"""

from __future__ import annotations

from collections import deque


class SuffixAutomaton:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.sequences: deque[list[int]] = deque()
        self.num_tokens = 0
        self.version = 0
        """Bumped whenever states may have changed (matches against an older version must restart)."""
        self._reset()

    def _reset(self) -> None:
        self.next: list[dict[int, int]] = [{}]
        self.link = [-1]
        self.len = [0]
        self.first_end = [-1]  # where the state's substrings first end in `text`
        self.last = 0
        self.text: list[int] = []
        self._separator = -1

    def _extend(self, token: int) -> None:
        cur = len(self.len)
        self.len.append(self.len[self.last] + 1)
        self.link.append(0)
        self.next.append({})
        self.first_end.append(len(self.text))
        self.text.append(token)
        p = self.last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        if p != -1:
            q = self.next[p][token]
            if self.len[p] + 1 == self.len[q]:
                self.link[cur] = q
            else:
                clone = len(self.len)
                self.len.append(self.len[p] + 1)
                self.next.append(dict(self.next[q]))
                self.link.append(self.link[q])
                self.first_end.append(self.first_end[q])
                while p != -1 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self.link[q] = clone
                self.link[cur] = clone
        self.last = cur

    def _append_sequence(self, tokens: list[int]) -> None:
        for t in tokens:
            self._extend(t)
        # A separator of its own after each sequence: no match runs from one sequence into the next.
        self._extend(self._separator)
        self._separator -= 1

    def add_sequence(self, tokens: list[int]) -> None:
        tokens = list(tokens[-self.max_tokens :])
        self.sequences.append(tokens)
        self.num_tokens += len(tokens)
        if self.num_tokens > self.max_tokens:
            while self.num_tokens > self.max_tokens:
                self.num_tokens -= len(self.sequences.popleft())
            self._reset()
            for seq in self.sequences:
                self._append_sequence(seq)
        else:
            self._append_sequence(tokens)
        self.version += 1

    def step(self, state: int, length: int, token: int) -> tuple[int, int]:
        """Extend a match (state, its length) by one token of the text being matched."""
        while state and token not in self.next[state]:
            state = self.link[state]
            length = self.len[state]
        target = self.next[state].get(token)
        if target is None:
            return 0, 0
        return target, length + 1

    def continuation(self, state: int, k: int) -> list[int]:
        """Up to k tokens that followed the match's first occurrence (stopping at a sequence's end)."""
        start = self.first_end[state] + 1
        out = []
        for t in self.text[start : start + k]:
            if t < 0:
                break
            out.append(t)
        return out
