"""Prompt prefixes as chained block hashes, and what the router remembers of each replica's.

Why hash the request's text rather than its tokens: the router only needs "this replica has seen this
prefix before", and it compares a request against what the router itself sent, never against the
replica's real KV blocks. Equal text prefixes give equal leading chunk hashes whatever the tokenizer,
so text is as good a key as tokens for that question, and it costs a few microseconds per request
where tokenizing would need the model's tokenizer and chat template in the router (a Jinja render plus
a BPE pass: ~0.5-2 ms for an agent prompt of a few thousand tokens, the whole of the < 2 ms budget)
and would tie the router to one model version. The price: a block boundary in characters is not a
KV block boundary, so a match is approximate to within one block, which does not change which
replica holds the longer prefix.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence

# Separates messages so ("ab", "c") and ("a", "bc") never render the same.
_SEP = "\x1e"


def request_text(body: dict) -> str:
    """The part of a chat or completions body that becomes the prompt, in a canonical string: tools,
    then each message's role and text; or the completion prompt. Sampling fields are left out: two
    requests that differ only in max_tokens share their whole prefix."""
    parts: list[str] = []
    if body.get("tools"):
        parts.append(json.dumps(body["tools"], sort_keys=True))
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role', '')}:{content if isinstance(content, str) else ''}")
        return _SEP.join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of prompts: route by the first
    if isinstance(prompt, list):
        prompt = ",".join(map(str, prompt))
    parts.append(prompt if isinstance(prompt, str) else "")
    return _SEP.join(parts)


def block_hashes(text: str, block_chars: int) -> tuple[int, ...]:
    """Hashes of each full block of `block_chars` characters, each chained over all blocks before it
    (as the KV cache chains its block hashes), so equal hashes mean equal prefixes. The partial last
    block is left out, as the KV cache leaves a partial block out of its prefix index."""
    hashes = []
    h = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hash((h, text[start : start + block_chars]))
        hashes.append(h)
    return tuple(hashes)


# The marker of a block that earlier prompts continued in more than one way.
_BRANCH = object()


class PrefixIndex:
    """The block hashes the router sent to one replica, least recently used first, at most `capacity`,
    each with what followed it: nothing yet (the prompt ended there), one block, or several (a branch).

    The bound should be about the replica's KV capacity in blocks: past that the replica has evicted
    the prefix anyway, so remembering more would only attract requests to a cache that is gone.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._blocks: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> tuple[int, bool]:
        """(how many leading blocks of `hashes` this replica holds, whether the request continues
        where an earlier prompt ended). A match that stops where earlier prompts went on differently
        is a prefix several conversations share (a system prompt), not this conversation's history."""
        n = 0
        blocks = self._blocks
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        if n == 0:
            return 0, False
        after = blocks[hashes[n - 1]]
        return n, after is None or (n < len(hashes) and after == hashes[n])

    def insert(self, hashes: Sequence[int]) -> None:
        # Deepest block first, so a chain's leading blocks are the most recently used and are evicted
        # last: a chain that lost its first block would match nothing at all.
        blocks = self._blocks
        for i in range(len(hashes) - 1, -1, -1):
            h = hashes[i]
            child = hashes[i + 1] if i + 1 < len(hashes) else None
            if h in blocks:
                after = blocks[h]
                if child is not None and after is not child and after != child:
                    blocks[h] = child if after is None else _BRANCH
                blocks.move_to_end(h)
            else:
                blocks[h] = child
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
