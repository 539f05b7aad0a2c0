"""The worker: one engine that can do every phase of a request -- prefill for a remote worker
(KVExport), take a handed-off request in and decode it (KVImport), or run a request end to end
with its prefill chunked into the decode batch -- built from parts: the engine on its own
thread (EngineLoop), membership and heartbeats in the store under the worker's role, latency
models fitted from the engine's steps, the prefix-cache mirror and request streaming."""
