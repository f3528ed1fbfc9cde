"""`Batcher`: the one worker thread that owns the model.

Handlers put work items (one per input text or prompt) on a queue and await their futures. The worker
takes the first item, waits up to ``max_wait_ms`` for more (up to ``max_batch_size`` items and
``max_batch_tokens`` tokens, from any mix of adapters), makes the batch's adapters resident, runs one
mixed-adapter forward per model (and per generation setting), and resolves the futures. Adapter loads,
unloads and commands from ``/v1/adapters`` run in this thread too, between forwards, never during one.

The queue is bounded (``max_queue`` inputs: a request that does not fit is refused with 429 before anything
is queued), and a request may have a time limit (504 past it; its inputs that have not run are dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lntune.mixed_batch import BASE_ADAPTER_NAME
from lntune.serve.catalog import AdapterSource
from lntune.serve.engine import Engine, Sampling
from lntune.serve.errors import APIError, overloaded, timed_out
from lntune.serve.metrics import ServerMetrics
from lntune.serve.registry import AdapterRegistry

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass(eq=False)
class WorkItem:
    """One sample: its adapter (None: the base model), token ids and, for generation, its settings.

    Items with different ``sampling`` never share a ``generate``; ``budget`` is the sample's own limit of new
    tokens. Items without ``sampling`` run a forward (encoder tasks).
    """

    source: AdapterSource | None
    input_ids: list[int]
    future: asyncio.Future
    sampling: Sampling | None = None
    budget: int = 0
    token_type_ids: list[int] | None = None  # text pairs (cross-encoders): segment ids, else None
    request: RequestState | None = field(default=None, repr=False)
    queued_at: float = 0.0
    left_queue: bool = False  # counted out of the waiting inputs (it ran, or was dropped)


class RequestState:
    """One request's place in the waiting / running gauges: waiting until its first input reaches a forward,
    then running until it is answered (both sides may race: a lock keeps the gauges exact)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.started = False
        self.finished = False
        self._lock = threading.Lock()
        metrics.requests_waiting.inc()

    def start(self) -> None:
        """One of its inputs is in a forward now (worker thread)."""
        with self._lock:
            if self.started or self.finished:
                return
            self.started = True
        self.metrics.requests_waiting.dec()
        self.metrics.requests_running.inc()

    def finish(self) -> None:
        """It is answered (or given up)."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
            started = self.started
        (self.metrics.requests_running if started else self.metrics.requests_waiting).dec()


@dataclass(eq=False)
class _Command:
    run: Callable[[], Any]
    future: asyncio.Future | None = field(repr=False)


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` from the worker thread (nothing if its request went away meanwhile)."""

    def apply() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is gone
        future.get_loop().call_soon_threadsafe(apply)


