"""The sampler: logits of the positions that sample -> next tokens (and log-probabilities).

Order of operations (as in vLLM and HF): a request's grammar mask (applied by the runner before this),
penalties on the raw logits, logit_bias, bans (bad_words, and EOS/stop tokens before min_tokens; a ban
that would leave no token at all is lifted: the grammar wins), then greedy rows take the argmax; the others are divided by temperature, filtered by top-k, top-p and min-p and
sampled. Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), drawing E for seeded
requests from their own generator, so a seeded request gets the same tokens whatever batch it is in.
Log-probabilities are those of the model's raw distribution (before penalties and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    """Per-row sampling state for one step, built once from the requests that sample."""

    params: list[SamplingParams]
    output_token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    generators: list[torch.Generator | None]
    banned_token_ids: list[list[int]]
    """Tokens that may not be sampled yet (EOS and stop tokens before min_tokens)."""

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)

    @property
    def max_logprobs(self) -> int:
        return max((p.logprobs for p in self.params if p.logprobs is not None), default=-1)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None] | None
    """Per row: {sampled token: logprob, then the top `logprobs` tokens}, or None if not asked."""


def bad_word_bans(words: list[list[int]], generated: list[int]) -> list[int]:
    """The last token of each bad word whose other tokens are the end of `generated` (vLLM's rule: a
    one-token word is always banned)."""
    banned = []
    for word in words:
        prefix = word[:-1]
        if not prefix or (len(generated) >= len(prefix) and generated[-len(prefix) :] == prefix):
            banned.append(word[-1])
    return banned


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator: torch.Generator | None = None
        self.seed = seed

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [num_rows, vocab]."""
        raw = logits.float()
        logits = self.processed(raw, meta)
        if meta.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, meta)
        token_list = tokens.tolist()
        return SamplerOutput(token_list, self._logprobs(raw, token_list, meta))

    def processed(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Penalties, logit_bias and bans applied to float32 logits (a copy when anything changes)."""
        raw = logits
        logits = self._apply_penalties(logits, meta)
        for row, p in enumerate(meta.params):
            if p.logit_bias:
                if logits is raw:
                    logits = logits.clone()
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
                logits[row].index_add_(0, ids, bias)
        for row, banned in enumerate(meta.banned_token_ids):
            p = meta.params[row]
            if p.bad_words_token_ids:
                banned = banned + bad_word_bans(p.bad_words_token_ids, meta.output_token_ids[row])
            if banned:
                if logits is raw:
                    logits = logits.clone()
                kept = logits[row, banned].clone()
                logits[row, banned] = float("-inf")
                if bool(torch.isneginf(logits[row]).all()):
                    # A grammar that allows only banned tokens here (only EOS, before min_tokens) wins.
                    logits[row, banned] = kept
        return logits

    def probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The distribution each (non-greedy) row samples from: temperature, top-k, top-p, min-p."""
        temperature = torch.tensor(
            [1.0 if p.greedy else p.temperature for p in meta.params], device=logits.device
        )
        return self._filter(logits / temperature.unsqueeze(1), meta.params).softmax(dim=-1)

    def generator_for(self, gen: torch.Generator | None, device: torch.device) -> torch.Generator:
        return gen if gen is not None else self._default_generator(device)

    def _apply_penalties(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        rows = [
            i
            for i, p in enumerate(meta.params)
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        ]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[-1]
        for i in rows:
            p = meta.params[i]
            row = logits[i]
            out_ids = torch.tensor(meta.output_token_ids[i], dtype=torch.long, device=logits.device)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(meta.prompt_token_ids[i], dtype=torch.long, device=logits.device)
                seen = torch.cat([seen, out_ids]).unique()
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
                counts.scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        params = meta.params
        device = logits.device
        greedy = torch.tensor([p.greedy for p in params], device=device)
        greedy_tokens = logits.argmax(dim=-1)
        probs = self.probs(logits, meta)
        noise = torch.empty_like(probs)
        for i, (p, gen) in enumerate(zip(params, meta.generators, strict=True)):
            if not p.greedy:
                noise[i].exponential_(generator=gen if gen is not None else self._default_generator(device))
        noise[greedy] = 1.0
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, greedy_tokens, sampled)

    def _default_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        return self.generator

    @staticmethod
    def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Mask (to -inf) tokens outside each row's top-k, top-p nucleus and min-p floor."""
        need_k = any(p.top_k > 0 for p in params)
        need_p = any(p.top_p < 1.0 for p in params)
        need_min_p = any(p.min_p > 0.0 for p in params)
        if not (need_k or need_p or need_min_p):
            return logits
        vocab = logits.shape[-1]
        device = logits.device
        if need_k or need_p:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if need_k:
                k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
                mask |= torch.arange(vocab, device=device).unsqueeze(0) >= k.unsqueeze(1)
            if need_p:
                top_p = torch.tensor([p.top_p for p in params], device=device)
                probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
                # Drop a token when the tokens before it already reach top_p (the first always stays).
                mask |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
            logits = logits.masked_fill(torch.empty_like(mask).scatter_(1, order, mask), float("-inf"))
        if need_min_p:
            min_p = torch.tensor([p.min_p for p in params], device=device)
            probs = logits.softmax(dim=-1)
            floor = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            logits = logits.masked_fill(probs < floor, float("-inf"))
        return logits

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, tokens: list[int], meta: SamplingMetadata
    ) -> list[dict[int, float] | None] | None:
        k = meta.max_logprobs
        if k < 0:
            return None
        logprobs = raw.log_softmax(dim=-1)
        top_vals, top_ids = logprobs.topk(max(k, 1), dim=-1)
        sampled = logprobs.gather(1, torch.tensor(tokens, device=raw.device).unsqueeze(1)).squeeze(1)
        top_vals, top_ids, sampled = top_vals.tolist(), top_ids.tolist(), sampled.tolist()
        out: list[dict[int, float] | None] = []
        for i, p in enumerate(meta.params):
            if p.logprobs is None:
                out.append(None)
                continue
            entry = {tokens[i]: sampled[i]}
            for tid, val in zip(top_ids[i][: p.logprobs], top_vals[i][: p.logprobs], strict=True):
                entry.setdefault(tid, val)
            out.append(entry)
        return out
