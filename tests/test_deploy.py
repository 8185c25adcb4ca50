"""The deploy files, checked against the schemas an operator's tools apply.

Kubernetes objects against the Kubernetes JSON schemas (kubernetes-validate, strict: an
unknown field is an error), the RayCluster against the trimmed KubeRay CRD schema kept
in deploy/schemas, the compose file against the trimmed Compose specification schema.
Then every command is a real ``gauntlet`` subcommand (or ``ray start``), every image is
the project's or an allowed service image, every variable a real setting. Each schema
check also rejects a broken copy, so it can fail.
"""

from __future__ import annotations

import copy
import json

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from gauntlet.cluster.settings import ENVIRONMENT
from gauntlet.scheduler.cli import main as cli_main
from tests.deploy_helpers import (
    DEPLOY,
    K8S,
    OVERLAYS,
    SECRET,
    all_containers,
    build,
    container,
    containers,
    find,
    load_docs,
    pod_specs,
    secret_refs,
)

KUBERNETES = "1.30.0"  # native sidecars (initContainers with restartPolicy) are GA here
PROJECT_IMAGE = "gauntlet"
SERVICE_IMAGES = {"postgres:16", "redis:7"}
# Variables that are not gauntlet settings but belong to Ray or the service images, or
# carry a Secret into a URL built in the manifest.
FOREIGN_ENV = {
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "POSTGRES_USER",
    "POSTGRES_DB",
    "POSTGRES_PASSWORD",
    "PGDATA",
    "REDIS_PASSWORD",
    "REDISCLI_AUTH",
}
BUILDS = {"base": K8S / "base", **{name: K8S / "overlays" / name for name in OVERLAYS}}


def _schema(name: str) -> dict:
    return json.loads((DEPLOY / "schemas" / name).read_text())


def _validate_k8s(doc: dict) -> None:
    if doc["kind"] == "RayCluster":
        jsonschema.validate(doc, _schema("raycluster.schema.json"))
        spec = doc["spec"]
        templates = [spec["headGroupSpec"]["template"]]
        templates += [g["template"] for g in spec["workerGroupSpecs"]]
        for template in templates:  # the part the trimmed CRD schema leaves open
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "template": template}
            pod_template["metadata"] = {"name": doc["metadata"]["name"]}
            kubernetes_validate.validate(pod_template, KUBERNETES, strict=True)
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_every_kubernetes_object_validates(name):
    docs = build(BUILDS[name])
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == sorted(
        {
            "ConfigMap",
            "CronJob",
            "Deployment",
            "Job",
            "Namespace",
            "PersistentVolumeClaim",
            "RayCluster",
            "Service",
            "StatefulSet",
        }
    )
    for doc in docs:
        _validate_k8s(doc)


def test_the_validators_reject_broken_objects():
    docs = build(BUILDS["base"])
    broken = copy.deepcopy(find(docs, "Deployment", "gauntlet-scheduler"))
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_k8s(broken)
    cluster = find(docs, "RayCluster", "gauntlet")
    for mutate in (
        lambda c: c["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
        lambda c: c["spec"]["headGroupSpec"].update(rayStartParams={"num-cpus": 0}),
        lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
            imagePolicy="x"
        ),
    ):
        broken = copy.deepcopy(cluster)
        mutate(broken)
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            _validate_k8s(broken)


def test_overlays_size_the_cluster():
    sizes = {}
    for name in OVERLAYS:
        docs = build(BUILDS[name])
        group = find(docs, "RayCluster", "gauntlet")["spec"]["workerGroupSpecs"][0]
        sizes[name] = (group["minReplicas"], group["maxReplicas"])
        assert all(
            c["image"] == "registry.example.org/gauntlet:0.1.0"
            for c in all_containers(docs)
            if not c["image"].startswith(("postgres", "redis"))
        )
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
            "gauntlet"
        }
    assert sizes == {"small": (0, 2), "large": (2, 32)}


