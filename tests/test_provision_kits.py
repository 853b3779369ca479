"""Provisioning from the chart's values: real NVFlare kits, one Secret per participant."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedllm.deploy.check import admin_kit_dir
from fedllm.deploy.participant import prepare
import fedllm.deploy.provision as provision_module
from fedllm.deploy.provision import PACKAGED_CHART, provision
from fedllm.errors import FedllmError
from participants import mount_secret

CHART = Path(__file__).resolve().parents[1] / "charts" / "fedllm-federation"
DEFAULT_CI = CHART / "ci" / "default-values.yaml"
SITES = ["hospital-a", "hospital-b", "bank-c"]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision(DEFAULT_CI, tmp_path_factory.mktemp("kits"), release="demo")


def secret(result, participant) -> dict:
    return yaml.safe_load(result["secrets"][participant].read_text())


def mount(result, participant, into: Path) -> Path:
    """Write a Secret's data as files, as the kubelet does for a Secret volume."""
    return mount_secret(result["secrets"][participant], into)


def test_one_opaque_secret_per_participant_named_as_the_chart_mounts_them(kits):
    assert sorted(kits["secrets"]) == sorted(["server", "admin", *SITES])
    values = yaml.safe_load(DEFAULT_CI.read_text())
    rendered = helm.Chart.load(str(CHART)).render(values, name="demo", namespace="fl")
    mounted = set()
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") in ("Deployment", "Pod"):
                spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]
                mounted |= {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    names = {secret(kits, p)["metadata"]["name"] for p in kits["secrets"]}
    assert mounted == names == {f"demo-{p}-startup-kit" for p in ["server", "admin", *SITES]}
    for participant in kits["secrets"]:
        s = secret(kits, participant)
        assert s["type"] == "Opaque" and s["kind"] == "Secret"
        assert s["metadata"]["annotations"]["fedllm.io/root-ca-sha256"] == kits["root_ca_sha256"]
        if participant in SITES:
            assert s["metadata"]["labels"]["fedllm.io/site"] == participant


def test_each_secret_holds_only_its_own_participant(kits):
    certs = {"server": "startup.server.crt", "admin": "startup.client.crt", **{s: "startup.client.crt" for s in SITES}}
    expected_cn = {"server": "server", "admin": kits["admin_name"], **{s: s for s in SITES}}
    for participant, cert_key in certs.items():
        data = secret(kits, participant)["data"]
        cert = x509.load_pem_x509_certificate(base64.b64decode(data[cert_key]))
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == expected_cn[participant]
        assert sum(1 for k in data if k.endswith(".key")) == 1  # its own private key, no other


def test_each_private_key_is_in_its_own_secret_only(kits):
    texts = {p: f.read_text() for p, f in kits["secrets"].items()}
    for participant, kit in kits["kits"].items():
        (key_file,) = kit.glob("startup/*.key")
        encoded = base64.b64encode(key_file.read_bytes()).decode()
        holders = [p for p, text in texts.items() if encoded in text]
        assert holders == [participant]
    for f in kits["secrets"].values():
        assert oct(f.stat().st_mode & 0o777) == "0o600"


def test_kits_dial_the_release_server_with_a_certificate_for_that_name(kits):
    fed_client = json.loads((kits["kits"]["hospital-a"] / "startup" / "fed_client.json").read_text())
    assert fed_client["servers"][0]["service"]["target"] == "demo-server:8002" == kits["server_target"]
    assert fed_client["client"]["connection_security"] == "mtls"
    cert = x509.load_pem_x509_certificate((kits["kits"]["server"] / "startup" / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "demo-server" in sans
    admin = json.loads((kits["kits"]["admin"] / "startup" / "fed_admin.json").read_text())["admin"]
    assert (admin["host"], admin["port"]) == ("demo-server", 8003)
    provisioned = yaml.safe_load(kits["provisioned_values"].read_text())
    assert provisioned == {"provisioning": {"rootCASha256": kits["root_ca_sha256"]}}
    root = (kits["kits"]["server"] / "startup" / "rootCA.pem").read_bytes()
    assert hashlib.sha256(root).hexdigest() == kits["root_ca_sha256"]


@pytest.mark.parametrize("transport", ["tcp", "http"])
def test_server_transport_is_written_into_every_kit(tmp_path, transport):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"server": {"transport": transport}, "sites": [{"name": "site-1"}, {"name": "site-2"}]}))
    result = provision(values, tmp_path / "out")
    # as the pods mount them: the Secrets' files
    kit = {p: {k: base64.b64decode(v) for k, v in secret(result, p)["data"].items()} for p in result["secrets"]}
    assert json.loads(kit["server"]["startup.fed_server.json"])["servers"][0]["service"]["scheme"] == transport
    for site in ("site-1", "site-2"):
        assert json.loads(kit[site]["startup.fed_client.json"])["servers"][0]["service"]["scheme"] == transport
    assert json.loads(kit["admin"]["startup.fed_admin.json"])["admin"]["scheme"] == transport


