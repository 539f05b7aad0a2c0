"""The `splitserve` command line.

`splitserve generate "PROMPT"` runs the model in this process; `splitserve client "PROMPT"`
asks a running splitserve server over gRPC. Each subcommand is an `_add_*` parser function plus
the function it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
