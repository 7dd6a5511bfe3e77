"""Whether the Ray cluster's nodes can hold a job's workers, checked before any worker is asked for.

Ray Train waits, silently and forever, for workers that no node can hold (and Ray Data for CPUs
that the workers hold): a job stops here instead with what is missing and what to change.
"""

from __future__ import annotations

import math

from raylm.spec.reading import SpecError


def workers_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float], one_per_node: bool) -> int:
    """How many workers of `per_worker` resources the nodes' total resources hold."""
    count = 0
    for total in nodes:
        slots = min(math.floor(total.get(name, 0.0) / amount + 1e-9) for name, amount in per_worker.items())
        count += min(slots, 1) if one_per_node else slots
    return count


def check_cluster(output: str, resources, what: str = "training workers", field: str = "resources") -> None:
    """Raise SpecError, naming every problem at once, when the connected cluster cannot run the job:
    its nodes cannot hold the workers, or its output is a local path that other nodes do not see.
    `field`: where the spec holds `resources`."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    problems = [
        problem
        for problem in (
            capacity_problem(alive, resources, what, field),
            output_problem(alive, output, resources, field),
        )
        if problem
    ]
    if problems:
        raise SpecError(problems)


def capacity_problem(alive: list[dict], resources, what: str, field: str) -> tuple[str, str] | None:
    """When the alive nodes cannot hold `resources`' minimum workers (unless `resources.autoscale`: an
    autoscaler may add nodes): what is missing and what to change."""
    if resources.autoscale:
        return None
    nodes = [n["Resources"] for n in alive]
    per_worker = resources.per_worker
    needed = resources.min_workers
    fits = workers_that_fit(nodes, per_worker, resources.placement == "strict_spread")
    if fits >= needed:
        return None
    have = ", ".join(
        "/".join(
            f"{int(n.get(k, 0)) if float(n.get(k, 0)).is_integer() else n.get(k, 0)} {k}" for k in per_worker
        )
        for n in nodes
    )
    each = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
    spread = " one per node (placement: strict_spread)," if resources.placement == "strict_spread" else ""
    return (
        field,
        f"the cluster's {len(nodes)} node(s) ({have}) hold {fits} of the {needed} {what} "
        f"of {each} each{spread} that this job needs, so it would wait forever: lower "
        f"{field}.num_workers or {field}.cpus_per_worker / gpus_per_worker, add nodes, or "
        f"on an autoscaling cluster set {field}.autoscale: true",
    )


def output_problem(alive: list[dict], output: str, resources, field: str) -> tuple[str, str] | None:
    """When `output` is a local path and more than one node is alive: workers on the other nodes would
    write their files where no one reads them (unless the spec says the nodes share a filesystem)."""
    from raylm.runtime.storage import is_uri

    if is_uri(output) or resources.shared_filesystem or len(alive) <= 1:
        return None
    return (
        "output",
        f"{output} is a local path, and this cluster has {len(alive)} nodes with disks of their "
        f"own: use a storage URI (s3://bucket/prefix, gs://...), or set "
        f"{field}.shared_filesystem: true if every node sees this path",
    )
