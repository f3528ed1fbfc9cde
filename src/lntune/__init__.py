"""lntune: LayerNorm tuning for PyTorch and Hugging Face Transformers, with PEFT's API and files.

>>> from lntune import get_peft_model, LNTuningConfig, TaskType
>>> model = get_peft_model(base_model, LNTuningConfig(task_type=TaskType.CAUSAL_LM))
"""

from lntune.base_state import get_base_model_state_dict, set_base_model_state_dict
from lntune.checkpoint import get_peft_model_state_dict, set_peft_model_state_dict
from lntune.config import LNTuningConfig, PeftType, TaskType
from lntune.hotswap import hotswap_adapter
from lntune.layer import LNTuningLayer
from lntune.model import LNTuningModel
from lntune.modules_to_save import ModulesToSaveWrapper
from lntune.multi_adapter import AdapterAdamW, AdapterBatchSampler, adapter_cross_entropy, adapter_parameters
from lntune.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    inject_adapter_in_model,
)
from lntune.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from lntune.targets import TARGET_MODULES_BY_MODEL_TYPE, detect_norm_layers

__version__ = "0.1.0"

__all__ = [
    "TARGET_MODULES_BY_MODEL_TYPE",
    "AdapterAdamW",
    "AdapterBatchSampler",
    "LNTuningConfig",
    "LNTuningLayer",
    "LNTuningModel",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "adapter_cross_entropy",
    "adapter_parameters",
    "detect_norm_layers",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "inject_adapter_in_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
