"""The native decoder stack (loom/kernels/decoder.c via loom/models/cpu_decode.py) against its twin, the
model's modules: for every Llama-family architecture, bf16, int8 and int4 weights, its hidden states and
the K/V it writes must be bit-identical to the modules' (it runs the same kernels on the same values),
and every batch it must not take (prefill, too many rows, float32 models) goes to the modules."""

from __future__ import annotations

import pytest
import torch

from loom.kernels import cpu
from loom.kernels.decoder import DecoderStack
from loom.layers.attention import AttentionMetadata, DecodeGroup, KVCache, PrefillSeq
from loom.models.loader import load_model

pytestmark = pytest.mark.skipif(not cpu.available(), reason="loom's CPU kernels do not build here")

ARCHS = ["llama", "qwen2", "glm", "glm4", "glm4v"]
BLOCK = 16
NUM_BLOCKS = 6 * (cpu.MAX_ROWS + 2)  # decode_batch gives sequence i blocks 6i .. 6i + 5


def decoder_of(model):
    """The LlamaModel inside a causal LM or GLM-4.1V."""
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def make_caches(model, seed: int) -> list[KVCache]:
    """Caches full of random bf16 values, so that attention reads real keys everywhere."""
    cfg, gen = model.config, torch.Generator().manual_seed(seed)
    shape = (2, cfg.num_kv_heads, NUM_BLOCKS, BLOCK, cfg.head_dim)
    return [KVCache(torch.randn(shape, generator=gen).bfloat16()) for _ in range(cfg.num_layers)]


