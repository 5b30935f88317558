"""Faults in the middle of a stage end in one line and leave no half-written run.

A full disk and a read-only file system are real small tmpfs mounts where the test may mount one (as root), else
monkeypatched writes failing with the same errno; Ctrl-C is a real SIGINT to a training subprocess; two runs on one
--out are two threads held together until both have passed the up-front check; a model too large for memory is a
subprocess under an address-space limit. Stage scripts run in this process as in test_bad_inputs.py.
"""

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_bad_inputs import run_in_process

SASREC = "train_sasrec.py"
SMALL_RUN = ["--hidden-size", "16", "--sample-size", "10", "--device", "cpu", "--no-tensorboard"]


def default_sigint() -> None:
    """In a child before exec: Ctrl-C as a terminal's program gets it. A test run started in the background of a
    non-interactive shell ignores SIGINT, and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_once(process: subprocess.Popen, ready: Path, interrupt) -> str:
    """interrupt() once `ready` exists (or the process ended, or 300 s passed); the process's stderr once it ends."""
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        interrupt()
        return process.communicate(timeout=120)[1]
    finally:
        process.kill()


def stderr_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def mount_tmpfs(directory: Path, options: str) -> bool:
    """Mount a tmpfs on `directory`; False where this process may not (not root, no mount, a container)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                          capture_output=True).returncode == 0  # fmt: skip


@pytest.fixture
def data_copy(synthetic_data, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(synthetic_data, copy)
    return copy


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A directory whose file system fills after a few KiB: a 16 KiB tmpfs, else a torch.save failing as a full
    disk makes it fail (config.json and metrics.jsonl fit either way, a checkpoint does not)."""
    directory = tmp_path / "small"
    directory.mkdir()
    mounted = mount_tmpfs(directory, "size=16k")
    if not mounted:
        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", no_space)
    yield directory
    if mounted:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """(directory, seal): files put in the directory stay readable; after seal() nothing can be created in it (a
    tmpfs remounted read-only, else os.mkdir under it failing with EROFS, where every atomic write starts)."""
    directory = tmp_path / "sealed"
    directory.mkdir()
    mounted = mount_tmpfs(directory, "size=8m")

    def seal() -> None:
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
            return
        real_mkdir = os.mkdir

        def refusing_mkdir(path, *args, **kwargs):
            if Path(path).absolute().is_relative_to(directory):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", refusing_mkdir)

    yield directory, seal
    if mounted:
        subprocess.run(["umount", str(directory)], check=True)


def test_full_disk_at_the_first_checkpoint_leaves_no_run(data_copy, full_disk, capsys):
    out = full_disk / "run"
    status, stderr = run_in_process(SASREC, ["--data", str(data_copy), "--out", str(out), "--epochs", "1",
                                             *SMALL_RUN], capsys)  # fmt: skip
    assert status == 1 and stderr_lines(stderr) == [
        f"error: {out}/best.pt: cannot write it (No space left on device); "
        f"no checkpoint was written yet, so {out} was removed"
    ], stderr
    assert list(full_disk.iterdir()) == []  # neither the run directory nor a temporary file


def test_read_only_output_of_prepare_data(read_only, capsys):
    directory, seal = read_only
    seal()
    out = directory / "synthetic"
    status, stderr = run_in_process("prepare_data.py", ["synthetic", "--users", "20", "--items", "30", "--out",
                                                        str(out)], capsys)  # fmt: skip
    assert status == 1 and len(stderr_lines(stderr)) == 1, stderr
    assert stderr.startswith(f"error: {out}: cannot write it (Read-only file system)"), stderr
    assert list(directory.iterdir()) == []


