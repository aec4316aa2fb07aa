"""Where the Ray pool puts its workers (:class:`evomerge.driver.nodes.NodePlacer`), on a described cluster.

The placer reads only ``ray.nodes()`` when it checks no sources, so these cases need no Ray: a stand-in lists
the nodes. The same placer on a real multi-node cluster, with source checks, is in ``test_cluster.py``.
"""

from __future__ import annotations

from evomerge.driver.nodes import NodePlacer


class Nodes:
    """A stand-in for the ``ray`` module: only ``nodes()``."""

    def __init__(self, nodes):
        self.list = nodes

    def nodes(self):
        return self.list


def node(nid, alive=True, **res):
    return {"NodeID": nid, "Alive": alive, "NodeManagerAddress": "10.0.0.1", "Resources": res}


def test_workers_are_spread_and_never_exceed_a_nodes_resources():
    ray = Nodes([node("a", CPU=4.0, GPU=2.0), node("b", CPU=8.0, GPU=1.0), node("head", CPU=16.0)])
    p = NodePlacer(ray, cpus=1, gpus=1, custom={})
    p.refresh(force=True)
    assert p.capacity("a") == 2 and p.capacity("b") == 1 and "head" not in p.nodes  # no GPU: holds no worker
    chosen = [p.choose() for _ in range(4)]
    assert sorted(chosen[:3]) == ["a", "a", "b"] and chosen[:2] != ["a", "a"]  # spread, then filled
    assert chosen[3] is None  # no room left: the worker waits
    p.release("b")
    assert p.choose() == "b"


def test_a_node_that_dies_loses_its_places_and_a_joining_node_gets_them():
    ray = Nodes([node("a", CPU=1.0, slot=1.0), node("b", CPU=1.0, slot=1.0)])
    p = NodePlacer(ray, cpus=1, gpus=0, custom={"slot": 1}, every_s=0.0)
    p.refresh(force=True)
    assert {p.choose(), p.choose()} == {"a", "b"}
    ray.list = [node("a", alive=False, CPU=1.0, slot=1.0), node("b", CPU=1.0, slot=1.0)]
    p.release("a")
    p.refresh(force=True)
    assert p.choose() is None  # a is dead and b is full
    ray.list.append(node("c", CPU=2.0, slot=1.0))
    p.refresh()
    assert p.choose() == "c" and p.choose() is None
    ray.list.append(node("d", CPU=2.0))  # without the custom resource: never
    p.refresh()
    assert "d" not in p.nodes and p.choose() is None
