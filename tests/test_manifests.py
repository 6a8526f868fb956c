"""Offline validation of the deployment files: manifests/ (KubeRay) and cluster/ (Ray launcher).

What is checked, for the kustomize base and for each rendered overlay:

* RayJob and RayCluster objects against the real KubeRay CRD schemas (the ``openAPIV3Schema``
  of the served version named by each object's apiVersion), read from
  ``<shared>/kuberay-crds/``. Every object schema that has ``properties`` and no
  ``x-kubernetes-preserve-unknown-fields`` is made strict (``additionalProperties: false``),
  so a misspelt field fails instead of being silently dropped as the API server would prune
  it. ``x-kubernetes-list-type: map|set`` uniqueness is checked too. Not checked: CEL rules
  (``x-kubernetes-validations``) and ``format`` (int32 ranges), which need an API server.
* Core objects (PVC, ServiceAccount), the pod templates inside the Ray objects (Secret
  references included) and the Ray objects' metadata with ``kubernetes-validate`` in strict
  mode, for Kubernetes ``K8S_VERSION``.
* The deployment contract: every RayJob shuts its cluster down with a TTL, every pod runs as
  uid 1000 non-root without privilege escalation, GPU groups carry ``nvidia.com/gpu`` limits
  and the matching toleration, credentials only come from Secrets, entry points are
  ``python jobs/<stage>.py --config configs/<name>.yaml ...`` and agree with the resources.
* Isolation: every container has a read-only root filesystem and an emptyDir at /tmp; every
  pod carries the oodscale label, and a NetworkPolicy admits ingress only from such pods (and
  KubeRay's operator on the dashboard port); RayJob pods run under ``oodscale-job``, which
  mounts no token and has no Role bound. One RayJob per stage of ``oodscale.cli.PIPELINE``.
* Deliberately broken copies (``shutdownAfterJobFinish``, ``rayStartParam``, ...) must fail.

Overlays are rendered by ``render()`` of tests/kustomize.py, a deliberately small kustomize
subset (its docstring says what it supports); where ``kustomize`` or ``kubectl`` is on PATH,
``test_renderer_matches_kustomize`` compares the two renderings.

The CRD-based tests skip, saying why, when the shared data folder is missing: it is
``$OODSCALE_SHARED`` if set, else ``<repo>/../shared``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from oodscale.cli import PIPELINE
from tests.kustomize import (
    LOADER,
    MANIFESTS,
    PROFILES,
    KustomizeError,
    apply_json6902,
    load_docs,
    merge_patch,
    render,
    rendered,
)
from tests.support import REPO

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CLUSTER = REPO / "cluster"
SECRET_EXAMPLE = MANIFESTS / "base" / "secret.example.yaml"

# A Kubernetes release whose schemas kubernetes-validate ships (it has 1.25 to 1.37).
K8S_VERSION = "1.32.0"

# RayJob stage (the suffix of its name, oodscale-<stage>) -> entry point script under jobs/:
# one per stage of the CLI's pipeline, so a stage added there without a RayJob fails the tests.
STAGES = {name: f"{name.replace('-', '_')}.py" for name, _ in PIPELINE}
GPU_STAGES = ("train-diffusion", "generate", "train", "calibrate", "evaluate")
CONFIGS = {"digits", "cifar10", "imagenet"}
RAY_KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
GPU = "nvidia.com/gpu"
SERVICE_ACCOUNT = "oodscale"
# Every RayJob pod (the job driver runs in the head) runs under this account: no token, no Role.
JOB_ACCOUNT = "oodscale-job"
# The label of every oodscale pod; the NetworkPolicy admits ingress only from pods carrying it.
POD_LABEL = ("app.kubernetes.io/part-of", "oodscale")
OWN_PODS = {"matchLabels": dict([POD_LABEL])}
# KubeRay's operator reads job status from the head's dashboard: the one other source admitted.
OPERATOR = {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
DASHBOARD_PORT = [{"protocol": "TCP", "port": 8265}]
RAY_UID = 1000


def _key(obj: dict) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


# --------------------------------------------------------------------------------------------
# KubeRay CRD schemas
# --------------------------------------------------------------------------------------------


def shared_dir() -> tuple[Path | None, str]:
    """(folder holding kuberay-crds/, or None) and, if None, why."""
    env = os.environ.get("OODSCALE_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared")
    for candidate in candidates:
        if all((candidate / "kuberay-crds" / name).is_file() for name in RAY_KINDS.values()):
            return candidate, ""
    looked = ", ".join(str(c / "kuberay-crds") for c in candidates)
    return None, (
        f"KubeRay CRD schemas not found (looked in {looked}); set OODSCALE_SHARED to the "
        "folder holding kuberay-crds/ to run the CRD validation"
    )


def make_strict(schema: Any) -> None:
    """additionalProperties: false on every object schema with properties, in place.

    Walks the schema structure (properties, items, additionalProperties, *Of), never the field
    names, so a field that happens to be called "properties" is not mistaken for a keyword.
    OpenAPI's ``nullable: true`` becomes an explicit null type for jsonschema.
    """
    if not isinstance(schema, dict):
        return
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    for sub in (schema.get("properties") or {}).values():
        make_strict(sub)
    for key in ("items", "additionalProperties", "not"):
        make_strict(schema.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            make_strict(sub)


@cache
def crd_validators(shared: Path) -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> (strict jsonschema validator, strict schema), served versions."""
    validators = {}
    for kind, filename in RAY_KINDS.items():
        crd = yaml.load((shared / "kuberay-crds" / filename).read_text(), Loader=LOADER)
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["spec"]["names"]["kind"] == kind
        group = crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            make_strict(schema)
            # OpenAPI v3 schemas are JSON Schema draft 4 plus extensions.
            validator = jsonschema.Draft4Validator(schema)
            validators[(f"{group}/{version['name']}", kind)] = (validator, schema)
    return validators


