"""The `splitserve` command line.

`splitserve generate "PROMPT"` runs the model in this process; `splitserve serve` starts the
workers on Ray and serves gRPC (and the OpenAI-compatible HTTP API with --http-port) until
interrupted; `splitserve client "PROMPT"` asks a running server; `splitserve loadtest` measures
a server under load (splitserve.loadtest.cli). Each subcommand is an `_add_*` parser function
plus the function it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from splitserve.config import EngineConfig

if TYPE_CHECKING:
    from splitserve.protos.splitserve.v1.serving_pb2 import GenerateResponse


def _generate(args: argparse.Namespace) -> int:
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype))
        prompt: str | list[int] = args.prompt
        if args.chat:
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
            prompt = engine.tokenizer.encode(text, add_special_tokens=False)
        engine.add_request(prompt, params)
    except ValueError as error:
        print(f"splitserve: error: {error}", file=sys.stderr)
        return 2
    while engine.has_unfinished_requests():
        for output in engine.step():
            sys.stdout.write(output.new_text)
            sys.stdout.flush()
            if output.finished:
                sys.stdout.write("\n")
                print(f"[{len(output.token_ids)} tokens, finish_reason={output.finish_reason}]", file=sys.stderr)
    return 0


def _client(args: argparse.Namespace) -> int:
    import grpc

    from splitserve.router.client import GenerationClient, make_request

    prompt, messages = (None, [{"role": "user", "content": args.prompt}]) if args.chat else (args.prompt, [])
    request = make_request(prompt, messages=messages, max_tokens=args.max_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    with GenerationClient(args.address) as client:
        try:
            if args.wait_ready is not None:
                client.wait_ready(args.wait_ready)
            _print_stream(client.generate(request))
        except grpc.RpcError as error:
            status, details = (error.code().name, error.details()) if isinstance(error, grpc.Call) else ("?", error)
            print(f"splitserve: error: {status}: {details}", file=sys.stderr)
            return 2
        except TimeoutError as error:
            print(f"splitserve: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # the stream's close has cancelled the call, so the server aborts it
            return 130
    return 0


def _print_stream(responses: Iterator[GenerateResponse]) -> None:
    """Text to stdout as it arrives, then a usage line to stderr. A stream that breaks off
    still ends its line, so an error message does not start mid-line."""
    is_line_open = False
    try:
        for response in responses:
            sys.stdout.write(response.text)
            sys.stdout.flush()
            is_line_open = is_line_open or bool(response.text)
            if response.finished:
                sys.stdout.write("\n")
                is_line_open = False
                print(_usage_line(response), file=sys.stderr)
    finally:
        if is_line_open:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _usage_line(response: GenerateResponse) -> str:
    usage, spec = response.usage, response.speculation
    line = f"[{usage.completion_tokens} tokens, {usage.prompt_tokens} prompt tokens"
    line += f", finish_reason={response.finish_reason}"
    if spec.draft_tokens:
        line += f", {spec.accepted_tokens}/{spec.draft_tokens} drafts accepted"
    return line + "]"


def _add_generate(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser("generate", help="generate text for one prompt on this machine, streaming it")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--model", default=None, help="a .gguf file or an HF folder (default: SmolLM2-135M-Instruct)")
    _add_sampling_options(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.set_defaults(run=_generate)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from splitserve.cluster.deployment import ClusterConfig
    from splitserve.cluster.serve import Server, ServeOptions, connect_ray
    from splitserve.config import SpeculativeConfig
    from splitserve.errors import CapacityError, ServingError
    from splitserve.router.api import SLO

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = EngineConfig(model=args.model, dtype=args.dtype, num_kv_blocks=args.num_kv_blocks,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              enable_prefix_caching=args.enable_prefix_caching)
        decode_engine = None
        if args.speculative:
            decode_engine = replace(engine, speculative=SpeculativeConfig(
                args.speculative, num_speculative_tokens=args.num_speculative_tokens))
        config = ClusterConfig(
            mode=args.mode, num_prefill_workers=args.prefill_workers, num_decode_workers=args.decode_workers,
            num_colocated_workers=args.workers, engine=engine, decode_engine=decode_engine,
            transfer=args.transfer, kv_codec=args.kv_codec, layers_per_chunk=args.layers_per_chunk,
            num_threads=args.threads_per_worker, host=args.host, redis_url=args.redis_url,
            store_prefix=args.store_prefix,
        )
        slo = SLO(ttft_s=args.slo_ttft_ms / 1000 if args.slo_ttft_ms else None,
                  tpot_s=args.slo_tpot_ms / 1000 if args.slo_tpot_ms else None)
        options = ServeOptions(grpc_host=args.grpc_host, grpc_port=args.grpc_port, address=args.address,
                               grace_s=args.grace, http_host=args.http_host, http_port=args.http_port,
                               default_slo=slo, router_only=args.router_only)
        server = Server(config, options)
    except ValueError as error:
        print(f"splitserve: error: {error}", file=sys.stderr)
        return 2

    def ready(s: Server) -> None:
        role = ", router replica" if options.router_only else ""
        print(f"splitserve: serving {s.router.model_name} ({config.mode}{role}) on {s.address}", flush=True)
        if s.http_port is not None:
            print(f"splitserve: OpenAI-compatible API on http://{options.http_host}:{s.http_port}/v1", flush=True)

    connect_ray(options.address)  # first: it installs a SIGTERM handler that ours replaces

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        await server.run(on_ready=ready)

    try:
        asyncio.run(main())
    except (ValueError, CapacityError, ServingError) as error:  # start-up failed; workers are stopped
        print(f"splitserve: error: {error}", file=sys.stderr)
        return 1
    print("splitserve: stopped", file=sys.stderr)
    return 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    from splitserve.cluster.deployment import MODES
    from splitserve.cluster.worker import TRANSFER_BACKENDS
    from splitserve.config import PROPOSERS
    from splitserve.router.grpc_server import DEFAULT_GRPC_PORT
    from splitserve.transfer import CODECS

    serve = commands.add_parser("serve", help="serve a model on a Ray cluster over gRPC until interrupted")
    serve.add_argument("--mode", choices=MODES, default="disaggregated")
    serve.add_argument("--prefill-workers", type=int, default=1)
    serve.add_argument("--decode-workers", type=int, default=1)
    serve.add_argument("--workers", type=int, default=1, help="colocated workers (--mode colocated)")
    serve.add_argument("--address", default=None, help="join this Ray cluster ('auto' or HOST:PORT); default: local")
    serve.add_argument("--redis-url", default=None, help="shared state in this Redis; default: an embedded store")
    serve.add_argument("--store-prefix", default="splitserve", help="namespace of this deployment's shared state")
    serve.add_argument("--grpc-host", default="127.0.0.1")
    serve.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    serve.add_argument("--http-host", default="127.0.0.1")
    serve.add_argument("--http-port", type=int, default=None, help="also serve the OpenAI-compatible HTTP API "
                       "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) here; 0: a free port")
    serve.add_argument("--host", default="127.0.0.1", help="the address workers reach each other at (KV transfer)")
    serve.add_argument("--transfer", choices=TRANSFER_BACKENDS, default="collective")
    serve.add_argument("--kv-codec", choices=sorted(CODECS), default="raw")
    serve.add_argument("--layers-per-chunk", type=int, default=6, help="layers per KV chunk on the wire")
    serve.add_argument("--model", default=None, help="a .gguf file or an HF folder (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per worker (default: 1 GiB)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=1024)
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV blocks of prompt prefixes seen before (default: on)")
    serve.add_argument("--threads-per-worker", type=int, default=None, help="default: the CPUs split evenly")
    serve.add_argument("--speculative", choices=PROPOSERS, default=None, help="decode-side proposer")
    serve.add_argument("--num-speculative-tokens", type=int, default=3)
    serve.add_argument("--slo-ttft-ms", type=float, default=None,
                       help="default TTFT SLO for requests that set none (refused when predicted to miss)")
    serve.add_argument("--slo-tpot-ms", type=float, default=None, help="default TPOT SLO, likewise")
    serve.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get at shutdown")
    serve.add_argument("--router-only", action="store_true",
                       help="a router replica: start no workers, serve over those another `splitserve serve` "
                       "started (same --redis-url, --store-prefix, --mode and --model; join its Ray with --address); "
                       "worker options are ignored")
    serve.set_defaults(run=_serve)


def _add_client(commands: argparse._SubParsersAction) -> None:
    from splitserve.router.client import DEFAULT_ADDRESS

    client = commands.add_parser("client", help="stream one prompt's output from a running splitserve server (gRPC)")
    client.add_argument("prompt", help="the prompt text")
    client.add_argument("--address", default=DEFAULT_ADDRESS, help="the server's HOST:PORT (default: %(default)s)")
    _add_sampling_options(client)
    client.add_argument("--chat", action="store_true", help="send the prompt as a user message (the server "
                        "applies the model's chat template)")
    client.add_argument("--wait-ready", type=float, default=None, metavar="SECONDS",
                        help="first wait up to SECONDS for the server to report SERVING")
    client.set_defaults(run=_client)


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    # The same defaults for both subcommands, so they print the same text for the same prompt.
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_client(commands)
    _add_serve(commands)
    _add_loadtest(commands)
    return parser


def _add_loadtest(commands: argparse._SubParsersAction) -> None:
    from splitserve.loadtest.cli import add_parser

    add_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given: loadtest keeps it with its results
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
