"""What the parent of ``magnet serve --workers N`` hands its spawned workers (the process tree itself is
tested end to end in tests/e2e/test_workers.py)."""

from __future__ import annotations

import os

import pytest

from service.settings import Settings
from service import workers
from service.workers import MULTIPROC_ENV, default_workers, ort_threads_per_worker, prepare_environment


@pytest.fixture
def clean_env(monkeypatch):
    """No MAGNET_* in the environment, and whatever prepare_environment writes is undone afterwards."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("MAGNET_") or name == MULTIPROC_ENV:
            monkeypatch.delenv(name)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_flags_reach_workers_as_environment_and_a_secret_is_generated_once(clean_env, tmp_path):
    settings = Settings(workers=3, mode="shadow", explain=True)
    made = prepare_environment(settings, {"workers": 3, "mode": "shadow", "explain": True}, members=8)
    try:
        assert os.environ["MAGNET_MODE"] == "shadow" and os.environ["MAGNET_EXPLAIN"] == "true"
        secret = os.environ["MAGNET_SESSION_SECRET"]
        assert len(secret) >= 32
        worker = Settings()  # what each worker reads
        assert worker.mode == "shadow" and worker.explain and worker.workers == 3
        assert worker.session_secret.get_secret_value() == secret
        assert made is not None and os.environ[MULTIPROC_ENV] == str(made) and made.is_dir()
    finally:
        made.rmdir()


def test_a_chosen_secret_is_kept_and_a_chosen_metrics_dir_is_cleared(clean_env, tmp_path):
    clean_env.setenv("MAGNET_SESSION_SECRET", "s" * 20)
    clean_env.setenv(MULTIPROC_ENV, str(tmp_path))
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    settings = Settings(workers=2)
    assert prepare_environment(settings, {"workers": 2}, members=8) is None
    assert os.environ["MAGNET_SESSION_SECRET"] == "s" * 20
    assert not list(tmp_path.glob("*.db"))  # old counts from a previous run would inflate the totals


def test_onnxruntime_threads_are_split_between_workers(monkeypatch):
    monkeypatch.setattr(workers, "available_cpus", lambda: 16)
    assert ort_threads_per_worker(Settings(workers=4, ort_threads=0)) == 3  # 4 cores each, one for the loop
    assert ort_threads_per_worker(Settings(workers=32, ort_threads=0)) == 1
    assert ort_threads_per_worker(Settings(workers=4, ort_threads=3)) == 3  # an explicit choice is kept
    assert ort_threads_per_worker(Settings(workers=1, ort_threads=0)) == 15
    assert default_workers() == 8
    assert ort_threads_per_worker(Settings(workers=default_workers(), ort_threads=0)) == 1
    monkeypatch.setattr(workers, "available_cpus", lambda: 2)
    assert default_workers() == 1
    assert default_workers(embedded=True) == 2  # the gateway does all the work: every core
    monkeypatch.setattr(workers, "available_cpus", lambda: 1)
    assert default_workers() == 1 and default_workers(embedded=True) == 1
    monkeypatch.setattr(workers, "available_cpus", lambda: 16)
    assert default_workers(embedded=True) == 8
    monkeypatch.setattr(workers, "available_cpus", lambda: 2)
    assert ort_threads_per_worker(Settings(workers=1, ort_threads=0)) == 1


def test_a_containers_cpu_quota_caps_the_cores(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # cgroup v2: 2.5 CPUs
    assert workers.cgroup_cpu_limit(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert workers.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")  # cgroup v1: 1.5 CPUs
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert workers.cgroup_cpu_limit(tmp_path) == 1.5
    monkeypatch.setattr(workers, "cgroup_cpu_limit", lambda: 2.5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert workers.available_cpus() == 3 and workers.default_workers() == 1
