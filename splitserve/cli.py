"""The `splitserve` command line.

`splitserve generate "PROMPT"` runs the model in this process; `splitserve serve` starts the
workers on Ray and serves gRPC (and the OpenAI-compatible HTTP API with --http-port) until
interrupted; `splitserve client "PROMPT"` asks a running server; `splitserve loadtest` measures
a server under load (splitserve.loadtest.cli); `splitserve simulate` runs a simulated cluster
over a latency profile (splitserve.sim.cli); `splitserve profile` measures such a profile of this
engine on this machine (splitserve.profiler.cli); `splitserve plan` searches the best layout of
N GPUs with that simulator (splitserve.sim.plan_cli). Each subcommand is an `_add_*` parser function
plus the function it runs; `serve` lives in splitserve.serve_cli. Flag defaults are read from
the configuration dataclasses with `config.field_default`, so a default changed there is the
command line's too; where a flag deliberately differs, its default is written out with a
comment saying why.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from splitserve.config import DTYPES, QUANTIZATIONS, EngineConfig, field_default

if TYPE_CHECKING:
    from splitserve.protos.splitserve.v1.serving_pb2 import GenerateResponse

_DESCRIPTION = """\
LLM serving with prefill and decode on separate workers, a goodput-aware router and
per-request speculative decoding."""

_EPILOG = """\
examples:
  splitserve generate --chat "What is the capital of France?"
  splitserve serve --http-port 8000      # 1 prefill + 1 decode worker on a local Ray; gRPC on :50051
  splitserve client --chat "What is the capital of France?"
  splitserve loadtest run --target grpc://localhost:50051 --rate 2 --slo-ttft-ms 1000
  splitserve simulate --profile PROFILE.json --prefill-instances 2 --decode-instances 2 --rates 1,2,4
  splitserve profile --out PROFILE.json   # this engine's latency models on this machine
  splitserve plan --profile PROFILE.json --gpus 8 --slo-ttft-ms 250 --slo-tpot-ms 100

