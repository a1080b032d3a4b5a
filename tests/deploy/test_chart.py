"""The Helm chart: the CI value sets render, lint and validate; mistakes fail with a clear message."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from voice_bus.catalog import SERVICES

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "voice-platform"


def rendered(check: ModuleType, values: dict[str, Any] | None = None) -> list[Any]:
    return check.manifests(check.render(values or {}))


def by_kind(objects: list[Any], kind: str) -> dict[str, dict[str, Any]]:
    return {m.name: m.obj for m in objects if m.kind == kind}


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("value_set", ["default", "production", "minimal-cpu"])
def test_value_set_renders_lints_and_validates(check: ModuleType, value_set: str) -> None:
    values = check.load_values(check.value_set_path(value_set))
    assert check.lint(values) == []
    report = check.validate_values(value_set, values)
    assert report.errors == []
    assert report.objects > 10
    objects = rendered(check, values)
    kinds = {m.kind for m in objects}
    assert {"Deployment", "Service", "NetworkPolicy", "ConfigMap"} <= kinds
    gateway_env = env_of(by_kind(objects, "Deployment")["voice-platform-gateway"])
    assert not gateway_env.get("GATEWAY_OPEN_ROUTES") and gateway_env.get("GATEWAY_TRUSTED_NETWORK") != "true"


def test_default_is_the_embedded_cpu_stack(check: ModuleType) -> None:
    objects = rendered(check)
    deployments = by_kind(objects, "Deployment")
    assert sorted(deployments) == [f"voice-platform-{s}" for s in ("gateway", "llm", "llm-backend", "stt", "tts")]
    assert not by_kind(objects, "ScaledObject") and not by_kind(objects, "HorizontalPodAutoscaler")
    for name, deployment in deployments.items():
        assert not any(
            "nvidia.com/gpu" in str(c["resources"]) for c in deployment["spec"]["template"]["spec"]["containers"]
        )
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name

    gateway = deployments["voice-platform-gateway"]
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["lifecycle"]["preStop"]["exec"]["command"][:2] == ["voice-probe", "drain"]
    env = env_of(gateway)
    assert env["GATEWAY_DEFAULT_AGENT_FILE"] == "/etc/voice/agents/default.json"
    assert env["GATEWAY_API_KEYS"]["secretKeyRef"]["name"] == "voice-platform-secrets"
    assert env["GATEWAY_OPEN_CHANNELS"] == "false", "sessions' channels need a token or key by default"
    assert env["GATEWAY_OPEN_ROUTES"] == "" and env["GATEWAY_TRUSTED_NETWORK"] == "false", "keys stay required"
    assert env["GATEWAY_HOST"] == "0.0.0.0", "so the gateway itself would refuse open routes"
    agents = by_kind(objects, "ConfigMap")["voice-platform-agents"]
    assert json.loads(agents["data"]["default.json"])["id"] == "default"

    for service, port in (("stt", 50051), ("llm", 50052), ("tts", 50053)):
        worker = deployments[f"voice-platform-{service}"]
        container = worker["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (service, probe)
        env = env_of(worker)
        assert env["GRPC_PORT"] == str(port)
        assert env[f"{service.upper()}_CONCURRENCY"]
        assert int(env["DRAIN_GRACE_SECONDS"]) < worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert env["NATS_URL"] == "nats://nats.nats.svc.cluster.local:4222"
        assert (env["NATS_STREAM_REPLICAS"], env["NATS_WORK_STORAGE"]) == ("1", "memory")
    assert env_of(deployments["voice-platform-llm"])["LLM_BASE_URL"] == "http://voice-platform-llm-backend:8080/v1"


def test_production_runs_on_gpus_with_keda_and_three_replicas(check: ModuleType) -> None:
    objects = rendered(check, check.load_values(check.value_set_path("production")))
    deployments = by_kind(objects, "Deployment")
    scaled = by_kind(objects, "ScaledObject")
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    assert "voice-platform-llm-backend" not in deployments
    assert set(scaled) == {"voice-platform-stt", "voice-platform-llm", "voice-platform-tts"}
    assert set(hpas) == {"voice-platform-gateway"}
    metrics = hpas["voice-platform-gateway"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    assert metrics[1]["pods"]["metric"]["name"] == "voice_gateway_active_sessions"
    for name in ("voice-platform-stt", "voice-platform-tts"):
        pod = deployments[name]["spec"]["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] and pod["tolerations"]
        assert any(v.get("persistentVolumeClaim", {}).get("readOnly") for v in pod["volumes"])
    for name in ("voice-platform-gateway", "voice-platform-stt", "voice-platform-llm", "voice-platform-tts"):
        assert env_of(deployments[name])["NATS_STREAM_REPLICAS"] == "3", name
    for name, obj in scaled.items():
        assert obj["spec"]["minReplicaCount"] == 3, name
        assert "replicas" not in deployments[name]["spec"]
        trigger = obj["spec"]["triggers"][0]
        assert trigger["type"] == "nats-jetstream"
        assert trigger["metadata"]["natsServerMonitoringEndpoint"] == "nats-headless.nats.svc.cluster.local:8222"
    assert hpas["voice-platform-gateway"]["spec"]["minReplicas"] == 3
    ingress = by_kind(objects, "Ingress")["voice-platform-gateway"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert not by_kind(objects, "Secret"), "existingSecret: the chart creates none"
    assert set(by_kind(objects, "ServiceMonitor")) == {f"voice-platform-{s}" for s in ("gateway", "stt", "llm", "tts")}
    pdbs = by_kind(objects, "PodDisruptionBudget")
    assert pdbs.pop("voice-platform-gateway")["spec"]["maxUnavailable"] == "10%", "scales with the HPA"
    for pdb in pdbs.values():
        assert pdb["spec"]["maxUnavailable"] == 1
    # The gateway admits the ingress controller, the release's own pods (helm test) and Prometheus.
    sources = [rule["from"] for rule in by_kind(objects, "NetworkPolicy")["voice-platform-gateway"]["spec"]["ingress"]]
    peers = [peer for rule in sources for peer in rule]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "voice-platform"}}} in peers
    assert len(sources) == 3


def test_agent_file_is_optional(check: ModuleType) -> None:
    objects = rendered(check, {"agents": {"default": None}})
    assert "GATEWAY_DEFAULT_AGENT_FILE" not in env_of(by_kind(objects, "Deployment")["voice-platform-gateway"])
    assert not by_kind(objects, "ConfigMap")
    objects = rendered(check, {"agents": {"existingConfigMap": "my-agents"}})
    assert not by_kind(objects, "ConfigMap")
    volumes = by_kind(objects, "Deployment")["voice-platform-gateway"]["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "agents",
        "configMap": {"name": "my-agents", "items": [{"key": "default.json", "path": "default.json"}]},
    } in volumes


def test_keda_triggers_name_the_bus_streams_and_consumers(check: ModuleType) -> None:
    """The values' stream and consumer names are those of libs/bus/voice_bus/catalog.py."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    workers = {k: v for k, v in values["services"].items() if v["role"] == "worker"}
    assert set(workers) == set(SERVICES)
    for name, service in workers.items():
        assert service["bus"] == {"stream": SERVICES[name].stream, "consumer": SERVICES[name].durable}
    all_keda = {"services": {name: {"autoscaling": {"keda": {"enabled": True}}} for name in workers}}
    scaled = by_kind(rendered(check, all_keda), "ScaledObject")
    for name, service in workers.items():
        metadata = scaled[f"voice-platform-{name}"]["spec"]["triggers"][0]["metadata"]
        assert (metadata["stream"], metadata["consumer"]) == (SERVICES[name].stream, SERVICES[name].durable)
        assert metadata["lagThreshold"] == str(service["concurrency"]), "default target: the worker's slots"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"services": {"stt": {"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}}}},
            "services.stt: autoscaling.hpa.enabled and autoscaling.keda.enabled are both true",
        ),
        ({"services": {"tts": {"image": {"tag": None}}}}, "at '/services/tts/image': missing property 'tag'"),
        ({"services": {"tts": {"image": {"tag": ""}}}}, "at '/services/tts/image/tag': minLength"),
        ({"services": {"llm": {"image": {"tag": "latest"}}}}, 'services.llm: image.tag "latest" is not allowed'),
        ({"services": {"stt": {"replicas": -1}}}, "at '/services/stt/replicas': minimum: got -1, want 1"),
        ({"services": {"stt": {"replicaCount": 2}}}, "at '/services/stt': additional properties 'replicaCount'"),
        ({"services": {"stt": {"autoscaling": {"keda": {"enabled": True, "minReplicas": 0}}}}}, "minReplicas"),
        ({"services": {"gateway": {"terminationGracePeriodSeconds": 30}}}, "shorter than the drain"),
        ({"services": {"gateway": {"autoscaling": {"keda": {"enabled": True}}}}}, "a gateway has no consumer"),
        (
            {"services": {"gateway": {"autoscaling": {"hpa": {"activeSessions": {"enabled": True}}}}}},
            "needs a metrics adapter",
        ),
        ({"nats": {"monitoringEndpoint": "http://nats:8222"}}, "at '/nats/monitoringEndpoint'"),
        ({"nats": {"streamReplicas": 7}}, "at '/nats/streamReplicas'"),
        ({"services": {"stt": {"models": {"enabled": True}}}}, "models.enabled needs models.image.repository"),
    ],
    ids=[
        "both-autoscalers",
        "missing-tag",
        "empty-tag",
        "latest-tag",
        "negative-replicas",
        "unknown-key",
        "keda-scale-to-zero",
        "grace-shorter-than-drain",
        "keda-on-gateway",
        "sessions-without-adapter",
        "monitoring-url-with-scheme",
        "stream-replicas-above-5",
        "models-without-source",
    ],
)
def test_mistakes_fail_with_a_clear_message(check: ModuleType, values: dict[str, Any], message: str) -> None:
    with pytest.raises(check.ChartError) as failure:
        check.render(values)
    assert message in str(failure.value)
    if message.startswith("at '"):
        # helm lint checks the schema; a template's `fail` only stops rendering (lint merely logs it).
        assert any(message in problem for problem in check.lint(values))


