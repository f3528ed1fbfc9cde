"""`AdapterRegistry`: the adapters resident in the model, as an LRU of at most ``--max-resident``.

Only the worker thread uses it, between forwards. An adapter is loaded on first use under an internal
name (``a<N>``: folder names may hold characters adapter names may not); a newer version of its folder
is loaded beside the old one, which is unloaded only once the new one loaded (so a broken new version
leaves the old one serving). Beyond ``--max-resident`` the least recently used adapter not needed by the
current batch is unloaded. A failed load is remembered for that version of the files, so a broken
adapter fails its requests at once instead of being re-read for each one.

Requests that outlive one forward (generation under continuous batching) pin their adapter: a pinned
adapter is never evicted, and an adapter replaced or removed while pinned stays loaded until its last
request ends (`pin`, `unpin`).

Internal names never reach a client: error messages name the adapter as the API does (`public_names`).
`load_many` loads a list of adapters in one go (``--preload``), reporting its progress.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lntune.serve.catalog import AdapterSource
from lntune.serve.engine import Engine
from lntune.serve.errors import APIError, adapter_failed
from lntune.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resident:
    """A loaded adapter: its name in the model and the source it came from."""

    internal_name: str
    source: AdapterSource


class AdapterRegistry:
    """Loads, reloads and evicts adapters of one `Engine`.

    Args:
        engine: The models.
        max_resident: Most adapters kept loaded.
        metrics: Where loads, failures, evictions and the resident count are recorded.

    Example:
        >>> registry = AdapterRegistry(engine, max_resident=8, metrics=ServerMetrics())
        >>> registry.prepare([catalog.resolve("a")])
        {}
        >>> registry.resident("a").internal_name
        'a0'
    """

    def __init__(self, engine: Engine, max_resident: int, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.max_resident = max_resident
        self.metrics = metrics
        self._resident: OrderedDict[str, Resident] = OrderedDict()
        self._failed: dict[str, tuple[int, APIError]] = {}
        self._ids = itertools.count()
        self._pins: Counter[str] = Counter()  # internal name -> requests running it
        self._retired: set[str] = set()  # internal names to unload when their last request ends
        self._public: dict[str, str] = {}  # internal name -> API name, of every adapter loaded or tried

    def __len__(self) -> int:
        return len(self._resident)

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def resident(self, name: str) -> Resident:
        """The loaded adapter ``name`` (after `prepare`)."""
        return self._resident[name]

    def prepare(self, sources: Iterable[AdapterSource]) -> dict[str, APIError]:
        """Make every adapter in ``sources`` resident and most recently used, loading what is missing or stale.

        Args:
            sources: The adapters one batch needs (at most ``max_resident`` distinct names).

        Returns:
            ``{name: error}`` for the adapters that could not be loaded (their requests fail; others run).
        """
        needed: dict[str, AdapterSource] = {}
        for source in sources:
            if source.name not in needed or needed[source.name].generation < source.generation:
                needed[source.name] = source
        failures = {}
        for name, source in needed.items():
            current = self._resident.get(name)
            if current is not None and current.source.generation >= source.generation:
                self._resident.move_to_end(name)
                continue
            failed = self._failed.get(name)
            if failed is not None and failed[0] == source.generation:
                failures[name] = failed[1]
                continue
            try:
                self.load(source, keep=needed)
            except APIError as exc:
                failures[name] = exc
        return failures

    def load(self, source: AdapterSource, keep: Iterable[str] = ()) -> Resident:
        """Load ``source`` now (replacing a resident older version once the new one has loaded).

        Args:
            source: The adapter to load.
            keep: Names not to evict to make room (the current batch's).

        Raises:
            APIError: 500 naming the file, if the adapter cannot be loaded; the registry is then unchanged.
        """
        current = self._resident.get(source.name)
        if current is None:
            self._make_room(set(keep) | {source.name})
        internal_name = f"a{next(self._ids)}"
        self._public[internal_name] = source.name
        try:
            self.engine.load(str(source.folder), internal_name, source.num_labels)
        except Exception as exc:  # lntune raises CheckpointError/ValueError/OSError...; any failure is this adapter's
            del self._public[internal_name]
            text = _replace_name(str(exc), internal_name, source.name)
            error = adapter_failed(f"Adapter '{source.name}' cannot be loaded: {text}")
            self._failed[source.name] = (source.generation, error)
            self.metrics.load_failures.inc()
            logger.warning("lntune serve: %s", error.message)
            raise error from None
        self._failed.pop(source.name, None)
        if current is not None:
            self._unload(current)
        resident = Resident(internal_name, source)
        self._resident[source.name] = resident
        self._resident.move_to_end(source.name)
        self.metrics.loads.inc()
        self.metrics.resident.set(len(self._resident))
        return resident

    def remove(self, name: str) -> bool:
        """Unload ``name`` if it is resident; returns whether it was."""
        self._failed.pop(name, None)
        current = self._resident.pop(name, None)
        if current is not None:
            self._unload(current)
            self.metrics.resident.set(len(self._resident))
        return current is not None

    def pin(self, name: str) -> Resident:
        """Keep the resident adapter ``name`` loaded (and never evicted) until `unpin`; returns it."""
        resident = self._resident[name]
        self._pins[resident.internal_name] += 1
        return resident

    def unpin(self, resident: Resident) -> None:
        """One request of ``resident`` ended; a replaced or removed adapter is unloaded with its last request."""
        internal = resident.internal_name
        self._pins[internal] -= 1
        if self._pins[internal] <= 0:
            del self._pins[internal]
            if internal in self._retired:
                self._retired.remove(internal)
                self._unload_now(internal)

    def _unload(self, resident: Resident) -> None:
        if self._pins.get(resident.internal_name):
            self._retired.add(resident.internal_name)  # unloaded by its last unpin
        else:
            self._unload_now(resident.internal_name)

    def _unload_now(self, internal_name: str) -> None:
        self.engine.unload(internal_name)
        self._public.pop(internal_name, None)

    def load_many(
        self, sources: Sequence[AdapterSource], progress: Callable[[int, int, float], None] | None = None
    ) -> dict[str, APIError]:
        """Load ``sources`` now, in order (at most ``max_resident`` of them: the first ones), e.g. at start.

        Args:
            sources: The adapters to load.
            progress: Called as ``progress(done, total, seconds)`` after each tenth of the work and at the end.

        Returns:
            ``{name: error}`` for the adapters that could not be loaded (the others are resident).
        """
        chosen = list(sources)[: self.max_resident]
        failures: dict[str, APIError] = {}
        started, step = time.perf_counter(), max(1, len(chosen) // 10)
        for done, source in enumerate(chosen, 1):
            try:
                self.load(source)
            except APIError as exc:
                failures[source.name] = exc
            if progress is not None and (done % step == 0 or done == len(chosen)):
                progress(done, len(chosen), time.perf_counter() - started)
        return failures

    def public_names(self, message: str) -> str:
        """``message`` with every internal adapter name (``a0``...) replaced by the adapter's name in the API."""
        if not self._public or not _INTERNAL.search(message):
            return message
        return _INTERNAL.sub(lambda m: self._public.get(m.group(0), m.group(0)), message)

    def _make_room(self, keep: set[str]) -> None:
        """Evict least recently used adapters (not in ``keep``) until one more fits."""
        while len(self._resident) >= self.max_resident:
            pinned = self._pins
            victim = next((n for n, r in self._resident.items() if n not in keep and not pinned[r.internal_name]), None)
            if victim is None:
                return
            self.remove(victim)
            self.metrics.evictions.inc()


#: An internal adapter name as a word of its own (``a0``, ``'a12'``), not part of another word or path.
_INTERNAL = re.compile(r"(?<![\w/-])a\d+(?![\w/-])")


def _replace_name(message: str, internal: str, public: str) -> str:
    """``message`` with the internal name ``internal`` (as a word of its own) replaced by ``public``."""
    return re.sub(rf"(?<![\w/-]){re.escape(internal)}(?![\w/-])", public, message)
