"""`AdapterWrapper`: what `LNTuningLayer` and `ModulesToSaveWrapper` share.

A wrapper keeps a module's original in one slot (``base_layer`` / ``original_module``) and one
independent copy per adapter in a ``ModuleDict`` (``ln_tuning_layers`` / ``modules_to_save``). It
owns the adapter state (active adapters, enabled flag, which copies train, which stay float32) and
chooses, whenever that state changes, what forward runs; a call then runs the chosen module's
``forward`` directly (see `__call__`), at the cost of the bare module's call.

Every per-adapter operation here touches only the adapters it names: adding, deleting, activating or
freezing an adapter costs the same with 10 or 10,000 adapters resident.

Three accessors find modules, whatever a merge swapped:

* ``original_module``: the pristine module;
* ``tuned_module(name)``: the adapter's tuned copy (``KeyError`` if this wrapper lacks it);
* ``module_for(name)``: what runs for ``name``: its copy, or the original where there is none.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from lntune.fast_call import direct_call, select, watch, watched_setattr
from lntune.mixed_batch import BatchAdapters, first_tensor
from lntune.precision import LOW_PRECISION, float_dtype, runner, upcast_parameters


def as_names(names: str | Sequence[str]) -> list[str]:
    """``"a"`` -> ``["a"]``; any sequence of names -> a new list."""
    return [names] if isinstance(names, str) else list(names)


class AdapterWrapper(nn.Module):
    """Base class of the two wrappers: a module's original plus one copy per adapter.

    Subclasses name their two slots (``_base_slot`` and ``adapter_layer_names[0]``) and choose the
    module a plain forward runs (`_active_module`) and how a batch with one adapter per row runs
    (`_mixed_forward`); `_mixed_call` turns tokens into rows for per-token batches.

    Args:
        module: The module to wrap; it stays unchanged in the base slot.
        adapter_name: The first adapter; its copy is frozen until `set_adapter` makes it trainable.
    """

    #: PEFT's names: the attributes that hold per-adapter modules, and other per-adapter state (none).
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    #: The attribute that holds the original module (the merged copy, while merged).
    _base_slot: str = ""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        watch(self)
        setattr(self, self._base_slot, module)
        setattr(self, self.adapter_layer_names[0], nn.ModuleDict())
        self._active_adapter: list[str] = [adapter_name]
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._batch_adapters: BatchAdapters | None = None
        self._trainable: set[str] = set()  # adapters whose copies this wrapper made trainable
        self._float32: set[str] = set()  # adapters whose copies stay float32 through .to()/.half()
        self._runners: dict[int, Callable] = {}
        self._compute_dtype = float_dtype(module)
        self.update_layer(adapter_name)
        self._refresh()
        # Follow the wrapped module's train/eval mode (new modules default to train).
        self.training = self._copies.training = module.training

    # ----------------------------------------------------------------------------- state
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def _copies(self) -> nn.ModuleDict:
        return self._modules[self.adapter_layer_names[0]]

    # ------------------------------------------------------------------------- accessors
    @property
    def original_module(self) -> nn.Module:
        """The pristine module, wherever a merge put it."""
        if self.merged_adapters:
            return self._copies[self.merged_adapters[0]]
        return self._modules[self._base_slot]

    def tuned_module(self, adapter_name: str) -> nn.Module:
        """The tuned copy of ``adapter_name``, wherever a merge put it (``KeyError`` if this wrapper lacks it)."""
        if adapter_name in self.merged_adapters:
            return self._modules[self._base_slot]
        return self._copies[adapter_name]

    def module_for(self, adapter_name: str) -> nn.Module:
        """The module that runs for ``adapter_name``: its tuned copy, or the original where it has none."""
        if adapter_name in self.merged_adapters:
            return self._modules[self._base_slot]
        tuned = self._copies._modules.get(adapter_name)
        return self.original_module if tuned is None else tuned

    def has_adapter(self, adapter_name: str) -> bool:
        """Whether this wrapper holds a copy for ``adapter_name``."""
        return adapter_name in self._copies._modules

    def adapter_count(self) -> int:
        """How many adapters have a copy here."""
        return len(self._copies._modules)

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter with a copy here (PEFT's name)."""
        return list(self._copies._modules)

    # -------------------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str) -> None:
        """Add ``adapter_name`` as a fresh, frozen copy of the original module (never of a tuned one)."""
        tuned = copy.deepcopy(self.original_module)
        tuned.requires_grad_(False)
        self._copies[adapter_name] = tuned
        self._select_forward()

    def keep_in_float32(self, adapter_name: str) -> None:
        """Store ``adapter_name``'s float16/bfloat16 parameters in float32, now and after later casts.

        Forward still computes in the original module's dtype (see `lntune.precision`); ``.to(bf16)``,
        ``.half()`` and the like leave these parameters (and their gradients) in float32.
        """
        tuned = self.tuned_module(adapter_name)
        upcast_parameters(tuned)
        self._float32.add(adapter_name)
        self._runners.pop(id(tuned), None)  # its dtype changed: it may need a casting runner now
        self._select_forward()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` (it must not be merged); no-op if this wrapper lacks it."""
        if not self.has_adapter(adapter_name):
            return
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first. "
                "Call unmerge_adapter(), then delete."
            )
        self._runners.pop(id(self._copies[adapter_name]), None)
        del self._copies[adapter_name]
        self._trainable.discard(adapter_name)
        self._float32.discard(adapter_name)
        if adapter_name in self._active_adapter:
            self._active_adapter = [a for a in self._active_adapter if a != adapter_name]
        self._select_forward()

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` active; their copies (only) become trainable unless ``inference_mode``."""
        names = self._active_names(as_names(adapter_names))
        self._active_adapter = names
        self._set_trainable(set() if inference_mode else {n for n in names if self.has_adapter(n)})
        self.original_module.requires_grad_(False)
        self._select_forward()

    def _active_names(self, names: list[str]) -> list[str]:
        """What `set_adapter(names)` records as active here; subclasses refuse combinations they cannot run."""
        return names

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Toggle gradients of the named adapters' copies only (the original is never touched).

        Touches the named copies alone, so its cost does not grow with the adapters that train.
        """
        named = {n for n in as_names(adapter_names) if self.has_adapter(n)}
        for name in named:
            self.tuned_module(name).requires_grad_(requires_grad)
        self._trainable = self._trainable | named if requires_grad else self._trainable - named

    def trainable_adapters(self) -> set[str]:
        """The adapters whose copies train here (as set by `set_adapter` and `set_requires_grad`)."""
        return set(self._trainable)

    def _set_trainable(self, names: set[str]) -> None:
        """Exactly ``names`` train: touches those and the ones that trained before, not every adapter."""
        for name in self._trainable - names:
            self.tuned_module(name).requires_grad_(False)
        for name in names:
            self.tuned_module(name).requires_grad_(True)
        self._trainable = set(names)

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled wrappers run the original module; the merge state and gradients are left alone."""
        self._disable_adapters = not enabled
        self._select_forward()

    def set_batch_adapters(self, batch: BatchAdapters | None) -> None:
        """Route each sample of the next forwards through its own adapter (``None`` to stop)."""
        self._batch_adapters = batch
        self._select_forward()

    # --------------------------------------------------------------------------- forward
    def _active_module(self) -> nn.Module | None:
        """The module a plain forward runs now, or ``None`` if the active adapters cannot run together."""
        raise NotImplementedError

    def _mixed_forward(self, batch: BatchAdapters, modules: list[nn.Module], args: tuple, kwargs: dict):
        """Forward with one adapter per row (see `lntune.mixed_batch`): ``modules[batch.index[row]]`` runs each row."""
        raise NotImplementedError

    def _mixed_call(self, batch: BatchAdapters, *args, **kwargs):
        """A forward of ``batch``: one adapter per sample, or per token (rows are then the flattened tokens)."""
        modules = batch.modules_of(self)
        if all(m is modules[0] for m in modules):
            return self.runner_for(modules[0])(*args, **kwargs)
        if not batch.per_token:
            return self._mixed_forward(batch, modules, args, kwargs)
        x = first_tensor(args, kwargs)
        batch.check_tokens(x)
        if any(True for _ in self.original_module.children()):
            raise ValueError(
                f"A {type(self.original_module).__name__} module cannot follow per-token adapters: it is not a leaf "
                "module, so its tokens may interact (an attention block). Target leaf modules (norms, linear layers) "
                "for per-token adapters, or use one adapter per sample."
            )
        lead = tuple(x.shape[:2])
        rows = tuple(_tokens_as_rows(a, lead) for a in args)
        out = self._mixed_forward(batch, modules, rows, {k: _tokens_as_rows(v, lead) for k, v in kwargs.items()})
        return _rows_as_tokens(out, lead)

    def _refresh(self) -> None:
        """Recompute the compute dtype and what forward runs, after modules or dtypes changed."""
        self._compute_dtype = float_dtype(self.original_module)
        self._runners.clear()
        self._select_forward()

    def _select_forward(self) -> None:
        if self._disable_adapters:
            fn = self.runner_for(self.original_module)
        elif self._batch_adapters is not None:
            fn = functools.partial(self._mixed_call, self._batch_adapters)
        else:
            module = self._active_module()
            fn = self._raise_multiple_active if module is None else self.runner_for(module)
        select(self, fn)

    def forward(self, *args, **kwargs):
        """Run what the adapter state selected: the active copy, the original, a mixed batch's forward..."""
        run = self._selected_forward
        if run is None:  # a DataParallel replica's first call (see _replicate_for_data_parallel)
            self._select_forward()
            run = self._selected_forward
        return run(*args, **kwargs)

    def _replicate_for_data_parallel(self):
        # torch's replicate() swaps the replica's children for their replicas after this returns: the
        # replica selects what it runs at its first call, from its own children, not the original's.
        replica = super()._replicate_for_data_parallel()
        replica.__dict__["_runners"] = {}
        watch(replica)
        select(replica, None)
        return replica

    # The selected module's forward, called directly when nothing would observe the difference (hooks,
    # compile, tracing), and assignments that could change that watched: see lntune.fast_call, the one
    # module that knows what nn.Module.__call__ checks.
    __call__ = direct_call
    __setattr__ = watched_setattr

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the model computes in: that of the original module's parameters."""
        return self._compute_dtype

    def runner_for(self, module: nn.Module) -> Callable:
        """What runs ``module`` in `compute_dtype`: the module itself, or a `CastCall` for a float32 copy."""
        run = self._runners.get(id(module))
        if run is None:
            run = runner(module, self._compute_dtype)
            if run is not module:  # only casting runners are worth keeping
                self._runners[id(module)] = run
        return run

    def _raise_multiple_active(self, *args, **kwargs):
        raise ValueError(
            f"Trying to run forward with {len(self._active_adapter)} active adapters "
            f"({self._active_adapter}), but LN tuning does not allow inference with more than one adapter at a "
            "time. Call set_adapter(name) to choose one, or pass adapter_names=[...] for one adapter per sample."
        )

    # ---------------------------------------------------------------------- dtype, copies
    def train(self, mode: bool = True):
        """``nn.Module.train``, with the copies that are leaves set directly (the same result, without a call
        per copy: ``model.train()``, which Trainer makes at every step, visits every adapter's copies)."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        copies = self._copies
        for module in self._modules.values():
            if module is None:
                continue
            if module is not copies:
                module.train(mode)
                continue
            copies.training = mode
            for tuned in copies._modules.values():
                if tuned is None:
                    continue
                if tuned._modules or type(tuned).train is not nn.Module.train:
                    tuned.train(mode)
                else:
                    tuned.__dict__["training"] = mode  # what nn.Module.train does to a leaf
        return self

    def collect_parameters(self, out: list) -> None:
        """Append every parameter of this wrapper to ``out`` (as ``self.parameters()``, duplicates included, and
        ``None`` for a leaf copy's unset parameter such as ``bias=None``), leaf copies read directly."""
        copies = self._copies
        for module in self._modules.values():
            if module is None:
                continue
            if module is not copies:
                out.extend(module.parameters())
                continue
            for tuned in copies._modules.values():
                if tuned is None:
                    continue
                if tuned._modules:
                    out.extend(tuned.parameters())
                else:
                    out.extend(tuned._parameters.values())

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.bfloat16() cast every tensor; float32 adapters get their exact values back,
        # on the new device. Then what forward runs (and whether it casts) is recomputed.
        kept = []
        for name in self._float32:
            for sub in self.tuned_module(name).modules():
                for key, param in sub._parameters.items():
                    if param is not None and param.dtype == torch.float32:
                        grad = None if param.grad is None else param.grad.detach().clone()
                        kept.append((sub._parameters, key, param.detach().clone(), grad))
        out = super()._apply(fn, recurse)
        for params, key, value, grad in kept:
            param = params[key]
            if param.dtype in LOW_PRECISION:
                param.data = value.to(param.device)
                if grad is not None:
                    param.grad = grad.to(param.device)
        self._refresh()
        return out

    def __setstate__(self, state):
        if "_selected_forward" not in state:  # pickled by an lntune that kept a snapshot of it as `forward`
            state.pop("forward", None)
        super().__setstate__(state)
        watch(self)
        self._refresh()


def _tokens_as_rows(value, lead: tuple[int, int]):
    """A tensor whose first two dimensions are ``lead`` (batch, sequence) with them flattened into rows."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == lead:
        return value.reshape(-1, *value.shape[2:])
    return value


def _rows_as_tokens(value, lead: tuple[int, int]):
    """Undo `_tokens_as_rows` on an output (a tensor, or tensors in a tuple/list)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(*lead, *value.shape[1:])
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_as_tokens(v, lead) for v in value)
    return value


def walk_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for ``root`` and its submodules, without entering adapter wrappers.

    A wrapper is yielded but not its copies: the walk costs the same however many adapters are
    resident, unlike ``named_modules()``.

    Args:
        root: The module to walk.
        prefix: Prepended to every name (``root`` itself is yielded under it).

    Returns:
        An iterator over ``(name, module)`` pairs, in ``named_modules()`` order.

    Example:
        >>> [name for name, _ in walk_modules(nn.Sequential(nn.LayerNorm(4)))]
        ['', '0']
    """
    yield prefix, root
    if isinstance(root, AdapterWrapper):
        return
    for name, child in root._modules.items():
        if child is not None:
            yield from walk_modules(child, f"{prefix}.{name}" if prefix else name)


def named_wrappers(root: nn.Module) -> list[tuple[str, AdapterWrapper]]:
    """``(name, wrapper)`` for every adapter wrapper in ``root`` (see `walk_modules`)."""
    return [(name, module) for name, module in walk_modules(root) if isinstance(module, AdapterWrapper)]
