"""Generation serving: chat completions and completions, streaming, continuous batching with one adapter per request.

Every greedy answer is compared with ``generate`` run in this process on that adapter and that prompt alone.
Servers are real ``lntune serve`` processes on 127.0.0.1 (the ``openai`` client and ``httpx``); the engine's
fault handling is tested in process, where a failure can be injected into one step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers
from test_serve import TEXTS, make_adapters, metric, serving, tiny_model

from lntune import PeftModel

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ADAPTERS = ["chat-a", "chat-b", "chat-c"]
CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a fox"}],
    [{"role": "user", "content": "tell me a story about a dog"}],
]


class ChatReference:
    """``generate`` in this process, one adapter and one prompt at a time (greedy)."""

    def __init__(self, base: Path, adapters: dict[str, Path]) -> None:
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(base)
        self.base = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        self.adapters = adapters
        self._models: dict[str | None, torch.nn.Module] = {None: self.base}

    def ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    def tokens(self, adapter: str | None, ids: list[int], max_tokens: int) -> list[int]:
        if adapter not in self._models:
            model = copy.deepcopy(self.base)
            self._models[adapter] = PeftModel.from_pretrained(model, self.adapters[adapter], adapter).eval()
        with torch.no_grad():
            out = self._models[adapter].generate(
                input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
        new = out[0, len(ids) :].tolist()
        eos = self.base.config.eos_token_id
        return new[: new.index(eos)] if eos in new else new

    def chat(self, adapter: str | None, messages: list[dict], max_tokens: int) -> tuple[str, str]:
        """The answer's text and finish reason."""
        new = self.tokens(adapter, self.ids(messages), max_tokens)
        return self.tokenizer.decode(new, skip_special_tokens=True), "length" if len(new) == max_tokens else "stop"


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    llama = tiny_model(tmp / "tiny-chat-llama", "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(llama)
    adapters = make_adapters(llama, "CAUSAL_LM", tmp / "adapters", ADAPTERS, seed=11)
    args = ["--model", str(llama), "--adapters", str(tmp / "adapters"), "--max-batch-tokens", "16"]
    with serving(tmp, *args) as server:
        yield server, ChatReference(llama, adapters)


def test_chat_completions_of_concurrent_requests_equal_generate(chat):
    """Requests for different adapters and answer lengths, sent at once: each equals its adapter's generate."""
    server, reference = chat
    client = server.client()
    jobs = [
        (model, messages, max_tokens)
        for model, max_tokens in [("chat-a", 12), ("chat-b", 3), ("chat-c", 20), ("tiny-chat-llama", 7)]
        for messages in CONVERSATIONS
    ]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(
            pool.map(
                lambda j: client.chat.completions.create(model=j[0], messages=j[1], max_tokens=j[2], temperature=0),
                jobs,
            )
        )
    for (model, messages, max_tokens), result in zip(jobs, results):
        adapter = None if model == "tiny-chat-llama" else model
        text, finish = reference.chat(adapter, messages, max_tokens)
        choice = result.choices[0]
        assert (choice.message.content, choice.finish_reason) == (text, finish), (model, messages)
        assert choice.message.role == "assistant" and result.object == "chat.completion" and result.model == model
        assert result.usage.prompt_tokens == len(reference.ids(messages))
    assert len({r.choices[0].message.content for r in results}) > 4, "the adapters should change the answers"
    assert metric(server, "lntune_generation_engine_restarts_total") == 0


def test_streamed_chat_equals_the_answer_token_for_token(chat):
    server, reference = chat
    client = server.client()
    for model in ["chat-b", "chat-c"]:
        text, finish = reference.chat(model, CONVERSATIONS[2], 16)
        stream = client.chat.completions.create(
            model=model,
            messages=CONVERSATIONS[2],
            max_completion_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        contents = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(contents) == text
        assert len([c for c in contents if c]) > 1, "the answer should come in several chunks"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [finish]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
            reference.tokens(model, reference.ids(CONVERSATIONS[2]), 16)
        )


def test_streamed_completions_stop_strings_and_n(chat):
    server, reference = chat
    client = server.client()
    prompt_ids = reference.tokenizer(TEXTS[3])["input_ids"]
    full = reference.tokenizer.decode(reference.tokens("chat-a", prompt_ids, 12), skip_special_tokens=True)
    stream = client.completions.create(model="chat-a", prompt=TEXTS[3], max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full
    words = full.split()
    assert len(words) > 2, full
    stop = " " + words[2]
    expected = full[: full.index(stop)]
    for streamed in (False, True):
        answer = client.completions.create(
            model="chat-a", prompt=TEXTS[3], max_tokens=12, temperature=0, stop=[stop], stream=streamed
        )
        if streamed:
            parts = list(answer)
            text = "".join(c.choices[0].text for c in parts)
            finish = [c.choices[0].finish_reason for c in parts if c.choices[0].finish_reason]
            assert (text, finish) == (expected, ["stop"])
        else:
            assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected, "stop")
    several = client.chat.completions.create(
        model="chat-b", messages=CONVERSATIONS[0], n=3, max_tokens=6, temperature=0
    )
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert {c.message.content for c in several.choices} == {reference.chat("chat-b", CONVERSATIONS[0], 6)[0]}
    sampled = client.chat.completions.create(model="chat-b", messages=CONVERSATIONS[0], max_tokens=5, temperature=0.9)
    assert sampled.usage.completion_tokens <= 5


def test_bad_chat_requests_are_400(chat):
    server, _ = chat
    client = server.client()
    for bad in [
        dict(messages=[]),
        dict(messages=CONVERSATIONS[0], tools=[{"type": "function", "function": {"name": "f"}}]),
        dict(messages=CONVERSATIONS[0], seed=3),  # temperature 1: draws depend on the step
        dict(messages=CONVERSATIONS[0], max_tokens=100000),
        dict(messages=CONVERSATIONS[0], logprobs=True),
        dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ]:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="chat-a", **bad)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="chat-zz", messages=CONVERSATIONS[0])
    seeded = client.chat.completions.create(
        model="chat-a", messages=CONVERSATIONS[0], seed=3, temperature=0, max_tokens=4
    )
    assert seeded.choices[0].message.content is not None


