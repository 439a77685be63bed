"""Threads per backbone actor: the actors of a node together can use all of its cores."""

import pytest

from leukoflow.tasks.actors import ActorPlan


@pytest.mark.parametrize(
    ("num_cpus", "threads"), [(0.666, 1), (0.999, 1), (1.332, 2), (1.999, 2), (5.332, 6)]
)
def test_the_cpu_share_is_rounded_up(num_cpus, threads):
    # 3 actors on 2, 3, 4, 6 and 16 cores (ActorPlan leaves 0.001 of each share free).
    assert ActorPlan(num_cpus=num_cpus, num_gpus=0).threads == threads


def test_the_actor_gets_its_threads_unless_the_driver_set_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert ActorPlan(1.332, 0).env_vars() == {"OMP_NUM_THREADS": "2"}
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert ActorPlan(1.332, 0).env_vars() == {"OMP_NUM_THREADS": "4"}
