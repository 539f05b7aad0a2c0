"""The chart against the code it deploys: every rendered `splitserve serve` parses with the real
CLI and makes a valid configuration; the head and the routers agree on what they must share;
ports agree across arguments, containers, probes, Services and monitors; drain fits in the
grace period; the versions match pyproject.toml; each worker group offers the Ray resources its
pool's flag asks for, as many times as the head starts workers there."""

from __future__ import annotations

import argparse
import json
import re
import shlex

import pytest
import yaml

from splitserve.cli import build_parser
from splitserve.serve_cli import configs
from tests.deploy.manifests import (
    CHART,
    DOCKERFILE,
    Pod,
    case_values,
    documents,
    frontends,
    of_kind,
    pinned,
    pods,
    pyproject,
    ray_cluster,
    selected,
    serve_args,
)

ENTRYPOINT = "/usr/local/bin/splitserve-entrypoint"
POOLS = ("prefill", "decode")


def parse_serve(pod: Pod) -> argparse.Namespace:
    args = serve_args(pod)
    assert args is not None, f"{pod.group} runs no serve"
    try:
        return build_parser().parse_args(["serve", *args])
    except SystemExit as exit_:
        raise AssertionError(f"{pod.group}: `splitserve serve {shlex.join(args)}` does not parse") from exit_


def head(all_pods: list[Pod]) -> Pod:
    (pod,) = [p for p in all_pods if p.group == "head"]
    return pod


def ray_resources(pod: Pod) -> dict[str, float]:
    """The custom resources a worker group's `ray start --resources=...` offers, read as the
    shell KubeRay hands the generated command to reads it."""
    value = pod.ray_start_params.get("resources")
    if value is None:
        return {}
    (word,) = shlex.split(f"--resources={value}")
    return json.loads(word.removeprefix("--resources="))


# --------------------------------------------------------------------------- the CLI


def test_every_serve_command_line_parses_into_a_valid_configuration(docs):
    serving = [pod for pod in pods(docs) if serve_args(pod) is not None]
    assert {p.group for p in serving} == {p.group for p in frontends(pods(docs))}
    for pod in serving:
        cluster, serve = configs(parse_serve(pod))  # ValueError (a sentence) if the values are bad
        assert serve.address == "auto", f"{pod.group} must join the pod's Ray node"
        assert serve.grpc_host == serve.http_host == "0.0.0.0", f"{pod.group} must listen on the pod's address"


def test_head_starts_the_workers_and_routers_only_route(docs):
    all_pods = pods(docs)
    assert not parse_serve(head(all_pods)).router_only
    for pod in frontends(all_pods):
        if pod.group != "head":
            assert parse_serve(pod).router_only, f"{pod.group} would start workers of its own"
    for pod in all_pods:
        if pod.group in POOLS:
            assert pod.container["args"] == ["node"], f"{pod.group} pods only run a Ray node"


def test_routers_share_the_heads_store_mode_and_model(docs):
    all_pods = pods(docs)
    primary = parse_serve(head(all_pods))
    shared = ("redis_url", "store_prefix", "mode", "model", "dtype", "grpc_port", "http_port", "grace")
    for pod in frontends(all_pods):
        replica = parse_serve(pod)
        for name in shared:
            assert getattr(replica, name) == getattr(primary, name), f"{pod.group}: --{name} differs from the head's"
        if replica.router_only:
            assert replica.redis_url, "router replicas find the workers through Redis"


def test_every_container_runs_the_images_entrypoint(docs):
    dockerfile = DOCKERFILE.read_text()
    assert f'ENTRYPOINT ["{ENTRYPOINT}"]' in dockerfile
    assert re.search(rf"^COPY .*deploy/docker/entrypoint\.sh {re.escape(ENTRYPOINT)}$", dockerfile, re.MULTILINE)
    cluster = ray_cluster(docs)
    # KubeRay would otherwise replace the command with its own `ray start ... --block`.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for pod in pods(docs):
        if "ray.io/cluster" in pod.labels:
            assert pod.container["command"] == [ENTRYPOINT], pod.group