def test_a_client_that_goes_away_cancels_its_request(chat):
    server, reference = chat
    body = {"model": "chat-a", "messages": CONVERSATIONS[1], "max_tokens": 1500, "temperature": 0.9, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in received)
        assert metric(server, "lntune_generation_running_requests") == 1
    deadline = time.monotonic() + 20
    while metric(server, "lntune_generation_running_requests") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "lntune_generation_running_requests") == 0
    answer = server.client().chat.completions.create(model="chat-a", messages=CONVERSATIONS[0], max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_model_without_chat_template_says_so(tmp_path):
    llama = tiny_model(tmp_path / "plain-llama", "llama")
    with serving(tmp_path, "--model", str(llama), "--adapters", str(tmp_path)) as server:
        response = httpx.post(
            server.url + "/v1/chat/completions", json={"model": "plain-llama", "messages": CONVERSATIONS[0]}
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "no_chat_template" and "plain-llama" in error["message"]
        sse = httpx.post(
            server.url + "/v1/completions",
            json={"model": "plain-llama", "prompt": "hi", "max_tokens": 3, "stream": True},
        )
        events = [line for line in sse.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "text_completion"


def test_static_batching_fallback_gives_the_same_answers(chat, tmp_path):
    _, reference = chat
    llama = Path(reference.adapters["chat-a"]).parent.parent / "tiny-chat-llama"
    adapters = Path(reference.adapters["chat-a"]).parent
    with serving(tmp_path, "--model", str(llama), "--adapters", str(adapters), "--no-continuous-batching") as server:
        assert "static batches" in server.output()
        client = server.client()
        answer = client.chat.completions.create(model="chat-c", messages=CONVERSATIONS[1], max_tokens=9, temperature=0)
        assert answer.choices[0].message.content == reference.chat("chat-c", CONVERSATIONS[1], 9)[0]
        stream = client.chat.completions.create(
            model="chat-c", messages=CONVERSATIONS[1], max_tokens=9, temperature=0, stream=True
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer.choices[0].message.content
        )


# ------------------------------------------------------------------------------ the engine, in process
def test_engine_restarts_after_a_failed_step_and_fails_only_that_steps_requests(chat):
    from lntune.serve.generation import GenerationEngine, GenerationSettings

    _, reference = chat
    model = copy.deepcopy(reference.base)
    peft = PeftModel.from_pretrained(model, reference.adapters["chat-a"], "chat-a")
    peft.load_adapter(reference.adapters["chat-b"], "chat-b")
    restarts = []
    engine = GenerationEngine(
        model,
        lambda: peft.base_model,
        GenerationSettings(max_batch_tokens=16, max_requests=2, cache_tokens=2048),
        [model.config.eos_token_id],
        0,
        on_restart=lambda: restarts.append(1),
    )
    fail = {"armed": False, "victims": None}

    def explode(module, args):
        if fail["armed"] and engine.router.current is not None:
            fail["armed"] = False
            fail["victims"] = list(engine.router.current.request_ids)
            raise RuntimeError("injected failure")

    model.model.layers[0].register_forward_pre_hook(explode)
    prompts = {
        "chat-a": reference.ids(CONVERSATIONS[0]),
        "chat-b": reference.ids(CONVERSATIONS[1]),
        "__base__": reference.ids(CONVERSATIONS[2]),
    }

    async def run(adapter: str, max_tokens: int, delay: float):
        await asyncio.sleep(delay)
        tokens = None
        async for completion in engine.generate(prompts[adapter], adapter, max_tokens, 0.0, 1.0):
            tokens = completion.tokens
            if adapter == "chat-a" and len(tokens) == 3 and fail["victims"] is None:
                fail["armed"] = True  # the next step raises (once)
        return tokens

    jobs = [("chat-a", 20, 0), ("chat-b", 20, 0), ("__base__", 20, 0), ("chat-a", 9, 0), ("chat-b", 6, 0.3)]

    async def main():
        return await asyncio.gather(*(run(*job) for job in jobs), return_exceptions=True)

    engine.start()
    try:
        results = asyncio.run(main())
    finally:
        engine.stop()
    assert restarts == [1]
    # At most 2 requests per step: the step that raised had 2; they fail, the 3 others go on and are right.
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(fail["victims"]) == len(failed) == 2 and all("injected failure" in str(r) for r in failed)
    for (adapter, max_tokens, _), result in zip(jobs, results):
        if not isinstance(result, Exception):
            expected = reference.tokens(None if adapter == "__base__" else adapter, prompts[adapter], max_tokens)
            assert result == expected, adapter


def test_an_adapter_unloaded_mid_answer_finishes_that_answer_and_broken_ones_fail_alone(chat):
    server, reference = chat
    body = {"model": "chat-c", "messages": CONVERSATIONS[1], "max_tokens": 120, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            if len(events) == 3:  # the answer is under way: unload its adapter
                assert httpx.delete(server.url + "/v1/adapters/chat-c", timeout=30).status_code == 200
                break
        events += [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == reference.chat("chat-c", CONVERSATIONS[1], 120)[0]  # finished on the adapter it started with
    gone = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
    assert gone.status_code == 404
    restored = httpx.post(server.url + "/v1/adapters", json={"name": "chat-c", "path": "chat-c"}, timeout=30)
    assert restored.status_code == 200
    broken = Path(reference.adapters["chat-a"]).parent / "chat-broken"
    broken.mkdir()
    try:
        (broken / "adapter_config.json").write_text(
            (Path(reference.adapters["chat-a"]) / "adapter_config.json").read_text()
        )
        (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        client = server.client()
        with pytest.raises(openai.InternalServerError, match="adapter_model.safetensors"):
            client.chat.completions.create(model="chat-broken", messages=CONVERSATIONS[0], max_tokens=3)
        answer = client.chat.completions.create(model="chat-a", messages=CONVERSATIONS[0], max_tokens=5, temperature=0)
        assert answer.choices[0].message.content == reference.chat("chat-a", CONVERSATIONS[0], 5)[0]
    finally:
        for file in broken.iterdir():
            file.unlink()
        broken.rmdir()


def test_vllms_adapter_endpoints(chat, tmp_path):
    """``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` as vLLM has them; paths outside --adapters are
    refused unless the server runs with --allow-any-adapter-path (the answer names that option)."""
    server, reference = chat
    adapters = Path(reference.adapters["chat-a"]).parent
    url = server.url + "/v1"
    loaded = httpx.post(url + "/load_lora_adapter", json={"lora_name": "also-b", "lora_path": "chat-b"}, timeout=30)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'also-b' added successfully."
    cards = {m.id: m for m in server.client().models.list().data}
    assert cards["also-b"].parent == "tiny-chat-llama"
    answer = server.client().chat.completions.create(
        model="also-b", messages=CONVERSATIONS[0], max_tokens=5, temperature=0
    )
    assert answer.choices[0].message.content == reference.chat("chat-b", CONVERSATIONS[0], 5)[0]
    again = httpx.post(url + "/load_lora_adapter", json={"lora_name": "also-b", "lora_path": "chat-c"}, timeout=30)
    assert again.status_code == 400 and "load_inplace" in again.json()["error"]["message"]
    gone = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "also-b"}, timeout=30)
    assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'also-b' removed successfully."
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "also-b"}, timeout=30).status_code == 404
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for file in (adapters / "chat-c").iterdir():
        (outside / file.name).write_bytes(file.read_bytes())
    refused = httpx.post(url + "/load_lora_adapter", json={"lora_name": "far", "lora_path": str(outside)}, timeout=30)
    assert refused.status_code == 400 and "--allow-any-adapter-path" in refused.json()["error"]["message"]
    llama = adapters.parent / "tiny-chat-llama"
    with serving(tmp_path, "--model", str(llama), "--adapters", str(adapters), "--allow-any-adapter-path") as other:
        body = {"lora_name": "far", "lora_path": str(outside)}
        assert httpx.post(other.url + "/v1/load_lora_adapter", json=body, timeout=30).status_code == 200
        far = other.client().chat.completions.create(
            model="far", messages=CONVERSATIONS[0], max_tokens=5, temperature=0
        )
        assert far.choices[0].message.content == reference.chat("chat-c", CONVERSATIONS[0], 5)[0]
