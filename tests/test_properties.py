"""Property-based test: random sequences of adapter operations on the MLP, checked after every step
against a plain-Python reference of LN tuning's semantics.

The reference knows only: the pretrained weights; each adapter's targets, inference_mode and
current weights; which adapter is active and which is merged. Its forward loads the effective
adapter's weights into a plain copy of the MLP; its training step is SGD on that copy. lntune must
agree on outputs, on the set of trainable parameter names, on every adapter's (saved) weights and
on the untouched pretrained weights.
"""

from __future__ import annotations

import copy
import warnings

import torch
from conftest import make_inputs, make_tiny_model, trainable_names
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lntune import LNTuningConfig, LNTuningLayer, ModulesToSaveWrapper, get_peft_model, get_peft_model_state_dict

TARGETS = ["layernorm0", "layernorm1", "lin0"]
HEAD = "lin1"  # optionally in modules_to_save: trained in full, one copy per adapter
PARAMS = ("weight", "bias")
X = make_inputs("mlp")["X"]
LR = 0.1
ATOL = 1e-5


def loss_of(output: torch.Tensor) -> torch.Tensor:
    """NLL of class 0: bounded below, so long random runs of training steps stay finite."""
    return -output[:, 0].mean()


class Reference:
    """LN tuning semantics in plain Python over one plain MLP."""

    def __init__(self) -> None:
        self.net = make_tiny_model("mlp")
        self.pretrained = {k: v.clone() for k, v in self.net.state_dict().items()}
        # name -> {"targets", "save", "inference", "weights": {module.param: tensor}}
        self.adapters: dict[str, dict] = {}
        self.active: str | None = "default"
        self.merged: str | None = None

    def add(self, name: str, targets: list[str], inference: bool, save: bool) -> None:
        modules = [*targets, HEAD] if save else targets
        weights = {f"{m}.{p}": self.pretrained[f"{m}.{p}"].clone() for m in modules for p in PARAMS}
        self.adapters[name] = {"targets": targets, "save": save, "inference": inference, "weights": weights}

    def _load(self, adapter: str | None) -> None:
        state = dict(self.pretrained)
        if adapter is not None:
            state.update(self.adapters[adapter]["weights"])
        self.net.load_state_dict(state)

    def output(self, enabled: bool = True) -> torch.Tensor:
        self._load(self.active if enabled else None)
        with torch.no_grad():
            return self.net(X)

    def trainable(self) -> set[str]:
        if self.active is None or self.adapters[self.active]["inference"]:
            return set()
        adapter = self.adapters[self.active]
        slot = "base_layer" if self.merged == self.active else f"ln_tuning_layers.{self.active}"
        names = {f"base_model.model.{t}.{slot}.{p}" for t in adapter["targets"] for p in PARAMS}
        if adapter["save"]:
            names |= {f"base_model.model.{HEAD}.modules_to_save.{self.active}.{p}" for p in PARAMS}
        return names

    def saved_keys(self, name: str) -> dict[str, torch.Tensor]:
        """``adapter's weights`` under PEFT's checkpoint keys."""
        out = {}
        for key, value in self.adapters[name]["weights"].items():
            module, param = key.rsplit(".", 1)
            slot = "" if module == HEAD else "ln_tuning_layers."
            out[f"base_model.model.{module}.{slot}{param}"] = value
        return out

    def train_step(self) -> None:
        if not self.trainable():
            return
        self._load(self.active)
        weights = self.adapters[self.active]["weights"]
        params = dict(self.net.named_parameters())
        for name, param in params.items():
            param.requires_grad_(name in weights)
        loss_of(self.net(X)).backward()
        for name in weights:
            weights[name] = (params[name] - LR * params[name].grad).detach()
            params[name].grad = None


