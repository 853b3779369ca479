"""Issue the federation's mTLS startup kits from the Helm chart's values file.

The chart installs the server and the sites listed in its values; this module reads
the same values, writes NVFlare's ``project.yml``, runs NVFlare's real provisioning
(``Provisioner`` with the Workspace, StaticFile, Cert and Signature builders), and
turns each participant's kit into one Kubernetes Secret:

    out/
      project.yml                         what NVFlare provisioned
      nvflare/<project>/prod_NN/<name>/   the startup kits (NVFlare's layout)
      secrets/<participant>-startup-kit.yaml   one Opaque Secret each: server, sites, admin
      provisioned-values.yaml             rootCASha256 to pass to `helm install -f`

Each Secret holds only its own participant's files, so a site's private key is in
that site's Secret and nowhere else. Re-running into the same ``out`` keeps the root
CA (NVFlare keeps it under ``nvflare/<project>/state``), so adding a site does not
invalidate the kits already deployed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from fedllm.deploy.kit_secret import secret_data, secret_manifest
from fedllm.errors import FedllmError
from fedllm.files import read_yaml, write_atomic

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "fedllm-federation"
SITE_NAME_MAX = 40  # leaves room for "<release>-" and suffixes within 63-character names
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ADMIN_NAME = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
HOST_NAME = re.compile(r"^(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])$")
PROJECT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
ORG_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def load_values(values_path: str | Path, chart_dir: Path = CHART_DIR) -> dict:
    """The chart's default values overlaid with ``values_path``, as Helm merges them."""
    path = Path(values_path)
    if not path.is_file():
        raise FedllmError(f"{path}: values file not found; pass the file you give to `helm install -f`")
    user = read_yaml(path) or {}
    if not isinstance(user, dict):
        raise FedllmError(f"{path}: a values file is a YAML mapping, got {type(user).__name__}")
    defaults_file = chart_dir / "values.yaml"
    defaults = yaml.safe_load(defaults_file.read_text()) if defaults_file.is_file() else {}
    return _merge(defaults, user)


def _merge(base: dict, over: dict) -> dict:
    # Helm replaces lists and merges maps; `sites` therefore comes wholly from the user.
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def fullname(values: dict, release: str) -> str:
    """The prefix of every resource name; the chart's ``fedllm.fullname`` helper."""
    return (values.get("fullnameOverride") or release)[:63].rstrip("-")


def participants(values: dict, release: str, source: str = "values") -> dict:
    """Validated participants: {server, sites, admin, project, org, host, fl_port, admin_port}.

    Raises FedllmError naming the field (``sites[2].name``) and what is accepted.
    """
    project = values.get("project") or {}
    project_name = str(project.get("name", "fedllm"))
    if not PROJECT_NAME.match(project_name):
        raise FedllmError(f"{source}: project.name {project_name!r} must be 1-63 letters, digits, '-' or '_'")
    org = str(project.get("org", "fedllm"))
    if not ORG_NAME.match(org):
        raise FedllmError(f"{source}: project.org {org!r} must be letters, digits or '_' (NVFlare's org rule)")

    server = values.get("server") or {}
    server_name = server.get("name") or "server"
    if not isinstance(server_name, str) or not DNS_LABEL.match(server_name) or len(server_name) > SITE_NAME_MAX:
        raise FedllmError(
            f"{source}: server.name {server_name!r} must be a DNS-1123 label (lowercase letters, digits, '-'), "
            f"at most {SITE_NAME_MAX} characters"
        )
    fl_port = _port(server.get("flPort", 8002), "server.flPort", source)
    admin_port = _port(server.get("adminPort", 8003), "server.adminPort", source)
    if fl_port == admin_port:
        raise FedllmError(f"{source}: server.flPort and server.adminPort are both {fl_port}; use two ports")

    enabled = server.get("enabled", True)
    remote = server.get("remoteAddress") or ""
    host = server.get("host") or f"{fullname(values, release)}-server"
    if not enabled:
        # A site-only install dials a server outside this release: the kits must say where.
        if not remote:
            raise FedllmError(f"{source}: server.remoteAddress is required when server.enabled is false (host:port)")
        remote_host, _, remote_port = str(remote).rpartition(":")
        if not remote_host or not remote_port.isdigit():
            raise FedllmError(f"{source}: server.remoteAddress {remote!r} must be host:port, e.g. fl.example.com:8002")
        host = remote_host
        fl_port = _port(int(remote_port), "server.remoteAddress", source)
    if not HOST_NAME.match(host):
        raise FedllmError(f"{source}: server.host {host!r} is not a DNS name")
    extra_hosts = list(server.get("additionalHosts") or [])
    for i, h in enumerate(extra_hosts):
        if not isinstance(h, str) or not HOST_NAME.match(h):
            raise FedllmError(f"{source}: server.additionalHosts[{i}] {h!r} is not a DNS name")

    sites = values.get("sites")
    if not isinstance(sites, list) or not sites:
        raise FedllmError(f"{source}: sites must list at least one site, e.g. sites: [{{name: site-1}}]")
    site_names: list[str] = []
    for i, site in enumerate(sites):
        if not isinstance(site, dict) or "name" not in site:
            raise FedllmError(f"{source}: sites[{i}] needs a name, e.g. {{name: site-{i + 1}}}")
        name = site["name"]
        if not isinstance(name, str) or not DNS_LABEL.match(name) or len(name) > SITE_NAME_MAX:
            raise FedllmError(
                f"{source}: sites[{i}].name {name!r} must be a DNS-1123 label (lowercase letters, digits, '-', "
                f"starting and ending alphanumeric), at most {SITE_NAME_MAX} characters"
            )
        if name in site_names:
            raise FedllmError(f"{source}: sites[{i}].name {name!r} repeats sites[{site_names.index(name)}].name")
        if name in (server_name, "admin"):
            raise FedllmError(f"{source}: sites[{i}].name {name!r} is taken by the server or the admin kit")
        site_names.append(name)

    admin = (values.get("admin") or {}).get("name") or "admin@fedllm.io"
    if not ADMIN_NAME.match(admin):
        raise FedllmError(f"{source}: admin.name {admin!r} must be an e-mail address (NVFlare's rule for admin users)")

    return {
        "project": project_name,
        "org": org,
        "server": server_name,
        "host": host,
        "additional_hosts": extra_hosts,
        "fl_port": fl_port,
        "admin_port": admin_port,
        "sites": site_names,
        "admin": admin,
    }


