"""Forward overhead of the LN tuning wrapper against the bare model, lntune and PEFT side by side.

    python benchmarks/bench_forward.py [--quick] [--threads 1] [--device cpu|cuda]

Shapes: a deep narrow Llama (48 layers, hidden 64) at batch 1 x seq 8, where the per-norm-call cost
of a wrapper shows most (97 wrapped norms), and a larger one (8 layers, hidden 512, batch 4 x seq 128).
Variants: the bare model, lntune and PEFT with the adapter active, and both merged. Inference under
``torch.no_grad()``; targets: lntune within 1% of the bare model, merged within 0.5%. A deep copy of
the bare model is timed too: how far two identical models differ is the noise floor of the table.
"""

from __future__ import annotations

from timing import (
    TIME_HEADERS,
    forward_variants,
    interleaved,
    llama,
    no_grad_forward,
    parser,
    setup,
    shapes,
    summarize,
    table,
    token_ids,
)


def bench_shape(layers: int, hidden: int, batch: int, seq: int, args) -> list[list[str]]:
    base = llama(layers, hidden).to(args.device)
    ids = token_ids(batch, seq, device=args.device)
    models = forward_variants(base)
    samples = interleaved({name: no_grad_forward(m, ids) for name, m in models.items()}, args.rounds, args.device)
    return summarize(samples, baseline="bare model")


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    for title, shape in shapes(args).items():
        print(f"### Forward, {title}\n")
        print(table(TIME_HEADERS, bench_shape(**shape, args=args)) + "\n")


if __name__ == "__main__":
    main()
