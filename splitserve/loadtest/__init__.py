"""``splitserve loadtest``: SLO load tests against splitserve (gRPC) or any OpenAI-compatible
HTTP server. Metric definitions follow vLLM's ``bench serve`` (see docs/loadtest.md)."""
