"""Torch's thread count in training: the cores the process may use (affinity, cgroup quota), less the
loader's reader threads; an explicit OMP_NUM_THREADS or a lower count is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sdxlpipe.training.threads import apply, torch_threads, usable_cores
from tests.conftest import REPO


def cgroup_v2(root, path: str, quotas: dict[str, str]):
    """A cgroup v2 tree: `quotas` maps folders (relative to the root) to their cpu.max."""
    for folder, text in quotas.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(text + "\n")
    proc = root / "proc-cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


def test_a_cgroup_v2_quota_caps_the_affinity_rounded_up(tmp_path):
    root, proc = cgroup_v2(tmp_path, "/jobs/me", {"jobs/me": "150000 100000"})
    assert usable_cores(set(range(8)), root, proc) == 2
    assert usable_cores({0}, root, proc) == 1  # the affinity is tighter


def test_an_ancestors_quota_counts_and_max_is_no_quota(tmp_path):
    root, proc = cgroup_v2(tmp_path, "/jobs/me", {"jobs": "100000 100000", "jobs/me": "max 100000"})
    assert usable_cores(set(range(8)), root, proc) == 1
    root2, proc2 = cgroup_v2(tmp_path / "b", "/jobs/me", {"jobs/me": "max 100000"})
    assert usable_cores(set(range(8)), root2, proc2) == 8


def test_a_cgroup_v1_cfs_quota_caps_the_affinity(tmp_path):
    folder = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert usable_cores(set(range(16)), tmp_path, proc) == 3
    (folder / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert usable_cores(set(range(16)), tmp_path, proc) == 16


def test_no_cgroup_files_leave_the_affinity(tmp_path):
    assert usable_cores(set(range(4)), tmp_path, tmp_path / "absent") == 4


@pytest.mark.parametrize("cores, readers, processes, want", [(8, 2, 1, 6), (2, 2, 1, 1), (2, 0, 1, 1),
                                                             (8, 0, 1, 7), (16, 2, 4, 2), (1, 2, 1, 1)])
def test_the_rule_is_the_process_share_less_the_readers_and_one_core_for_the_rest(cores, readers, processes, want):
    assert torch_threads(cores, readers, processes) == want


def test_the_policy_only_lowers_and_leaves_an_explicit_count_alone():
    assert apply(2, current=8, env={}, cores=8) == 6
    assert apply(2, current=4, env={}, cores=8) is None  # already below the rule: kept
    assert apply(2, current=8, env={"OMP_NUM_THREADS": "8"}, cores=8) is None
    assert apply(0, current=16, env={"LOCAL_WORLD_SIZE": "4"}, cores=16) == 3


SCRIPT = """
import json, sys, pathlib
import torch
default = torch.get_num_threads()  # torch's own choice in this process, before the stage sets its
from tests.training.conftest import build_samples, make_context, params, run_train
ctx = make_context(pathlib.Path(sys.argv[1]))
done = run_train(ctx, build_samples(ctx, 2), params(max_steps=1, save_every_steps=1, loader_workers=1))
print(json.dumps({"default": default, "ran": done["torch_threads"]}))
"""


def train_threads(tmp_path, omp: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **({"OMP_NUM_THREADS": omp} if omp else {}))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_train_stage_runs_with_the_policys_thread_count(tmp_path):
    # torch's default (every physical core) lowered to the usable cores less the one reader thread.
    policy = train_threads(tmp_path / "policy", None)
    assert policy["ran"] == min(policy["default"], max(1, usable_cores() - 1))
    assert train_threads(tmp_path / "explicit", "2")["ran"] == 2  # OMP_NUM_THREADS is the user's word