# --------------------------------------------------------------------------- ports and probes


def test_front_end_ports_agree_across_arguments_containers_and_probes(docs):
    for pod in frontends(pods(docs)):
        args, container = parse_serve(pod), pod.container
        assert pod.port("grpc") == args.grpc_port and pod.port("http") == args.http_port, pod.group
        assert container["readinessProbe"]["grpc"] == {"port": args.grpc_port, "service": ""}, pod.group
        startup, liveness = container["startupProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
        assert (startup["path"], pod.port(startup["port"])) == ("/health", args.http_port), pod.group
        assert (liveness["path"], pod.port(liveness["port"])) == ("/livez", args.http_port), pod.group


def test_services_and_monitors_reach_the_ports_they_name(docs):
    all_pods = pods(docs)
    for service in of_kind(docs, "Service"):
        picked = selected(service["spec"]["selector"], all_pods)
        for port in service["spec"]["ports"]:
            numbers = {pod.port(port["targetPort"]) for pod in picked}
            assert numbers == {port["port"]}, f"{service['metadata']['name']}/{port['name']}: {numbers}"
    for monitor in of_kind(docs, "ServiceMonitor"):
        (service,) = [s for s in of_kind(docs, "Service")
                      if s["metadata"]["labels"].items() >= monitor["spec"]["selector"]["matchLabels"].items()]
        names = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= names
        assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    for monitor in of_kind(docs, "PodMonitor"):
        for pod in selected(monitor["spec"]["selector"]["matchLabels"], all_pods):
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert pod.port(endpoint["port"]) == int(pod.ray_start_params["metrics-export-port"]), pod.group


def test_api_service_serves_grpc_and_http(docs):
    name = ray_cluster(docs)["metadata"]["name"]
    (api,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == name]
    assert {p["name"]: p.get("appProtocol") for p in api["spec"]["ports"]} == {"grpc": "grpc", "http": "http"}


# --------------------------------------------------------------------------- drain and start-up


def test_drain_fits_in_the_termination_grace_period(docs):
    for pod in frontends(pods(docs)):
        command = pod.container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", pod.group
        pre_stop, grace = float(command[1]), parse_serve(pod).grace
        period = pod.spec["terminationGracePeriodSeconds"]
        assert pre_stop + grace < period, f"{pod.group}: preStop {pre_stop} s + --grace {grace} s >= {period} s"


def test_startup_probe_outlasts_the_wait_for_workers(docs):
    """The head's serve may wait --resource-wait seconds for worker pods, then load the model;
    a startup probe that gave up sooner would restart the head (and the whole Ray cluster)."""
    all_pods = pods(docs)
    wait = parse_serve(head(all_pods)).resource_wait
    for pod in frontends(all_pods):
        probe = pod.container["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] > wait, pod.group


# --------------------------------------------------------------------------- versions


def test_versions_match_pyproject(docs):
    ray, version = pinned("ray"), pyproject()["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    assert yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"] == ray
    assert ray_cluster(docs)["spec"]["rayVersion"] == ray
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray)}$", dockerfile, re.MULTILINE)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pinned('torch'))}$", dockerfile, re.MULTILINE)


def test_images_follow_the_tag_convention(docs):
    """<splitserve version>-ray<Ray version>-<cpu | CUDA variant>, as deploy/docker builds it."""
    ray, version = pinned("ray"), pyproject()["project"]["version"]
    on_gpus = any(pod.ray_start_params.get("num-gpus") for pod in pods(docs))
    for pod in pods(docs):
        if "ray.io/cluster" not in pod.labels:
            continue
        tag = pod.container["image"].rpartition(":")[2]
        match = re.fullmatch(rf"{re.escape(version)}-ray{re.escape(ray)}-(cpu|cu\d+)", tag)
        assert match, f"{pod.group}: image tag {tag!r}"
        assert (match.group(1) != "cpu") == on_gpus, f"{pod.group}: {tag!r} on {'GPU' if on_gpus else 'CPU'} pods"


# --------------------------------------------------------------------------- pools and resources


