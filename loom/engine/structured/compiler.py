"""Compiles GrammarSpecs for one tokenizer, off the engine thread, with a time bound and an LRU cache.

llguidance builds its parser and lexer with the GIL released, so a small thread pool compiles while the
engine keeps stepping; a request waits at most `compile_timeout_s` and then gets an InvalidRequest naming
its field (the compile itself runs on and is cached if it succeeds, so the pool cannot be made to redo a
slow grammar for every retry). Grammars that fail are cached too, with their message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance

from loom.engine.structured.llg import to_llguidance
from loom.engine.structured.matcher import GrammarMatcher
from loom.engine.structured.spec import GrammarSpec
from loom.errors import InvalidRequest
from loom.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Longest compile error passed on to a client: llguidance's messages can quote a whole grammar.
_MAX_ERROR_CHARS = 600


@dataclass
class CompilerConfig:
    """How grammars are compiled and kept."""

    compile_timeout_s: float = 10.0
    """Longest a request waits for its grammar to compile before it is refused (HTTP 400)."""
    compile_threads: int = 2
    """Threads compiling grammars beside the engine thread."""
    cache_size: int = 256
    """Compiled grammars (and compile errors) kept, least recently used dropped first."""

    def __post_init__(self) -> None:
        if not self.compile_timeout_s > 0:
            raise InvalidRequest(
                f"compile_timeout_s must be > 0, got {self.compile_timeout_s}", "compile_timeout_s"
            )
        for name in ("compile_threads", "cache_size"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be >= 1, got {getattr(self, name)}", param=name)


class CompiledGrammar:
    """A compiled grammar: makes fresh matchers cheaply (a copy of a pristine one)."""

    __slots__ = ("spec", "_template")

    def __init__(self, spec: GrammarSpec, template: llguidance.LLMatcher):
        self.spec = spec
        self._template = template

    def matcher(self) -> GrammarMatcher:
        """A matcher at the start of the grammar."""
        return GrammarMatcher(self._template.deep_copy())


class GrammarCompiler:
    """Compiles specs against one tokenizer; one per engine, made when the first grammar arrives.

    vocab_size is the width of the model's logits (at least the tokenizer's): masks have one bit per
    logit, and ids past the tokenizer's (padded embedding rows) are never allowed.
    """

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int | None = None, config: CompilerConfig | None = None
    ):
        self.config = config or CompilerConfig()
        self.vocab_size = vocab_size or tokenizer.vocab_size
        if self.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} is below the tokenizer's {tokenizer.vocab_size}")
        # Every EOS id of the model (a chat model often has two) ends a grammar-complete output.
        self.eos_token_ids = sorted(tokenizer.eos_token_ids)
        import llguidance.hf  # imports transformers: only once a compiler is made

        self.ll_tokenizer = llguidance.hf.from_tokenizer(
            tokenizer.hf, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
        )
        self._vocab = tokenizer.hf.get_vocab()
        # Resource bounds on each compile and mask step; verbose errors would quote the grammar back.
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._pool = ThreadPoolExecutor(self.config.compile_threads, thread_name_prefix="loom-grammar")
        # Reentrant: a compile that is already done runs its done-callback inside submit(), under the lock.
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, CompiledGrammar | InvalidRequest] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self.hits = 0
        self.misses = 0

    # ---- public ---------------------------------------------------------------------------------------

    def submit(self, spec: GrammarSpec) -> Future:
        """A future of the compiled grammar (done at once on a cache hit); it raises InvalidRequest."""
        with self._lock:
            cached = self._cache.get(spec.key)
            if cached is not None:
                self._cache.move_to_end(spec.key)
                self.hits += 1
                done: Future = Future()
                if isinstance(cached, InvalidRequest):
                    done.set_exception(cached)
                else:
                    done.set_result(cached)
                return done
            future = self._inflight.get(spec.key)
            if future is None:  # an identical spec compiling already is shared, not compiled twice
                self.misses += 1
                future = self._pool.submit(self._compile, spec)
                self._inflight[spec.key] = future
                future.add_done_callback(lambda f, key=spec.key: self._finished(key, f))
            return future

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile (or fetch) spec, waiting at most compile_timeout_s. Raises InvalidRequest naming spec.param."""
        try:
            return self.submit(spec).result(timeout=self.config.compile_timeout_s)
        except TimeoutError:
            raise self._timeout(spec) from None
        except InvalidRequest as e:
            raise InvalidRequest(e.message, param=spec.param) from None

    async def compile_async(self, spec: GrammarSpec) -> CompiledGrammar:
        """compile() for an event loop: waits without blocking it."""
        future = asyncio.wrap_future(self.submit(spec))
        try:
            # shield: a timed-out compile runs on (and is cached) rather than being cancelled half-way.
            return await asyncio.wait_for(asyncio.shield(future), self.config.compile_timeout_s)
        except TimeoutError:
            raise self._timeout(spec) from None
        except InvalidRequest as e:
            raise InvalidRequest(e.message, param=spec.param) from None

    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)

    def close(self) -> None:
        """Stop the compile threads (a compile already running finishes on its own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- compile thread -------------------------------------------------------------------------------

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        try:
            grammar = to_llguidance(spec, self._special_token)
            # Never raises for grammar errors: a bad grammar comes back as a matcher in its error state.
            template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=self._limits)
        except InvalidRequest:
            raise
        except Exception as e:  # a library failure on odd input is still this input's fault to report
            logger.warning("grammar compile failed (%s)", type(e).__name__, exc_info=True)
            raise InvalidRequest(f"cannot compile the {_what(spec)}: {_short(str(e))}") from None
        if template.is_error():
            raise InvalidRequest(f"invalid {_what(spec)}: {_short(template.get_error())}")
        for warning in template.get_grammar_warnings():
            logger.info("grammar %s: %s", spec.key[:12], warning)
        return CompiledGrammar(spec, template)

    def _finished(self, key: str, future: Future) -> None:
        with self._lock:
            self._inflight.pop(key, None)
            if future.cancelled():
                return
            error = future.exception()
            if error is not None and not isinstance(error, InvalidRequest):
                return
            self._cache[key] = error if error is not None else future.result()
            self._cache.move_to_end(key)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)

    def _special_token(self, text: str) -> str | None:
        """`<[id]>` when text is one special token of this tokenizer (llguidance matches it as that token)."""
        token_id = self._vocab.get(text)
        if token_id is None or not self.ll_tokenizer.is_special_token(token_id):
            return None
        return f"<[{token_id}]>"

    def _timeout(self, spec: GrammarSpec) -> InvalidRequest:
        return InvalidRequest(
            f"the {_what(spec)} did not compile within {self.config.compile_timeout_s:g} s; simplify it",
            param=spec.param,
        )


def _what(spec: GrammarSpec) -> str:
    return {
        "json_schema": "JSON schema",
        "json_object": "JSON grammar",
        "regex": "regular expression",
        "choice": "choice",
        "grammar": "grammar",
        "tool_calls": "tool-call grammar (from the functions' parameters)",
    }[spec.kind]


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + "..."
