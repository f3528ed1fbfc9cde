"""LN tuning under DDP (with and without gradient checkpointing), FSDP2 and FSDP1: 2 processes on CPU/gloo.

The module runs this file as a script in two worker processes, once for all scenarios (`WORKERS`):
torchrun's RANK/WORLD_SIZE variables, rendezvous through a file in a temporary folder (no port can
collide). In each scenario every rank trains a tiny Llama on its half of a batch and rank 0 saves the
adapter; the tests compare the results with one process training on the whole batch. Hung workers are
killed after `WORKER_TIMEOUT_S` and the tests fail with their output.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_inputs, make_tiny_model
from safetensors.torch import load_file
from torch import nn

from lntune import LNTuningConfig, PeftModel, get_peft_model, get_peft_model_state_dict

WORLD_SIZE = 2
STEPS = 3
LR = 0.5
WORKER_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------- shared
def _model() -> PeftModel:
    """The tiny Llama with LN tuning (adapter ``default``, trainable) and an inactive, frozen ``other``."""
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig())
    model.add_adapter("other", LNTuningConfig())
    return model.train()


def _batch(rank: int | None = None) -> dict[str, torch.Tensor]:
    """The whole batch (4 sequences), or rank ``rank``'s half of it."""
    ids = make_inputs("llama", batch=2 * WORLD_SIZE, seq=8)["input_ids"]
    if rank is not None:
        ids = ids.chunk(WORLD_SIZE)[rank]
    return {"input_ids": ids, "labels": ids}


def _train(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """`STEPS` steps of SGD on the trainable parameters (the loss is a token mean, so halves average exactly)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _without_fsdp1_wrappers(name: str) -> str:
    """A parameter name without the ``_fsdp_wrapped_module.`` that FSDP1's nested wrappers add."""
    return name.replace("_fsdp_wrapped_module.", "")


# --------------------------------------------------------------------------------- workers
def _ddp_worker(rank: int, out: Path) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(model)  # no find_unused_parameters: an unused registered param would raise
    synced: list[list[str]] = []

    def record_then_allreduce(state, bucket):
        synced.append(sorted(names[id(p)] for p in bucket.parameters()))
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, record_then_allreduce)
    _train(ddp, _batch(rank))
    ddp.module.save_pretrained(out / "adapter", is_main_process=rank == 0)
    params = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    return {"params": params, "synced": synced}


