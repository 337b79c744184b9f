"""The CPUs this process may use (affinity and cgroup quota) and the serving shape sized from them (cxr/cpus.py)."""

from __future__ import annotations

import os

import pytest

from cxr.cpus import available_cpus, serving_shape


def test_a_cgroup_v2_quota_caps_the_cpus(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: a container limit of 1500m
    assert available_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity


def test_a_cgroup_v1_quota_caps_the_cpus_and_none_means_the_affinity(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == affinity  # no cgroup files at all
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == affinity
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1


@pytest.mark.parametrize(
    ("cpus", "shape"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 1)), (4, (2, 2)), (8, (2, 4)), (16, (4, 4)), (64, (16, 4))]
)
def test_the_serving_shape_uses_every_cpu_once(cpus, shape):
    instances, threads = serving_shape(cpus)
    assert (instances, threads) == shape
    assert instances * threads == cpus