def list_type_errors(schema: Any, data: Any, where: str = "") -> list[str]:
    """Duplicates in lists marked x-kubernetes-list-type map (by their keys) or set."""
    errors: list[str] = []
    if not isinstance(schema, dict):
        return errors
    if isinstance(data, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, value in data.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            errors += list_type_errors(sub, value, f"{where}.{key}")
    elif isinstance(data, list):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = Counter(
                tuple(item.get(k) for k in keys) for item in data if isinstance(item, dict)
            )
            errors += [f"{where}: duplicate {keys}={k}" for k, n in seen.items() if n > 1]
        elif list_type == "set":
            seen = Counter(json.dumps(item, sort_keys=True) for item in data)
            errors += [f"{where}: duplicate set item {k}" for k, n in seen.items() if n > 1]
        for i, item in enumerate(data):
            errors += list_type_errors(schema.get("items"), item, f"{where}[{i}]")
    return errors


def crd_errors(obj: dict, shared: Path) -> list[str]:
    """Schema violations of a RayJob / RayCluster against the strict CRD schema."""
    validators = crd_validators(shared)
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in validators:
        served = sorted(f"{k} {v}" for v, k in validators)
        return [f"{key} is not a served version of the CRDs ({served})"]
    validator, schema = validators[key]
    errors = [
        f"{'/'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"
        for err in validator.iter_errors(obj)
    ]
    return errors + list_type_errors(schema, obj)


@pytest.fixture(scope="session")
def shared() -> Path:
    folder, why = shared_dir()
    if folder is None:
        pytest.skip(why)
    return folder


# --------------------------------------------------------------------------------------------
# Core objects through kubernetes-validate
# --------------------------------------------------------------------------------------------


def k8s_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = "/".join(map(str, err.path)) or "<root>"
        return [f"{obj.get('kind')} {where}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [err.message]
    return []


def pod_templates(obj: dict) -> Iterator[tuple[str, dict, dict | None]]:
    """(role, pod template, worker/head group or None) for every pod a Ray object makes."""
    if obj["kind"] == "RayJob":
        cluster = obj["spec"].get("rayClusterSpec") or {}
    elif obj["kind"] == "RayCluster":
        cluster = obj["spec"]
    else:
        return
    head = cluster.get("headGroupSpec") or {}
    yield "head", head.get("template") or {}, head
    for group in cluster.get("workerGroupSpecs") or []:
        yield f"worker:{group.get('groupName')}", group.get("template") or {}, group
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield "submitter", obj["spec"]["submitterPodTemplate"], None


def core_errors(obj: dict) -> list[str]:
    """kubernetes-validate on a core object, or on the core parts of a Ray object."""
    if obj["kind"] not in RAY_KINDS:
        return k8s_errors(obj)
    name = obj["metadata"]["name"]
    # The Ray object's metadata is an ObjectMeta: check it inside a ConfigMap shell.
    errors = k8s_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})
    for role, template, _ in pod_templates(obj):
        shell = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{name}-{role.replace(':', '-')}"},
            "template": template,
        }
        errors += [f"{name} {role}: {e}" for e in k8s_errors(shell)]
    return errors


# --------------------------------------------------------------------------------------------
# The deployment contract
# --------------------------------------------------------------------------------------------

