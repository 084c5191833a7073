"""What a run reserves on the Ray cluster, and what that leaves for Ray Data's read and decode tasks.

Trainers (or scoring actors, or Serve replicas) reserve their CPUs and GPUs for the whole run; Ray Data's read and
decode tasks need at least one more CPU each. On a cluster whose trainers take every CPU, the first batch never
arrives and the run waits forever (seen: `ray start --head --num-cpus=2`, 2 trainers x 1 CPU, 12 minutes of
nothing). So before anything starts, :func:`plan_resources` reads the cluster's size, subtracts the reservation and
:func:`ensure_capacity` fails fast, naming the numbers and the config fields to change; on a cluster that can grow
(an autoscaler: ``cluster.resource_wait_s`` > 0) it waits that long for the nodes first.

Imports Ray lazily and nothing of the training stack: serving and scoring use it too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["CapacityError", "ResourcePlan", "plan_resources", "ensure_capacity", "cluster_diagnosis",
           "DATA_TASK_CPUS"]

DATA_TASK_CPUS = 1.0  # what one Ray Data read/decode task asks for (map_batches' default num_cpus)


class CapacityError(RuntimeError):
    """The cluster cannot run this plan (and will not grow in time): exit 1 with this message."""


@dataclass
class ResourcePlan:
    workload: str  # train | score | serve
    what: str  # the reservation in words: "2 trainers x 1 CPU"
    reserved_cpus: float
    reserved_gpus: float
    cluster_cpus: float
    cluster_gpus: float
    grow_wait_s: float  # > 0: the cluster may grow (autoscaler); how long to wait for it
    fields: list[str] = field(default_factory=list)  # the config fields that set the reservation
    needs_data: bool = True  # Ray Data tasks must run beside the reservation (train, score)
    data_cpus_limit: float | None = None  # data.cpus: an explicit cap on Ray Data's CPUs

    @property
    def data_cpus(self) -> float:
        """CPUs left for Ray Data's read and decode tasks (an explicit ``data.cpus`` caps it)."""
        left = max(0.0, self.cluster_cpus - self.reserved_cpus)
        return min(left, self.data_cpus_limit) if self.data_cpus_limit is not None else left

    def problem(self) -> str | None:
        if self.reserved_gpus > self.cluster_gpus + 1e-9:
            return (f"{self.what} reserve {self.reserved_gpus:g} GPU but the cluster has {self.cluster_gpus:g}")
        if self.reserved_cpus > self.cluster_cpus + 1e-9:
            return (f"{self.what} reserve {self.reserved_cpus:g} CPU but the cluster has {self.cluster_cpus:g}")
        if self.needs_data and self.data_cpus + 1e-9 < DATA_TASK_CPUS:
            return (f"the cluster has {self.cluster_cpus:g} CPU and {self.what} reserve {self.reserved_cpus:g}, which "
                    f"leaves {self.data_cpus:g} CPU for Ray Data's read and decode tasks (each needs "
                    f"{DATA_TASK_CPUS:g}): no batch would ever arrive")
        return None

    def line(self) -> str:
        size = (f"may grow: waits up to {self.grow_wait_s:g} s for nodes" if self.grow_wait_s > 0 else "fixed size")
        gpus = f", {self.reserved_gpus:g} GPU" if self.reserved_gpus else ""
        data = f"; Ray Data gets {self.data_cpus:g} CPU" if self.needs_data else ""
        return (f"[vitray] resources: cluster {self.cluster_cpus:g} CPU, {self.cluster_gpus:g} GPU ({size}); "
                f"{self.what} reserve {self.reserved_cpus:g} CPU{gpus}{data}")


def _cluster_size() -> tuple[float, float]:
    import ray

    total = ray.cluster_resources()
    return float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))


def plan_resources(workload: str, what: str, reserved_cpus: float, reserved_gpus: float = 0.0, *,
                   fields: list[str] | None = None, grow_wait_s: float = 0.0, needs_data: bool = True,
                   data_cpus: float | None = None) -> ResourcePlan:
    """The plan against the cluster Ray is connected to now (``ray.init`` first)."""
    cpus, gpus = _cluster_size()
    return ResourcePlan(workload, what, reserved_cpus, reserved_gpus, cpus, gpus, grow_wait_s, list(fields or []),
                        needs_data, data_cpus)


def ensure_capacity(plan: ResourcePlan, *, poll_s: float = 5.0, log=print) -> ResourcePlan:
    """Return the plan when the cluster can run it; on a cluster that may grow, wait up to ``grow_wait_s`` for it
    (re-reading its size); else raise :class:`CapacityError` naming the numbers and the fields to change."""
    deadline = time.monotonic() + plan.grow_wait_s
    announced = False
    while (problem := plan.problem()) is not None and time.monotonic() < deadline:
        if not announced:
            log(f"[vitray] waiting up to {plan.grow_wait_s:g} s for the cluster to grow: {problem}")
            announced = True
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        plan.cluster_cpus, plan.cluster_gpus = _cluster_size()
    if problem is None:
        return plan
    waited = f" (waited {plan.grow_wait_s:g} s for it to grow)" if plan.grow_wait_s > 0 else \
        " (a fixed-size cluster: set cluster.resource_wait_s where an autoscaler adds nodes)"
    starved = plan.needs_data and plan.reserved_cpus <= plan.cluster_cpus and plan.reserved_gpus <= plan.cluster_gpus
    fix = f" so that at least {DATA_TASK_CPUS:g} CPU is left for Ray Data" if starved else ""
    raise CapacityError(f"{plan.workload}: {problem}{waited}. Change {' or '.join(plan.fields)}{fix}, or add "
                        f"{'CPUs' if starved else 'nodes'} to the cluster")


def cluster_diagnosis() -> str:
    """Ray's view when something waits: CPUs and GPUs available of the total, and the pending resource demands (what
    `ray status` lists as Pending Demands). Best effort: never raises."""
    try:
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
        parts = [f"cluster {free.get('CPU', 0):g}/{total.get('CPU', 0):g} CPU and {free.get('GPU', 0):g}/"
                 f"{total.get('GPU', 0):g} GPU free"]
    except Exception as err:  # noqa: BLE001
        return f"(cluster state unavailable: {err})"
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
        demands = []
        for d in status.resource_demands.ray_task_actor_demand:
            for b in d.bundles_by_count:
                demands.append(f"{b.bundle} x {b.count}")
        for d in status.resource_demands.placement_group_demand:
            for b in d.bundles_by_count:
                demands.append(f"placement group {b.bundle} x {b.count}")
        parts.append("pending demands: " + (", ".join(demands) if demands else "none"))
    except Exception as err:  # noqa: BLE001 - older Ray or no autoscaler state: the free/total figures still help
        parts.append(f"pending demands unavailable ({type(err).__name__})")
    return "; ".join(parts)
