"""AsyncEngine: the EngineCore loop on its own thread, the frontend's output processing on the event loop,
and one asyncio queue of outputs per request.

HTTP handlers never wait on a step and the step loop never waits on HTTP: requests and aborts cross
into the engine thread through a thread-safe inbox; each step's token ids cross back in one
`call_soon_threadsafe` per step, and are detokenized on the event loop while the next forward runs
(torch releases the GIL inside kernels).

Failure has two sizes. A request that makes a step fail is isolated by the core and fails alone
(RequestFailed). Anything else that escapes the loop (a bug in scheduling, an inbox item, a step hook)
kills the engine, and a watchdog treats a step that does not return within `step_timeout_s` the same
way: every open stream ends with EngineDeadError at once, `is_ready` turns false for good, and
`on_dead` tells the owner (the server exits non-zero so that a supervisor restarts it). Never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loom.config import EngineConfig
from loom.engine.core import EngineCore
from loom.engine.io import EngineCoreOutput
from loom.engine.request import RequestStatus
from loom.errors import EngineDeadError, RequestFailed
from loom.frontend.input_processor import InputProcessor, ProcessedRequest
from loom.frontend.output_processor import OutputProcessor
from loom.outputs import RequestOutput
from loom.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request: ProcessedRequest


@dataclass
class _Abort:
    seq_ids: list[str]
    status: RequestStatus = RequestStatus.FINISHED_ABORTED


@dataclass
class _ReleaseProgram:
    program_id: str


class AsyncEngine:
    """Owns an EngineCore on a background thread. Call `start()`, then `generate()` from asyncio code."""

    def __init__(
        self,
        config: EngineConfig,
        on_step: Callable[[EngineCore, list[EngineCoreOutput]], None] | None = None,
        max_prompt_chars: int | None = None,
        on_dead: Callable[[EngineDeadError], None] | None = None,
    ):
        self.config = config
        self.core: EngineCore | None = None
        self.input: InputProcessor | None = None
        """The frontend's input side, set once the model loaded (use it off the event loop)."""
        self.output: OutputProcessor | None = None
        self.on_step = on_step
        """Called on the engine thread after every step (metrics hook); must be quick."""
        self.max_prompt_chars = max_prompt_chars
        self.on_dead = on_dead
        """Called once on the event loop when the engine dies (after every stream got the error)."""
        self.dead: EngineDeadError | None = None
        self._step_started: float | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.num_pending = 0
        """Requests handed to the engine and not finished yet (waiting + running)."""

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; the model loads there, so this returns at once."""
        self._loop = loop or asyncio.get_event_loop()
        self._thread = threading.Thread(target=self._run, name="loom-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; every open generate() stream ends with EngineDeadError."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None and self.dead is None:  # a dead engine's thread may be stuck for good
            self._thread.join(timeout)
        if self._loop is not None and not self._loop.is_closed():
            error = EngineDeadError("the engine was stopped")
            for request_id in list(self._streams):
                self._loop.call_soon_threadsafe(self._deliver_error, request_id, error)

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set() and self.error is None and self.dead is None

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self.ready.wait(timeout):
            raise TimeoutError("the engine did not load in time")
        if self.error is not None:
            raise EngineDeadError(f"the engine failed to start: {self.error}") from self.error

    # ---- requests ------------------------------------------------------------------------------

    async def generate(self, request: ProcessedRequest) -> AsyncIterator[RequestOutput]:
        """Yields the request's delta outputs as they come; the last one has finished=True.

        The request comes from `self.input` (validated). Leaving the iterator early (client gone, task
        cancelled) aborts the request and frees its KV blocks.
        """
        if self.dead is not None:
            raise self.dead
        if not self.is_ready:
            raise EngineDeadError(
                "the engine is not ready"
                if self.error is None
                else f"the engine failed to load: {self.error}"
            )
        request_id = request.request_id
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self.output.add_request(request)
        self.num_pending += 1
        self._inbox.put(_Add(request))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            self.num_pending -= 1
            seq_ids = self.output.abort_request(request_id)
            if not finished and seq_ids:
                self._inbox.put(_Abort(seq_ids))

    def release_program(self, program_id: str) -> None:
        """An agent program (workflow run) ended: unpin the KV kept for its next call."""
        self._inbox.put(_ReleaseProgram(program_id))

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.core = core = EngineCore(self.config)
            tokenizer = Tokenizer(self.config.tokenizer or core.model_path)
            self.input = InputProcessor.for_engine(core, tokenizer, self.max_prompt_chars)
            self.output = OutputProcessor(tokenizer)
        except BaseException as e:  # noqa: BLE001 - reported through /ready and generate()
            logger.exception("engine failed to load")
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        if self.config.step_timeout_s > 0:
            threading.Thread(target=self._watchdog, name="loom-engine-watchdog", daemon=True).start()
        try:
            self._loop_forever(core)
        except BaseException as e:  # noqa: BLE001 - the supervisor: fail loudly, never hang
            logger.critical("the engine loop died: %r", e, exc_info=e)
            self._die(EngineDeadError(f"the engine died: {type(e).__name__}: {e}"))

    def _loop_forever(self, core: EngineCore) -> None:
        while not self._stop.is_set() and self.dead is None:
            self._drain_inbox(block=not core.has_unfinished())
            if self._stop.is_set() or self.dead is not None:
                break
            if not core.has_unfinished():
                continue
            self._step_started = time.monotonic()
            outputs = core.step()
            self._step_started = None
            if self.dead is not None:  # the watchdog gave up on this step meanwhile
                break
            if self.on_step is not None:
                self.on_step(core, outputs)
            if outputs:
                self._loop.call_soon_threadsafe(self._process, outputs)

    def _watchdog(self) -> None:
        timeout = self.config.step_timeout_s
        while not self._stop.is_set() and self.dead is None:
            started = self._step_started
            if started is not None and time.monotonic() - started > timeout:
                logger.critical("an engine step did not return within %.1f s; the engine is dead", timeout)
                self._die(EngineDeadError(f"the engine died: a step did not return within {timeout:g} s"))
                return
            self._stop.wait(min(1.0, timeout / 4))

    def _die(self, error: EngineDeadError) -> None:
        """Mark the engine dead and fail every open stream (from any thread, once)."""
        if self.dead is not None:
            return
        self.dead = error
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_streams, error)

    def _drain_inbox(self, block: bool) -> None:
        core = self.core
        while True:
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, _Add):
                added = []
                try:
                    for seq in item.request.seqs:
                        core.add_request(seq)
                        added.append(seq.request_id)
                except Exception as e:  # noqa: BLE001 - goes back to the caller
                    core.abort_requests(added)
                    self._loop.call_soon_threadsafe(self._deliver_error, item.request.request_id, e)
            elif isinstance(item, _ReleaseProgram):
                core.release_program(item.program_id)
            else:
                core.abort_requests(item.seq_ids, item.status)

    # ---- on the event loop ---------------------------------------------------------------------

    def _process(self, outputs: list[EngineCoreOutput]) -> None:
        processed = self.output.process_outputs(outputs)
        if processed.stopped_seq_ids:
            self._inbox.put(_Abort(processed.stopped_seq_ids, RequestStatus.FINISHED_STOPPED))
        if processed.aborted_seq_ids:
            self._inbox.put(_Abort(processed.aborted_seq_ids))
        for request_id, why in processed.failed.items():
            self._deliver_error(
                request_id, RequestFailed(f"the engine failed while running this request ({why})")
            )
        for out in processed.request_outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_streams(self, error: EngineDeadError) -> None:
        for request_id in list(self._streams):
            self._deliver_error(request_id, error)
        if self.on_dead is not None:
            self.on_dead(error)

    def _deliver_error(self, request_id: str, error: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(error)
