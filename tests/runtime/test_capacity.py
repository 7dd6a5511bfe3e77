"""Whether the cluster's nodes can run a job, checked before any worker is asked for: each problem on its
own, both at once, under the field where the spec holds them (a search's under base.resources)."""

import pytest

from raylm.runtime.capacity import capacity_problem, output_problem
from raylm.spec.sections import ResourcesSpec

pytestmark = pytest.mark.quick

TWO_NODES = [{"Resources": {"CPU": 2.0}}, {"Resources": {"CPU": 2.0}}]


def test_workers_no_node_can_hold_are_named_with_the_fix():
    resources = ResourcesSpec(num_workers=3, cpus_per_worker=2)
    field, message = capacity_problem(TWO_NODES, resources, "training workers", "resources")
    assert field == "resources"
    assert "hold 2 of the 3 training workers of 2 CPU each" in message
    assert "lower resources.num_workers" in message and "resources.autoscale: true" in message
    field, message = capacity_problem(TWO_NODES, resources, "training workers of one trial", "base.resources")
    assert field == "base.resources" and "lower base.resources.num_workers" in message
    assert (
        capacity_problem(TWO_NODES, ResourcesSpec(num_workers=2, cpus_per_worker=2), "w", "resources") is None
    )
    spread = ResourcesSpec(num_workers=3, placement="strict_spread")  # one per node: 2 of 3
    assert "one per node" in capacity_problem(TWO_NODES, spread, "training workers", "resources")[1]
    autoscaling = ResourcesSpec(num_workers=3, cpus_per_worker=2, autoscale=True)
    assert capacity_problem(TWO_NODES, autoscaling, "training workers", "resources") is None


def test_a_local_output_on_several_nodes_is_named_with_the_fix():
    resources = ResourcesSpec(num_workers=2)
    field, message = output_problem(TWO_NODES, "/runs/x", resources, "base.resources")
    assert field == "output" and "/runs/x is a local path, and this cluster has 2 nodes" in message
    assert "base.resources.shared_filesystem: true" in message
    assert output_problem(TWO_NODES[:1], "/runs/x", resources, "resources") is None  # one node: its disk
    assert output_problem(TWO_NODES, "s3://bucket/runs/x", resources, "resources") is None
    shared = ResourcesSpec(num_workers=2, shared_filesystem=True)
    assert output_problem(TWO_NODES, "/runs/x", shared, "resources") is None


def test_both_problems_are_reported_at_once(monkeypatch):
    import ray

    from raylm.runtime.capacity import check_cluster
    from raylm.spec.reading import SpecError

    alive = [{**node, "Alive": True} for node in TWO_NODES] + [{"Resources": {"CPU": 8.0}, "Alive": False}]
    monkeypatch.setattr(ray, "nodes", lambda: alive)  # a dead node holds nothing
    with pytest.raises(SpecError) as err:
        check_cluster("/runs/x", ResourcesSpec(num_workers=3, cpus_per_worker=2))
    assert [field for field, _ in err.value.problems] == ["resources", "output"]