class Batcher:
    """Joins work items into mixed-adapter batches and runs them on one thread.

    Args:
        engine: The models.
        registry: The resident adapters.
        metrics: Where batch sizes are recorded.
        max_batch_size: Most samples per forward.
        max_wait_ms: How long a batch's first item waits for more.
        max_batch_tokens: Most tokens (the items' lengths summed) per batch; a longer item runs alone.
        max_queue: Most items waiting; `submit` refuses a request that does not fit (429).

    Example:
        >>> batcher = Batcher(engine, registry, metrics, max_batch_size=32, max_wait_ms=5)
        >>> batcher.start()
        >>> embedding = await batcher.submit([WorkItem(None, [101, 102], loop.create_future())])
    """

    def __init__(
        self,
        engine: Engine,
        registry: AdapterRegistry,
        metrics: ServerMetrics,
        max_batch_size: int,
        max_wait_ms: float,
        max_batch_tokens: int = 1 << 62,
        max_queue: int = 1 << 62,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[WorkItem] = deque()
        self._thread: threading.Thread | None = None
        # Items submitted and not yet in a forward (or dropped), in all and by adapter name (None: the base).
        self._lock = threading.Lock()
        self._waiting = 0
        self._waiting_adapters: Counter[str | None] = Counter()

    @property
    def queue_size(self) -> int:
        """Items waiting for a forward."""
        return self._waiting

    # --------------------------------------------------------------------- event-loop side
    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="lntune-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the worker thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    async def submit(self, items: list[WorkItem], timeout: float | None = None) -> list:
        """Queue ``items`` and wait for all their results (the first error is raised).

        Args:
            items: One request's inputs.
            timeout: Seconds to wait at most (None: no limit).

        Raises:
            APIError: 429 (with ``Retry-After``) when the queue has no room for ``items`` (a request is always
                accepted by an empty queue); 504 past ``timeout``, after dropping the items that have not run.
        """
        with self._lock:
            if self._waiting and self._waiting + len(items) > self.max_queue:
                self.metrics.rejected.inc()
                raise overloaded(
                    f"The server is overloaded: {self._waiting} inputs are waiting and this request brings "
                    f"{len(items)} (--max-queue {self.max_queue}); retry later.",
                )
            self._waiting += len(items)
            self._waiting_adapters.update(_adapter_of(item) for item in items)
        self.metrics.queue_size.set(self._waiting)
        state = RequestState(self.metrics)
        now = time.monotonic()
        for item in items:
            item.request, item.queued_at = state, now
            self._queue.put(item)
        gathered = asyncio.gather(*(item.future for item in items), return_exceptions=True)
        try:
            results = await asyncio.wait_for(gathered, timeout)
        except asyncio.TimeoutError:
            for item in items:
                item.future.cancel()  # the worker drops cancelled items it has not run
            self._leave_queue(items)  # no longer waiting (those in a forward now have left already)
            self.metrics.timeouts.inc()
            raise timed_out(
                f"The request did not finish within --request-timeout {timeout:g} s ({len(items)} inputs); its "
                "inputs that had not run were dropped."
            ) from None
        finally:
            state.finish()
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            raise error
        return results

    async def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the worker thread between forwards and return its result."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put(_Command(function, future))
        return await future

    def post(self, function: Callable[[], Any]) -> None:
        """Queue ``function`` to run on the worker thread between forwards, without waiting (any thread)."""
        self._queue.put(_Command(function, None))

    # ------------------------------------------------------------------------ worker side
    def _work(self) -> None:
        while True:
            batch, commands, stop = self._collect()
            if batch:
                self._run_batch(batch)
            for command in commands:
                self._run_command(command)
            if stop:
                for item in self._pending:
                    self._leave_queue([item])
                    _settle(item.future, error=APIError(503, "The server is shutting down.", type="server_error"))
                return

    def _collect(self) -> tuple[list[WorkItem], list[_Command], bool]:
        """The next batch, the commands that arrived meanwhile (run after it), and whether to stop."""
        first = self._pending.popleft() if self._pending else self._queue.get()
        if first is _STOP:
            return [], [], True
        if isinstance(first, _Command):
            return [], [first], False
        batch, deadline = [first], time.monotonic() + self.max_wait
        tokens = len(first.input_ids)
        while len(batch) < self.max_batch_size:
            if self._pending:
                item = self._pending.popleft()
            else:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if item is _STOP:
                return self._within_resident_limit(batch), [], True
            if isinstance(item, _Command):
                return self._within_resident_limit(batch), [item], False
            if item.future.done():  # its request went away (timed out, or the client left)
                self._leave_queue([item])
                continue
            if tokens + len(item.input_ids) > self.max_batch_tokens:
                self._pending.appendleft(item)  # first of the next batch
                break
            batch.append(item)
            tokens += len(item.input_ids)
        return self._within_resident_limit(batch), [], False

    def _within_resident_limit(self, batch: list[WorkItem]) -> list[WorkItem]:
        """The items of ``batch`` whose adapters fit in ``max_resident``; the rest wait for the next batch."""
        names: set[str] = set()
        kept, deferred = [], []
        for item in batch:
            if item.future.done():  # its request went away
                self._leave_queue([item])
                continue
            name = item.source.name if item.source is not None else None
            if name is not None and name not in names and len(names) >= self.registry.max_resident:
                deferred.append(item)
                continue
            if name is not None:
                names.add(name)
            kept.append(item)
        self._pending.extendleft(reversed(deferred))
        return kept

    def _leave_queue(self, items: list[WorkItem]) -> None:
        """``items`` are no longer waiting: they run now, or were dropped."""
        with self._lock:
            leaving = [item for item in items if not item.left_queue]
            if not leaving:
                return
            for item in leaving:
                item.left_queue = True
            self._waiting -= len(leaving)
            self._waiting_adapters.subtract(_adapter_of(item) for item in leaving)
            self._waiting_adapters = +self._waiting_adapters  # drop the zero counts
            waiting = self._waiting
        self.metrics.queue_size.set(waiting)

    def _show_adapters(self, running: list[WorkItem]) -> None:
        """The adapter gauge (vLLM's ``lora_requests_info`` shape): adapters running now and waiting."""
        with self._lock:
            waiting = sorted(n for n in self._waiting_adapters if n is not None)
        names = sorted({i.source.name for i in running if i.source is not None})
        self.metrics.set_lora_info(self.registry.max_resident, waiting, names)

    def _run_batch(self, batch: list[WorkItem]) -> None:
        self._leave_queue(batch)
        now = time.monotonic()
        for item in batch:
            if item.request is not None:
                item.request.start()
            if item.queued_at:
                self.metrics.queue_time.observe(now - item.queued_at)
        self.metrics.batch_tokens.observe(sum(len(item.input_ids) for item in batch))
        self._show_adapters(batch)
        try:
            self._run_groups(batch)
        finally:
            self._show_adapters([])

    def _run_groups(self, batch: list[WorkItem]) -> None:
        failures = self.registry.prepare(item.source for item in batch if item.source is not None)
        groups: dict[object, list[WorkItem]] = defaultdict(list)
        for item in batch:
            if item.source is not None and item.source.name in failures:
                _settle(item.future, error=failures[item.source.name])
                continue
            groups[item.sampling].append(item)
        for sampling, items in groups.items():
            names = [
                BASE_ADAPTER_NAME if i.source is None else self.registry.resident(i.source.name).internal_name
                for i in items
            ]
            sequences = [i.input_ids for i in items]
            started = time.perf_counter()
            try:
                if sampling is None:
                    types = [i.token_type_ids for i in items]
                    results = self.engine.run(sequences, names, types if any(types) else None)
                else:
                    results = self.engine.generate(sequences, names, sampling, [i.budget for i in items])
            except Exception as exc:  # a failed forward fails its requests; the server keeps serving
                logger.exception("lntune serve: a batch of %d samples failed", len(items))
                message = self.registry.public_names(f"The model failed on this batch: {type(exc).__name__}: {exc}")
                error = APIError(500, message, "server_error")
                for item in items:
                    _settle(item.future, error=error)
                continue
            self.metrics.inference_time.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(items))
            self.metrics.batch_adapters.observe(len(set(names)))
            for item, result in zip(items, results):
                _settle(item.future, result)

    def _run_command(self, command: _Command) -> None:
        try:
            result = command.run()
        except Exception as exc:  # the handler awaiting it reports the error
            if command.future is None:
                logger.exception("lntune serve: a queued command failed")
            else:
                _settle(command.future, error=exc)
        else:
            if command.future is not None:
                _settle(command.future, result)


def _adapter_of(item: WorkItem) -> str | None:
    return item.source.name if item.source is not None else None
