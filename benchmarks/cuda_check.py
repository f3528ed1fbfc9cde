"""Correctness checks on a CUDA device (the test suite runs on CPU): bf16 model, float32 adapters.

    python benchmarks/cuda_check.py

Each check prints PASS/FAIL with the largest difference; the script exits non-zero on any FAIL.
1. identity at init on a bf16 Llama with float32 adapters; outputs stay bf16;
2. a mixed-adapter batch equals each sample run alone with its adapter;
3. lntune -> PEFT and PEFT -> lntune adapter files give the same outputs;
4. merge_and_unload gives the adapter's outputs and a model entirely in bf16;
5. torch.compile'd model: hotswap_adapter changes outputs without recompiling.
"""

from __future__ import annotations

import copy
import sys
import tempfile

import peft
import torch
from timing import llama, token_ids

import lntune

FAILED = []


def check(name: str, a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    diff = float((a.float() - b.float()).abs().max())
    ok = diff <= atol
    print(f"{'PASS' if ok else 'FAIL'}  {name}: max |diff| = {diff:.3g} (atol {atol})")
    if not ok:
        FAILED.append(name)


def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.2).to(p))


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(input_ids=ids, **kwargs).logits


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script itself
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(name, "torch", torch.__version__, "peft", peft.__version__)
    base = llama(4, 256).to(device=device, dtype=torch.bfloat16)
    ids = token_ids(4, 32, device=device)
    ref = logits(base, ids)

    model = lntune.get_peft_model(copy.deepcopy(base), lntune.LNTuningConfig(task_type="CAUSAL_LM"))
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    out = logits(model, ids)
    print(
        f"{'PASS' if out.dtype == torch.bfloat16 and dtypes == {torch.float32} else 'FAIL'}  dtypes: "
        f"output {out.dtype}, adapter {dtypes}"
    )
    check("1. identity at init (bf16 model, fp32 adapters)", out, ref, 0.0)

    perturb(model, 0)
    model.add_adapter("b", lntune.LNTuningConfig(task_type="CAUSAL_LM"))
    model.set_adapter("b")
    perturb(model, 1)
    names = ["default", "b", "__base__", "default"]
    mixed = logits(model, ids, adapter_names=names)
    alone = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone.append(logits(model, ids[i : i + 1]))
        else:
            model.set_adapter(name)
            alone.append(logits(model, ids[i : i + 1]))
    check("2. mixed-adapter batch == each sample alone", mixed, torch.cat(alone), 5e-2)

    model.set_adapter("default")
    tuned = logits(model, ids)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), d, autocast_adapter_dtype=False)
        # PEFT keeps bf16 copies: compare against lntune's outputs in bf16 (same rounding of weights).
        check("3a. lntune adapter loaded in PEFT", logits(theirs, ids), tuned, 0.0)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LNTuningConfig(task_type="CAUSAL_LM"))
        perturb(pm, 2)
        pm.save_pretrained(d + "/peft")
        ours = lntune.PeftModel.from_pretrained(copy.deepcopy(base), d + "/peft")
        check("3b. PEFT adapter loaded in lntune", logits(ours, ids), logits(pm, ids), 0.0)

    merged = model.merge_and_unload()
    dtypes = {p.dtype for p in merged.parameters()}
    print(f"{'PASS' if dtypes == {torch.bfloat16} else 'FAIL'}  4. merged model dtypes {dtypes}")
    check("4. merge_and_unload == adapter output", logits(merged, ids), tuned, 0.0)

    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    served = lntune.get_peft_model(copy.deepcopy(base), lntune.LNTuningConfig(task_type="CAUSAL_LM"))
    served.eval()
    with tempfile.TemporaryDirectory() as d:
        other = lntune.get_peft_model(copy.deepcopy(base), lntune.LNTuningConfig(task_type="CAUSAL_LM"))
        perturb(other, 3)
        other.save_pretrained(d)
        compiled = torch.compile(served, backend=counter)
        before = logits(compiled, ids)
        frames = counter.frame_count
        lntune.hotswap_adapter(served, d)
        after = logits(compiled, ids)
        print(
            f"{'PASS' if counter.frame_count == frames else 'FAIL'}  5. frames compiled before/after "
            f"hotswap: {frames}/{counter.frame_count}"
        )
        check("5. compiled output follows the hot-swapped adapter", after, logits(other, ids), 0.0)
        if torch.equal(before, after):
            FAILED.append("5. hotswap changed nothing")
    print("FAILED:", FAILED if FAILED else "none")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
