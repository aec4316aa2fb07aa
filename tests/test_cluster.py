"""A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head holding no workers and two
worker nodes, joined by the driver through ``resources.address``.

* a node that cannot see a source path stops the run at preflight, exit 2, naming the node and the path. On one
  machine every node shares the file system, so the test gives the sources as ``/proc/self/cwd/...`` paths, which
  each process resolves against its own working folder, and starts the blind node's processes in another one;
* a worker node removed mid-run (its raylet and every process on it killed, not only an actor): its in-flight
  candidate is run again on the other node, the budget is met, and the archive holds each evaluation once.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.archive import Archive
from evomerge.testing.family import build_family, write_perplexity_suite, write_run_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

#: The custom resource the run's workers ask for: the head has none, so every worker runs on a worker node.
SLOT = "merge_worker"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    home = tmp_path_factory.mktemp("home")
    fam = build_family(home / "fam", 2)
    suite = write_perplexity_suite(home / "suite")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    small = {"object_store_memory": 80_000_000}
    # a lost node is declared dead after ~1.5 s instead of Ray's default ~30 s
    fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast, **small})
    old = os.getcwd()
    os.chdir(home)  # a node's processes work in the folder it was started from
    try:
        nodes = {name: c.add_node(num_cpus=2, resources={SLOT: 2, name: 1}, **small) for name in ("node_a", "node_b")}
    finally:
        os.chdir(old)
    c.wait_for_nodes()
    try:
        yield c, nodes, home, fam, suite
    finally:
        ray.shutdown()
        c.shutdown()


def _node_id(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def _config(path: Path, fam, suite, address: str, **kw) -> Path:
    extra = {"resources": {"backend": "ray", "workers": 2, "address": address,
                           "custom_resources_per_worker": {SLOT: 1}}, "fidelity": {"rescore_test": False}}
    return write_run_config(path, fam, suite, optimizer="random", options={}, extra=extra, **kw)


def test_a_node_that_cannot_see_a_source_path_fails_at_preflight(cluster, tmp_path, monkeypatch):
    c, _, home, fam, suite = cluster
    if not Path("/proc/self/cwd").exists():
        pytest.skip("needs /proc/self/cwd (Linux)")
    # a third worker node working in another folder: /proc/self/cwd/fam/... is not there
    monkeypatch.chdir(tmp_path)
    blind = c.add_node(num_cpus=1, resources={SLOT: 1, "node_c": 1}, object_store_memory=80_000_000)
    c.wait_for_nodes()
    monkeypatch.chdir(home)  # the driver, on the head, and the other two nodes see the sources
    per_process = {k: "/proc/self/cwd/" + str(Path(v).relative_to(home)) for k, v in fam.items()}
    cfg = _config(tmp_path / "blind.yaml", per_process, suite, c.address, name="blind", evals=2)
    try:
        res = CliRunner().invoke(__import__("evomerge.cli", fromlist=["app"]).app, ["run", str(cfg)])
        node = _node_id("node_c")
    finally:
        c.remove_node(blind)
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert f"node {c.address.split(':')[0]} (id {node[:12]})" in line
    assert "cannot read 3 source folder(s)" in line
    assert "'base': /proc/self/cwd/fam/base" in line and "'m2': /proc/self/cwd/fam/m2" in line
    assert "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_worker_node_removed_mid_run_loses_and_repeats_nothing(cluster, tmp_path):
    from evomerge.driver.pool import ray_pool
    from evomerge.driver.run import start_run
    from evomerge.driver.worker import Worker
    from evomerge.results import RunResults

    c, nodes, _, fam, suite = cluster
    cfg = _config(tmp_path / "lost.yaml", fam, suite, c.address, name="lost", evals=4)
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    doomed, other = _node_id("node_a"), _node_id("node_b")
    stalled = tmp_path / "stalled"

    class Stalling(Worker):
        """On the doomed node, the first searched candidate never finishes (the node goes away under it)."""

        def evaluate(self, job):
            if job.candidate_id >= 0 and ray.get_runtime_context().get_node_id() == doomed \
                    and not stalled.exists():
                stalled.write_text(str(job.candidate_id))
                time.sleep(300)
            return super().evaluate(job)

    def remove_when_stalled() -> None:
        deadline = time.monotonic() + 120
        while not stalled.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if stalled.exists():
            c.remove_node(nodes["node_a"], allow_graceful=False)

    remover = threading.Thread(target=remove_when_stalled, daemon=True)
    remover.start()
    run_dir = start_run(cfg, pool_factory=lambda prep, _: ray_pool(lambda: Stalling(prep.spec), prep.cfg.resources))
    remover.join(5)
    assert stalled.exists(), "no searched candidate ran on the doomed node"
    lost = int(stalled.read_text())
    assert not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == doomed)
    with Archive(run_dir / "archive.sqlite", readonly=True) as a:
        records = a.records(split=None)
    keys = Counter((r.candidate_id, r.split, r.result.fidelity) for r in records)
    assert [k for k, n in keys.items() if n > 1] == []  # nothing evaluated twice
    r = RunResults(run_dir)
    searched = sorted((x for x in r.calib if x.candidate_id >= 0), key=lambda x: x.candidate_id)
    assert [x.candidate_id for x in searched] == list(range(4)) and all(x.ok for x in searched)  # budget met
    where = {x.candidate_id: x.result.worker.split("@")[1] for x in r.calib}
    assert where[lost] == other[:8]  # the lost candidate ran again, on the node that is left
    assert set(where.values()) <= {doomed[:8], other[:8]}  # no worker on the head


def test_nodes_that_join_mid_run_are_checked_before_they_get_workers(cluster, tmp_path, monkeypatch):
    """No node has the workers' resource when the run starts; a node that cannot see the sources joins, then one
    that can: the first is named in the log and never given a worker, every evaluation runs on the second. The
    run is an ``evomerge run`` process joined to the cluster (Ray adds nodes only from the main thread here)."""
    import subprocess
    import sys

    from evomerge.results import RunResults

    c, _, home, fam, suite = cluster
    if not Path("/proc/self/cwd").exists():
        pytest.skip("needs /proc/self/cwd (Linux)")
    monkeypatch.chdir(home)
    per_process = {k: "/proc/self/cwd/" + str(Path(v).relative_to(home)) for k, v in fam.items()}
    cfg = _config(tmp_path / "late.yaml", per_process, suite, c.address, name="late", evals=3)
    text = cfg.read_text().replace(f"{SLOT}: 1", "late_slot: 1")
    assert "late_slot: 1" in text
    cfg.write_text(text)
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", str(cfg)], cwd=home, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    added = []
    try:
        deadline = time.monotonic() + 120
        while "wait for a worker" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "wait for a worker" in log.read_text(), log.read_text()[-2000:]
        monkeypatch.chdir(tmp_path)  # the blind node's processes work where /proc/self/cwd/fam/... is not
        added.append(c.add_node(num_cpus=1, resources={"late_slot": 1, "late_blind": 1},
                                object_store_memory=80_000_000))
        monkeypatch.chdir(home)
        blind = _node_id("late_blind")
        deadline = time.monotonic() + 120
        while "gets no worker" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        added.append(c.add_node(num_cpus=1, resources={"late_slot": 1, "late_good": 1},
                                object_store_memory=80_000_000))
        good = _node_id("late_good")
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        for node in added:
            c.remove_node(node)
    output = " ".join(log.read_text().split())
    assert f"(id {blind[:12]}) gets no worker: it cannot read 3 source folder(s)" in output
    assert f"(id {good[:12]}) joined: it sees every source folder" in output
    r = RunResults(tmp_path / "runs" / "late")
    searched = [x for x in r.calib if x.candidate_id >= 0]
    assert len(searched) == 3 and all(x.ok for x in searched)  # the budget is met
    assert {x.result.worker.split("@")[1] for x in r.calib} == {good[:8]}  # only the node that sees the sources