def test_the_default_transport_is_grpc(kits):
    fed_server = json.loads((kits["kits"]["server"] / "startup" / "fed_server.json").read_text())
    assert fed_server["servers"][0]["service"]["scheme"] == "grpc"
    for site in SITES:
        fed_client = json.loads((kits["kits"][site] / "startup" / "fed_client.json").read_text())
        assert fed_client["servers"][0]["service"]["scheme"] == "grpc"


def test_reprovisioning_keeps_the_root_ca(tmp_path):
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"sites": [{"name": "site-1"}]}))
    first = provision(values, tmp_path / "out")
    values.write_text(yaml.safe_dump({"sites": [{"name": "site-1"}, {"name": "site-2"}]}))
    second = provision(values, tmp_path / "out")
    assert second["root_ca_sha256"] == first["root_ca_sha256"]
    assert "site-2" in second["secrets"]


@pytest.mark.parametrize(
    "values, message",
    [
        # what the chart's values.schema.json says, as jsonschema reports it
        ({"sites": []}, r"values\.yaml: sites: .*at least one site"),
        ({"sites": [{"name": "a"}, {"name": "b"}, {"name": "Bad_Name"}]}, r"sites\[2\]\.name: 'Bad_Name' does not match .*a DNS-1123 label"),
        ({"sites": [{"gpus": 1}]}, r"sites\[0\]: 'name' is a required property"),
        ({"sites": [{"name": "x" * 41}]}, r"sites\[0\]\.name: 'x+' is too long .*at most 40 characters"),
        ({"sites": [{"name": "a"}], "admin": {"name": "root"}}, r"admin\.name: 'root' does not match .*an e-mail address"),
        ({"sites": [{"name": "a"}], "server": {"enabled": False}}, r"server\.remoteAddress: .*required when server\.enabled is false"),
        ({"sites": [{"name": "a"}], "server": {"enabled": False, "remoteAddress": "nohost"}}, r"server\.remoteAddress: 'nohost' does not match .*host:port"),
        ({"sites": [{"name": "a"}], "server": {"enabled": False, "remoteAddress": "fl.example.com:70000"}}, r"server\.remoteAddress: 'fl\.example\.com:70000' does not match"),
        ({"sites": [{"name": "a"}], "server": {"flPort": 0}}, r"server\.flPort: 0 is less than the minimum of 1"),
        ({"sites": [{"name": "a"}], "server": {"host": "bad_host"}}, r"server\.host: 'bad_host' does not match .*a DNS name"),
        ({"sites": [{"name": "a"}], "project": {"org": "my-org"}}, r"project\.org: 'my-org' does not match"),
        ({"sites": [{"name": "a"}], "launcher": "slurm"}, r"launcher: 'slurm' is not one of"),
        ({"sites": [{"name": "a"}], "server": {"transport": "agrpc"}}, r"server\.transport: 'agrpc' is not one of .*grpc, tcp or http"),
        ({"sites": [{"name": "a"}], "kueue": {"enabled": True, "queueName": "Team_Queue"}}, r"kueue\.queueName: 'Team_Queue' does not match .*a Kueue object name"),
        ({"sites": [{"name": "a"}], "kueue": {"enabled": True, "localQueue": {"create": True}}}, r"kueue\.localQueue\.clusterQueue: '' should be non-empty .*required when kueue\.localQueue\.create is true"),
        # what only Python checks: rules across fields
        ({"sites": [{"name": "a"}, {"name": "a"}]}, r"sites\[1\]\.name 'a' repeats sites\[0\]\.name"),
        ({"sites": [{"name": "server"}]}, "taken by the server"),
        ({"sites": [{"name": "a"}], "server": {"flPort": 8003}}, "both 8003"),
        ({"sites": [{"name": "s" * 40}], "fullnameOverride": "r" * 30}, r"sites\[0\]\.name 's+': the chart names its objects 'r+-s+', 71 characters"),
    ],
)
def test_bad_values_fail_naming_the_field(tmp_path, values, message):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(FedllmError, match=message) as err:
        provision(path, tmp_path / "out")
    assert str(path) in str(err.value)
    assert not (tmp_path / "out" / "nvflare").exists()  # refused before NVFlare ran


