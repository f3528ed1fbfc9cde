"""The Ray Serve deployment (``lntune.serve.ray_app``) on a local Ray instance, started and stopped by the test.

The driver runs in a subprocess with a time limit (its whole process group is killed past it). Ray keeps
to the loopback address (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes a single-machine Ray use
127.0.0.1) and its HTTP proxy listens on 127.0.0.1 and a free port. One Ray instance serves two
applications in turn: embeddings (three adapters through a replica that holds two: Ray evicts and the
replica reloads), then chat completions, streamed token by token through Ray Serve.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from conftest import communicate_or_kill
from test_serve import ATOL, TEXTS, Reference, free_port, make_adapters, tiny_model
from test_serve_generation import CHAT_TEMPLATE, CONVERSATIONS, ChatReference

pytest.importorskip("ray.serve", reason="the ray extra (pip install 'lntune[ray]') is not installed")

DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import httpx, ray
    from ray import serve
    from lntune.serve.ray_app import app_builder

    port, apps = int(sys.argv[1]), json.loads(sys.argv[2])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    answers = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for app in apps:
            serve.run(app_builder(app["options"]), name="lntune", route_prefix="/")
            for job in app["jobs"]:
                url = f"http://127.0.0.1:{port}{job['path']}"
                headers = {"serve_multiplexed_model_id": job["adapter"]}
                if not job["body"].get("stream"):
                    response = httpx.post(url, json=job["body"], headers=headers, timeout=120)
                    answers.append([response.status_code, response.json()])
                    continue
                start, times, events = time.monotonic(), [], []
                with httpx.stream("POST", url, json=job["body"], headers=headers, timeout=120) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            times.append(time.monotonic() - start)
                            events.append(line[6:])
                answers.append([response.status_code, {"events": events, "times": times}])
            serve.delete("lntune")
        print("ANSWERS " + json.dumps(answers), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    """
)


def test_ray_serve_multiplexed_deployments(tmp_path):
    bert = tiny_model(tmp_path / "tiny-bert", "bert")
    adapters = make_adapters(bert, "FEATURE_EXTRACTION", tmp_path / "adapters", ["r0", "r1", "r2"], seed=8)
    reference = Reference(bert, "FEATURE_EXTRACTION", adapters)
    texts = [["r0", TEXTS[0]], ["r1", TEXTS[1]], ["r2", TEXTS[2]], ["r0", TEXTS[3]], ["r2", TEXTS[0]], ["nope", "x"]]
    embedding_jobs = [
        {"path": "/v1/embeddings", "adapter": name, "body": {"model": name, "input": text}} for name, text in texts
    ]
    llama = tiny_model(tmp_path / "chat-llama", "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(llama)
    chat_adapters = make_adapters(llama, "CAUSAL_LM", tmp_path / "chat-adapters", ["c0", "c1"], seed=9)
    chat_reference = ChatReference(llama, chat_adapters)
    chat_jobs = [
        {
            "path": "/v1/chat/completions",
            "adapter": name,
            "body": {
                "model": name,
                "messages": CONVERSATIONS[2],
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
            },
        }
        for name, tokens in [("c0", 12), ("c1", 300)]
    ]
    apps = [
        {
            "options": {"model": str(bert), "adapters": str(tmp_path / "adapters"), "max_adapters_per_replica": 2},
            "jobs": embedding_jobs,
        },
        {"options": {"model": str(llama), "adapters": str(tmp_path / "chat-adapters")}, "jobs": chat_jobs},
    ]
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    command = [sys.executable, "-c", DRIVER, str(free_port()), json.dumps(apps)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        text=True,
    )
    output, _ = communicate_or_kill(process, 500, "the Ray driver")
    answers = next((line for line in output.splitlines() if line.startswith("ANSWERS ")), None)
    assert process.returncode == 0 and answers, output[-5000:]
    answers = json.loads(answers[len("ANSWERS ") :])
    for (name, text), (status, body) in zip(texts, answers):
        if name == "nope":
            assert status == 404 and "nope" in body["error"]["message"]
            continue
        assert status == 200, body
        torch.testing.assert_close(torch.tensor(body["data"][0]["embedding"]), reference(name, text), atol=ATOL, rtol=0)
    for job, (status, body) in zip(chat_jobs, answers[len(texts) :]):
        assert status == 200, body
        events = body["events"]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == chat_reference.chat(job["adapter"], CONVERSATIONS[2], job["body"]["max_tokens"])[0]
    times = answers[-1][1]["times"]  # 300 tokens: the first chunks arrive long before the last
    assert len(times) > 10 and times[1] < 0.5 * times[-1], times
