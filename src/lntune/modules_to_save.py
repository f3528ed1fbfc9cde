"""`ModulesToSaveWrapper`: extra modules (classifier heads...) trained in full, one copy per adapter."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from lntune.mixed_batch import BatchAdapters, grouped_forward
from lntune.precision import float_dtype, runner
from lntune.tuner_state import AdapterStateMixin, as_names


class ModulesToSaveWrapper(AdapterStateMixin, nn.Module):
    """Keeps ``original_module`` and a trainable copy per adapter in ``modules_to_save``.

    The active adapter's copy runs in forward; a disabled wrapper, or one without the active adapter,
    runs the original. Names and checkpoint keys follow PEFT.

    Args:
        module_to_save: The module to copy.
        adapter_name: The first adapter.
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        self._batch_adapters: BatchAdapters | None = None
        self.update(adapter_name)
        self.training = self.modules_to_save.training = module_to_save.training

    def update(self, adapter_name: str) -> None:
        """Add a frozen copy of the original module for ``adapter_name``."""
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(False)
        self.modules_to_save[adapter_name] = module
        self.original_module.requires_grad_(False)

    @property
    def adapter_copies(self) -> nn.ModuleDict:
        """The per-adapter copies (``modules_to_save``), as `LNTuningLayer.adapter_copies`."""
        return self.modules_to_save

    def module_for(self, adapter_name: str) -> nn.Module:
        return self.modules_for([adapter_name])[0]

    def modules_for(self, adapter_names: Sequence[str]) -> list[nn.Module]:
        """The copy of each name, or the original where there is none (``"__base__"`` included)."""
        copies, original = self.modules_to_save._modules, self.original_module
        return [copies.get(name, original) for name in adapter_names]

    def check_active(self, names: Sequence[str]) -> list[str]:
        """The adapters among ``names`` that have a copy here; raises if more than one does."""
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(
                f"Adapters {present} all train a copy of the same module_to_save; only one of them can be "
                "active at a time. Activate a single adapter."
            )
        return present

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        names = as_names(adapter_names)
        present = self.check_active(names)
        self._active_adapter = names
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in present and not inference_mode)
        self.original_module.requires_grad_(False)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        names = as_names(adapter_names)
        for name in names:
            if name in self.modules_to_save:
                self.modules_to_save[name].requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active_adapter = [a for a in self._active_adapter if a != adapter_name]

    def set_batch_adapters(self, batch: BatchAdapters | None) -> None:
        self._batch_adapters = batch

    def active_module(self) -> nn.Module:
        """The module forward runs now (the original when disabled or without an active copy)."""
        if self._disable_adapters:
            return self.original_module
        for name in self._active_adapter:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        # Copies upcast to float32 (autocast_adapter_dtype) run in the original module's dtype.
        dtype = float_dtype(self.original_module)
        batch = self._batch_adapters
        if batch is None or self._disable_adapters:
            return runner(self.active_module(), dtype)(*args, **kwargs)
        tensor = next(v for v in (*args, *kwargs.values()) if hasattr(v, "shape"))
        runs = [runner(m, dtype) for m in batch.modules_of(self)]
        return grouped_forward(runs, batch.index_for(tensor), args, kwargs)

    def __repr__(self) -> str:
        return "lntune." + super().__repr__()
