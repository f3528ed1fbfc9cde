"""`LNTuningModel`: injects `LNTuningLayer`s into a model and manages its adapters."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from lntune.config import LNTuningConfig
from lntune.layer import LNTuningLayer
from lntune.mixed_batch import BASE_ADAPTER_NAME, BatchAdapters, first_tensor
from lntune.modules_to_save import ModulesToSaveWrapper
from lntune.precision import float_dtype
from lntune.targets import (
    TARGET_MODULES_BY_MODEL_TYPE,
    closest_names,
    compact_target_list,
    detect_norm_layers,
    name_matches,
)
from lntune.wrapper import AdapterWrapper, as_names, named_wrappers, walk_modules

logger = logging.getLogger(__name__)

# Public names of PEFT's PeftModel (and of its tuner, which PeftModel forwards to) that lntune does not
# implement. Without this list, PeftModel.__getattr__ and LNTuningModel.__getattr__ would hand them on to
# the base model, which may have a method of the same name doing something else; tests/test_peft_api.py
# keeps the list complete.
NOT_IN_LNTUNE = {
    "get_prompt": "prompt learning only; LN tuning adds no virtual tokens",
    "get_prompt_embedding_to_save": "prompt learning only; LN tuning adds no virtual tokens",
    "get_model_config": "a helper of PEFT's BaseTuner; read model.config (Transformers) instead",
    "uses_shared_state": "an attribute of PEFT's BaseTuner for methods with state shared across layers; LN tuning "
    "has none",
}


def _split_name(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


class LNTuningModel(nn.Module):
    """The tuner: wraps the target modules of ``model`` in `LNTuningLayer`s, in place.

    Args:
        model: The model to adapt (modified in place).
        config: An `LNTuningConfig`, or a dict ``{adapter_name: config}``.
        adapter_name: Name of the first adapter.
        autocast_adapter_dtype: Keep adapter copies in float32 when the model is in float16/bfloat16,
            so that small updates are not rounded away (outputs keep the model's dtype).
        low_cpu_mem_usage: Accepted for PEFT compatibility; copies are always materialised.

    Example:
        >>> tuner = LNTuningModel(model, LNTuningConfig(target_modules=["norm"]), "default")
        >>> tuner.targeted_module_names
        ['model.norm']
    """

    prefix = "ln_tuning_"
    tuner_layer_cls = LNTuningLayer
    target_module_mapping = TARGET_MODULES_BY_MODEL_TYPE

    def __init__(
        self,
        model: nn.Module,
        config: LNTuningConfig | dict[str, LNTuningConfig],
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.training = model.training
        self.peft_config: dict[str, LNTuningConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.targeted_module_names: list[str] = []
        self._wrappers: list[tuple[str, AdapterWrapper]] = []
        self._rescan()
        if isinstance(config, dict):
            config = config[adapter_name]
        self.inject_adapter(self.model, adapter_name, config, autocast_adapter_dtype)

    # ------------------------------------------------------------------------------ helpers
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not yet set (e.g. during unpickling)
                raise
            if name in NOT_IN_LNTUNE:
                raise AttributeError(
                    f"'{type(self).__name__}' has no attribute '{name}': PEFT's {name} is not part of lntune "
                    f"({NOT_IN_LNTUNE[name]})."
                ) from None
            return getattr(self.model, name)

    @property
    def active_adapters(self) -> list[str]:
        return as_names(self.active_adapter)

    def tuner_modules(self) -> list[tuple[str, AdapterWrapper]]:
        """``(name, wrapper)`` for every `LNTuningLayer` and `ModulesToSaveWrapper` in the model.

        The list is kept, not re-walked: it is rebuilt after every change lntune makes to the model's
        structure (adding, deleting or unloading adapters).
        """
        return self._wrappers

    def _rescan(self) -> None:
        """Rebuild the kept list of wrappers (a walk that never enters a wrapper's copies)."""
        self._wrappers = named_wrappers(self.model)
        self.targeted_module_names = [n for n, m in self._wrappers if isinstance(m, LNTuningLayer)]

    def _ln_layers(self) -> list[LNTuningLayer]:
        return [m for _, m in self._wrappers if isinstance(m, LNTuningLayer)]

    def _candidate_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules that can be targeted: everything except the internals of our wrappers."""
        return [(name, module) for name, module in walk_modules(self.model) if name]

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self._ln_layers())

    # ---------------------------------------------------------------------------- targeting
    def _prepare_adapter_config(self, config: LNTuningConfig, candidates: list[tuple[str, nn.Module]]) -> None:
        """Fill ``config.target_modules`` when it is None: the model type's default, else norm detection."""
        if config.target_modules is not None:
            return
        names = [name for name, _ in candidates]
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        default = self.target_module_mapping.get(model_type)
        if default and any(name_matches(n, default) for n in names):
            config.target_modules = list(default)
            logger.info("lntune: default target_modules for model_type %r: %s", model_type, default)
            return
        detected = [n for n, m in candidates if not isinstance(m, ModulesToSaveWrapper)]
        detected = [n for n in detect_norm_layers(self.model) if n in set(detected)]
        if not detected:
            raise ValueError(
                f"Please specify `target_modules` in `peft_config`: model_type {model_type!r} has no "
                "default and no normalization layer (LayerNorm, RMSNorm, GroupNorm, *Norm) was found in "
                "the model."
            )
        config.target_modules = compact_target_list(self.model, detected)
        warnings.warn(
            f"lntune: no default target_modules for model_type {model_type!r}; tuning the {len(detected)} "
            f"normalization layers found by type: target_modules={config.target_modules}. Pass "
            "target_modules to choose others.",
            stacklevel=3,
        )

    def _find_targets(
        self, config: LNTuningConfig, candidates: list[tuple[str, nn.Module]]
    ) -> tuple[list[str], list[str]]:
        """Names to wrap as LN tuning layers and as modules_to_save; raises if nothing matches."""
        save_names = [
            n
            for n, m in candidates
            if config.modules_to_save and name_matches(n, config.modules_to_save) and not isinstance(m, LNTuningLayer)
        ]
        matched = [n for n, _ in candidates if name_matches(n, config.target_modules)]
        # Never wrap a module inside another target or inside a module_to_save.
        targets, inside = [], tuple(n + "." for n in save_names)
        for name in matched:
            excluded = name_matches(name, config.exclude_modules) or name in save_names
            if excluded or (inside and name.startswith(inside)):
                continue
            targets.append(name)
            inside = (*inside, name + ".")
        if not targets:
            all_names = [n for n, _ in candidates]
            if not matched:
                wanted = as_names(config.target_modules)
                raise ValueError(
                    f"Target modules {config.target_modules} not found in the base model. Closest module "
                    f"names: {closest_names(wanted, all_names)}. Please check the target modules and try "
                    "again."
                )
            raise ValueError(
                f"No modules were targeted for adaptation: all {len(matched)} modules matching "
                f"target_modules={config.target_modules} are excluded by exclude_modules or listed in "
                "modules_to_save."
            )
        if config.modules_to_save and not save_names:
            raise ValueError(
                f"modules_to_save={config.modules_to_save} matches no module of the model. Closest module "
                f"names: {closest_names(config.modules_to_save, [n for n, _ in candidates])}."
            )
        wrapped = {n: m for n, m in candidates if isinstance(m, AdapterWrapper)}
        for name in (*targets, *save_names):
            inner = [w for w in (*wrapped, *save_names) if w.startswith(name + ".")]
            inner += [name] if isinstance(wrapped.get(name), ModulesToSaveWrapper) and name in targets else []
            if inner:
                raise ValueError(
                    f"Cannot tune '{name}': it is or contains {inner[:3]}, already wrapped by an adapter or listed "
                    "in modules_to_save, and lntune does not nest adapters. Choose target_modules and "
                    "modules_to_save that do not contain each other's modules."
                )
        return targets, save_names

    # ---------------------------------------------------------------------------- injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        config: LNTuningConfig,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add ``adapter_name``: wrap (or extend) every target and modules_to_save entry.

        All checks run before the model is changed, so a bad config leaves it untouched.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists; choose another name.")
        if any(m.has_adapter(adapter_name) for _, m in self.tuner_modules()):
            raise ValueError(
                f"The model already has an adapter '{adapter_name}' (from an earlier get_peft_model or "
                "inject_adapter_in_model); use another adapter_name, add_adapter() on the existing PeftModel, or "
                "unload() it first."
            )
        if not isinstance(config, LNTuningConfig):
            raise TypeError(f"Expected an LNTuningConfig, got {type(config).__name__}.")
        if adapter_name == BASE_ADAPTER_NAME or not adapter_name or "." in adapter_name:
            raise ValueError(
                f"Invalid adapter name {adapter_name!r}: use a non-empty name without '.' other than "
                f"'{BASE_ADAPTER_NAME}'."
            )
        candidates = self._candidate_modules()
        self._prepare_adapter_config(config, candidates)
        targets, save_names = self._find_targets(config, candidates)

        existing = [m for _, m in self.tuner_modules()]
        disabled = bool(existing) and all(m.disable_adapters for m in existing)
        with self._all_or_nothing(adapter_name):
            if not self.peft_config:
                model.requires_grad_(False)  # first adapter: only adapter copies will train
            self.peft_config[adapter_name] = config
            modules = dict(candidates)
            for name in targets:
                parent_name, child = _split_name(name)
                parent = model.get_submodule(parent_name)
                self._create_and_replace(config, adapter_name, modules[name], child, parent, name)
            for name in save_names:
                module = modules[name]
                if isinstance(module, ModulesToSaveWrapper):
                    module.update_layer(adapter_name)
                else:
                    parent_name, child = _split_name(name)
                    wrapper = ModulesToSaveWrapper(module, adapter_name)
                    wrapper.set_adapter(self.active_adapters, inference_mode=True)
                    setattr(model.get_submodule(parent_name), child, wrapper)
            self._rescan()
            self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
            if disabled:  # new wrappers follow disable_adapter_layers() / disable_adapter() too
                for module in self._holders(adapter_name):
                    module.enable_adapters(False)
            # The new adapter trains only if active and not in inference mode; other adapters keep their state.
            trainable = adapter_name in self.active_adapters and not config.inference_mode
            for module in self._holders(adapter_name):
                module.set_requires_grad(adapter_name, trainable)

    def _holders(self, adapter_name: str) -> list[AdapterWrapper]:
        """The wrappers that hold a copy of ``adapter_name``."""
        return [m for _, m in self._wrappers if m.has_adapter(adapter_name)]

    @contextmanager
    def _all_or_nothing(self, adapter_name: str) -> Iterator[None]:
        """Undo everything adding ``adapter_name`` did (wrappers, copies, flags, config) if the body raises."""
        try:
            with restore_on_error(self.model, adapter_name):
                yield
        except BaseException:
            self.peft_config.pop(adapter_name, None)
            self._rescan()
            raise

    def _create_and_replace(
        self,
        peft_config: LNTuningConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        """Add the adapter to ``target``: extend an existing wrapper, or replace it by a new one."""
        if isinstance(target, LNTuningLayer):
            target.update_layer(adapter_name)
            return
        new_module = self._create_new_module(peft_config, adapter_name, target)
        setattr(parent, target_name, new_module)

    def _create_new_module(self, peft_config: LNTuningConfig, adapter_name: str, target: nn.Module) -> LNTuningLayer:
        """A new, frozen `LNTuningLayer` around ``target``, following the model's active adapters."""
        layer = self.tuner_layer_cls(target, adapter_name)
        layer.set_adapter(self.active_adapters, inference_mode=True)
        return layer

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """With ``autocast_adapter_dtype``, keep the adapter's parameters in float32 (now and after casts).

        PEFT leaves LN copies in the model's dtype, where AdamW updates of ~1e-4 round away next to
        weights of ~1.0. Forward casts the parameters back to the model's dtype (`lntune.precision`).
        Covers the LN copies and the modules_to_save copies; a later ``model.to(torch.bfloat16)`` or
        ``.half()`` leaves them in float32.
        """
        if not autocast_adapter_dtype:
            return
        for module in self._holders(adapter_name):
            module.keep_in_float32(adapter_name)

    # ----------------------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name: str, config: LNTuningConfig, autocast_adapter_dtype: bool = True) -> None:
        """Add a new, inactive adapter (a fresh copy of the original modules, even while merged)."""
        self.inject_adapter(self.model, adapter_name, config, autocast_adapter_dtype)

    def add_adapters(
        self,
        adapter_names: Sequence[str],
        config: LNTuningConfig,
        autocast_adapter_dtype: bool = True,
        each: Callable[[str], None] | None = None,
    ) -> None:
        """Add many new, inactive adapters with one config (each gets its own copy of ``config``), all or none.

        The first is added as `add_adapter` does; the others reuse its targets, so each costs a copy of the
        tuned modules and nothing that grows with the adapters resident or added.

        Args:
            adapter_names: New, distinct names.
            config: Their `LNTuningConfig` (copied per adapter; not stored itself).
            autocast_adapter_dtype: Keep float16/bfloat16 copies in float32.
            each: Called with each name once its copies exist (inside the all-or-nothing block).

        Raises:
            ValueError: a name is repeated, exists or is invalid (nothing added).

        Example:
            >>> tuner.add_adapters([f"customer-{i}" for i in range(1000)], LNTuningConfig(task_type="SEQ_CLS"))
        """
        names = list(adapter_names)
        if isinstance(adapter_names, str):
            raise TypeError("add_adapters takes a list of adapter names; use add_adapter for one.")
        repeated = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) < len(names) else []
        if repeated:
            raise ValueError(f"add_adapters: adapter names must be distinct; repeated: {repeated[:5]}.")
        for name in names:
            if not isinstance(name, str) or name == BASE_ADAPTER_NAME or not name or "." in name:
                raise ValueError(
                    f"Invalid adapter name {name!r}: use a non-empty name without '.' other than '{BASE_ADAPTER_NAME}'."
                )
            if name in self.peft_config:
                raise ValueError(f"Adapter with name '{name}' already exists; choose another name.")
        if not names:
            return
        template = copy.deepcopy(config)
        added: list[str] = []
        try:
            self.inject_adapter(self.model, names[0], template, autocast_adapter_dtype)
            added.append(names[0])
            if each is not None:
                each(names[0])
            holders = self._holders(names[0])
            disabled = all(m.disable_adapters for m in holders)
            for name in names[1:]:
                if any(m.has_adapter(name) for m in holders):
                    raise ValueError(f"The model already has an adapter '{name}'; use another adapter_name.")
                self.peft_config[name] = copy.deepcopy(template)
                added.append(name)
                for module in holders:
                    module.update_layer(name)  # a fresh, frozen copy of the original
                    if autocast_adapter_dtype:
                        module.keep_in_float32(name)
                    if disabled:
                        module.enable_adapters(False)
                if each is not None:
                    each(name)
            self.peft_config[names[0]] = template
        except BaseException:
            for name in reversed(added):
                self.peft_config.pop(name, None)
                for _, module in self._wrappers:
                    module.delete_adapter(name)
            self._drop_empty_wrappers()
            raise

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """Add ``adapter_name``, whose copies hold the weighted sum of the given adapters' parameters.

        Every floating parameter and buffer of each copy (and of each modules_to_save copy) becomes
        ``sum(w * adapter_tensor)``, computed in float32; other buffers come from the first adapter. The
        adapters must have copies of the same modules. The new adapter is added inactive, with the
        first adapter's config; `set_adapter` activates it.

        Args:
            adapters: Names of existing adapters.
            weights: One weight per adapter (``[0.5, 0.5]`` averages two adapters).
            adapter_name: Name of the new adapter.

        Example:
            >>> model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab")
            >>> model.set_adapter("ab")
        """
        adapters, weights = list(adapters), [float(w) for w in weights]
        if not adapters or len(adapters) != len(weights):
            raise ValueError(
                f"add_weighted_adapter needs one weight per adapter, got adapters={adapters} and weights={weights}."
            )
        self._check_adapters(adapters)
        for name, module in self.tuner_modules():
            lacking = [a for a in adapters if not module.has_adapter(a)]
            if lacking and len(lacking) < len(adapters):
                raise ValueError(
                    f"Cannot combine adapters {adapters}: module '{name}' has copies of "
                    f"{[a for a in adapters if a not in lacking]} but not of {lacking}. Combine adapters that "
                    "tune the same modules."
                )
        heads = [m for m in self._holders(adapters[0]) if isinstance(m, ModulesToSaveWrapper)]
        for head in heads:
            sizes = {a: head.head_size(a) for a in adapters}
            if len(set(sizes.values())) > 1:
                raise ValueError(
                    f"Cannot combine adapters {adapters}: their heads have different sizes {sizes}; combine adapters "
                    "with the same number of classes."
                )
        self.inject_adapter(self.model, adapter_name, copy.deepcopy(self.peft_config[adapters[0]]))
        for head in heads:
            if adapters[0] in head.resized_heads():
                head.set_head_size(adapter_name, head.head_size(adapters[0]))
        with torch.no_grad():
            for module in self._holders(adapter_name):
                target = module.tuned_module(adapter_name)
                states = [module.tuned_module(a).state_dict() for a in adapters]
                for key, tensor in target.state_dict(keep_vars=True).items():
                    if tensor.is_floating_point():
                        tensor.copy_(sum(w * state[key].float() for w, state in zip(weights, states)))
                    else:
                        tensor.copy_(states[0][key])

    def _check_adapters(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found. Existing adapters: {sorted(self.peft_config)}.")

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool | None = None) -> None:
        """Activate ``adapter_name`` (or several, for bookkeeping): only its copies become trainable.

        ``inference_mode=None`` takes each adapter's own ``config.inference_mode``.
        """
        names = as_names(adapter_name)
        self._check_adapters(names)
        modules = [module for _, module in self.tuner_modules()]
        for module in modules:  # refuse before any layer changes
            module._active_names(names)
        if any(m.merged for m in modules):
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            self.unmerge_adapter()
        if inference_mode is None:
            inference_mode = any(self.peft_config[n].inference_mode for n in names)
        for module in modules:
            module.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = names[0] if len(names) == 1 else names

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Toggle gradients of the named adapters' copies, merged or not; base weights stay frozen."""
        names = as_names(adapter_names)
        self._check_adapters(names)
        for _, module in self.tuner_modules():
            module.set_requires_grad(names, requires_grad)

    def delete_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Remove adapters and their copies; if the active one goes, another remaining one becomes active."""
        names = as_names(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]} does not exist. Existing adapters: {sorted(self.peft_config)}.")
        merged = sorted({n for layer in self._ln_layers() for n in layer.merged_adapters if n in names})
        if merged:
            raise ValueError(
                f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first. "
                "Call unmerge_adapter(), then delete."
            )
        for name in names:
            del self.peft_config[name]
            for module in self._holders(name):
                module.delete_adapter(name)
        remaining = [n for n in self.active_adapters if n not in names]
        if not remaining and set(names) & set(self.active_adapters) and self.peft_config:
            new_active = next(iter(self.peft_config))
            warnings.warn(
                f"Adapter {names} was active which is now deleted. Setting active adapter to {new_active}.",
                stacklevel=2,
            )
            remaining = [new_active]
        if remaining and remaining != self.active_adapters:  # an inactive adapter's removal keeps merge and grads
            self.set_adapter(remaining)
        elif not remaining:
            self.active_adapter = []
            for _, module in self.tuner_modules():
                module.set_adapter([])
        self._drop_empty_wrappers()

    def _drop_empty_wrappers(self) -> None:
        """Put back the plain module where no adapter is left on a wrapper."""
        empty = [(name, module) for name, module in self._wrappers if module.adapter_count() == 0]
        for name, module in empty:
            parent_name, child = _split_name(name)
            setattr(self.model.get_submodule(parent_name), child, module.original_module)
        if empty:
            self._rescan()

    def enable_adapter_layers(self) -> None:
        """Re-enable the adapters (gradients follow the active adapter's inference_mode)."""
        for _, module in self.tuner_modules():
            module.enable_adapters(True)
        if self.active_adapters:
            inference = any(self.peft_config[n].inference_mode for n in self.active_adapters)
            for _, module in self.tuner_modules():
                module.set_adapter(self.active_adapters, inference_mode=inference)

    def disable_adapter_layers(self) -> None:
        """Run the original modules everywhere (merged or not); no copy receives gradients."""
        for _, module in self.tuner_modules():
            module.enable_adapters(False)
            module._set_trainable(set())

    @contextmanager
    def disable_adapter(self):
        """Context in which the model behaves as the base model; the previous state (merged, grads) returns."""
        before = {id(m): (not m.disable_adapters, m.trainable_adapters()) for _, m in self.tuner_modules()}
        active = self.active_adapters
        self.disable_adapter_layers()
        try:
            yield
        finally:
            for _, module in self.tuner_modules():
                enabled, trainable = before.get(id(module), (True, None))
                module.enable_adapters(enabled)
                if trainable is not None and self.active_adapters == active:
                    module._set_trainable({n for n in trainable if module.has_adapter(n)})
            if self.active_adapters != active and self.active_adapters:
                self.set_adapter(self.active_adapters)  # set_adapter inside the context: gradients follow it

    @contextmanager
    def batch_adapters(
        self, adapter_names: Sequence[str] | None, rows: int | None = None, token_index: torch.Tensor | None = None
    ) -> Iterator[BatchAdapters | None]:
        """Context in which sample ``i`` of every forward runs ``adapter_names[i]`` (``"__base__"``: none), or,
        with ``token_index``, token ``t`` runs ``adapter_names[token_index[t]]``.

        Every check of a mixed batch is made here, before any forward: one name per sample (``rows``, when
        known), known adapters, nothing merged, no gradient checkpointing while training.

        Args:
            adapter_names: One adapter name per sample (or per packed sequence, with ``token_index``), or None
                (the active adapter for all).
            rows: The batch's number of samples (dimension 0 of its first tensor input), if known.
            token_index: Per token (batch and sequence dimensions, flattened): an index into ``adapter_names``.

        Returns:
            A context yielding the `BatchAdapters` set on the wrappers (None without ``adapter_names``); its
            ``update`` changes what the next forwards run without touching the wrappers.

        Example:
            >>> with tuner.batch_adapters(["a", "b"], token_index=torch.tensor([[0, 0, 0, 1, 1]])):
            ...     tuner(input_ids=packed_ids, position_ids=positions)
        """
        if adapter_names is None:
            yield None
            return
        if token_index is None:
            batch = BatchAdapters.from_names(adapter_names, rows)
        else:
            batch = BatchAdapters.from_token_index(adapter_names, token_index)
        self._check_adapters([n for n in batch.names if n != BASE_ADAPTER_NAME])
        modules = [m for _, m in self.tuner_modules()]
        if any(m.merged for m in modules):
            raise ValueError("Cannot use adapter_names while an adapter is merged; call unmerge_adapter() first.")
        if self.model.training and torch.is_grad_enabled() and self._checkpointing():
            raise ValueError(
                "Cannot train with adapter_names while gradient checkpointing is on: backward recomputes the "
                "forward after the mixed batch has ended. Call gradient_checkpointing_disable(), or train one "
                "adapter per batch."
            )
        for module in modules:
            module.set_batch_adapters(batch)
        try:
            yield batch
        finally:
            for module in modules:
                module.set_batch_adapters(None)

    def _checkpointing(self) -> bool:
        """Whether the model uses gradient checkpointing (Transformers walks every module to tell)."""
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)  # Transformers 5
        if checkpointing is None:
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        return bool(checkpointing)

    # -------------------------------------------------------------------------------- merge
    def _merge_target(self, adapter_names: Sequence[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self._check_adapters(names)
        if len(names) > 1:
            raise ValueError(
                f"Trying to merge {len(names)} adapters ({names}), but LN tuning does not allow merging more "
                "than one adapter at a time. Pass adapter_names=[name]."
            )
        return names

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Swap the adapter's copies in as the base modules (undo with `unmerge_adapter`)."""
        names = self._merge_target(adapter_names)
        layers = self._ln_layers()
        if not names:
            return
        if layers and all(layer.merged_adapters == names for layer in layers if names[0] in layer.ln_tuning_layers):
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        current = {n for layer in layers for n in layer.merged_adapters}
        if current - set(names):
            warnings.warn(f"Already merged with {sorted(current)}. Unmerging first.", stacklevel=2)
            self.unmerge_adapter()
        for layer in layers:
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter`."""
        layers = self._ln_layers()
        if not any(layer.merged for layer in layers):
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        for layer in layers:
            layer.unmerge()

    def _unloading_checks(self, adapter_names: Sequence[str] | None) -> None:
        names = list(self.peft_config) if adapter_names is None else list(adapter_names)
        with_save = [n for n in names if self.peft_config[n].modules_to_save]
        if len(with_save) > 1:
            raise ValueError(
                f"Cannot unload multiple adapters that specify `modules_to_save` ({with_save}); delete all but "
                "one of them first."
            )

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
    ) -> nn.Module:
        """Replace every wrapper by a plain module and return the model.

        With ``merge``, each place gets the chosen adapter's tuned module (the merged adapter, else the
        active one; the original where a layer lacks it); without, the original module.
        """
        if merge:
            merged = [n for layer in self._ln_layers() for n in layer.merged_adapters]
            names = self._merge_target(adapter_names if adapter_names is not None else (merged[:1] or None))
            self._unloading_checks(names)
        else:
            names = []
        wrappers = list(self.tuner_modules())
        sizes = {m.resized_heads().get(names[0]) for _, m in wrappers if names and isinstance(m, ModulesToSaveWrapper)}
        sizes.discard(None)
        desc = "Unloading " + ("and merging " if merge else "") + "model"
        for name, module in tqdm(wrappers, disable=not progressbar, desc=desc):
            if merge and names:
                replacement = module.module_for(names[0])
            else:
                replacement = module.original_module
            dtype = float_dtype(module.original_module)
            if dtype is not None:
                replacement = replacement.to(dtype)
            parent_name, child = _split_name(name)
            setattr(self.model.get_submodule(parent_name), child, replacement)
        self.peft_config = {}
        self._rescan()
        if len(sizes) == 1:  # the merged head has its own number of classes: the model's config follows it
            (size,) = sizes
            config = getattr(self.model, "config", None)
            if config is not None and getattr(config, "num_labels", size) != size:
                config.num_labels = size
            if isinstance(getattr(self.model, "num_labels", None), int):
                self.model.num_labels = size
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The plain model with the adapter's tuned modules in place (no lntune module left)."""
        return self._unload_and_optionally_merge(True, progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """The plain model with the original modules back (no lntune module left)."""
        return self._unload_and_optionally_merge(merge=False)

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        *args,
        adapter_names: Sequence[str] | None = None,
        adapter_token_index: torch.Tensor | None = None,
        **kwargs,
    ):
        """The model's forward; ``adapter_names[i]`` picks sample ``i``'s adapter (``"__base__"``: none).

        With ``adapter_token_index`` (an integer tensor of the inputs' batch x sequence shape), token ``t``
        runs ``adapter_names[adapter_token_index[t]]``: packed sequences (``DataCollatorWithFlattening``) each
        with their own adapter.
        """
        if kwargs.get("labels") is not None:
            self._check_model_loss(self.active_adapters if adapter_names is None else adapter_names)
        if adapter_names is None:
            return self.model(*args, **kwargs)
        x = first_tensor(args, kwargs)
        if adapter_token_index is not None and (x.dim() < 2 or adapter_token_index.numel() != x.shape[0] * x.shape[1]):
            raise ValueError(
                f"adapter_token_index has {adapter_token_index.numel()} entries, but the inputs have shape "
                f"{tuple(x.shape)}: pass one entry per token (batch x sequence)."
            )
        with self.batch_adapters(adapter_names, x.shape[0], adapter_token_index):
            return self.model(*args, **kwargs)

    def _check_model_loss(self, adapter_names: Sequence[str]) -> None:
        """Refuse ``labels`` when one of ``adapter_names`` has a head of its own size: the model's own loss
        reshapes the logits by ``config.num_labels`` and would be wrong."""
        for _, module in self._wrappers:
            if not isinstance(module, ModulesToSaveWrapper) or not module.resized_heads():
                continue
            resized = module.resized_heads()
            name = next((n for n in adapter_names if n in resized), None)
            if name is not None:
                expected = getattr(getattr(self.model, "config", None), "num_labels", None)
                raise ValueError(
                    f"Adapter '{name}' has a head of {resized[name]} classes, but the model's own loss assumes "
                    f"config.num_labels={expected}: call the model without labels and compute the loss from the "
                    "logits (lntune.adapter_cross_entropy computes each sample's over its own adapter's classes)."
                )

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The model's ``generate``, optionally with one adapter per sample (``adapter_names``)."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.batch_adapters(adapter_names, first_tensor(args, kwargs).shape[0]):
            return self.model.generate(*args, **kwargs)


def tuner_of(model: nn.Module) -> LNTuningModel | None:
    """The `LNTuningModel` that manages ``model``'s adapters, whatever lntune object ``model`` is.

    Args:
        model: A `PeftModel` (its tuner is its ``base_model``), an `LNTuningModel` (itself), or any other
            module, such as a model given to ``inject_adapter_in_model`` (no tuner: None).

    Returns:
        The tuner, or None.

    Example:
        >>> tuner_of(get_peft_model(model, LNTuningConfig())).targeted_module_names[:1]
        ['model.layers.0.input_layernorm']
    """
    if isinstance(model, LNTuningModel):
        return model
    held = model._modules.get("base_model") if isinstance(model, nn.Module) else None
    return held if isinstance(held, LNTuningModel) else None


def _base_parameters(root: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``root`` outside adapter copies (a wrapper contributes its original module's)."""
    for _, module in walk_modules(root):
        if isinstance(module, AdapterWrapper):
            yield from module.original_module.parameters()
        else:
            yield from (p for p in module._parameters.values() if p is not None)


@contextmanager
def restore_on_error(root: nn.Module, adapter_name: str) -> Iterator[None]:
    """Undo whatever adding ``adapter_name`` to ``root`` did, if the body raises (any exception).

    Wrappers created in the body are replaced by the modules they wrap, wrappers that existed before
    lose their ``adapter_name`` copy (if any), and the base parameters get back their ``requires_grad``
    flags. Existing copies are never written by loading, so this restores ``root`` exactly. The cost
    does not depend on how many adapters ``root`` holds. An `LNTuningModel`'s own bookkeeping
    (``peft_config``, its list of wrappers) is the caller's to restore.

    Args:
        root: The model the adapter is added to (the base model, not the `PeftModel`).
        adapter_name: The adapter being added; ``ValueError`` (before anything runs) if ``root`` holds it.

    Example:
        >>> with restore_on_error(model, "new"):
        ...     LNTuningModel(model, config, "new")  # if this raises, model is as it was
    """
    wrappers = named_wrappers(root)
    holder = next((name for name, w in wrappers if w.has_adapter(adapter_name)), None)
    if holder is not None:
        raise ValueError(
            f"The model already holds adapter '{adapter_name}' (at '{holder}'); adding it again would overwrite "
            "it. Load under another name, or start from a fresh base model (or unload() first)."
        )
    existing = {id(w) for _, w in wrappers}
    grads = [(p, p.requires_grad) for p in _base_parameters(root)]
    try:
        yield
    except BaseException:
        for name, module in named_wrappers(root):
            if id(module) in existing:
                module.delete_adapter(adapter_name)
            else:
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, module.original_module)
        for param, flag in grads:
            param.requires_grad_(flag)
        raise
