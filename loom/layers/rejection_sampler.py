"""Verification of draft tokens against the target model, preserving its distribution.

The drafts of loom's proposers (n-gram and suffix matches) are point masses: the proposer is sure of
its token d. Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) then accepts d with
probability min(1, p(d) / q(d)) = p(d), and on rejection samples from the residual max(0, p - q)
renormalized, which is p with d removed. So P(d) = p(d) and P(x) = (1 - p(d)) p(x) / (1 - p(d)) = p(x):
the output has exactly the target distribution. After all drafts are accepted, a bonus token comes
from the next position's distribution. Greedy rows accept a draft exactly when it is the argmax.

p is the distribution the plain sampler would sample from at that position (penalties, min_tokens bans,
temperature, top-k/top-p/min-p), each position seeing the drafts before it as already generated.
"""

from __future__ import annotations

import torch

from loom.layers.sampler import Sampler, SamplerOutput, SamplingMetadata


def verify(
    sampler: Sampler, logits: torch.Tensor, drafts: list[int], meta: SamplingMetadata
) -> SamplerOutput:
    """logits: [len(drafts) + 1, vocab] of one request's positions; meta has one row per position (row j
    with the drafts before j appended to its output). Returns the accepted drafts and one more token."""
    raw = logits.float()
    processed = sampler.processed(raw, meta)
    params = meta.params[0]
    out: list[int] = []
    if params.greedy:
        target = processed.argmax(dim=-1).tolist()
        for j, d in enumerate(drafts):
            out.append(target[j])
            if target[j] != d:
                break
        else:
            out.append(target[len(drafts)])
    else:
        probs = sampler.probs(processed, meta)
        gen = sampler.generator_for(meta.generators[0], raw.device)
        for j, d in enumerate(drafts):
            u = torch.rand((), generator=gen, device=raw.device).item()
            if u < probs[j, d].item():
                out.append(d)
                continue
            residual = probs[j].clone()
            residual[d] = 0.0
            out.append(_race(residual, gen))
            break
        else:
            out.append(_race(probs[len(drafts)], gen))
    n = len(out)
    trimmed = SamplingMetadata(
        meta.params[:n],
        meta.output_token_ids[:n],
        meta.prompt_token_ids[:n],
        meta.generators[:n],
        meta.banned_token_ids[:n],
    )
    return SamplerOutput(out, sampler._logprobs(raw[:n], out, trimmed))


def _race(probs: torch.Tensor, gen: torch.Generator) -> int:
    """Sample from unnormalized probabilities: argmax of p / E with E ~ Exp(1) (as the plain sampler)."""
    noise = torch.empty_like(probs).exponential_(generator=gen)
    return int((probs / noise).argmax())
