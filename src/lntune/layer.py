"""`LNTuningLayer`: a module wrapped with one tuned copy per adapter.

The original module stays as ``base_layer``; each adapter is an independent deep copy in
``ln_tuning_layers[name]``; forward runs the active adapter's copy. Merging swaps the active copy
into ``base_layer`` (and the original into the adapter's slot), so that unloading can hand back the
tuned module itself. The adapter state and the choice of what forward runs live in `AdapterWrapper`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lntune.mixed_batch import (
    BatchAdapters,
    affine_parameters,
    broadcasts_per_sample,
    first_tensor,
    grouped_forward,
    per_sample_affine,
    per_sample_norm,
)
from lntune.wrapper import AdapterWrapper


class LNTuningLayer(AdapterWrapper):
    """A target module together with its per-adapter tuned copies.

    Args:
        base_layer: The module to tune (a LayerNorm, RMSNorm, Linear, a whole block...). It is kept,
            unchanged, as ``base_layer``.
        adapter_name: The first adapter to create.

    Example:
        >>> layer = LNTuningLayer(torch.nn.LayerNorm(8), "default")
        >>> torch.equal(layer(torch.ones(2, 8)), layer.base_layer(torch.ones(2, 8)))
        True
    """

    adapter_layer_names = ("ln_tuning_layers",)
    _base_slot = "base_layer"

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__(base_layer, adapter_name)
        # PEFT exposes these on every tuner layer; None for modules without them (norms).
        self.in_features = getattr(base_layer, "in_features", None)
        self.out_features = getattr(base_layer, "out_features", None)

    # ---------------------------------------------------------------------------------- merge
    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Swap the adapter's copy in as ``base_layer``. ``safe_merge`` is accepted for PEFT parity.

        A layer without the adapter stays as it is. If another adapter is merged, it is unmerged first.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if len(names) > 1:
            raise ValueError(
                f"Trying to merge {len(names)} adapters ({names}), but LN tuning does not allow merging more "
                "than one adapter at a time; pass a single adapter name."
            )
        if not names or not self.has_adapter(names[0]) or self.merged_adapters == names:
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

    # -------------------------------------------------------------------------------- forward
    def _active_module(self) -> nn.Module | None:
        if self.merged_adapters:
            return self.base_layer
        if len(self._active_adapter) > 1:
            return None
        return self.module_for(self._active_adapter[0]) if self._active_adapter else self.base_layer

    @property
    def mixed_batch_path(self) -> str:
        """How a mixed-adapter batch runs this module: ``"per-sample"`` (normalised once, each sample's own
        weight and bias applied: norms) or ``"grouped"`` (run once per adapter of the batch, on its samples).

        Decided from the module's class (`lntune.mixed_batch.broadcasts_per_sample`), never from a batch.
        """
        module = self.original_module
        return "per-sample" if affine_parameters(module) and broadcasts_per_sample(module) else "grouped"

    def _mixed_forward(self, batch: BatchAdapters, modules: list[nn.Module], args: tuple, kwargs: dict):
        x = first_tensor(args, kwargs)
        index = batch.index_for(x)
        affine = per_sample_affine(self.original_module, args, kwargs)
        if affine is None:
            return grouped_forward([self.runner_for(m) for m in modules], index, args, kwargs)
        names, shape = affine
        view = (x.shape[0],) + (1,) * (x.dim() - 1 - len(shape)) + shape
        params = batch.per_sample_parameters(self, modules, dict.fromkeys(names, view), index, self.compute_dtype)
        return per_sample_norm(self.original_module, params, args, kwargs)

    def __repr__(self) -> str:
        return "ln_tuning." + super().__repr__()
