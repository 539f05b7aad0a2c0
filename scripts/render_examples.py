"""Renders the Helm chart deploy/helm/splitserve for each of its ci/ values files into
deploy/examples/<name>.yaml: the manifests `helm template splitserve deploy/helm/splitserve -f
ci/<name>-values.yaml` prints, for users of plain kubectl. tests/deploy check the files equal a
fresh render, so run this after changing the chart:

    .venv/bin/python scripts/render_examples.py

Rendering uses helm-python-sdk (Helm's Go SDK behind ctypes; no helm binary, no cluster).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "splitserve"
EXAMPLES = ROOT / "deploy" / "examples"
RELEASE = "splitserve"
_SEPARATOR = re.compile(r"^---[ \t]*$", re.MULTILINE)


def values_files() -> dict[str, Path]:
    """The chart's ci/ values files by example name (ci/gpu-values.yaml -> gpu)."""
    return {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}


def render(values: dict[str, Any], name: str = RELEASE, namespace: str = "default") -> str:
    """The chart's manifests for ``values`` as one YAML stream, template by template in path
    order, each document under a `# Source:` line as `helm template` writes them. Raises
    helm_python's HelmValuesError (values.schema.json) or HelmRenderError (a template's fail)."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
    out = []
    for path in sorted(manifests):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for document in _SEPARATOR.split(manifests[path]):
            if _has_content(document):
                out.append(f"---\n# Source: {path}\n{document.strip()}\n")
    return "".join(out)


def render_file(values_file: Path) -> str:
    return render(yaml.safe_load(values_file.read_text()) or {})


def header(name: str) -> str:
    return (f"# Rendered from deploy/helm/splitserve with ci/{name}-values.yaml (release {RELEASE!r}) by\n"
            "# scripts/render_examples.py; do not edit: change the chart or the values file and render again.\n"
            "# Apply with: kubectl apply -n NAMESPACE -f this file (needs KubeRay >= 1.5.1"
            "; ServiceMonitor/PodMonitor need the Prometheus Operator).\n")


def main() -> int:
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    for name, path in values_files().items():
        target = EXAMPLES / f"{name}.yaml"
        target.write_text(header(name) + render_file(path))
        print(f"wrote {target.relative_to(ROOT)}")
    return 0


def _has_content(document: str) -> bool:
    """Whether a document holds more than blank lines and comments (Helm drops the others)."""
    return any(line.strip() and not line.lstrip().startswith("#") for line in document.splitlines())


if __name__ == "__main__":
    sys.exit(main())
