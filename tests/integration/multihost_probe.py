"""Run as a process inside a test host's namespace (test_multihost.py): a client of the server
there. ``python -m tests.integration.multihost_probe SPEC`` with SPEC a JSON object:

- grpc: the server's address; prompts: the prompts to send, greedy, max_tokens each (ignore_eos:
  optional, all of them);
- loop_s (optional): send the prompts over and over for this long, recording each outcome
  (a failure is kept as its gRPC status and details, not raised);
- redis / prefix (optional): also list the workers the store knows, with their KV endpoints.

It prints one JSON line per request as it ends ({"prompt", "tokens", "report", "error",
"first_token_at"}: times on this process's monotonic clock), then one {"workers": ...} line.
"""

from __future__ import annotations

import json
import sys
import time

import grpc

from splitserve.router.client import GenerationClient, make_request


def main(spec: dict) -> None:
    with GenerationClient(spec["grpc"]) as client:
        client.wait_ready(600)
        deadline = time.monotonic() + spec.get("loop_s", 0)
        while True:
            for prompt in spec["prompts"]:
                print(json.dumps(generate(client, prompt, spec["max_tokens"], spec.get("ignore_eos", False))),
                      flush=True)
            if time.monotonic() >= deadline:
                break
    if "redis" in spec:
        from splitserve.cluster.redis_store import RedisStore

        store = RedisStore(spec["redis"], prefix=spec["prefix"])
        workers = {w.worker_id: {"kind": w.kind, "kv_endpoint": w.kv_endpoint} for w in store.list_workers()}
        print(json.dumps({"workers": workers}), flush=True)


def generate(client: GenerationClient, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
    record: dict = {"prompt": prompt, "tokens": [], "report": None, "error": None, "first_token_at": None}
    try:
        request = make_request(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
        for response in client.generate(request, timeout_s=300):
            if record["first_token_at"] is None:
                record["first_token_at"] = time.monotonic()
                print(json.dumps({"first_token": prompt}), flush=True)
            record["tokens"] += list(response.token_ids)
            if response.finished:
                report = response.report
                record["report"] = {"placement": report.placement, "prefill_worker": report.prefill_worker,
                                    "decode_worker": report.decode_worker}
    except grpc.RpcError as error:
        record["error"] = [error.code().name, error.details()]
    return record


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
