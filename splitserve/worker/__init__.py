"""The worker runtime shared by every worker kind: the engine on its own thread (EngineLoop),
membership and heartbeats in the store, latency models fitted from the engine's steps, the
prefix-cache mirror and request streaming. The role parts live in splitserve.prefill_worker
and splitserve.decode_worker."""
