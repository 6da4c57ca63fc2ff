"""GLM-4.1V against HF transformers' Glm4vForConditionalGeneration on the tiny random-weight checkpoint:
the vision tower within 1e-4, M-RoPE positions exactly, and greedy float32 generation token for token
(text-only and 1-3 images of different sizes and aspect ratios; one at a time, batched together, and with
chunked prefill splitting images), through the paged-KV harness in paged_harness.py.

As in tests/engine/test_hf_parity.py, a divergence is accepted only at a step where HF's own top-2 logits
are within NEAR_TIE (float32 summation order then decides), after which that sequence is not compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from paged_harness import PagedGreedy, Sequence
from PIL import Image
from transformers import AutoTokenizer, Glm4vForConditionalGeneration, Glm4vImageProcessorPil

from loom import LLM, SamplingParams
from loom.layers.attention import AttentionMetadata, PrefillSeq
from loom.models.glm4v import mrope_positions
from loom.models.loader import load_model
from loom.multimodal import (
    ImageProcessor,
    ImageProcessorConfig,
    LoadedImage,
    expand_image_tokens,
    placeholder_ranges,
)
from loom.tokenizer import Tokenizer

NEAR_TIE = 1e-3
LOGIT_ATOL = 2e-4
MAX_NEW = 12
# (height, width): landscape, tall (a phone screenshot's shape), square at the minimum size, wide.
SIZES = [(100, 150), (300, 120), (84, 84), (60, 260)]
PROMPTS = {
    "text": [],
    "one_image": [SIZES[1]],
    "two_images": [SIZES[0], SIZES[2]],
    "three_images": [SIZES[3], SIZES[1], SIZES[0]],
}


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def messages(num_images: int, sizes) -> tuple[list[dict], list[Image.Image]]:
    images = [image(h, w, seed=i + 10 * num_images) for i, (h, w) in enumerate(sizes)]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "Describe the screen."}]
    return [
        {"role": "system", "content": "You are a phone agent."},
        {"role": "user", "content": content},
    ], images


class Case:
    """One prompt, built once the HF way and once the loom way (which must agree)."""

    def __init__(self, model_dir, hf_tok, loom_tok, sizes):
        msgs, self.images = messages(len(sizes), sizes)
        hf_proc = Glm4vImageProcessorPil.from_pretrained(model_dir)
        self.hf_inputs = hf_proc(images=self.images, return_tensors="pt") if self.images else {}
        # HF: Glm4vProcessor's expansion (one <|image|> per image token, in the text), then tokenize.
        text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        grids = self.hf_inputs["image_grid_thw"].tolist() if self.images else []
        for t, h, w in grids:
            text = text.replace("<|image|>", "<|placeholder|>" * (t * h * w // 4), 1)
        self.hf_ids = hf_tok(text.replace("<|placeholder|>", "<|image|>")).input_ids
        # loom: its own renderer and processor, placeholders expanded on token ids.
        processor = ImageProcessor(ImageProcessorConfig.from_dir(model_dir))
        processed = [processor(LoadedImage(im, f"img{i}")) for i, im in enumerate(self.images)]
        rendered = loom_tok.apply_chat_template(msgs)
        image_id = hf_tok.convert_tokens_to_ids("<|image|>")
        self.ids = expand_image_tokens(loom_tok.encode(rendered), image_id, [p.num_tokens for p in processed])
        self.grids = [p.grid_thw for p in processed]
        self.pixel_values = torch.cat([p.pixel_values for p in processed]) if processed else None

    def sequence(self) -> Sequence:
        return Sequence(list(self.ids), self.pixel_values, list(self.grids))


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model_dir = tiny_model_dir("glm4v")
    hf = Glm4vForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = load_model(model_dir, torch.float32, torch.device("cpu"))
    hf_tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    loom_tok = Tokenizer(model_dir)
    cases = {name: Case(model_dir, hf_tok, loom_tok, sizes) for name, sizes in PROMPTS.items()}
    refs = {name: hf_greedy(hf, case) for name, case in cases.items()}
    return model_dir, hf, ours, cases, refs


def hf_greedy(hf, case: Case) -> tuple[list[int], list[torch.Tensor]]:
    ids = torch.tensor([case.hf_ids])
    if not case.images:
        return hf_generate(hf, ids)
    return hf_generate(hf, ids, case.hf_inputs["pixel_values"], case.hf_inputs["image_grid_thw"])


@torch.inference_mode()
def hf_generate(
    hf, ids: torch.Tensor, pixel_values: torch.Tensor | None = None, grid_thw: torch.Tensor | None = None
) -> tuple[list[int], list[torch.Tensor]]:
    """HF's greedy tokens for [1, n] ids (with their images, if any) and the scores of each step."""
    extra = {}
    if pixel_values is not None:
        extra = dict(
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
            mm_token_type_ids=(ids == hf.config.image_token_id).int(),
        )
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
        **extra,
    )
    return out.sequences[0, ids.shape[1] :].tolist(), [s[0].float() for s in out.scores]