`splitserve COMMAND --help` lists a command's options."""

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
        engine = LLMEngine(engine_config(args))
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


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine `generate` runs, from its model options."""
    return EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization,
                        enforce_eager=args.enforce_eager)


def _client(args: argparse.Namespace) -> int:
    import grpc

    from splitserve.router.client import GenerationClient, make_request

    prompt, messages = (None, [{"role": "user", "content": args.prompt}]) if args.chat else (args.prompt, [])
    request = make_request(prompt, messages=messages, max_tokens=args.max_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    from splitserve.router.access import read_pem
    from splitserve.serve_cli import api_keys

    try:
        tls = {"root_certificates": read_pem(args.ssl_ca_certs, "--ssl-ca-certs"),
               "certificate_chain": read_pem(args.ssl_certfile, "--ssl-certfile"),
               "private_key": read_pem(args.ssl_keyfile, "--ssl-keyfile")}
    except ValueError as error:
        print(f"splitserve: error: {error}", file=sys.stderr)
        return 2
    keys = api_keys([args.api_key] if args.api_key else None)
    with GenerationClient(args.address, api_key=keys[0] if keys else None, **tls) as client:
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
    gen = _add_command(commands, "generate", "generate text for one prompt on this machine, streaming it")
    gen.add_argument("prompt", help="the prompt text")
    _add_model_options(gen)
    _add_sampling_options(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.set_defaults(run=_generate)


def _add_client(commands: argparse._SubParsersAction) -> None:
    from splitserve.router.client import DEFAULT_ADDRESS

    client = _add_command(commands, "client", "stream one prompt's output from a running splitserve server (gRPC)")
    client.add_argument("prompt", help="the prompt text")
    client.add_argument("--address", default=DEFAULT_ADDRESS, help="the server's HOST:PORT (default: %(default)s)")
    client.add_argument("--api-key", metavar="KEY", help="send 'authorization: Bearer KEY' (default: the first of "
                        "$SPLITSERVE_API_KEY, else none)")
    client.add_argument("--ssl-ca-certs", metavar="FILE", help="connect with TLS, trusting this PEM CA bundle "
                        "(default: plaintext)")
    client.add_argument("--ssl-certfile", metavar="FILE", help="PEM client certificate, for mutual TLS (default: none)")
    client.add_argument("--ssl-keyfile", metavar="FILE", help="PEM private key of --ssl-certfile (default: none)")
    _add_sampling_options(client)
    client.add_argument("--chat", action="store_true", help="send the prompt as a user message (the server "
                        "applies the model's chat template)")
    client.add_argument("--wait-ready", type=float, default=None, metavar="SECONDS",
                        help="first wait up to SECONDS for the server to report SERVING (default: don't wait)")
    client.set_defaults(run=_client)


def _add_model_options(parser: argparse._ActionsContainer) -> None:
    parser.add_argument("--model", default=field_default(EngineConfig, "model"), metavar="PATH",
                        help="a .gguf file or an HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=DTYPES, default=field_default(EngineConfig, "dtype"),
                        help="the weights' and activations' dtype (default: %(default)s)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=field_default(EngineConfig, "quantization"),
                        help="int8: the projections' weights as int8, one scale per output channel (weight-only; "
                        "their GEMMs take bf16 inputs; the rest stays in --dtype) (default: none, weights in --dtype)")
    add_enforce_eager_option(parser)


def add_enforce_eager_option(parser: argparse._ActionsContainer) -> None:
    """--enforce-eager / --no-enforce-eager, which `generate`, `serve` and `profile` share."""
    is_eager = field_default(EngineConfig, "enforce_eager")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=is_eager,
                        help="run the model eagerly; --no-enforce-eager compiles each layer's work around "
                        "attention with torch.compile at start (seconds to tens of seconds; no clear gain "
                        "measured here, docs/benchmarks.md#compiled-forward) (default: "
                        f"{'eager' if is_eager else 'compiled'})")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    from splitserve.engine.sampling_params import SamplingParams

    # The same defaults for both subcommands, so they print the same text for the same prompt.
    # --max-tokens and --temperature differ from SamplingParams (16, 1.0): a command line wants a
    # useful length and a repeatable answer.
    parser.add_argument("--max-tokens", type=int, default=128, metavar="N",
                        help="most tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature; 0 is greedy (default: %(default)g)")
    parser.add_argument("--top-p", type=float, default=field_default(SamplingParams, "top_p"), metavar="P",
                        help="sample from the fewest most likely tokens whose probability adds up to P "
                        "(default: %(default)g)")
    parser.add_argument("--top-k", type=int, default=field_default(SamplingParams, "top_k"), metavar="K",
                        help="sample from the K most likely tokens (default: all)")
    parser.add_argument("--seed", type=int, default=field_default(SamplingParams, "seed"),
                        help="make sampled output repeatable (default: none)")


def _add_command(commands: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line summary is both its line in `splitserve --help` and its description."""
    return commands.add_parser(name, help=summary.replace("%", "%%"),
                               description=summary[0].upper() + summary[1:] + ".")


def _version() -> str:
    """The installed package's version; in a source tree that is not installed, pyproject's."""
    try:
        return metadata.version("splitserve")
    except metadata.PackageNotFoundError:
        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as file:
            return str(tomllib.load(file)["project"]["version"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                                     help="one of:")
    _add_generate(commands)
    _add_client(commands)
    _add_serve(commands)
    _add_loadtest(commands)
    _add_simulate(commands)
    _add_profile(commands)
    _add_plan(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction) -> None:
    from splitserve.serve_cli import add_options

    serve = _add_command(commands, "serve", "serve a model on a Ray cluster over gRPC (and optionally "
                         "OpenAI-compatible HTTP) until interrupted")
    add_options(serve, _add_model_options)


def _add_loadtest(commands: argparse._SubParsersAction) -> None:
    from splitserve.loadtest.cli import add_parser

    add_parser(commands)


def _add_simulate(commands: argparse._SubParsersAction) -> None:
    from splitserve.sim.cli import add_parser

    add_parser(commands)


def _add_profile(commands: argparse._SubParsersAction) -> None:
    from splitserve.profiler.cli import add_parser

    add_parser(commands)


def _add_plan(commands: argparse._SubParsersAction) -> None:
    from splitserve.sim.plan_cli import add_parser

    add_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given: loadtest keeps it with its results
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
