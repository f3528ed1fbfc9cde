"""Do LN tuning adapters learn on a bfloat16 model at the usual learning rate (AdamW, lr 1e-4)?

    python benchmarks/bf16_learning.py [--quick] [--device cpu|cuda] [--steps 50] [--lr 1e-4]

A bfloat16 Llama (random init) fits a fixed batch of token sequences. Variants: lntune with float32
adapters (the default, ``autocast_adapter_dtype=True``), lntune with bf16 adapters (``False``) and PEFT
(bf16 copies). Prints the loss before and after, the share of adapter weights that moved at all, and
the largest change. In bf16 a weight near 1.0 moves in steps of 2**-7 ~ 0.008, so updates of ~1e-4
round away unless the adapter keeps float32 weights.
"""

from __future__ import annotations

import torch
from timing import llama, lntune_model, parser, peft_model, setup, table, token_ids


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float) -> list[str]:
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    total = sum(p.numel() for p in params)
    largest = max(float((p.detach().float() - b.float()).abs().max()) for p, b in zip(params, before))
    dtype = str(params[0].dtype).replace("torch.", "")
    return [dtype, f"{losses[0]:.4f}", f"{losses[-1]:.4f}", f"{100 * moved / total:.1f}%", f"{largest:.2e}"]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args()
    setup(args)
    layers, hidden, batch, seq = (2, 64, 4, 32) if args.quick else (4, 256, 8, 64)
    base = llama(layers, hidden).to(device=args.device, dtype=torch.bfloat16)
    ids = token_ids(batch, seq, device=args.device)
    variants = {
        "lntune, fp32 adapters (default)": lambda: lntune_model(base),
        "lntune, bf16 adapters": lambda: lntune_model(base, autocast_adapter_dtype=False),
        "PEFT (bf16 copies)": lambda: peft_model(base),
    }
    rows = []
    for name, build in variants.items():
        torch.manual_seed(0)
        rows.append([name, *train(build(), ids, args.steps, args.lr)])
    print(f"### bf16 Llama ({layers} layers, hidden {hidden}), AdamW lr {args.lr}, {args.steps} steps\n")
    headers = ["variant", "adapter dtype", "loss before", "loss after", "weights moved", "largest change"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