_CREDENTIAL_NAME = re.compile(
    r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|AUTH)", re.I
)
_CREDENTIAL_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r'"private_key"\s*:'),  # GCP service-account JSON
    re.compile(r"aws_secret_access_key\s*=", re.I),
]
_ENTRYPOINT = re.compile(
    r"python jobs/(?P<script>\w+\.py) --config configs/(?P<config>[\w-]+)\.yaml"
    r"(?P<overrides>( [\w.]+=\S+)*)"
)


def containers(template: dict) -> list[dict]:
    spec = template.get("spec") or {}
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def quantity(value: Any) -> float:
    """Kubernetes quantity -> float (cores or bytes)."""
    text = str(value)
    units = {
        "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    }  # fmt: skip
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    if not match or (match.group(2) and match.group(2) not in units):
        raise ValueError(f"bad quantity {value!r}")
    return float(match.group(1)) * units.get(match.group(2), 1)


def gpus(group: dict) -> int:
    resources = (containers(group.get("template") or {}) or [{}])[0].get("resources") or {}
    return int((resources.get("limits") or {}).get(GPU, 0))


def is_gpu_group(group: dict) -> bool:
    """A worker group that asks for GPUs by any means (or says it is one by its name)."""
    for container in containers(group.get("template") or {}):
        resources = container.get("resources") or {}
        if GPU in (resources.get("limits") or {}) or GPU in (resources.get("requests") or {}):
            return True
    if "gpu" in str(group.get("groupName", "")).lower():
        return True
    return (group.get("rayStartParams") or {}).get("num-gpus", "0") != "0"


def overrides(entrypoint: str) -> dict[str, str]:
    match = _ENTRYPOINT.fullmatch(" ".join(entrypoint.split()))
    assert match, f"{entrypoint!r} is not `python jobs/X.py --config configs/Y.yaml k=v ...`"
    return dict(item.split("=", 1) for item in match.group("overrides").split())


def contract_problems(objects: list[dict]) -> list[str]:
    """Every violation of the deployment contract in one rendered profile."""
    problems: list[str] = []
    pvcs = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}

    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Secret":
            problems.append(f"{name}: Secrets must not be part of the kustomization")
        if obj["kind"] == "RayJob":
            spec = obj["spec"]
            if spec.get("shutdownAfterJobFinishes") is not True:
                problems.append(f"{name}: shutdownAfterJobFinishes must be true")
            ttl = spec.get("ttlSecondsAfterFinished")
            if not isinstance(ttl, int) or ttl <= 0:
                problems.append(f"{name}: needs ttlSecondsAfterFinished > 0, got {ttl!r}")
            if "submitterPodTemplate" not in spec:
                problems.append(f"{name}: no submitterPodTemplate, the default one is not hardened")
        if obj["kind"] == "RayCluster" and obj["spec"].get("enableInTreeAutoscaling"):
            sc = (obj["spec"].get("autoscalerOptions") or {}).get("securityContext") or {}
            if (
                sc.get("allowPrivilegeEscalation") is not False
                or sc.get("runAsNonRoot") is not True
            ):
                problems.append(f"{name}: autoscaler sidecar needs a non-root securityContext")

        for role, template, group in pod_templates(obj):
            where = f"{name} {role}"
            spec = template.get("spec") or {}
            psc = spec.get("securityContext") or {}
            if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != RAY_UID:
                problems.append(f"{where}: pod needs runAsNonRoot: true, runAsUser: {RAY_UID}")
            if spec.get("serviceAccountName") not in accounts:
                problems.append(f"{where}: serviceAccountName not one of {sorted(accounts)}")
            if ((template.get("metadata") or {}).get("labels") or {}).get(POD_LABEL[0]) != \
                    POD_LABEL[1]:
                problems.append(f"{where}: pod template lacks the label {'='.join(POD_LABEL)} "
                                f"(the NetworkPolicy admits the cluster's own pods by it)")
            if obj["kind"] == "RayJob" and role == "head":
                env = {e["name"]: e.get("value") for c in containers(template)
                       for e in c.get("env") or []}
                owner = f"rayjob/$(POD_NAMESPACE)/{obj['metadata']['name']}"
                if env.get("OODSCALE_LOCK_OWNER") != owner:
                    problems.append(f"{where}: OODSCALE_LOCK_OWNER must name the RayJob, so a "
                                    f"retry takes over its crashed attempt's lock")
            if obj["kind"] == "RayJob" and (spec.get("serviceAccountName") != JOB_ACCOUNT
                                            or spec.get("automountServiceAccountToken")):
                problems.append(f"{where}: RayJob pods run under {JOB_ACCOUNT} without a token")
            scratch = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
            for container in containers(template):
                cwhere = f"{where} container {container.get('name')}"
                csc = container.get("securityContext") or {}
                if csc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{cwhere}: allowPrivilegeEscalation must be false")
                if csc.get("privileged") or csc.get("runAsNonRoot") is False:
                    problems.append(f"{cwhere}: privileged / root")
                if csc.get("runAsUser", RAY_UID) != RAY_UID:
                    problems.append(f"{cwhere}: runAsUser must be {RAY_UID}")
                if csc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{cwhere}: readOnlyRootFilesystem must be true")
                if not any(m.get("mountPath") == "/tmp" and m.get("name") in scratch
                           for m in container.get("volumeMounts") or []):
                    problems.append(f"{cwhere}: no emptyDir at /tmp (Ray's session dirs) on a "
                                    f"read-only root")
                for env in container.get("env") or []:
                    if "value" in env and _CREDENTIAL_NAME.search(env.get("name", "")):
                        problems.append(f"{cwhere}: inline value for credential {env['name']}")
            for volume in spec.get("volumes") or []:
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is not None and claim not in pvcs:
                    problems.append(f"{where}: volume claims {claim!r}, not in {sorted(pvcs)}")
            if role == "head" and any(
                GPU in json.dumps(c.get("resources") or {}) for c in containers(template)
            ):
                problems.append(f"{where}: the head must be a CPU pod")
            if group is not None and role.startswith("worker:") and is_gpu_group(group):
                if gpus(group) < 1:
                    problems.append(f"{where}: GPU group without a {GPU} limit")
                tolerations = spec.get("tolerations") or []
                if not any(
                    t.get("key") == GPU
                    and t.get("operator", "Equal") in ("Exists", "Equal")
                    and t.get("effect") in (None, "", "NoSchedule")
                    for t in tolerations
                ):
                    problems.append(f"{where}: GPU group without a {GPU} NoSchedule toleration")

    problems += isolation_problems(objects)
    text = json.dumps(objects)
    problems += [f"credential-like text: {p.pattern}" for p in _CREDENTIAL_TEXT if p.search(text)]
    return problems