def _port(value: Any, field: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise FedllmError(f"{source}: {field} {value!r} must be a port number 1-65535")
    return value


def project_yml(p: dict) -> dict:
    """NVFlare's project.yml (api_version 3) for the validated participants ``p``."""
    server: dict[str, Any] = {
        "name": p["server"],
        "type": "server",
        "org": p["org"],
        "fed_learn_port": p["fl_port"],
        "admin_port": p["admin_port"],
        # The certificate is issued to the name the sites dial, not the participant name.
        "default_host": p["host"],
    }
    hosts = [h for h in [p["host"], *p["additional_hosts"]] if h != p["server"]]
    if hosts:
        server["host_names"] = hosts
    participants_list = [server]
    participants_list += [{"name": s, "type": "client", "org": p["org"]} for s in p["sites"]]
    participants_list.append({"name": p["admin"], "type": "admin", "org": p["org"], "role": "project_admin"})
    return {
        "api_version": 3,
        "name": p["project"],
        "description": "fedllm federation, provisioned from the fedllm-federation chart values",
        "participants": participants_list,
        "builders": [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
            {
                "path": "nvflare.lighter.impl.static_file.StaticFileBuilder",
                "args": {"config_folder": "config", "scheme": "grpc"},
            },
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }


def _run_nvflare(project: dict, workspace: Path) -> Path:
    from nvflare.lighter.constants import CtxKey, WorkDir
    from nvflare.lighter.prov_utils import prepare_builders
    from nvflare.lighter.provision import prepare_project
    from nvflare.lighter.provisioner import Provisioner

    try:
        nv_project = prepare_project(project)
        ctx = Provisioner(str(workspace), prepare_builders(project)).provision(nv_project, logger=_QuietLogger())
    except (ValueError, RuntimeError) as e:
        raise FedllmError(f"NVFlare provisioning refused the project: {e}") from None
    if ctx.get(CtxKey.BUILD_ERROR):
        errors = "; ".join(ctx.get(CtxKey.ERRORS, [])) or "see the log above"
        raise FedllmError(f"NVFlare provisioning failed in {workspace}: {errors}")
    return Path(ctx[WorkDir.CURRENT_PROD_DIR])


class _QuietLogger:
    """NVFlare's provisioning logger interface; keeps errors, drops the chatter."""

    def __init__(self):
        self.errors: list[str] = []

    def debug(self, msg):
        pass

    def info(self, msg):
        pass

    def warning(self, msg):
        pass

    def error(self, msg):
        self.errors.append(str(msg))


def secret_name(values: dict, release: str, participant: str) -> str:
    """The Secret the chart mounts for ``participant`` ("server", "admin" or a site name)."""
    if participant == "server":
        override = (values.get("server") or {}).get("startupKitSecret")
    elif participant == "admin":
        override = (values.get("admin") or {}).get("startupKitSecret")
    else:
        override = next((s.get("startupKitSecret") for s in values["sites"] if s.get("name") == participant), None)
    return override or f"{fullname(values, release)}-{participant}-startup-kit"


def provision(
    values_path: str | Path, out_dir: str | Path, *, release: str = "fedllm", chart_dir: Optional[Path] = None
) -> dict:
    """Provision the federation the values file describes; write kits and Secrets to ``out_dir``.

    ``release`` is the Helm release name the Secrets are named for
    (``<release>-<participant>-startup-kit`` unless the values name them).

    Returns ``{"project_yml", "kits": {participant: dir}, "secrets": {participant: file},
    "secret_names": {participant: name}, "provisioned_values", "root_ca_sha256",
    "server_target", "admin_name"}`` where participant is "server", each site name, and "admin".
    """
    values = load_values(values_path, chart_dir or CHART_DIR)
    p = participants(values, release, source=str(values_path))
    out = Path(out_dir)
    (out / "secrets").mkdir(parents=True, exist_ok=True)

    project = project_yml(p)
    project_file = out / "project.yml"
    project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    prod_dir = _run_nvflare(project, out / "nvflare")

    kit_names = {"server": p["server"], "admin": p["admin"], **{s: s for s in p["sites"]}}
    root_ca = (prod_dir / p["server"] / "startup" / "rootCA.pem").read_bytes()
    root_ca_sha256 = hashlib.sha256(root_ca).hexdigest()

    kits, secrets, names = {}, {}, {}
    for participant, kit_name in kit_names.items():
        kit_dir = prod_dir / kit_name
        if not (kit_dir / "startup").is_dir():
            raise FedllmError(f"NVFlare wrote no startup kit for {kit_name!r} under {prod_dir}")
        labels = {
            "app.kubernetes.io/name": "fedllm-federation",
            "app.kubernetes.io/instance": release,
            "app.kubernetes.io/component": "startup-kit",
            "app.kubernetes.io/part-of": "fedllm",
            "app.kubernetes.io/managed-by": "fedllm-provision",
        }
        if participant not in ("server", "admin"):
            labels["fedllm.io/site"] = participant
        names[participant] = secret_name(values, release, participant)
        manifest = secret_manifest(names[participant], secret_data(kit_dir), labels, root_ca_sha256)
        secret_file = out / "secrets" / f"{participant}-startup-kit.yaml"
        # The manifests carry private keys: owner-only from the first byte.
        write_atomic(secret_file, yaml.safe_dump(manifest, sort_keys=False).encode("utf-8"), mode=0o600)
        kits[participant] = kit_dir
        secrets[participant] = secret_file

    provisioned_values = out / "provisioned-values.yaml"
    provisioned_values.write_text(
        "# Written by fedllm provisioning: pass to helm install with -f after your values file.\n"
        + yaml.safe_dump({"provisioning": {"rootCASha256": root_ca_sha256}}, sort_keys=False)
    )
    return {
        "project_yml": project_file,
        "kits": kits,
        "secrets": secrets,
        "secret_names": names,
        "provisioned_values": provisioned_values,
        "root_ca_sha256": root_ca_sha256,
        "server_target": f"{p['host']}:{p['fl_port']}",
        "admin_name": p["admin"],
    }
