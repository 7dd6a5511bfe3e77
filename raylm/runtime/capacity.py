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


def check_capacity(resources, what: str = "training workers") -> None:
    """Raise SpecError when the connected cluster's nodes cannot hold `resources`' minimum workers
    (unless `resources.autoscale`: an autoscaler may add nodes)."""
    import ray

    if resources.autoscale:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    per_worker = resources.per_worker
    needed = resources.min_workers
    fits = workers_that_fit(nodes, per_worker, resources.placement == "strict_spread")
    if fits >= needed:
        return
    have = ", ".join(
        "/".join(
            f"{int(n.get(k, 0)) if float(n.get(k, 0)).is_integer() else n.get(k, 0)} {k}" for k in per_worker
        )
        for n in nodes
    )
    each = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
    spread = " one per node (placement: strict_spread)," if resources.placement == "strict_spread" else ""
    raise SpecError(
        [
            (
                "resources",
                f"the cluster's {len(nodes)} node(s) ({have}) hold {fits} of the {needed} {what} "
                f"of {each} each{spread} that this job needs, so it would wait forever: lower "
                "resources.num_workers or resources.cpus_per_worker / gpus_per_worker, add nodes, or "
                "on an autoscaling cluster set resources.autoscale: true",
            )
        ]
    )


def check_output_reachable(output: str, resources, resources_field: str = "resources") -> None:
    """Raise SpecError when `output` is a local path and the connected cluster has more than one alive
    node: workers on the other nodes would write their files where no one reads them (unless the
    spec says the nodes share a filesystem)."""
    import ray

    from raylm.runtime.storage import is_uri

    if is_uri(output) or resources.shared_filesystem:
        return
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        raise SpecError(
            [
                (
                    "output",
                    f"{output} is a local path, and this cluster has {len(alive)} nodes with disks of their "
                    f"own: use a storage URI (s3://bucket/prefix, gs://...), or set "
                    f"{resources_field}.shared_filesystem: true if every node sees this path",
                )
            ]
        )