def test_each_pool_lands_on_its_own_group(docs):
    all_pods = pods(docs)
    args = parse_serve(head(all_pods))
    cluster, _ = configs(args)
    counts = cluster.worker_counts()
    flags = {"prefill": args.prefill_resources, "decode": args.decode_resources}
    for pool in POOLS:
        group = [p for p in all_pods if p.group == pool]
        asked = flags[pool]
        assert asked, f"--{pool}-resources is empty: the pool could land anywhere"
        for name, amount in asked.items():
            offered = sum(ray_resources(p).get(name, 0) * p.replicas for p in group)
            assert offered == amount * counts[pool], (
                f"{pool}: {counts[pool]} workers ask {amount} {name} each; the {pool} group offers {offered}")
            others = [p.group for p in all_pods if p.group != pool and name in ray_resources(p)]
            assert not others, f"{name} is offered outside the {pool} group too: {others}"


def test_worker_groups_have_the_cpus_and_gpus_their_workers_take(docs):
    all_pods = pods(docs)
    threads = parse_serve(head(all_pods)).threads_per_worker
    for pod in all_pods:
        if pod.group in POOLS:
            workers = sum(ray_resources(pod).values())
            resources = pod.container["resources"]
            assert float(pod.ray_start_params["num-cpus"]) >= workers * threads, pod.group
            assert resources["requests"]["cpu"] == pod.ray_start_params["num-cpus"], pod.group
            gpus = pod.ray_start_params.get("num-gpus")
            if gpus is not None:
                assert int(gpus) == workers, f"{pod.group}: one GPU per worker"
                assert {k: v for k, v in resources["limits"].items() if k.endswith("/gpu")} == {"nvidia.com/gpu": gpus}
        elif "ray.io/cluster" in pod.labels:
            assert pod.ray_start_params["num-cpus"] == "0", f"{pod.group}: workers must not land on front ends"


def test_gpu_pods_get_nccl_settings_and_shared_memory(docs):
    for pod in pods(docs):
        mounts = {m["mountPath"]: m["name"] for m in pod.container.get("volumeMounts", [])}
        if "ray.io/cluster" in pod.labels:
            volume = {v["name"]: v for v in pod.spec["volumes"]}[mounts["/dev/shm"]]
            assert volume["emptyDir"]["medium"] == "Memory", pod.group
        if pod.ray_start_params.get("num-gpus"):
            env = {e["name"] for e in pod.container.get("env", [])}
            assert {"NCCL_DEBUG", "NCCL_IB_DISABLE"} <= env, pod.group


def test_every_ray_pod_mounts_an_external_redis_ca_where_one_is_named(docs, case):
    """rediss:// with a private CA: the URL names /etc/splitserve/redis-ca/ca.crt, so every process
    that reaches the store -- the head's serve, the routers, every worker -- must see that file."""
    external = case_values(case).get("redis", {}).get("external", {})
    for pod in pods(docs):
        if "ray.io/cluster" not in pod.labels:
            continue
        volumes = {v["name"]: v for v in pod.spec["volumes"]}
        mounts = {m["mountPath"]: m for m in pod.container.get("volumeMounts", [])}
        if not external.get("caSecretName"):
            assert "redis-ca" not in volumes, pod.group
            continue
        mount = mounts["/etc/splitserve/redis-ca"]
        assert mount["readOnly"] is True, pod.group
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == external["caSecretName"], pod.group
        assert secret["items"] == [{"key": external.get("caSecretKey", "ca.crt"), "path": "ca.crt"}], pod.group


@pytest.mark.parametrize("pool", POOLS)
def test_scaling_a_pool_scales_its_workers(renderer, pool):
    """`--set prefill.replicas=3` (say) is all it takes: the head starts workers for every pod."""
    values = {"mode": "elastic", pool: {"replicas": 3, "workersPerPod": 2}}
    all_pods = pods(documents(renderer.render(values)))
    cluster, _ = configs(parse_serve(head(all_pods)))
    assert cluster.worker_counts()[pool] == 6
    (group,) = [p for p in all_pods if p.group == pool]
    assert group.replicas == 3 and sum(ray_resources(group).values()) == 2
