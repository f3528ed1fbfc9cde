"""Mixed-adapter batches: one forward where every sample uses its own adapter, against the alternatives.

    python benchmarks/bench_mixed.py [--quick] [--threads 1] [--device cpu|cuda]

A batch of 32 sequences spread over 8 adapters (sample ``i`` uses adapter ``i % 8``), on a Llama
(4 layers, hidden 256), at seq 64 and at seq 4 (short inputs, as in generation, where per-call costs
weigh most). Variants: lntune with ``adapter_names=[...]`` (one forward), lntune
with one adapter for all 32 (the baseline: same work, no mixing), lntune and PEFT running 8 sub-batches
of 4 with ``set_adapter`` between them (PEFT's only option: it has no mixed batches for LN tuning),
and PEFT with one adapter for all 32. Inference under ``torch.no_grad()``, then training
(forward + backward, every adapter trainable). Target: mixed at most 1.1x the single-adapter time.
"""

from __future__ import annotations

import torch
from timing import (
    TIME_HEADERS,
    interleaved,
    llama,
    lntune_model,
    parser,
    peft_model,
    setup,
    summarize,
    table,
    token_ids,
)

ADAPTERS = [f"a{i}" for i in range(8)]


def with_adapters(model, config_cls) -> torch.nn.Module:
    """Add adapters a1..a7 (a0 is the first) and give each different values."""
    for name in ADAPTERS[1:]:
        model.add_adapter(name, config_cls(task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".a" in name and "ln_tuning_layers" in name:
                param.add_(torch.randn(param.shape, generator=g).to(param) * 0.1)
    return model


def bench_shape(layers: int, hidden: int, batch: int, seq: int, args) -> None:
    import peft

    import lntune

    base = llama(layers, hidden).to(args.device)
    ids = token_ids(batch, seq, device=args.device)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]
    order = sorted(range(batch), key=lambda i: names[i])
    groups = {a: ids[[i for i in order if names[i] == a]] for a in ADAPTERS}
    lnt = with_adapters(lntune_model(base, adapter_name="a0"), lntune.LNTuningConfig)
    pft = with_adapters(peft_model(base, adapter_name="a0"), peft.LNTuningConfig)

    def single(model):
        model.set_adapter("a0")
        return model(input_ids=ids).logits

    def sequential(model):
        out = []
        for adapter, sub in groups.items():
            model.set_adapter(adapter)
            out.append(model(input_ids=sub).logits)
        return out

    variants = {
        "lntune, 1 adapter for all": lambda: single(lnt),
        "lntune, mixed (adapter_names)": lambda: lnt(input_ids=ids, adapter_names=names).logits,
        "lntune, 8 sub-batches + set_adapter": lambda: sequential(lnt),
        "PEFT, 1 adapter for all": lambda: single(pft),
        "PEFT, 8 sub-batches + set_adapter": lambda: sequential(pft),
    }
    shape = f"{layers} layers, hidden {hidden}, batch {batch} x seq {seq}, 8 adapters"
    with torch.no_grad():
        samples = interleaved(variants, args.rounds, args.device)
    print(f"### Mixed-adapter batch, inference, {shape}\n")
    print(table(TIME_HEADERS, summarize(samples, baseline="lntune, 1 adapter for all")) + "\n")

    lnt.train()
    lnt.set_requires_grad(ADAPTERS, True)
    training = {
        "lntune, 1 adapter for all": lambda: single(lnt).float().mean().backward(),
        "lntune, mixed (adapter_names)": lambda: lnt(input_ids=ids, adapter_names=names).logits.mean().backward(),
        "lntune, 8 sub-batches + set_adapter": lambda: sum(o.mean() for o in sequential(lnt)).backward(),
    }
    samples = interleaved(training, args.rounds, args.device)
    print(f"### Mixed-adapter batch, forward + backward, {shape}\n")
    print(table(TIME_HEADERS, summarize(samples, baseline="lntune, 1 adapter for all")) + "\n")


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    for seq in (16,) if args.quick else (64, 4):
        bench_shape(*((2, 128) if args.quick else (4, 256)), batch=32, seq=seq, args=args)


if __name__ == "__main__":
    main()
