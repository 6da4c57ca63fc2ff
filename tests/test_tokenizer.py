"""Tokenizer wrapper, chat template rendering, incremental detokenization and stop strings."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from transformers import AutoTokenizer

from loom.errors import InvalidRequest
from loom.models.tiny import corpus_lines
from loom.tokenizer import IncrementalDetokenizer, Tokenizer

UNICODE_SAMPLES = [
    "café naïve résumé",
    "你好世界，今天天气很好。",
    "rocket 🚀 party 🎉 family 👨‍👩‍👧 flag 🇫🇷",
    "math 𝔘𝔫𝔦 ∑ ∫ ≠ ½",
    "tabs\tnew\nlines\r\n and  double  spaces ",
    "zero\u200bwidth e\u0301 combining",
    "控制字符 \x00\x07 end",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tok(tiny_llama_dir) -> Tokenizer:
    return Tokenizer(tiny_llama_dir)


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x400, 0x4FF),
        (0x4E00, 0x9FFF),
        (0x1F300, 0x1F6FF),
        (0x10000, 0x1FFFF),
    ]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def _stream(tok: Tokenizer, ids: list[int], chunk_sizes=(1,), prompt=(), seed=0, **kwargs):
    """Feed ids in random chunks; return (deltas, matched stop or None, detokenizer)."""
    rng = random.Random(seed)
    detok = IncrementalDetokenizer(tok, list(prompt), **kwargs)
    deltas, matched, i = [], None, 0
    while i < len(ids) and matched is None:
        n = rng.choice(chunk_sizes)
        delta, matched = detok.step(ids[i : i + n])
        deltas.append(delta)
        i += n
    if matched is None:
        deltas.append(detok.flush())
    return deltas, matched, detok


def test_attributes(tok, tiny_llama_dir):
    hf = AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)
    im_end, eot = hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.vocab_size == len(hf) == 2048
    assert tok.eos_token_ids == {im_end, eot}
    assert tok.pad_token_id == eot
    assert tok.has_chat_template


def test_unicode_round_trip(tok):
    rng = random.Random(0)
    samples = UNICODE_SAMPLES + [_random_unicode(rng, rng.randint(1, 40)) for _ in range(200)]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_skipped_on_request(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_full_decode(tok, skip_special_tokens):
    rng = random.Random(1)
    lines = corpus_lines(seed=7, n=300) + UNICODE_SAMPLES
    prompt = tok.encode("<|im_start|>user\nWrite something 🚀<|im_end|>\n<|im_start|>assistant\n")
    for trial in range(60):
        text = " ".join(rng.sample(lines, 3))
        if trial % 3 == 0:
            text = text + "<|im_end|>" + _random_unicode(rng, 10)
        ids = tok.encode(text, add_special_tokens=False)
        deltas, _, detok = _stream(
            tok,
            ids,
            chunk_sizes=(1, 1, 2, 3),
            prompt=prompt,
            seed=trial,
            skip_special_tokens=skip_special_tokens,
        )
        expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected == detok.text
        assert all("\ufffd" not in d for d in deltas)


def test_window_stays_small(tok):
    ids = tok.encode(" ".join(corpus_lines(seed=3, n=100)), add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    for i in ids:
        detok.step([i])
        # O(1) per token: only a few tokens before the newest are decoded again.
        assert len(detok._ids) - detok._prefix_offset <= 8


def test_split_emoji_never_yields_replacement_char(tok):
    text = "ok 🎉𝔘 done"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in pieces) >= 3  # the emoji really is split over byte-level tokens
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.step([i])[0] for i in ids]
    assert "" in deltas  # held back while a character is incomplete
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_incomplete_character_at_end_is_flushed_like_decode(tok):
    ids = tok.encode("hi 🎉", add_special_tokens=False)[:-1]
    deltas, _, _ = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert deltas[-1].endswith("\ufffd")  # only flush lets it out


def test_stop_string_truncates(tok):
    ids = tok.encode("Hello world. Stop here. More text", add_special_tokens=False)
    deltas, matched, detok = _stream(tok, ids, stop=["Stop"])
    assert matched == "Stop" and detok.matched_stop == "Stop" and detok.finished
    assert "".join(deltas) == detok.text == "Hello world. "
    assert detok.step(tok.encode(" more")) == ("", None)
    assert detok.flush() == ""


def test_stop_string_included_on_request(tok):
    ids = tok.encode("Hello world. Stop here.", add_special_tokens=False)
    deltas, matched, detok = _stream(tok, ids, stop=["Stop"], include_stop_str_in_output=True)
    assert "".join(deltas) == detok.text == "Hello world. Stop"


def test_earliest_stop_wins_within_one_step(tok):
    ids = tok.encode("alpha beta gamma", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["gamma", "beta"])
    assert detok.step(ids) == ("alpha ", "beta")


def test_stop_string_split_across_tokens(tok):
    text = "The river ran low that summer, and the people"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    # A stop made of the end of one token and the start of the next.
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) >= 3 and len(pieces[i]) >= 3)
    stop = pieces[k - 1][-2:] + pieces[k][:2]
    start = text.index(stop)
    assert start < len("".join(pieces[:k])) < start + len(stop)
    deltas, matched, detok = _stream(tok, ids, stop=[stop])
    assert matched == stop
    assert "".join(deltas) == detok.text == text[:start]


def test_stop_prefix_is_held_back_then_released(tok):
    stop = "STOP!"
    text = "go ST then STO and STOP? but not STOP"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=[stop])
    seen = ""
    for n in range(1, len(ids) + 1):
        delta, matched = detok.step([ids[n - 1]])
        assert matched is None
        seen += delta
        full = tok.decode(ids[:n])
        # Whatever is held back is exactly the tail that could still become "STOP!".
        held = full[len(seen) :]
        assert full.startswith(seen)
        assert held == "" or stop.startswith(held), (full, seen)
        if held == "":
            assert not any(full.endswith(stop[:j]) for j in range(1, len(stop)))
    assert seen == text[: -len("STOP")]
    assert detok.flush() == "STOP"
    assert detok.text == text


def test_streamed_text_never_contains_a_later_stop(tok):
    rng = random.Random(5)
    words = ["alpha", "be", "beta", "gam", "gamma", "β", "🎉", "end", "en", " ", "\n"]
    stops = ["beta gamma", "🎉end", "\n\n"]
    for trial in range(80):
        text = "".join(rng.choice(words) for _ in range(30))
        ids = tok.encode(text, add_special_tokens=False)
        deltas, matched, detok = _stream(tok, ids, chunk_sizes=(1, 2), seed=trial, stop=stops)
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            pos, stop = min(hits)
            assert matched == stop and "".join(deltas) == text[:pos]
        else:
            assert matched is None and "".join(deltas) == text
        assert detok.text == "".join(deltas)


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Zürich?"}],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
            {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET"}}},
        ],
    },
    {"role": "tool", "tool_call_id": "a", "content": "12°C"},
    {"role": "tool", "tool_call_id": "b", "content": "14:00"},
    {"role": "assistant", "content": "12°C at 14:00."},
    {"role": "user", "content": "Thanks"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_chat_template_renders_all_roles(tok):
    prompt = tok.apply_chat_template(MESSAGES, tools=TOOLS)
    assert prompt.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in prompt
    assert "<|im_start|>user\nWeather in Zürich?<|im_end|>\n" in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call><|im_end|>\n'
    ) in prompt
    assert (
        "<|im_start|>user\n<tool_response>\n12°C\n</tool_response>\n"
        "<tool_response>\n14:00\n</tool_response><|im_end|>\n"
    ) in prompt
    assert "<|im_start|>assistant\n12°C at 14:00.<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n")
    # The same template through HF's own renderer gives the same string.
    assert prompt == tok.hf.apply_chat_template(
        MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )


def test_chat_template_without_tools_or_generation_prompt(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages[:1]).endswith("<|im_start|>assistant\n")
    ids = tok.encode(tok.apply_chat_template(messages[:1]))
    assert (
        tok.decode(ids, skip_special_tokens=False)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_bad_role_is_invalid_request(tok):
    with pytest.raises(InvalidRequest, match="Unsupported message role") as info:
        tok.apply_chat_template([{"role": "wizard", "content": "hi"}])
    assert info.value.param == "messages"


@pytest.fixture
def copied_model(tiny_llama_dir, tmp_path):
    def copy(**tokenizer_config_updates):
        d = tmp_path / f"model{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_llama_dir, d)
        path = d / "tokenizer_config.json"
        config = json.loads(path.read_text())
        for key, value in tokenizer_config_updates.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
        return d

    return copy


def test_no_chat_template_is_invalid_request(copied_model):
    tok = Tokenizer(copied_model(chat_template=None))
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequest, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_runs_sandboxed(copied_model):
    tok = Tokenizer(copied_model(chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}"))
    with pytest.raises(InvalidRequest):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok = Tokenizer(copied_model(chat_template="{% set _ = messages.append(1) %}x"))
    with pytest.raises(InvalidRequest):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
