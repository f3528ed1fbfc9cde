"""The adapter state that `LNTuningLayer` and `ModulesToSaveWrapper` share: active adapters, enabled flag."""

from __future__ import annotations

from collections.abc import Sequence


def as_names(names: str | Sequence[str]) -> list[str]:
    """``"a"`` -> ``["a"]``; any sequence of names -> a new list."""
    return [names] if isinstance(names, str) else list(names)


class AdapterStateMixin:
    """Read-only views of ``_active_adapter`` (a list of names) and ``_disable_adapters``, as in PEFT."""

    _active_adapter: list[str]
    _disable_adapters: bool

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters
