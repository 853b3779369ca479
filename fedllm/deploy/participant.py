"""Start one federation participant (the server or a site) from its mounted startup kit.

What a server or site pod runs, and what the localhost mTLS test runs:

    python -m fedllm.deploy.participant --kit /var/run/fedllm/startup-kit --workspace /workspace

``--kit`` is either the Secret volume written by provisioning (flat files named
``startup.client.key``, ``local.resources.json.default``, ...) or an NVFlare kit
directory (``startup/``, ``local/``). The kit is copied into the writable workspace
(the Secret mount is read-only and NVFlare writes next to its kit), checked against
the federation's root CA fingerprint, adjusted for Kubernetes (server storage inside
the workspace; with ``FEDLLM_JOB_LAUNCHER=k8s`` the NVFlare K8s job launcher), and
then NVFlare's server or client process replaces this one (``exec``), so the pod's
signals and exit status are NVFlare's own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import yaml

from fedllm.deploy.kit_secret import KIT_DIRS, kit_files
from fedllm.errors import FedllmError


def unpack_kit(kit: Path, workspace: Path, expected_root_ca_sha256: Optional[str] = None) -> str:
    """Copy the kit at ``kit`` into ``workspace/startup`` and ``workspace/local``.

    Returns the role, "server" or "client". Raises FedllmError if the kit is not a
    server or client kit, or its root CA is not the one ``expected_root_ca_sha256``
    names (a kit from another provisioning).
    """
    if not kit.is_dir():
        raise FedllmError(f"{kit}: startup kit not found (mount the participant's startup-kit Secret there)")
    files = kit_files(kit)
    if "startup/fed_server.json" in files:
        role = "server"
    elif "startup/fed_client.json" in files:
        role = "client"
    else:
        raise FedllmError(f"{kit}: no startup/fed_server.json or startup/fed_client.json; not a server or site kit")
    if "startup/rootCA.pem" not in files:
        raise FedllmError(f"{kit}: the kit has no startup/rootCA.pem")
    if expected_root_ca_sha256:
        actual = hashlib.sha256(files["startup/rootCA.pem"].read_bytes()).hexdigest()
        if actual != expected_root_ca_sha256.lower():
            raise FedllmError(
                f"{kit}: startup kit is from another provisioning (root CA sha256 {actual[:16]}..., "
                f"provisioning.rootCASha256 is {expected_root_ca_sha256[:16]}...); apply this "
                "federation's Secrets from `fedllm provision`"
            )
    for folder in KIT_DIRS:
        target = workspace / folder
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
    for rel, src in files.items():
        dest = workspace / rel
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o600 if dest.suffix == ".key" else 0o644)
    return role


def _resources(workspace: Path) -> tuple[Path, dict]:
    local = workspace / "local"
    path = local / "resources.json"
    source = path if path.is_file() else local / "resources.json.default"
    return path, json.loads(source.read_text())


def keep_server_storage_in_workspace(workspace: Path) -> None:
    """Point the server's job store and snapshots into the workspace, not the shared /tmp/nvflare."""
    path, resources = _resources(workspace)
    try:
        resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = str(workspace / "snapshot-storage")
    except (KeyError, TypeError):
        raise FedllmError(f"{path}: server resources have no snapshot_persistor storage to relocate") from None
    for component in resources.get("components", []):
        if component.get("id") == "job_manager":
            component.setdefault("args", {})["uri_root"] = str(workspace / "jobs-storage")
    path.write_text(json.dumps(resources, indent=2))


