"""Issue the federation's mTLS startup kits from the Helm chart's values file.

The chart installs the server and the sites listed in its values; this module reads
the same values over the chart's defaults, checks them with the chart's own
``values.schema.json`` (both packaged with fedllm under ``fedllm/deploy/chart/``, copies of
``charts/fedllm-federation``'s), writes NVFlare's ``project.yml``, runs NVFlare's real provisioning
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
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from fedllm.deploy.kit_secret import secret_data, secret_manifest
from fedllm.errors import FedllmError
from fedllm.files import read_yaml, write_atomic

# The chart's values.yaml and values.schema.json, shipped with the package so an installed
# fedllm (the image) reads the same contract as a checkout; tests/test_provision_kits.py
# checks they are byte-equal to charts/fedllm-federation's. Pass chart_dir for another chart.
PACKAGED_CHART = Path(__file__).resolve().with_name("chart")
RESOURCE_NAME_MAX = 63  # Kubernetes' limit on the Service names the chart derives (<fullname>-<name>)


def chart_files(chart_dir: Path = PACKAGED_CHART) -> tuple[dict, dict]:
    """The chart's default values and its values schema; a missing file is an error naming it."""
    chart_dir = Path(chart_dir)
    values_file, schema_file = chart_dir / "values.yaml", chart_dir / "values.schema.json"
    for f in (values_file, schema_file):
        if not f.is_file():
            raise FedllmError(f"{f}: not found; provisioning needs the chart's values.yaml and values.schema.json")
    defaults = read_yaml(values_file) or {}
    if not isinstance(defaults, dict):
        raise FedllmError(f"{values_file}: a values file is a YAML mapping, got {type(defaults).__name__}")
    try:
        schema = json.loads(schema_file.read_text())
    except json.JSONDecodeError as e:
        raise FedllmError(f"{schema_file}:{e.lineno}: invalid JSON: {e.msg}") from None
    return defaults, schema


def load_values(values_path: str | Path, chart_dir: Optional[Path] = None) -> dict:
    """The chart's default values overlaid with ``values_path``, as Helm merges them, and
    checked against the chart's ``values.schema.json`` as ``helm install`` checks them.

    ``chart_dir`` is the chart whose ``values.yaml`` and ``values.schema.json`` apply
    (default: the copies packaged with fedllm). Raises FedllmError naming the values file
    and the field, e.g. ``values.yaml: sites[1].name: 'Site_A' does not match '^[a-z0-9]...'``.
    """
    path = Path(values_path)
    if not path.is_file():
        raise FedllmError(f"{path}: values file not found; pass the file you give to `helm install -f`")
    user = read_yaml(path) or {}
    if not isinstance(user, dict):
        raise FedllmError(f"{path}: a values file is a YAML mapping, got {type(user).__name__}")
    chart = PACKAGED_CHART if chart_dir is None else Path(chart_dir)
    defaults, schema = chart_files(chart)
    values = _merge(defaults, user)
    _validate(values, schema, source=str(path), schema_file=chart / "values.schema.json")
    return values


def _merge(base: dict, over: dict) -> dict:
    # Helm replaces lists, merges maps, and drops a default the user sets to null;
    # `sites` therefore comes wholly from the user.
    out = dict(base)
    for key, value in over.items():
        if value is None and key in base:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _validate(values: dict, schema: dict, source: str, schema_file: Path) -> None:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    validator_class = validator_for(schema, default=None)
    if validator_class is None:
        raise FedllmError(f"{schema_file}: $schema {schema.get('$schema')!r} is no JSON Schema draft that jsonschema knows")
    try:
        validator_class.check_schema(schema)
    except SchemaError as e:
        raise FedllmError(f"{schema_file}: not a valid JSON Schema: {e.message}") from None
    errors = list(validator_class(schema).iter_errors(values))
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise FedllmError(_schema_error(errors[0], source) + more)