def test_the_roles_are_all_there():
    docs = build(BUILDS["base"])
    pods = pod_specs(docs)
    cluster = find(docs, "RayCluster", "gauntlet")["spec"]
    head = cluster["headGroupSpec"]
    # The dashboard (and its job API) is bound to the head pod's loopback, no Service.
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    services = [d for d in docs if d["kind"] == "Service"]
    assert all(p["port"] != 8265 for s in services for p in s["spec"]["ports"])
    (gpu,) = cluster["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cluster["enableInTreeAutoscaling"] is True

    scheduler = find(docs, "Deployment", "gauntlet-scheduler")
    assert scheduler["spec"]["replicas"] == 2
    for label in ("Deployment/gauntlet-scheduler", "Deployment/gauntlet-serve"):
        # The migration runs (or waits on its lock) before the main container starts.
        assert pods[label]["initContainers"][0]["args"] == ["db", "upgrade"]
    assert container(docs, "Job/gauntlet-migrate", "migrate")["args"] == ["db", "upgrade"]
    nightly = find(docs, "CronJob", "gauntlet-nightly")
    assert nightly["spec"]["concurrencyPolicy"] == "Forbid"
    assert container(docs, "CronJob/gauntlet-nightly", "nightly")["args"][0] == "nightly"
    serve = container(docs, "Deployment/gauntlet-serve", "serve")
    api = find(docs, "Service", "gauntlet-api")["spec"]["ports"][0]
    assert serve["ports"][0]["containerPort"] == 8000 and api["targetPort"] == "http"

    redis = container(docs, "StatefulSet/gauntlet-redis", "redis")
    assert redis["args"][:2] == ["--appendonly", "yes"] and "--requirepass" in redis["args"]
    for name, mount in (
        ("gauntlet-redis", "/data"),
        ("gauntlet-postgres", "/var/lib/postgresql/data"),
    ):
        state = find(docs, "StatefulSet", name)["spec"]
        claim = state["volumeClaimTemplates"][0]["metadata"]["name"]
        (pod,) = state["template"]["spec"]["containers"]
        assert {"name": claim, "mountPath": mount} in pod["volumeMounts"]

    # Metrics: the pods are annotated for the scrape, on the port the scheduler serves.
    annotations = scheduler["spec"]["template"]["metadata"]["annotations"]
    main = container(docs, "Deployment/gauntlet-scheduler", "scheduler")
    port = next(v["value"] for v in main["env"] if v["name"] == "GAUNTLET_METRICS_PORT")
    assert (
        annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == port
    )
    assert main["readinessProbe"]["httpGet"]["path"] == "/metrics"


def test_every_pod_has_secrets_probes_and_resources():
    docs = build(BUILDS["base"])
    for label, pod in pod_specs(docs).items():
        assert SECRET in secret_refs(pod), label
        for c in containers(pod):
            assert set(c["resources"]) == {"requests", "limits"}, (label, c["name"])
        if not label.startswith(("Job/", "CronJob/")):
            for c in pod["containers"]:
                assert "readinessProbe" in c and "livenessProbe" in c, (label, c["name"])
    # Every gauntlet and Ray container has the cluster token.
    for c in all_containers(docs):
        if not c["image"].startswith(("postgres", "redis")):
            assert any(v["name"] == "RAY_AUTH_TOKEN" for v in c["env"]), c["name"]
    autoscaler = find(docs, "RayCluster", "gauntlet")["spec"]["autoscalerOptions"]
    assert any(v["name"] == "RAY_AUTH_TOKEN" for v in autoscaler["env"])


def _subcommand(args: list[str]) -> click.Command:
    """The click command ``gauntlet ARGS`` runs; its options must exist too."""
    command, rest = cli_main, list(args)
    while isinstance(command, click.Group):
        assert rest, f"gauntlet {' '.join(args)}: a group, not a command"
        name = rest.pop(0)
        assert name in command.commands, f"gauntlet {' '.join(args)}: no command {name!r}"
        command = command.commands[name]
    options = {opt for p in command.params for opt in p.opts}
    for arg in rest:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"gauntlet {' '.join(args)}: no option {arg}"
    return command


def _check_env_names(names, where: str) -> None:
    unknown = set(names) - set(ENVIRONMENT) - FOREIGN_ENV
    assert not unknown, f"{where}: variables that are no setting: {sorted(unknown)}"


def test_kubernetes_commands_images_and_variables_exist():
    docs = build(BUILDS["base"])
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    _check_env_names(maps["gauntlet-env"], "ConfigMap gauntlet-env")
    commands = set()
    for label, pod in pod_specs(docs).items():
        for c in containers(pod):
            _check_env_names([v["name"] for v in c.get("env", [])], f"{label} {c['name']}")
            if c["image"] in SERVICE_IMAGES:
                continue
            assert c["image"].partition(":")[0] == PROJECT_IMAGE, c["image"]
            if "command" in c:  # the image's entrypoint (gauntlet) replaced: only ray start
                assert c["command"][:2] == ["ray", "start"], (label, c["command"])
            elif "args" in c:
                commands.add(_subcommand(c["args"]).name)
            else:
                assert label.startswith("RayCluster/"), label  # KubeRay writes ray start
    assert commands == {"upgrade", "scheduler", "serve", "nightly"}
    with pytest.raises(AssertionError, match="no command"):
        _subcommand(["schedular"])


def test_compose_validates_and_names_real_things():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    schema = _schema("compose-spec.schema.json")
    jsonschema.validate(compose, schema)
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["volume"] = broken["services"]["redis"].pop("volumes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)

    services = compose["services"]
    assert {"postgres", "redis", "ray-head", "ray-worker", "migrate", "serve", "nightly"} <= set(
        services
    )
    assert sum(s.get("command") == ["scheduler"] for s in services.values()) == 2
    commands = set()
    for name, service in services.items():
        _check_env_names(service.get("environment", {}), f"compose {name}")
        if service.get("image") in SERVICE_IMAGES:
            continue
        assert service["image"] == f"{PROJECT_IMAGE}:latest"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        if service.get("entrypoint") == ["ray"]:
            assert service["command"][0] == "start", name
        else:
            commands.add(_subcommand(service["command"]).name)
    assert commands == {"upgrade", "scheduler", "serve", "nightly"}
    # Passwords only from the env file; every piece of state on a named volume.
    text = (DEPLOY / "compose.yaml").read_text()
    assert "POSTGRES_HOST_AUTH_METHOD" not in text
    for var in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "RAY_AUTH_TOKEN"):
        assert f"${{{var}:?" in text
    mounts = {m.split(":")[0]: name for name, s in services.items() for m in s.get("volumes", [])}
    assert set(compose["volumes"]) == set(mounts)
    assert mounts["pgdata"] == "postgres" and mounts["redisdata"] == "redis"
    assert "--requirepass" in services["redis"]["command"]


def test_env_example_holds_placeholders_only():
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert set(values) == {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "RAY_AUTH_TOKEN"}
    assert all(v.startswith("replace-with-") for v in values.values())
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def test_compose_and_kubernetes_set_the_same_settings():
    docs = build(BUILDS["base"])
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    k8s = set(maps["gauntlet-env"]) | {
        v["name"] for v in container(docs, "Deployment/gauntlet-scheduler", "scheduler")["env"]
    }
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    local = set(compose["services"]["scheduler-1"]["environment"])
    settings = lambda names: {n for n in names if n.startswith("GAUNTLET_")}  # noqa: E731
    assert settings(k8s) == settings(local)


def test_dockerfile_ships_every_package_and_ray_start():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for package in ("cluster", "db", "scheduler", "workers"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert "ray[default]" in dockerfile  # the per-node dashboard server the probes use
    for path in [*DEPLOY.glob("*.yaml"), *K8S.rglob("*.yaml")]:
        assert load_docs(path), path
