"""The `splitserve` command line as a user reads it: every flag of every (sub)command has help,
`--help` names the commands, `--version` prints the package's version, and `serve`'s defaults
are the configuration dataclasses' own. Only parsers are built: no Ray, no model."""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from splitserve import cli, server
from splitserve.config import (
    ClusterConfig,
    EngineConfig,
    ServeConfig,
    SpeculativeConfig,
    StoreConfig,
    TransferConfig,
    field_default,
)
from splitserve.engine.sampling_params import SamplingParams

COMMANDS = ("generate", "client", "serve", "loadtest", "simulate")
LOADTEST_COMMANDS = ("run", "sweep", "search", "slo-scale", "report")
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def walk(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, argparse.Action]]:
    """Every action of parser and of its subcommands' parsers, depth first."""
    for action in parser._actions:
        yield parser, action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk(sub)


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_argument_has_help() -> None:
    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser, action in walk(cli.build_parser())
        if not isinstance(action, argparse._HelpAction | argparse._VersionAction) and not (action.help or "").strip()
    ]
    assert missing == []


def test_every_subcommand_is_described() -> None:
    for parser, action in walk(cli.build_parser()):
        if isinstance(action, argparse._SubParsersAction):
            assert [c.dest for c in action._choices_actions] == list(action.choices)
            assert all(c.help for c in action._choices_actions), parser.prog
            assert all(sub.description for sub in action.choices.values()), parser.prog


def test_every_help_page_formats(capsys: pytest.CaptureFixture[str]) -> None:
    """A stray % in a help string only fails when --help is printed."""
    pages = [[], *([c] for c in COMMANDS), *(["loadtest", c] for c in LOADTEST_COMMANDS)]
    for argv in pages:
        assert "usage: splitserve" in help_text([*argv, "--help"], capsys)


