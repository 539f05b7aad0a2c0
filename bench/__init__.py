"""splitserve's benchmarks, each a module run as ``python -m bench.NAME`` from the repository root.

Nothing is imported here: ``bench._vllm_throughput`` runs this package under vLLM's own
interpreter, which has the standard library and vLLM but not splitserve.
"""
