"""The kustomize bases next to the chart (manifests/): built by `kubectl kustomize`,
valid Kubernetes 1.29-1.33, and consistent with the chart's defaults."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BASES = ["namespace", "minio", "kubeflow-rbac"]
CHART_VALUES = yaml.safe_load((REPO / "charts" / "fedllm-federation" / "values.yaml").read_text())

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl for `kubectl kustomize`")


def build(base: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "manifests" / base)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("base", BASES)
def test_base_builds_to_valid_objects(base):
    objects = build(base)
    assert objects
    for version in ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def test_minio_matches_what_the_chart_expects():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in build("minio")}
    s3 = CHART_VALUES["s3"]
    secret = objects[("Secret", s3["credentialsSecret"])]
    assert sorted(secret["data"]) == sorted([s3["accessKeyIdKey"], s3["secretAccessKeyKey"]])
    deployment = objects[("Deployment", "minio")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert CHART_VALUES["networkPolicy"]["s3PodSelector"].items() <= labels.items()
    service = objects[("Service", "minio")]
    assert f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}" == s3["endpoint"]
    assert all(o["metadata"]["namespace"] == "fedllm" for o in objects.values())


def test_kubeflow_pipeline_may_read_only_the_admin_kit():
    from fedllm.deploy.provision import secret_name

    objects = {o["kind"]: o for o in build("kubeflow-rbac")}
    secret_rules = [r for r in objects["Role"]["rules"] if "secrets" in r["resources"]]
    assert secret_rules == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret_name(CHART_VALUES, "fedllm", "admin")], "verbs": ["get"]}
    ]
    subject = objects["RoleBinding"]["subjects"][0]
    assert (subject["kind"], subject["name"]) == ("ServiceAccount", "pipeline-runner")
    port = objects["NetworkPolicy"]["spec"]["ingress"][0]["ports"][0]["port"]
    assert port == CHART_VALUES["server"]["adminPort"]