def assert_greedy_match(seq: Sequence, ref: tuple[list[int], list[torch.Tensor]], what: str) -> None:
    tokens, scores = ref
    assert len(seq.generated) == len(tokens) == MAX_NEW
    # The first token's whole distribution: the prompt (images included) went through the same math.
    torch.testing.assert_close(seq.logits[0], scores[0], atol=LOGIT_ATOL, rtol=0, msg=what)
    for i, (a, b) in enumerate(zip(seq.generated, tokens, strict=True)):
        if a != b:
            top2 = scores[i].topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap < NEAR_TIE, f"{what}: token {i} is {a}, HF says {b} (HF top-2 gap {gap:.2e} is no tie)"
            return


def test_prompts_agree_with_hf_processing(setup):
    _, _, _, cases, _ = setup
    for name, case in cases.items():
        assert case.ids == case.hf_ids, name
        if case.images:
            assert torch.equal(case.pixel_values, case.hf_inputs["pixel_values"]), name
            assert [list(g) for g in case.grids] == case.hf_inputs["image_grid_thw"].tolist(), name


def test_vision_tower_matches_hf(setup):
    model_dir, hf, ours, _, _ = setup
    sizes = [*SIZES, (28, 28), (420, 196)]
    images = [image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    inputs = Glm4vImageProcessorPil.from_pretrained(model_dir)(images=images, return_tensors="pt")
    with torch.inference_mode():
        ref = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        together = ours.embed_images(inputs["pixel_values"], inputs["image_grid_thw"])
        # One image at a time gives the same rows: images never attend to each other.
        offsets = np.cumsum([0] + [int(g.prod()) for g in inputs["image_grid_thw"]])
        alone = [
            ours.embed_images(inputs["pixel_values"][a:b], inputs["image_grid_thw"][i : i + 1])[0]
            for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True))
        ]
    assert len(together) == len(ref) == len(sizes)
    for i, (r, t, a) in enumerate(zip(ref, together, alone, strict=True)):
        assert t.shape == r.shape == (ours.num_image_tokens(inputs["image_grid_thw"][i]), 128)
        torch.testing.assert_close(t, r, atol=1e-4, rtol=0)
        torch.testing.assert_close(a, t, atol=1e-5, rtol=0)


def test_mrope_positions_match_hf_get_rope_index(setup):
    _, hf, ours, cases, _ = setup
    for name, case in cases.items():
        ids = torch.tensor([case.hf_ids])
        grids = case.hf_inputs["image_grid_thw"] if case.images else None
        if grids is None:
            continue  # HF's text-only positions are plain aranges (delta 0); checked below
        ref, ref_delta = hf.model.get_rope_index(ids, (ids == hf.config.image_token_id).int(), grids)
        got, delta = mrope_positions(case.ids, case.grids, ours.config.image_token_id, 2)
        assert torch.equal(got, ref[:, 0]), name
        assert delta == ref_delta.item() < 0, name
    got, delta = mrope_positions(cases["text"].ids, [], ours.config.image_token_id, 2)
    assert delta == 0 and torch.equal(got, torch.arange(len(cases["text"].ids)).expand(3, -1))


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_matches_hf_one_prompt(setup, name):
    _, _, ours, cases, refs = setup
    (seq,) = PagedGreedy(ours).run([cases[name].sequence()], MAX_NEW)
    assert_greedy_match(seq, refs[name], name)


