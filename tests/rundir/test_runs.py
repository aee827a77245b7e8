"""RunDir: layout, recipe-hash check on reopen, durable event log, atomic JSON, no leaked secrets."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import yaml

from metaspo_hf import __version__
from metaspo_hf import runs as runs_module
from metaspo_hf.errors import MetaspoError
from metaspo_hf.files import read_json, write_json_atomic
from metaspo_hf.runs import REDACTED, RunDir, scrub

RECIPE = {"model": {"path": "smollm2", "dtype": "float32"}, "search": {"iterations": 1, "max_new_tokens": 64}}


def make_run(tmp_path, recipe_hash="hash-a", recipe=RECIPE):
    return RunDir.create(tmp_path / "run", "smoke", recipe, recipe_hash)


def test_create_writes_resolved_recipe_and_run_info(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/metaspo", "train", "recipes/smoke.yaml"])
    run = make_run(tmp_path)
    assert yaml.safe_load(run.recipe_file.read_text()) == RECIPE
    info = json.loads(run.run_file.read_text())
    assert info["recipe"] == "smoke" and info["recipe_hash"] == "hash-a"
    assert info["versions"]["metaspo-hf"] == __version__
    assert info["command"] == "metaspo train recipes/smoke.yaml"
    assert info["created"].endswith("Z")


def test_default_location_is_runs_recipe_timestamp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = RunDir.create(None, "recipes/smoke.yaml", RECIPE, "h")
    second = RunDir.create(None, "recipes/smoke.yaml", RECIPE, "h")
    assert first.path.parent == second.path.parent == runs_module.RUNS_ROOT / "smoke"
    assert first.path != second.path, "two runs in the same second still get their own folders"
    assert (first.path / "run.json").exists() and (second.path / "run.json").exists()
    elsewhere = RunDir.create(None, "smoke", RECIPE, "h", root=tmp_path / "experiments")
    assert elsewhere.path.parent == tmp_path / "experiments" / "smoke"


def test_create_refuses_a_folder_that_already_holds_a_run(tmp_path):
    make_run(tmp_path)
    with pytest.raises(MetaspoError, match="already holds a run"):
        make_run(tmp_path)


def test_open_checks_the_recipe_hash(tmp_path):
    run = make_run(tmp_path, recipe_hash="hash-a")
    assert RunDir.open(run.path, "hash-a").path == run.path
    assert RunDir.open(run.path).path == run.path  # read-only commands pass no hash
    with pytest.raises(MetaspoError) as caught:
        RunDir.open(run.path, "hash-b")
    assert "hash-a" in caught.value.message and "hash-b" in caught.value.message


def test_open_rejects_missing_and_non_run_folders(tmp_path):
    with pytest.raises(MetaspoError, match="does not exist"):
        RunDir.open(tmp_path / "nowhere", "h")
    (tmp_path / "plain").mkdir()
    with pytest.raises(MetaspoError, match="not a run folder"):
        RunDir.open(tmp_path / "plain", "h")


def test_open_or_create_resumes_the_same_recipe_only(tmp_path):
    run = RunDir.open_or_create(tmp_path / "run", "smoke", RECIPE, "hash-a")
    run.log({"event": "step_done", "step": 1})
    again = RunDir.open_or_create(tmp_path / "run", "smoke", RECIPE, "hash-a")
    assert [e["step"] for e in again.events()] == [1]
    with pytest.raises(MetaspoError, match="hash-b"):
        RunDir.open_or_create(tmp_path / "run", "smoke", RECIPE, "hash-b")


def test_each_event_is_flushed_then_fsynced_in_order(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    on_disk_at_fsync = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        # What the file holds when fsync is asked: the line must already be written (flushed).
        on_disk_at_fsync.append(run.events_file.read_text().count("\n"))
        real_fsync(fd)

    monkeypatch.setattr(runs_module.os, "fsync", recording_fsync)
    for step in range(5):
        run.log({"event": "evaluation_done", "step": step, "text": "line\nbreak {json}"})
    assert on_disk_at_fsync == [1, 2, 3, 4, 5]
    lines = run.events_file.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3, 4]
    assert all("time" in json.loads(line) for line in lines)
    assert [e["text"] for e in run.events()] == ["line\nbreak {json}"] * 5


def test_a_torn_last_event_is_ignored_then_cut_on_reopen(tmp_path):
    run = make_run(tmp_path)
    run.log({"event": "a"})
    with open(run.events_file, "a") as fh:
        fh.write('{"event": "b", "ti')  # a kill in the middle of a write
    assert [e["event"] for e in run.events()] == ["a"]
    assert [e["event"] for e in RunDir.open(run.path, "hash-a").events()] == ["a"], "a reader changes nothing"
    assert run.events_file.read_text().endswith('"ti')
    resumed = RunDir.open(run.path, "hash-a", lock=True)
    resumed.log({"event": "c"})
    assert [e["event"] for e in resumed.events()] == ["a", "c"]


def test_process_seconds_spans_each_start_to_that_process_s_last_event(tmp_path):
    run = make_run(tmp_path)
    with open(run.events_file, "w") as fh:
        for time, name in (("2026-12-03T07:56:40.000Z", "start"), ("2026-12-03T08:30:00.500Z", "step"),
                           ("2026-12-03T09:09:40.000Z", "step"),  # then killed
                           ("2026-12-03T09:28:59.000Z", "lock_taken_over"),  # by the next process
                           ("2026-12-03T09:29:00.000Z", "start"), ("2026-12-03T09:36:00.000Z", "done")):
            fh.write(json.dumps({"time": time, "event": name}) + "\n")
    assert run.process_seconds() == [73 * 60.0, 7 * 60.0]
    with open(run.events_file, "a") as fh:
        fh.write('{"event": "step"}\n')  # no time: skipped
    assert run.process_seconds() == [73 * 60.0, 7 * 60.0]
    with open(run.events_file, "a") as fh:
        fh.write("not json\n")  # edited by hand: the run still ends, untimed
    assert run.process_seconds() == []


def test_atomic_write_leaves_no_temporary_file_even_when_it_fails(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"score": 1})
    assert read_json(path) == {"score": 1}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"score": object()})
    assert read_json(path) == {"score": 1}, "a failed write keeps the previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, "results are as readable as any file"


def test_reopening_removes_temporary_files_left_by_a_kill(tmp_path):
    run = make_run(tmp_path)
    leftover = run.checkpoints_dir / ".state.json.1a2b3c.tmp"
    leftover.parent.mkdir()
    leftover.write_text('{"half": ')
    RunDir.open(run.path, "hash-a")
    assert leftover.exists(), "a reader may not remove what a running process is writing"
    RunDir.open(run.path, "hash-a", lock=True)
    assert not leftover.exists()


def test_a_locked_folder_refuses_a_second_writer_naming_the_holder(tmp_path):
    run = RunDir.create(tmp_path / "run", "smoke", RECIPE, "hash-a", lock=True)
    for second in (lambda: RunDir.open(run.path, "hash-a", lock=True),
                   lambda: RunDir.open_or_create(run.path, "smoke", RECIPE, "hash-a", lock=True)):
        with pytest.raises(MetaspoError, match=f"run folder .*run is in use by process {os.getpid()}") as error:
            second()
        assert "one process works in a run folder at a time" in error.value.hint
    assert RunDir.open(run.path).path == run.path, "reading needs no lock"
    run.unlock()
    assert (run.path / "run.lock").read_text() == "", "a clean release leaves no holder behind"
    again = RunDir.open(run.path, "hash-a", lock=True)
    assert "lock_taken_over" not in [e["event"] for e in again.events()]
    again.unlock()


def test_a_lock_left_by_a_killed_process_is_taken_over_and_logged(tmp_path):
    run = make_run(tmp_path)
    run.log({"event": "a"})
    with open(run.events_file, "a") as fh:
        fh.write('{"event": "b", "ti')  # the killed holder was writing an event
    # What a holder killed by SIGKILL leaves: its PID in a lock file that no process holds any more.
    (run.path / "run.lock").write_text("4194999\n")
    resumed = RunDir.open(run.path, "hash-a", lock=True)
    assert [(e["event"], e.get("pid")) for e in resumed.events()] == [("a", None), ("lock_taken_over", 4194999)]
    assert (run.path / "run.lock").read_text() == f"{os.getpid()}\n"
    resumed.unlock()


def test_a_corrupted_checkpoint_is_refused_on_resume_with_what_to_do(tmp_path):
    run = make_run(tmp_path)
    path = run.save_checkpoint("search-metaspo", {"result": {}})
    path.write_text('{"result": {"sys')
    with pytest.raises(MetaspoError, match=r"checkpoint .*search-metaspo.json is not valid JSON \(line 1") as error:
        RunDir.open(run.path, "hash-a", lock=True)
    assert f"delete {path} and resume" in error.value.hint and "responses.sqlite" in error.value.hint
    path.unlink()
    RunDir.open(run.path, "hash-a", lock=True).unlock()  # the refusal released the lock


def test_read_json_names_a_malformed_file(tmp_path):
    path = tmp_path / "nodes.json"
    path.write_text("[1, 2")
    with pytest.raises(MetaspoError, match="nodes.json is not valid JSON"):
        read_json(path)


def test_checkpoints_round_trip(tmp_path):
    run = make_run(tmp_path)
    assert run.load_checkpoint("train_iteration_1") is None
    run.save_checkpoint("train_iteration_1", {"incumbent": "Be careful.", "score": 0.5})
    assert run.load_checkpoint("train_iteration_1") == {"incumbent": "Be careful.", "score": 0.5}



def test_no_environment_secret_reaches_the_run_folder(tmp_path, monkeypatch):
    secret = "hf_FAKEtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("MY_SERVICE_API_KEY", "sk-another-secret-42")
    monkeypatch.setattr(
        sys, "argv", ["metaspo", "train", "r.yaml", "--token", secret, "--set", f"model.hf_token={secret}"]
    )
    recipe = {
        "model": {"path": "m", "token": secret, "api_key": "sk-another-secret-42"},
        "note": f"pasted {secret}",
    }
    run = RunDir.create(tmp_path / "run", "smoke", recipe, "h")
    run.log({"event": "loaded", "detail": f"token {secret}"})
    run.write_json("costs.json", {"generated_tokens": 12, "max_new_tokens": 64})
    run.save_checkpoint("state", {"env_leak": "sk-another-secret-42 inside"})

    for path in run.path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and b"sk-another-secret-42" not in data, path.name
    assert yaml.safe_load(run.recipe_file.read_text())["model"]["token"] == REDACTED
    assert read_json(run.path / "costs.json") == {"generated_tokens": 12, "max_new_tokens": 64}, (
        "counters are not secrets"
    )


def test_scrub_keeps_non_secret_keys_and_values():
    data = {
        "generated_tokens": 5,
        "tokens": ["a"],
        "password": "pw",
        "hf_token": True,
        "nested": [{"secret": "s"}],
    }
    assert scrub(data) == {
        "generated_tokens": 5,
        "tokens": ["a"],
        "password": REDACTED,
        "hf_token": True,  # `token: true` means "use the stored login", which is not itself a secret
        "nested": [{"secret": REDACTED}],
    }
