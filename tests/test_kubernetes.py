"""The Kubernetes and KServe manifests in deploy/kubernetes/, checked offline (no cluster).

- Every Kubernetes resource validates against the Kubernetes OpenAPI schemas shipped in the
  `kubernetes-validate` package, strict (unknown fields are errors, as with kubectl's server-side
  strict field validation), for the oldest Kubernetes the manifests target and the newest known.
- The KServe resources validate against KServe's own CRD schemas (vendored in tests/data/kserve/,
  see PROVENANCE.md there), made strict the same way.
- serve.yaml in the ConfigMap loads with the server's own loader, and the flags the pods pass parse
  with genserve-serve's own parser; probes, ports, the drain, volumes and selectors agree with it and
  with each other.
- Each kustomization lists exactly the manifests beside it; `kubectl kustomize` (where kubectl is
  installed) renders them and its output validates too.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from genserve.serving.cli import build_parser as serve_parser
from genserve.serving.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KSERVE_SCHEMAS = Path(__file__).parent / "data" / "kserve"
# Native gRPC probes are GA from Kubernetes 1.27: the oldest version the manifests target.
KUBERNETES_VERSIONS = ("1.27", latest_version())
# KServe's protocol versions (pkg/constants/constants.go, InferenceServiceProtocol).
KSERVE_PROTOCOLS = ("v1", "v2", "grpc-v1", "grpc-v2")
DRAIN_MARGIN_S = 5  # at least this long after the in-flight grace period, to unload and exit


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_resources() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_documents(path)]


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [r for r in all_resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in {MANIFESTS}, found {len(found)}"
    return found[0]


def is_kserve(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] == "serving.kserve.io"


# --- schemas -------------------------------------------------------------------------------------

def strict(schema: Any) -> Any:
    """A CRD schema with unknown fields rejected: every object schema that lists its properties and
    neither preserves unknown fields nor says what extra keys may hold gets additionalProperties false
    (the API server would silently prune such a field, or refuse it under strict field validation)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) if key not in ("properties", "enum", "default") else value for key, value in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@cache
def kserve_schema(api_version: str, kind: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    for path in KSERVE_SCHEMAS.glob(f"{group}_*.{version}.schema.json.gz"):
        record = json.loads(gzip.decompress(path.read_bytes()))
        if record["kind"] == kind:
            return strict(record["schema"])
    raise AssertionError(f"no vendored KServe CRD schema for {kind} {api_version} in {KSERVE_SCHEMAS}")


def validate(doc: dict[str, Any], kubernetes_version: str) -> None:
    """Raise with the failing field's path if `doc` does not validate."""
    if is_kserve(doc):
        body = {k: v for k, v in doc.items() if k != "metadata"}  # the CRD schema leaves metadata to the API server
        validator = jsonschema.Draft202012Validator(kserve_schema(doc["apiVersion"], doc["kind"]))
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
        if errors:
            raise AssertionError("; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))
        # The metadata is checked like any Kubernetes object's (ObjectMeta, via a ConfigMap's schema).
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                     kubernetes_version, strict=True)
    else:
        kubernetes_validate.validate(doc, kubernetes_version, strict=True)


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_manifest_validates_against_its_schema(path: Path, kubernetes_version: str) -> None:
    docs = load_documents(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        try:
            validate(doc, kubernetes_version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError, AssertionError) as error:
            where = ".".join(map(str, getattr(error, "path", []) or []))
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']} does not validate "
                        f"for Kubernetes {kubernetes_version}: {where} {getattr(error, 'message', error)}")


def test_expected_resources_are_there() -> None:
    kinds = {(r["apiVersion"], r["kind"]) for r in all_resources()}
    assert kinds == {
        ("v1", "ConfigMap"), ("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment"), ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget"), ("batch/v1", "Job"),
        ("serving.kserve.io/v1alpha1", "ServingRuntime"), ("serving.kserve.io/v1beta1", "InferenceService"),
    }


@pytest.mark.parametrize(
    "kind, name, change",
    [
        ("Deployment", "genserve", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={})),
        ("Deployment", "genserve", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(ports="8001")),
        ("InferenceService", "genserve", lambda d: d["spec"]["predictor"]["model"].update(protocolVersions=["grpc-v2"])),
        ("InferenceService", "genserve", lambda d: d["spec"]["predictor"].update(minReplicas="two")),
        ("ServingRuntime", "genserve", lambda d: d["spec"].pop("containers")),
    ],
    ids=["k8s-unknown-field", "k8s-wrong-type", "kserve-unknown-field", "kserve-wrong-type", "kserve-missing-required"],
)
def test_validation_rejects_broken_manifests(kind: str, name: str, change) -> None:
    """The validators are not vacuous: a typo, a wrong type or a missing field fails."""
    broken = copy.deepcopy(resource(kind, name))
    change(broken)
    with pytest.raises((kubernetes_validate.ValidationError, AssertionError)):
        validate(broken, KUBERNETES_VERSIONS[-1])


