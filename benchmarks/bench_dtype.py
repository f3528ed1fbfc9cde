"""Cost of float32 adapters on a bfloat16 model (lntune's default) against same-dtype adapters.

    python benchmarks/bench_dtype.py [--quick] [--threads 1] [--device cpu|cuda]

A bfloat16 Llama; variants: the bare model, lntune with float32 adapters (``autocast_adapter_dtype=True``,
the default: each wrapped call casts the copy's parameters to bf16), lntune with bf16 adapters
(``autocast_adapter_dtype=False``) and PEFT (bf16 copies). Forward under ``torch.no_grad()`` and a
train step (forward + backward + AdamW), interleaved. Target: float32 adapters at most a few percent
slower than same-dtype ones. (Only the float32 adapters learn at lr 1e-4: see tests/test_dtype.py.)
"""

from __future__ import annotations

import torch
from bench_train import train_step
from timing import (
    TIME_HEADERS,
    interleaved,
    llama,
    lntune_model,
    no_grad_forward,
    parser,
    peft_model,
    setup,
    shapes,
    summarize,
    table,
    token_ids,
)


def models(layers: int, hidden: int, device: str) -> dict[str, torch.nn.Module]:
    base = llama(layers, hidden).to(device=device, dtype=torch.bfloat16)
    return {
        "bare bf16 model": base,
        "lntune, fp32 adapters": lntune_model(base),
        "lntune, bf16 adapters": lntune_model(base, autocast_adapter_dtype=False),
        "PEFT (bf16 copies)": peft_model(base),
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    for title, shape in shapes(args).items():
        ids = token_ids(shape["batch"], shape["seq"], device=args.device)
        built = models(shape["layers"], shape["hidden"], args.device)
        samples = interleaved({n: no_grad_forward(m, ids) for n, m in built.items()}, args.rounds, args.device)
        print(f"### bf16 forward, {title}\n")
        print(table(TIME_HEADERS, summarize(samples, baseline="lntune, bf16 adapters")) + "\n")
        trainable = {n: m for n, m in built.items() if n != "bare bf16 model"}
        steps = {n: train_step(m, ids) for n, m in trainable.items()}
        samples = interleaved(steps, args.rounds, args.device)
        print(f"### bf16 train step, {title}\n")
        print(table(TIME_HEADERS, summarize(samples, baseline="lntune, bf16 adapters")) + "\n")


if __name__ == "__main__":
    main()
