"""The chart as a platform team deploys it for production telephony (issue #17), asserted on the rendered
manifests of every CI value set: calls survive rollouts and drains, only public endpoints are routed,
secrets fail closed, tools and hosted APIs are reachable, capacity and drain settings reach the code,
models load, pods spread; and the values that would break any of it fail with a clear message."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "voice-platform"
PROFILES = ["default", "production", "minimal-cpu"]
PRIVATE = {"/", "/metrics", "/metrics/", "/ws", "/ws/channels", "/healthz", "/readyz"}
PRIVATE_RANGES = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}


def rendered(check: ModuleType, values: dict[str, Any] | None = None) -> list[Any]:
    return check.manifests(check.render(values or {}))


def profile(check: ModuleType, name: str) -> dict[str, Any]:
    return check.load_values(check.value_set_path(name))


def by_kind(objects: list[Any], kind: str) -> dict[str, dict[str, Any]]:
    return {m.name: m.obj for m in objects if m.kind == kind}


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod(deployment)["containers"][0]["env"]}


def gateway(objects: list[Any]) -> dict[str, Any]:
    return by_kind(objects, "Deployment")["voice-platform-gateway"]


@pytest.mark.parametrize("name", PROFILES)
def test_a_drain_outlasts_the_longest_call(check: ModuleType, name: str) -> None:
    values = profile(check, name)
    deployment = gateway(rendered(check, values))
    spec, env = pod(deployment), env_of(deployment)
    command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["voice-probe", "drain"]
    wait = int(command[command.index("--max-seconds") + 1])
    minimum = int(command[command.index("--min-seconds") + 1])
    max_call, drain = int(env["GATEWAY_MAX_CALL_SECONDS"]), int(env["GATEWAY_DRAIN_TIMEOUT_SECONDS"])
    assert max_call > 0, "a cap on every call is what lets a drain end them all"
    assert wait >= max_call + minimum, "preStop waits for a call that started just before the pod stopped"
    assert spec["terminationGracePeriodSeconds"] >= wait + 2 * drain + 10, "grace covers preStop, drain, uvicorn"
    gateway_values = {**yaml.safe_load((CHART / "values.yaml").read_text())["services"]["gateway"]}
    gateway_values.update(values.get("services", {}).get("gateway", {}))
    assert drain == gateway_values["drain"]["graceSeconds"], "drain.graceSeconds controls the gateway's drain"
    assert int(env["GATEWAY_MAX_SESSIONS"]) == gateway_values["maxSessions"] <= 100
    assert spec["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz", "503 while draining"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    if not values.get("secrets", {}).get("existingSecret"):
        assert "checksum/secrets" in annotations, "a changed chart Secret restarts the pods"


def test_production_disruption_budget_and_autoscaler_fit_each_other(check: ModuleType) -> None:
    objects = rendered(check, profile(check, "production"))
    pdb = by_kind(objects, "PodDisruptionBudget")["voice-platform-gateway"]["spec"]
    assert "minAvailable" not in pdb and pdb["maxUnavailable"] == "10%", "a tenth of 3-30 gateways at once"
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["voice-platform-gateway"]["spec"]
    target = next(m for m in hpa["metrics"] if m["type"] == "Pods")["pods"]["target"]["averageValue"]
    assert int(target) < int(env_of(gateway(objects))["GATEWAY_MAX_SESSIONS"])
    mesh = rendered(check, {"services": {"gateway": {"serviceMesh": {"sidecar": "disabled"}}}})
    template = gateway(mesh)["spec"]["template"]["metadata"]
    assert template["annotations"]["sidecar.istio.io/inject"] == "false"
    assert template["annotations"]["linkerd.io/inject"] == "disabled"
    assert template["labels"]["sidecar.istio.io/inject"] == "false"


@pytest.mark.parametrize("name", PROFILES)
def test_only_public_endpoints_are_routed(check: ModuleType, name: str) -> None:
    values = copy.deepcopy(profile(check, name))
    values.setdefault("services", {}).setdefault("gateway", {}).setdefault("ingress", {})["enabled"] = True
    ingress = by_kind(rendered(check, values), "Ingress")["voice-platform-gateway"]
    paths = {p["path"]: p["pathType"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    assert not PRIVATE & set(paths), paths
    assert not any(path.startswith(("/metrics", "/ws/channels")) for path in paths)
    for carrier in ("twilio", "telnyx", "plivo", "vonage", "exotel"):
        assert paths[f"/{carrier}"] == "Prefix"
    assert paths["/v1/chat/stream"] == "Exact" and paths["/api"] == "Prefix" and paths["/ws/pcm"] == "Prefix"
    assert "/ws-default" not in paths, "Retell's default path is never exposed"


def test_retell_is_routed_on_its_secret_path_read_from_the_secret(check: ModuleType) -> None:
    retell = {"enabled": True, "path": "r-7f3a9c"}
    values = {
        "secrets": {"values": {"OBFUSCATED_WS_PATH": "r-7f3a9c"}},
        "services": {"gateway": {"ingress": {"enabled": True, "expose": {"retell": retell}}}},
    }
    objects = rendered(check, values)
    paths = [
        p["path"]
        for r in by_kind(objects, "Ingress")["voice-platform-gateway"]["spec"]["rules"]
        for p in r["http"]["paths"]
    ]
    assert "/r-7f3a9c" in paths
    ref = env_of(gateway(objects))["OBFUSCATED_WS_PATH"]["secretKeyRef"]
    assert ref == {"name": "voice-platform-secrets", "key": "OBFUSCATED_WS_PATH", "optional": False}
    route = {
        "enabled": True,
        "parentRefs": [{"name": "public", "namespace": "gateways"}],
        "hostnames": ["v.example.com"],
    }
    values["services"]["gateway"]["httpRoute"] = route
    http_route = by_kind(rendered(check, values), "HTTPRoute")["voice-platform-gateway"]["spec"]
    matched = {m["path"]["value"] for r in http_route["rules"] for m in r["matches"]}
    assert "/r-7f3a9c" in matched and "/twilio" in matched and not PRIVATE & matched
    assert "v.example.com" in env_of(gateway(rendered(check, values)))["GATEWAY_ALLOWED_HOSTS"].split(",")


@pytest.mark.parametrize("name", PROFILES)
def test_secrets_fail_closed(check: ModuleType, name: str) -> None:
    values = profile(check, name)
    objects = rendered(check, values)
    required, optional = set(), set()
    for deployment in by_kind(objects, "Deployment").values():
        for value in env_of(deployment).values():
            ref = value.get("secretKeyRef") if isinstance(value, dict) else None
            if ref:
                (optional if ref["optional"] else required).add(ref["key"])
    assert {"GATEWAY_API_KEYS", "GATEWAY_TOKEN_SECRET", "TWILIO_AUTH_TOKEN"} <= required
    assert optional <= {"TELNYX_PUBLIC_KEY", "PLIVO_AUTH_TOKEN", "VONAGE_SIGNATURE_SECRET", "LLM_API_KEY"}
    secret = by_kind(objects, "Secret").get("voice-platform-secrets")
    if values.get("secrets", {}).get("existingSecret"):
        assert secret is None
        annotations = by_kind(objects, "Deployment")["voice-platform-gateway"]["metadata"]["annotations"]
        assert annotations["secret.reloader.stakater.com/reload"] == values["secrets"]["existingSecret"]
    else:
        assert required <= set(secret["stringData"]), "every required key exists, so pods start"
        notes = check.render(values)["voice-platform/templates/NOTES.txt"]
        assert "WARNING: secret GATEWAY_API_KEYS is empty" in notes


@pytest.mark.parametrize("name", PROFILES)
def test_tools_reach_the_internet_but_not_private_ranges(check: ModuleType, name: str) -> None:
    policies = by_kind(rendered(check, profile(check, name)), "NetworkPolicy")
    blocks = [
        p["ipBlock"]
        for r in policies["voice-platform-gateway"]["spec"]["egress"]
        for p in r.get("to", [])
        if "ipBlock" in p
    ]
    assert blocks and blocks[0]["cidr"] == "0.0.0.0/0" and PRIVATE_RANGES <= set(blocks[0]["except"])
    llm = policies["voice-platform-llm"]["spec"]["egress"]
    assert not any("ipBlock" in p for r in llm for p in r.get("to", [])), "the LLM worker's internet egress is opt-in"
    hosted = {"services": {"llm": {"networkPolicy": {"internetEgress": {"enabled": True, "ports": [443]}}}}}
    llm = by_kind(rendered(check, hosted), "NetworkPolicy")["voice-platform-llm"]["spec"]["egress"]
    rule = next(r for r in llm if any("ipBlock" in p for p in r.get("to", [])))
    assert rule["ports"] == [{"port": 443, "protocol": "TCP"}]
    tools = {
        "services": {"gateway": {"tools": {"allowedNetworks": ["10.20.0.0/16"], "allowedHosts": ["crm.internal"]}}}
    }
    objects = rendered(check, tools)
    env = env_of(gateway(objects))
    assert (
        env["GATEWAY_TOOL_ALLOWED_NETWORKS"] == "10.20.0.0/16" and env["GATEWAY_TOOL_ALLOWED_HOSTS"] == "crm.internal"
    )
    egress = by_kind(objects, "NetworkPolicy")["voice-platform-gateway"]["spec"]["egress"]
    assert any(p.get("ipBlock") == {"cidr": "10.20.0.0/16"} for r in egress for p in r.get("to", []))


@pytest.mark.parametrize("name", PROFILES)
def test_pods_spread_over_nodes_and_zones(check: ModuleType, name: str) -> None:
    values = profile(check, name)
    for deployment_name, deployment in by_kind(rendered(check, values), "Deployment").items():
        spec = pod(deployment)
        keys = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
        assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= set(keys), deployment_name
        assert keys["kubernetes.io/hostname"]["matchLabelKeys"] == ["pod-template-hash"]
        assert spec["affinity"]["podAntiAffinity"], deployment_name
        if name == "production" and deployment_name.endswith(("gateway", "stt", "tts")):
            assert keys["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule", deployment_name
            assert spec["priorityClassName"] == "voice-critical"


def test_gpu_pods_check_their_models_and_get_runtime_class_and_shm(check: ModuleType) -> None:
    deployments = by_kind(rendered(check, profile(check, "production")), "Deployment")
    for name in ("voice-platform-stt", "voice-platform-tts"):
        spec = pod(deployments[name])
        assert spec["runtimeClassName"] == "nvidia"
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in spec["volumes"]
        init = spec["initContainers"][0]
        assert init["name"] == "check-models" and "lacks:" in init["args"][0] and "exit 1" in init["args"][0]
        assert not any("persistentVolumeClaim" in v and "create" in str(v) for v in spec["volumes"])
    from_image = {
        "services": {
            "stt": {
                "models": {
                    "enabled": True,
                    "mountPath": "/models",
                    "image": {"repository": "acme/whisper-models", "tag": "v3"},
                }
            }
        }
    }
    objects = rendered(check, from_image)
    assert not by_kind(objects, "PersistentVolumeClaim"), "no empty ReadOnlyMany claim any more"
    spec = pod(by_kind(objects, "Deployment")["voice-platform-stt"])
    init = spec["initContainers"][0]
    assert init["image"] == "acme/whisper-models:v3" and init["args"][0].startswith("cp -R /models/. /models-volume/")
    assert next(v for v in spec["volumes"] if v["name"] == "models")["emptyDir"]["sizeLimit"] == "20Gi"
    assert check.check_policies(objects) == []


def test_identity_digests_telemetry_and_monitoring(check: ModuleType) -> None:
    objects = rendered(check, profile(check, "production"))
    assert set(by_kind(objects, "ServiceAccount")) == {"voice-platform"}
    assert all(pod(d)["serviceAccountName"] == "voice-platform" for d in by_kind(objects, "Deployment").values())
    attributes = env_of(gateway(objects))["OTEL_RESOURCE_ATTRIBUTES"]
    assert "service.version=0.1.0" in attributes and "deployment.environment=production" in attributes
    rules = by_kind(objects, "PrometheusRule")["voice-platform"]["spec"]
    assert rules == yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    dashboard = by_kind(objects, "ConfigMap")["voice-platform-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["voice-platform.json"])["uid"] == "voice-platform"
    digest = "sha256:" + "a" * 64
    pinned = rendered(check, {"services": {"gateway": {"image": {"digest": digest}}}})
    assert pod(gateway(pinned))["containers"][0]["image"] == f"voice-platform/gateway:0.1.0@{digest}"


def test_chart_copies_of_the_alerts_and_dashboard_match_the_originals() -> None:
    """Helm reads only files inside the chart: files/ holds copies, kept equal here."""
    assert (CHART / "files" / "alerts.yaml").read_bytes() == (ROOT / "deploy/prometheus/alerts.yaml").read_bytes()
    assert (CHART / "files" / "voice-platform.json").read_bytes() == (
        ROOT / "deploy/grafana/voice-platform.json"
    ).read_bytes()


def test_helm_test_places_a_real_call(check: ModuleType) -> None:
    test = next(m for m in rendered(check) if m.name == "voice-platform-test-call").obj["spec"]["containers"][0]
    script = test["args"][0]
    assert "voicectl call --dialect twilio" in script and "--url http://voice-platform-gateway:8000" in script
    assert "awk '/^heard:/ { exit !($2 > 0) }'" in script, "passes only when the caller heard the agent"


GATEWAY_INGRESS = {"enabled": True, "hosts": [{"host": "voice.example.com"}]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"services": {"gateway": {"autoscaling": {"hpa": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}}}},
            "autoscaling.hpa.minReplicas=5 is above maxReplicas=3",
        ),
        (
            {"services": {"stt": {"autoscaling": {"keda": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}}}},
            "autoscaling.keda.minReplicas=4 is above maxReplicas=2",
        ),
        ({"services": {"tts": {"replicas": 0}}}, "at '/services/tts/replicas': minimum: got 0, want 1"),
        ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem=false is refused"),
        (
            {"containerSecurityContext": {"capabilities": {"add": ["NET_ADMIN"]}}},
            "at '/containerSecurityContext/capabilities/add'",
        ),
        (
            {"containerSecurityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
            "at '/containerSecurityContext/capabilities/drop'",
        ),
        (
            {"secrets": {"existingSecret": "mine", "values": {"GATEWAY_API_KEYS": "k"}}},
            "secrets.values.GATEWAY_API_KEYS is set beside secrets.existingSecret",
        ),
        ({"services": {"gateway": {"maxCallSeconds": 0}}}, "at '/services/gateway/maxCallSeconds'"),
        (
            {"services": {"gateway": {"maxCallSeconds": 1800}}},
            "drain.waitForSessionsSeconds=905 is shorter than maxCallSeconds + preStopSeconds = 1805",
        ),
        (
            {"services": {"gateway": {"terminationGracePeriodSeconds": 960}}},
            "terminationGracePeriodSeconds=960 is shorter than the drain",
        ),
        (
            {
                "services": {
                    "gateway": {"ingress": {"annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600"}}}
                }
            },
            "proxy-read-timeout=600 is shorter than maxCallSeconds=900",
        ),
        (
            {"services": {"gateway": {"ingress": {**GATEWAY_INGRESS, "extraPaths": ["/metrics"]}}}},
            'ingress.extraPaths "/metrics" would expose',
        ),
        (
            {"services": {"gateway": {"ingress": {**GATEWAY_INGRESS, "expose": {"retell": {"enabled": True}}}}}},
            "ingress.expose.retell.enabled needs ingress.expose.retell.path",
        ),
        (
            {
                "services": {
                    "gateway": {"ingress": {**GATEWAY_INGRESS, "expose": {"retell": {"enabled": True, "path": "abc"}}}}
                }
            },
            "must equal secrets.values.OBFUSCATED_WS_PATH",
        ),
        (
            {"services": {"stt": {"models": {"enabled": True, "claimName": "voice-models"}}}},
            "needs models.requiredFiles",
        ),
        (
            {"services": {"stt": {"models": {"enabled": True, "create": {"size": "10Gi"}}}}},
            "additional properties 'create'",
        ),
        (
            {
                "services": {
                    "gateway": {
                        "autoscaling": {
                            "hpa": {"enabled": True, "activeSessions": {"enabled": True, "averageValue": 150}}
                        }
                    }
                },
                "metricsAdapter": {"enabled": True},
            },
            "averageValue=150 is above maxSessions=100",
        ),
        (
            {"services": {"stt": {"pdb": {"enabled": True, "minAvailable": 1, "maxUnavailable": 1}}}},
            "pdb takes minAvailable or maxUnavailable, not both",
        ),
        ({"services": {"gateway": {"httpRoute": {"enabled": True}}}}, "parentRefs"),
        (
            {"capabilities": {"strict": True}, "services": {"tts": {"autoscaling": {"keda": {"enabled": True}}}}},
            "needs the keda.sh/v1alpha1/ScaledObject API, which this cluster does not serve",
        ),
    ],
    ids=[
        "hpa-min-above-max",
        "keda-min-above-max",
        "zero-replicas",
        "writable-root",
        "added-capability",
        "not-dropping-all",
        "secret-values-beside-existing",
        "no-call-cap",
        "prestop-shorter-than-call",
        "grace-shorter-than-drain",
        "ingress-timeout-below-call",
        "metrics-exposed",
        "retell-without-path",
        "retell-path-not-the-secret",
        "claim-without-check",
        "empty-rox-claim",
        "hpa-target-above-capacity",
        "pdb-both",
        "route-without-parent",
        "keda-without-crds",
    ],
)
def test_unsafe_values_fail_with_a_clear_message(check: ModuleType, values: dict[str, Any], message: str) -> None:
    with pytest.raises(check.ChartError) as failure:
        check.render(values)
    assert message in str(failure.value)


def test_policies_catch_a_cut_drain_an_open_secret_and_an_exposed_path(check: ModuleType) -> None:
    objects = rendered(check, profile(check, "production"))
    assert check.check_policies(objects) == []
    broken = copy.deepcopy(objects)
    deployment = next(m for m in broken if m.kind == "Deployment" and m.name == "voice-platform-gateway")
    container = pod(deployment.obj)["containers"][0]
    container["lifecycle"]["preStop"]["exec"]["command"][-1] = "600"
    next(e for e in container["env"] if e["name"] == "TWILIO_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]["optional"] = (
        True
    )
    ingress = next(m for m in broken if m.kind == "Ingress")
    ingress.obj["spec"]["rules"][0]["http"]["paths"][0]["path"] = "/"
    errors = "\n".join(check.check_policies(broken))
    assert "preStop waits at most 600 s, less than the longest call" in errors
    assert "TWILIO_AUTH_TOKEN is an optional secretKeyRef" in errors
    assert "routes '/', which must stay internal" in errors
