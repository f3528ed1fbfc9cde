"""`ModulesToSaveWrapper`: extra modules (classifier heads...) trained in full, one copy per adapter.

A classifier head's copy may have its own number of outputs (`ModulesToSaveWrapper.set_head_size`): an
adapter with 5 classes next to one with 40, on one model. Mixed batches over such heads still run as one
batched matmul, padding each sample's logits to the batch's largest head (see `lntune.mixed_batch`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lntune.mixed_batch import (
    BatchAdapters,
    can_run_linear_per_sample,
    first_tensor,
    grouped_forward,
    pad_logits,
    per_sample_linear,
)
from lntune.wrapper import AdapterWrapper


def output_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """The ``Linear`` layer that gives a head its outputs, with its path inside ``module``.

    ``module`` itself if it is a ``Linear`` (BERT's ``classifier``, Llama's ``score``), else its
    ``out_proj`` (RoBERTa-style heads), else its last ``Linear``; None if it has none.

    Example:
        >>> output_linear(torch.nn.Linear(4, 2))
        ('', Linear(in_features=4, out_features=2, bias=True))
    """
    if isinstance(module, nn.Linear):
        return "", module
    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    named = [(name, m) for name, m in linears if name.rsplit(".", 1)[-1] == "out_proj"]
    return (named or linears or [None])[-1]


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

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__(module_to_save, adapter_name)
        self._head_sizes: dict[str, int] = {}  # adapters whose head has another size than the original's

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

    # --------------------------------------------------------------------------- head sizes
    def head_size(self, adapter_name: str) -> int | None:
        """The number of outputs of the module that runs for ``adapter_name`` (its `output_linear`), or None."""
        size = self._head_sizes.get(adapter_name)
        if size is not None:
            return size
        found = output_linear(self.module_for(adapter_name))
        return None if found is None else found[1].out_features

    def resized_heads(self) -> dict[str, int]:
        """``{adapter: outputs}`` for the adapters whose head has another size than the original module's."""
        return dict(self._head_sizes)

    def set_head_size(
        self, adapter_name: str, out_features: int, init: Callable[[nn.Module], None] | None = None
    ) -> None:
        """Give ``adapter_name``'s copy an output layer (`output_linear`) with ``out_features`` outputs.

        The new ``Linear`` keeps the old one's input size, bias, dtype, device and ``requires_grad``; its
        values come from ``init`` (for example the model's ``_init_weights``), else from ``nn.Linear``'s own
        initialisation. Nothing changes when the size is already ``out_features``. Costs the same however
        many adapters are resident.

        Args:
            adapter_name: An adapter with a copy here.
            out_features: The head's new number of outputs (classes), at least 1.
            init: Called on the new ``Linear`` under ``torch.no_grad()``.

        Raises:
            ValueError: the module has no ``Linear`` output layer, or ``out_features`` is below 1.

        Example:
            >>> head.set_head_size("five_classes", 5)
            >>> head.head_size("five_classes")
            5
        """
        tuned = self.tuned_module(adapter_name)
        found = output_linear(tuned)
        if found is None:
            raise ValueError(
                f"Cannot give adapter '{adapter_name}' a head of {out_features} outputs: its "
                f"{type(tuned).__name__} module has no Linear output layer."
            )
        if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"A head needs at least one output (num_labels >= 1), got {out_features!r}.")
        path, old = found
        if old.out_features != out_features:
            weight = old.weight
            new = nn.Linear(
                old.in_features, out_features, bias=old.bias is not None, device=weight.device, dtype=weight.dtype
            )
            if init is not None:
                with torch.no_grad():
                    init(new)
            new.requires_grad_(weight.requires_grad)
            new.train(old.training)
            if path:
                parent, _, child = path.rpartition(".")
                setattr(tuned.get_submodule(parent), child, new)
            else:
                self._copies[adapter_name] = new
            self._runners.pop(id(tuned), None)
        original = output_linear(self.original_module)
        if original is not None and original[1].out_features == out_features:
            self._head_sizes.pop(adapter_name, None)
        else:
            self._head_sizes[adapter_name] = out_features
        self._select_forward()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not self.has_adapter(adapter_name):
            self._head_sizes.pop(adapter_name, None)

    # ------------------------------------------------------------------------------ forward
    def _mixed_forward(self, batch: BatchAdapters, modules: list[nn.Module], args: tuple, kwargs: dict):
        index = batch.index_for(first_tensor(args, kwargs))
        if not can_run_linear_per_sample(modules, args, kwargs):
            runs = [self.runner_for(m) for m in modules]
            return grouped_forward(runs, index, args, kwargs, ragged=bool(self._head_sizes))
        # Heads (classifiers) apply each sample's own weight in one batched matmul, padded to the widest head.
        weight, bias, padded = batch.per_sample_head(self, modules, index, self.compute_dtype)
        return pad_logits(per_sample_linear(args[0], weight, bias), padded)

    def __setstate__(self, state):
        state.setdefault("_head_sizes", {})
        super().__setstate__(state)
