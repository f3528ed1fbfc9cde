"""Generation with many adapters: lntune's continuous batching against static batching and the PEFT way.

    python benchmarks/bench_generate.py [--quick] [--requests 128] [--adapters 32] [--rate 24] [--resident 1000]

Model: a random Llama (``--layers`` 4, ``--hidden`` 512, vocabulary 2,048; nothing downloaded), float32 on
the CPU, one torch thread. Adapters: seeded random LN weights. Answers never stop early (no end-of-sequence token),
so every request generates exactly its ``max_tokens``.

Workload (the same arrival schedule for every way): ``--requests`` requests arrive over time (exponential
gaps, ``--rate`` per second), each for a random one of ``--adapters`` adapters, with a prompt of 8-32
tokens and an answer of 4-64 tokens (uniform). Greedy. The ways:

* **lntune, continuous batching**: `lntune.serve.generation.GenerationEngine` (what ``lntune serve`` runs):
  requests join and leave Transformers' engine at every step, each with its own adapter.
* **lntune, static batching**: what ``lntune serve --no-continuous-batching`` runs: the requests waiting when
  a batch starts (at most ``--batch``) run as one ``generate(adapter_names=...)`` to the longest answer.
* **PEFT way**: PEFT's LN tuning cannot mix adapters in a batch: the waiting requests are grouped by
  adapter, and each group runs ``set_adapter`` then one ``generate``.

Reported: generated tokens per second (from the first arrival to the last answer), mean and p99 latency
(arrival to last token) and mean time to the first token (a static batch delivers all tokens at the end).
Tokens/s is bounded by all tokens over the arrival span (printed): at the default 24/s continuous batching
nearly reaches that bound, so ``--rate 64`` is the run that measures capacity.
A second table: lntune's engine with ``--resident`` adapters loaded, requests spread over 32 of them,
against every request using one adapter (tokens/s, all requests at once).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import platform
import random
import statistics
import time
import warnings
from dataclasses import dataclass

import torch


@dataclass
class Request:
    arrival: float
    adapter: str
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    arrival: float
    first_token: float
    done: float
    tokens: int


def llama(layers: int, hidden: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def adapter_states(model, count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``count`` random LN adapters: each norm weight around 1 (as after training)."""
    names = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    shapes = {n: model.get_submodule(n).weight.shape for n in names}
    g = torch.Generator().manual_seed(seed)
    return [{n: 1 + 0.3 * torch.randn(shapes[n], generator=g) for n in names} for _ in range(count)]


def lntune_model(base, states: list[dict], names: list[str]):
    """An lntune PeftModel on a copy of ``base`` with one adapter per name, weights from ``states``."""
    from lntune import LNTuningConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LNTuningConfig(task_type="CAUSAL_LM"), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LNTuningConfig(task_type="CAUSAL_LM"))
    _fill(model, "ln_tuning_layers", states, names)
    return model.eval()


def peft_model(base, states: list[dict], names: list[str]):
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.LNTuningConfig(task_type="CAUSAL_LM"), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LNTuningConfig(task_type="CAUSAL_LM"))
    _fill(model, "ln_tuning_layers", states, names)
    return model.eval()


def _fill(model, slot: str, states, names) -> None:
    with torch.no_grad():
        for module_name, module in model.named_modules():
            copies = getattr(module, slot, None)
            if copies is None:
                continue
            norm = module_name.split("base_model.model.", 1)[-1]
            for state, name in zip(states, names):
                copies[name].weight.copy_(state[norm])


def workload(args, adapters: list[str], vocab: int) -> list[Request]:
    rng = random.Random(args.seed)
    t, requests = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))]
        requests.append(Request(t, rng.choice(adapters), prompt, rng.randint(4, 64)))
    return requests


# ---------------------------------------------------------------------------------------- the ways
def run_continuous(model, requests: list[Request], batch: int, cache_tokens: int) -> list[Result]:
    from lntune.serve.generation import GenerationEngine, GenerationSettings

    settings = GenerationSettings(max_batch_tokens=256, max_requests=batch, cache_tokens=cache_tokens)
    engine = GenerationEngine(model.get_base_model(), lambda: model.base_model, settings, [], 0)
    engine.start()

    async def one(request: Request, start: float) -> Result:
        await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
        first, count = None, 0
        async for completion in engine.generate(request.prompt, request.adapter, request.max_tokens, 0.0, 1.0):
            first = first or time.perf_counter()
            count = len(completion.tokens)
        return Result(start + request.arrival, first, time.perf_counter(), count)

    async def main() -> list[Result]:
        start = time.perf_counter()
        return await asyncio.gather(*(one(r, start) for r in requests))

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def run_static(requests: list[Request], batch: int, run_batch) -> list[Result]:
    """The waiting requests (at most ``batch``) run together; ``run_batch(requests)`` returns each one's tokens."""
    start = time.perf_counter()
    pending, results = list(requests), [None] * len(requests)
    index = {id(r): i for i, r in enumerate(requests)}
    while pending:
        now = time.perf_counter() - start
        ready = [r for r in pending if r.arrival <= now][:batch]
        if not ready:
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        counts = run_batch(ready)
        done = time.perf_counter()
        for request, count in zip(ready, counts):
            results[index[id(request)]] = Result(start + request.arrival, done, done, count)
        pending = [r for r in pending if all(r is not x for x in ready)]
    return results


