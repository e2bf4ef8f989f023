"""Re-make the vendored schemas in this folder from their upstream files (README.md names them).

    python tests/schemas/vendor.py LWS_CRD.yaml KEDA_SCALEDOBJECT_CRD.yaml COMPOSE_SPEC.json

Descriptions are dropped (size); in the CRDs' openAPIV3Schema `status` is dropped (never
written by hand), and `metadata` and the embedded core types point at the Kubernetes schemas
that kubernetes-validate ships (`K8S_DEFS`), so those parts are checked as strictly as a
Deployment's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
# CRD file name -> (vendored file, {property path: the core type it embeds})
CRDS = {
    "leaderworkerset.x-k8s.io_leaderworkersets.yaml": ("leaderworkerset-v1.json", {
        "spec.leaderWorkerTemplate.leaderTemplate": "io.k8s.api.core.v1.PodTemplateSpec",
        "spec.leaderWorkerTemplate.workerTemplate": "io.k8s.api.core.v1.PodTemplateSpec",
        "spec.leaderWorkerTemplate.volumeClaimTemplates[]": "io.k8s.api.core.v1.PersistentVolumeClaim"}),
    "keda.sh_scaledobjects.yaml": ("scaledobject-v1alpha1.json", {
        "spec.advanced.horizontalPodAutoscalerConfig.behavior":
            "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"}),
}


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def point_at(schema: dict, path: str, definition: str) -> None:
    """Replace the sub-schema at `path` (dots; `[]` for an array's items) with a $ref."""
    *parents, last = path.split(".")
    node = schema
    for name in parents:
        node = node["properties"][name]
    if last.endswith("[]"):
        node["properties"][last[:-2]]["items"] = {"$ref": K8S_DEFS + definition}
    else:
        node["properties"][last] = {"$ref": K8S_DEFS + definition}


def vendor_crd(path: Path) -> None:
    out, embedded = CRDS[path.name]
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    point_at(schema, "metadata", "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    for sub, definition in embedded.items():
        point_at(schema, sub, definition)
    (HERE / out).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


def main(argv: list[str]) -> None:
    for arg in argv:
        path = Path(arg)
        if path.name == "compose-spec.json":
            (HERE / path.name).write_text(json.dumps(strip_descriptions(json.loads(path.read_text())), indent=1) + "\n")
        else:
            vendor_crd(path)


if __name__ == "__main__":
    main(sys.argv[1:])
