"""What the deploy tests read from rendered manifests: documents by kind, the RayCluster's groups
and pod templates, the pods KubeRay will make of them (with the labels it adds), which pods a
selector picks, and the `splitserve serve` command lines as a container will run them."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "splitserve"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
ENTRYPOINT_SCRIPT = ROOT / "deploy" / "docker" / "entrypoint.sh"
EXAMPLES = ROOT / "deploy" / "examples"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# A stand-in for values Kubernetes reads from Secrets ($(SPLITSERVE_REDIS_URL) from an external one).
SECRET_REDIS_URL = "redis://redis.example.internal:6379/0"


# The chart's defaults, and each ci/<case>-values.yaml.
CASES = ["defaults", *sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))]


def case_values(case: str) -> dict[str, Any]:
    if case == "defaults":
        return {}
    return yaml.safe_load((CHART / "ci" / f"{case}-values.yaml").read_text()) or {}


def load_renderer() -> ModuleType:
    """scripts/render_examples.py as a module (it renders through helm-python-sdk)."""
    return load_script("render_examples")


def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def pinned(package: str) -> str:
    """The version pyproject.toml pins ``package`` to (`name==X`)."""
    for requirement in pyproject()["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        if name.strip() == package:
            return version.strip()
    raise AssertionError(f"pyproject.toml pins no {package}")


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=yaml.CSafeLoader) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def ray_cluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cluster,) = of_kind(docs, "RayCluster")
    return cluster


def groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The head group ("head") and each worker group by name."""
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}}


@dataclass
class Pod:
    """One pod a manifest makes (one per group or Deployment, whatever the replicas)."""

    group: str
    labels: dict[str, str]
    spec: dict[str, Any]
    replicas: int = 1
    ray_start_params: dict[str, str] = field(default_factory=dict)

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    def port(self, name_or_number: str | int) -> int:
        """A container port by name (or a number, as is)."""
        if isinstance(name_or_number, int):
            return name_or_number
        for port in self.container.get("ports", []):
            if port.get("name") == name_or_number:
                return int(port["containerPort"])
        raise KeyError(f"{self.group}: no container port named {name_or_number!r}")


def pods(docs: list[dict[str, Any]]) -> list[Pod]:
    """The RayCluster's pods with the labels KubeRay adds, and the Deployments' pods."""
    out = []
    cluster = ray_cluster(docs)
    name = cluster["metadata"]["name"]
    for group, spec in groups(cluster).items():
        node_type = "head" if group == "head" else "worker"
        labels = {**spec["template"]["metadata"].get("labels", {}), "ray.io/cluster": name,
                  "ray.io/node-type": node_type, "ray.io/group": "headgroup" if group == "head" else group}
        out.append(Pod(group, labels, spec["template"]["spec"], spec.get("replicas", 1),
                       dict(spec.get("rayStartParams", {}))))
    for deployment in of_kind(docs, "Deployment"):
        template = deployment["spec"]["template"]
        out.append(Pod(deployment["metadata"]["name"], template["metadata"]["labels"], template["spec"],
                       deployment["spec"].get("replicas", 1)))
    return out


def selected(selector: dict[str, str], all_pods: list[Pod]) -> list[Pod]:
    return [pod for pod in all_pods if all(pod.labels.get(k) == v for k, v in selector.items())]


def serve_args(pod: Pod) -> list[str] | None:
    """The arguments of `splitserve serve` in a pod's container (None if it runs no serve), with
    $(VAR) expanded as the kubelet does from the container's env; a variable the env does not
    define stays literal in Kubernetes, so it fails here."""
    args = pod.container.get("args", [])
    if not args or args[0] != "serve":
        return None
    env = {}
    for var in pod.container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else SECRET_REDIS_URL
    expanded = []
    for arg in args[1:]:
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            assert ref in env, f"{pod.group}: $({ref}) in serve's arguments, but the container's env has no {ref}"
            arg = arg.replace(f"$({ref})", env[ref])
        expanded.append(arg)
    return expanded


def frontends(all_pods: list[Pod]) -> list[Pod]:
    return [pod for pod in all_pods if pod.labels.get("splitserve.io/frontend") == "true"]
