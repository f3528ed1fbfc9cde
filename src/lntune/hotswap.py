"""Hot-swap: load another saved adapter into an existing adapter's copies, in place.

The parameters keep their identity (only their values change), so a ``torch.compile``'d model keeps
its compiled code and an optimizer keeps its references; no module is added or replaced.
"""

from __future__ import annotations

import os

from torch import nn

from lntune.checkpoint import load_into_adapter
from lntune.config import LNTuningConfig


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str = "default", **kwargs
) -> None:
    """Replace the weights of ``adapter_name`` by those saved in ``model_name_or_path``, in place.

    The saved adapter must tune exactly the same modules with the same shapes; otherwise a
    `lntune.checkpoint.CheckpointError` names the first differing keys and nothing is changed. Works
    while the adapter is active, inactive or merged, and on a ``torch.compile``'d model (no recompile).
    Float32 adapters on low-precision models stay float32 (values are converted on copy).

    Args:
        model: A `PeftModel` (or a model given adapters by `inject_adapter_in_model`), compiled or not.
        model_name_or_path: A local folder written by ``save_pretrained`` (lntune's or PEFT's).
        adapter_name: The existing adapter whose weights are replaced.
        **kwargs: ``subfolder`` is honoured; hub options are ignored.

    Example:
        >>> model = torch.compile(PeftModel.from_pretrained(base, "adapter-a"))
        >>> lntune.hotswap_adapter(model, "adapter-b")  # same modules, new values, no recompilation
    """
    folder = os.fspath(model_name_or_path)
    if kwargs.get("subfolder"):
        folder = os.path.join(folder, kwargs["subfolder"])
    LNTuningConfig.from_pretrained(folder)  # refuses folders of other adapter types, naming the file
    peft_config = getattr(getattr(model, "_orig_mod", model), "peft_config", None)
    if isinstance(peft_config, dict) and adapter_name not in peft_config:
        raise ValueError(
            f"Cannot hot-swap into adapter '{adapter_name}': it does not exist. Existing adapters: "
            f"{sorted(peft_config)}. Use load_adapter to add a new adapter."
        )
    load_into_adapter(model, folder, adapter_name)  # all-or-nothing; errors name the weights file
