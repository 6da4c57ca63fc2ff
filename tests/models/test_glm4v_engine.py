"""GLM-4.1V through the whole engine, against HF transformers (greedy, float32): OpenAI-style image_url
parts through the frontend (data URLs, preprocessing, placeholder expansion, M-RoPE positions), batched
with text-only requests, chunked prefill splitting images, prefix caching across turns that keep or strip
a screenshot (block hashes carry the image's content), preemption, and the encoder cache (one encode
per image, none again after a preemption while the embeddings are cached)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_glm4v import MAX_NEW, NEAR_TIE, hf_generate
from transformers import AutoTokenizer, Glm4vForConditionalGeneration, Glm4vImageProcessorPil

from loom import LLM, SamplingParams
from loom.engine.scheduler import Scheduler
from loom.errors import InvalidRequest

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def picture(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *images: Image.Image) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


SYSTEM = {"role": "system", "content": "You are a phone agent. Reply with one action."}
A, B, C = picture(300, 120, 1), picture(100, 150, 2), picture(60, 260, 3)
B_TWIN = picture(100, 150, 99)  # same size as B, other pixels


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    model_dir = tiny_model_dir("glm4v")
    model = Glm4vForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return (
        model_dir,
        model,
        AutoTokenizer.from_pretrained(model_dir),
        Glm4vImageProcessorPil.from_pretrained(model_dir),
    )


def hf_greedy(hf, messages: list[dict]) -> tuple[list[int], list[torch.Tensor]]:
    """HF's own processing of the conversation (image parts as {"type": "image"}), then generate."""
    _, model, tok, proc = hf
    images, hf_messages = [], []
    for m in messages:
        if isinstance(m["content"], list):
            parts = []
            for p in m["content"]:
                if p["type"] == "image_url":
                    raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                    images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
                    parts.append({"type": "image"})
                else:
                    parts.append(p)
            m = {**m, "content": parts}
        hf_messages.append(m)
    text = tok.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    if images:
        inputs = proc(images=images, return_tensors="pt")
        for t, h, w in inputs["image_grid_thw"].tolist():
            text = text.replace("<|image|>", "<|placeholder|>" * (t * h * w // 4), 1)
        text = text.replace("<|placeholder|>", "<|image|>")
    ids = torch.tensor([tok(text).input_ids])
    if not images:
        return hf_generate(model, ids)
    return hf_generate(model, ids, inputs["pixel_values"], inputs["image_grid_thw"])


def assert_matches(tokens: list[int], ref, what: str) -> None:
    want, scores = ref
    for i, (a, b) in enumerate(zip(tokens, want, strict=True)):
        if a != b:
            top2 = scores[i].topk(2).values
            assert (top2[0] - top2[1]).item() < NEAR_TIE, f"{what}: token {i} is {a}, HF says {b}"
            return


CONVERSATIONS = {
    "text": [SYSTEM, {"role": "user", "content": "Open the settings app."}],
    "one": [SYSTEM, user("Tap the search box.", A)],
    "two": [SYSTEM, user("Compare the screens.", B, C)],
    "three": [SYSTEM, user("Which one is the home screen?", C, A, B)],
}


@pytest.fixture(scope="module")
def refs(hf):
    return {name: hf_greedy(hf, conv) for name, conv in CONVERSATIONS.items()}


PATHS = {
    "batched": dict(num_blocks=256),
    "chunked": dict(num_blocks=256, max_num_batched_tokens=16),  # every image is split across steps
    # Caching off and the conversations twice, so decodes outgrow the pool and preempt (a preempted
    # request's images must come back from the encoder cache, or be encoded again, and match HF).
    "preempted": dict(num_blocks=18, max_num_batched_tokens=4096, enable_prefix_caching=False),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_images_batched_with_text_match_hf(hf, refs, path, monkeypatch):
    preempted_images = []
    preempt = Scheduler._preempt

    def recording(self, victim, *args):
        preempted_images.append(len(victim.images))
        return preempt(self, victim, *args)

    monkeypatch.setattr(Scheduler, "_preempt", recording)
    llm = LLM(str(hf[0]), dtype="float32", **PATHS[path])
    copies = 2 if path == "preempted" else 1
    outs = llm.chat(list(CONVERSATIONS.values()) * copies, GREEDY)
    for (name, ref), out in zip(list(refs.items()) * copies, outs, strict=True):
        assert_matches(out.outputs[0].token_ids, ref, f"{path}/{name}")
    stats = llm.engine.runner.mm.stats
    # Six image parts (twelve when preempting), three pictures: each picture is encoded once, chunked or
    # not, and a preempted request finds its images still in the encoder cache.
    assert stats.images_encoded == 3 and stats.queries >= 3
    if path == "preempted":
        assert any(preempted_images), "a request with images must have been preempted"
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.pool.num_blocks


def test_prefix_cache_across_turns_keeping_or_stripping_the_screenshot(hf):
    llm = LLM(str(hf[0]), dtype="float32", num_blocks=256)
    first = [SYSTEM, user("Step 1: find the settings icon.", A)]
    out1 = llm.chat(first, GREEDY)[0]
    reply = {"role": "assistant", "content": llm.tokenizer.decode(out1.outputs[0].token_ids)}
    encoded = llm.engine.runner.mm.stats.images_encoded
    # Turn 2 resends the screenshot: everything up to the new message is a hit, the image is not re-encoded.
    keep = [*first, reply, user("Step 2: now tap it.", B)]
    out_keep = llm.chat(keep, GREEDY)[0]
    assert_matches(out_keep.outputs[0].token_ids, hf_greedy(hf, keep), "keep")
    assert out_keep.num_cached_tokens >= (len(out1.prompt_token_ids) // 16) * 16
    assert llm.engine.runner.mm.stats.images_encoded == encoded + 1  # only B is new
    # Open-AutoGLM strips old screenshots: the system prompt's blocks are reused, the stripped turn is not.
    stripped = [
        SYSTEM,
        {"role": "user", "content": "Step 1: find the settings icon."},
        reply,
        user("Step 2.", B),
    ]
    out_strip = llm.chat(stripped, GREEDY)[0]
    assert_matches(out_strip.outputs[0].token_ids, hf_greedy(hf, stripped), "stripped")
    assert 0 < out_strip.num_cached_tokens < len(out1.prompt_token_ids)


def test_a_different_image_of_the_same_size_is_never_a_hit(hf):
    llm = LLM(str(hf[0]), dtype="float32", num_blocks=256)
    base = llm.chat([SYSTEM, user("Describe.", B)], GREEDY)[0]
    start = base.prompt_token_ids.index(llm.input.multimodal.image_token_id)
    twin = llm.chat([SYSTEM, user("Describe.", B_TWIN)], GREEDY)[0]
    assert twin.prompt_token_ids == base.prompt_token_ids  # same placeholders, other content
    assert twin.num_cached_tokens <= start  # nothing at or after the image is reused
    again = llm.chat([SYSTEM, user("Describe.", B)], GREEDY)[0]
    assert again.num_cached_tokens > start  # the same picture is
    assert again.outputs[0].token_ids == base.outputs[0].token_ids


def test_bad_image_requests(hf, tiny_llama_dir):
    llm = LLM(str(hf[0]), dtype="float32", num_blocks=64, limit_mm_per_prompt='{"image": 2}')
    with pytest.raises(InvalidRequest) as e:
        llm.chat([SYSTEM, user("Too many.", A, B, C)], GREEDY)
    assert e.value.param == "messages"
    with pytest.raises(InvalidRequest) as e:
        llm.chat(
            [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(A)}}]}],
            GREEDY,
        )
    assert e.value.param == "messages[0].content[0].image_url"
    with pytest.raises(InvalidRequest) as e:
        llm.chat([user("x", A)], SamplingParams(max_tokens=4), use_tqdm=False) if False else llm.chat(
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                }
            ]
        )
    assert e.value.param == "messages[0].content[0].image_url"
    text_only = LLM(str(tiny_llama_dir), dtype="float32", num_blocks=64)
    with pytest.raises(InvalidRequest, match="text only"):
        text_only.chat([user("What is this?", A)], GREEDY)
    assert not llm.engine.has_unfinished() and not text_only.engine.has_unfinished()
