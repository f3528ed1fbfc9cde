"""`ModulesToSaveWrapper`: extra modules (classifier heads...) trained in full, one copy per adapter."""

from __future__ import annotations

from torch import nn

from lntune.mixed_batch import (
    BatchAdapters,
    can_run_linear_per_sample,
    first_tensor,
    grouped_forward,
    per_sample_linear,
)
from lntune.wrapper import AdapterWrapper


class ModulesToSaveWrapper(AdapterWrapper):
    """Keeps ``original_module`` and a trainable copy per adapter in ``modules_to_save``.

    The active adapter's copy runs in forward; a disabled wrapper, or one without the active adapter,
    runs the original. As in PEFT, ``active_adapters`` lists only the active adapters that have a
    copy here, and at most one of them may (the copies replace each other, they do not add up).
    Names and checkpoint keys follow PEFT.

    Args:
        module_to_save: The module to copy (kept unchanged as ``original_module``).
        adapter_name: The first adapter.

    Example:
        >>> head = ModulesToSaveWrapper(torch.nn.Linear(4, 2), "default")
        >>> head.set_adapter("default")  # its copy trains; the original stays frozen
    """

    adapter_layer_names = ("modules_to_save",)
    _base_slot = "original_module"

    @property
    def _adapters(self) -> set[str]:
        """The adapters with a copy here (PEFT's name)."""
        return set(self._all_available_adapter_names())

    def _active_names(self, names: list[str]) -> list[str]:
        present = [n for n in names if self.has_adapter(n)]
        if len(present) > 1:
            raise ValueError(
                f"Only one adapter can be set at a time for ModulesToSaveWrapper: adapters {present} all train a "
                "copy of the same module_to_save. Activate a single adapter."
            )
        return present

    def _active_module(self) -> nn.Module:
        return self.module_for(self._active_adapter[0]) if self._active_adapter else self.original_module

    def _mixed_forward(self, batch: BatchAdapters, modules: list[nn.Module], args: tuple, kwargs: dict):
        index = batch.index_for(first_tensor(args, kwargs))
        if not can_run_linear_per_sample(modules, args, kwargs):
            return grouped_forward([self.runner_for(m) for m in modules], index, args, kwargs)
        # Heads (classifiers) apply each sample's own weight in one batched matmul.
        rows, weight = index.numel(), modules[0].weight
        shapes = {"weight": (rows, *weight.shape), "bias": (rows, weight.shape[0])}
        params = batch.per_sample_parameters(self, modules, shapes, index, self.compute_dtype)
        return per_sample_linear(args[0], params["weight"], params["bias"])