# --- the server's own configuration and flags -----------------------------------------------------

def container(kind: str, name: str) -> dict[str, Any]:
    doc = resource(kind, name)
    spec = doc["spec"] if kind == "ServingRuntime" else doc["spec"]["template"]["spec"]
    (only,) = spec["containers"]
    return only


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def expand(args: list[str], c: dict[str, Any]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args; a fieldRef variable gets a pod-name-like value."""
    variables = {e["name"]: e.get("value", "genserve-7d9f8b6c5-x2x4q") for e in c.get("env", [])}
    return [re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], arg) for arg in args]


def server_flags(c: dict[str, Any]) -> list[str]:
    """What scripts/entrypoint-server.sh passes to genserve-serve from the container's environment and args."""
    env = env_of(c)
    flags = ["--repository", env["GENSERVE_REPOSITORY"], "--host", env["GENSERVE_HOST"],
             "--port", env["GENSERVE_PORT"], "--metrics-port", env["GENSERVE_METRICS_PORT"]]
    if "GENSERVE_POLL_INTERVAL" in env:
        flags += ["--poll-interval", env["GENSERVE_POLL_INTERVAL"]]
    return flags + expand(c.get("args", []), c)


@pytest.fixture
def serve_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(resource("ConfigMap", "genserve-config")["data"]["serve.yaml"])
    return path


def pod_config(serve_yaml: Path, c: dict[str, Any]):
    """The ServerConfig a pod's genserve-serve ends up with: the file, then the entrypoint's flags."""
    args = serve_parser().parse_args(["--config", str(serve_yaml), *server_flags(c)])
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "no_metrics", "tls_cert", "tls_key", "tls_client_ca")}
    return load_config(serve_yaml, **overrides)


def test_configmap_serve_yaml_loads_with_the_server_loader(serve_yaml: Path) -> None:
    config = load_config(serve_yaml)
    assert (config.repository, config.host, config.port, config.metrics_port) == ("/models", "0.0.0.0", 8001, 8002)
    assert config.poll_interval_s > 0, "replicas must poll the shared repository to hot-load the Job's versions"
    assert config.log_json


def test_deployment_runs_the_configmap_config_with_a_holder_per_pod(serve_yaml: Path) -> None:
    c = container("Deployment", "genserve")
    env = env_of(c)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["GENSERVE_CONFIG"] == f"{mounts['config']}/serve.yaml"
    file_config = load_config(serve_yaml)
    config = pod_config(serve_yaml, c)
    # The entrypoint's flags override the file: they must say the same thing.
    for key in ("repository", "host", "port", "metrics_port", "grace_period_s", "poll_interval_s"):
        assert getattr(config, key) == getattr(file_config, key), key
    assert config.repository == mounts["models"]
    assert config.serving_holder == "genserve-7d9f8b6c5-x2x4q", "each replica needs its own serving mark"
    assert env["GENSERVE_BOOTSTRAP"] == "0", "server pods must not train; the Job fills the repository"


