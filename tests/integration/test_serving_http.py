"""End to end over HTTP: a Server with ``http_port`` (real Ray workers, disaggregated) answers the
``openai`` client with the offline engine's greedy text, streaming and not, and /metrics shows
the requests (TTFT, outcomes) that both front ends served; `splitserve serve --http-port` too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from splitserve.config import ClusterConfig, ServeConfig, StoreConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.server import Server
from tests.conftest import PROMPTS
from tests.integration.conftest import free_port
from tests.integration.test_serving import ENGINE, generate_all, wait_idle

pytestmark = pytest.mark.slow

MAX_TOKENS = 8


def test_server_serves_openai_http_beside_grpc(ray_cluster, llm):
    config = ClusterConfig(engine=ENGINE, store=StoreConfig(prefix=f"http-{uuid.uuid4().hex[:8]}"))
    server = Server(config, ServeConfig(grpc_port=0, http_port=0, grace_s=5.0)).start()
    try:
        url = f"http://127.0.0.1:{server.http_port}"
        expected = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        with openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120) as client:
            model = client.models.list().data[0].id
            whole = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
            streamed = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True)
            texts = [whole.choices[0].text, "".join(c.choices[0].text for c in streamed)]
        assert texts == [o.text for o in expected]
        assert generate_all(server.address, PROMPTS[:1], MAX_TOKENS) == [expected[0].token_ids]  # gRPC too
        with urllib.request.urlopen(f"{url}/health", timeout=10) as health:
            assert health.status == 200
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            samples = {(s.name, tuple(s.labels.items())): s.value
                       for f in text_string_to_metric_families(response.read().decode()) for s in f.samples}
        assert samples[("splitserve_requests_total", (("outcome", "finished"),))] == 3
        assert samples[("splitserve_time_to_first_token_seconds_count", ())] == 3
        wait_idle(server)
    finally:
        server.stop()


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as health:
                if health.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet, or 503 while workers start
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s} s")
        time.sleep(0.5)


def test_splitserve_serve_http_port(ray_cluster, llm):
    """The command line serves the OpenAI API on --http-port and says where."""
    port = free_port()
    cmd = [sys.executable, "-m", "splitserve.cli", "serve", "--address", ray.get_runtime_context().gcs_address,
           "--grpc-port", "0", "--http-port", str(port), "--store-prefix", f"cli-http-{uuid.uuid4().hex[:8]}",
           "--num-kv-blocks", "256", "--grace", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 600)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0) as client:
            chat = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=MAX_TOKENS,
                                                  messages=[{"role": "user", "content": "Hi!"}], temperature=0)
        expected = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=MAX_TOKENS,
                                                                                  temperature=0))[0]
        assert chat.choices[0].message.content == expected.text
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert f"OpenAI-compatible API on http://127.0.0.1:{port}/v1" in output and "stopped" in output
