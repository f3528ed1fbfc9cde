"""Shared helpers of the speed benchmarks: interleaved timing, tiny Llama models, markdown tables.

Every benchmark times its variants round-robin in one process (variant A, B, C, A, B, C...), so that
noise from other processes hits all of them alike, and reports the median with min and max over the
rounds. Run any script with ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch

#: What `interleaved` reads: elapsed time, or the calling thread's CPU time (set by `setup` from ``--clock``).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = CLOCKS["wall"]


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="few rounds and small shapes: checks that it runs")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 15, quick: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: this thread's CPU time, steadier on a CPU shared with other "
        "jobs (CPU devices only: it does not count waiting for a GPU)",
    )
    return p


def setup(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and ``--clock``, fill in ``--rounds`` and print the environment line."""
    import peft
    import transformers

    global clock
    clock = CLOCKS[args.clock]

    warnings.filterwarnings("ignore")  # PEFT's "Unsupported layer type" and Transformers deprecations
    torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (3 if args.quick else 15)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"device {args.device} ({device}); torch threads {torch.get_num_threads()}; "
        f"{args.rounds} interleaved rounds{' (--quick)' if args.quick else ''}; {args.clock} clock\n"
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, device: str = "cpu", min_time: float = 0.05
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``rounds`` samples each, taken round-robin.

    Each function is warmed up and calibrated to run at least ``min_time`` seconds per sample; the
    order of the functions rotates every round.
    """
    loops = {}
    for name, fn in fns.items():
        fn()
        sync(device)
        start, n = clock(), 0
        while clock() - start < min_time / 2 or n < 2:
            fn()
            n += 1
        sync(device)
        loops[name] = max(1, int(n * min_time / (clock() - start) * 0.5 + 0.5))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = fns[name], loops[name]
            sync(device)
            start = clock()
            for _ in range(n):
                fn()
            sync(device)
            samples[name].append((clock() - start) / n)
    return samples


def summarize(samples: dict[str, list[float]], baseline: str | None = None, unit: float = 1e-3) -> list[list[str]]:
    """Rows ``[name, median, min, max, ratio of medians, paired ratio]`` (times in ``unit`` seconds).

    The paired ratio is the median over rounds of ``time / baseline's time in the same round``: variants
    of one round run back to back, so it cancels slow drifts of the machine that the medians keep.
    """
    base = samples[baseline] if baseline else None
    rows = []
    for name, values in samples.items():
        med = statistics.median(values)
        ratio = f"{med / statistics.median(base):.3f}x" if base else ""
        paired = f"{statistics.median(v / b for v, b in zip(values, base)):.3f}x" if base else ""
        rows.append(
            [name, f"{med / unit:.3f}", f"{min(values) / unit:.3f}", f"{max(values) / unit:.3f}", ratio, paired]
        )
    return rows


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def llama(layers: int, hidden: int, heads: int = 4, vocab: int = 256, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Llama causal LM (nothing is downloaded), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).eval()


def lntune_model(base: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``lntune.get_peft_model`` on a deep copy of ``base`` (default Llama targets)."""
    import lntune

    return lntune.get_peft_model(copy.deepcopy(base), lntune.LNTuningConfig(task_type="CAUSAL_LM"), **kwargs)


def peft_model(base: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """PEFT's ``get_peft_model`` with its LN tuning on a deep copy of ``base``."""
    import peft

    return peft.get_peft_model(copy.deepcopy(base), peft.LNTuningConfig(task_type="CAUSAL_LM"), **kwargs)


def _merged(model: torch.nn.Module) -> torch.nn.Module:
    model.merge_adapter()
    return model


#: The models the forward benchmarks compare, each built from a deep copy of the base model: the bare
#: model, lntune and PEFT with the adapter active, both merged, and lntune's ``merge_and_unload()`` (a
#: plain model again).
FORWARD_VARIANTS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "bare model": copy.deepcopy,
    "lntune": lntune_model,
    "PEFT": peft_model,
    "lntune merged": lambda base: _merged(lntune_model(base)),
    "PEFT merged": lambda base: _merged(peft_model(base)),
    "lntune merge_and_unload": lambda base: lntune_model(base).merge_and_unload(),
}


def forward_variants(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """One model of each of `FORWARD_VARIANTS`, built from ``base``."""
    return {name: build(base) for name, build in FORWARD_VARIANTS.items()}


def token_ids(batch: int, seq: int, vocab: int = 256, device: str = "cpu", seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def no_grad_forward(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """A function that runs ``model(input_ids=ids)`` under ``torch.no_grad()``."""

    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    return run


TIME_HEADERS = ["variant", "median ms", "min ms", "max ms", "vs baseline", "paired"]


# The two model shapes of the forward, train-step and dtype benchmarks.
SHAPES = {
    "deep narrow: 48 layers, hidden 64, batch 1 x seq 8": dict(layers=48, hidden=64, batch=1, seq=8),
    "larger: 8 layers, hidden 512, batch 4 x seq 128": dict(layers=8, hidden=512, batch=4, seq=128),
}
QUICK_SHAPES = {
    "deep narrow: 12 layers, hidden 64, batch 1 x seq 8": dict(layers=12, hidden=64, batch=1, seq=8),
    "larger: 2 layers, hidden 256, batch 2 x seq 64": dict(layers=2, hidden=256, batch=2, seq=64),
}


def shapes(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """``QUICK_SHAPES`` with ``--quick``, else ``SHAPES``: ``{title: dict(layers, hidden, batch, seq)}``."""
    return QUICK_SHAPES if args.quick else SHAPES
