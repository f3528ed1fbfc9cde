"""The Ray Serve deployment (``lntune.serve.ray_app``) on a local Ray instance, started and stopped by the test.

The driver runs in a subprocess with a time limit (its whole process group is killed past it). Ray keeps
to the loopback address (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes a single-machine Ray use
127.0.0.1) and its HTTP proxy listens on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import communicate_or_kill
from test_serve import ATOL, TEXTS, Reference, free_port, make_adapters, tiny_model

pytest.importorskip("ray.serve", reason="the ray extra (pip install 'lntune[ray]') is not installed")

DRIVER = textwrap.dedent(
    """
    import json, sys
    import httpx, ray
    from ray import serve
    from lntune.serve.ray_app import app_builder

    model, adapters, port, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {"model": model, "adapters": adapters, "max_adapters_per_replica": 2, "max-wait-ms": 2}
        serve.run(app_builder(options), name="lntune", route_prefix="/")
        answers = []
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        for name, text in jobs:
            headers = {"serve_multiplexed_model_id": name}
            response = httpx.post(url, json={"model": name, "input": text}, headers=headers, timeout=120)
            answers.append([response.status_code, response.json()])
        print("ANSWERS " + json.dumps(answers), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    """
)


def test_ray_serve_multiplexed_deployment(tmp_path):
    bert = tiny_model(tmp_path / "tiny-bert", "bert")
    adapters = make_adapters(bert, "FEATURE_EXTRACTION", tmp_path / "adapters", ["r0", "r1", "r2"], seed=8)
    reference = Reference(bert, "FEATURE_EXTRACTION", adapters)
    # Three adapters through a replica that holds two: Ray evicts and the replica reloads.
    jobs = [["r0", TEXTS[0]], ["r1", TEXTS[1]], ["r2", TEXTS[2]], ["r0", TEXTS[3]], ["r2", TEXTS[0]], ["nope", "x"]]
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    command = [sys.executable, "-c", DRIVER, str(bert), str(tmp_path / "adapters"), str(free_port()), json.dumps(jobs)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        text=True,
    )
    output, _ = communicate_or_kill(process, 400, "the Ray driver")
    answers = next((line for line in output.splitlines() if line.startswith("ANSWERS ")), None)
    assert process.returncode == 0 and answers, output[-5000:]
    for (name, text), (status, body) in zip(jobs, json.loads(answers[len("ANSWERS ") :])):
        if name == "nope":
            assert status == 404 and "nope" in body["error"]["message"]
            continue
        assert status == 200, body
        torch.testing.assert_close(torch.tensor(body["data"][0]["embedding"]), reference(name, text), atol=ATOL, rtol=0)