def _ddp_checkpointed_worker(rank: int, out: Path, use_reentrant: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    copy = model.get_base_model().model.layers[0].input_layernorm.ln_tuning_layers["default"]
    calls = []
    copy.register_forward_hook(lambda *_: calls.append(1))
    ddp = DistributedDataParallel(model)
    _train(ddp, _batch(rank))
    ddp.module.save_pretrained(out / "adapter", is_main_process=rank == 0)
    params = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    return {"params": params, "forward_calls": len(calls)}


def _fsdp2_worker(rank: int, out: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    _train(model, _batch(rank))
    # Called on every rank: all gather the sharded adapters (DTensors), rank 0 writes.
    model.save_pretrained(out / "adapter", is_main_process=rank == 0)
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    return {"params": params, "sharded": sharded}


def _fsdp1_worker(rank: int, out: Path) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = _model()
    fsdp = FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        use_orig_params=True,  # each flat param mixes frozen base weights and trainable copies
        device_id=torch.device("cpu"),  # without it FSDP1 refuses to run when no accelerator exists
    )
    _train(fsdp, _batch(rank))
    with FullyShardedDataParallel.summon_full_params(fsdp, writeback=False):
        fsdp.module.save_pretrained(out / "adapter", is_main_process=rank == 0)
        params = {_without_fsdp1_wrappers(n): p.detach().clone() for n, p in fsdp.module.named_parameters()}
    return {"params": params}


WORKERS = {
    "ddp": _ddp_worker,
    "ddp_checkpointing": functools.partial(_ddp_checkpointed_worker, use_reentrant=False),
    "ddp_checkpointing_reentrant": functools.partial(_ddp_checkpointed_worker, use_reentrant=True),
    "fsdp2": _fsdp2_worker,
    "fsdp1": _fsdp1_worker,
}


def _worker_main(out: Path, scenarios: list[str]) -> None:
    """Entry point of a worker process: join the group, run each scenario, write ``<scenario>/rank<N>.pt``."""
    rank = int(os.environ["RANK"])
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'rendezvous'}",
        rank=rank,
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(seconds=WORKER_TIMEOUT_S // 2),  # a collective that waits longer raises
    )
    try:
        for scenario in scenarios:
            folder = out / scenario
            folder.mkdir(exist_ok=True)
            result = WORKERS[scenario](rank, folder)
            dist.barrier()
            torch.save(result, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """All `WORKERS` scenarios run once, in one pair of processes (start-up dominates the time)."""
    out = tmp_path_factory.mktemp("distributed")
    procs = []
    for rank in range(WORLD_SIZE):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "LOCAL_WORLD_SIZE": str(WORLD_SIZE),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, __file__, str(out), *WORKERS]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        logs = [proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = [proc.communicate()[0] for proc in procs]
        pytest.fail(f"distributed workers hung for {WORKER_TIMEOUT_S} s:\n" + "\n".join(logs))
    report = "\n".join(
        f"--- rank {r} exited with {p.returncode}:\n{log}" for r, (p, log) in enumerate(zip(procs, logs))
    )
    return out, report


def _results(launched: tuple[Path, str], scenario: str) -> list[dict]:
    """Each rank's result for ``scenario``; fails with the workers' output if a rank did not finish it."""
    out, report = launched
    files = [out / scenario / f"rank{rank}.pt" for rank in range(WORLD_SIZE)]
    if not all(f.exists() for f in files):
        pytest.fail(f"{scenario} did not finish on every rank:\n{report}")
    return [torch.load(f, weights_only=True) for f in files]


@pytest.fixture(scope="module")
def single_process() -> PeftModel:
    """The reference: one process, no wrapper, trained on the whole batch."""
    model = _model()
    _train(model, _batch())
    return model


def _check_training(results: list[dict], single: PeftModel, out: Path) -> None:
    """Adapter equal on every rank and to ``single``; every other parameter untouched; one PEFT-format save."""
    fresh = dict(_model().named_parameters())
    trained = dict(single.named_parameters())
    adapter = {n for n, p in trained.items() if p.requires_grad}
    assert adapter and all(".ln_tuning_layers.default." in n for n in adapter)
    for rank, result in enumerate(results):
        params = result["params"]
        assert params.keys() == trained.keys(), f"rank {rank}: parameter names differ"
        for name, value in params.items():
            if name in adapter:
                torch.testing.assert_close(value, trained[name], atol=1e-6, rtol=0, msg=f"rank {rank}: {name}")
                assert not torch.equal(value, fresh[name]), f"{name} did not train"
            else:
                assert torch.equal(value, fresh[name]), f"rank {rank}: frozen {name} changed"
    for name in adapter:
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), f"ranks differ on {name}"

    saved = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in saved.iterdir()}
    weights = load_file(saved / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(single)
    assert weights.keys() == expected.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, expected[key].detach(), atol=1e-6, rtol=0, msg=key)
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), saved)
    batch = _batch()
    with torch.no_grad():  # no dropout in the tiny Llama: train and eval mode compute the same
        torch.testing.assert_close(loaded(**batch).logits, single(**batch).logits, atol=1e-5, rtol=0)


def test_ddp_syncs_only_the_adapter(launched: tuple[Path, str], single_process: PeftModel) -> None:
    results = _results(launched, "ddp")
    _check_training(results, single_process, launched[0] / "ddp")
    adapter = sorted(n for n, p in single_process.named_parameters() if p.requires_grad)
    for rank, result in enumerate(results):
        assert len(result["synced"]) == STEPS, f"rank {rank}: expected one bucket per step, got {result['synced']}"
        for bucket in result["synced"]:
            assert bucket == adapter, f"rank {rank}: DDP synchronised {bucket}, expected only {adapter}"


@pytest.mark.parametrize("scenario", ["ddp_checkpointing", "ddp_checkpointing_reentrant"])
def test_ddp_with_gradient_checkpointing(launched: tuple[Path, str], single_process: PeftModel, scenario: str) -> None:
    results = _results(launched, scenario)
    assert [r["forward_calls"] for r in results] == [2 * STEPS] * WORLD_SIZE, "blocks were not recomputed"
    _check_training(results, single_process, launched[0] / scenario)


def test_fsdp2_fully_shard(launched: tuple[Path, str], single_process: PeftModel) -> None:
    results = _results(launched, "fsdp2")
    assert all(result["sharded"] for result in results), "fully_shard left plain (unsharded) parameters"
    _check_training(results, single_process, launched[0] / "fsdp2")


def test_fsdp1_use_orig_params(launched: tuple[Path, str], single_process: PeftModel) -> None:
    """Nested auto-wrapping puts ``_fsdp_wrapped_module`` in module paths; the saved keys must not have it."""
    _check_training(_results(launched, "fsdp1"), single_process, launched[0] / "fsdp1")


def test_wrapper_modules_stay_out_of_checkpoint_keys(single_process: PeftModel) -> None:
    """torch's checkpoint_wrapper (as FSDP1 auto-wrap) inserts a module into every block's path."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = _model()
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    names = [n for n, _ in model.named_modules()]
    assert any("_checkpoint_wrapped_module" in n for n in names)
    _train(model, _batch())
    state = get_peft_model_state_dict(model)
    expected = get_peft_model_state_dict(single_process)
    assert state.keys() == expected.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)


if __name__ == "__main__":
    _worker_main(Path(sys.argv[1]), sys.argv[2:])
