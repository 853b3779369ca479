"""The fedllm-federation chart, rendered by Helm's own Go SDK (helm-python-sdk), no cluster.

For the default values and every ci/*-values.yaml: `helm lint --strict` is clean, every
object is valid under kubernetes-validate --strict for Kubernetes 1.29-1.33 (Kueue's
objects under Kueue's own CRD schema, tests/schemas/kueue/, as strictly), and the
chart's promises hold: GPUs requested, locked-down pods, no secret material outside
Secrets, labels on every object, least-privilege RBAC only with launcher k8s, and with
kueue.enabled one Kueue pod group of the server and all sites.
"""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "fedllm-federation"
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
VALUE_SETS = [None, *CI_FILES]
KUBE_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
POD_KINDS = ("Deployment", "Pod")
# The openAPIV3Schema of each Kueue CRD version the chart renders (see tests/schemas/kueue/README.md).
KUEUE_SCHEMAS = {("kueue.x-k8s.io/v1beta2", "LocalQueue"): Path(__file__).parent / "schemas" / "kueue" / "localqueue-v1beta2.json"}


def strict(schema):
    """A CRD schema as the API server applies it under `--validate=strict`: an unknown field
    is an error (a structural schema otherwise prunes it), unless the schema keeps unknown
    fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({name: strict(s) for name, s in v.items()} if k == "properties" else strict(v)) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validate(obj: dict, version: str) -> None:
    """kubernetes-validate --strict for core objects; a Kueue object under its CRD's schema,
    its metadata as Kubernetes' ObjectMeta. Raises on any error."""
    if not obj["apiVersion"].startswith("kueue.x-k8s.io/"):
        kubernetes_validate.validate(obj, version, strict=True)
        return
    schema_file = KUEUE_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    assert schema_file, f"{obj['apiVersion']} {obj['kind']}: no Kueue CRD schema vendored under tests/schemas/kueue/"
    jsonschema.Draft7Validator(strict(json.loads(schema_file.read_text()))).validate(obj)
    # CRD schemas leave metadata to the API server, which checks it as any object's ObjectMeta.
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, version, strict=True)


def values_of(path: Path | None) -> dict | None:
    return yaml.safe_load(path.read_text()) if path else None