def decode_batch(lens: list[int], groups: list[list[int]], mrope: bool):
    """Positions, slot mapping and metadata of one decode token per sequence (sequence i has lens[i] keys,
    its blocks 6i, 6i + 1, ...), split into `groups` of token indices (in any order, as the runner's
    length grouping leaves them)."""
    tables = [[6 * i + b for b in range(-(-n // BLOCK))] for i, n in enumerate(lens)]
    slots = [t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lens, strict=True)]
    decodes = []
    for g in groups:
        width = max(len(tables[i]) for i in g)
        decodes.append(
            DecodeGroup(
                token_idx=torch.tensor(g),
                block_table=torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in g]),
                key_mask=(torch.arange(width * BLOCK) < torch.tensor([lens[i] for i in g]).unsqueeze(1))[
                    None, :, None, :
                ],
                seq_lens=torch.tensor([lens[i] for i in g]),
            )
        )
    pos = torch.tensor([n - 1 for n in lens])
    if mrope:
        pos = pos.expand(3, -1).contiguous()
    return pos, AttentionMetadata(slot_mapping=torch.tensor(slots), block_size=BLOCK, decodes=decodes)


def run_both(model, ids, pos, meta, seed: int):
    """(hidden, caches) from the native stack and from the modules, each on its own copy of the caches;
    and how many times the stack ran."""
    lm = decoder_of(model)
    calls = []
    stack_run = DecoderStack.run

    def counted(self, *args):
        calls.append(len(args[0]))
        return stack_run(self, *args)

    results = []
    for native in (True, False):
        caches = make_caches(model, seed)
        lm.native_decode = native
        DecoderStack.run = counted
        try:
            with torch.inference_mode():
                results.append((lm(ids, pos, caches, meta), caches))
        finally:
            DecoderStack.run = stack_run
            lm.native_decode = True
    return results[0], results[1], calls


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    made = {}

    def get(arch: str, quantization: str | None = None, dtype=torch.bfloat16):
        """quantization: None, "int8" or "int4-g<group size>"."""
        key = (arch, quantization, dtype)
        if key not in made:
            scheme, _, group = (quantization or "").partition("-g")
            made[key] = load_model(
                tiny_model_dir(arch), dtype, torch.device("cpu"), scheme or None, int(group or 128)
            ).eval()
        return made[key]

    return get


@pytest.mark.parametrize("quantization", [None, "int8", "int4-g32", "int4-g64"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "lens, groups",
    [
        ([37], [[0]]),
        ([5, 70, 16, 33], [[1, 3], [2, 0]]),  # two groups, tokens out of batch order
        ([1, 17, 80], [[2, 1, 0]]),
    ],
)
def test_stack_is_bit_identical_to_the_modules(arch, quantization, lens, groups, models):
    model = models(arch, quantization)
    ids = torch.tensor([(7 * i + 3) % 1000 for i in range(len(lens))])
    pos, meta = decode_batch(lens, groups, mrope=arch == "glm4v")
    (native, native_caches), (twin, twin_caches), calls = run_both(model, ids, pos, meta, seed=len(lens))
    assert calls == [len(lens)]  # the stack ran, once, for the whole batch
    assert torch.equal(native, twin)
    for a, b in zip(native_caches, twin_caches, strict=True):
        assert torch.equal(a.tensor, b.tensor)
    # and the new tokens' K/V were written (not just left as they were)
    fresh = make_caches(model, seed=len(lens))
    assert not torch.equal(native_caches[0].tensor, fresh[0].tensor)


def test_batches_past_the_row_limit_go_to_the_modules(models):
    model = models("llama")
    lm = decoder_of(model)
    # more rows than the fused ops take
    rows = cpu.MAX_ROWS + 1
    lens = [3 + i for i in range(rows)]
    pos, meta = decode_batch(lens, [list(range(rows))], mrope=False)
    (native, _), (twin, _), calls = run_both(model, torch.arange(rows), pos, meta, seed=0)
    assert calls == [] and torch.equal(native, twin)
    # a prefill chunk as long
    meta = AttentionMetadata(
        slot_mapping=torch.arange(rows),
        block_size=BLOCK,
        prefills=[PrefillSeq(0, rows, 0, torch.arange(-(-rows // BLOCK)))],
    )
    (native, _), (twin, _), calls = run_both(model, torch.arange(rows), torch.arange(rows), meta, seed=0)
    assert calls == [] and torch.equal(native, twin)
    assert lm._native.stack is not None


@pytest.mark.parametrize("quantization", [None, "int4-g32"])
def test_prefill_rows_get_what_decoding_them_one_by_one_gives(quantization, models):
    """A chunk (a draft verification) beside a decode token runs as one row per token: each row's numbers
    are exactly those of decoding that token alone (so speculation keeps greedy output in bf16), and
    close to the modules' SDPA over the chunk."""
    model = models("llama", quantization)
    lm = decoder_of(model)
    ctx, n = 21, 5
    blocks = torch.tensor([0, 1])  # the chunk's sequence: keys 0 .. ctx + n - 1
    slots = list(range(ctx, ctx + n)) + [6 * BLOCK + 9]  # and a decode token of another sequence
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_size=BLOCK,
        prefills=[PrefillSeq(0, n, ctx, blocks)],
        decodes=decode_batch([10], [[0]], mrope=False)[1].decodes,
    )
    meta.decodes[0].token_idx = torch.tensor([n])
    meta.decodes[0].block_table = torch.tensor([[6]])
    ids = torch.tensor([11, 12, 13, 14, 15, 16])
    pos = torch.tensor([ctx + i for i in range(n)] + [9])
    (together, caches), (twin, _), calls = run_both(model, ids, pos, meta, seed=5)
    assert calls == [n + 1]
    diff = (together.float() - twin.float()).norm() / twin.float().norm()
    # bf16 roundings apart through four random-weight layers (measured: 1.4% of the norm; int4, whose
    # activations are quantized, 3.4%)
    assert diff < 0.05, diff
    # the same tokens one at a time, each a decode step of its own, on a fresh copy of the caches
    alone, one_by_one = make_caches(model, 5), []
    for i in range(n):
        p, m = decode_batch([ctx + i + 1], [[0]], mrope=False)
        m.decodes[0].block_table = blocks[None, : -(-(ctx + i + 1) // BLOCK)]
        m.slot_mapping = torch.tensor([ctx + i])
        with torch.inference_mode():
            one_by_one.append(lm(ids[i : i + 1], p, alone, m))
    assert torch.equal(together[:n], torch.cat(one_by_one))
    assert torch.equal(caches[0].tensor[:, :, :2], alone[0].tensor[:, :, :2])


@pytest.mark.parametrize(
    "quantization, dtype", [(None, torch.float32), ("int8", torch.float32), ("int4-g32", torch.float32)]
)
def test_models_the_stack_cannot_run_keep_the_modules(quantization, dtype, models):
    model = models("llama", quantization, dtype)
    lm = decoder_of(model)
    pos, meta = decode_batch([9], [[0]], mrope=False)
    caches = make_caches(model, 0)
    if dtype == torch.float32:
        caches = [KVCache(c.tensor.float()) for c in caches]
    with torch.inference_mode():
        lm(torch.tensor([5]), pos, caches, meta)
    assert lm._native.stack is None


def test_out_of_range_slot_is_refused_before_anything_is_written(models):
    model = models("llama", "int8")
    lm = decoder_of(model)
    pos, meta = decode_batch([20, 30], [[0, 1]], mrope=False)
    meta.slot_mapping = torch.tensor([5, NUM_BLOCKS * BLOCK])  # the second is past the cache
    caches = make_caches(model, 3)
    before = [c.tensor.clone() for c in caches]
    with torch.inference_mode(), pytest.raises(ValueError, match="outside the cache"):
        lm(torch.tensor([1, 2]), pos, caches, meta)
    assert all(torch.equal(c.tensor, b) for c, b in zip(caches, before, strict=True))