def test_the_packaged_chart_files_are_the_charts():
    # An installed fedllm (the images copy only fedllm/) reads these copies, not charts/.
    for name in ("values.yaml", "values.schema.json"):
        packaged, chart = PACKAGED_CHART / name, CHART / name
        assert packaged.read_bytes() == chart.read_bytes(), f"{packaged} differs from {chart}: cp {chart} {packaged}"


def test_an_installed_package_provisions_from_its_own_chart_files(tmp_path):
    # fedllm/ alone, as the images install it: the defaults and the schema still apply.
    shutil.copytree(Path(provision_module.__file__).parents[1], tmp_path / "site" / "fedllm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"sites": [{"name": "Site_A"}]}))
    script = (
        "from fedllm.deploy.provision import load_values, PACKAGED_CHART\n"
        "from fedllm.errors import FedllmError\n"
        "assert PACKAGED_CHART.is_relative_to(%r), PACKAGED_CHART\n"
        "try:\n    load_values(%r)\nexcept FedllmError as e:\n    print(e)\n"
    ) % (str(tmp_path / "site"), str(values))
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                         capture_output=True, text=True, check=True).stdout
    assert f"{values}: sites[0].name: 'Site_A' does not match" in out


def test_a_missing_chart_file_is_an_error_naming_it(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"sites": [{"name": "a"}]}))
    chart = tmp_path / "chart"
    chart.mkdir()
    (chart / "values.schema.json").write_bytes((CHART / "values.schema.json").read_bytes())
    with pytest.raises(FedllmError, match=rf"{chart / 'values.yaml'}: not found"):
        provision(values, tmp_path / "out", chart_dir=chart)
    (chart / "values.yaml").write_bytes((CHART / "values.yaml").read_bytes())
    (chart / "values.schema.json").unlink()
    with pytest.raises(FedllmError, match=rf"{chart / 'values.schema.json'}: not found"):
        provision(values, tmp_path / "out", chart_dir=chart)


def test_fedllm_provision_takes_the_chart_from_chart(tmp_path, capsys):
    from fedllm.cli import main

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"sites": [{"name": "a"}]}))
    assert main(["provision", str(values), "-o", str(tmp_path / "out"), "--chart", str(tmp_path / "elsewhere")]) == 2
    assert f"error: {tmp_path / 'elsewhere' / 'values.yaml'}: not found" in capsys.readouterr().err


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text("sites:\n  - name: a\n  bad: [\n")
    with pytest.raises(FedllmError, match=rf"{path}:\d+: invalid YAML"):
        provision(path, tmp_path / "out")


def test_a_kit_from_another_provisioning_is_refused_before_start(kits, tmp_path):
    other_values = tmp_path / "other.yaml"
    other_values.write_text(DEFAULT_CI.read_text())
    other = provision(other_values, tmp_path / "other", release="demo")
    assert other["root_ca_sha256"] != kits["root_ca_sha256"]
    foreign = mount(other, "hospital-a", tmp_path / "mount-foreign")
    with pytest.raises(FedllmError, match="startup kit is from another provisioning"):
        prepare(foreign, tmp_path / "ws-foreign", env={"FEDLLM_ROOT_CA_SHA256": kits["root_ca_sha256"]})

    own = mount(kits, "hospital-a", tmp_path / "mount-own")
    command = prepare(own, tmp_path / "ws-own", env={"FEDLLM_ROOT_CA_SHA256": kits["root_ca_sha256"]})
    assert command[3:5] == ["nvflare.private.fed.app.client.client_train", "-m"]
    assert "uid=hospital-a" in command and "org=fedllm" in command and "secure_train=true" in command
    assert (tmp_path / "ws-own" / "startup" / "client.key").stat().st_mode & 0o077 == 0


