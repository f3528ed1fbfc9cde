"""Forward overhead in executed instructions (callgrind): a measure that other jobs on the machine cannot move.

    python benchmarks/bench_forward_instructions.py [--quick] [--forwards 20]

Wall-clock ratios of a few percent drown in noise on a shared CPU (two identical models differ by
1-3% from run to run). Instructions executed are deterministic for a given binary and input, so this
script counts them: it re-runs itself under ``valgrind --tool=callgrind`` with instrumentation off,
and around each variant's forwards switches it on (``callgrind_control``), so model building and
imports are not counted. Variants as in ``bench_forward.py`` (deep narrow Llama, 48 layers, hidden
64, batch 1 x seq 8, 97 wrapped norms): the bare model, a copy of it (the noise floor, from memory
layout), lntune and PEFT with the adapter active, and both merged. Reported: instructions per
forward and the ratio to the bare model. Instructions are not time (a cache miss costs more than an
add), but on a CPU-bound forward of small tensors they follow it closely. Needs valgrind.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from timing import forward_variants, llama, table, token_ids

UNDER_VALGRIND = "LNTUNE_UNDER_CALLGRIND"


def callgrind(command: str, *args: str) -> None:
    subprocess.run(["callgrind_control", command, *args, str(os.getpid())], check=True, capture_output=True)


def measure(args: argparse.Namespace) -> None:
    """Inside valgrind: run each variant with instrumentation on and dump its counts."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    layers = 12 if args.quick else 48
    base = llama(layers, 64)
    ids = token_ids(1, 8)
    variants = {"bare model, a copy": copy.deepcopy(base), **forward_variants(base)}
    with torch.no_grad():
        for name, model in variants.items():
            for _ in range(3):  # warm-up: first calls fill caches
                model(input_ids=ids)
            callgrind("--zero")
            callgrind("--instr=on")
            for _ in range(args.forwards):
                model(input_ids=ids)
            callgrind("--instr=off")
            callgrind(f"--dump={name}")


def totals(out_dir: str) -> dict[str, int]:
    """``{variant: instructions}`` from the dump files, in the order they were written.

    Each dump names its variant in its ``desc: Trigger: dump <name>`` line; ``totals:`` is its count.
    """
    found = {}
    dumps = [f for f in os.listdir(out_dir) if re.fullmatch(r"callgrind\.out\.\d+", f)]
    for path in sorted(dumps, key=lambda f: int(f.rsplit(".", 1)[1])):
        text = Path(out_dir, path).read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: dump (.+)$", text, re.M)
        total = re.search(r"^totals: (\d+)$", text, re.M)
        if trigger and total:
            found[trigger.group(1).strip()] = int(total.group(1))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="12 layers, 3 forwards: checks that it runs")
    p.add_argument("--forwards", type=int, default=None, help="forwards counted per variant (default 20)")
    args = p.parse_args()
    args.forwards = args.forwards or (3 if args.quick else 20)
    if os.environ.get(UNDER_VALGRIND):
        measure(args)
        return
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("bench_forward_instructions.py needs valgrind (Debian/Ubuntu: apt-get install valgrind).")
    out_dir = tempfile.mkdtemp(prefix="lntune-callgrind-")
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_dir}/callgrind.out",
        sys.executable,
        *sys.argv,
    ]
    subprocess.run(command, check=True, env={**os.environ, UNDER_VALGRIND: "1"}, capture_output=True)
    counts = totals(out_dir)
    base = counts["bare model"]
    rows = [[name, f"{count / args.forwards:,.0f}", f"{count / base:.4f}x"] for name, count in counts.items()]
    import peft
    import transformers

    layers = 12 if args.quick else 48
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"callgrind; {args.forwards} forwards per variant\n"
    )
    print(f"### Forward instructions, deep narrow: {layers} layers, hidden 64, batch 1 x seq 8\n")
    print(table(["variant", "instructions per forward", "vs bare model"], rows))
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