def test_probes_ports_and_drain_match_the_server(serve_yaml: Path) -> None:
    deployment = resource("Deployment", "genserve")
    pod = deployment["spec"]["template"]["spec"]
    c = container("Deployment", "genserve")
    config = pod_config(serve_yaml, c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": config.port}, f"{probe}: a native gRPC probe on grpc.health.v1"
    assert c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"] <= 10
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    # The drain: preStop sleep, then SIGTERM and the server's grace period, then unload and exit,
    # all within terminationGracePeriodSeconds (counted from the start of preStop).
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert pre_stop_s >= 5, "the pod must keep serving while it leaves the endpoints"
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + config.grace_period_s + DRAIN_MARGIN_S
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def image_user() -> int:
    match = re.search(r"useradd\b.*--uid (\d+)", (ROOT / "docker" / "Dockerfile").read_text())
    assert match, "docker/Dockerfile creates no user with --uid"
    return int(match.group(1))


@pytest.mark.parametrize("kind, name", [("Deployment", "genserve"), ("Job", "genserve-train")])
def test_pods_run_as_the_image_user_with_resources(kind: str, name: str) -> None:
    pod = resource(kind, name)["spec"]["template"]["spec"]
    c = container(kind, name)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user() == pod["securityContext"]["fsGroup"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, "a read-only root needs a writable /tmp"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert c["image"].split(":")[0] == compose["x-genserve"]["image"].split(":")[0], "the compose file's image"


def test_volumes_services_and_selectors_agree() -> None:
    pvcs = {r["metadata"]["name"]: r for r in all_resources() if r["kind"] == "PersistentVolumeClaim"}
    assert pvcs["genserve-models"]["spec"]["accessModes"] == ["ReadWriteMany"], "every replica mounts the repository"
    for kind, name in (("Deployment", "genserve"), ("Job", "genserve-train")):
        for volume in resource(kind, name)["spec"]["template"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in pvcs, f"{kind} {name}: {volume}"
    deployment = resource("Deployment", "genserve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service_name, headless in (("genserve", False), ("genserve-headless", True)):
        service = resource("Service", service_name)
        assert service["spec"]["selector"].items() <= labels.items()
        assert (service["spec"].get("clusterIP") == "None") is headless
        assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    assert resource("PodDisruptionBudget", "genserve")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = resource("HorizontalPodAutoscaler", "genserve")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "genserve")
    config_volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == "genserve-config"


def test_training_job_publishes_into_the_servers_repository() -> None:
    job = resource("Job", "genserve-train")
    c = container("Job", "genserve-train")
    env = env_of(c)
    assert c["command"] == ["/app/scripts/entrypoint-trainer.sh"]
    assert (ROOT / "scripts" / "entrypoint-trainer.sh").is_file()
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["GENSERVE_REPOSITORY"] == mounts["models"] and env["GENSERVE_RUNS"] == mounts["runs"]
    claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in job["spec"]["template"]["spec"]["volumes"]}
    server = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
              for v in resource("Deployment", "genserve")["spec"]["template"]["spec"]["volumes"]}
    assert claim["models"] == server["models"] == "genserve-models"
    assert env["GENSERVE_GATE"] == "1"  # bootstrap-models.sh: genserve-export --gate


@pytest.mark.parametrize("kind, name", [("Deployment", "genserve"), ("Job", "genserve-train"), ("ServingRuntime", "genserve")])
def test_environment_variables_are_ones_the_scripts_read(kind: str, name: str) -> None:
    """A misspelt GENSERVE_* variable would be ignored silently by the entrypoints."""
    scripts = "".join(p.read_text() for p in (ROOT / "scripts").glob("*.sh"))
    for variable in env_of(container(kind, name)):
        if variable.startswith(("GENSERVE_", "DEMO_")):
            assert re.search(rf"\b{variable}\b", scripts), f"{kind} {name}: no script reads {variable}"


# --- KServe --------------------------------------------------------------------------------------

def test_inference_service_uses_the_genserve_runtime_over_grpc_v2(serve_yaml: Path) -> None:
    isvc = resource("InferenceService", "genserve")
    runtime = resource("ServingRuntime", "genserve")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "grpc-v2" and model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert set(runtime["spec"]["protocolVersions"]) <= set(KSERVE_PROTOCOLS)
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    claim = model["storageUri"].removeprefix("pvc://").split("/")[0]
    assert model["storageUri"].startswith("pvc://") and claim == "genserve-models"
    assert isvc["metadata"]["annotations"]["storage.kserve.io/readonly"] == "false", "serving marks need write access"
    c = container("ServingRuntime", "genserve")
    assert c["name"] == "kserve-container"
    args = serve_parser().parse_args(server_flags(c))
    assert args.repository == "/mnt/models", "KServe mounts the storageUri at /mnt/models"
    first_port = c["ports"][0]
    # KServe's Service exposes the first port, as HTTP/2 when its name holds "grpc" or "h2c".
    assert first_port["containerPort"] == args.port and re.search("grpc|h2c", first_port["name"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": args.port}
    pre_stop_s = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    grace_s = load_config(serve_yaml).grace_period_s  # the server's default drain, as in the Deployment
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] >= pre_stop_s + grace_s + DRAIN_MARGIN_S


# --- kustomize -----------------------------------------------------------------------------------

@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomization_lists_every_manifest_beside_it(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    present = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present, f"{directory}: kustomization.yaml lists {listed}, the directory holds {present}"
    images = {i["name"] for i in kustomization.get("images", [])}
    for name in present:
        for doc in load_documents(directory / name):
            spec = doc.get("spec", {})
            pod = spec if doc["kind"] == "ServingRuntime" else spec.get("template", {}).get("spec", {})
            for c in pod.get("containers", []):
                assert c["image"].split(":")[0] in images, f"{name}: image {c['image']} not settable in kustomization"


def test_every_manifest_is_in_a_kustomization() -> None:
    listed = {d / name for d in kustomization_dirs()
              for name in yaml.safe_load((d / "kustomization.yaml").read_text())["resources"]}
    assert set(manifest_files()) == listed


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_kubectl_kustomize_renders_valid_resources(directory: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` cannot render the kustomization here")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr.strip()}"
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    expected = [doc for name in yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
                for doc in load_documents(directory / name)]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in expected)
    for doc in rendered:
        validate(doc, KUBERNETES_VERSIONS[-1])
