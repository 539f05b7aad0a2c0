"""Run as a process: `splitserve serve --router-only ARGS...` in this process, and once its
gRPC port answers, serve a greedy and a seeded request through it, print what it returned and
which heavy modules this process imported, then stop it with SIGTERM.

test_serving_setups.py runs it to show that a router replica never imports torch or the model
code, even while it carries a seeded request's sampler state between workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

from splitserve import cli
from splitserve.router.client import GenerationClient, make_request

HEAVY = ("torch", "splitserve.engine.model", "splitserve.engine.engine", "splitserve.engine.loader",
         "splitserve.worker.worker", "splitserve.transfer.handoff")


def probe(port: int, prompt: str, max_tokens: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    result: dict[str, object] = {}
    try:
        with GenerationClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(600)
            for name, seed, temperature in (("greedy", None, 0.0), ("seeded", 7, 0.8)):
                responses = client.generate(make_request(prompt, max_tokens=max_tokens, temperature=temperature,
                                                         seed=seed))
                result[name] = [t for r in responses for t in r.token_ids]
    except Exception as e:  # reported to the test, which fails with it
        result["error"] = repr(e)
    result["heavy"] = sorted(m for m in HEAVY if m in sys.modules)
    print("PROBE " + json.dumps(result), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    port, prompt, max_tokens = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    threading.Thread(target=probe, args=(port, prompt, max_tokens), daemon=True).start()
    sys.exit(cli.main(["serve", "--router-only", "--grpc-port", str(port), *sys.argv[4:]]))