def render(values: dict | None, release: str = "demo") -> list[dict]:
    manifests = helm.Chart.load(str(CHART)).render(values, name=release, namespace="fl")
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def effective(path: Path | None) -> dict:
    """Chart defaults overlaid with the values file, as Helm merges them."""
    from fedllm.deploy.provision import load_values

    if path is None:
        return yaml.safe_load((CHART / "values.yaml").read_text())
    return load_values(path, CHART)


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj["spec"]


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def ids(p):
    return p.name if p else "defaults"


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_helm_lint_strict_is_clean(values_file):
    report = helm.lint(str(CHART), values_of(values_file), strict=True, namespace="fl", kube_version="v1.29.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_every_object_is_valid_kubernetes_1_29_to_1_33(values_file):
    objects = render(values_of(values_file))
    assert objects
    for version in KUBE_VERSIONS:
        for obj in objects:
            validate(obj, version)


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_sites_get_their_gpus_where_training_runs(values_file):
    values = effective(values_file)
    objects = render(values_of(values_file))
    deployments = {d["metadata"]["labels"].get("fedllm.io/site"): d for d in by_kind(objects, "Deployment")}
    for site in values["sites"]:
        resources = pod_spec(deployments[site["name"]])["containers"][0].get("resources", {})
        gpus = site.get("gpus", 0)
        if values["launcher"] == "process" and gpus:
            assert resources["requests"]["nvidia.com/gpu"] == gpus
            assert resources["limits"]["nvidia.com/gpu"] == gpus
        else:  # CPU-only site, or launcher k8s: the job pods ask for the GPUs
            assert "nvidia.com/gpu" not in resources.get("requests", {})
            assert "nvidia.com/gpu" not in resources.get("limits", {})


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_pods_are_locked_down(values_file):
    objects = render(values_of(values_file))
    pods = [o for o in objects if o["kind"] in POD_KINDS]
    assert pods
    for obj in pods:
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts_by_volume = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert "/tmp" in writable
            for name in writable.values():  # every writable path is scratch, not the image
                assert "emptyDir" in mounts_by_volume[name]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_rbac_only_with_the_k8s_launcher(values_file):
    values = effective(values_file)
    objects = render(values_of(values_file))
    (account,) = by_kind(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    roles = by_kind(objects, "Role")
    site_pods = [pod_spec(d) for d in by_kind(objects, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "site"]
    if values["launcher"] == "k8s":
        (role,) = roles
        rules = {r["resources"][0]: sorted(r["verbs"]) for r in role["rules"]}
        assert rules == {
            "pods": ["create", "delete", "get"],
            "events": ["list"],
            "secrets": ["create", "delete", "patch", "update"],
        }
        assert all(r["apiGroups"] == [""] for r in role["rules"])
        (binding,) = by_kind(objects, "RoleBinding")
        assert binding["subjects"][0]["name"] == account["metadata"]["name"]
        assert all(p["automountServiceAccountToken"] is True for p in site_pods)
        assert {s["metadata"]["name"] for s in by_kind(objects, "Service")} >= {f"demo-{s['name']}" for s in values["sites"]}
    else:
        assert roles == [] and by_kind(objects, "RoleBinding") == [] and by_kind(objects, "ClusterRole") == []
        assert all(p["automountServiceAccountToken"] is False for p in site_pods)


def test_no_secret_material_outside_secrets(tmp_path):
    # Provision real kits for the default federation and install with their values:
    # nothing of the kits may end up in a rendered object.
    from fedllm.deploy.provision import provision

    result = provision(CHART / "ci" / "default-values.yaml", tmp_path / "kits", release="demo")
    values = values_of(CHART / "ci" / "default-values.yaml")
    values["provisioning"] = yaml.safe_load(result["provisioned_values"].read_text())["provisioning"]
    objects = render(values)
    # The chart creates no Secret or ConfigMap: kits come only from the provisioned Secrets.
    assert by_kind(objects, "Secret") == [] and by_kind(objects, "ConfigMap") == []
    text = yaml.safe_dump_all(o for o in objects if o["kind"] != "Secret")
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
    for kit in result["kits"].values():
        for key_file in kit.glob("startup/*.key"):
            body = "".join(key_file.read_text().splitlines()[1:-1])
            assert body[:40] not in text.replace("\n", "")
    for obj in objects:
        if obj["kind"] in POD_KINDS:
            for container in pod_spec(obj)["containers"]:
                for env in container.get("env", []):
                    if env["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                        assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "minio-credentials"


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_every_object_is_labelled(values_file):
    values = effective(values_file)
    objects = render(values_of(values_file))
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "fedllm-federation"
        assert labels["app.kubernetes.io/instance"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "fedllm"
        assert labels["helm.sh/chart"] == "fedllm-federation-0.1.0"
    site_objects = [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "site"]
    assert sorted({o["metadata"]["labels"]["fedllm.io/site"] for o in site_objects}) == sorted(s["name"] for s in values["sites"])
    for d in by_kind(objects, "Deployment"):  # `kubectl logs -l fedllm.io/site=<name>` finds the pods
        assert d["spec"]["template"]["metadata"]["labels"]["fedllm.io/site"] == d["metadata"]["labels"]["fedllm.io/site"]


def test_site_only_install_has_no_server_objects_and_dials_the_remote_server():
    objects = render(values_of(CHART / "ci" / "site-only-values.yaml"))
    components = {o["metadata"]["labels"].get("app.kubernetes.io/component") for o in objects}
    assert "server" not in components
    assert not [o for o in objects if "server" in o["metadata"]["name"]]
    (policy,) = by_kind(objects, "NetworkPolicy")
    remote = [rule for rule in policy["spec"]["egress"] if rule["ports"][0]["port"] == 8002]
    assert remote[0]["to"] == [{"ipBlock": {"cidr": "203.0.113.10/32"}}]
    (test_pod,) = by_kind(objects, "Pod")
    assert test_pod["spec"]["containers"][0]["args"] == ["--server", "fl.example.com:8002"]


def test_sites_reach_only_the_server_s3_and_dns():
    objects = render(None)
    policy = next(p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "demo-sites")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == []
    egress = policy["spec"]["egress"]
    assert len(egress) == 3
    to_server, to_s3, to_dns = egress
    assert to_server["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
    assert to_server["ports"] == [{"port": 8002, "protocol": "TCP"}]
    assert to_s3["to"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "minio"}
    assert to_s3["ports"] == [{"port": 9000, "protocol": "TCP"}]
    assert {p["port"] for p in to_dns["ports"]} == {53}


def test_server_service_type_and_ports_follow_values():
    lb = render(values_of(CHART / "ci" / "loadbalancer-values.yaml"))
    (svc,) = [s for s in by_kind(lb, "Service") if s["metadata"]["name"] == "demo-server"]
    assert svc["spec"]["type"] == "LoadBalancer"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"fl": 8002, "admin": 8003}
    node = render(values_of(CHART / "ci" / "nodeport-values.yaml"))
    (svc,) = [s for s in by_kind(node, "Service") if s["metadata"]["name"] == "demo-server"]
    assert {p["name"]: p["nodePort"] for p in svc["spec"]["ports"]} == {"fl": 30802, "admin": 30803}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"sites": [{"name": "site-1"}, {"name": "Site_2"}]}, "/sites/1/name"),
        ({"sites": []}, "/sites"),
        ({"sites": [{"name": "a", "data": {"s3": "http://x"}}]}, "/sites/0/data"),
        ({"launcher": "slurm"}, "/launcher"),
        ({"server": {"service": {"type": "ExternalName"}}}, "/server/service/type"),
        ({"server": {"transport": "agrpc"}}, "/server/transport"),
        ({"kueue": {"enabled": True, "localQueue": {"create": True}}}, "/kueue/localQueue/clusterQueue"),
        ({"kueue": {"enabled": True, "queueName": "Team_Queue"}}, "/kueue/queueName"),
    ],
)
def test_schema_rejects_bad_values_naming_the_field(bad, field):
    with pytest.raises(helm.HelmValuesError, match=field):
        render(bad)


def test_site_only_install_requires_the_remote_address():
    with pytest.raises(helm.HelmError, match="remoteAddress"):
        render({"server": {"enabled": False}})


KUEUE_CI = CHART / "ci" / "kueue-values.yaml"


def group_of(deployment: dict) -> tuple[str, str]:
    template = deployment["spec"]["template"]["metadata"]
    return template["labels"]["kueue.x-k8s.io/pod-group-name"], template["annotations"]["kueue.x-k8s.io/pod-group-total-count"]


def test_kueue_admits_the_server_and_all_sites_as_one_pod_group():
    values = values_of(KUEUE_CI)
    objects = render(values)
    deployments = by_kind(objects, "Deployment")
    assert len(deployments) == 1 + len(values["sites"])
    queue = {"kueue.x-k8s.io/queue-name": "fedllm-federation", "kueue.x-k8s.io/priority-class": "federated-training"}
    for d in deployments:  # the queue on the pod owner (Kueue's deployment integration) and its pods
        assert queue.items() <= d["metadata"]["labels"].items()
        assert queue.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        assert d["spec"]["template"]["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-serving"] == "true"
    # one group, as large as the pods that make it up: all or none are admitted
    assert {group_of(d) for d in deployments} == {("demo-federation", str(len(deployments)))}
    (queue_object,) = by_kind(objects, "LocalQueue")
    assert queue_object["metadata"]["name"] == "fedllm-federation"
    assert queue_object["spec"] == {"clusterQueue": "gpu-cluster-queue"}
    # launcher k8s: each job pod (it holds the site's GPUs) is queued on its own, outside the group
    for d in deployments:
        env = {e["name"]: e.get("value") for e in pod_spec(d)["containers"][0]["env"]}
        if "FEDLLM_JOB_POD_TEMPLATE" in env:
            labels = json.loads(env["FEDLLM_JOB_POD_TEMPLATE"])["metadata"]["labels"]
            assert queue.items() <= labels.items() and "kueue.x-k8s.io/pod-group-name" not in labels
    # the helm test pod is not a workload to queue
    (test_pod,) = by_kind(objects, "Pod")
    assert not any(k.startswith("kueue.x-k8s.io/") for k in test_pod["metadata"]["labels"])


def test_a_site_only_install_queues_its_sites_as_the_group():
    values = values_of(CHART / "ci" / "site-only-values.yaml")
    values["kueue"] = {"enabled": True, "queueName": "edge"}
    objects = render(values)
    assert by_kind(objects, "LocalQueue") == []  # an existing queue unless localQueue.create
    deployments = by_kind(objects, "Deployment")
    assert {group_of(d) for d in deployments} == {("demo-federation", str(len(values["sites"])))}
    for version in KUBE_VERSIONS:
        for obj in objects:
            validate(obj, version)


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_without_kueue_nothing_of_kueue_is_rendered(values_file):
    values = values_of(values_file) or {}
    if values.get("kueue", {}).get("enabled"):
        values["kueue"]["enabled"] = False
    text = yaml.safe_dump_all(render(values))
    assert "kueue" not in text
    assert [o for o in render(values) if o["kind"] == "LocalQueue"] == []


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda q: q["spec"].update(clusterqueue="gpu"), "Additional properties are not allowed"),
        (lambda q: q["spec"].update(clusterQueue="GPU_Queue"), "does not match"),
        (lambda q: q["spec"].update(stopPolicy="Pause"), "is not one of"),
    ],
)
def test_kueue_objects_are_checked_as_strictly_as_the_api_server_would(change, error):
    (queue_object,) = by_kind(render(values_of(KUEUE_CI)), "LocalQueue")
    change(queue_object)
    with pytest.raises(jsonschema.ValidationError, match=error):
        validate(queue_object, KUBE_VERSIONS[-1])


