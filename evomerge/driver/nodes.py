"""The nodes of a Ray cluster that may hold workers: the preflight source check, and where each worker goes.

* :func:`check_cluster_sources` (preflight, before anything is written): every node that can hold a worker
  must open every source folder; the first that cannot stops the run with a
  :class:`~evomerge.errors.ConfigError` naming the node and the paths.
* :class:`NodePlacer` (during the run): the pool asks it for the node of each new worker actor. A node that
  joins the cluster later (an autoscaling cluster, a node brought back) is checked the same way before any
  worker is placed on it; a node that fails the check is named once in the log and never given a worker, so a
  run in progress keeps going on the nodes that see the sources. Workers are spread over the checked nodes
  (fewest workers first, up to what each node's resources hold); a worker that finds no room waits, unplaced,
  until a node has room.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

#: Seconds each node has to answer the source check of :func:`check_cluster_sources`.
NODE_CHECK_TIMEOUT_S = 120.0


def worker_nodes(nodes: list[dict[str, Any]], *, cpus: float, gpus: float, custom: dict[str, float]) -> list[dict]:
    """The alive nodes of ``ray.nodes()`` whose total resources can hold one worker."""
    need = _need(cpus, gpus, custom)
    return [n for n in nodes if n.get("Alive") and all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items())]


def _need(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}


def node_label(node: dict[str, Any]) -> str:
    """``ADDRESS (id 1a2b3c4d5e6f)``: how errors name a Ray node."""
    return f"{node.get('NodeManagerAddress', '?')} (id {str(node.get('NodeID', '?'))[:12]})"


def unreadable_sources(sources: dict[str, str]) -> list[tuple[str, str, str]]:
    """On one node: ``(name, path, why)`` for each source folder this node cannot open (headers read, no weights)."""
    from evomerge.errors import EvomergeError
    from evomerge.io import ModelFolder

    out = []
    for name, path in sources.items():
        try:
            ModelFolder.open(path).close()
        except (EvomergeError, OSError) as exc:
            out.append((name, path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    return out


def describe_problems(problems: list[tuple[str, str, str]]) -> str:
    """``'base': /path: why; ...`` (the path is not repeated when the reason already names it)."""
    return "; ".join(f"{name!r}: {why if path in why else f'{path}: {why}'}" for name, path, why in problems)


_REMOTE_CHECK: Any = None


def _probe(ray: Any, node: dict[str, Any], sources: dict[str, str]) -> Any:
    """Start the source check on ``node`` (one remote function for every check: Ray exports it once)."""
    global _REMOTE_CHECK
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if _REMOTE_CHECK is None:
        _REMOTE_CHECK = ray.remote(num_cpus=0, max_retries=0)(unreadable_sources)
    strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    return _REMOTE_CHECK.options(scheduling_strategy=strategy).remote(sources)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_cluster_sources(resources: Any, sources: dict[str, str]) -> None:
    """Join the cluster at ``resources.address`` and check on every node that can hold a worker that it can open
    every source folder (its headers are read, no weights); a :class:`~evomerge.errors.ConfigError` names the
    first node and the source paths it cannot open. Nodes that join later are checked by :class:`NodePlacer`.
    """
    from evomerge.driver.pool import init_ray
    from evomerge.errors import ConfigError

    ray = init_ray(address=resources.address, num_cpus=None, num_gpus=None, temp_dir=None)
    from ray.exceptions import GetTimeoutError, RayError

    nodes = worker_nodes(ray.nodes(), cpus=resources.cpus_per_worker, gpus=resources.gpus_per_worker,
                         custom=dict(resources.custom_resources_per_worker))
    if not nodes:
        log.warning("resources.address: no node of the cluster has the resources of one worker yet; nodes are "
                    "checked as they join")
        return
    refs = [_probe(ray, n, sources) for n in nodes]
    for node, ref in zip(nodes, refs, strict=True):
        try:
            problems = ray.get(ref, timeout=NODE_CHECK_TIMEOUT_S)
        except GetTimeoutError:
            raise ConfigError(f"resources.address: node {node_label(node)} did not answer the source check within "
                              f"{NODE_CHECK_TIMEOUT_S:.0f} s") from None
        except RayError as exc:
            raise ConfigError(f"resources.address: the source check failed on node {node_label(node)}: "
                              f"{_first_line(exc)}") from None
        if problems:
            raise ConfigError(f"sources: node {node_label(node)} cannot read {len(problems)} source folder(s) "
                              f"({describe_problems(problems)}); every node that runs workers must see the same paths")
    log.info("every source folder is readable on the %d worker node(s) of the cluster", len(nodes))


class NodePlacer:
    """Which node each new worker actor goes to (see the module docstring).

    ``sources=None`` places on every node with room, unchecked. ``refresh()`` reads the cluster's nodes
    (at most every ``every_s`` seconds unless forced), starts the source check of nodes not seen before and
    collects finished checks; ``choose()`` returns the node id for one more worker, or ``None`` when no
    checked node has room.
    """

    def __init__(self, ray: Any, *, cpus: float, gpus: float, custom: dict[str, float],
                 sources: dict[str, str] | None = None, every_s: float = 2.0) -> None:
        self.ray = ray
        self.need = {k: v for k, v in _need(cpus, gpus, custom).items() if v > 0}
        self.custom = dict(custom)
        self.cpus, self.gpus = cpus, gpus
        self.sources = sources
        self.every_s = every_s
        self.nodes: dict[str, dict[str, Any]] = {}  # alive nodes that can hold a worker, by id
        self.ok: set[str] = set()
        self.bad: dict[str, str] = {}  # node id -> why it gets no worker
        self.probes: dict[Any, dict[str, Any]] = {}
        self.placed: Counter[str] = Counter()
        self._read_at = -math.inf

    def capacity(self, node_id: str) -> float:
        """How many workers the node's total resources hold."""
        res = self.nodes[node_id].get("Resources", {})
        return min((res.get(k, 0.0) // v for k, v in self.need.items()), default=math.inf)

    def refresh(self, *, force: bool = False, timeout: float = 0.0) -> None:
        now = time.monotonic()
        if force or now - self._read_at >= self.every_s:
            self._read_at = now
            alive = worker_nodes(self.ray.nodes(), cpus=self.cpus, gpus=self.gpus, custom=self.custom)
            self.nodes = {n["NodeID"]: n for n in alive}
            self.ok &= set(self.nodes)
            probing = {n["NodeID"] for n in self.probes.values()}
            for nid, node in self.nodes.items():
                if nid in self.ok or nid in self.bad or nid in probing:
                    continue
                if self.sources is None:
                    self.ok.add(nid)
                else:
                    self.probes[_probe(self.ray, node, self.sources)] = node
        if self.probes:
            self._collect(timeout)

    def _collect(self, timeout: float) -> None:
        from ray.exceptions import RayError

        ready, _ = self.ray.wait(list(self.probes), num_returns=len(self.probes), timeout=timeout)
        for ref in ready:
            node = self.probes.pop(ref)
            nid = node["NodeID"]
            try:
                problems = self.ray.get(ref)
                why = (f"it cannot read {len(problems)} source folder(s) ({describe_problems(problems)})"
                       if problems else None)
            except RayError as exc:
                why = f"its source check failed: {_first_line(exc)}"
            if why is None:
                self.ok.add(nid)
                log.info("node %s joined: it sees every source folder", node_label(node))
            else:
                self.bad[nid] = why
                log.warning("node %s gets no worker: %s; every node that runs workers must see the same paths",
                            node_label(node), why)

    def choose(self) -> str | None:
        room = [nid for nid in self.ok if nid in self.nodes and self.placed[nid] < self.capacity(nid)]
        if not room:
            return None
        nid = min(room, key=lambda n: (self.placed[n], n))
        self.placed[nid] += 1
        return nid

    def release(self, node_id: str | None) -> None:
        if node_id is not None and self.placed[node_id] > 0:
            self.placed[node_id] -= 1


__all__ = ["NODE_CHECK_TIMEOUT_S", "NodePlacer", "check_cluster_sources", "describe_problems", "node_label",
           "unreadable_sources", "worker_nodes"]
