"""`LNTuningLayer`: a module wrapped with one tuned copy per adapter.

The original module stays as ``base_layer``; each adapter is an independent deep copy in
``ln_tuning_layers[name]``; forward runs the active adapter's copy. Merging swaps the active copy
into ``base_layer`` (and the original into the adapter's slot), so that unloading can hand back the
tuned module itself.

Every state change (`set_adapter`, `merge`, `enable_adapters`...) precomputes the callable that
forward runs, so that the hot path is a single call: within noise of the bare module.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lntune.mixed_batch import BatchAdapters, mixed_forward
from lntune.precision import float_dtype, runner, upcast_parameters
from lntune.tuner_state import AdapterStateMixin, as_names


class LNTuningLayer(AdapterStateMixin, nn.Module):
    """A target module together with its per-adapter tuned copies.

    Args:
        base_layer: The module to tune (a LayerNorm, RMSNorm, Linear, a whole block...). It is kept,
            unchanged, as ``base_layer``.
        adapter_name: The first adapter to create.
        upcast: Store the adapter's float16/bfloat16 parameters in float32 (see `lntune.precision`);
            forward still computes in the base module's dtype, so outputs keep the model's dtype.

    Example:
        >>> layer = LNTuningLayer(torch.nn.LayerNorm(8), "default")
        >>> torch.equal(layer(torch.ones(2, 8)), layer.base_layer(torch.ones(2, 8)))
        True
    """

    adapter_layer_names = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, upcast: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ln_tuning_layers = nn.ModuleDict()
        self._active_adapter: list[str] = [adapter_name]
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._batch_adapters: BatchAdapters | None = None
        self._runners: dict[int, Callable] = {}
        # PEFT exposes these on every tuner layer; None for modules without them (norms).
        self.in_features = getattr(base_layer, "in_features", None)
        self.out_features = getattr(base_layer, "out_features", None)
        self.update_layer(adapter_name, upcast)
        # Follow the wrapped module's train/eval mode (new modules default to train).
        self.training = self.ln_tuning_layers.training = base_layer.training

    # ----------------------------------------------------------------------------------- state
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def original_module(self) -> nn.Module:
        """The pristine module, wherever the merge put it."""
        if self.merged_adapters:
            return self.ln_tuning_layers[self.merged_adapters[0]]
        return self.base_layer

    @property
    def adapter_copies(self) -> nn.ModuleDict:
        """The per-adapter copies (``ln_tuning_layers``), as `ModulesToSaveWrapper.adapter_copies`."""
        return self.ln_tuning_layers

    def adapter_module(self, adapter_name: str) -> nn.Module:
        """The tuned copy of ``adapter_name``, wherever the merge put it (KeyError if absent)."""
        if adapter_name in self.merged_adapters:
            return self.base_layer
        return self.ln_tuning_layers[adapter_name]

    def module_for(self, adapter_name: str) -> nn.Module:
        """The module that runs for ``adapter_name``: its copy, or the original if this layer lacks it."""
        return self.modules_for([adapter_name])[0]

    def modules_for(self, adapter_names: Sequence[str]) -> list[nn.Module]:
        """`module_for` of each name in one pass (``"__base__"`` gives the original): mixed batches use it."""
        copies = dict(self.ln_tuning_layers._modules)
        if self.merged_adapters:
            original = copies[self.merged_adapters[0]]
            copies[self.merged_adapters[0]] = self.base_layer
        else:
            original = self.base_layer
        return [copies.get(name, original) for name in adapter_names]

    # ------------------------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, upcast: bool = False) -> None:
        """Add ``adapter_name`` as a fresh, frozen copy of the original module (never of a tuned one).

        With ``upcast``, its float16/bfloat16 parameters are stored in float32.
        """
        tuned = copy.deepcopy(self.original_module)
        if upcast:
            upcast_parameters(tuned)
        tuned.requires_grad_(False)
        self.ln_tuning_layers[adapter_name] = tuned
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` (it must not be merged); no-op if this layer lacks it."""
        if adapter_name not in self.ln_tuning_layers:
            return
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter '{adapter_name}' while it is merged; unmerge it first.")
        del self.ln_tuning_layers[adapter_name]
        self._active_adapter = [a for a in self._active_adapter if a != adapter_name]
        self._refresh()

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` active; their copies become trainable (unless ``inference_mode``)."""
        names = as_names(adapter_names)
        self._active_adapter = names
        for name in self.ln_tuning_layers:
            self.adapter_module(name).requires_grad_(name in names and not inference_mode)
        self.original_module.requires_grad_(False)
        self._select_forward()  # modules and dtypes are unchanged: the cached runners stay valid

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Toggle gradients of the named adapters' copies only (the original is never touched)."""
        names = as_names(adapter_names)
        for name in names:
            if name in self.ln_tuning_layers:
                self.adapter_module(name).requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled layers run the original module; the merge state and gradients are left alone."""
        self._disable_adapters = not enabled
        self._select_forward()

    # ---------------------------------------------------------------------------------- merge
    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Swap the adapter's copy in as ``base_layer``. ``safe_merge`` is accepted for PEFT parity.

        A layer without the adapter stays as it is. If another adapter is merged, it is unmerged first.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if len(names) > 1:
            raise ValueError(
                f"Trying to merge {len(names)} adapters ({names}), but LN tuning merges one adapter at a "
                "time; pass a single adapter name."
            )
        if not names or names[0] not in self.ln_tuning_layers or self.merged_adapters == names:
            return
        if self.merged_adapters:
            self.unmerge()
        self._swap(names[0])
        self.merged_adapters = names
        self._refresh()

    def unmerge(self) -> None:
        """Undo `merge`; no-op if nothing is merged."""
        if self.merged_adapters:
            self._swap(self.merged_adapters.pop())
            self._refresh()

    def _swap(self, adapter_name: str) -> None:
        tuned = self.ln_tuning_layers[adapter_name]
        self.ln_tuning_layers[adapter_name] = self.base_layer
        self.base_layer = tuned

    # ------------------------------------------------------------------------------- forward
    def set_batch_adapters(self, batch: BatchAdapters | None) -> None:
        """Route each sample of the next forwards through its own adapter (``None`` to stop)."""
        self._batch_adapters = batch
        self._select_forward()

    def _refresh(self) -> None:
        """Recompute the compute dtype and what forward calls, from the current state (see the module docstring)."""
        self._compute_dtype = float_dtype(self.original_module)
        self._runners.clear()
        self._select_forward()

    def _select_forward(self) -> None:
        module: nn.Module | None
        if self._disable_adapters:
            module = self.original_module
        elif self.merged_adapters:
            module = self.base_layer
        elif self._batch_adapters is not None or len(self._active_adapter) > 1:
            module = None
        elif self._active_adapter and self._active_adapter[0] in self.ln_tuning_layers:
            module = self.ln_tuning_layers[self._active_adapter[0]]
        else:
            module = self.base_layer
        fn: Callable
        if module is not None:
            fn = self.runner_for(module)
        elif self._batch_adapters is not None:
            fn = functools.partial(mixed_forward, self, self._batch_adapters)
        else:
            fn = self._raise_multiple_active
        # Not registered as a submodule: a plain attribute keeps state_dict and named_modules unchanged.
        # As an instance attribute ``forward``, nn.Module.__call__ reaches it without an extra frame.
        object.__setattr__(self, "_forward_fn", fn)
        object.__setattr__(self, "forward", fn)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the model computes in: that of the original module's parameters."""
        return self._compute_dtype

    def runner_for(self, module: nn.Module) -> Callable:
        """What runs ``module`` in `compute_dtype`: the module itself, or a `CastCall` for an upcast copy."""
        key = id(module)
        if key not in self._runners:
            self._runners[key] = runner(module, self._compute_dtype)
        return self._runners[key]

    def _raise_multiple_active(self, *args, **kwargs):
        raise ValueError(
            f"Trying to run forward with {len(self._active_adapter)} active adapters "
            f"({self._active_adapter}), but LN tuning runs one adapter at a time. Call "
            "set_adapter(name) to choose one, or pass adapter_names=[...] for one adapter per sample."
        )

    def forward(self, *args, **kwargs):
        return self._forward_fn(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # .to()/.half() change dtypes, and with them whether forward must cast: recompute it.
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self._refresh()

    def __repr__(self) -> str:
        return "ln_tuning." + super().__repr__()