def use_k8s_job_launcher(workspace: Path, env: dict) -> None:
    """Make the site start each job as its own pod through NVFlare's ClientK8sJobLauncher.

    Reads FEDLLM_JOB_IMAGE, POD_NAMESPACE, FEDLLM_PARENT_HOST, FEDLLM_PARENT_PORT and the
    optional FEDLLM_JOB_* settings the chart sets; writes local/resources.json,
    local/comm_config.json (how the job pod reaches back to this pod) and
    local/study_runtime.yaml (the job pod's image, data, credentials and pod template).
    """
    missing = [k for k in ("FEDLLM_JOB_IMAGE", "POD_NAMESPACE", "FEDLLM_PARENT_HOST") if not env.get(k)]
    if missing:
        raise FedllmError(f"launcher k8s needs env {', '.join(missing)} (set by the chart's site Deployment)")
    parent_port = int(env.get("FEDLLM_PARENT_PORT", "8102"))
    path, resources = _resources(workspace)
    launcher = {
        "id": "k8s_launcher",
        "path": "nvflare.app_opt.job_launcher.k8s_launcher.ClientK8sJobLauncher",
        "args": {
            "config_file_path": None,  # in-cluster: the pod's ServiceAccount
            "namespace": env["POD_NAMESPACE"],
            "pending_timeout": int(env.get("FEDLLM_JOB_PENDING_TIMEOUT", "600")),
            "ephemeral_storage": env.get("FEDLLM_JOB_EPHEMERAL_STORAGE", "20Gi"),
            "default_python_path": env.get("FEDLLM_JOB_PYTHON", "/usr/local/bin/python"),
        },
    }
    if env.get("FEDLLM_JOB_SECURITY_CONTEXT"):
        launcher["args"]["security_context"] = json.loads(env["FEDLLM_JOB_SECURITY_CONTEXT"])
    components = [c for c in resources.get("components", []) if c.get("id") not in ("process_launcher", "k8s_launcher")]
    resources["components"] = components + [launcher]
    path.write_text(json.dumps(resources, indent=2))

    comm_config = {
        "allow_adhoc_conns": False,
        "backbone_conn_gen": 2,
        "internal": {
            "scheme": "tcp",
            "resources": {"host": env["FEDLLM_PARENT_HOST"], "port": parent_port, "connection_security": "mtls"},
        },
    }
    (workspace / "local" / "comm_config.json").write_text(json.dumps(comm_config, indent=2))

    pod_template = json.loads(env.get("FEDLLM_JOB_POD_TEMPLATE") or "{}")
    study: dict = {"container": {"image": env["FEDLLM_JOB_IMAGE"]}, "env": {}}
    for key in ("AWS_ENDPOINT_URL", "FEDLLM_SITE"):
        if env.get(key):
            study["env"][key] = env[key]
    credentials = env.get("FEDLLM_S3_CREDENTIALS_SECRET")
    if credentials:
        study["secret_env"] = {
            "AWS_ACCESS_KEY_ID": {"source": credentials, "key": env.get("FEDLLM_S3_ACCESS_KEY_ID_KEY", "accessKeyId")},
            "AWS_SECRET_ACCESS_KEY": {
                "source": credentials,
                "key": env.get("FEDLLM_S3_SECRET_ACCESS_KEY_KEY", "secretAccessKey"),
            },
        }
    data_pvc = env.get("FEDLLM_SITE_DATA_PVC")
    if data_pvc:
        study["datasets"] = {"site": {"source": data_pvc, "mode": "ro"}}
        study["env"]["FEDLLM_SITE_DATA"] = "/data/default/site"  # nvflare: /data/<study>/<dataset>
    elif env.get("FEDLLM_SITE_DATA"):
        study["env"]["FEDLLM_SITE_DATA"] = env["FEDLLM_SITE_DATA"]
    if pod_template:
        # The chart's template: the site's nodeSelector/tolerations, security context, /tmp.
        study["pod_template"] = {"apiVersion": "v1", "kind": "Pod", **pod_template}
    runtime = {"format_version": 2, "studies": {"default": study}}
    (workspace / "local" / "study_runtime.yaml").write_text(yaml.safe_dump(runtime, sort_keys=False))


def identity(workspace: Path, role: str) -> tuple[str, str]:
    """(name, org) from the participant's certificate, as NVFlare's start scripts pass them."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert_file = workspace / "startup" / ("server.crt" if role == "server" else "client.crt")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(name), str(orgs[0].value) if orgs else ""


def nvflare_command(workspace: Path, role: str) -> list[str]:
    """The NVFlare process for ``role``, as the kit's sub_start.sh would start it."""
    name, org = identity(workspace, role)
    if role == "server":
        module, config = "nvflare.private.fed.app.server.server_train", "fed_server.json"
        sets = ["secure_train=true", "config_folder=config", f"org={org}"]
    else:
        module, config = "nvflare.private.fed.app.client.client_train", "fed_client.json"
        sets = ["secure_train=true", f"uid={name}", f"org={org}", "config_folder=config"]
    return [sys.executable, "-u", "-m", module, "-m", str(workspace), "-s", config, "--set", *sets]


def prepare(kit: Path, workspace: Path, env: Optional[dict] = None) -> list[str]:
    """Unpack and adjust the kit in ``workspace``; return the NVFlare command to run there."""
    env = dict(os.environ if env is None else env)
    workspace.mkdir(parents=True, exist_ok=True)
    role = unpack_kit(kit, workspace, env.get("FEDLLM_ROOT_CA_SHA256") or None)
    if role == "server":
        keep_server_storage_in_workspace(workspace)
    elif env.get("FEDLLM_JOB_LAUNCHER", "process") == "k8s":
        use_k8s_job_launcher(workspace, env)
    (workspace / "transfer").mkdir(exist_ok=True)
    return nvflare_command(workspace, role)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedllm.deploy.participant", description=__doc__.split("\n")[0])
    parser.add_argument("--kit", required=True, type=Path, help="startup kit: Secret mount or NVFlare kit dir")
    parser.add_argument("--workspace", required=True, type=Path, help="writable NVFlare workspace")
    args = parser.parse_args(argv)
    try:
        command = prepare(args.kit, args.workspace.resolve())
    except FedllmError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"fedllm: starting {' '.join(command[3:5])} in {args.workspace}", flush=True)
    os.chdir(args.workspace)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