def _schema_error(error, source: str) -> str:
    """One line: the values file, the field (``sites[1].name``), jsonschema's message, and
    the schema's description of what is accepted there."""
    field = ""
    for part in error.absolute_path:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    line = f"{source}: {field}: {error.message}" if field else f"{source}: {error.message}"
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    return f"{line} ({description})" if description else line


def fullname(values: dict, release: str) -> str:
    """The prefix of every resource name; the chart's ``fedllm.fullname`` helper."""
    return (values.get("fullnameOverride") or release)[:63].rstrip("-")


def participants(values: dict, release: str, source: str = "values") -> dict:
    """The participants of values ``load_values`` returned (merged and schema-valid):
    {project, org, server, host, additional_hosts, fl_port, admin_port, transport, sites, admin}.

    Checks only what the schema cannot say, across fields: two ports, unique names, and
    names that still fit Kubernetes once the chart prefixes them with the release.
    Raises FedllmError naming the field.
    """
    project, server, admin = values["project"], values["server"], values["admin"]
    prefix = fullname(values, release)
    server_name = server["name"]
    fl_port, admin_port = server["flPort"], server["adminPort"]
    if fl_port == admin_port:
        raise FedllmError(f"{source}: server.flPort and server.adminPort are both {fl_port}; use two ports")

    if server["enabled"]:
        host = server.get("host") or f"{prefix}-server"
        _fits(f"{prefix}-server", "the server", source)
    else:
        # A site-only install dials a server outside this release: the kits must say where.
        host, _, remote_port = server["remoteAddress"].rpartition(":")
        fl_port = int(remote_port)
    extra_hosts = list(server.get("additionalHosts") or [])

    site_names: list[str] = []
    for i, site in enumerate(values["sites"]):
        name = site["name"]
        if name in site_names:
            raise FedllmError(f"{source}: sites[{i}].name {name!r} repeats sites[{site_names.index(name)}].name")
        if name in (server_name, "admin"):
            raise FedllmError(f"{source}: sites[{i}].name {name!r} is taken by the server or the admin kit")
        _fits(f"{prefix}-{name}", f"sites[{i}].name {name!r}", source)
        site_names.append(name)

    return {
        "project": project["name"],
        "org": project["org"],
        "server": server_name,
        "host": host,
        "additional_hosts": extra_hosts,
        "fl_port": fl_port,
        "admin_port": admin_port,
        # One transport for the federation: the server listens in one scheme on both ports.
        "transport": server.get("transport") or "grpc",
        "sites": site_names,
        "admin": admin["name"],
    }


def _fits(resource_name: str, what: str, source: str) -> None:
    # The chart names the Deployment and Service `<fullname>-<name>` and truncates at 63:
    # a longer name would be cut, and the kits would name a host that does not exist.
    if len(resource_name) > RESOURCE_NAME_MAX:
        raise FedllmError(
            f"{source}: {what}: the chart names its objects {resource_name!r}, {len(resource_name)} characters, "
            f"over Kubernetes' {RESOURCE_NAME_MAX}; shorten the name, the release name or fullnameOverride"
        )


def project_yml(p: dict) -> dict:
    """NVFlare's project.yml (api_version 3) for the validated participants ``p``; the
    transport is StaticFileBuilder's ``scheme``, which it writes into every kit."""
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
                # Not use_aio (agrpc, atcp): NVFlare 2.9's clients refuse those schemes with TLS.
                "args": {"config_folder": "config", "scheme": p["transport"]},
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
    (``<release>-<participant>-startup-kit`` unless the values name them); ``chart_dir``
    is the chart whose defaults and schema apply (default: the copies packaged with fedllm).

    Returns ``{"project_yml", "kits": {participant: dir}, "secrets": {participant: file},
    "secret_names": {participant: name}, "provisioned_values", "root_ca_sha256",
    "server_target", "admin_name"}`` where participant is "server", each site name, and "admin".
    """
    values = load_values(values_path, chart_dir)
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
