"""Which modules to wrap: per-architecture defaults, norm detection by type, and name matching."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

_LLAMA_LIKE = ["input_layernorm", "post_attention_layernorm", "norm"]
_GEMMA2_LIKE = [*_LLAMA_LIKE, "pre_feedforward_layernorm", "post_feedforward_layernorm"]
_CLIP_VISION = ["layer_norm1", "layer_norm2", "pre_layrnorm", "post_layernorm"]

#: Default ``target_modules`` per Transformers ``model_type``. Every architecture of PEFT's table is
#: here; qwen2/qwen3 list all their norms (PEFT lists only ``post_attention_layernorm``) and llava lists
#: norms only (PEFT also trains ``embed_tokens``, ``lm_head`` and the projector in full).
TARGET_MODULES_BY_MODEL_TYPE: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": [*_GEMMA2_LIKE, "q_norm", "k_norm"],
    "qwen2": _LLAMA_LIKE,
    "qwen3": [*_LLAMA_LIKE, "q_norm", "k_norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "gpt_neox": ["input_layernorm", "post_attention_layernorm", "final_layer_norm"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "whisper": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm", "layer_norm"],
    "opt": ["self_attn_layer_norm", "final_layer_norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "bert": ["LayerNorm"],
    "roberta": ["LayerNorm"],
    "vit": ["layernorm_before", "layernorm_after", "layernorm"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "llava": [*_LLAMA_LIKE, *_CLIP_VISION],
}

_NORM_CLASS_NAME = re.compile(r"Norm(\d+d)?$")


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer with parameters to tune.

    True for torch's LayerNorm, RMSNorm, GroupNorm and batch/instance norms, and for any leaf module
    whose class name ends in ``Norm`` (``LlamaRMSNorm``, ``T5LayerNorm``, ``GemmaRMSNorm``...), provided
    it has parameters (a norm without an affine part has nothing to tune).
    """
    if not any(True for _ in module.parameters(recurse=False)):
        return False
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return True
    has_children = any(True for _ in module.children())
    return not has_children and bool(_NORM_CLASS_NAME.search(type(module).__name__))


def detect_norm_layers(model: nn.Module) -> list[str]:
    """Full names of every normalization layer in ``model`` (see `is_norm_layer`), in module order."""
    return [name for name, module in model.named_modules() if name and is_norm_layer(module)]


def compact_target_list(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest PEFT-style ``target_modules`` list that selects exactly ``names`` in ``model``.

    Uses the last name component (``["LayerNorm", "ln_f"]``) when suffix matching on it selects exactly
    the given modules, else the full names.
    """
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    all_names = [n for n, _ in model.named_modules() if n]
    selected = [n for n in all_names if name_matches(n, suffixes)]
    return suffixes if selected == names else list(names)


def name_matches(name: str, patterns: list[str] | str | None) -> bool:
    """PEFT's matching rule: a string is a full-match regex; a list entry matches exactly or as a ``.``-suffix."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def closest_names(wanted: Iterable[str], candidates: Iterable[str], n: int = 5) -> list[str]:
    """Module names most similar to ``wanted`` (by full name and by last component), for error messages."""
    candidates = list(dict.fromkeys(candidates))
    by_leaf: dict[str, str] = {}
    for name in candidates:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], name)
    found: list[str] = []
    for w in wanted:
        found += difflib.get_close_matches(w, candidates, n=n, cutoff=0.5)
        found += [by_leaf[m] for m in difflib.get_close_matches(w, list(by_leaf), n=n, cutoff=0.5)]
    return list(dict.fromkeys(found))[:n]
