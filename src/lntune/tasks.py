"""The tasks lntune knows, one row each: read by the task variants of `PeftModel`, the command line and the server.

A task row holds its command-line name (``--task``), PEFT's `TaskType`, the Transformers auto class its
base model loads with, the head modules its adapters train in full (``modules_to_save``), what its
examples carry, and the HTTP endpoints that serve it. Adding a task is one more row of `TASKS`.

>>> task_named("seq-cls").task_type
<TaskType.SEQ_CLS: 'SEQ_CLS'>
>>> task_of_type("CAUSAL_LM").name
'causal-lm'
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from lntune.config import TaskType


@dataclass(frozen=True)
class Task:
    """One task.

    Args:
        name: The command-line name (``lntune train --task``, ``lntune serve --task``).
        task_type: PEFT's `TaskType`, written in ``adapter_config.json``.
        auto_class: The ``transformers`` auto class that loads its base model.
        head_modules: Head modules its adapters train in full and save (``modules_to_save``).
        classifies: Each example carries one class label; the head has one output per label.
        label_head: The head has one output per class label, so each adapter may have its own number of
            classes (``PeftModel.add_adapter(..., num_labels=...)``, and adapter files with another head size).
        embeds: The output is one pooled embedding per text.
        generates: The model generates text (completions).
        trainable: ``lntune train`` offers it.
        endpoints: The ``lntune serve`` endpoints that serve it (none: not served).
    """

    name: str
    task_type: TaskType
    auto_class: str
    head_modules: tuple[str, ...] = ()
    classifies: bool = False
    label_head: bool = False
    embeds: bool = False
    generates: bool = False
    trainable: bool = False
    endpoints: tuple[str, ...] = ()


#: Every task, by command-line name.
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "seq-cls",
            TaskType.SEQ_CLS,
            "AutoModelForSequenceClassification",
            head_modules=("classifier", "score"),
            classifies=True,
            label_head=True,
            trainable=True,
            endpoints=("/v1/classify", "/v1/rerank", "/v1/score"),  # rerank, score: one-output (cross-encoder) heads
        ),
        Task(
            "causal-lm",
            TaskType.CAUSAL_LM,
            "AutoModelForCausalLM",
            generates=True,
            trainable=True,
            endpoints=("/v1/completions", "/v1/chat/completions"),
        ),
        Task(
            "feature-extraction",
            TaskType.FEATURE_EXTRACTION,
            "AutoModel",
            embeds=True,
            endpoints=("/v1/embeddings", "/v1/rerank", "/v1/score"),  # rerank, score: cosine similarity
        ),
        Task(
            "token-cls",
            TaskType.TOKEN_CLS,
            "AutoModelForTokenClassification",
            head_modules=("classifier", "score"),
            label_head=True,
        ),
        Task("question-ans", TaskType.QUESTION_ANS, "AutoModelForQuestionAnswering", head_modules=("qa_outputs",)),
        Task("seq2seq-lm", TaskType.SEQ_2_SEQ_LM, "AutoModelForSeq2SeqLM", generates=True),
    )
}

#: The ``--task`` choices of ``lntune train`` and ``lntune serve``.
TRAINABLE_TASKS = sorted(name for name, task in TASKS.items() if task.trainable)
SERVED_TASKS = sorted(name for name, task in TASKS.items() if task.endpoints)


def task_named(name: str) -> Task:
    """The task whose command-line name is ``name``.

    Raises:
        ValueError: no such task (the message lists the names and the closest one).

    Example:
        >>> task_named("seq-cls").head_modules
        ('classifier', 'score')
    """
    task = TASKS.get(name)
    if task is None:
        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown task {name!r}{hint}; tasks: {', '.join(TASKS)}.")
    return task


def task_of_type(task_type: TaskType | str | None) -> Task | None:
    """The task of PEFT's ``task_type`` (a `TaskType`, PEFT's own enum, or its string value); None for None
    or a value lntune does not know.

    Example:
        >>> task_of_type("SEQ_CLS").name
        'seq-cls'
    """
    value = getattr(task_type, "value", task_type)
    return next((task for task in TASKS.values() if task.task_type.value == value), None)
