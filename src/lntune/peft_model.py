"""`PeftModel` and its task variants: the user-facing wrapper, with PEFT's methods and files."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from lntune.atomic import atomic_write_bytes
from lntune.checkpoint import (
    CheckpointError,
    IncompatibleKeys,
    adapter_weights_path,
    fill_adapter,
    get_peft_model_state_dict,
    read_adapter_weights,
    serialize_adapter_weights,
    write_adapter_weights,
)
from lntune.config import CONFIG_NAME, LNTuningConfig, TaskType
from lntune.hub import push_adapter_to_hub
from lntune.model import NOT_IN_LNTUNE, LNTuningModel, restore_on_error
from lntune.modules_to_save import ModulesToSaveWrapper, output_linear
from lntune.tasks import TASKS, Task
from lntune.wrapper import AdapterWrapper, walk_modules

if TYPE_CHECKING:
    from lntune.status import TunerLayerStatus, TunerModelStatus


def _base_model_id(model: nn.Module) -> str | None:
    """The Hub id or path the base model was loaded from (``config._name_or_path``), as PEFT's model card uses."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _make_inputs_require_grad(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (once), so reentrant checkpointing keeps the graph."""
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        embeddings = model.get_input_embeddings()
        model._require_grads_hook = embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_())


def _model_card(base_model: str | None) -> str:
    lines = ["---", "library_name: peft"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:", "- lntune", "- ln_tuning", "---", "", "# LN tuning adapter", ""]
    lines += [
        "Trained with lntune (LayerNorm tuning; not published on PyPI: install it from its source folder with",
        "`pip install -e .`): only the normalization layers are tuned.",
        "Load it with `lntune.PeftModel.from_pretrained(base_model, path)` or with PEFT's own",
        "`peft.PeftModel.from_pretrained`; the files follow PEFT's LN tuning format.",
        "",
    ]
    return "\n".join(lines)


def _gathered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with sharded DTensors (FSDP2) gathered in full: a collective, every rank must call it."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


class PeftModel(nn.Module):
    """A model with LN tuning adapters, with the API of ``peft.PeftModel``.

    Args:
        model: The base model; its target modules are wrapped in place.
        peft_config: The first adapter's `LNTuningConfig`.
        adapter_name: Name of the first adapter.
        autocast_adapter_dtype: Keep float16/bfloat16 adapters in float32 (see `LNTuningModel`).
        low_cpu_mem_usage: Accepted for PEFT compatibility.

    Example:
        >>> from lntune import get_peft_model, LNTuningConfig, TaskType
        >>> model = get_peft_model(base, LNTuningConfig(task_type=TaskType.CAUSAL_LM))
        >>> model.print_trainable_parameters()
        trainable params: 80 || all params: 6,816 || trainable%: 1.1737
    """

    # PEFT's flag for prompt-learning methods (PEFT's helpers and integrations read it).
    _is_prompt_learning = False

    def __init__(
        self,
        model: nn.Module,
        peft_config: LNTuningConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self._prepare_config(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        if peft_config.task_type is None and peft_config.auto_mapping is None:
            cls = type(model)
            peft_config.auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        self.base_model = LNTuningModel(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)
        self._autocast_adapter_dtype = autocast_adapter_dtype  # the default of add_adapter / load_adapter
        self.training = model.training
        # Checkpointing enabled before wrapping needs the fix of gradient_checkpointing_enable too.
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # Transformers 5; 4.x name below
        if checkpointing or (checkpointing is None and getattr(model, "is_gradient_checkpointing", False)):
            self._enable_input_require_grads()

    def _prepare_config(self, config: LNTuningConfig) -> None:
        """Hook for task variants (for example: add the classifier head to modules_to_save)."""

    @staticmethod
    def _add_modules_to_save(config: LNTuningConfig, names: Sequence[str]) -> None:
        current = list(config.modules_to_save or [])
        config.modules_to_save = current + [n for n in names if n not in current]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in NOT_IN_LNTUNE:
                raise AttributeError(
                    f"'{type(self).__name__}' has no attribute '{name}': PEFT's PeftModel.{name} is not part of "
                    f"lntune ({NOT_IN_LNTUNE[name]})."
                ) from None
            return getattr(self.base_model, name)

    # --------------------------------------------------------------------------- properties
    @property
    def peft_config(self) -> dict[str, LNTuningConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def peft_type(self) -> str:
        return "LN_TUNING"

    @property
    def active_peft_config(self) -> LNTuningConfig:
        """The config of the active adapter (PEFT's ``active_peft_config``)."""
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(
                f"active_peft_config needs exactly one active adapter, but the active adapters are {active}; "
                "call set_adapter(name) first."
            )
        return self.peft_config[active[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether an adapter is active and not disabled (by `disable_adapter` or ``disable_adapter_layers``)."""
        wrappers = [m for _, m in self.base_model.tuner_modules()]
        return bool(self.active_adapters) and any(not m.disable_adapters for m in wrappers)

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        """The base model's ``dtype`` attribute (Transformers models have one), else None."""
        return getattr(self.get_base_model(), "dtype", None)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False: LN tuning replaces modules instead of adding a low-rank delta, so it has no LoRA form."""
        return False

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {n for c in self.peft_config.values() for n in (c.modules_to_save or [])}
        return names or None

    def get_base_model(self) -> nn.Module:
        """The underlying model (containing the wrapped layers)."""
        return self.base_model.model

    # ------------------------------------------------------------------------------- status
    def get_layer_status(self) -> list[TunerLayerStatus]:
        """One `TunerLayerStatus` per wrapped module (see `lntune.status.get_layer_status`)."""
        from lntune.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The `TunerModelStatus` of the whole model (see `lntune.status.get_model_status`)."""
        from lntune.status import get_model_status

        return get_model_status(self)

    # ------------------------------------------------------------------------------- counts
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts; ``all`` includes the adapter copies, as in PEFT."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P``."""
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``nn.Module.zero_grad``, over the parameters found without walking every adapter copy module by
        module (Trainer calls it at every step; with 1,000 adapters the walk costs more than the rest)."""
        for param in _all_parameters(self):
            if param is None or param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                if param.grad.grad_fn is not None:
                    param.grad.detach_()
                else:
                    param.grad.requires_grad_(False)
                param.grad.zero_()

    # ----------------------------------------------------------------------------- adapters
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LNTuningConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool | None = None,
        num_labels: int | None = None,
    ) -> None:
        """Add an inactive, frozen adapter; `set_adapter` activates it.

        Args:
            adapter_name: A new adapter name.
            peft_config: Its `LNTuningConfig`.
            low_cpu_mem_usage: Accepted for PEFT compatibility.
            autocast_adapter_dtype: Keep float16/bfloat16 adapter copies in float32. ``None`` (default): as
                the model was created (`get_peft_model` / `from_pretrained`).
            num_labels: Classification models (``SEQ_CLS``, ``TOKEN_CLS``): the adapter's own number of
                classes. Its head copy gets that many outputs, newly initialised by the model's
                ``_init_weights`` (``None``: a copy of the model's head). See `add_adapters`.

        Example:
            >>> model.add_adapter("other", LNTuningConfig(target_modules=["norm"]))
            >>> model.set_adapter("other")
        """
        if num_labels is None:
            self._prepare_shared_config(peft_config)
            self.base_model.add_adapter(adapter_name, peft_config, self._autocast(autocast_adapter_dtype))
            return
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be a string, got {type(adapter_name).__name__}.")
        self.add_adapters(
            [adapter_name], peft_config, num_labels=[num_labels], autocast_adapter_dtype=autocast_adapter_dtype
        )
        vars(peft_config).update(vars(self.peft_config[adapter_name]))
        self.peft_config[adapter_name] = peft_config  # the caller's object, as add_adapter stores it

    def add_adapters(
        self,
        adapter_names: Sequence[str],
        peft_config: LNTuningConfig,
        num_labels: int | Sequence[int] | None = None,
        autocast_adapter_dtype: bool | None = None,
    ) -> None:
        """Add many inactive, frozen adapters at once, each with its own copy of ``peft_config``, all or none.

        Each adapter costs a copy of the tuned modules and nothing that grows with the adapters resident
        or added (``add_adapters`` of 1,000 names is 1,000 times one, not more).

        Args:
            adapter_names: New, distinct names.
            peft_config: The config every adapter gets a copy of.
            num_labels: Classification models (``SEQ_CLS``, ``TOKEN_CLS``): each adapter's number of classes,
                one number for all or one per name. An adapter whose number differs from the model's head
                gets a head of its own size, newly initialised by the model's ``_init_weights``; the others
                copy the model's head. ``None``: every adapter copies the model's head.
            autocast_adapter_dtype: Keep float16/bfloat16 copies in float32 (``None``: as the model was created).

        Raises:
            ValueError: a name is repeated, exists or is invalid; ``num_labels`` has the wrong length, a value
                below 1, or the model has no classifier head to size (nothing is added).

        Example:
            >>> names = [f"customer-{i}" for i in range(1000)]
            >>> model.add_adapters(names, LNTuningConfig(task_type="SEQ_CLS"), num_labels=[2, 5, 40] * 333 + [2])
            >>> model.set_requires_grad(names, True)  # train them all in mixed batches
        """
        names = list(adapter_names)
        sizes = self._head_sizes_for(names, num_labels)
        self._prepare_shared_config(peft_config)
        init = getattr(self.get_base_model(), "_init_weights", None)

        def size_heads(name: str) -> None:
            for head in self._head_wrappers(name):
                head.set_head_size(name, sizes[name], init=init)

        self.base_model.add_adapters(
            names, peft_config, self._autocast(autocast_adapter_dtype), each=size_heads if sizes else None
        )

    def _prepare_shared_config(self, peft_config: LNTuningConfig) -> None:
        self._prepare_config(peft_config)
        if peft_config.base_model_name_or_path is None and self.peft_config:
            first = next(iter(self.peft_config.values()))
            peft_config.base_model_name_or_path = first.base_model_name_or_path

    def _head_modules(self) -> tuple[str, ...]:
        """The module names of heads with one output per class (none here; the classification variants')."""
        return ()

    def _head_wrappers(self, adapter_name: str) -> list[ModulesToSaveWrapper]:
        """The classifier heads (`_head_modules`) that hold a copy of ``adapter_name``."""
        heads = set(self._head_modules())
        return [
            module
            for name, module in self.base_model.tuner_modules()
            if isinstance(module, ModulesToSaveWrapper)
            and name.rsplit(".", 1)[-1] in heads
            and module.has_adapter(adapter_name)
        ]

    def _head_sizes_for(self, names: list[str], num_labels: int | Sequence[int] | None) -> dict[str, int] | None:
        """``{name: classes}`` from ``num_labels`` (one for all, or one per name), checked; None for None."""
        if num_labels is None:
            return None
        if not self._head_modules():
            raise ValueError(
                f"num_labels needs a classification model (task_type SEQ_CLS or TOKEN_CLS) whose head has one output "
                f"per class; this is a {type(self).__name__}."
            )
        sizes = [num_labels] * len(names) if isinstance(num_labels, int) else list(num_labels)
        if len(sizes) != len(names):
            raise ValueError(f"num_labels has {len(sizes)} entries for {len(names)} adapters; give one per adapter.")
        wrong = [n for n in sizes if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if wrong:
            raise ValueError(f"num_labels must be whole numbers of at least 1, got {wrong[0]!r}.")
        return dict(zip(names, sizes))

    def _fit_heads(self, adapter_name: str, weights: dict[str, torch.Tensor]) -> None:
        """Give ``adapter_name``'s classifier heads the output size their saved weights have (the file's values
        are copied in afterwards, so they are not initialised). Inputs of another size are left for the
        checks of `fill_adapter` to refuse."""
        prefix = {id(m): f"base_model.model.{name}." for name, m in self.base_model.tuner_modules()}
        for head in self._head_wrappers(adapter_name):
            path, linear = output_linear(head.tuned_module(adapter_name))
            saved = weights.get(prefix[id(head)] + (f"{path}." if path else "") + "weight")
            if saved is not None and saved.dim() == 2 and saved.shape[1] == linear.in_features and saved.shape[0] > 0:
                head.set_head_size(adapter_name, int(saved.shape[0]))

    def _autocast(self, autocast_adapter_dtype: bool | None) -> bool:
        return self._autocast_adapter_dtype if autocast_adapter_dtype is None else autocast_adapter_dtype

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Activate one adapter; its copies (only) become trainable unless ``inference_mode``."""
        if not isinstance(adapter_name, str):
            raise TypeError("PeftModel.set_adapter takes one adapter name; use adapter_names=[...] per sample.")
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found. Existing adapters: {sorted(self.peft_config)}.")
        self.base_model.set_adapter(
            adapter_name, inference_mode=inference_mode or self.peft_config[adapter_name].inference_mode
        )

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    @contextmanager
    def disable_adapter(self):
        """Context manager: inside, the model is the base model; on exit, the previous state returns."""
        with self.base_model.disable_adapter():
            yield

    # ------------------------------------------------------------------------------ forward
    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """Run the model; ``adapter_names[i]`` picks sample ``i``'s adapter (``"__base__"``: none).

        ``adapter_token_index`` (a keyword argument) makes the choice per token instead: see
        `LNTuningModel.forward` (packed sequences, each with its own adapter).
        """
        return self.base_model(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """``generate`` of the underlying model, optionally with one adapter per sample."""
        return self.base_model.generate(*args, adapter_names=adapter_names, **kwargs)

    # ------------------------------------------------------------------ gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The base model's ``gradient_checkpointing_enable``, with gradients reaching checkpointed blocks.

        LN tuning freezes the embeddings, so the hidden states entering the first checkpointed block do
        not require grad; reentrant checkpointing (``use_reentrant=True``) then drops the graph and the
        norms inside the blocks get no gradient. As PEFT does, the input embeddings' output is made to
        require grad (``enable_input_require_grads``) unless the base model already did so.

        Args:
            gradient_checkpointing_kwargs: Passed to ``torch.utils.checkpoint.checkpoint``
                (for example ``{"use_reentrant": True}``).
            **kwargs: Other arguments of the base model's method (``every_n_layers``...).

        Example:
            >>> peft_model.gradient_checkpointing_enable({"use_reentrant": True})
        """
        self._checkpointing_base("gradient_checkpointing_enable").gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs
        )
        self._enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Transformers 5's name for `gradient_checkpointing_enable` (what ``Trainer`` calls); same fix."""
        self._checkpointing_base("activation_checkpointing_enable").activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs
        )
        self._enable_input_require_grads()

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make ``model``'s input embeddings' output require grad, as PEFT's method of that name does.

        Reentrant checkpointing needs it when the embeddings are frozen (see `gradient_checkpointing_enable`,
        which calls it for the base model). Uses ``model.enable_input_require_grads()`` when it exists, else a
        forward hook on ``model.get_input_embeddings()``; does nothing for models with neither, or twice.

        Args:
            model: Usually ``peft_model.get_base_model()``.

        Returns:
            ``model``.

        Example:
            >>> peft_model.prepare_model_for_gradient_checkpointing(peft_model.get_base_model())
        """
        _make_inputs_require_grad(model)
        return model

    def _checkpointing_base(self, method: str) -> nn.Module:
        base = self.get_base_model()
        if not hasattr(base, method):
            raise AttributeError(
                f"{type(base).__name__} has no {method}(): gradient checkpointing needs a Transformers model "
                "(or a model defining that method); wrap your blocks in torch.utils.checkpoint yourself otherwise."
            )
        return base

    def _enable_input_require_grads(self) -> None:
        _make_inputs_require_grad(self.get_base_model())

    # -------------------------------------------------------------------------------- files
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        **kwargs,
    ) -> None:
        """Write the adapters in PEFT's layout: ``default`` at the top, others in ``<dir>/<name>/``.

        Every adapter is serialized before any file is written, and each file is written to a
        temporary name and renamed, so a failed or interrupted save never damages the previous files.
        The tuned weights are saved even while merged (PEFT saves the originals then).

        Args:
            save_directory: The folder (created if needed).
            safe_serialization: ``adapter_model.safetensors`` (default) or ``adapter_model.bin``; the other
                format's stale file in the folder is removed once the new one is written.
            selected_adapters: Adapters to save (default: all).
            save_embedding_layers: Accepted for PEFT compatibility (the tuned copies are always saved).
            is_main_process: Only the main process writes (distributed training). Under FSDP2
                (``fully_shard``) call it on every rank: the sharded adapter is gathered collectively.
            **kwargs: Accepted for PEFT compatibility.

        Example:
            >>> model.save_pretrained("out")  # out/adapter_config.json, out/adapter_model.safetensors
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file; pass a folder.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"selected_adapters {unknown} do not exist. Existing adapters: {sorted(self.peft_config)}."
            )
        # FSDP2 shards parameters as DTensors: every rank takes part in gathering them, then only the main writes.
        states = {name: _gathered(get_peft_model_state_dict(self, adapter_name=name)) for name in names}
        if not is_main_process:
            return
        files = {name: serialize_adapter_weights(states[name], safe_serialization) for name in names}
        for name, (file_name, data) in files.items():
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(folder, exist_ok=True)
            write_adapter_weights(folder, file_name, data)
            # Saved adapters load frozen unless asked otherwise: the file says inference_mode, as PEFT's do.
            dataclasses.replace(self.peft_config[name], inference_mode=True).save_pretrained(folder)
        self.create_or_update_model_card(save_directory)

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Write ``README.md`` (the model card PEFT writes: ``library_name: peft``) into ``output_dir``.

        ``base_model`` is the Hub id or path the base model was loaded from (its ``config._name_or_path``),
        left out for custom models and models built from a config, as PEFT does. A ``README.md`` already
        in the folder is kept as it is (lntune does not rewrite files it did not write).

        Args:
            output_dir: The folder (created if needed).

        Example:
            >>> model.create_or_update_model_card("out")  # out/README.md
        """
        os.makedirs(output_dir, exist_ok=True)
        readme = os.path.join(output_dir, "README.md")
        if not os.path.exists(readme):
            atomic_write_bytes(readme, _model_card(_base_model_id(self.get_base_model())).encode("utf-8"))

    # Upload the adapter folder (never the base model) to the Hub; see lntune.hub.
    push_to_hub = push_adapter_to_hub

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LNTuningConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs,
    ) -> PeftModel:
        """Load a saved adapter (lntune's or PEFT's) onto ``model``.

        All-or-nothing: the config and weights are read and validated first; if anything is wrong or
        does not fit (or loading is interrupted), ``model`` is left exactly as it was and the error
        names the file and the key or field at fault.

        Args:
            model: The base model (modified in place on success).
            model_id: A local adapter folder.
            adapter_name: Name to load the adapter under (any name works, nested targets included).
            is_trainable: Keep the adapter trainable; otherwise it is frozen and the model is in eval mode.
            config: Use this config object (it becomes ``peft_config[adapter_name]``, with ``inference_mode``
                set from ``is_trainable``) instead of the folder's ``adapter_config.json``. If loading fails,
                its fields are restored.
            autocast_adapter_dtype: Keep float16/bfloat16 adapters in float32.
            low_cpu_mem_usage: Accepted for PEFT compatibility.
            **kwargs: ``subfolder`` is honoured; hub options (``revision``, ``token``...) are ignored.

        Returns:
            The task-specific `PeftModel`.

        Example:
            >>> model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), "out")
        """
        if any(isinstance(m, AdapterWrapper) for m in model.modules()):
            raise ValueError(
                "The model passed to from_pretrained already contains lntune adapters (it was given to "
                "get_peft_model or from_pretrained before). Call load_adapter on that PeftModel, or pass a "
                "fresh base model (or the result of unload())."
            )
        folder = _adapter_folder(model_id, kwargs.get("subfolder"))
        config_source = "the config argument" if config is not None else os.path.join(folder, CONFIG_NAME)
        if config is None:
            config = LNTuningConfig.from_pretrained(folder)
        elif not isinstance(config, LNTuningConfig):
            raise TypeError(f"config must be an LNTuningConfig, got {type(config).__name__}.")
        weights_path = adapter_weights_path(folder)
        weights = read_adapter_weights(weights_path)
        fields_before = copy.deepcopy(vars(config))
        model_cls = MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, PeftModel) if cls is PeftModel else cls
        try:
            config.inference_mode = not is_trainable
            with restore_on_error(model, adapter_name):
                with _naming_folder(folder, adapter_name, config_source):
                    peft_model = model_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
                peft_model._fit_heads(adapter_name, weights)
                fill_adapter(peft_model, weights, weights_path, adapter_name)
        except BaseException:
            vars(config).update(fields_before)  # the caller's config object is as it was, too
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool | None = None,
        low_cpu_mem_usage: bool = False,
        **kwargs,
    ) -> IncompatibleKeys:
        """Load a saved adapter as a new, inactive adapter ``adapter_name`` (all-or-nothing).

        On any error the existing adapters, the active adapter, the merge state and all gradients
        flags are exactly as before, and no part of ``adapter_name`` remains.

        Args:
            model_id: A local adapter folder (lntune's or PEFT's).
            adapter_name: A new name (loading under any name works, nested targets included).
            is_trainable: Make the loaded (still inactive) adapter's copies trainable, as PEFT does;
                otherwise they are frozen and the model is put in eval mode.
            torch_device: Accepted for PEFT compatibility (copies follow the model's device).
            autocast_adapter_dtype: Keep float16/bfloat16 adapters in float32. ``None`` (default): as the
                model was created.
            low_cpu_mem_usage: Accepted for PEFT compatibility.
            **kwargs: ``subfolder`` is honoured; hub options are ignored.

        Returns:
            ``IncompatibleKeys`` (always empty: any mismatch raises and changes nothing).

        Example:
            >>> model.load_adapter("out/other", adapter_name="other")
            >>> model.set_adapter("other")
        """
        if adapter_name in self.peft_config:
            raise ValueError(
                f"Adapter '{adapter_name}' already exists. Delete it first (delete_adapter), choose another "
                "name, or replace its weights in place with lntune.hotswap_adapter."
            )
        folder = _adapter_folder(model_id, kwargs.get("subfolder"))
        config = LNTuningConfig.from_pretrained(folder)
        weights_path = adapter_weights_path(folder)
        weights = read_adapter_weights(weights_path)
        config.inference_mode = not is_trainable
        with self.base_model._all_or_nothing(adapter_name):
            with _naming_folder(folder, adapter_name, os.path.join(folder, CONFIG_NAME)):
                self.base_model.add_adapter(adapter_name, config, self._autocast(autocast_adapter_dtype))
            self._fit_heads(adapter_name, weights)
            result = fill_adapter(self, weights, weights_path, adapter_name)
            if is_trainable:
                self.base_model.set_requires_grad(adapter_name, True)
        if not is_trainable and self.training:  # eval() visits every module: skip it when already in eval mode
            self.eval()
        return result


def _all_parameters(root: nn.Module) -> list:
    """Every parameter of ``root`` (as ``root.parameters()``, duplicates and some ``None`` included), adapter
    copies read by their wrappers (`AdapterWrapper.collect_parameters`)."""
    out: list = []
    for _, module in walk_modules(root):
        if isinstance(module, AdapterWrapper):
            module.collect_parameters(out)
        else:
            out.extend(module._parameters.values())
    return out


def _adapter_folder(model_id: str | os.PathLike, subfolder: str | None) -> str:
    folder = os.fspath(model_id)
    return os.path.join(folder, subfolder) if subfolder else folder


@contextmanager
def _naming_folder(folder: str, adapter_name: str, config_source: str):
    """Re-raise a config that does not fit the model (targets not found...) naming the folder and config."""
    try:
        yield
    except ValueError as exc:
        raise CheckpointError(
            f"Cannot load adapter {folder} as '{adapter_name}' (config: {config_source}): {exc}"
        ) from None


class _TaskPeftModel(PeftModel):
    """Base of the task variants: the task's head modules join ``modules_to_save``, and ``forward`` names the
    arguments Trainer looks for (``input_ids``, ``attention_mask``, ``inputs_embeds``, ``labels``)."""

    #: The variant's row of the task table (`lntune.tasks`).
    task: ClassVar[Task]

    def _prepare_config(self, config: LNTuningConfig) -> None:
        self._add_modules_to_save(config, self.task.head_modules)

    def _head_modules(self) -> tuple[str, ...]:
        return self.task.head_modules if self.task.label_head else ()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs,
    ):
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds}
        named.update({k: v for k, v in {"labels": labels}.items() if v is not None})
        return super().forward(adapter_names=adapter_names, **named, **kwargs)


def _prepare_inputs_for_generation(self, *args, **kwargs):
    """The base model's ``prepare_inputs_for_generation`` (PEFT's only differs for prompt learning)."""
    return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForCausalLM(_TaskPeftModel):
    """`PeftModel` for ``TaskType.CAUSAL_LM``."""

    task = TASKS["causal-lm"]
    prepare_inputs_for_generation = _prepare_inputs_for_generation


class PeftModelForSeq2SeqLM(_TaskPeftModel):
    """`PeftModel` for ``TaskType.SEQ_2_SEQ_LM``."""

    task = TASKS["seq2seq-lm"]
    prepare_inputs_for_generation = _prepare_inputs_for_generation


class PeftModelForFeatureExtraction(_TaskPeftModel):
    """`PeftModel` for ``TaskType.FEATURE_EXTRACTION``."""

    task = TASKS["feature-extraction"]


class PeftModelForSequenceClassification(_TaskPeftModel):
    """`PeftModel` for ``TaskType.SEQ_CLS``: the ``classifier``/``score`` head is trained in full."""

    task = TASKS["seq-cls"]


class PeftModelForTokenClassification(_TaskPeftModel):
    """`PeftModel` for ``TaskType.TOKEN_CLS``: the ``classifier``/``score`` head is trained in full."""

    task = TASKS["token-cls"]


class PeftModelForQuestionAnswering(_TaskPeftModel):
    """`PeftModel` for ``TaskType.QUESTION_ANS``: the ``qa_outputs`` head is trained in full."""

    task = TASKS["question-ans"]


MODEL_TYPE_TO_PEFT_MODEL: dict[TaskType, type[PeftModel]] = {
    cls.task.task_type: cls
    for cls in (
        PeftModelForCausalLM,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
        PeftModelForQuestionAnswering,
        PeftModelForFeatureExtraction,
    )
}


def get_peft_model(
    model: nn.Module,
    peft_config: LNTuningConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` for LN tuning: the task's `PeftModel`, with only the adapter trainable.

    Args:
        model: A Transformers model or any ``nn.Module`` (changed in place).
        peft_config: An `LNTuningConfig`. With ``target_modules=None`` the model type's default is used,
            or every normalization layer found by type.
        adapter_name: Name of the first adapter.
        mixed: Must be False (PEFT's mixed-method models do not support LN tuning).
        autocast_adapter_dtype: Keep float16/bfloat16 adapters in float32 so that they learn.
        revision: Stored in the config, as in PEFT.
        low_cpu_mem_usage: Accepted for PEFT compatibility.

    Returns:
        A `PeftModel` (a task variant when ``peft_config.task_type`` is set).

    Example:
        >>> model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LNTuningConfig(task_type="CAUSAL_LM"))
        >>> type(model).__name__
        'PeftModelForCausalLM'
    """
    if mixed:
        raise ValueError(
            "The provided peft_type 'LN_TUNING' is not compatible with the PeftMixedModel; use mixed=False."
        )
    if not isinstance(peft_config, LNTuningConfig):
        raise TypeError(f"lntune only supports LNTuningConfig, got {type(peft_config).__name__}.")
    if revision is not None:
        peft_config.revision = revision
    model_cls = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)
    return model_cls(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)


def inject_adapter_in_model(
    peft_config: LNTuningConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """Wrap the target modules of ``model`` in place and return ``model`` itself (no `PeftModel`).

    Use `get_peft_model_state_dict` / `set_peft_model_state_dict` on the result; keys then have no
    ``base_model.model.`` prefix.
    """
    return LNTuningModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage).model
