"""Rotary embeddings: M-RoPE (GLM-4.1V) against transformers' own functions, and the 1-D mode unchanged."""

from __future__ import annotations

import torch
from transformers import Glm4vTextConfig
from transformers.models.glm4v.modeling_glm4v import Glm4vTextRotaryEmbedding, apply_rotary_pos_emb

from loom.layers.rotary import RotaryEmbedding

HEAD_DIM, HEADS, SECTION = 32, 4, (2, 3, 3)


def _ours() -> RotaryEmbedding:
    return RotaryEmbedding(HEAD_DIM, HEAD_DIM // 2, 512, 10000.0, interleaved=True, mrope_section=SECTION)


def test_mrope_matches_transformers():
    config = Glm4vTextConfig(
        hidden_size=HEAD_DIM * HEADS,
        num_attention_heads=HEADS,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": list(SECTION),
        },
    )
    torch.manual_seed(0)
    n = 40
    positions = torch.randint(0, 300, (3, n))  # temporal, height and width differ, as for image tokens
    q, k = torch.randn(n, HEADS, HEAD_DIM), torch.randn(n, 2, HEAD_DIM)
    cos, sin = Glm4vTextRotaryEmbedding(config)(q, positions[:, None, :])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got_q, got_k = _ours()(positions, q, k)
    torch.testing.assert_close(got_q, ref_q[0].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(got_k, ref_k[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_mrope_with_equal_axes_is_plain_rotary():
    """Text tokens have t = h = w: M-RoPE then is the model's 1-D rotary, so [n] positions work too."""
    torch.manual_seed(1)
    pos = torch.randint(0, 500, (25,))
    q, k = torch.randn(25, HEADS, HEAD_DIM), torch.randn(25, 2, HEAD_DIM)
    plain = RotaryEmbedding(HEAD_DIM, HEAD_DIM // 2, 512, 10000.0, interleaved=True)
    a = _ours()(pos.expand(3, -1), q, k)
    b = _ours()(pos, q, k)
    c = plain(pos, q, k)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(y, z)
    # ... and the pass-through half of each head is untouched.
    assert torch.equal(a[0][..., HEAD_DIM // 2 :], q[..., HEAD_DIM // 2 :])


def test_mrope_bands_turn_with_their_axis():
    rope, q = _ours(), torch.randn(1, 1, HEAD_DIM)
    base = torch.tensor([[5], [5], [5]])
    out = rope(base, q, q)[0]
    for axis, (lo, hi) in enumerate([(0, 2), (2, 5), (5, 8)]):  # pair ranges of bands t, h, w
        moved = base.clone()
        moved[axis] += 7
        changed = (rope(moved, q, q)[0] - out).abs().view(HEAD_DIM // 2, 2)[: HEAD_DIM // 4].sum(-1) > 0
        expected = torch.zeros(HEAD_DIM // 4, dtype=torch.bool)
        expected[lo:hi] = True
        assert torch.equal(changed.squeeze(), expected), axis
