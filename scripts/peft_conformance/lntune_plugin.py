"""pytest plugin of scripts/peft_conformance.sh: PEFT's own LN-tuning tests, with LN tuning done by lntune.

Loaded with ``-p lntune_plugin``. ``LNTUNE_CONFORMANCE_TARGET=peft`` leaves PEFT alone (the run that
produces the baseline); otherwise (``lntune``, the default) the entry points below go to lntune before
the test modules import them. PEFT's test files themselves are not changed.

What goes to lntune (everything else stays PEFT's):

* ``peft.LNTuningConfig`` is lntune's class, so every LN row of PEFT's test tables builds lntune configs.
* ``get_peft_model`` / ``inject_adapter_in_model`` with an lntune config; ``get_peft_model_state_dict``,
  ``set_peft_model_state_dict``, ``get_base_model_state_dict`` and ``set_base_model_state_dict`` on a model
  holding lntune adapters.
* ``PeftModel`` and ``PeftConfig`` become stand-ins that ``isinstance`` / ``issubclass`` accept for either
  library's class; their ``from_pretrained`` reads LN tuning folders with lntune (any other attribute is PEFT's).
* In the test modules only (never inside PEFT), ``BaseTunerLayer``, ``ModulesToSaveWrapper`` and
  ``AuxiliaryTrainingWrapper`` also accept lntune's wrappers, so that checks such as "no tuner layer left
  after unload()" look at lntune's modules instead of passing because they find none of PEFT's.
* PEFT's config tests set the version written into new configs by patching ``peft.config.__version__``;
  lntune's counterpart is ``lntune.config.PEFT_FORMAT_VERSION`` (the PEFT release whose format lntune
  writes), which gets the same value for the duration of the test.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

TARGET = os.environ.get("LNTUNE_CONFORMANCE_TARGET", "lntune")
if TARGET not in ("lntune", "peft"):
    raise pytest.UsageError(f"LNTUNE_CONFORMANCE_TARGET must be 'lntune' or 'peft', got {TARGET!r}.")


def pytest_configure(config: pytest.Config) -> None:
    # The markers PEFT's tests use (PEFT declares them in its own pytest settings, which are not run here).
    for marker in ("single_gpu_tests", "multi_gpu_tests", "regression", "bitsandbytes"):
        config.addinivalue_line("markers", f"{marker}: a marker of PEFT's test suite")


def pytest_report_header(config: pytest.Config) -> str:
    import peft

    if TARGET == "peft":
        return f"LN tuning by PEFT {peft.__version__} (baseline run)"
    import lntune

    return f"LN tuning by lntune {lntune.__version__} ({os.path.dirname(lntune.__file__)}); PEFT {peft.__version__}"


if TARGET == "lntune":
    import peft
    import peft.config
    import peft.tuners.tuners_utils
    import peft.utils
    from torch import nn

    import lntune
    import lntune.config

    PEFT = {
        name: getattr(peft, name)
        for name in (
            "LNTuningConfig",
            "PeftConfig",
            "PeftModel",
            "get_peft_model",
            "inject_adapter_in_model",
            "get_peft_model_state_dict",
            "set_peft_model_state_dict",
            "get_base_model_state_dict",
            "set_base_model_state_dict",
        )
    }
    LNTUNE_WRAPPERS = (lntune.LNTuningLayer, lntune.ModulesToSaveWrapper)

    def _holds_lntune_adapters(model) -> bool:
        if isinstance(model, lntune.PeftModel):
            return True
        return isinstance(model, nn.Module) and any(isinstance(m, LNTUNE_WRAPPERS) for m in model.modules())

    def _is_ln_folder(path, subfolder=None) -> bool:
        folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
        config_file = os.path.join(folder, "adapter_config.json")
        if not os.path.isfile(config_file):
            return False
        with open(config_file, encoding="utf-8") as fh:
            return json.load(fh).get("peft_type") == "LN_TUNING"

    def _by_config(name: str):
        """``peft.<name>(config, model, ...)`` or ``(model, config, ...)``: lntune's for lntune configs."""

        def route(*args, **kwargs):
            uses_lntune = any(isinstance(a, lntune.LNTuningConfig) for a in (*args, *kwargs.values()))
            return (getattr(lntune, name) if uses_lntune else PEFT[name])(*args, **kwargs)

        route.__name__ = name
        return route

    def _by_model(name: str):
        """``peft.<name>(model, ...)``: lntune's when ``model`` holds lntune adapters."""

        def route(model, *args, **kwargs):
            return (getattr(lntune, name) if _holds_lntune_adapters(model) else PEFT[name])(model, *args, **kwargs)

        route.__name__ = name
        return route

    class _EitherLibrary(type):
        """Metaclass of the stand-ins: ``isinstance`` accepts any of ``_accepts``; other attributes are PEFT's."""

        def __instancecheck__(cls, obj) -> bool:
            return isinstance(obj, cls._accepts)

        def __subclasscheck__(cls, sub) -> bool:
            return isinstance(sub, type) and issubclass(sub, cls._accepts)

        def __getattr__(cls, name):
            return getattr(cls._accepts[0], name)

    class PeftModel(metaclass=_EitherLibrary):
        _accepts = (PEFT["PeftModel"], lntune.PeftModel)

        @classmethod
        def from_pretrained(cls, model, model_id, *args, **kwargs):
            config = kwargs.get("config")
            if isinstance(config, lntune.LNTuningConfig) or (
                config is None and _is_ln_folder(model_id, kwargs.get("subfolder"))
            ):
                return lntune.PeftModel.from_pretrained(model, model_id, *args, **kwargs)
            return PEFT["PeftModel"].from_pretrained(model, model_id, *args, **kwargs)

    class PeftConfig(metaclass=_EitherLibrary):
        _accepts = (PEFT["PeftConfig"], lntune.LNTuningConfig)

        @classmethod
        def from_pretrained(cls, path, subfolder=None, **kwargs):
            if not kwargs and _is_ln_folder(path, subfolder):
                return lntune.LNTuningConfig.from_pretrained(path, subfolder=subfolder)
            return PEFT["PeftConfig"].from_pretrained(path, subfolder=subfolder, **kwargs)

    def _accepting_lntune(peft_class: type, *lntune_classes: type) -> type:
        return _EitherLibrary(peft_class.__name__, (), {"_accepts": (peft_class, *lntune_classes)})

    # Names replaced in the test modules' globals once they are imported (PEFT's own modules keep theirs).
    IN_TEST_MODULES = {
        "BaseTunerLayer": _accepting_lntune(peft.tuners.tuners_utils.BaseTunerLayer, lntune.LNTuningLayer),
        "ModulesToSaveWrapper": _accepting_lntune(peft.utils.ModulesToSaveWrapper, lntune.ModulesToSaveWrapper),
        "AuxiliaryTrainingWrapper": _accepting_lntune(peft.utils.AuxiliaryTrainingWrapper, lntune.ModulesToSaveWrapper),
    }

    # Before the test modules run ``from peft import ...``:
    peft.LNTuningConfig = lntune.LNTuningConfig
    peft.PeftConfig = PeftConfig
    peft.PeftModel = PeftModel
    for _name in ("get_peft_model", "inject_adapter_in_model"):
        setattr(peft, _name, _by_config(_name))
    for _name in (
        "get_peft_model_state_dict",
        "set_peft_model_state_dict",
        "get_base_model_state_dict",
        "set_base_model_state_dict",
    ):
        setattr(peft, _name, _by_model(_name))

    _monkeypatch_setattr = pytest.MonkeyPatch.setattr

    def _setattr_mirroring_the_version(self, target, *args, **kwargs):
        _monkeypatch_setattr(self, target, *args, **kwargs)
        if target is peft.config and args[:1] == ("__version__",):
            _monkeypatch_setattr(self, lntune.config, "PEFT_FORMAT_VERSION", args[1])

    pytest.MonkeyPatch.setattr = _setattr_mirroring_the_version

    def pytest_collection_modifyitems(session, config, items) -> None:
        for module_name, module in list(sys.modules.items()):
            if module_name == "tests" or module_name.startswith("tests."):
                for name, replacement in IN_TEST_MODULES.items():
                    if name in vars(module):
                        vars(module)[name] = replacement
