"""One run on 2 processes (torchrun, gloo): the same run folder as on one process, written once; a
process killed mid-run stops the job, and a resume finishes it with the uninterrupted result."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_resume import command, comparable, env, events  # noqa: F401  (env is a fixture)

FILES = ("nodes.json", "user_prompts.json", "items.csv")


def launched(nproc: int, cmd: list[str]) -> list[str]:
    """``cmd`` (a ``python -m metaspo_hf.cli`` command) under torchrun with ``nproc`` processes."""
    assert cmd[:3] == [sys.executable, "-m", "metaspo_hf.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "metaspo_hf.cli", *cmd[3:]]


def one_thread(variables: dict) -> dict:
    """One thread a process in every launch compared: float sums then run in the same order."""
    return {**variables, "OMP_NUM_THREADS": "1"}


def logged(run_dir: Path, name: str) -> list[dict]:
    return [event for line in (run_dir / "events.jsonl").read_text().splitlines()
            if (event := json.loads(line))["event"] == name]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, env, tiny_model_dir):  # noqa: F811
    overrides = (f"model.name_or_path={tiny_model_dir}", "model.batch_size=4")
    run_dir = tmp_path_factory.mktemp("parallel") / "one"
    subprocess.run(command(run_dir, *overrides), env=one_thread(env), check=True, capture_output=True)
    return run_dir, overrides


def test_two_processes_write_the_run_folder_of_one(tmp_path, env, one_process_run):  # noqa: F811
    reference, overrides = one_process_run
    run_dir = tmp_path / "two"
    done = subprocess.run(launched(2, command(run_dir, *overrides)), env=one_thread(env), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert comparable(run_dir) == comparable(reference)
    for name in FILES:
        assert (run_dir / name).read_text() == (reference / name).read_text(), name
    # Counters count both processes' work, as one process would (only the clock differs).
    costs = [{k: v for k, v in json.loads((d / "result.json").read_text())["costs"].items() if k != "seconds"}
             for d in (run_dir, reference)]
    assert costs[0] == costs[1]
    # One process wrote the folder: one start (saying 2 processes), one done, every event once.
    assert [e.get("processes") for e in logged(run_dir, "start")] == [2]
    assert len(logged(run_dir, "done")) == 1
    assert events(run_dir) == events(reference)


def worker(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "metaspo_hf.cli" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.parametrize("rank", [1, 0])
def test_a_killed_process_stops_the_job_and_a_resume_finishes_it(tmp_path, env, one_process_run, rank):  # noqa: F811
    reference, overrides = one_process_run
    run_dir = tmp_path / "killed"
    cmd = launched(2, command(run_dir, *overrides))
    job = subprocess.Popen(cmd, env=one_thread(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    launcher = psutil.Process(job.pid)
    while job.poll() is None and events(run_dir) < 4:
        time.sleep(0.05)
    victim = worker(launcher, rank)
    assert victim is not None and job.poll() is None, "the run ended before the kill"
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        job.wait(timeout=60)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the job did not stop within 60 s of losing a process")
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert not (run_dir / "result.json").exists()
    # Resume on one process: nothing lost, the uninterrupted result.
    resumed = subprocess.run(command(run_dir, *overrides), env=one_thread(env), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert comparable(run_dir) == comparable(reference)
    for name in FILES:
        assert (run_dir / name).read_text() == (reference / name).read_text(), name



@pytest.mark.slow
@pytest.mark.smollm
def test_two_processes_on_the_smollm2_smoke_recipe_give_the_one_process_result(tmp_path, env):  # noqa: F811
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"smoke-{nproc}"
        cmd = command(runs[nproc])
        done = subprocess.run(cmd if nproc == 1 else launched(nproc, cmd), env=one_thread(env),
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
    assert comparable(runs[2]) == comparable(runs[1])
    for name in FILES:
        assert (runs[2] / name).read_text() == (runs[1] / name).read_text(), name
