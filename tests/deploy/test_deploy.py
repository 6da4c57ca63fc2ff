"""deploy/ is checked by real linters (no cluster runs here): hadolint for the Dockerfile,
kubernetes-validate against the Kubernetes schemas for the manifests and the RayService's pod templates,
and the RayService's Serve config must build loom's Ray Serve app."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.33.0"


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def test_dockerfile_passes_hadolint():
    proc = subprocess.run(
        [BIN / "hadolint", "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_really_checking(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    proc = subprocess.run([BIN / "hadolint", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2 and "COPY --from=build" in text
    assert "USER 1000" in text and "HEALTHCHECK" in text and "/health" in text
    assert "whl/cpu" in text  # CPU torch


@pytest.mark.parametrize("name", sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")))
def test_manifest_passes_kubernetes_validate_strict(name):
    proc = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "-k", K8S_VERSION, str(DEPLOY / "k8s" / name)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "passed" in proc.stdout, proc.stdout + proc.stderr


def test_kubernetes_validate_rejects_a_broken_manifest():
    broken = copy.deepcopy(manifests()["deployment.yaml"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployment_has_probes_resources_and_disruption_and_scaling_policies():
    m = manifests()
    container = m["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert m["deployment.yaml"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert m["pdb.yaml"]["kind"] == "PodDisruptionBudget"
    assert m["hpa.yaml"]["spec"]["scaleTargetRef"]["name"] == m["deployment.yaml"]["metadata"]["name"]


def rayservice() -> dict:
    return yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())


def test_rayservice_pod_templates_pass_kubernetes_validate():
    # No schema for the RayService CRD here; its pod templates are core PodTemplateSpecs.
    cluster = rayservice()["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for i, group in enumerate(groups):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"g{i}"},
            "template": group["template"],
        }
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
        for container in group["template"]["spec"]["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_rayservice_serve_config_builds_the_loom_app():
    from ray.serve import Application

    from loom.serving.app import app_from_env

    config = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "loom.serving.app:app_from_env"
    built = app_from_env(app["args"])
    assert isinstance(built, Application)