def server_resources(values: dict) -> dict:
    (server,) = [d for d in by_kind(render(values), "Deployment") if d["metadata"]["name"] == "demo-server"]
    (container,) = pod_spec(server)["containers"]
    return container["resources"]


@pytest.mark.parametrize("model_bytes", [0, 7, 9_200_000, 538_000_000, 28_000_000_000])
def test_the_servers_memory_request_follows_the_model(model_bytes):
    # one rule for the chart and the library: fedllm.federation.memory
    from fedllm.federation.memory import server_memory_request

    mib = server_memory_request(model_bytes) >> 20
    resources = server_resources({"server": {"modelBytes": model_bytes}})
    assert resources["requests"] == {"cpu": "1", "memory": f"{mib}Mi"}
    assert resources["limits"] == {"memory": f"{2 * mib}Mi"}
    assert mib == {0: 1024, 7: 1025, 9_200_000: 1042, 538_000_000: 2051, 28_000_000_000: 54430}[model_bytes]


def test_an_explicit_memory_request_or_limit_wins():
    given = {"requests": {"cpu": "2", "memory": "64Gi"}, "limits": {"memory": "96Gi"}}
    assert server_resources({"server": {"modelBytes": 28_000_000_000, "resources": given}}) == given
    # a limit alone is kept; the request is still derived
    kept = server_resources({"server": {"modelBytes": 538_000_000, "resources": {"limits": {"memory": "16Gi"}}}})
    assert kept == {"requests": {"cpu": "1", "memory": "2051Mi"}, "limits": {"memory": "16Gi"}}
    with pytest.raises(helm.HelmValuesError, match="/server/modelBytes"):
        render({"server": {"modelBytes": -1}})


