"""Peak memory and step time of an LN tuning train step with and without gradient checkpointing.

    python benchmarks/gradient_checkpointing.py [--quick] [--threads 1] [--device cpu|cuda]

Each configuration runs in its own process (peak memory is a high-water mark, so runs must not share
one): build a randomly initialised Llama with lntune's LN tuning, then measure one forward + backward.

* CPU: peak resident memory of the step above the resident memory before it
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after minus before), with glibc's mmap threshold
  fixed at 64 KiB (`MEMORY_ENV`) so that every large tensor is mapped and unmapped as PyTorch
  allocates and frees it, and RSS follows what PyTorch holds rather than the allocator's slack.
* CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the memory allocated before it.

The step time is the median of a few steps after a warm-up, in another process with the default
allocator settings (the fixed threshold costs page faults). The loss and the norm of the adapter gradients are
printed next to each row: checkpointing must not change them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
from timing import llama, lntune_model, parser, sync, table, token_ids

CONFIGS = {
    "no checkpointing": None,
    "checkpointing, use_reentrant=False": {"use_reentrant": False},
    "checkpointing, use_reentrant=True": {"use_reentrant": True},
}
SHAPE = dict(layers=8, hidden=256, batch=4, seq=512)
QUICK_SHAPE = dict(layers=4, hidden=128, batch=2, seq=128)
TIMED_STEPS = 3
# glibc otherwise raises its mmap threshold as blocks are freed and keeps freed activations in the heap,
# so RSS would count allocator slack; a fixed threshold returns every large block to the system on free.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _peak_bytes_so_far(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _baseline_bytes(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _peak_bytes_so_far(device)


def measure(config: str, what: str, layers: int, hidden: int, batch: int, seq: int, device: str) -> dict:
    """One configuration, in this process: the first step's peak extra memory, or the median step time.

    Args:
        config: A key of `CONFIGS`.
        what: ``memory`` (``{"peak_mib", "loss", "grad_norm"}``) or ``time`` (``{"step_s"}``).
        layers, hidden, batch, seq: The Llama's depth and width, and the batch shape.
        device: ``cpu`` or ``cuda``.

    Returns:
        The measurement, as above.

    Example:
        >>> measure("no checkpointing", "memory", **QUICK_SHAPE, device="cpu")["peak_mib"] > 0
        True
    """
    model = lntune_model(llama(layers, hidden)).to(device).train()
    kwargs = CONFIGS[config]
    if kwargs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Transformers 5 renamed the method
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ids = token_ids(batch, seq, device=device)

    def step() -> float:
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync(device)
        return loss.item()

    if what == "memory":
        before = _baseline_bytes(device)
        loss = step()
        peak = _peak_bytes_so_far(device) - before
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return {"peak_mib": peak / 2**20, "loss": loss, "grad_norm": torch.linalg.vector_norm(grads).item()}
    step()  # warm-up
    times = []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times)}


def _run_child(name: str, what: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, what, "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, **(MEMORY_ENV if what == "memory" else {})}
    out = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{name} ({what}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.child:
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore", message=".*use_cache=True.*")
        print(json.dumps(measure(*args.child, **shape, device=args.device)))
        return
    print(
        f"torch {torch.__version__}; device {args.device}; torch threads {args.threads}; Llama with "
        f"{shape['layers']} layers, hidden {shape['hidden']}; batch {shape['batch']} x seq {shape['seq']}\n"
    )
    rows, base = [], None
    for name in CONFIGS:
        result = {**_run_child(name, "memory", args), **_run_child(name, "time", args)}
        base = base or result
        rows.append(
            [
                name,
                f"{result['peak_mib']:.1f}",
                f"{result['peak_mib'] / base['peak_mib']:.2f}x",
                f"{result['step_s']:.3f}",
                f"{result['step_s'] / base['step_s']:.2f}x",
                f"{result['loss']:.6f}",
                f"{result['grad_norm']:.6g}",
            ]
        )
    headers = ["configuration", "peak step memory MiB", "vs none", "step s", "vs none", "loss", "adapter grad norm"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