@pytest.mark.parametrize("chunk", [None, 16])
def test_greedy_matches_hf_batched(setup, chunk):
    """All prompts (text-only and with images) in one batch per step; with chunk=16 every image's
    placeholders are split over several prefill steps."""
    _, _, ours, cases, refs = setup
    seqs = PagedGreedy(ours).run([case.sequence() for case in cases.values()], MAX_NEW, chunk=chunk)
    for name, seq in zip(cases, seqs, strict=True):
        assert_greedy_match(seq, refs[name], f"{name} (batched, chunk={chunk})")
    if chunk:
        # The chunks really did split images: some image's placeholder run crosses a chunk boundary.
        image_id = ours.config.image_token_id
        runs = [
            (i, i + n)
            for case in cases.values()
            for i, n in placeholder_ranges(case.ids, image_id)
            if i // chunk != (i + n - 1) // chunk
        ]
        assert runs


def test_text_positions_for_image_tokens_would_diverge(setup):
    """The parity above is sensitive to M-RoPE: giving image tokens plain 1-D positions (what a text model
    would do) moves the first token's logits far outside the tolerance."""
    _, _, ours, cases, refs = setup
    case = cases["two_images"]
    seq = case.sequence()
    harness = PagedGreedy(ours)
    harness._prepare(seq, 1)
    seq.positions = torch.arange(len(seq.prompt)).expand(3, -1)
    with torch.inference_mode():
        n = len(seq.prompt)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(harness._slots(seq, 0, n)),
            block_size=16,
            prefills=[PrefillSeq(0, n, 0, torch.tensor(seq.blocks))],
        )
        hidden = ours(torch.tensor(seq.prompt), seq.positions, harness.caches, meta, seq.embeds)
        logits = ours.compute_logits(hidden[-1:])[0]
    assert (logits - refs["two_images"][1][0]).abs().max() > 100 * LOGIT_ATOL


def test_text_only_requests_through_the_engine_match_hf(setup):
    """Text-only prompts already run through the unchanged engine (1-D positions are M-RoPE positions of
    text); chunked prefill and batching included."""
    model_dir, _, _, cases, refs = setup
    llm = LLM(str(model_dir), dtype="float32", num_blocks=64, max_num_batched_tokens=16)
    prompt = cases["text"].ids
    outs = llm.generate(
        [prompt, prompt[:7]], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    )
    assert outs[0].outputs[0].token_ids == refs["text"][0]
    assert len(outs[1].outputs[0].token_ids) == MAX_NEW
    assert llm.engine.stats.num_steps > MAX_NEW  # the 31-token prompt took several 16-token steps


def test_mrope_positions_by_hand():
    i = 99  # the image token
    ids = [5, 6, i, i, i, i, i, i, 7, 8]  # one image of 4 x 6 patches: 2 x 3 tokens
    positions, delta = mrope_positions(ids, [(1, 4, 6)], i, 2)
    assert positions.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],  # temporal: the image is one frame
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],  # height: two rows
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],  # width: three columns; then text resumes at 2 + max(1, 2, 3)
    ]
    assert delta == 7 - len(ids)
    with pytest.raises(ValueError, match="needs 6"):
        mrope_positions(ids[:-3] + [7], [(1, 4, 6)], i, 2)
    with pytest.raises(ValueError, match="2 image grids but 1 runs"):
        mrope_positions(ids, [(1, 4, 6), (1, 2, 2)], i, 2)
