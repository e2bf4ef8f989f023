"""Deployment files (docs/deployment.md): every Kubernetes manifest and the compose file
validate against their schemas (kubernetes-validate's strict Kubernetes schemas; the vendored
LeaderWorkerSet, KEDA ScaledObject and compose-spec schemas in tests/schemas), a broken one
does not, and what they run is what the server accepts: each image's entrypoint with the
manifests' args and the documented `docker run` lines parses with the server's own parser, the
probes hit a GET route of the app on the served port, the autoscaler's query selects a metric
the server exports, and the caches lie on volumes."""
from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import tomllib
import types
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource

from jaxpaged.engine.messages import SchedulerStats
from jaxpaged.serve.api_server import CUT_AFTER_S
from jaxpaged.serve.app import build_app
from jaxpaged.serve.cli import console_main, make_parser
from jaxpaged.serve.metrics import Metrics

ROOT = Path(__file__).parent.parent
K8S = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.33"
CRDS = {("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-v1.json",
        ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-v1alpha1.json"}
LWS_ENV = {"LWS_LEADER_ADDRESS": "jaxpaged-multihost-0.jaxpaged-multihost.default"}  # + size and index


def manifests() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str | None = None) -> dict:
    """The first manifest of `kind` (named `name`)."""
    return next(d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"]))


def strict(schema):
    """kubectl's strict field validation on a CRD schema: unknown fields are errors."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k not in ("enum", "default", "required") else v for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validate(doc: dict) -> None:
    """Raise jsonschema.ValidationError unless `doc` is a valid object of its kind."""
    crd = CRDS.get((doc["apiVersion"], doc["kind"]))
    if crd is None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    defs = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
            / f"v{K8S_VERSION}.0-local-strict" / "_definitions.json")
    registry = Resource.from_contents(json.loads(defs.read_text())) @ Registry()
    schema = strict(json.loads((SCHEMAS / crd).read_text()))
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def validate_compose(doc: dict) -> None:
    jsonschema.Draft7Validator(json.loads((SCHEMAS / "compose-spec.json").read_text())).validate(doc)


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates(doc):
    validate(doc)


def test_compose_validates():
    validate_compose(compose())


def rename(key: str, new: str):
    def change(node: dict) -> None:
        node[new] = node.pop(key)
    return change


def put(key: str, value):
    return lambda node: node.__setitem__(key, value)


BREAKS = [  # (kind, path to the node, change): each must make the object invalid
    ("Deployment", "spec.template.spec.containers.0", rename("readinessProbe", "readinesProbe")),
    ("Deployment", "spec", put("replicas", "one")),
    ("Deployment", "spec.template.spec.containers.0.resources.limits", put("nvidia.com/gpu", ["1"])),
    ("Service", "spec.ports.0", put("port", "8000")),
    ("PersistentVolumeClaim", "spec", rename("accessModes", "accessMode")),
    ("LeaderWorkerSet", "spec.leaderWorkerTemplate", put("size", "2")),
    ("LeaderWorkerSet", "spec.leaderWorkerTemplate", rename("restartPolicy", "restartPolicyy")),
    ("LeaderWorkerSet", "spec.leaderWorkerTemplate.workerTemplate.spec.containers.0", rename("resources", "resource")),
    ("ScaledObject", "spec.triggers.0.metadata", put("threshold", 5)),
    ("ScaledObject", "spec", rename("minReplicaCount", "minReplicas")),
    ("ScaledObject", "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown",
     put("stabilizationWindowSeconds", "600")),
    ("compose", "services.jaxpaged", rename("healthcheck", "healtcheck")),
    ("compose", "services.jaxpaged.healthcheck", put("test", {"CMD": "true"})),
]


@pytest.mark.parametrize("kind, path, change", BREAKS, ids=[f"{k}:{p}" for k, p, _ in BREAKS])
def test_broken_manifest_fails(kind, path, change):
    doc = copy.deepcopy(compose() if kind == "compose" else find(kind))
    node = doc
    for key in path.split("."):
        node = node[int(key)] if key.isdigit() else node[key]
    change(node)
    with pytest.raises(jsonschema.ValidationError):
        (validate_compose if kind == "compose" else validate)(doc)


# ---- what the files run is what the server accepts ----------------------------------------
def dockerfile(name: str) -> dict[str, list[str]]:
    """Instruction -> its arguments' lines (continuations joined), of a Dockerfile."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            out.setdefault(instruction.upper(), []).append(rest.strip())
    return out


def images() -> dict[str, str]:
    """Image tag -> its Dockerfile, as compose.yaml builds them."""
    return {s["image"]: s["build"]["dockerfile"] for s in compose()["services"].values()}


def image_argv(image: str, args: list[str] | None) -> list[str]:
    """What a container of `image` runs: ENTRYPOINT + (args, else CMD)."""
    d = dockerfile(images()[image])
    (entrypoint,) = d["ENTRYPOINT"]
    cmd = json.loads(d["CMD"][0]) if "CMD" in d else []
    return json.loads(entrypoint) + (cmd if args is None else args)


def server_args(argv: list[str], env: dict[str, str] | None = None):
    """argv (`jaxpaged serve ...`, after Kubernetes' $(VAR) expansion) parsed by the server's parser."""
    assert argv[:2] == ["jaxpaged", "serve"], argv
    argv = [re.sub(r"\$\((\w+)\)", lambda m: (env or {})[m[1]], a) for a in argv[2:]]
    return make_parser("jaxpaged serve").parse_args(argv)  # SystemExit(2) on a flag it does not accept


@pytest.mark.parametrize("image", sorted(images()))
def test_image_entrypoint_is_the_documented_server_command(image, capsys):
    d, pyproject = dockerfile(images()[image]), tomllib.loads((ROOT / "pyproject.toml").read_text())
    argv = image_argv(image, None)
    assert pyproject["project"]["scripts"][argv[0]] == "jaxpaged.serve.cli:console_main"
    with pytest.raises(SystemExit) as exit_:  # the image's own command line reaches the server's parser
        console_main(argv[1:] + ["--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: jaxpaged serve [-h] [--model MODEL]")
    assert re.search(r"^jaxpaged serve \S", (ROOT / "docs" / "server.md").read_text(), re.M)  # documented
    extras = re.findall(r'pip install .*"\.\[(\w+)\]"', " ".join(d["RUN"]))
    assert set(extras) <= set(pyproject["project"]["optional-dependencies"])
    ignored = (ROOT / ".dockerignore").read_text().split()
    for copy_ in d["COPY"]:
        for src in copy_.split()[:-1]:
            assert (ROOT / src).exists() and f"!{src}" in ignored, src
    deployment_md = (ROOT / "docs" / "deployment.md").read_text()
    documented = re.findall(rf"^docker run .*{re.escape(image)}( .*)?$", deployment_md, re.M)
    assert documented, f"docs/deployment.md shows no `docker run ... {image}`"
    for rest in documented:
        server_args(image_argv(image, shlex.split(rest) or None))


def pod_templates() -> list[tuple[dict, dict, dict[str, str]]]:
    """(pod template, the object it is in, the env the controller adds) of every workload."""
    out = [(find("Deployment")["spec"]["template"], find("Deployment"), {})]
    lws = find("LeaderWorkerSet")
    t = lws["spec"]["leaderWorkerTemplate"]
    group = {**LWS_ENV, "LWS_GROUP_SIZE": str(t["size"])}
    labels = {"leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"]}
    for index, template in ((0, t["leaderTemplate"]), (t["size"] - 1, t["workerTemplate"])):
        template = copy.deepcopy(template)
        template.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
        out.append((template, lws, {**group, "LWS_WORKER_INDEX": str(index)}))
    return out


def served_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port]
    return number


@pytest.mark.parametrize("template, owner, env", pod_templates(),
                         ids=lambda v: v["metadata"]["name"] if "kind" in v else None)
def test_pods_run_what_the_server_accepts(template, owner, env):
    spec = template["spec"]
    app = build_app(types.SimpleNamespace(stats=None), ["m"], "m")
    routes = {r.path for r in app.routes if "GET" in r.methods}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        args = server_args(image_argv(c["image"], c.get("args")), env)
        probes = [c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in c]
        assert len(probes) == (3 if args.process_id == 0 else 0)  # only process 0 serves HTTP
        for probe in probes:
            assert probe["httpGet"]["path"] in routes and served_port(c, probe["httpGet"]["port"]) == args.port
        assert spec["terminationGracePeriodSeconds"] > args.shutdown_timeout + CUT_AFTER_S
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        if owner["kind"] == "LeaderWorkerSet":  # one process per pod, the mesh over all their GPUs
            size = owner["spec"]["leaderWorkerTemplate"]["size"]
            assert args.num_processes == size and args.tensor_parallel_size == size * gpus
            assert args.coordinator_address.startswith(LWS_ENV["LWS_LEADER_ADDRESS"] + ":")
        else:
            assert args.tensor_parallel_size <= gpus
        image_env = dict(kv.split("=", 1) for line in dockerfile(images()[c["image"]])["ENV"]
                         for kv in line.split() if not kv.startswith("PATH="))
        for name in ("HF_HOME", "JAXPAGED_CACHE"):  # model downloads, compiled programs: on a claim
            (mount,) = [m for m in c["volumeMounts"] if image_env[name].startswith(m["mountPath"].rstrip("/") + "/")]
            claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
            assert find("PersistentVolumeClaim", claim)


def test_services_reach_a_served_port():
    for service in [d for d in manifests() if d["kind"] == "Service"]:
        selector = service["spec"]["selector"].items()
        ((pod, env),) = [(t, env) for t, _, env in pod_templates() if selector <= t["metadata"]["labels"].items()]
        (c,) = pod["spec"]["containers"]
        port = server_args(image_argv(c["image"], c["args"]), env).port
        assert served_port(c, service["spec"]["ports"][0]["targetPort"]) == port


def test_autoscaler_query_selects_the_servers_waiting_requests():
    scaled = find("ScaledObject")
    target = find(scaled["spec"]["scaleTargetRef"].get("kind", "Deployment"), scaled["spec"]["scaleTargetRef"]["name"])
    (c,) = target["spec"]["template"]["spec"]["containers"]
    args = server_args(image_argv(c["image"], c["args"]))
    served = (args.served_model_name or [args.model_tag or args.model])[0]
    (trigger,) = scaled["spec"]["triggers"]
    name, matchers = re.fullmatch(r"sum\(([\w:]+)\{(.*)\}\)", trigger["metadata"]["query"]).groups()
    labels = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
    text = Metrics(served, lambda: SchedulerStats(num_waiting=7)).render().decode()
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == name and labels.items() <= s.labels.items()]
    assert found == [7] and name == "vllm:num_requests_waiting"
    assert float(trigger["metadata"]["threshold"]) > 0


@pytest.mark.parametrize("name", sorted(compose()["services"]))
def test_compose_services_health_check_the_served_port(name):
    service = compose()["services"][name]
    args = server_args(image_argv(service["image"], service.get("command")))
    assert (args.model or args.model_tag) is None if name == "jaxpaged" else args.model_tag  # demo model on CPU
    assert service["ports"] == [f"{args.port}:{args.port}"]
    assert f"localhost:{args.port}/health" in " ".join(service["healthcheck"]["test"])
    assert int(service["stop_grace_period"].removesuffix("s")) > args.shutdown_timeout + CUT_AFTER_S
    assert any(v.endswith(":/cache") for v in service["volumes"])  # HF_HOME and JAXPAGED_CACHE of the images
