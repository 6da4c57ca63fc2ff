"""Context-length policies on chat and completions prompts."""

from __future__ import annotations

import pytest

from loom.errors import ContextLengthExceeded, InvalidRequest
from loom.frontend.truncation import fit_chat, fit_prompt
from loom.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return Tokenizer(tiny_llama_dir)


SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 4}


def conversation(turns: int) -> list[dict]:
    msgs = [SYSTEM]
    for k in range(turns):
        msgs.append({"role": "user", "content": f"question number {k} " * 6})
        msgs.append({"role": "assistant", "content": f"answer number {k} " * 6})
    msgs.append({"role": "user", "content": "the latest question"})
    return msgs


def n_tokens(tok, msgs) -> int:
    return len(tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False))


def test_fits_untouched(tok):
    msgs = conversation(2)
    fitted = fit_chat(tok, msgs, None, 10_000, 10_000, "error")
    assert not fitted.truncated and len(fitted.prompt_token_ids) == n_tokens(tok, msgs)


def test_error_policy_names_lengths(tok):
    msgs = conversation(4)
    n = n_tokens(tok, msgs)
    with pytest.raises(ContextLengthExceeded, match=f"{n} tokens but at most 50"):
        fit_chat(tok, msgs, None, 50, 60, "error")


def test_drop_turns_keeps_system_and_latest_user_turn(tok):
    msgs = conversation(4)
    full = n_tokens(tok, msgs)
    budget = n_tokens(tok, [msgs[0]] + msgs[-5:]) + 1  # room for the last two turns only
    fitted = fit_chat(tok, msgs, None, budget, 4096, "drop_turns")
    assert fitted.dropped_messages == 4  # two user/assistant turns
    expected = tok.encode(tok.apply_chat_template([msgs[0]] + msgs[5:]), add_special_tokens=False)
    assert fitted.prompt_token_ids == expected
    assert fitted.truncated_tokens == full - len(expected)
    text = tok.decode(fitted.prompt_token_ids, skip_special_tokens=False)
    assert "careful assistant" in text and "the latest question" in text and "question number 0" not in text


def test_drop_turns_cannot_drop_the_latest_turn(tok):
    msgs = [SYSTEM, {"role": "user", "content": "long question " * 40}]
    with pytest.raises(ContextLengthExceeded):
        fit_chat(tok, msgs, None, n_tokens(tok, [SYSTEM]) + 5, 4096, "drop_turns")


def test_left_keeps_system_turn_then_the_tail(tok):
    msgs = conversation(4)
    system_ids = tok.encode(
        tok.apply_chat_template([SYSTEM], add_generation_prompt=False), add_special_tokens=False
    )
    full = tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    budget = len(system_ids) + 30
    fitted = fit_chat(tok, msgs, None, budget, 4096, "left")
    assert fitted.prompt_token_ids == system_ids + full[-30:]
    assert fitted.truncated_tokens == len(full) - budget


@pytest.mark.parametrize("policy", ["error", "left", "drop_turns"])
def test_system_prompt_longer_than_budget_is_an_error_whatever_the_policy(tok, policy):
    msgs = conversation(1)
    with pytest.raises(ContextLengthExceeded, match="system prompt" if policy != "error" else "conversation"):
        fit_chat(tok, msgs, None, 10, 4096, policy)


def test_completions_left_and_error():
    ids = list(range(100))
    assert fit_prompt(ids, 40, 50, "left").prompt_token_ids == ids[-40:]
    assert fit_prompt(ids, 40, 50, "left").truncated_tokens == 60
    with pytest.raises(ContextLengthExceeded, match="100 tokens"):
        fit_prompt(ids, 40, 50, "error")
    with pytest.raises(InvalidRequest, match="drop_turns"):
        fit_prompt(ids, 40, 50, "drop_turns")