def test_help_describes_each_command(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_text(["--help"], capsys)
    for command in COMMANDS:
        assert f"\n    {command} " in out, command
    assert "examples:" in out and "splitserve serve" in out
    assert "_add_" not in out  # the module docstring is for developers, not the description
    loadtest = help_text(["loadtest", "--help"], capsys)
    for command in LOADTEST_COMMANDS:
        assert f"\n    {command} " in loadtest, command


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert help_text(["--version"], capsys) == f"splitserve {metadata.version('splitserve')}\n"


def test_version_without_installed_metadata(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", not_installed)
    with PYPROJECT.open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    assert help_text(["--version"], capsys) == f"splitserve {version}\n"


def test_serve_defaults_are_the_configs() -> None:
    args = cli.build_parser().parse_args(["serve"])
    cluster, engine, options = ClusterConfig(), EngineConfig(), ServeConfig()
    transfer, store = TransferConfig(), StoreConfig()
    expected = {
        "mode": cluster.mode, "prefill_workers": cluster.num_prefill_workers,
        "decode_workers": cluster.num_decode_workers, "workers": cluster.num_workers,
        "threads_per_worker": cluster.num_threads, "cpus_per_worker": cluster.cpus_per_worker,
        "stream_interval": cluster.stream_interval, "migration_limit": options.migration_limit,
        "max_queued_requests": options.max_queued_requests, "ssl_certfile": options.access.ssl_certfile,
        "ssl_keyfile": options.access.ssl_keyfile, "ssl_ca_certs": options.access.ssl_ca_certs,
        "prefill_resources": cluster.prefill_resources, "decode_resources": cluster.decode_resources,
        "resource_wait": cluster.resource_wait_s, "host": transfer.host, "transfer": transfer.backend,
        "kv_codec": transfer.kv_codec, "layers_per_chunk": transfer.layers_per_chunk,
        "redis_url": store.redis_url, "store_prefix": store.prefix,
        "address": options.address, "grpc_host": options.grpc_host, "grpc_port": options.grpc_port,
        "http_host": options.http_host, "http_port": options.http_port, "grace": options.grace_s,
        "router_only": options.router_only, "balance_roles": options.roles.enabled,
        "role_dwell": options.roles.min_dwell_s, "admission": options.placement.admission,
        "prefill_chunk_tokens": options.placement.chunk_tokens,
        "model": engine.model, "dtype": engine.dtype, "quantization": engine.quantization,
        "enforce_eager": engine.enforce_eager, "num_kv_blocks": engine.num_kv_blocks,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "num_speculative_tokens": SpeculativeConfig("ngram").num_speculative_tokens,
        # Deliberately None: no speculation, and no SLO (ServeConfig's are in seconds, and None).
        "speculative": None, "slo_ttft_ms": None, "slo_tpot_ms": None,
        # None: the keys come from $SPLITSERVE_API_KEY, else there are none (AccessConfig's default).
        "api_key": None,
    }
    assert {name: getattr(args, name) for name in expected} == expected
    assert engine.speculative is None and cluster.decode_engine is None
    assert options.slo_ttft_s is None and options.slo_tpot_s is None


def test_generate_and_client_share_their_defaults() -> None:
    parser = cli.build_parser()
    generate, client = parser.parse_args(["generate", "hi"]), parser.parse_args(["client", "hi"])
    sampling = ("max_tokens", "temperature", "top_p", "top_k", "seed")
    assert {n: getattr(generate, n) for n in sampling} == {n: getattr(client, n) for n in sampling}
    params = SamplingParams()
    assert (generate.top_p, generate.top_k, generate.seed) == (params.top_p, params.top_k, params.seed)
    assert cli.engine_config(generate) == EngineConfig()


def test_default_reads_a_dataclass_field() -> None:
    assert field_default(EngineConfig, "max_num_batched_tokens") == EngineConfig().max_num_batched_tokens
    assert field_default(ClusterConfig, "engine") == EngineConfig()  # from the default_factory
    with pytest.raises(AssertionError, match="no field"):
        field_default(EngineConfig, "no_such_field")
    with pytest.raises(AssertionError, match="no default"):
        field_default(SpeculativeConfig, "proposer")


def test_serve_flags_build_the_configs() -> None:
    from splitserve.serve_cli import configs

    args = cli.build_parser().parse_args([
        "serve", "--transfer", "grpc", "--kv-codec", "int8", "--redis-url", "redis://127.0.0.1:1/0",
        "--store-prefix", "p", "--speculative", "ngram", "--num-speculative-tokens", "2", "--slo-ttft-ms", "250",
        "--http-port", "0", "--stream-interval", "4", "--host", "auto", "--resource-wait", "30",
        "--prefill-resources", '{"splitserve_prefill": 1}', "--decode-resources", '{"splitserve_decode": 0.5}',
        "--no-restart-workers", "--prefill-chunk-tokens", "1024,256", "--release-memory-every", "30",
        "--dtype", "bfloat16", "--quantization", "int8"])
    cluster, serve = configs(args)
    assert serve.placement.chunk_tokens == (1024, 256)
    engines = [cluster.engine, cluster.decode_engine, *(w.engine for w in cluster.worker_configs(2, 0))]
    assert all(e is not None and (e.dtype, e.quantization) == ("bfloat16", "int8") for e in engines)
    assert not cluster.restart_workers and configs(cli.build_parser().parse_args(["serve"]))[0].restart_workers
    assert [(w.kind, w.resources) for w in cluster.worker_configs(2, 0)] == [
        ("prefill", {"splitserve_prefill": 1}), ("decode", {"splitserve_decode": 0.5})]
    assert cluster.resource_wait_s == 30 and cluster.transfer.host == "auto"
    assert cluster.stream_interval == 4 and all(w.stream_interval == 4 for w in cluster.worker_configs(2, 0))
    assert all(w.release_memory_every_s == 30 for w in cluster.worker_configs(2, 0))
    never = configs(cli.build_parser().parse_args(["serve", "--release-memory-every", "0"]))[0]
    assert never.release_memory_every_s is None and never.worker_configs(2, 0)[0].release_memory_every_s is None
    assert cluster.transfer == TransferConfig(backend="grpc", kv_codec="int8", host="auto")
    assert cluster.store == StoreConfig(redis_url="redis://127.0.0.1:1/0", prefix="p")
    assert cluster.decode_engine is not None and cluster.decode_engine.speculative == SpeculativeConfig(
        "ngram", num_speculative_tokens=2)
    assert serve.slo_ttft_s == 0.25 and serve.slo_tpot_s is None and serve.http_port == 0


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["profile", "--out", "p.json"]])
def test_a_bad_quantization_is_refused_naming_the_choices(command: list[str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([*command, "--quantization", "int4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --quantization: invalid choice: 'int4'" in err and "int8" in err


def test_an_unreachable_redis_is_one_sentence_and_exit_1(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "connect_ray", lambda address: None)  # the store is what fails first
    assert cli.main(["serve", "--redis-url", "redis://127.0.0.1:1/0", "--grpc-port", "0"]) == 1
    err = capsys.readouterr().err
    assert "splitserve: error: cannot reach Redis at redis://127.0.0.1:1/0" in err and "Traceback" not in err


@pytest.mark.parametrize(("value", "message"), [
    ("{", "argument --prefill-resources: not JSON"), ("[1]", "must be a JSON object of resource name -> amount")])
def test_a_resources_flag_takes_a_json_object(value: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["serve", "--prefill-resources", value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--layers-per-chunk", "0"], "layers_per_chunk must be >= 1"),
    (["--store-prefix", " "], "store prefix must be a non-empty string"),
    (["--grpc-port", "70000"], "grpc_port must be in 0..65535"),
    (["--slo-tpot-ms", "-5"], "slo_tpot_s must be positive"),
    (["--mode", "disaggregated", "--prefill-workers", "0"], "at least one prefill and one decode worker"),
    (["--workers", "2", "--prefill-workers", "2"], "at least one decode worker"),
    (["--workers", "3", "--prefill-workers", "1", "--decode-workers", "1"], "split of its 3 workers"),
    (["--workers", "-1"], "number of workers must be >= 0"),
    (["--mode", "colocated", "--decode-workers", "1"], "colocated mode has no prefill/decode split"),
    (["--grace", "-1"], "grace_s >= 0"),
    (["--role-dwell", "-1"], "min_dwell_s >= 0"),
    (["--stream-interval", "0"], "stream_interval must be an integer >= 1"),
    (["--release-memory-every", "-1"], "release_memory_every_s must be a positive number of seconds"),
    (["--prefill-resources", '{"GPU": 1}'], "prefill_resources takes custom resources; 'GPU' is Ray's own"),
    (["--decode-resources", '{"pool": 0}'], "decode_resources['pool'] must be a positive number"),
    (["--resource-wait", "-1"], "resource_wait_s must be >= 0"),
    (["--kv-auth-key-file", "/nonexistent/kv.key"], "cannot read the KV auth key file /nonexistent/kv.key"),
    (["--kv-auth-key-file", "/dev/null"], "the KV auth key file /dev/null is empty"),
    (["--stream-lease", "0"], "stream_lease_s must be positive and finite"),
    (["--stream-check", "-2"], "stream_check_s must be positive and finite"),
    (["--send-timeout", "inf"], "send_timeout_s must be positive and finite"),
])
def test_bad_serve_flags_are_one_sentence_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ray(address: str | None) -> None:
        raise AssertionError("a bad flag must be refused before Ray is joined")

    monkeypatch.setattr(server, "connect_ray", no_ray)
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitserve: error: ") and message in err


def test_the_kv_auth_key_comes_from_its_file_else_the_environment(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from splitserve.serve_cli import KV_AUTH_KEY_ENV, configs

    def transfer(*argv: str) -> TransferConfig:
        return configs(cli.build_parser().parse_args(["serve", *argv]))[0].transfer

    monkeypatch.delenv(KV_AUTH_KEY_ENV, raising=False)
    assert transfer().auth_key is None
    monkeypatch.setenv(KV_AUTH_KEY_ENV, " from-the-environment\n")
    assert transfer().auth_key == b"from-the-environment"
    key_file = tmp_path / "kv.key"
    key_file.write_bytes(b"0123456789abcdef0123\n")
    assert transfer("--kv-auth-key-file", str(key_file)).auth_key == b"0123456789abcdef0123"
    assert "0123456789abcdef" not in repr(transfer("--kv-auth-key-file", str(key_file)))
    key_file.write_bytes(b"short")
    monkeypatch.setattr(server, "connect_ray", lambda address: None)
    assert cli.main(["serve", "--kv-auth-key-file", str(key_file)]) == 2
    assert "the KV auth key must be at least 16 bytes" in capsys.readouterr().err
