"""`Engine`: the base model(s) of a server, adapter loading through lntune's public API, and one batch's run.

Only the worker thread calls an engine. Every adapter lives in one lntune `PeftModel`
(`PeftModel.from_pretrained` for the first, `load_adapter` after it, `delete_adapter` to unload) and each
batch is one ``generate(..., adapter_names=[...])`` or, for encoder tasks, one mixed forward
``model(**batch, adapter_names=[...])`` (``"__base__"``: no adapter) per length bucket (`length_buckets`:
inputs of similar lengths share a forward, whatever their adapters).

Sequence classification: adapters whose heads have a different number of classes cannot share a head
module, so each head size gets its own model (made on first use). Its frozen weights are the first
model's tensors (shared, not copied); only the head differs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from lntune.loading import load_model, set_pad_token
from lntune.peft_model import PeftModel
from lntune.serve.buckets import default_overhead_tokens, length_buckets
from lntune.serve.pooling import Pooling, pool
from lntune.tasks import Task, task_named

#: Which model of an engine serves an adapter: its head's number of classes (classification), else None.
SlotKey = int | None


@dataclass(frozen=True)
class Sampling:
    """Generation settings shared by the samples of one ``generate`` call (temperature 0: greedy)."""

    temperature: float = 0.0
    top_p: float = 1.0


def share_frozen_weights(source: dict[str, nn.Parameter], model: nn.Module) -> None:
    """Make ``model`` use ``source``'s tensors wherever a parameter has the same name and shape.

    Args:
        source: ``dict(other.named_parameters())`` of an identical model, taken before any adapter wraps it.
        model: A fresh model (not yet wrapped); its parameters of other shapes (a new head) stay its own.
    """
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            full = f"{module_name}.{name}" if module_name else name
            shared = source.get(full)
            if param is not None and shared is not None and shared.shape == param.shape:
                module._parameters[name] = shared


class ModelSlot:
    """One base model and the lntune `PeftModel` around it (created by the first adapter load)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.peft: PeftModel | None = None

    def load(self, folder: str, adapter_name: str) -> None:
        """Load the adapter in ``folder`` as ``adapter_name`` (all-or-nothing: on error nothing changed)."""
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, folder, adapter_name=adapter_name)
        else:
            self.peft.load_adapter(folder, adapter_name=adapter_name)

    def delete(self, adapter_name: str) -> None:
        """Unload ``adapter_name``."""
        with warnings.catch_warnings():  # "adapter X was active ... setting active adapter to Y": irrelevant here
            warnings.simplefilter("ignore")
            self.peft.delete_adapter(adapter_name)

    def forward(self, adapter_names: list[str], **inputs):
        if self.peft is None:  # no adapter loaded yet: every sample is "__base__"
            return self.model(**inputs)
        return self.peft(**inputs, adapter_names=adapter_names)

    def generate(self, adapter_names: list[str], **inputs):
        if self.peft is None:
            return self.model.generate(**inputs)
        return self.peft.generate(**inputs, adapter_names=adapter_names)


