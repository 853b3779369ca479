"""Check a deployed federation from inside the cluster: what `helm test` runs.

    python -m fedllm.deploy.check --server HOST:FL_PORT[,ADMIN_PORT] \
        [--admin-kit DIR --sites site-1,site-2 --timeout 300]

First the server's ports must accept TCP connections. With an admin kit (the admin
startup-kit Secret mounted at DIR), it then logs in over mTLS with NVFlare's flare_api
and waits until every listed site has registered. Exits 0 when all holds, 1 otherwise,
printing one line per check.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from fedllm.deploy.kit_secret import kit_files
from fedllm.errors import FedllmError


def port_open(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def admin_kit_dir(kit: Path, into: Path) -> Path:
    """An NVFlare admin kit layout (startup/...) from a Secret mount (``startup.<file>`` keys) or a kit dir."""
    if (kit / "startup").is_dir():
        return kit
    files = kit_files(kit)
    if "startup/fed_admin.json" not in files:
        raise FedllmError(f"{kit}: no startup.fed_admin.json; mount the admin startup-kit Secret there")
    for rel, src in files.items():
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, into / rel)
    return into


def registered_sites(admin_kit: Path, sites: list[str], timeout: float) -> set[str]:
    """Log in with the admin kit and wait up to ``timeout`` s for ``sites``; returns the sites seen."""
    import json

    from nvflare.fuel.flare_api.api_spec import NoClientsAvailable
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    username = json.loads((admin_kit / "startup" / "fed_admin.json").read_text())["admin"]["username"]
    deadline = time.time() + timeout
    session = new_secure_session(username, str(admin_kit), timeout=min(60.0, timeout))
    try:
        seen: set[str] = set()
        while True:
            try:
                status = session.check_status("client")
                seen = {c["client_name"] for c in status.get("client_status", [])}
            except NoClientsAvailable:  # the server answers so until the first site registers
                seen = set()
            if set(sites) <= seen or time.time() > deadline:
                return seen
            time.sleep(5)
    finally:
        session.close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedllm.deploy.check", description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="HOST:FL_PORT[,ADMIN_PORT]")
    parser.add_argument("--admin-kit", type=Path, help="admin startup kit (Secret mount or kit dir)")
    parser.add_argument("--sites", default="", help="comma-separated site names that must be registered")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the sites")
    args = parser.parse_args(argv)

    host, _, ports = args.server.rpartition(":")
    ok = True
    for port in [int(p) for p in ports.split(",")]:
        up = port_open(host, port)
        print(f"{'ok' if up else 'FAIL'}: server {host}:{port} accepts connections", flush=True)
        ok = ok and up
    if ok and args.admin_kit:
        sites = [s for s in args.sites.split(",") if s]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                seen = registered_sites(admin_kit_dir(args.admin_kit, Path(tmp)), sites, args.timeout)
            except FedllmError as e:
                print(f"FAIL: {e}", flush=True)
                return 1
        for site in sites:
            print(f"{'ok' if site in seen else 'FAIL'}: site {site} registered", flush=True)
        ok = set(sites) <= seen
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
