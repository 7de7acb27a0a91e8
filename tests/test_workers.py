"""tests/fixtures/workers.py: the units of work of ``make test``'s xdist workers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures.workers import CLUSTER_GROUP, module_scheduling, unit_of

pytest.importorskip("xdist")
ROOT = Path(__file__).resolve().parents[1]


def test_a_module_is_a_unit_and_the_cluster_modules_are_one():
    assert unit_of("tests/test_docs.py::test_readme_is_short", ROOT) == "tests/test_docs.py"
    assert unit_of("tests/test_docs.py::TestX::test_y[a::b]", ROOT) == "tests/test_docs.py"
    for module in ("test_cluster", "test_faults", "test_remote_storage"):
        assert unit_of(f"tests/{module}.py::test_x", ROOT) == CLUSTER_GROUP


class _Node:
    """What the scheduler sends a worker."""

    def __init__(self, name: str):
        self.gateway = SimpleNamespace(id=name)
        self.sent: list[list[int]] = []
        self.shutting_down = False

    def send_runtest_some(self, indexes):
        self.sent.append(list(indexes))

    def shutdown(self):
        self.shutting_down = True


def test_the_cluster_unit_is_handed_out_first_and_whole():
    config = SimpleNamespace(rootpath=ROOT, getvalue=lambda name: {"tx": ["2*popen"]}[name],
                             option=SimpleNamespace(loadscopereorder=True))  # fmt: skip
    collection = [
        *(f"tests/test_buckets.py::test_{i}" for i in range(4)),  # the most tests: first by count
        "tests/test_cluster.py::test_c", "tests/test_docs.py::test_d",
        "tests/test_faults.py::test_e", "tests/test_remote_storage.py::test_f",
        "tests/test_schedule.py::TestS::test_g", "tests/test_schedule.py::test_h",
    ]  # fmt: skip
    sched = module_scheduling(config)
    nodes = [_Node("gw0"), _Node("gw1")]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, collection)
    sched.schedule()
    first = nodes[0].sent[0]
    assert [collection[i] for i in first] == [
        "tests/test_cluster.py::test_c", "tests/test_faults.py::test_e",
        "tests/test_remote_storage.py::test_f",
    ]  # fmt: skip
    units = [[collection[i].split("::")[0] for i in sent] for n in nodes for sent in n.sent]
    assert sorted(len(set(u)) for u in units[1:]) == [1] * (len(units) - 1)  # a module each
    queued = [collection.index(t) for unit in sched.workqueue.values() for t in unit]
    sent = sorted([i for n in nodes for s in n.sent for i in s] + queued)
    assert sent == list(range(len(collection)))  # every test once: sent, or queued whole
