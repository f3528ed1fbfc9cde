"""Adapter management times, lntune against PEFT: wrap, add, switch, save, load.

    python benchmarks/bench_ops.py [--quick] [--threads 1] [--device cpu|cuda]

On a Llama (24 layers, hidden 256: 49 wrapped norms). Each operation gets a fresh, untimed setup
(a deep copy of the base model, a wrapped model...) and only the operation itself is timed; lntune
and PEFT alternate, round after round.

* wrap: ``get_peft_model(model, LNTuningConfig(task_type="CAUSAL_LM"))``
* add: ``add_adapter("extra", config)`` on a wrapped model
* switch: ``set_adapter("b")`` on a model with adapters ``default`` and ``b``
* save: ``save_pretrained(folder)`` (safetensors)
* load: ``PeftModel.from_pretrained(base, folder)`` (includes wrapping)
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable

from timing import llama, parser, setup, table


def _libraries():
    import peft

    import lntune

    return {"lntune": lntune, "PEFT": peft}


def timed(cases: dict[str, tuple[Callable[[], object], Callable[[object], object]]], rounds: int) -> dict:
    """Seconds of ``op(setup())`` for each case, timing only ``op``; cases alternate every round."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds + 1):  # round 0 warms up
        for name in names[r % len(names) :] + names[: r % len(names)]:
            prepare, op = cases[name]
            state = prepare()
            start = time.perf_counter()
            op(state)
            if r:
                samples[name].append(time.perf_counter() - start)
    return samples


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    layers, hidden = (4, 64) if args.quick else (24, 256)
    base = llama(layers, hidden).to(args.device)
    libs = _libraries()
    folder = tempfile.mkdtemp()

    def config(lib):
        return lib.LNTuningConfig(task_type="CAUSAL_LM")

    def wrapped(lib, extra: bool = False):
        model = lib.get_peft_model(copy.deepcopy(base), config(lib))
        if extra:
            model.add_adapter("b", config(lib))
        return model

    for name, lib in libs.items():
        wrapped(lib).save_pretrained(f"{folder}/{name}")
    ops = {
        "wrap": lambda name, lib: (lambda: copy.deepcopy(base), lambda m: lib.get_peft_model(m, config(lib))),
        "add adapter": lambda name, lib: (lambda: wrapped(lib), lambda m: m.add_adapter("extra", config(lib))),
        "switch adapter": lambda name, lib: (lambda: wrapped(lib, extra=True), lambda m: m.set_adapter("b")),
        "save": lambda name, lib: (lambda: wrapped(lib), lambda m: m.save_pretrained(tempfile.mkdtemp(dir=folder))),
        "load": lambda name, lib: (
            lambda: copy.deepcopy(base),
            lambda m: lib.PeftModel.from_pretrained(m, f"{folder}/{name}"),
        ),
    }
    rows = []
    for op_name, make in ops.items():
        samples = timed({lib_name: make(lib_name, lib) for lib_name, lib in libs.items()}, args.rounds)
        med = {k: statistics.median(v) for k, v in samples.items()}
        for lib_name, values in samples.items():
            ratio = f"{med[lib_name] / med['PEFT']:.2f}x"
            rows.append([op_name, lib_name, f"{med[lib_name] * 1e3:.2f}", f"{min(values) * 1e3:.2f}", ratio])
    print(f"### Adapter operations, Llama {layers} layers, hidden {hidden}\n")
    print(table(["operation", "library", "median ms", "min ms", "vs PEFT"], rows) + "\n")


if __name__ == "__main__":
    main()