def test_bad_values_file_fails_the_make_target(check: ModuleType, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("services:\n  stt:\n    replicas: -3\n")
    assert check.main(["validate", "--values", str(bad)]) == 1
    assert "at '/services/stt/replicas': minimum: got -3, want 1" in capsys.readouterr().out
    good = tmp_path / "good-values.yaml"
    good.write_text("services:\n  stt:\n    replicas: 2\n")
    assert check.main(["lint", "validate", "--values", str(good)]) == 0


def test_policies_catch_what_the_schema_cannot(check: ModuleType) -> None:
    objects = rendered(check, {"services": {"stt": {"replicas": 2}}})
    stt = next(m for m in objects if m.kind == "Deployment" and m.name == "voice-platform-stt")
    assert check.check_policies(objects) == []

    broken = copy.deepcopy(objects)
    pod = next(m for m in broken if m.name == stt.name and m.kind == "Deployment").obj["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["image"] = "voice-platform/stt"
    del container["resources"]["limits"]["memory"]
    del container["livenessProbe"]
    container["securityContext"]["runAsNonRoot"] = False
    container["securityContext"]["readOnlyRootFilesystem"] = False
    errors = "\n".join(check.check_policies(broken))
    for expected in (
        "has no tag",
        "resources.limits.memory is missing",
        "livenessProbe is missing",
        "runAsNonRoot is not true",
        "readOnlyRootFilesystem is not true",
    ):
        assert expected in errors

    broken = copy.deepcopy(objects)
    broken = [m for m in broken if not (m.kind == "PodDisruptionBudget" and m.name == stt.name)]
    assert any("no PodDisruptionBudget" in e for e in check.check_policies(broken))


def test_one_autoscaler_per_deployment_and_keda_on_a_headless_service(check: ModuleType) -> None:
    objects = rendered(check, {"services": {"tts": {"autoscaling": {"keda": {"enabled": True}}}}})
    assert check.check_policies(objects) == []
    scaled = next(m for m in objects if m.kind == "ScaledObject")
    hpa = copy.deepcopy(scaled)
    hpa.obj = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "extra"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": scaled.name}, "minReplicas": 1, "maxReplicas": 2},
    }
    assert any("more than one autoscaler" in e for e in check.check_policies([*objects, hpa]))

    trigger = scaled.obj["spec"]["triggers"][0]["metadata"]
    trigger["natsServerMonitoringEndpoint"] = "nats.nats.svc.cluster.local:8222"
    assert any("is not a headless Service" in e for e in check.check_custom(objects))
    trigger["natsServerMonitoringEndpoint"] = "nats-headless.nats.svc.cluster.local:8222"
    trigger["stream"] = "VOICE_TTS_TYPO"
    assert any("not a work queue of voice_bus.catalog" in e for e in check.check_custom(objects))


def test_schema_notes_name_the_custom_resources_skipped(check: ModuleType) -> None:
    objects = rendered(check, check.load_values(check.value_set_path("production")))
    errors, notes = check.validate_schemas(objects)
    assert errors == []
    assert notes and all("custom resource" in note for note in notes)
    assert {n.split("/")[0] for n in notes} == {"ScaledObject", "ServiceMonitor", "PrometheusRule"}


def test_helm_tests_push_requests_through_the_bus(check: ModuleType) -> None:
    objects = rendered(check)
    tests = [m for m in objects if m.is_test]
    assert {m.name for m in tests} == {
        "voice-platform-test-bus",
        "voice-platform-test-gateway",
        "voice-platform-test-call",
    }
    bus = next(m for m in tests if m.name == "voice-platform-test-bus").obj["spec"]["containers"][0]
    script = bus["args"][0]
    assert "voicectl --timeout 120 tts" in script and " stt /tmp/hello.wav" in script and " llm " in script
    assert bus["image"] == "voice-platform/gateway:0.1.0"
    without_llm = rendered(check, {"services": {"llm": {"enabled": False}, "llmBackend": {"enabled": False}}})
    script = next(m for m in without_llm if m.name == "voice-platform-test-bus").obj["spec"]["containers"][0]["args"][0]
    assert " llm " not in script


def test_tilt_dev_values_render_with_tilts_images(check: ModuleType) -> None:
    """deploy/tilt/values-dev.yaml (the Tiltfile's k8s mode) renders, and every image it deploys is one
    the Tiltfile builds, so that Tilt can substitute its own builds."""
    root = CHART.parents[2]
    values = check.load_values(root / "deploy" / "tilt" / "values-dev.yaml")
    objects = rendered(check, values)
    errors, _ = check.validate_schemas(objects)
    assert errors == []
    policies = [e for e in check.check_policies(objects) if "readOnlyRootFilesystem" not in e]
    assert policies == []
    assert not any(m.is_test for m in objects)
    tiltfile = (root / "Tiltfile").read_text()
    images = {
        c["image"].split(":")[0]
        for m in objects
        if m.kind == "Deployment"
        for c in m.obj["spec"]["template"]["spec"]["containers"]
    }
    assert images == {f"voice-platform/{name}" for name in ("gateway", "stt", "llm", "tts", "llm-backend")}
    assert "'voice-platform/%s' % service" in tiltfile and "'voice-platform/llm-backend'" in tiltfile
    assert "k8s_yaml(helm(" in tiltfile and "deploy/tilt/values-dev.yaml" in tiltfile
    assert "VOICE_TILT_MODE" in tiltfile and "serve_cmd='.venv/bin/voicectl nats'" in tiltfile


def test_every_optional_feature_at_once_lints_and_validates(check: ModuleType) -> None:
    """The production profile with every opt-in of issue #17 on: Kubernetes schemas and policies hold."""
    values = check.load_values(check.value_set_path("production"))
    gateway = values["services"]["gateway"]
    gateway["image"] = {"repository": "voice-platform/gateway", "tag": "0.1.0", "digest": "sha256:" + "b" * 64}
    gateway["serviceMesh"] = {"sidecar": "disabled"}
    gateway["tools"] = {"allowedNetworks": ["10.20.0.0/16"], "allowedHosts": ["crm.internal"]}
    gateway["ingress"]["expose"] = {"realtime": True, "retell": {"enabled": True, "path": "r-secret"}}
    gateway["httpRoute"] = {"enabled": True, "parentRefs": [{"name": "public"}], "hostnames": ["voice.example.com"]}
    values["services"]["llm"]["networkPolicy"]["internetEgress"] = {"enabled": True, "ports": [443]}
    values["services"]["stt"]["models"] = {
        "enabled": True,
        "mountPath": "/models",
        "image": {"repository": "voice-platform/stt-models", "tag": "large-v3-turbo"},
        "sizeLimit": "8Gi",
    }
    values["serviceAccount"] = {"create": True, "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/v"}}
    assert check.lint(values) == []
    report = check.validate_values("everything", values)
    assert report.errors == []
    kinds = {m.kind for m in rendered(check, values)}
    assert {"HTTPRoute", "PrometheusRule", "ServiceAccount", "Ingress", "ScaledObject"} <= kinds