def test_read_only_dataset_cannot_take_the_negatives_cache(data_copy, read_only, tmp_path, capsys):
    directory, seal = read_only
    data = directory / "data"
    shutil.copytree(data_copy, data)
    seal()
    out = tmp_path / "run"
    status, stderr = run_in_process(SASREC, ["--data", str(data), "--out", str(out), "--epochs", "1", *SMALL_RUN],
                                    capsys)  # fmt: skip
    lines = stderr_lines(stderr)
    assert status == 1 and len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {data}/negatives/sample10-seed98765-"), stderr
    assert lines[0].endswith(f"cannot write it (Read-only file system); no checkpoint was written yet, so {out} "
                             "was removed"), stderr  # fmt: skip
    assert not out.exists() and sorted(p.name for p in data.iterdir()) == sorted(p.name for p in data_copy.iterdir())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_training_keeps_the_best_checkpoint(signum, data_copy, tmp_path):
    """A real SIGINT (Ctrl-C) or SIGTERM (kill, a launcher) once the first best.pt exists: exit status 130, one line
    naming it, no test result."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", RECSYS_QUIET="1", PYTHONPATH=str(REPO))
    command = [sys.executable, str(REPO / SASREC), "--data", str(data_copy), "--out", str(out), "--epochs", "1000",
               "--patience", "1000", *SMALL_RUN]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_sigint)  # fmt: skip
    stderr = interrupted_once(process, out / "best.pt", lambda: process.send_signal(signum))
    assert process.returncode == 130, stderr
    assert stderr_lines(stderr) == [
        f"interrupted: kept {out}/best.pt (no test_metrics.json: the run did not finish)"
    ], stderr
    assert "model" in torch.load(out / "best.pt", weights_only=True) and not (out / "test_metrics.json").exists()


def processes_tagged(tag: str) -> list[int]:
    """Live processes whose environment holds REPRODUCE_TEST_TAG=tag (a grid's workers inherit its environment)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if f"REPRODUCE_TEST_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
@pytest.mark.parametrize("stopped", ["cells", "launched fine-tuning"])
def test_a_stopped_grid_leaves_no_worker_behind(signum, stopped, data_copy, tmp_path):
    """reproduce.py --jobs 2, its process alone signalled while two cells train (or while --finetune-processes 2
    fine-tunes under torchrun): SIGTERM ends it in one line (exit 130) and its workers with it; after a SIGKILL,
    which it cannot handle, the orphaned workers end themselves. No process goes on writing into --out (the launched
    fine-tuning's torchrun and its processes included), and the next call redoes the cut cells."""
    out, tag = tmp_path / "grid", f"{os.getpid()}-{signum}-{stopped}"
    env = dict(os.environ, OMP_NUM_THREADS="1", RECSYS_QUIET="1", PYTHONPATH=str(REPO), REPRODUCE_TEST_TAG=tag)
    finetuning = ["--finetune-epochs", "1000", "--finetune-processes", "2"]
    command = [sys.executable, str(REPO / "reproduce.py"), "--data", str(data_copy), "--backbone", "tiny", "--out",
               str(out), "--models", "sasrec", "--transforms", "none", "--seeds", "42", "--sample-sizes", "10",
               *(finetuning if stopped == "launched fine-tuning" else ["--finetune-epochs", "0"]), "--epochs", "1000",
               "--patience", "1000", "--hidden-size", "16", "--device", "cpu", "--jobs", "2"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_sigint)  # fmt: skip
    if stopped == "cells":
        running = out / "runs" / "sasrec-longformer-none-sampled-10-seed42" / "best.pt"  # both cells train
    else:
        running = out / "finetune" / "metrics.jsonl"  # its untrained validation is done
    stderr = interrupted_once(process, running, lambda: process.send_signal(signum))
    deadline = time.monotonic() + 20
    while processes_tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_tagged(tag) == []
    if signum == signal.SIGTERM:
        assert process.returncode == 130, stderr
        assert stderr_lines(stderr) == [f"interrupted: the grid in {out} stopped; its finished tasks are kept, and "
                                        "the same command goes on from them"], stderr  # fmt: skip
    assert not list(out.glob("runs/*/test_metrics.json"))


@pytest.mark.parametrize("script, flags", [
    (SASREC, SMALL_RUN),
    ("train_bert4rec.py", SMALL_RUN),
    ("finetune_recformer.py", ["--backbone", "tiny", "--sample-size", "10", "--device", "cpu", "--no-tensorboard"]),
])  # fmt: skip
def test_ctrl_c_before_the_first_checkpoint_removes_the_run(script, flags, data_copy, tmp_path, capsys,
                                                            monkeypatch):  # fmt: skip
    import common.evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.evaluation, "evaluate", interrupted)  # the first validation
    out = tmp_path / "run"
    status, stderr = run_in_process(script, ["--data", str(data_copy), "--out", str(out), "--epochs", "1", *flags],
                                    capsys)  # fmt: skip
    assert status == 130
    assert stderr_lines(stderr) == [f"interrupted: no checkpoint was written yet, so {out} was removed"], stderr
    assert not out.exists()


