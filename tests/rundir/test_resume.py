"""Kill -9 a run at several points, resume it, and get the result of an uninterrupted run."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from fixtures.fake_bigbench import write_fake_bigbench

# Everything in result.json except wall-clock figures and the cache-hit counter must match.
CLOCK_KEYS = ("wall_seconds", "earlier_processes_seconds", "costs")
SHORT_TASKS = "tasks.meta_train=[bigbench:navigate,logical_deduction]"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "METASPO_CACHE": str(root / "cache"),
            "METASPO_BIGBENCH_ARCHIVE": str(write_fake_bigbench(root / "archive", count=60))}


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


def cache_totals(run_dir: Path) -> tuple[int, int]:
    """(completions the model made, requests answered from the cache), over every process of the run."""
    path = run_dir / "responses.sqlite"
    if not path.exists():
        return 0, 0
    with closing(sqlite3.connect(path)) as db:
        totals = dict(db.execute("SELECT name, SUM(value) FROM totals GROUP BY name"))
    return int(totals.get("prompts", 0)), int(totals.get("cache_hits", 0))


def optimizer_written(run_dir: Path, env: dict, monkeypatch) -> list[str]:
    """The unseen tasks' user prompts of a run that the optimizer wrote (not a task's initial prompt)."""
    from metaspo_hf.tasks import load_task

    for name in ("METASPO_CACHE", "METASPO_BIGBENCH_ARCHIVE"):
        monkeypatch.setenv(name, env[name])
    prompts = json.loads((run_dir / "user_prompts.json").read_text())
    return [prompt for task, written in prompts.items() for prompt in written
            if prompt != load_task(f"bigbench:{task}", train_size=1, test_size=1).initial_prompt]


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


def check_kill_and_resume(tmp_path, env, overrides, points, monkeypatch):
    """Kill a run at each point and resume it. Returns (kills, resumes that reused cached generations,
    resumes that restored a finished search from its checkpoint)."""
    reference = tmp_path / "reference"
    subprocess.run(command(reference, *overrides), env=env, check=True, capture_output=True)
    expected = comparable(reference)
    assert json.loads((reference / "result.json").read_text())["earlier_processes_seconds"] == []
    # Equal results prove little when every prompt is a fixed initial one: the optimizer's own must replay.
    assert optimizer_written(reference, env, monkeypatch), "the reference run kept no optimizer-written prompt"
    fresh_made, fresh_hits = cache_totals(reference)
    total_events = events(reference)
    rng = random.Random(0)
    killed = reused = restored = 0
    for index, event_count in enumerate(points):
        run_dir = tmp_path / f"killed-{index}"
        cmd = command(run_dir, *overrides)
        killed += kill_after_events(cmd, run_dir, env, min(event_count, total_events - 1), rng.uniform(0, 0.4))
        made_before, hits_before = cache_totals(run_dir)
        checkpointed = any((run_dir / "checkpoints").glob("*.json"))
        resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        where = f"kill point {index} (after event {event_count})"
        assert comparable(run_dir) == expected, where
        earlier = json.loads((run_dir / "result.json").read_text())["earlier_processes_seconds"]
        assert len(earlier) == 1 and earlier[0] >= 0, f"{where}: the killed process's time is not in the result"
        for name in ("nodes.json", "user_prompts.json"):
            assert (run_dir / name).read_text() == (reference / name).read_text(), f"{where}: {name}"
        made_after, hits_after = cache_totals(run_dir)
        made, hits = made_after - made_before, hits_after - hits_before  # by the resumed process alone
        if made_before:
            assert hits > 0 and made < fresh_made, f"{where}: the resumed process reused no generation"
            reused += 1
        if checkpointed:
            # A restored search sends nothing to the engine; replaying it from the cache would ask as much
            # as a fresh run does.
            assert made + hits < fresh_made + fresh_hits, f"{where}: a finished search was not restored"
            restored += 1
    return killed, reused, restored


def test_kill_at_five_points_and_resume_matches_an_uninterrupted_run(tmp_path, env, tiny_model_dir, monkeypatch):
    overrides = [f"model.name_or_path={tiny_model_dir}", "model.batch_size=4"]
    killed, reused, restored = check_kill_and_resume(tmp_path, env, overrides, [1, 3, 5, 8, 11], monkeypatch)
    assert killed >= 5 and reused >= 4 and restored >= 3


def test_one_process_per_run_folder_and_a_killed_holder_is_taken_over(tmp_path, env, tiny_model_dir):
    run_dir = tmp_path / "run"
    cmd = command(run_dir, f"model.name_or_path={tiny_model_dir}", "model.batch_size=4")
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while first.poll() is None and events(run_dir) < 3:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    # A process that holds the folder (as a run does while it works), then is killed like one.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from metaspo_hf.runs import RunDir; "
         "RunDir.open(sys.argv[1], lock=True); print('locked', flush=True); time.sleep(600)", str(run_dir)],
        env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        second = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert second.returncode == 2
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"is in use by process {holder.pid}" in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    logged = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["pid"] for e in logged if e["event"] == "lock_taken_over"] == [first.pid, holder.pid]
    assert logged[-1]["event"] == "done" and (run_dir / "run.lock").read_text() == ""


def test_a_corrupted_checkpoint_is_refused_before_the_model_loads(tmp_path, env, tiny_model_dir, monkeypatch,
                                                                 capsys):
    from metaspo_hf import cli, pipeline
    from metaspo_hf.recipe import load_recipe
    from metaspo_hf.runs import RunDir

    for name in ("METASPO_CACHE", "METASPO_BIGBENCH_ARCHIVE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    overrides = [SHORT_TASKS, f"model.name_or_path={tiny_model_dir}"]
    recipe = load_recipe("recipes/smoke.yaml", overrides)
    run = RunDir.create(tmp_path / "run", recipe.name, recipe.to_dict(), recipe.fingerprint())
    run.save_checkpoint("search-metaspo", {"result": {}}).write_text('{"result": {"system_pro')
    monkeypatch.setattr(pipeline, "load_lms", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    argv = ["reproduce", "recipes/smoke.yaml", "--output-dir", str(run.path)]
    assert cli.main([*argv, *(item for override in overrides for item in ("--set", override))]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "search-metaspo.json is not valid JSON" in error and "(hint: delete" in error


@pytest.mark.slow
@pytest.mark.smollm
def test_kill_smollm2_smoke_run_at_many_points(tmp_path, env, monkeypatch):
    killed, reused, restored = check_kill_and_resume(tmp_path, env, [], list(range(1, 13)), monkeypatch)
    assert killed >= 8 and reused >= 4 and restored >= 2
