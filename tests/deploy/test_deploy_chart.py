"""The Helm chart deploy/helm/splitserve, without a cluster: it renders for its defaults and every
ci/ values file, lints strictly, every core object is valid for Kubernetes (strict schemas of
the oldest supported and the newest release) and the RayCluster for KubeRay's CRD (strict where
the CRD lists properties); values.schema.json refuses nonsense; every selector picks pods; the
Grafana dashboard speaks our metric names; deploy/examples equal a fresh render."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import (
    CASES,
    CHART,
    EXAMPLES,
    SCHEMAS,
    case_values,
    groups,
    of_kind,
    pods,
    ray_cluster,
    selected,
)

KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")  # Chart.yaml's kubeVersion floor, and the newest schemas
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor", "PodMonitor"}  # not in Kubernetes' own schemas
VALUES_FILES = [case for case in CASES if case != "defaults"]


def test_every_case_renders_the_cluster_and_its_services(docs):
    kinds = {doc["kind"] for doc in docs}
    assert {"RayCluster", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


@pytest.mark.parametrize("case", CASES)
def test_chart_lints_strictly(renderer, case):
    import helm_python as helm

    report = helm.lint(CHART, case_values(case), strict=True)
    # Severity 1 is information (Chart.yaml's "icon is recommended"); 2 warnings, 3 errors.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


# --------------------------------------------------------------------------- Kubernetes schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_are_valid_kubernetes(docs, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_ray_cluster_pod_templates_are_valid_kubernetes(docs, version):
    """The CRD copies PodTemplateSpec's schema; Kubernetes' own, strict, is the sharper check."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for name, group in groups(ray_cluster(docs)).items():
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                   "template": group["template"]}
        kubernetes_validate.validate(wrapper, version, strict=True)