def isolation_problems(objects: list[dict]) -> list[str]:
    """The job account has no token and no Role; one NetworkPolicy selects the oodscale pods
    and admits ingress only from them (and KubeRay's operator on the dashboard port)."""
    problems = []
    account = next((o for o in objects if o["kind"] == "ServiceAccount"
                    and o["metadata"]["name"] == JOB_ACCOUNT), None)
    if account is None or account.get("automountServiceAccountToken") is not False:
        problems.append(f"ServiceAccount {JOB_ACCOUNT} missing or mounting a token")
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if any(s.get("name") == JOB_ACCOUNT for s in binding.get("subjects") or []):
            problems.append(f"{binding['kind']}/{binding['metadata']['name']} gives "
                            f"{JOB_ACCOUNT} API permissions")
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"
                and o["spec"].get("podSelector") == OWN_PODS
                and "Ingress" in o["spec"].get("policyTypes", [])]
    if not policies:
        problems.append("no NetworkPolicy restricts ingress to the oodscale pods")
    for policy in policies:
        where = f"NetworkPolicy/{policy['metadata']['name']}"
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from") or [{}]  # no `from`: every source
            for peer in peers:
                own = peer == {"podSelector": OWN_PODS}
                operator = (peer.get("podSelector") == OPERATOR
                            and set(peer) <= {"podSelector", "namespaceSelector"}
                            and rule.get("ports") == DASHBOARD_PORT)
                if not (own or operator):
                    problems.append(f"{where}: admits {peer or 'every source'}")
    return problems