def test_server_storage_moves_into_its_workspace(kits, tmp_path):
    workspace = tmp_path / "ws"
    command = prepare(mount(kits, "server", tmp_path / "m"), workspace, env={})
    assert command[3] == "nvflare.private.fed.app.server.server_train"
    resources = json.loads((workspace / "local" / "resources.json").read_text())
    job_manager = next(c for c in resources["components"] if c["id"] == "job_manager")
    assert job_manager["args"]["uri_root"] == str(workspace / "jobs-storage")
    assert resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == str(workspace / "snapshot-storage")


def test_k8s_launcher_configuration_is_what_nvflare_accepts(kits, tmp_path):
    from nvflare.app_opt.job_launcher.study_runtime import load_study_runtime_file, resolve_study_runtime

    # the env the chart gives a site pod with launcher k8s (ci/k8s-launcher-values.yaml)
    values = yaml.safe_load((CHART / "ci" / "k8s-launcher-values.yaml").read_text())
    rendered = helm.Chart.load(str(CHART)).render(values, name="demo", namespace="fl")
    site = next(
        d for d in yaml.safe_load_all(rendered["fedllm-federation/templates/site-deployments.yaml"])
        if d and d["metadata"]["labels"]["fedllm.io/site"] == "site-1"
    )
    env = {e["name"]: e["value"] for e in site["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    env["POD_NAMESPACE"] = "fl"  # from the downward API in the pod

    workspace = tmp_path / "ws"
    prepare(mount(kits, "hospital-a", tmp_path / "m"), workspace, env=env)
    resources = json.loads((workspace / "local" / "resources.json").read_text())
    ids = [c["id"] for c in resources["components"]]
    assert "process_launcher" not in ids
    launcher = next(c for c in resources["components"] if c["id"] == "k8s_launcher")
    assert launcher["path"] == "nvflare.app_opt.job_launcher.k8s_launcher.ClientK8sJobLauncher"
    assert launcher["args"]["namespace"] == "fl"
    assert launcher["args"]["security_context"]["runAsNonRoot"] is True
    from nvflare.app_opt.job_launcher.k8s_launcher import ClientK8sJobLauncher

    ClientK8sJobLauncher(**launcher["args"])  # NVFlare validates its own arguments

    comm = json.loads((workspace / "local" / "comm_config.json").read_text())
    assert comm["internal"]["resources"]["host"] == "demo-site-1"
    assert comm["internal"]["resources"]["port"] == 8102

    runtime_file = str(workspace / "local" / "study_runtime.yaml")
    runtime = resolve_study_runtime(load_study_runtime_file(runtime_file, launcher_mode="k8s"), "default", runtime_file)
    assert runtime.container_image == "ghcr.io/fedllm/fedllm:0.1.0"
    assert [(d.source, d.mount_path, d.read_only) for d in runtime.datasets] == [("site-1-data", "/data/default/site", True)]
    assert {r.name: (r.source, r.key) for r in runtime.secret_env} == {
        "AWS_ACCESS_KEY_ID": ("minio-credentials", "accessKeyId"),
        "AWS_SECRET_ACCESS_KEY": ("minio-credentials", "secretAccessKey"),
    }
    assert runtime.env["FEDLLM_SITE_DATA"] == "/data/default/site"
    template = runtime.pod_template
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "job"
    assert template["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert template["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_admin_secret_mount_becomes_a_flare_api_kit(kits, tmp_path):
    kit = admin_kit_dir(mount(kits, "admin", tmp_path / "m"), tmp_path / "kit")
    admin = json.loads((kit / "startup" / "fed_admin.json").read_text())["admin"]
    assert admin["username"] == kits["admin_name"]
    assert (kit / "startup" / "client.key").read_bytes() == (kits["kits"]["admin"] / "startup" / "client.key").read_bytes()