@pytest.mark.parametrize("launcher", ["process", "k8s"])
def test_a_site_with_its_own_image_runs_it_and_the_others_keep_the_charts(launcher):
    # A GPU site on the NeMo image (its tag and pull policy the chart-wide ones), a site
    # pinning all three fields, and a site that sets none.
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    values = {
        "launcher": launcher,
        "sites": [
            {"name": "gpu-site", "gpus": 2, "image": {"repository": "ghcr.io/fedllm/fedllm-nemo"}},
            {"name": "pinned", "image": {"repository": "registry.example/fedllm-nemo", "tag": "dev", "pullPolicy": "Always"}},
            {"name": "cpu-site"},
        ],
    }
    report = helm.lint(str(CHART), values, strict=True, namespace="fl", kube_version="v1.29.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    objects = render(values)
    for version in KUBE_VERSIONS:
        for obj in objects:
            validate(obj, version)
    pods = {o["metadata"]["name"].removeprefix("demo-"): pod_spec(o)["containers"][0] for o in objects if o["kind"] in POD_KINDS}
    ran = {name: (c["image"], c["imagePullPolicy"]) for name, c in pods.items()}
    chart_wide = (f"ghcr.io/fedllm/fedllm:{app_version}", "IfNotPresent")
    assert ran == {
        "gpu-site": (f"ghcr.io/fedllm/fedllm-nemo:{app_version}", "IfNotPresent"),
        "pinned": ("registry.example/fedllm-nemo:dev", "Always"),
        "cpu-site": chart_wide,
        "server": chart_wide,
        "test-connection": chart_wide,
    }
    # launcher k8s: the job pods that train run the site's image too
    job_images = {name: e["value"] for name, c in pods.items() for e in c["env"] if e["name"] == "FEDLLM_JOB_IMAGE"}
    expected = {name: ran[name][0] for name in ("gpu-site", "pinned", "cpu-site")} if launcher == "k8s" else {}
    assert job_images == expected
    # a chart-wide tag is every site's default tag, its own repository or not
    tagged = render({**values, "image": {"repository": "ghcr.io/fedllm/fedllm", "tag": "0.2.0"}})
    images = {d["metadata"]["name"].removeprefix("demo-"): pod_spec(d)["containers"][0]["image"] for d in by_kind(tagged, "Deployment")}
    assert images == {"gpu-site": "ghcr.io/fedllm/fedllm-nemo:0.2.0", "pinned": "registry.example/fedllm-nemo:dev",
                      "cpu-site": "ghcr.io/fedllm/fedllm:0.2.0", "server": "ghcr.io/fedllm/fedllm:0.2.0"}
    with pytest.raises(helm.HelmValuesError, match="/sites/0/image"):
        render({"sites": [{"name": "a", "image": {"repo": "ghcr.io/fedllm/fedllm-nemo"}}]})
