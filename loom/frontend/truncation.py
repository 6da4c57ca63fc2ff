"""Context-length control: what to do with a prompt that does not fit `max_model_len - max_tokens`.

Policies (per server, overridable per request with the extension field `truncation`):
- `error` (default): a 400 naming the lengths;
- `left`: keep the last tokens that fit; for chat, the system turn is kept whole in front of them;
- `drop_turns` (chat only): drop the oldest whole user/assistant turns (a user message and the
  assistant/tool messages answering it), never the system prompt nor the latest user turn, until it fits.
A system prompt that alone does not fit is a 400 whatever the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.errors import ContextLengthExceeded, InvalidRequest
from loom.tokenizer import Tokenizer

POLICIES = ("error", "left", "drop_turns")


@dataclass
class Fitted:
    prompt_token_ids: list[int]
    truncated_tokens: int = 0
    """Prompt tokens removed by the policy (0 when it fit as sent)."""
    dropped_messages: int = 0

    @property
    def truncated(self) -> bool:
        return self.truncated_tokens > 0


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise InvalidRequest(f"truncation must be one of {POLICIES}, got {policy!r}", param="truncation")
    return policy


def _too_long(n: int, budget: int, max_model_len: int, what: str = "the prompt") -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"{what} has {n} tokens but at most {budget} fit (context {max_model_len} minus the tokens to "
        f"generate); shorten it, lower max_tokens, or ask for truncation 'left' or 'drop_turns'",
        param="messages" if what != "the prompt" else "prompt",
    )


def fit_prompt(ids: list[int], budget: int, max_model_len: int, policy: str) -> Fitted:
    """Completions: a token prompt against a budget."""
    if len(ids) <= budget:
        return Fitted(ids)
    if policy == "left" and budget > 0:
        return Fitted(ids[-budget:], truncated_tokens=len(ids) - budget)
    if policy == "drop_turns":
        raise InvalidRequest(
            "truncation 'drop_turns' applies to chat messages; use 'left'", param="truncation"
        )
    raise _too_long(len(ids), budget, max_model_len)


def fit_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    tools: list[dict] | None,
    budget: int,
    max_model_len: int,
    policy: str,
    image_tokens: int = 0,
) -> Fitted:
    """Chat: render, tokenize, and apply the policy until the prompt fits the budget. `image_tokens` are
    the tokens the images' placeholders will grow by (already taken from `budget`): an error counts them."""

    def encode(msgs: list[dict], generation_prompt: bool = True) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=generation_prompt)
        return tokenizer.encode(text, add_special_tokens=False)

    ids = encode(messages)
    if len(ids) <= budget:
        return Fitted(ids)
    if policy == "error":
        raise _too_long(
            len(ids) + image_tokens, budget + image_tokens, max_model_len, what="the conversation"
        )
    has_system = bool(messages) and messages[0].get("role") == "system"
    system_ids = encode(messages[:1], generation_prompt=False) if has_system else []
    if len(system_ids) >= budget:
        raise _too_long(len(system_ids), budget, max_model_len, what="the system prompt")
    if policy == "left":
        keep = budget - len(system_ids)
        if system_ids and ids[: len(system_ids)] == system_ids:
            body = ids[len(system_ids) :]
        else:  # the template merged the system turn with what follows: cut the rendered whole
            body, system_ids = ids, []
            keep = budget
        kept = system_ids + body[-keep:]
        return Fitted(kept, truncated_tokens=len(ids) - len(kept))
    if policy == "drop_turns":
        head = messages[:1] if has_system else []
        turns = _turns(messages[len(head) :])
        dropped = 0
        while len(turns) > 1:
            dropped += len(turns.pop(0))
            candidate = encode(head + [m for turn in turns for m in turn])
            if len(candidate) <= budget:
                return Fitted(candidate, truncated_tokens=len(ids) - len(candidate), dropped_messages=dropped)
        raise _too_long(
            len(ids), budget, max_model_len, what="the conversation, even without its older turns,"
        )
    raise InvalidRequest(f"unknown truncation policy {policy!r}", param="truncation")


def _turns(messages: list[dict]) -> list[list[dict]]:
    """Split messages into turns, each starting at a user message (anything before the first user
    message forms its own leading turn)."""
    turns: list[list[dict]] = []
    for m in messages:
        if m.get("role") == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns
