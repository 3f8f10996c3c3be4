"""One run per workdir (runs.workdir_lock): a second holder is refused naming the first one's
pid and changes nothing, kill -9 of the holder frees the workdir, the report is not blocked by
runs under its directory, and the commands end to end (slow: a refused second run leaves the
first one's numbers unchanged, a killed run resumes, a refused multi-process run stops every
process)."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SMOKE, TINY, run_module, start_distributed
from experiments import common, report
from iavae_jax import hparams, runs
from iavae_jax.errors import ConfigError
from test_stats_and_report import fake_results, write
from test_synthetic_cli import _numbers

# Holds the workdir given as argv[1] until its stdin closes.
_HOLD = ("import sys\n"
         "from iavae_jax import runs\n"
         "with runs.workdir_lock(sys.argv[1]):\n"
         "  print('held', flush=True)\n"
         "  sys.stdin.read()\n")


@contextlib.contextmanager
def held_by_another_process(workdir):
  """A child process holding workdir's lock while the block runs; yields the child."""
  child = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], cwd=ROOT,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline() == "held\n"
    yield child
  finally:
    child.stdin.close()
    child.wait(timeout=60)
    child.stdout.close()


def holder_text(pid):
  return f"pid {pid} on {socket.gethostname()}\n"


def files(workdir):
  """Every file under workdir with its bytes: what a refused run must leave as it was."""
  return {str(p): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def test_a_second_holder_is_refused_naming_the_first_and_changing_nothing(tmp_path):
  workdir = tmp_path / "w"
  lock = workdir / runs.LOCK_FILE
  with held_by_another_process(workdir) as child:
    assert lock.read_text() == holder_text(child.pid)
    before = files(workdir)
    with pytest.raises(common.ConfigError) as refusal:
      with runs.workdir_lock(str(workdir)):
        pytest.fail("entered a workdir that another process holds")
    assert str(refusal.value) == (
        f"workdir {workdir} is in use by another run (pid {child.pid} on "
        f"{socket.gethostname()}, holding {lock}). Wait for it to finish or stop it, or choose "
        "another workdir.")
    assert files(workdir) == before
  assert not workdir.exists()   # the holder created it and wrote nothing: it has gone again
  with runs.workdir_lock(str(workdir)):
    assert lock.read_text() == holder_text(os.getpid())
    (workdir / "results.json").write_text("{}")
  assert os.listdir(workdir) == ["results.json"]   # the lock file goes, the outputs stay


def test_a_lock_file_removed_by_its_last_holder_is_not_taken(tmp_path, monkeypatch):
  # The last holder removes the file between this process's open and flock: the lock on the
  # removed file guards nothing (a third process would create and lock a new one), so the
  # lock must be taken on the file now at the path.
  lock = tmp_path / runs.LOCK_FILE
  flock, calls = runs.fcntl.flock, []

  def flock_after_a_release(fd, operation):
    if not calls:
      os.remove(lock)
    calls.append(fd)
    return flock(fd, operation)
  monkeypatch.setattr(runs.fcntl, "flock", flock_after_a_release)
  with runs.workdir_lock(str(tmp_path)):
    assert len(calls) == 2 and lock.read_text() == holder_text(os.getpid())


def test_kill_9_of_the_holder_frees_the_workdir(tmp_path):
  lock = tmp_path / runs.LOCK_FILE
  with held_by_another_process(tmp_path) as child:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert lock.read_text() == holder_text(child.pid)   # left behind, but no longer locked
    with runs.workdir_lock(str(tmp_path)):
      assert lock.read_text() == holder_text(os.getpid())
  assert not lock.exists()


def test_a_missing_or_unwritable_workdir_is_a_config_error(tmp_path):
  with pytest.raises(common.ConfigError, match="a workdir is required"):
    with runs.workdir_lock(""):
      pass
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(common.ConfigError, match="is not a writable directory"):
    with runs.workdir_lock(str(blocker / "sub")):
      pass
  assert blocker.read_text() == "not a directory"


def test_the_report_is_not_blocked_by_runs_under_its_directory(tmp_path):
  rng = np.random.default_rng(0)
  write(str(tmp_path / "mnist" / "results.json"), fake_results("mnist", range(3), -79.4, rng))
  with held_by_another_process(tmp_path / "mnist"):   # an image run still training there
    table = report.write_report(str(tmp_path))
  assert list(table) == ["mnist"] and (tmp_path / "table4.json").exists()


def test_every_command_refuses_a_held_workdir_with_exit_2_and_writes_nothing(tmp_path):
  rng = np.random.default_rng(0)
  write(str(tmp_path / "mnist" / "results.json"), fake_results("mnist", range(3), -79.4, rng))
  commands = {"experiments.synthetic": TINY, "experiments.images": SMOKE,
              "experiments.report": []}
  with held_by_another_process(tmp_path) as child:
    before = files(tmp_path)
    for module, args in commands.items():
      result = run_module(module, f"--workdir={tmp_path}", *args)
      assert result.returncode == 2, (module, result.stderr[-2000:])
      assert (f"error: workdir {tmp_path} is in use by another run (pid {child.pid} "
              in result.stderr), (module, result.stderr[-2000:])
      assert files(tmp_path) == before, module


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_runs_and_the_first_is_unchanged(tiny_run,
                                                                                 tmp_path):
  first = subprocess.Popen([sys.executable, "-u", "-m", "experiments.synthetic",
                            f"--workdir={tmp_path}", *TINY], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  for line in first.stdout:
    if line.startswith("[vae] epoch 2/"):   # mid-run: the first one holds the workdir
      break
  else:
    pytest.fail(f"the first run ended (code {first.wait()}) before its second epoch")
  second = run_module("experiments.synthetic", f"--workdir={tmp_path}", *TINY)
  rest = first.communicate(timeout=600)[0]
  assert second.returncode == 2, second.stderr[-2000:]
  assert (f"error: workdir {tmp_path} is in use by another run (pid {first.pid} on "
          in second.stderr), second.stderr[-2000:]
  assert second.stdout == ""
  assert first.returncode == 0, rest[-3000:]
  assert "resumed" not in rest
  assert _numbers(tmp_path) == _numbers(tiny_run[0])


@pytest.mark.slow
def test_after_kill_9_the_next_run_takes_the_workdir_and_resumes(tiny_run, tmp_path,
                                                                 kill_after_line):
  kill_after_line("experiments.synthetic", [f"--workdir={tmp_path}", *TINY], "[iavae] epoch 2/")
  killed = int(re.fullmatch(r"pid (\d+) on .*\n", (tmp_path / runs.LOCK_FILE).read_text())[1])
  with pytest.raises(ProcessLookupError):
    os.kill(killed, 0)   # the lock file names a run that is gone
  result = run_module("experiments.synthetic", f"--workdir={tmp_path}", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[vae] resumed from the checkpoint at epoch 4" in result.stdout
  assert _numbers(tmp_path) == _numbers(tiny_run[0])
  assert not (tmp_path / runs.LOCK_FILE).exists()


@pytest.mark.slow
def test_a_refused_multi_process_run_stops_every_process_with_exit_2(tmp_path):
  # Only process 0 tries the lock; process 1 must learn the answer rather than train on and
  # wait for a process 0 that has gone (it failed after 30 s with a Gloo timeout, exit 1).
  with runs.workdir_lock(str(tmp_path)):
    procs = start_distributed("experiments.synthetic", f"--workdir={tmp_path}", *TINY,
                              "--parallel=seeds")
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], outputs[0][-2000:] + outputs[1][-2000:]
  assert f"is in use by another run (pid {os.getpid()} on " in outputs[0]
  assert f"error: workdir {tmp_path}: process 0 could not take the workdir" in outputs[1]
  assert not os.listdir(tmp_path)   # this process's lock file has gone; they wrote nothing


def test_record_or_compare_writes_once_then_names_what_differs(tmp_path):
  path = str(tmp_path / "settings.json")
  assert runs.record_or_compare(path, {"a": 1, "b": [1, 2]}, "remove it") == ""
  assert runs.read_json(path) == {"a": 1, "b": [1, 2]}
  assert runs.record_or_compare(path, {"a": 1, "b": [1, 2]}, "remove it") == ""
  assert (runs.record_or_compare(path, {"a": 2, "b": [1, 2]}, "remove it")
          == "a: recorded 1, now 2")
  assert runs.read_json(path) == {"a": 1, "b": [1, 2]}   # a difference is not written
  with open(path, "w") as f:
    f.write("{")
  with pytest.raises(common.ConfigError, match="cannot be read as JSON .*; remove it"):
    runs.record_or_compare(path, {"a": 1}, "remove it")


def test_a_field_added_since_the_run_began_resumes_at_its_default_only(tmp_path):
  config = hparams.ImageVAEConfig()
  runs.prepare_workdir(str(tmp_path), config)
  path = tmp_path / "config.json"
  older = {k: v for k, v in runs.read_json(str(path)).items() if k != "adapted_blocks"}
  runs.write_json(str(path), older)
  runs.prepare_workdir(str(tmp_path), config)   # resumes: the absent field is at its default
  runs.write_json(str(path), older)
  other = hparams.ImageVAEConfig(adapted_blocks="^mean/")
  with pytest.raises(ConfigError, match="adapted_blocks: recorded '', now '\\^mean/'"):
    runs.prepare_workdir(str(tmp_path), other)
  assert runs.read_json(str(path)) == older


def test_differences_name_a_key_only_one_side_has():
  assert runs.differences({"a": None}, {}) == "a: recorded None, now absent"
  assert runs.differences({}, {"b": [1]}) == "b: recorded absent, now [1]"
  assert runs.differences({"a": 1}, {"a": 1}) == ""


def test_read_config_gives_back_the_recorded_configuration_and_refuses_another(tmp_path):
  config = hparams.GapSettings(refine_steps=(1, 5), qstar_learning_rate=0.01)
  runs.record_config(str(tmp_path), config)
  assert runs.read_config(str(tmp_path), hparams.GapSettings) == config   # tuples, not lists
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**runs.as_json(config), "dropout": 0.1}))
  with pytest.raises(ConfigError, match=r"fields this version does not know: \['dropout'\]"):
    runs.read_config(str(tmp_path), hparams.GapSettings)
  path.write_text("[1, 2]")
  with pytest.raises(ConfigError, match="damaged or was not written by the gaps command"):
    runs.read_config(str(tmp_path), hparams.GapSettings, "the gaps command")