def test_kubernetes_validation_refuses_an_unknown_field(_rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    service = copy.deepcopy(of_kind(_rendered["defaults"], "Service")[0])
    service["spec"]["ports"][0]["targetPortt"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSIONS[-1], strict=True)


def _strict(schema: Any) -> Any:
    """The CRD's schema with additionalProperties: false wherever it lists properties and leaves
    nothing open (as the KubeRay data's README suggests)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def ray_cluster_validator():
    jsonschema = pytest.importorskip("jsonschema")
    with open(SCHEMAS / "ray.io_rayclusters.yaml") as file:
        crd = yaml.load(file, Loader=yaml.CSafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the API server
    return jsonschema.Draft7Validator(schema)


def test_ray_cluster_is_valid_for_kuberays_crd(docs, ray_cluster_validator):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in ray_cluster_validator.iter_errors(ray_cluster(docs))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("mutate", [
    lambda rc: rc["spec"]["workerGroupSpecs"][0].update(replicaz=1),
    lambda rc: rc["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    lambda rc: rc["spec"].update(upgradeStrategy={"type": "Rolling"}),
], ids=["unknown field", "non-string start param", "unknown strategy"])
def test_crd_validation_refuses_nonsense(_rendered, ray_cluster_validator, mutate):
    cluster = copy.deepcopy(ray_cluster(_rendered["defaults"]))
    mutate(cluster)
    assert list(ray_cluster_validator.iter_errors(cluster))


# --------------------------------------------------------------------------- values.schema.json

BAD_VALUES = {
    "negative prefill replicas": {"prefill": {"replicas": -1}},
    "negative decode replicas": {"decode": {"replicas": -2}},
    "negative router replicas": {"router": {"replicas": -1}},
    "no decode pod": {"decode": {"replicas": 0}},
    "disaggregated without prefill": {"mode": "disaggregated", "prefill": {"replicas": 0}},
    "router replicas without Redis": {"router": {"replicas": 2}, "redis": {"mode": "none"}},
    "external Redis without a Secret": {"redis": {"mode": "external"}},
    "no workers on a pod": {"prefill": {"workersPerPod": 0}},
    "fractional replicas": {"decode": {"replicas": 1.5}},
    "unknown mode": {"mode": "colocated"},
    "unknown key": {"prefil": {"replicas": 1}},
    "unknown nested key": {"serve": {"grpcport": 50051}},
    "bad memory quantity": {"decode": {"memory": "lots"}},
    "port out of range": {"serve": {"httpPort": 70000}},
    "negative grace": {"drain": {"graceSeconds": -5}},
    "zero threads": {"serve": {"threadsPerWorker": 0}},
    "RDMA without GPUs": {"gpu": {"rdma": {"enabled": True}}},
    "unknown Ray auth mode": {"rayAuth": {"mode": "password"}},
    "empty image repository": {"image": {"repository": ""}},
    "bad digest": {"redis": {"bundled": {"image": {"repository": "redis", "tag": "7", "digest": "latest"}}}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_values_schema_refuses_nonsense(renderer, values):
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmValuesError):  # a render (install, template) refuses them too
            chart.render(values, name="splitserve")


@pytest.mark.parametrize("values, message", [
    ({"serve": {"grpcPort": 8000, "httpPort": 8000}}, "different ports"),
    ({"serve": {"httpPort": 8265}}, "Ray's dashboard"),
    ({"serve": {"grpcPort": 6379}}, "Ray's GCS"),
    ({"serve": {"resourceWaitSeconds": 900}}, "startup probe gives up"),
], ids=["same port twice", "Ray dashboard port", "Ray GCS port", "startup probe shorter than the wait"])
def test_inconsistent_values_fail_the_render(renderer, values, message):
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmRenderError, match=message):
            chart.render(values, name="splitserve")


def test_values_schema_accepts_the_documented_variants(renderer):
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        for values in ({"mode": "elastic", "prefill": {"replicas": 0}},
                       {"redis": {"mode": "none"}},
                       {"gpu": {"enabled": True, "rdma": {"enabled": True}}},
                       {"pdb": {"enabled": True, "router": {"maxUnavailable": "50%"}}}):
            chart.validate_schema(values)


# --------------------------------------------------------------------------- selectors


def test_every_selector_picks_pods(docs):
    all_pods = pods(docs)
    for service in of_kind(docs, "Service"):
        assert selected(service["spec"]["selector"], all_pods), f"Service {service['metadata']['name']}"
    for kind in ("PodDisruptionBudget", "NetworkPolicy", "PodMonitor"):
        for doc in of_kind(docs, kind):
            selector = doc["spec"].get("selector", doc["spec"].get("podSelector"))["matchLabels"]
            assert selected(selector, all_pods), f"{kind} {doc['metadata']['name']} selects no pod"


def test_each_disruption_budget_covers_one_group(docs):
    all_pods = pods(docs)
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        picked = selected(pdb["spec"]["selector"]["matchLabels"], all_pods)
        assert len(picked) == 1, f"{pdb['metadata']['name']} picks {[p.group for p in picked]}"


def test_network_policies_name_ports_their_pods_have(docs):
    all_pods = pods(docs)
    for policy in of_kind(docs, "NetworkPolicy"):
        picked = selected(policy["spec"]["podSelector"]["matchLabels"], all_pods)
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                owners = [p for p in picked
                          if any(cp.get("name") == port["port"] for cp in p.container.get("ports", []))]
                assert owners, f"{policy['metadata']['name']}: no selected pod has port {port['port']!r}"


def test_ray_pods_reach_each_other_and_redis(docs):
    """Ray's traffic and KV transfer flow between every pair of the cluster's pods."""
    name = ray_cluster(docs)["metadata"]["name"]
    (ray_policy,) = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{name}-ray"]
    (rule,) = ray_policy["spec"]["ingress"]
    assert "ports" not in rule and rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": name}}}]


# --------------------------------------------------------------------------- the dashboard


def _our_metric_names() -> tuple[set[str], set[str]]:
    """(every series name splitserve exports, the metric families) from the router's Metrics."""
    from splitserve.router.metrics import Metrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    series, families = set(), set()
    for family in Metrics().registry.collect():
        families.add(family.name)
        series.update(family.name + suffix for suffix in suffixes[family.type])
    return series, families


def test_dashboard_queries_only_our_metrics_and_covers_them(docs):
    (config_map,) = [cm for cm in of_kind(docs, "ConfigMap") if cm["metadata"]["name"].endswith("-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["splitserve.json"])
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = set(re.findall(r"\bsplitserve_[a-z0-9_]+", " ".join(exprs)))
    series, families = _our_metric_names()
    assert used and used <= series, f"not splitserve's metrics: {sorted(used - series)}"
    unused = {f for f in families if not any(s.startswith(f) for s in used)}
    assert not unused, f"metrics without a panel (add one to files/grafana-dashboard.json): {sorted(unused)}"


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("case", VALUES_FILES)
def test_examples_equal_a_fresh_render(renderer, case):
    committed = (EXAMPLES / f"{case}.yaml").read_text()
    fresh = renderer.header(case) + renderer.render_file(CHART / "ci" / f"{case}-values.yaml")
    assert committed == fresh, f"deploy/examples/{case}.yaml is stale: run .venv/bin/python scripts/render_examples.py"


def test_examples_are_the_ci_values_files():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == VALUES_FILES
