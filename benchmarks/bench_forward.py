"""Forward overhead of the LN tuning wrapper against the bare model, lntune and PEFT side by side.

    python benchmarks/bench_forward.py [--quick] [--instances 9] [--rounds 21] [--clock cpu] [--probe] [--narrow-only]

Shapes: a deep narrow Llama (48 layers, hidden 64, batch 1 x seq 8: 97 wrapped norms, where a
wrapper's per-call cost shows most) and a larger one (8 layers, hidden 512, batch 4 x seq 128).
Variants (`timing.FORWARD_VARIANTS`): the bare model, lntune and PEFT with the adapter active, both
merged, and lntune's ``merge_and_unload()``. Inference under ``torch.no_grad()``.

Two copies of the same model differ in speed by a percent or more on this CPU, from where their
tensors and Python objects landed in memory: one second copy is not a noise floor. So each variant
is built ``--instances`` times (every one a deep copy), every instance is timed round-robin with all
others, and the table gives per variant the median over its instances (of each instance's median),
its ratio to the bare model's, and the range of its instances' ratios. The bare model's own range is
the noise floor. Instances are built in a shuffled order, each after an allocation of random size
(tensor memory and Python objects), and timed in a shuffled order (``--seed``): built in a fixed
pattern, every instance of one variant lands at the same offsets and the layout's cost looks like
the variant's. A last table times one call of a norm alone (bare, wrapped, wrapped and merged): the
wrapper's own cost per call, without the rest of the model.

``--probe`` adds a variant for measurement only: lntune merged with wrappers that call the module's
``forward`` without any check (wrong as soon as a hook is registered). Against lntune merged, it
shows what the per-call checks of hooks, compiled calls and tracing cost, and what the wrapper's own
Python frame costs against the bare model.
"""

from __future__ import annotations

import copy
import functools
import random
import statistics

from timing import FORWARD_VARIANTS, interleaved, llama, no_grad_forward, parser, setup, shapes, table, token_ids

HEADERS = ["variant", "median ms", "vs bare model", "instances' range", "instances"]


PROBE = "lntune merged, calls unchecked (probe)"


@functools.cache
def _unchecked_class() -> type:
    from lntune import LNTuningLayer

    class UncheckedLayer(LNTuningLayer):
        def __call__(self, *args, **kwargs):
            return self._direct.forward(*args, **kwargs)

    return UncheckedLayer


def unchecked(base):
    """lntune merged, every wrapper calling its module's forward with no check at all (a probe: hooks are skipped)."""
    from lntune import LNTuningLayer

    model = FORWARD_VARIANTS["lntune merged"](base)
    for module in model.modules():
        if type(module) is LNTuningLayer:
            module.__class__ = _unchecked_class()
    return model


def bench_shape(layers: int, hidden: int, batch: int, seq: int, args) -> list[list[str]]:
    import torch

    variants = {**FORWARD_VARIANTS, PROBE: unchecked} if args.probe else FORWARD_VARIANTS

    base = llama(layers, hidden).to(args.device)
    ids = token_ids(batch, seq, device=args.device)
    rng = random.Random(args.seed)
    names = [name for name in variants for _ in range(args.instances)]
    rng.shuffle(names)
    instances: dict[str, list] = {}
    padding = []  # kept alive, so that each instance starts at a random offset
    for name in names:
        padding.append(torch.empty(rng.randrange(1, 1 << 16), device=args.device))  # moves tensors
        padding.append([object() for _ in range(rng.randrange(1, 2000))])  # moves Python objects
        instances.setdefault(name, []).append(variants[name](base))
    keys = [(name, i) for name, models in instances.items() for i in range(len(models))]
    rng.shuffle(keys)
    fns = {(name, i): no_grad_forward(instances[name][i], ids) for name, i in keys}
    samples = interleaved(fns, args.rounds, args.device)
    per_instance = {key: statistics.median(values) for key, values in samples.items()}
    medians = {name: [per_instance[name, i] for i in range(len(instances[name]))] for name in variants}
    bare = statistics.median(medians["bare model"])
    rows = []
    for name, values in medians.items():
        ratios = [v / bare for v in values]
        rows.append(
            [
                name,
                f"{statistics.median(values) * 1e3:.3f}",
                f"{statistics.median(values) / bare:.3f}x",
                f"{min(ratios):.3f}-{max(ratios):.3f}x",
                str(len(values)),
            ]
        )
    return rows


def bench_one_call(args) -> list[list[str]]:
    """One ``LlamaRMSNorm(64)`` call on a 1 x 8 x 64 input: the bare module, lntune's wrapper, merged."""
    import torch

    from lntune import LNTuningLayer

    norm = llama(1, 64).model.norm.to(args.device)
    x = torch.randn(1, 8, 64, device=args.device)
    wrapped, merged = LNTuningLayer(copy.deepcopy(norm), "default"), LNTuningLayer(copy.deepcopy(norm), "default")
    wrapped.set_adapter("default")
    merged.merge(["default"])
    modules = {"bare module": norm, "lntune layer": wrapped, "lntune layer, merged": merged}

    def call(module):
        def run() -> None:
            with torch.no_grad():
                module(x)

        return run

    samples = interleaved({name: call(module) for name, module in modules.items()}, args.rounds, args.device)
    bare = statistics.median(samples["bare module"])
    return [
        [name, f"{statistics.median(v) * 1e6:.2f} us", f"{statistics.median(v) / bare:.3f}x"]
        for name, v in samples.items()
    ]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=9, help="models built per variant (default 9; quick: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the build and timing orders and the padding")
    p.add_argument("--probe", action="store_true", help="add lntune merged with unchecked calls (see above)")
    p.add_argument("--narrow-only", action="store_true", help="time the deep narrow shape only, not the larger one")
    args = p.parse_args()
    if args.quick:
        args.instances = min(args.instances, 2)
    setup(args)
    for title, shape in list(shapes(args).items())[: 1 if args.narrow_only else None]:
        print(f"### Forward, {title}\n")
        print(table(HEADERS, bench_shape(**shape, args=args)) + "\n")
    print("### One norm call (LlamaRMSNorm(64), input 1 x 8 x 64)\n")
    print(table(["module", "median per call", "vs bare module"], bench_one_call(args)) + "\n")


if __name__ == "__main__":
    main()