class LNTuningMachine(RuleBasedStateMachine):
    @initialize(modules=st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3, unique=True), save=st.booleans())
    def start(self, modules, save):
        warnings.simplefilter("ignore", UserWarning)  # merge/unmerge no-op and unmerge-first notices
        self.ref = Reference()
        self.ref.add("default", modules, False, save)
        config = LNTuningConfig(target_modules=modules, modules_to_save=[HEAD] if save else None)
        self.model = get_peft_model(make_tiny_model("mlp"), config)
        self.counter = 0

    # ------------------------------------------------------------------------------- steps
    @precondition(lambda self: len(self.ref.adapters) < 4)
    @rule(
        modules=st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3, unique=True),
        inference=st.sampled_from([False, False, True]),
        save=st.booleans(),
    )
    def add_adapter(self, modules, inference, save):
        self.counter += 1
        name = f"a{self.counter}"
        to_save = [HEAD] if save else None
        self.model.add_adapter(
            name, LNTuningConfig(target_modules=modules, modules_to_save=to_save, inference_mode=inference)
        )
        self.ref.add(name, modules, inference, save)

    @precondition(lambda self: self.ref.adapters)
    @rule(data=st.data())
    def set_adapter(self, data):
        name = data.draw(st.sampled_from(sorted(self.ref.adapters)))
        self.model.set_adapter(name)
        self.ref.active, self.ref.merged = name, None

    @precondition(lambda self: self.ref.active is not None)
    @rule()
    def merge(self):
        self.model.merge_adapter()
        self.ref.merged = self.ref.active

    @rule()
    def unmerge(self):
        self.model.unmerge_adapter()
        self.ref.merged = None

    @precondition(lambda self: self.ref.adapters)
    @rule(data=st.data())
    def delete_adapter(self, data):
        name = data.draw(st.sampled_from(sorted(self.ref.adapters)))
        if name == self.ref.merged:
            try:
                self.model.delete_adapter(name)
            except ValueError as exc:
                assert "unmerge" in str(exc)
            else:
                raise AssertionError("deleting the merged adapter must raise")
            return
        self.model.delete_adapter(name)
        del self.ref.adapters[name]
        if name == self.ref.active:
            self.ref.active = next(iter(self.ref.adapters), None)

    @rule()
    def train_step(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if params:
            loss_of(self.model(X)).backward()
            with torch.no_grad():
                for p in params:
                    p -= LR * p.grad
                    p.grad = None
        self.ref.train_step()

    @rule()
    def disabled_is_base(self):
        with self.model.disable_adapter():
            torch.testing.assert_close(self.model(X), self.ref.output(enabled=False), atol=ATOL, rtol=0)
            assert trainable_names(self.model) == set()

    @precondition(lambda self: self.ref.adapters)
    @rule(data=st.data())
    def set_adapter_while_disabled(self, data):
        name = data.draw(st.sampled_from(sorted(self.ref.adapters)))
        with self.model.disable_adapter():
            self.model.set_adapter(name)
            torch.testing.assert_close(self.model(X), self.ref.output(enabled=False), atol=ATOL, rtol=0)
        self.ref.active, self.ref.merged = name, None

    @rule()
    def unloaded_copies(self):
        expected = self.ref.output()
        torch.testing.assert_close(copy.deepcopy(self.model).merge_and_unload()(X), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(copy.deepcopy(self.model).unload()(X), self.ref.output(False), atol=ATOL, rtol=0)

    # -------------------------------------------------------------------------- invariants
    @invariant()
    def same_state(self):
        assert self.model.active_adapters == ([] if self.ref.active is None else [self.ref.active])
        assert self.model.base_model.merged == (self.ref.merged is not None)
        assert list(self.model.peft_config) == list(self.ref.adapters)

    @invariant()
    def same_output(self):
        with torch.no_grad():
            torch.testing.assert_close(self.model(X), self.ref.output(), atol=ATOL, rtol=0)

    @invariant()
    def same_trainable_names(self):
        assert trainable_names(self.model) == self.ref.trainable()

    @invariant()
    def same_adapter_weights_and_pristine_originals(self):
        for name in self.ref.adapters:
            saved = get_peft_model_state_dict(self.model, adapter_name=name)
            expected = self.ref.saved_keys(name)
            assert saved.keys() == expected.keys()
            for key, value in expected.items():
                torch.testing.assert_close(saved[key].detach(), value, atol=ATOL, rtol=0)
        for name, module in self.model.get_base_model().named_modules():
            if isinstance(module, (LNTuningLayer, ModulesToSaveWrapper)):
                for p in PARAMS:
                    assert torch.equal(getattr(module.original_module, p), self.ref.pretrained[f"{name}.{p}"])


LNTuningMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_adapter_operations_match_reference = LNTuningMachine.TestCase