def _padded(sequences: Sequence[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for token lists of different lengths."""
    width = max(len(s) for s in sequences)
    ids, mask = [], []
    for s in sequences:
        fill = [pad_id] * (width - len(s))
        ids.append(fill + s if left else s + fill)
        ones, zeros = [1] * len(s), [0] * (width - len(s))
        mask.append(zeros + ones if left else ones + zeros)
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


class Engine:
    """The models of one server and how a batch of one task runs on them.

    Args:
        model_path: The base model folder.
        task: A served `Task` (or its name): ``seq-cls``, ``feature-extraction`` or ``causal-lm``.
        pad_token_id: The tokenizer's pad token.
        eos_token_ids: Tokens that end a generated sequence (``causal-lm``), besides the model's own.
        pooling: How embeddings are pooled (``feature-extraction``).
        overhead_tokens: The cost of one more forward in tokens, for length bucketing (default: by
            device, see `lntune.serve.buckets`).

    Example:
        >>> engine = Engine("path/to/minilm", "feature-extraction", pad_token_id=0)
        >>> engine.run(None, [[101, 2307, 102]], ["__base__"])[0].shape
        torch.Size([384])
    """

    def __init__(
        self,
        model_path: str,
        task: Task | str,
        pad_token_id: int,
        eos_token_ids: Sequence[int] = (),
        pooling: Pooling | None = None,
        overhead_tokens: int | None = None,
    ) -> None:
        self.model_path = model_path
        self.task = task_named(task) if isinstance(task, str) else task
        self.pad_token_id = pad_token_id
        self.eos_token_ids = set(eos_token_ids)
        self.pooling = pooling or Pooling()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.overhead_tokens = default_overhead_tokens(self.device) if overhead_tokens is None else overhead_tokens
        model, new_head = load_model(model_path, self.task)
        self.base_has_head = not new_head
        self._place(model)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_token_ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        classifies = self.task.classifies
        self.primary_key: SlotKey = model.config.num_labels if classifies else None
        #: The size of a pooled embedding (feature-extraction): the model's hidden size.
        self.embedding_size: int | None = getattr(model.config, "hidden_size", None)
        self.base_labels = dict(model.config.id2label) if classifies else {}
        self._frozen = dict(model.named_parameters()) if classifies else {}
        self.slots: dict[SlotKey, ModelSlot] = {self.primary_key: ModelSlot(model)}
        #: Entered around every adapter load and unload: continuous batching pauses its engine there.
        self.exclusive: Callable[[], AbstractContextManager] = contextlib.nullcontext

    # ----------------------------------------------------------------------------- adapters
    def slot_key(self, num_labels: int | None) -> SlotKey:
        """Which model serves an adapter whose head has ``num_labels`` classes (None: the first model)."""
        return self.primary_key if num_labels is None else num_labels

    def _slot(self, key: SlotKey) -> ModelSlot:
        if key not in self.slots:
            model = load_model(self.model_path, self.task, num_labels=key).model
            share_frozen_weights(self._frozen, model)
            self.slots[key] = ModelSlot(self._place(model))
        return self.slots[key]

    def _place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and tell it the pad token (decoder classifiers find the last token by it)."""
        set_pad_token(model.to(self.device).eval(), self.pad_token_id)
        return model

    def load(self, key: SlotKey, folder: str, adapter_name: str) -> None:
        """Load an adapter folder as ``adapter_name`` into the model ``key``."""
        with self.exclusive():
            self._slot(key).load(folder, adapter_name)

    def unload(self, key: SlotKey, adapter_name: str) -> None:
        """Unload ``adapter_name`` from the model ``key``."""
        with self.exclusive():
            self.slots[key].delete(adapter_name)

    # ------------------------------------------------------------------------------ batches
    @torch.inference_mode()
    def run(
        self,
        key: SlotKey,
        sequences: list[list[int]],
        adapter_names: list[str],
        token_type_ids: list[list[int] | None] | None = None,
    ) -> list[torch.Tensor]:
        """The forwards of the model ``key`` on a batch, one adapter per sample (encoder tasks).

        Inputs of similar lengths share a forward (`length_buckets`), whatever their adapters.

        Args:
            key: The model (see `slot_key`).
            sequences: Each sample's token ids.
            adapter_names: Each sample's adapter (``"__base__"``: none).
            token_type_ids: Each sample's segment ids (text pairs for cross-encoders; None: all 0), or None.

        Returns:
            Per sample, a float32 CPU tensor: its logits (classification) or its pooled embedding.
        """
        slot = self.slots[key]
        results: list = [None] * len(sequences)
        for bucket in length_buckets([len(s) for s in sequences], self.overhead_tokens):
            ids, mask = _padded([sequences[i] for i in bucket], self.pad_token_id, left=False, device=self.device)
            inputs = {"input_ids": ids, "attention_mask": mask}
            if token_type_ids is not None and any(token_type_ids[i] for i in bucket):
                types = [token_type_ids[i] or [0] * len(sequences[i]) for i in bucket]
                inputs["token_type_ids"] = _padded(types, 0, left=False, device=self.device)[0]
            out = slot.forward([adapter_names[i] for i in bucket], **inputs)
            if self.task.classifies:
                rows = out.logits.float().cpu()
            else:
                rows = pool(out.last_hidden_state, mask, self.pooling).cpu()
            for i, row in zip(bucket, rows):
                results[i] = row
        return results

    @torch.inference_mode()
    def generate(
        self,
        key: SlotKey,
        sequences: list[list[int]],
        adapter_names: list[str],
        sampling: Sampling,
        budgets: list[int],
    ) -> list[tuple[list[int], bool]]:
        """One ``generate`` of the model ``key`` on a batch, one adapter per sample (generation tasks).

        Args:
            key: The model (see `slot_key`).
            sequences: Each sample's prompt token ids.
            adapter_names: Each sample's adapter (``"__base__"``: none).
            sampling: The batch's sampling settings.
            budgets: Each sample's most new tokens.

        Returns:
            Per sample: its new token ids (up to its end-of-sequence token, left out) and whether it ended there.
        """
        ids, mask = _padded(sequences, self.pad_token_id, left=True, device=self.device)
        options = {"do_sample": False}
        if sampling.temperature > 0:
            options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        out = self.slots[key].generate(
            adapter_names,
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(budgets),
            pad_token_id=self.pad_token_id,
            **options,
        )
        results = []
        for row, budget in zip(out[:, ids.shape[1] :].tolist(), budgets):
            row = row[:budget]
            end = next((i for i, token in enumerate(row) if token in self.eos_token_ids), None)
            results.append((row, False) if end is None else (row[:end], True))
        return results
