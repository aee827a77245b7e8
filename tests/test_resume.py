"""Kill -9 a run at several points, resume it, and get the result of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.fake_bigbench import write_fake_bigbench

# Everything in result.json except wall-clock figures and the cache-hit counter must match.
CLOCK_KEYS = ("wall_seconds", "costs")
SHORT_TASKS = "tasks.meta_train=[bigbench:navigate,logical_deduction]"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "METASPO_CACHE": str(root / "cache"),
            "METASPO_BIGBENCH_ARCHIVE": str(write_fake_bigbench(root / "archive"))}


def command(out: Path, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "metaspo_hf.cli", "reproduce", "recipes/smoke.yaml", "--output-dir", str(out)]
    for item in (SHORT_TASKS, *overrides):
        args += ["--set", item]
    return args


def comparable(run_dir: Path) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    return {key: value for key, value in result.items() if key not in CLOCK_KEYS}


def events(run_dir: Path) -> int:
    path = run_dir / "events.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_after_events(cmd: list[str], run_dir: Path, env: dict, event_count: int, extra_delay: float) -> bool:
    """Start the run, SIGKILL it ``extra_delay`` s after its log has ``event_count`` lines.
    Returns False when the run finished before the kill."""
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and events(run_dir) < event_count:
        time.sleep(0.05)
    time.sleep(extra_delay)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def check_kill_and_resume(tmp_path, env, overrides, points):
    reference = tmp_path / "reference"
    subprocess.run(command(reference, *overrides), env=env, check=True, capture_output=True)
    expected = comparable(reference)
    total_events = events(reference)
    rng = random.Random(0)
    killed = 0
    for index, event_count in enumerate(points):
        run_dir = tmp_path / f"killed-{index}"
        cmd = command(run_dir, *overrides)
        killed += kill_after_events(cmd, run_dir, env, min(event_count, total_events - 1), rng.uniform(0, 0.4))
        resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert comparable(run_dir) == expected, f"kill point {index} (after event {event_count})"
    return killed


def test_kill_at_five_points_and_resume_matches_an_uninterrupted_run(tmp_path, env, tiny_model_dir):
    overrides = [f"model.name_or_path={tiny_model_dir}", "model.batch_size=4"]
    killed = check_kill_and_resume(tmp_path, env, overrides, points=[1, 3, 5, 8, 11])
    assert killed >= 5


@pytest.mark.slow
@pytest.mark.smollm
def test_kill_smollm2_smoke_run_at_many_points(tmp_path, env):
    killed = check_kill_and_resume(tmp_path, env, [], points=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    assert killed >= 8
