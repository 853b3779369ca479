"""`fedllm logs`: the per-site prefixing and merging, on real concurrent generators.

A live test against a cluster is marked `cluster` and needs FEDLLM_LIVE_RELEASE and a kubeconfig.
"""

import json
import os
import threading
import time

import pytest

from fedllm.deploy.logs import follow_logs, merge_lines


def training_events(site: str, steps: int, pause: float, started: threading.Barrier):
    """What a site pod prints: JSON event lines interleaved with NVFlare log lines."""
    started.wait()
    for step in range(steps):
        yield "2026-01-01 00:00:00,000 - ClientRunner - INFO - task received\n"
        yield json.dumps({"event": "step", "site": site, "round": 0, "step": step, "loss": 2.0 - step / 10,
                          "tokens_per_s": 1000.0, "bytes_sent": 0, "bytes_received": 0, "ts": time.time()}) + "\n"
        time.sleep(pause)


def test_lines_are_prefixed_by_site_and_never_torn():
    started = threading.Barrier(3)
    streams = {site: training_events(site, 20, 0.001, started) for site in ("site-1", "site-2", "site-3")}
    lines = list(merge_lines(streams))
    assert len(lines) == 3 * 20 * 2
    per_site = {}
    for line in lines:
        prefix, _, rest = line.partition("] ")
        site = prefix.lstrip("[")
        per_site.setdefault(site, []).append(rest)
        if rest.startswith("{"):
            assert json.loads(rest)["site"] == site  # whole JSON object, from its own site
    assert sorted(per_site) == ["site-1", "site-2", "site-3"]
    for site, rest in per_site.items():  # each site's own order is kept
        steps = [json.loads(r)["step"] for r in rest if r.startswith("{")]
        assert steps == list(range(20))


def test_streams_are_merged_as_they_arrive_not_one_after_another():
    started = threading.Barrier(2)
    streams = {"slow": training_events("slow", 5, 0.05, started), "fast": training_events("fast", 5, 0.01, started)}
    order = [line.split("]")[0] for line in merge_lines(streams) if '"event"' in line]
    # the fast site finishes while the slow one is still training
    assert order.index("[fast") < order.index("[slow") + 2
    assert order[-1] == "[slow"


def test_a_failing_stream_ends_with_an_error_line_and_others_continue():
    def broken():
        yield "first\n"
        raise ConnectionError("pod deleted")

    lines = list(merge_lines({"site-1": broken(), "site-2": iter(["a\n", "b\n"])}))
    assert "[site-1] first" in lines
    assert "[site-1] error: log stream ended: pod deleted" in lines
    assert [l for l in lines if l.startswith("[site-2]")] == ["[site-2] a", "[site-2] b"]


@pytest.mark.cluster
@pytest.mark.skipif(not os.environ.get("FEDLLM_LIVE_RELEASE"), reason="set FEDLLM_LIVE_RELEASE and a kubeconfig")
def test_live_cluster_logs(capsys):
    release = os.environ["FEDLLM_LIVE_RELEASE"]
    count = follow_logs(release, os.environ.get("FEDLLM_LIVE_NAMESPACE", "default"), follow=False, since=600)
    assert count > 0
    assert all(line.startswith("[") for line in capsys.readouterr().out.splitlines())
