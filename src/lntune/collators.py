"""`AdapterCollator`: data collation for many adapters in one run: each example names its adapter.

It wraps any Transformers data collator. Each example's ``adapter_name`` goes to the model as
``adapter_names`` (one per sample), so a `transformers.Trainer` trains every adapter of a mixed batch
at once. With ``DataCollatorWithFlattening`` (padding-free packing: the batch is one row of several
sequences) it also passes ``adapter_token_index``, so every token runs its own sequence's adapter.

>>> from transformers import DataCollatorWithPadding
>>> collate = AdapterCollator(DataCollatorWithPadding(tokenizer))
>>> batch = collate([{"input_ids": [5, 6], "adapter_name": "a"}, {"input_ids": [7], "adapter_name": "b"}])
>>> batch["adapter_names"]
['a', 'b']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AdapterCollator:
    """A data collator that also tells the model each example's adapter.

    Args:
        collator: The collator to wrap (``DataCollatorWithPadding``, ``DataCollatorForLanguageModeling``,
            ``DataCollatorWithFlattening``...); it never sees the adapter key.
        key: The example key holding the adapter name.

    Returns (when called on a list of examples):
        The wrapped collator's batch, plus ``adapter_names`` (one per example) and, when the batch is one
        packed row of several examples, ``adapter_token_index`` (each token's example).

    Raises:
        KeyError: an example has no ``key``; the message names its position.

    Example:
        >>> trainer = Trainer(model=peft_model, data_collator=AdapterCollator(DataCollatorWithPadding(tok)),
        ...                   args=TrainingArguments(..., remove_unused_columns=False), train_dataset=examples)
    """

    collator: Callable[[list[dict]], dict]
    key: str = "adapter_name"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        names = []
        for i, feature in enumerate(features):
            if self.key not in feature:
                raise KeyError(f"example {i} of the batch has no {self.key!r}: every example must name its adapter.")
            names.append(str(feature[self.key]))
        batch = self.collator([{k: v for k, v in f.items() if k != self.key} for f in features])
        batch["adapter_names"] = names
        input_ids = batch.get("input_ids")
        if isinstance(input_ids, torch.Tensor) and input_ids.shape[0] == 1 and len(features) > 1:
            # Packed (DataCollatorWithFlattening): the examples follow each other in one row.
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            if int(lengths.sum()) != input_ids.shape[1]:
                raise ValueError(
                    f"the packed row has {input_ids.shape[1]} tokens, the examples {int(lengths.sum())}: "
                    "AdapterCollator supports packing collators that concatenate the examples' input_ids."
                )
            batch["adapter_token_index"] = torch.repeat_interleave(torch.arange(len(features)), lengths).view(1, -1)
        return batch
