"""deploy/: the compose file and Kubernetes manifests validated offline against real
schemas, and the facts that tie them to the server kept consistent (ports, environment
variables, grace period, metric names, labels). The images and the container health
check: tests/test_deploy_images.py.

The validators are PyPI packages that carry their schemas inside them, so nothing is
downloaded at test time:
  check-jsonschema     the Compose Specification schema (vendor.compose-spec)
  kubernetes-validate  the Kubernetes OpenAPI schemas, one set per Kubernetes minor
  promql-parser        a PromQL parser, for the Grafana dashboard's queries
Tests that need them skip when they are not installed (PyYAML, which the first two
bring, is needed by every test here).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML: comes with check-jsonschema / kubernetes-validate

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda")
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ensemble-serving.json"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
# KServe on gRPC: an alternative to kserve-inferenceservice.yaml (REST), kept out of the
# folder `kubectl apply -f deploy/k8s/` reads so that one ServingRuntime applies by default.
KSERVE_GRPC = K8S / "kserve-grpc" / "kserve-inferenceservice-grpc.yaml"
SERVER_DEFAULT_GRACE_PERIOD_S = 30.0
# Oldest Kubernetes the manifests claim to work on (preStop `sleep` is on by default from
# 1.30), and the newest the installed schemas know.
KUBERNETES_VERSIONS = ("1.30", "latest")
# Custom resources: no schema in kubernetes-validate; checked field by field below.
CUSTOM_KINDS = {"ServiceMonitor", "ServingRuntime", "InferenceService"}


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_resources(paths=None) -> dict[str, dict]:
    """Every resource in deploy/k8s/*.yaml (or in `paths`), keyed by kind (each kind appears once)."""
    resources = {}
    for path in paths or sorted(K8S.glob("*.yaml")):
        for resource in load_yaml_documents(path):
            assert resource["kind"] not in resources, f"{path.name}: a second {resource['kind']}"
            resources[resource["kind"]] = resource
    return resources


def kserve_variants() -> dict[str, dict[str, dict]]:
    """protocol -> the ServingRuntime and InferenceService serving it."""
    return {"rest": k8s_resources(), "grpc": k8s_resources([KSERVE_GRPC])}


def server_environment_variables() -> set[str]:
    """The ENSEMBLE_SERVER_* variables the server reads: one per `server` flag."""
    click = pytest.importorskip("click")
    from server.config import apply_settings_options

    command = click.command()(apply_settings_options(lambda **options: None))
    return {param.envvar for param in command.params if param.envvar}


def ensemble_server_variables(text: str) -> set[str]:
    return set(re.findall(r"\bENSEMBLE_SERVER_[A-Z_]+", text))


def server_container(resources: dict) -> dict:
    (container,) = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def container_env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


# ---------------------------------------------------------------------------------------
# Compose: schema
# ---------------------------------------------------------------------------------------
def run_check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("check_jsonschema")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_compose_file_matches_the_compose_specification():
    result = run_check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validator_rejects_a_misspelt_key(tmp_path):
    """The schema check can fail: a typo in a service key is caught."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    result = run_check_jsonschema(broken)
    assert result.returncode != 0
    assert "stop_grace_periods" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------
# Kubernetes: schema
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version):
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.utils.latest_version() if version == "latest" else version
    unchecked = set()
    for path in sorted(K8S.rglob("*.yaml")):
        for resource in load_yaml_documents(path):
            try:
                kv.validate(resource, version, strict=True)  # strict: unknown fields are errors
            except kv.utils.SchemaNotFoundError:
                unchecked.add(resource["kind"])
            except kv.ValidationError as error:
                where = ".".join(str(part) for part in error.path)
                pytest.fail(f"{path.name} {resource['kind']} (Kubernetes {version}): {where}: {error.message}")
    assert unchecked == CUSTOM_KINDS


def test_kubernetes_validator_rejects_a_misspelt_field():
    kv = pytest.importorskip("kubernetes_validate")
    deployment = k8s_resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.utils.latest_version(), strict=True)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_containers_inside_custom_resources_validate_as_kubernetes_containers(protocol):
    """The ServingRuntime's containers are core/v1 Containers: validate them strictly as
    the containers of a Pod."""
    kv = pytest.importorskip("kubernetes_validate")
    runtime = kserve_variants()[protocol]["ServingRuntime"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "serving-runtime"},
           "spec": {"containers": runtime["spec"]["containers"]}}  # fmt: skip
    kv.validate(pod, kv.utils.latest_version(), strict=True)
    pod["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": GRPC_PORT}
    with pytest.raises(kv.ValidationError):  # the check can fail
        kv.validate(pod, kv.utils.latest_version(), strict=True)


# Field names of the KServe v1beta1 / v1alpha1 types we use, from the KServe 0.21 Python
# SDK's generated models (attribute_map). The custom resources' schemas are not shipped in
# any PyPI package we could validate with, so unknown keys are caught against these.
KSERVE_FIELDS = {
    "InferenceService.spec": {"canary", "explainer", "predictor", "tracing", "transformer"},
    "InferenceService.spec.predictor": {
        "activeDeadlineSeconds", "affinity", "annotations", "autoScaling", "batcher",
        "canaryTrafficPercent", "containerConcurrency", "containers", "deploymentStrategy",
        "imagePullSecrets", "initContainers", "labels", "logger", "maxReplicas", "minReplicas",
        "model", "nodeSelector", "onnx", "priorityClassName", "resources", "scaleMetric",
        "scaleMetricType", "scaleTarget", "securityContext", "serviceAccountName",
        "terminationGracePeriodSeconds", "timeout", "tolerations", "triton", "volumes",
    },
    "InferenceService.spec.predictor.model": {
        "args", "command", "env", "envFrom", "image", "imagePullPolicy", "livenessProbe",
        "modelFormat", "name", "ports", "protocolVersion", "readinessProbe", "resources", "runtime",
        "runtimeVersion", "securityContext", "startupProbe", "storage", "storageUri", "volumeMounts",
    },
    "ServingRuntime.spec": {
        "affinity", "annotations", "builtInAdapter", "containers", "disabled", "grpcDataEndpoint",
        "grpcEndpoint", "httpDataEndpoint", "imagePullSecrets", "labels", "multiModel", "nodeSelector",
        "protocolVersions", "replicas", "schedulerName", "storageHelper", "supportedModelFormats",
        "tolerations", "volumes", "workerSpec",
    },
}  # fmt: skip
KSERVE_PROTOCOL_VERSIONS = {"v1", "v2", "grpc-v1", "grpc-v2"}


# KServe routes to one port; its name says the protocol (http1: REST, h2c: gRPC).
KSERVE_PROTOCOLS = {"rest": ("v2", "http1", HTTP_PORT), "grpc": ("grpc-v2", "h2c", GRPC_PORT)}


@pytest.mark.parametrize("protocol", sorted(KSERVE_PROTOCOLS))
def test_kserve_examples_use_known_fields_and_the_v2_protocol(protocol):
    resources = kserve_variants()[protocol]
    protocol_version, port_name, port = KSERVE_PROTOCOLS[protocol]
    for dotted, allowed in KSERVE_FIELDS.items():
        kind, *path = dotted.split(".")
        node = resources[kind]
        for key in path:
            node = node[key]
        assert set(node) <= allowed, f"{dotted}: unknown fields {sorted(set(node) - allowed)}"
    runtime, service = resources["ServingRuntime"], resources["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert set(runtime["spec"]["protocolVersions"]) <= KSERVE_PROTOCOL_VERSIONS
    assert model["protocolVersion"] == protocol_version
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    # KServe routes to one port: the server's port for that protocol.
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [(port_name, port)]
    # Probes: the REST variant asks the HTTP health endpoints, the gRPC one the health service.
    if protocol == "rest":
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": HTTP_PORT}
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": HTTP_PORT}
    else:
        assert container["readinessProbe"]["grpc"]["port"] == container["livenessProbe"]["grpc"]["port"] == GRPC_PORT
    # The storage initializer puts storageUri at /mnt/models: the server must serve that.
    assert container_env(container)["ENSEMBLE_SERVER_MODEL_REPOSITORY"] == "/mnt/models"


# ---------------------------------------------------------------------------------------
# Kubernetes: consistency between the manifests and with the server
# ---------------------------------------------------------------------------------------
def test_service_monitor_pdb_and_hpa_point_at_the_deployment():
    resources = k8s_resources()
    deployment, service = resources["Deployment"], resources["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    monitor = resources["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    for endpoint in monitor["endpoints"]:
        assert service_ports[endpoint["port"]]["port"] == METRICS_PORT

    target = resources["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    claim = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == resources["PersistentVolumeClaim"]["metadata"]["name"]


def test_deployment_ports_probes_and_metrics_annotations():
    resources = k8s_resources()
    container = server_container(resources)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}
    # httpGet probes on the KServe v2 health endpoints, by the port's name.
    ready, live = "/v2/health/ready", "/v2/health/live"
    paths = {"startupProbe": ready, "readinessProbe": ready, "livenessProbe": live}
    for probe, path in paths.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, f"{probe} must GET {path}"
    service_ports = {port["name"]: port for port in resources["Service"]["spec"]["ports"]}
    assert (service_ports["http"]["port"], service_ports["http"]["targetPort"]) == (HTTP_PORT, "http")
    annotations = resources["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == METRICS_PORT
    assert any(m["mountPath"] == "/models" and m.get("readOnly") for m in container["volumeMounts"])
    assert container["resources"]["requests"]["cpu"], "the HPA's CPU utilisation needs a CPU request"


def test_termination_grace_period_covers_the_server_drain():
    """Kubernetes SIGKILLs after terminationGracePeriodSeconds, counted from the preStop
    hook: it must outlast the hook plus the server's own --grace-period."""
    resources = k8s_resources()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    container = server_container(resources)
    grace = float(container_env(container).get("ENSEMBLE_SERVER_GRACE_PERIOD", SERVER_DEFAULT_GRACE_PERIOD_S))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    # The KServe example and compose say the same.
    runtime_container = resources["ServingRuntime"]["spec"]["containers"][0]
    kserve_grace = float(container_env(runtime_container)["ENSEMBLE_SERVER_GRACE_PERIOD"])
    assert resources["InferenceService"]["spec"]["predictor"]["terminationGracePeriodSeconds"] > kserve_grace
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["server"]
    compose_grace = float(compose["environment"]["ENSEMBLE_SERVER_GRACE_PERIOD"])
    assert float(compose["stop_grace_period"].rstrip("s")) > compose_grace


def test_every_server_variable_used_in_deploy_exists():
    """ENSEMBLE_SERVER_* names in images, compose and manifests are real server flags:
    a renamed flag would otherwise be ignored silently."""
    known = server_environment_variables()
    assert "ENSEMBLE_SERVER_MODEL_REPOSITORY" in known
    files = [*DOCKERFILES, COMPOSE, DEPLOY / "healthcheck.py", DEPLOY / "smoke-test", *sorted(K8S.rglob("*.yaml"))]
    for path in files:
        unknown = ensemble_server_variables(path.read_text()) - known
        assert not unknown, f"{path.relative_to(ROOT)}: not server settings: {sorted(unknown)}"


# ---------------------------------------------------------------------------------------
# Compose, Prometheus and Grafana
# ---------------------------------------------------------------------------------------
def test_compose_wiring():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    server = services["server"]
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKERFILES[0]
    (volume,) = server["volumes"]
    assert volume["target"] == "/models" and volume["read_only"] is True
    assert {f"{port}:{port}" for port in (HTTP_PORT, GRPC_PORT, METRICS_PORT)} <= set(server["ports"])
    # The health check is deploy/healthcheck.py, which GETs /v2/health/ready (tests/test_deploy_images.py).
    assert server["healthcheck"]["test"] == ["CMD", "python3", "/opt/healthcheck.py"]
    # Every file compose mounts exists in the repository.
    for service in services.values():
        for mount in service.get("volumes", []):
            if isinstance(mount, str) and mount.startswith("./"):
                assert (DEPLOY / mount.split(":")[0]).exists(), mount

    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "ensemble-serving")
    assert job["static_configs"][0]["targets"] == [f"server:{METRICS_PORT}"]

    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/ensemble-serving.yml").read_text())
    dashboards_mount = next(m for m in services["grafana"]["volumes"] if m.startswith("./grafana/dashboards:"))
    assert provider["providers"][0]["options"]["path"] == dashboards_mount.split(":")[1]


def exported_metric_names() -> set[str]:
    """Every sample name the server can put on /metrics, from its real registry."""
    pytest.importorskip("prometheus_client")
    from server.observability.metrics import ServerMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in ServerMetrics().registry.collect()
            for suffix in suffixes[family.type]}  # fmt: skip


def dashboard_panels() -> list[dict]:
    return [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] != "row"]


def test_dashboard_queries_use_metrics_the_server_exports():
    exported = exported_metric_names()
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    for query in queries:
        used = set(re.findall(r"\bensemble_server_\w+", query))
        assert used, f"a query on none of the server's metrics: {query}"
        assert used <= exported, f"not exported by server/observability/metrics.py: {sorted(used - exported)} in {query}"


def test_dashboard_queries_are_valid_promql():
    promql = pytest.importorskip("promql_parser")
    queries = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    for query in queries:
        # Grafana fills $__rate_interval with a duration before Prometheus sees the query.
        promql.parse(query.replace("$__rate_interval", "1m"))
    with pytest.raises(ValueError):  # the parser does reject broken PromQL
        promql.parse("sum(rate(ensemble_server_requests_total[1m])")


def test_dashboard_shows_what_operators_need():
    panels = dashboard_panels()
    exprs = "\n".join(t["expr"] for p in panels for t in p["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, model) (rate(ensemble_server_request_duration_seconds_bucket" in exprs
    assert "rate(ensemble_server_requests_total" in exprs  # request rate
    assert 'outcome!="success"' in exprs  # failures by reason
    assert "ensemble_server_batch_size_bucket" in exprs
    assert "ensemble_server_pending_requests" in exprs  # queue depth
    assert "ensemble_server_model_execution_provider_info" in exprs
    # All panels read the provisioned data source, by its fixed uid.
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in panels} == {uid}
    all_panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in all_panels}) == len(all_panels), "panel ids must be unique"