def test_two_runs_started_at_once_on_one_out(tmp_path, monkeypatch):
    """Both runs pass the up-front check (the barrier holds each until the other has too); one claims --out, the
    other gets one line and leaves the winner's directory alone."""
    import common.run
    from common.run import OutputError, create_run_dir, ending_in_one_line

    out, both_checked = tmp_path / "run", threading.Barrier(2, timeout=30)
    real_check = common.run.check_run_dir

    def check_then_wait(*args, **kwargs):
        real_check(*args, **kwargs)
        both_checked.wait()

    monkeypatch.setattr(common.run, "check_run_dir", check_then_wait)
    outcomes = []

    def start(name: str) -> None:
        try:
            outcomes.append((name, create_run_dir(out, "test", tmp_path, "x", {"run": name})))
        except OutputError as error:
            outcomes.append((name, error))

    threads = [threading.Thread(target=start, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [(name, result) for name, result in outcomes if isinstance(result, Path)]
    losers = [result for _, result in outcomes if isinstance(result, OutputError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert str(losers[0]) == f"{out}: another run started in it at the same time; choose another --out"
    assert json.loads((out / "config.json").read_text())["run"] == winners[0][0]  # the winner's config, whole
    with pytest.raises(SystemExit, match=rf"^error: {out}: another run started in it at the same time"):
        with ending_in_one_line("best.pt"):
            raise losers[0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # the winner's run is left alone


def test_a_model_too_large_for_memory_is_one_line(data_copy, tmp_path):
    """Under a 6 GiB address-space limit, SASRec at width 60000 (a 43 GB attention projection) cannot be built."""
    limit = 6 << 30

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS="1", RECSYS_QUIET="1", PYTHONPATH=str(REPO))
    command = [sys.executable, str(REPO / SASREC), "--data", str(data_copy), "--out", str(tmp_path / "run"),
               "--hidden-size", "60000", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_memory)  # fmt: skip
    assert result.returncode == 1 and len(stderr_lines(result.stderr)) == 1, result.stderr
    assert result.stderr.startswith("error: --hidden-size: the model does not fit in memory at 60000: it tried to "
                                    "allocate "), result.stderr  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_an_interrupted_resume_keeps_the_run_it_continued(tmp_path, capsys):
    """A run continued with --resume is an earlier run's directory: interrupted before it wrote a checkpoint of its
    own, it is kept whole and the line says how to go on, instead of 'this process wrote no run directory'."""
    from common.run import create_run_dir, ending_in_one_line

    out = tmp_path / "run"
    out.mkdir()
    (out / "resume.pt").write_bytes(b"an earlier run's state")
    with pytest.raises(SystemExit) as stop:
        with ending_in_one_line("stage1", resumable=True):
            create_run_dir(out, "test", tmp_path, "x", {"run": "resumed"}, resume=True)
            raise KeyboardInterrupt
    assert stop.value.code == 130
    assert stderr_lines(capsys.readouterr().err) == [
        f"interrupted: kept {out} (the run did not finish; the same command with --resume --out {out} goes on)"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "resume.pt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the stage's, not the process's
