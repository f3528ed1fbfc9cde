"""Train-step time and peak memory of LN tuning: lntune against PEFT and the bare-model floor.

    python benchmarks/bench_train.py [--quick] [--threads 1] [--device cpu|cuda]

A step is forward + loss + backward + AdamW step + zero_grad on a causal-LM batch. Variants: the
bare model with only its norm weights trainable (the floor any LN tuning wrapper can reach), lntune
and PEFT. Times are interleaved in one process.

Peak memory: each variant runs in its own fresh subprocess, which builds the model, runs one
no-grad forward (so that lazily allocated buffers exist), records the memory in use, then trains 3
steps and reports the increase of the peak: activations, gradients and optimizer state. On CUDA
this is ``torch.cuda.max_memory_allocated()`` (exact). On Linux CPUs it is the process's peak
resident set size (``VmHWM`` in ``/proc/self/status``) minus its resident size before the steps,
after returning freed heap memory to the OS (``malloc_trim``) and resetting the peak (writing 5 to
``/proc/self/clear_refs``). It counts pages, so it includes allocator slack: compare variants and
ignore differences of a few MB.
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys

import torch
from timing import (
    TIME_HEADERS,
    interleaved,
    llama,
    lntune_model,
    parser,
    peft_model,
    setup,
    shapes,
    summarize,
    table,
    token_ids,
)

VARIANTS = ["bare model, norms trainable", "lntune", "PEFT"]


def build(variant: str, layers: int, hidden: int, device: str) -> torch.nn.Module:
    base = llama(layers, hidden).to(device)
    if variant == "lntune":
        return lntune_model(base)
    if variant == "PEFT":
        return peft_model(base)
    base.requires_grad_(False)
    for name, param in base.named_parameters():
        param.requires_grad_(name.endswith("norm.weight"))
    return base


def train_step(model: torch.nn.Module, ids: torch.Tensor):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def peak_memory_child(variant: str, layers: int, hidden: int, batch: int, seq: int, device: str) -> float:
    """MB of peak memory added by 3 train steps (see the module docstring); runs in a fresh process."""
    model = build(variant, layers, hidden, device)
    ids = token_ids(batch, seq, device=device)
    with torch.no_grad():
        model(input_ids=ids)
    step = train_step(model, ids)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident size
        before = _status_kb("VmRSS") * 1024
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return (_status_kb("VmHWM") * 1024 - before) / 2**20


def peak_memory(variant: str, shape: dict, args) -> float:
    spec = json.dumps({"variant": variant, "device": args.device, **shape})
    code = (
        "import json, sys, torch; from bench_train import peak_memory_child; "
        f"torch.set_num_threads({args.threads}); print(peak_memory_child(**json.loads(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, spec], capture_output=True, text=True, check=True, cwd=sys.path[0]
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    chosen = shapes(args)
    for title, shape in chosen.items():
        ids = token_ids(shape["batch"], shape["seq"], device=args.device)
        steps = {v: train_step(build(v, shape["layers"], shape["hidden"], args.device), ids) for v in VARIANTS}
        samples = interleaved(steps, args.rounds, args.device)
        print(f"### Train step, {title}\n")
        print(table(TIME_HEADERS, summarize(samples, baseline="bare model, norms trainable")) + "\n")
    title, shape = list(chosen.items())[-1]
    repeats = 1 if args.quick else 3
    rows = []
    for variant in VARIANTS:
        values = [peak_memory(variant, shape, args) for _ in range(repeats)]
        rows.append([variant] + [f"{min(values):.1f}", f"{max(values):.1f}"])
    how = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "VmHWM increase"
    print(f"### Peak memory of 3 train steps, {title} ({how}, {repeats} fresh processes each)\n")
    print(table(["variant", "min MB", "max MB"], rows) + "\n")


if __name__ == "__main__":
    main()
