"""InputProcessor: a caller's prompt -> validated EngineRequests, once, for the server, `LLM` and the agent.

Tokenizing and rendering are CPU work of their own (a 1 MB prompt takes a second): the server runs them on
a worker thread, never on its event loop. Validation knows the model: every token id a request carries
(prompt, stop_token_ids) must be inside the vocabulary, so no bad id reaches the engine step.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loom.engine.io import EngineRequest
from loom.engine.structured import CompiledGrammar, CompilerConfig
from loom.errors import ContextLengthExceeded, InvalidRequest
from loom.frontend.structured import GrammarFrontend, bad_words_token_ids
from loom.multimodal.inputs import ImageInput
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer

if TYPE_CHECKING:
    from loom.engine.core import EngineCore
    from loom.frontend.multimodal import MultimodalProcessor


@dataclass
class ProcessedRequest:
    """A request ready for an engine: its prompt and one EngineRequest per completion (n of them)."""

    request_id: str
    prompt: str | None
    """The prompt text when it was given as text (for echo); None for token ids or a rendered chat."""
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[EngineRequest]
    arrival_time: float


def sequence_seed(seed: int | None, k: int) -> int | None:
    """Each of n sequences gets its own random stream, reproducible from the request's one seed."""
    if seed is None:
        return None
    return seed if k == 0 else hash((seed, k)) & (2**63 - 1)


class InputProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        max_model_len: int,
        vocab_size: int,
        max_logprobs: int = 20,
        eos_token_ids: frozenset[int] | set[int] = frozenset(),
        max_prompt_chars: int | None = None,
        grammar_config: CompilerConfig | None = None,
    ):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_logprobs = max_logprobs
        self.eos_token_ids = frozenset(eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        self.max_prompt_chars = max_prompt_chars
        """Longest text accepted for tokenizing; checked before any tokenizer work is spent on it."""
        self.multimodal: MultimodalProcessor | None = None
        """Image handling, for a model that takes images."""
        self.grammars = GrammarFrontend(tokenizer, vocab_size, grammar_config)
        """Compiles the grammars requests constrain their output to (structured output)."""

    @classmethod
    def for_engine(
        cls, core: EngineCore, tokenizer: Tokenizer, max_prompt_chars: int | None = None
    ) -> InputProcessor:
        """The input processor of an engine: its context length, vocabulary, EOS tokens and, for a model
        that takes images, their processing."""
        ip = cls(
            tokenizer,
            core.max_model_len,
            core.vocab_size,
            core.config.max_logprobs,
            frozenset(core.model_config.eos_token_ids),
            max_prompt_chars,
            CompilerConfig(compile_timeout_s=core.config.grammar_compile_timeout_s),
        )
        if core.model_config.vision is not None:
            from loom.frontend.multimodal import MultimodalProcessor

            cfg = core.config
            ip.multimodal = MultimodalProcessor(
                core.model_path,
                core.model_config,
                tokenizer,
                cfg.media_config(),
                cfg.image_limit,
                cfg.processor_overrides,
                cfg.chat_template_content_format,
            )
        return ip

    # ---- text -> tokens ------------------------------------------------------------------------

    def check_chars(self, num_chars: int, param: str) -> None:
        limit = self.max_prompt_chars
        if limit is not None and num_chars > limit:
            raise InvalidRequest(
                f"the prompt has {num_chars} characters; this server accepts at most {limit}", param=param
            )

    def encode(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        self.check_chars(len(text), param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    # ---- checks against the model --------------------------------------------------------------

    def prompt_budget(self, max_tokens: int | None) -> int:
        """Prompt tokens that fit beside max_tokens (None: one token must be left to generate; the answer
        then gets the rest of the context)."""
        budget = self.max_model_len - (1 if max_tokens is None else max_tokens)
        if budget < 1:
            raise ContextLengthExceeded(
                f"max_tokens ({max_tokens}) leaves no room for a prompt in this model's context of "
                f"{self.max_model_len} tokens",
                param="max_tokens",
            )
        return budget

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, param: str = "prompt") -> int:
        """Checks a tokenized prompt and the token ids of its parameters against the model; returns the
        effective max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", param=param)
        vocab = self.vocab_size
        bad = next((t for t in prompt_token_ids if type(t) is not int or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad!r} is outside the vocabulary [0, {vocab})", param=param)
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"stop token id {bad} is outside the vocabulary [0, {vocab})", param="stop_token_ids"
            )
        bad = next((t for t in params.logit_bias or {} if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})", param="logit_bias"
            )
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise InvalidRequest(f"logprobs may be at most {self.max_logprobs}", param="logprobs")
        if params.max_tokens is None:
            if n >= self.max_model_len:
                raise ContextLengthExceeded(
                    f"the prompt has {n} tokens; this model's context is {self.max_model_len}", param=param
                )
            return self.max_model_len - n
        if n + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds this model's context of "
                f"{self.max_model_len} tokens",
                param="max_tokens",
            )
        return params.max_tokens

    # ---- engine requests -----------------------------------------------------------------------

    def process(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        arrival_time: float | None = None,
        param: str = "prompt",
        images: tuple[ImageInput, ...] = (),
        mrope: tuple[torch.Tensor | None, int] = (None, 0),
        grammar: CompiledGrammar | None = None,
    ) -> ProcessedRequest:
        """Validate and fan out into one EngineRequest per completion (`{request_id}#k` when n > 1).

        `images` and `mrope` (positions, delta) come from MultimodalProcessor.finalize. `grammar`: what
        the output must match (each sequence gets its own matcher); without one,
        params.structured_outputs is compiled here (blocking up to the compile time bound)."""
        max_tokens = self.validate(prompt_token_ids, params, param)
        if params.bad_words and params.bad_words_token_ids is None:
            params = dataclasses.replace(
                params, bad_words_token_ids=bad_words_token_ids(self.tokenizer, params.bad_words)
            )
        if grammar is None and params.structured_outputs is not None:
            grammar = self.grammars.from_params(params.structured_outputs)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        ids = list(prompt_token_ids)
        seqs = []
        for k in range(params.n):
            seqs.append(
                EngineRequest(
                    request_id=request_id if params.n == 1 else f"{request_id}#{k}",
                    prompt_token_ids=ids,
                    params=params if params.n == 1 else dataclasses.replace(params, n=1),
                    max_tokens=max_tokens,
                    eos_token_ids=self.eos_token_ids,
                    seed=sequence_seed(params.seed, k),
                    parent_id=request_id,
                    arrival_time=arrival,
                    images=images,
                    mrope_positions=mrope[0],
                    mrope_delta=mrope[1],
                    grammar=grammar,
                )
            )
        return ProcessedRequest(request_id, prompt, ids, params, seqs, arrival)
