"""Follow every site of a deployed federation in one stream: `fedllm logs <release>`.

Each line of each pod comes out whole, prefixed with its site (``[site-1] {...}``), so the
JSON event lines the training writes (event, site, round, step, loss, tokens_per_s,
bytes_sent, bytes_received, ts) stay greppable and machine-readable after the merge:

    fedllm logs demo -n fl | grep '"event"' | sed 's/^\\[[^]]*\\] //' | jq .loss
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import Callable, Iterable, Iterator, Optional, TextIO

from fedllm.errors import FedllmError

SITE_LABEL = "fedllm.io/site"
_DONE = object()


def merge_lines(streams: dict[str, Iterable[str]]) -> Iterator[str]:
    """Lines of all ``streams`` (site -> lines) as they arrive, each prefixed ``[site] ``.

    One thread per stream; a line is never split or interleaved with another. Ends when
    every stream ends. A stream that raises ends with one ``[site] error: ...`` line.
    """
    lines: queue.Queue = queue.Queue(maxsize=1000)

    def pump(site: str, stream: Iterable[str]) -> None:
        try:
            for line in stream:
                lines.put(f"[{site}] {line.rstrip(chr(10))}")
        except Exception as e:  # a pod that goes away must not silence the others
            lines.put(f"[{site}] error: log stream ended: {e}")
        finally:
            lines.put(_DONE)

    threads = [threading.Thread(target=pump, args=item, daemon=True) for item in streams.items()]
    for t in threads:
        t.start()
    remaining = len(threads)
    while remaining:
        item = lines.get()
        if item is _DONE:
            remaining -= 1
        else:
            yield item


def _pod_lines(core, pod, namespace: str, follow: bool, since: Optional[int]) -> Iterator[str]:
    """A pod's log lines (the pod's single container) as text, streamed."""
    kwargs = {"name": pod.metadata.name, "namespace": namespace, "follow": follow, "_preload_content": False}
    if since:
        kwargs["since_seconds"] = since
    response = core.read_namespaced_pod_log(**kwargs)
    try:
        pending = b""
        for chunk in response.stream(4096):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                yield raw.decode("utf-8", errors="replace")
        if pending:
            yield pending.decode("utf-8", errors="replace")
    finally:
        response.release_conn()


def site_pods(core, release: str, namespace: str) -> dict[str, object]:
    """This release's pods that carry a site label, keyed ``site`` (or ``site/pod`` when several)."""
    selector = f"app.kubernetes.io/instance={release},{SITE_LABEL}"
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    if not pods:
        raise FedllmError(
            f"no pods with labels app.kubernetes.io/instance={release} and {SITE_LABEL} in namespace {namespace}; "
            "check the release name (`helm list -n NAMESPACE`)"
        )
    by_site: dict[str, list] = {}
    for pod in pods:
        by_site.setdefault(pod.metadata.labels[SITE_LABEL], []).append(pod)
    named = {}
    for site, site_pods_ in sorted(by_site.items()):
        for pod in site_pods_:
            # A site's job pods (launcher k8s) share its label; name them apart.
            named[site if len(site_pods_) == 1 else f"{site}/{pod.metadata.name}"] = pod
    return named


def follow_logs(
    release: str,
    namespace: str = "default",
    follow: bool = True,
    since: Optional[int] = None,
    out: TextIO = sys.stdout,
    core_api: Optional[Callable[[], object]] = None,
) -> int:
    """Print the logs of every site pod of ``release`` prefixed ``[site] ``; return lines printed.

    ``since`` is in seconds. Uses the kubeconfig, or the in-cluster ServiceAccount when run
    in a pod. ``core_api`` builds the CoreV1Api (default: kubernetes' own).
    """
    if core_api is None:
        core_api = _default_core_api
    core = core_api()
    pods = site_pods(core, release, namespace)
    streams = {name: _pod_lines(core, pod, namespace, follow, since) for name, pod in pods.items()}
    count = 0
    for line in merge_lines(streams):
        print(line, file=out, flush=True)
        count += 1
    return count


def _default_core_api():
    from kubernetes import client, config

    try:
        config.load_kube_config()
    except Exception:
        try:
            config.load_incluster_config()
        except Exception as e:
            raise FedllmError(f"no Kubernetes access: no kubeconfig (~/.kube/config, $KUBECONFIG) and not in a pod ({e})") from None
    return client.CoreV1Api()
