"""The router: front ends (gRPC, OpenAI HTTP), worker choice, and the handoff orchestration."""
