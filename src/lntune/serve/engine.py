"""`Engine`: the base model(s) of a server, adapter loading through lntune's public API, and one batch's run.

Only the worker thread calls an engine. Every adapter lives in one lntune `PeftModel`
(`PeftModel.from_pretrained` for the first, `load_adapter` after it, `delete_adapter` to unload) and each
batch is one ``generate(..., adapter_names=[...])`` or, for encoder tasks, one mixed forward
``model(**batch, adapter_names=[...])`` (``"__base__"``: no adapter) per length bucket (`length_buckets`:
inputs of similar lengths share a forward, whatever their adapters).

Sequence classification: adapters whose heads have different numbers of classes share the model and
its batches (lntune gives each adapter's head copy its file's size; a mixed batch pads the logits to its
widest head), and each sample's logits are cut to its own adapter's classes.
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


@dataclass(frozen=True)
class Sampling:
    """Generation settings shared by the samples of one ``generate`` call (temperature 0: greedy)."""

    temperature: float = 0.0
    top_p: float = 1.0


class ModelSlot:
    """The base model and the lntune `PeftModel` around it (created by the first adapter load)."""

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
    """The model of one server and how a batch of one task runs on it.

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
        >>> engine.run([[101, 2307, 102]], ["__base__"])[0].shape
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
        #: The base model's number of classes (classification; its own head's), else None.
        self.base_num_labels: int | None = model.config.num_labels if classifies else None
        #: The size of a pooled embedding (feature-extraction): the model's hidden size.
        self.embedding_size: int | None = getattr(model.config, "hidden_size", None)
        self.base_labels = dict(model.config.id2label) if classifies else {}
        self.slot = ModelSlot(model)
        #: Each loaded adapter's number of classes, where its head's differs from the base model's.
        self._num_labels: dict[str, int] = {}
        #: Entered around every adapter load and unload: continuous batching pauses its engine there.
        self.exclusive: Callable[[], AbstractContextManager] = contextlib.nullcontext

    # ----------------------------------------------------------------------------- adapters
    def _place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and tell it the pad token (decoder classifiers find the last token by it)."""
        set_pad_token(model.to(self.device).eval(), self.pad_token_id)
        return model

    def load(self, folder: str, adapter_name: str, num_labels: int | None = None) -> None:
        """Load an adapter folder as ``adapter_name``.

        Args:
            folder: The adapter folder.
            adapter_name: Its name in the model.
            num_labels: Classification: the number of classes of the folder's head (None: the base model's).
        """
        with self.exclusive():
            self.slot.load(folder, adapter_name)
        if num_labels is not None and num_labels != self.base_num_labels:
            self._num_labels[adapter_name] = num_labels

    def unload(self, adapter_name: str) -> None:
        """Unload ``adapter_name``."""
        with self.exclusive():
            self.slot.delete(adapter_name)
        self._num_labels.pop(adapter_name, None)

    # ------------------------------------------------------------------------------ batches
    @torch.inference_mode()
    def run(
        self,
        sequences: list[list[int]],
        adapter_names: list[str],
        token_type_ids: list[list[int] | None] | None = None,
    ) -> list[torch.Tensor]:
        """The forwards of a batch, one adapter per sample (encoder tasks).

        Inputs of similar lengths share a forward (`length_buckets`), whatever their adapters and their heads'
        sizes.

        Args:
            sequences: Each sample's token ids.
            adapter_names: Each sample's adapter (``"__base__"``: none).
            token_type_ids: Each sample's segment ids (text pairs for cross-encoders; None: all 0), or None.

        Returns:
            Per sample, a float32 CPU tensor: its logits over its adapter's classes (classification) or its
            pooled embedding.
        """
        slot = self.slot
        results: list = [None] * len(sequences)
        for bucket in length_buckets([len(s) for s in sequences], self.overhead_tokens):
            ids, mask = _padded([sequences[i] for i in bucket], self.pad_token_id, left=False, device=self.device)
            inputs = {"input_ids": ids, "attention_mask": mask}
            if token_type_ids is not None and any(token_type_ids[i] for i in bucket):
                types = [token_type_ids[i] or [0] * len(sequences[i]) for i in bucket]
                inputs["token_type_ids"] = _padded(types, 0, left=False, device=self.device)[0]
            out = slot.forward([adapter_names[i] for i in bucket], **inputs)
            if self.task.classifies:  # padded to the bucket's widest head: each sample keeps its own classes
                logits = out.logits.float().cpu()
                widths = [self._num_labels.get(adapter_names[i], self.base_num_labels) for i in bucket]
                rows = [row[:width] for row, width in zip(logits, widths)]
            else:
                rows = pool(out.last_hidden_state, mask, self.pooling).cpu()
            for i, row in zip(bucket, rows):
                results[i] = row
        return results

    @torch.inference_mode()
    def generate(
        self,
        sequences: list[list[int]],
        adapter_names: list[str],
        sampling: Sampling,
        budgets: list[int],
    ) -> list[tuple[list[int], bool]]:
        """One ``generate`` of a batch, one adapter per sample (generation tasks).

        Args:
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
        out = self.slot.generate(
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
