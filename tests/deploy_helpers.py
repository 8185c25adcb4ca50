"""Reading the deploy files as an operator's tools would: kustomize builds, pod specs, env.

``build`` implements the part of kustomize the overlays use (resources, namespace,
images, JSON 6902 patches) and refuses any other key, so an overlay that grows a feature
this reader does not know fails loudly instead of being checked half-way. ``container_env``
resolves a container's environment the way the kubelet does: ``envFrom`` ConfigMaps
first, then ``env`` in order, ``$(VAR)`` expanded from what was defined before it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("small", "large")
SECRET = "gauntlet-secrets"
# Resources that live outside any namespace.
CLUSTER_SCOPED = {"Namespace"}
_KNOWN = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def build(folder: Path) -> list[dict]:
    """The documents ``kubectl apply -k folder`` would send."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - _KNOWN
    assert not unknown, f"{folder}: kustomization keys this reader does not apply: {unknown}"
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        target = (folder / entry).resolve()
        docs += build(target) if target.is_dir() else load_docs(target)
    for patch in spec.get("patches", []):
        matched = [d for d in docs if _matches(d, patch["target"])]
        assert matched, f"{folder}: patch target {patch['target']} matches nothing"
        for doc in matched:
            for op in yaml.safe_load(patch["patch"]):
                _apply(doc, op)
    for image in spec.get("images", []):
        for container in all_containers(docs):
            name, _, _tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
    return docs


def _matches(doc: dict, target: dict) -> bool:
    return doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]


def _apply(doc: dict, op: dict) -> None:
    """One JSON 6902 operation (replace, add, remove) at a JSON pointer."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key = int(last) if isinstance(node, list) else last
    if op["op"] == "replace":
        assert key in node if isinstance(node, dict) else key < len(node), op["path"]
        node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else key, copy.deepcopy(op["value"]))
        else:
            node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del node[key]
    else:
        raise AssertionError(f"unsupported patch op {op['op']}")


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod template's spec, by a label: ``Deployment/gauntlet-scheduler``, ..."""
    found = {}
    for doc in docs:
        kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "Job"):
            found[f"{kind}/{name}"] = spec["template"]["spec"]
        elif kind == "CronJob":
            found[f"{kind}/{name}"] = spec["jobTemplate"]["spec"]["template"]["spec"]
        elif kind == "RayCluster":
            found[f"{kind}/{name}/head"] = spec["headGroupSpec"]["template"]["spec"]
            for group in spec["workerGroupSpecs"]:
                found[f"{kind}/{name}/{group['groupName']}"] = group["template"]["spec"]
    return found


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def all_containers(docs: list[dict]) -> list[dict]:
    return [c for pod in pod_specs(docs).values() for c in containers(pod)]


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(docs: list[dict], label: str, name: str) -> dict:
    (found,) = [c for c in containers(pod_specs(docs)[label]) if c["name"] == name]
    return found


def configmaps(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_env(container: dict, maps: dict[str, dict], secrets: dict[str, dict]) -> dict:
    """The container's environment, with Secret values taken from ``secrets``."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            # An undefined $(VAR) stays as written, as the kubelet leaves it.
            env[var["name"]] = _REF.sub(lambda m: env.get(m[1], m[0]), var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def secret_refs(pod: dict) -> set[str]:
    """Names of the Secrets a pod's containers read."""
    names = set()
    for c in containers(pod):
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    return names


def ray_start_args(params: dict) -> list[str]:
    """rayStartParams as KubeRay passes them to ``ray start``: ``--key=value``."""
    return [f"--{key}={value}" for key, value in params.items()]


def expand(text: str, env: dict) -> str:
    """``$(VAR)`` in a command or argument, as the kubelet expands it from the env."""
    return _REF.sub(lambda m: env.get(m[1], m[0]), text)