def _padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def lntune_static_batch(model):
    def run(batch: list[Request]) -> list[int]:
        ids, mask = _padded([r.prompt for r in batch])
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=[r.adapter for r in batch],
                max_new_tokens=max(r.max_tokens for r in batch),
                do_sample=False,
                pad_token_id=0,
            )
        return [r.max_tokens for r in batch]

    return run


def peft_static_batch(model):
    def run(batch: list[Request]) -> list[int]:
        groups: dict[str, list[Request]] = {}
        for request in batch:
            groups.setdefault(request.adapter, []).append(request)
        for adapter, group in groups.items():
            model.set_adapter(adapter)
            ids, mask = _padded([r.prompt for r in group])
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max(r.max_tokens for r in group),
                    do_sample=False,
                    pad_token_id=0,
                )
        return [r.max_tokens for r in batch]

    return run


# ------------------------------------------------------------------------------------------- tables
def summary(name: str, results: list[Result]) -> dict:
    start = min(r.arrival for r in results)
    wall = max(r.done for r in results) - start
    latencies = sorted(r.done - r.arrival for r in results)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return {
        "way": name,
        "tokens/s": sum(r.tokens for r in results) / wall,
        "mean latency s": statistics.mean(latencies),
        "p99 latency s": p99,
        "mean first token s": statistics.mean(r.first_token - r.arrival for r in results),
    }


def table(rows: list[dict], baseline: str) -> str:
    base = next(r for r in rows if r["way"] == baseline)
    lines = [
        "| way | tokens/s | vs static | mean latency s | p99 latency s | mean time to first token s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['way']} | {r['tokens/s']:.1f} | {r['tokens/s'] / base['tokens/s']:.2f}x | "
            f"{r['mean latency s']:.2f} | {r['p99 latency s']:.2f} | {r['mean first token s']:.2f} |"
        )
    return "\n".join(lines)


def many_adapters(args, base, states) -> str:
    """Tokens/s of the engine with ``--resident`` adapters loaded, requests over 32 of them vs over one."""
    names = [f"a{i}" for i in range(args.resident)]
    model = lntune_model(base, states * (args.resident // len(states) + 1), names)
    rng = random.Random(args.seed + 1)
    prompts = [[rng.randrange(3, 2048) for _ in range(16)] for _ in range(32)]
    rows = []
    for title, adapters in [("one adapter", [names[0]] * 32), ("32 adapters of the resident ones", names[-32:])]:
        requests = [Request(0.0, a, p, 32) for a, p in zip(adapters, prompts)]
        rates = [summary(title, run_continuous(model, requests, 32, 8192))["tokens/s"] for _ in range(args.repeats)]
        rows.append((title, statistics.median(rates)))
    one = rows[0][1]
    lines = [f"| requests (32 at once, 32 new tokens each; {args.resident} adapters resident) | tokens/s | vs one |"]
    lines.append("|---|---|---|")
    lines += [f"| {title} | {rate:.1f} | {rate / one:.2f}x |" for title, rate in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument(
        "--rate",
        type=float,
        default=24.0,
        help="arrivals per second (24: continuous batching keeps up with the arrivals; 64 saturates it on a CPU)",
    )
    p.add_argument("--batch", type=int, default=32, help="most requests per batch or step")
    p.add_argument("--resident", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="runs of each way (the median row is reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.requests, args.resident, args.repeats = 16, 40, 1
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{platform.processor() or 'cpu'}; {args.threads} thread(s); Llama {args.layers} layers, hidden {args.hidden}; "
        f"{args.requests} requests over {args.adapters} "
        f"adapters at {args.rate:g}/s, answers 4-64 tokens; median of {args.repeats} runs\n"
    )
    base = llama(args.layers, args.hidden, 2048)
    names = [f"a{i}" for i in range(args.adapters)]
    states = adapter_states(base, args.adapters)
    requests = workload(args, names, 2048)
    lntune = lntune_model(base, states, names)
    peft_ln = peft_model(base, states, names)
    ways = {
        "lntune, continuous batching": lambda: run_continuous(lntune, requests, args.batch, 16384),
        "lntune, static batching": lambda: run_static(requests, args.batch, lntune_static_batch(lntune)),
        "PEFT way (set_adapter per group)": lambda: run_static(requests, args.batch, peft_static_batch(peft_ln)),
    }
    runs: dict[str, list[dict]] = {name: [] for name in ways}
    for _ in range(args.repeats):  # interleaved: each round runs every way once
        for name, way in ways.items():
            runs[name].append(summary(name, way()))
    rows = [sorted(r, key=lambda row: row["tokens/s"])[len(r) // 2] for r in runs.values()]
    span = requests[-1].arrival - requests[0].arrival
    bound = sum(r.max_tokens for r in requests) / span
    print("### Mixed answer lengths, requests arriving over time\n")
    print(
        f"Arrivals span {span:.2f} s: no way can exceed {bound:.0f} tokens/s here (every token over the span); "
        "a way near it is keeping up with the arrivals, not showing its capacity.\n"
    )
    print(table(rows, "lntune, static batching") + "\n")
    print("### Many adapters resident\n")
    print(many_adapters(args, base, states) + "\n")


if __name__ == "__main__":
    main()
