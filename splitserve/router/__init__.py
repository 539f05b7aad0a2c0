"""The router: front ends (gRPC, OpenAI HTTP), prefill placement and admission, worker choice,
the handoff orchestration, speculation lengths and the pools' roles."""
