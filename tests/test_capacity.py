"""The resource plan (what trainers/actors reserve, what is left for Ray Data) and the stall watchdog.

The fail-fast checks against a real `ray start --head --num-cpus=2` cluster are in test_submit.py (its head)."""
from __future__ import annotations

import threading
import time

import pytest

from vitray.capacity import CapacityError, ResourcePlan, ensure_capacity
from vitray.watchdog import DataStallError, watched


def _plan(cpus=2.0, gpus=0.0, reserved=2.0, reserved_gpus=0.0, wait=0.0, needs_data=True, data_cpus=None):
    return ResourcePlan("train", "2 trainers x 1 CPU", reserved, reserved_gpus, cpus, gpus, wait,
                        ["cluster.num_workers", "cluster.cpus_per_worker"], needs_data, data_cpus)


def test_a_reservation_of_every_cpu_fails_fast_naming_numbers_and_fields():
    with pytest.raises(CapacityError) as err:
        ensure_capacity(_plan())
    msg = str(err.value)
    assert "the cluster has 2 CPU and 2 trainers x 1 CPU reserve 2" in msg and "leaves 0 CPU for Ray Data" in msg
    assert "cluster.num_workers or cluster.cpus_per_worker" in msg and "fixed-size cluster" in msg
    plan = ensure_capacity(_plan(cpus=3))
    assert plan.data_cpus == 1 and "Ray Data gets 1 CPU" in plan.line() and "fixed size" in plan.line()
    assert _plan(cpus=8, data_cpus=2).data_cpus == 2  # data.cpus caps Ray Data's share
    # more GPUs asked than the cluster has: the trainers would never be placed
    with pytest.raises(CapacityError, match="reserve 8 GPU but the cluster has 4"):
        ensure_capacity(_plan(cpus=96, gpus=4, reserved=8, reserved_gpus=8))
    # serving needs no data tasks: a reservation that fits exactly is fine
    assert ensure_capacity(_plan(needs_data=False)).problem() is None


def test_a_cluster_that_may_grow_is_waited_for(monkeypatch):
    import vitray.capacity as capacity

    sizes = iter([(2.0, 0.0), (2.0, 0.0), (6.0, 0.0)])
    monkeypatch.setattr(capacity, "_cluster_size", lambda: next(sizes))
    lines = []
    plan = ensure_capacity(_plan(wait=30), poll_s=0.01, log=lines.append)
    assert plan.cluster_cpus == 6 and plan.data_cpus == 4
    assert lines and "waiting up to 30 s for the cluster to grow" in lines[0]
    monkeypatch.setattr(capacity, "_cluster_size", lambda: (2.0, 0.0))
    with pytest.raises(CapacityError, match=r"waited 0.2 s for it to grow"):
        ensure_capacity(_plan(wait=0.2), poll_s=0.01, log=lines.append)


def test_watched_passes_items_and_errors_through_and_raises_on_a_stall():
    assert list(watched(range(5), 2.0)) == [0, 1, 2, 3, 4]
    assert list(watched(range(3), 0)) == [0, 1, 2]  # disabled

    def failing():
        yield 1
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        list(watched(failing(), 2.0))
    release = threading.Event()

    def stalling():
        yield "a"
        release.wait(30)  # a decode task that never gets a CPU
        yield "b"

    got = []
    t0 = time.monotonic()
    with pytest.raises(DataStallError) as err:
        for item in watched(stalling(), 0.5, pipeline_state=lambda: "MapBatches(decode): 0/8 tasks\nqueued 8",
                            fields="cluster.num_workers"):
            got.append(item)
    release.set()
    assert got == ["a"] and time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "data stall: no batch arrived for 0.5 s (after 1 batch)" in msg
    assert "change cluster.num_workers" in msg
    assert err.value.details == "pipeline: MapBatches(decode): 0/8 tasks | queued 8"


@pytest.mark.slow
def test_training_whose_decode_tasks_never_get_a_cpu_fails_with_the_stall_message(ray_cluster, tmp_path):
    """Other work holds the CPUs that the plan counted on for Ray Data (a shared cluster): the trainer gets its CPU,
    the decode tasks never do. The attempt ends with the stall message (and Ray's pending demands) after
    cluster.stall_timeout_s, instead of waiting forever."""
    import ray

    from recipes import make_cfg
    from vitray.data.pack import pack
    from vitray.train import run_training

    shards = tmp_path / "train-only"  # no val split: the driver decodes nothing before training
    pack("-", str(shards), "sklearn-digits", val_fraction=0.0, progress=False)

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self):
            return True

    free = int(ray.cluster_resources()["CPU"]) - 1  # all but the trainer's CPU
    holders = [Holder.remote() for _ in range(free)]
    try:
        ray.get([h.ready.remote() for h in holders])
        cfg = make_cfg(str(shards), tmp_path, cluster={"num_workers": 1, "max_failures": 0, "stall_timeout_s": 15},
                       train={"steps": 5})
        t0 = time.monotonic()
        with pytest.raises(Exception) as err:
            run_training(cfg)
        elapsed = time.monotonic() - t0
    finally:
        for h in holders:
            ray.kill(h)
    text = str(err.value)
    assert "data stall: no batch arrived" in text and "before the first batch" in text, text[-2000:]
    assert "Ray: cluster 0/4 CPU and 0/0 GPU free; pending demands: {'CPU': 1.0}" in text, text[-2000:]
    assert elapsed < 180, elapsed  # liveness: it ended (15 s of stall + start-up), it did not hang


def test_serve_replicas_that_cannot_be_placed_fail_before_deploying(ray_cluster, capsys):
    from vitray.config import parse_config
    from vitray.serve.app import _ensure_capacity

    models = [{"name": f"m{i}", "uri": f"models:/m{i}@champion"} for i in range(5)]
    cfg = parse_config({"serve": {"models": models, "cpus_per_replica": 1, "ingress_cpus": 0.5}})
    with pytest.raises(CapacityError) as err:
        _ensure_capacity(cfg)  # the session cluster has 4 CPUs: 0.5 + 5 x 1 do not fit
    assert "reserve 5.5 CPU but the cluster has 4" in str(err.value) and "serve.min_replicas" in str(err.value)
    assert "1 ingress replica x 0.5 CPU + 1 model-m0 replica x 1 CPU" in capsys.readouterr().out
    _ensure_capacity(parse_config({"serve": {"models": models[:2], "cpus_per_replica": 1}}))  # 2.5 of 4: fine