def ray_objects(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def stage_jobs(objects: list[dict]) -> dict[str, dict]:
    jobs = ray_objects(objects, "RayJob")
    return {name.removeprefix("oodscale-"): job for name, job in jobs.items()}


def secret_refs(objects: list[dict]) -> set[str]:
    names: set[str] = set()
    for obj in objects:
        for _, template, _ in pod_templates(obj):
            for container in containers(template):
                for src in container.get("envFrom") or []:
                    if "secretRef" in src:
                        names.add(src["secretRef"]["name"])
                for env in container.get("env") or []:
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        names.add(ref["name"])
            for volume in (template.get("spec") or {}).get("volumes") or []:
                if "secret" in volume:
                    names.add(volume["secret"]["secretName"])
    return names


# --------------------------------------------------------------------------------------------
# Tests: rendering
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_renders(profile: str) -> None:
    objects = rendered(profile)
    kinds = Counter(o["kind"] for o in objects)
    assert kinds == {
        "RayJob": len(STAGES),
        "RayCluster": 1,
        "PersistentVolumeClaim": 1,
        "ServiceAccount": 2,
        "NetworkPolicy": 1,
    }, kinds
    assert len({_key(o) for o in objects}) == len(objects), "duplicate objects"
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "oodscale"
        if obj["kind"] in RAY_KINDS:
            assert obj["apiVersion"] == "ray.io/v1", "the stable, non-deprecated KubeRay API"
        if obj["kind"] == "RayJob":
            # Stages depend on each other: `kubectl apply -k` must not start them all at once.
            assert obj["spec"].get("suspend") is True, obj["metadata"]["name"]


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("profile", PROFILES)
def test_renderer_matches_kustomize(profile: str) -> None:
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl on PATH: only the built-in renderer checked")
    done = subprocess.run(
        [*command, str(PROFILES[profile])], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    theirs = {_key(o): o for o in load_docs(done.stdout)}
    ours = {_key(o): o for o in rendered(profile)}
    assert ours.keys() == theirs.keys()
    for key, obj in ours.items():
        assert obj == theirs[key], f"{key} differs between render() and {' '.join(command)}"


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "sa.yaml").write_text(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n"
    )
    (tmp_path / "kustomization.yaml").write_text("resources: [sa.yaml]\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)

    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "spec": {"entrypoint": "x"}}
    with pytest.raises(KustomizeError, match="does not exist"):  # kustomize would add it
        apply_json6902(job, [{"op": "replace", "path": "/ttlSecondsAfterFinished", "value": 1}])
    with pytest.raises(KustomizeError, match="test failed"):
        apply_json6902(job, [{"op": "test", "path": "/spec/entrypoint", "value": "y"}])
    with pytest.raises(KustomizeError, match="JSON6902"):
        merge_patch({"spec": {}}, {"spec": {"containers": [{"name": "a"}]}})


def test_secret_example_is_not_deployed() -> None:
    assert SECRET_EXAMPLE.is_file()
    for kfile in MANIFESTS.rglob("kustomization.yaml"):
        spec = yaml.load(kfile.read_text(), Loader=LOADER)
        assert "secret.example.yaml" not in json.dumps(spec), f"{kfile} deploys the example"
    for profile in PROFILES:
        assert not [o for o in rendered(profile) if o["kind"] == "Secret"]


# --------------------------------------------------------------------------------------------
# Tests: schemas
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_ray_objects_match_kuberay_crds(profile: str, shared: Path) -> None:
    errors = []
    for obj in rendered(profile):
        if obj["kind"] in RAY_KINDS:
            errors += [f"{obj['metadata']['name']}: {e}" for e in crd_errors(obj, shared)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("profile", PROFILES)
def test_core_objects_and_pod_templates_match_kubernetes(profile: str) -> None:
    errors = []
    for obj in rendered(profile):
        errors += core_errors(obj)
    assert not errors, "\n".join(errors)


# Settings that may ship with example values: a region, an endpoint, a key file's path.
_NOT_SECRET = {
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "GOOGLE_APPLICATION_CREDENTIALS",
}


def test_secret_example_is_a_valid_placeholder() -> None:
    secrets = load_docs(SECRET_EXAMPLE.read_text())
    assert secrets and all(s["kind"] == "Secret" for s in secrets)
    for secret in secrets:
        assert not k8s_errors(secret)
        assert "data" not in secret, "use stringData placeholders, never encoded values"
        for key, value in secret["stringData"].items():
            if key not in _NOT_SECRET:
                assert value == "REPLACE_ME", f"{key} in the example must be a placeholder"
    # Every Secret the pods reference is documented by the example.
    defined = {s["metadata"]["name"] for s in secrets}
    for profile in PROFILES:
        assert secret_refs(rendered(profile)) <= defined


def _rename_key(node: dict, old: str, new: str) -> None:
    node[new] = node.pop(old)


def _first(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def _job(objects: list[dict], stage: str) -> dict:
    return _first(objects, "RayJob", f"oodscale-{stage}")


def _cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def _head_pod(obj: dict) -> dict:
    return _cluster_spec(obj)["headGroupSpec"]["template"]["spec"]


def _worker_pod(obj: dict, index: int = 0) -> dict:
    return _cluster_spec(obj)["workerGroupSpecs"][index]["template"]["spec"]


Breakage = Callable[[list[dict]], dict]
BROKEN: dict[str, Breakage] = {}


def _broken(func: Breakage) -> Breakage:
    """Registers a function that breaks one object of the base and returns that object."""
    BROKEN[func.__name__] = func
    return func


@_broken
def shutdown_after_job_finish_misspelt(objects: list[dict]) -> dict:
    job = _job(objects, "train")
    _rename_key(job["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish")
    return job


@_broken
def ray_start_param_misspelt(objects: list[dict]) -> dict:
    job = _job(objects, "generate")
    _rename_key(_cluster_spec(job)["headGroupSpec"], "rayStartParams", "rayStartParam")
    return job


@_broken
def container_field_misspelt(objects: list[dict]) -> dict:
    cluster = _first(objects, "RayCluster", "oodscale")
    _rename_key(_worker_pod(cluster)["containers"][0], "imagePullPolicy", "imagePullPolice")
    return cluster


@_broken
def ttl_as_string(objects: list[dict]) -> dict:
    job = _job(objects, "prepare")
    job["spec"]["ttlSecondsAfterFinished"] = "600"
    return job


@_broken
def worker_group_without_name(objects: list[dict]) -> dict:
    job = _job(objects, "evaluate")
    del _cluster_spec(job)["workerGroupSpecs"][0]["groupName"]
    return job


@_broken
def top_level_field_outside_spec(objects: list[dict]) -> dict:
    job = _job(objects, "train")
    job["ttlSecondsAfterFinished"] = 600
    return job


@_broken
def duplicate_volume_name(objects: list[dict]) -> dict:
    job = _job(objects, "train")
    volumes = _head_pod(job)["volumes"]
    volumes.append(copy.deepcopy(volumes[0]))
    return job


@_broken
def unknown_autoscaler_mode(objects: list[dict]) -> dict:
    cluster = _first(objects, "RayCluster", "oodscale")
    cluster["spec"]["autoscalerOptions"]["upscalingMode"] = "Eager"
    return cluster


@_broken
def unserved_api_version(objects: list[dict]) -> dict:
    job = _job(objects, "train")
    job["apiVersion"] = "ray.io/v2"
    return job


@pytest.mark.parametrize("breakage", BROKEN)
def test_broken_manifest_fails_crd_validation(breakage: str, shared: Path) -> None:
    objects = rendered("base")
    broken = BROKEN[breakage](objects)
    assert crd_errors(broken, shared), f"{breakage} passed the CRD validation"


def test_broken_core_objects_fail_kubernetes_validation() -> None:
    pvc = _first(rendered("base"), "PersistentVolumeClaim", "oodscale-data")
    _rename_key(pvc["spec"], "accessModes", "accesModes")
    assert k8s_errors(pvc)
    job = _job(rendered("base"), "train")
    container = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    container["envFrom"] = [{"secretRef": {"nam": "oodscale-storage"}}]
    assert core_errors(job)


# --------------------------------------------------------------------------------------------
# Tests: the deployment contract
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_contract(profile: str) -> None:
    problems = contract_problems(rendered(profile))
    assert not problems, "\n".join(problems)


CONTRACT_BREAKS: dict[str, Breakage] = {}


def _breaks_contract(func: Breakage) -> Breakage:
    CONTRACT_BREAKS[func.__name__] = func
    return func


@_breaks_contract
def no_shutdown(objects: list[dict]) -> dict:
    job = _job(objects, "train")
    job["spec"]["shutdownAfterJobFinishes"] = False
    return job


@_breaks_contract
def no_ttl(objects: list[dict]) -> dict:
    job = _job(objects, "prepare")
    del job["spec"]["ttlSecondsAfterFinished"]
    return job


@_breaks_contract
def root_pod(objects: list[dict]) -> dict:
    job = _job(objects, "train")
    _head_pod(job)["securityContext"]["runAsUser"] = 0
    return job


@_breaks_contract
def privilege_escalation(objects: list[dict]) -> dict:
    cluster = _first(objects, "RayCluster", "oodscale")
    _head_pod(cluster)["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    return cluster


@_breaks_contract
def gpu_group_without_toleration(objects: list[dict]) -> dict:
    job = _job(objects, "generate")
    del _worker_pod(job)["tolerations"]
    return job


@_breaks_contract
def gpu_group_without_gpu_limit(objects: list[dict]) -> dict:
    job = _job(objects, "train")
    for part in ("limits", "requests"):
        del _worker_pod(job)["containers"][0]["resources"][part][GPU]
    return job


@_breaks_contract
def inline_credential(objects: list[dict]) -> dict:
    job = _job(objects, "train")
    env = _head_pod(job)["containers"][0].setdefault("env", [])
    env.append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"})
    return job


@_breaks_contract
def unhardened_submitter(objects: list[dict]) -> dict:
    job = _job(objects, "evaluate")
    del job["spec"]["submitterPodTemplate"]
    return job


@_breaks_contract
def unknown_claim(objects: list[dict]) -> dict:
    pvc = _first(objects, "PersistentVolumeClaim", "oodscale-data")
    pvc["metadata"]["name"] = "other"
    return pvc


@_breaks_contract
def writable_root_filesystem(objects: list[dict]) -> dict:
    job = _job(objects, "train")
    del _worker_pod(job)["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    return job


@_breaks_contract
def no_scratch_at_tmp(objects: list[dict]) -> dict:
    job = _job(objects, "calibrate")
    container = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/tmp"]
    return job


@_breaks_contract
def driver_under_autoscaler_account(objects: list[dict]) -> dict:
    job = _job(objects, "evaluate")
    _head_pod(job)["serviceAccountName"] = SERVICE_ACCOUNT
    return job


@_breaks_contract
def job_account_bound_to_a_role(objects: list[dict]) -> dict:
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "x"}, "roleRef": {"kind": "Role", "name": "x",
                                                      "apiGroup": "rbac.authorization.k8s.io"},
               "subjects": [{"kind": "ServiceAccount", "name": JOB_ACCOUNT}]}
    objects.append(binding)
    return binding


@_breaks_contract
def ingress_from_anywhere(objects: list[dict]) -> dict:
    policy = _first(objects, "NetworkPolicy", "oodscale")
    policy["spec"]["ingress"].append({"from": [{"namespaceSelector": {}}]})
    return policy


@_breaks_contract
def unlabelled_pod(objects: list[dict]) -> dict:
    job = _job(objects, "generate")
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["metadata"]
    return job


@pytest.mark.parametrize("breakage", CONTRACT_BREAKS)
def test_contract_catches(breakage: str) -> None:
    objects = rendered("base")
    CONTRACT_BREAKS[breakage](objects)
    assert contract_problems(objects), f"{breakage} went unnoticed"


def _total_gpus(job: dict) -> int:
    groups = job["spec"]["rayClusterSpec"].get("workerGroupSpecs") or []
    return sum(gpus(g) * g.get("replicas", 0) for g in groups)


def _mount_paths(template: dict) -> list[str]:
    return [m["mountPath"] for c in containers(template) for m in c.get("volumeMounts") or []]


@pytest.mark.parametrize("profile", PROFILES)
def test_entrypoints(profile: str) -> None:
    jobs = stage_jobs(rendered(profile))
    assert set(jobs) == set(STAGES)
    for stage, job in jobs.items():
        entry = " ".join(job["spec"]["entrypoint"].split())
        match = _ENTRYPOINT.fullmatch(entry)
        assert match, entry
        assert match.group("script") == STAGES[stage]
        assert match.group("config") in CONFIGS
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == stage
        root = overrides(entry).get("storage.root")
        assert root, f"{stage}: no storage.root override"
        if root.startswith("/"):  # a volume: every Ray pod must mount it
            for role, template, _ in pod_templates(job):
                if role != "submitter":
                    assert any(root.startswith(p.rstrip("/") + "/") for p in _mount_paths(template))
        # Parallelism in the entry point agrees with the GPUs the cluster has.
        values, total = overrides(entry), _total_gpus(job)
        for section in ("diffusion", "train"):
            if values.get(f"{section}.use_gpu") == "true":
                assert int(values.get(f"{section}.num_workers", 0)) == total, (stage, section)
        if values.get("generate.use_gpu") == "true":
            assert int(values["generate.concurrency"]) == total, stage
        if total == 0:
            assert all(v == "false" for k, v in values.items() if k.endswith(".use_gpu")), stage


def test_base_profile() -> None:
    objects = rendered("base")
    jobs = stage_jobs(objects)
    for stage, job in jobs.items():
        groups = _cluster_spec(job)["workerGroupSpecs"]
        has_gpus = any(is_gpu_group(g) for g in groups)
        assert has_gpus == (stage in GPU_STAGES), f"{stage}: GPU workers {has_gpus}"
        config = _ENTRYPOINT.fullmatch(" ".join(job["spec"]["entrypoint"].split()))["config"]
        assert config == "imagenet", stage
        assert overrides(job["spec"]["entrypoint"])["storage.root"] == "/data/runs"
    cluster = ray_objects(objects, "RayCluster")["oodscale"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert any(is_gpu_group(g) for g in cluster["spec"]["workerGroupSpecs"])
    for obj in objects:
        for _, template, _ in pod_templates(obj):
            for container in containers(template):
                assert container["image"].startswith("oodscale:")


def test_gpu_profile() -> None:
    base, gpu = stage_jobs(rendered("base")), stage_jobs(rendered("gpu"))
    train = overrides(gpu["train"]["spec"]["entrypoint"])
    assert train["train.mixed_precision"] == "bf16"
    assert train["train.use_gpu"] == "true"
    diffusion = overrides(gpu["train-diffusion"]["spec"]["entrypoint"])
    assert diffusion["diffusion.mixed_precision"] == "bf16"
    for stage in ("train", "generate"):
        assert _total_gpus(gpu[stage]) > _total_gpus(base[stage]), f"{stage}: no more GPUs"
    objects = rendered("gpu")
    groups = [
        (obj["metadata"]["name"], group)
        for obj in objects
        for role, _, group in pod_templates(obj)
        if role.startswith("worker:") and is_gpu_group(group)
    ]
    assert len(groups) == len(GPU_STAGES) + 1
    for name, group in groups:
        affinity = group["template"]["spec"]["affinity"]["nodeAffinity"]
        terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        for term in terms:
            products = [
                v
                for expr in term["matchExpressions"]
                if expr["key"] == "nvidia.com/gpu.product" and expr["operator"] == "In"
                for v in expr["values"]
            ]
            assert products and all(re.search(r"A100|H100", p) for p in products), name
            assert any("A100" in p for p in products) and any("H100" in p for p in products)
    for obj in objects:
        for _, template, _ in pod_templates(obj):
            for container in containers(template):
                assert not container["image"].startswith("oodscale:"), "registry image expected"


def test_cpu_small_profile() -> None:
    objects = rendered("cpu-small")
    assert "nvidia" not in json.dumps(objects)
    for stage, job in stage_jobs(objects).items():
        entry = " ".join(job["spec"]["entrypoint"].split())
        assert _ENTRYPOINT.fullmatch(entry).group("config") == "digits", stage
        section = {"train-diffusion": "diffusion", "generate": "generate", "train": "train"}
        if stage in section:  # explicit: the default "use GPUs if the cluster has any"
            assert overrides(entry)[f"{section[stage]}.use_gpu"] == "false", stage
    for obj in objects:
        for role, template, _ in pod_templates(obj):
            for container in containers(template):
                limits = (container.get("resources") or {}).get("limits") or {}
                assert quantity(limits["cpu"]) <= 2, f"{obj['metadata']['name']} {role}"
                assert quantity(limits["memory"]) <= 4 * 2**30, f"{obj['metadata']['name']} {role}"
                assert container["image"] == "oodscale:dev"
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


# --------------------------------------------------------------------------------------------
# Tests: cluster/ (image, Ray cluster launcher, local head)
# --------------------------------------------------------------------------------------------


def test_dockerfile() -> None:
    lines = [
        line.strip()
        for line in (CLUSTER / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    froms = [line for line in lines if line.upper().startswith("FROM ")]
    assert froms == ["FROM rayproject/ray:2.60.0-py311-gpu"]
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1] in ("ray", "1000"), "the image must end as the non-root ray user"
    text = " ".join(lines)
    assert "pip install --no-cache-dir ." in text
    assert re.search(r"COPY (--chown=\S+ )?\. ", text), "the repository is copied in"


def _ray_schema() -> dict | None:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text()) if path.is_file() else None


def test_ray_cluster_launcher_config() -> None:
    config = yaml.load((CLUSTER / "ray-cluster.yaml").read_text(), Loader=LOADER)
    schema = _ray_schema()
    if schema is not None:  # the schema `ray up` validates against
        jsonschema.validate(config, schema)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"]
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_start_local_head_script() -> None:
    script = CLUSTER / "start-local-head.sh"
    assert script.stat().st_mode & stat.S_IXUSR, "start-local-head.sh must be executable"
    text = script.read_text()
    for needle in ("--head", "--port=0", "--dashboard-host=127.0.0.1", "RAY_AUTH_MODE=token"):
        assert needle in text, needle
    if shutil.which("bash"):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_readmes_show_the_commands() -> None:
    cluster = (CLUSTER / "README.md").read_text()
    assert "docker build -f cluster/Dockerfile" in cluster
    assert (
        "ray job submit --working-dir . -- python jobs/generate.py --config configs/imagenet.yaml"
        in " ".join(cluster.replace("\\\n", " ").split())
    )
    manifests = (MANIFESTS / "README.md").read_text()
    for profile in ("manifests/base", "manifests/overlays/gpu", "manifests/overlays/cpu-small"):
        assert f"kubectl apply -k {profile}" in manifests
