"""Warm start (:mod:`lmdynamics.warm`): a command forked from a server behaves as the same
command in a fresh process (output, exit status, files written); signals and the death of the
client reach the forked child; equal environments share a server and different ones never do;
a socket folder that is not private, or a SLURM job, runs the command cold.

Every test runs the real ``lmdynamics`` command in subprocesses, with its own short
``XDG_RUNTIME_DIR`` (a socket path holds at most 108 bytes) and stops its servers at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from lmdynamics import warm
from lmdynamics.cli import THREAD_VARIABLES
from lmdynamics.config import resolved_warm_start

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="warm start is Linux only")


@pytest.fixture
def runtime_dir():
    path = Path(tempfile.mkdtemp(prefix="lmdw", dir="/tmp"))
    yield path
    for pid in server_pids(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def server_logs(runtime_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((runtime_dir / "lmdynamics").glob("*.log")))


def server_pids(runtime_dir: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"warm\[(\d+)\] serving", server_logs(runtime_dir))]


def child_pids(runtime_dir: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"child (\d+): lmdynamics", server_logs(runtime_dir))]


def environment(runtime_dir: Path, on: bool = True, **extra: str) -> dict:
    """The test's environment without thread variables (as a shell's), warm start ``on``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", *THREAD_VARIABLES)}
    env.update({"XDG_RUNTIME_DIR": str(runtime_dir), warm.ENV_VAR: "1" if on else "0",
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
                **extra})
    if "SLURM_JOB_ID" not in extra:
        env.pop("SLURM_JOB_ID", None)
    return env


def lmdynamics(args: list[str], env: dict, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "lmdynamics", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def without_times(text: str) -> str:
    return re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+ ", "", text, flags=re.M)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("args", [
    ["--help"],                                              # exit 0, stdout
    ["plan", "--bogus"],                                     # argparse: exit 2, usage on stderr
    ["plan", "--configfile", "missing.yaml", "--offline"],   # a user's error: exit 1, one line
])
def test_a_warm_command_answers_as_a_fresh_process(runtime_dir, tmp_path, args):
    cold = lmdynamics(args, environment(runtime_dir, on=False), cwd=tmp_path)
    assert not (runtime_dir / "lmdynamics").exists()
    hot = lmdynamics(args, environment(runtime_dir), cwd=tmp_path)
    assert len(child_pids(runtime_dir)) == 1  # it did run in a forked child
    assert hot.returncode == cold.returncode
    assert hot.stdout == cold.stdout
    assert without_times(hot.stderr) == without_times(cold.stderr)
    if args[0] == "plan" and args[1] != "--bogus":
        assert cold.returncode == 1 and "lmdynamics plan: error: " in cold.stderr


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_warm_extraction_writes_what_a_cold_one_writes(runtime_dir, tmp_path, threads):
    from faultlib import eval_batch, tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path / "ck", seed=3)
    batch = eval_batch(tmp_path / "batch.npy")
    stores = {}
    for on in (False, True):
        out = tmp_path / f"warm{on}.zarr"
        done = lmdynamics(["extract", "--checkpoint", str(checkpoint), "--eval-batch",
                           str(batch), "--size", "s", "--step", "0", "--model", "tiny-s",
                           "--revision", "step0", "--options", '{"tokens": 64}',
                           "--threads", threads, "--out", str(out)],
                          environment(runtime_dir, on))
        assert done.returncode == 0, done.stderr
        stores[on] = zarr.open_group(out, mode="r")
    assert len(child_pids(runtime_dir)) == 1
    cold, hot = stores[False], stores[True]
    assert sorted(cold.array_keys()) == sorted(hot.array_keys())
    for name in cold.array_keys():
        assert np.array_equal(cold[name][...], hot[name][...], equal_nan=True), name
    assert cold.attrs.asdict() == hot.attrs.asdict()


def test_equal_environments_share_a_server_and_different_ones_do_not(runtime_dir):
    env = environment(runtime_dir)
    for _ in range(2):
        assert lmdynamics(["--help"], env).returncode == 0
    assert len(server_pids(runtime_dir)) == 1
    assert len(child_pids(runtime_dir)) == 2
    # it holds no job's folder: a run killed with its jobs leaves nothing working in it
    assert psutil.Process(server_pids(runtime_dir)[0]).cwd() == "/"
    assert lmdynamics(["--help"], {**env, "OMP_NUM_THREADS": "3"}).returncode == 0
    assert len(server_pids(runtime_dir)) == 2
    assert len(list((runtime_dir / "lmdynamics").glob("*.sock"))) == 2


def test_a_dead_servers_socket_is_replaced(runtime_dir):
    env = environment(runtime_dir)
    assert lmdynamics(["--help"], env).returncode == 0
    (first,) = server_pids(runtime_dir)
    os.kill(first, signal.SIGKILL)  # its socket file stays behind
    assert wait_for(lambda: not alive(first))
    assert len(list((runtime_dir / "lmdynamics").glob("*.sock"))) == 1
    assert lmdynamics(["--help"], env).returncode == 0
    assert len(server_pids(runtime_dir)) == 2
    assert len(child_pids(runtime_dir)) == 2


def _blocked_client(runtime_dir: Path, tmp_path: Path):
    """A warm ``lmdynamics plan`` whose config file is a FIFO nobody writes: it blocks in
    ``open``. Returns the client and its child's pid."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    client = subprocess.Popen([sys.executable, "-m", "lmdynamics", "plan", "--configfile",
                               str(fifo), "--offline"], env=environment(runtime_dir),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: child_pids(runtime_dir)), server_logs(runtime_dir)
    (child,) = child_pids(runtime_dir)
    assert alive(child)
    return client, child


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_to_the_client_reach_the_child(runtime_dir, tmp_path, sig):
    client, child = _blocked_client(runtime_dir, tmp_path)
    time.sleep(0.5)  # the child is in open(), past its start
    client.send_signal(sig)
    assert client.wait(timeout=30) == (128 + sig if sig == signal.SIGTERM else 130)
    assert wait_for(lambda: not alive(child), 10)


def test_the_child_dies_with_its_client(runtime_dir, tmp_path):
    client, child = _blocked_client(runtime_dir, tmp_path)
    client.kill()  # as Snakemake's kill of a job's process group would
    client.wait(timeout=30)
    assert wait_for(lambda: not alive(child), 10)


def test_a_socket_folder_others_can_open_turns_warm_start_off(runtime_dir):
    folder = runtime_dir / "lmdynamics"
    folder.mkdir()
    folder.chmod(0o777)
    done = lmdynamics(["--help"], environment(runtime_dir))
    assert done.returncode == 0 and "usage: lmdynamics" in done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith("lmdynamics: warm start off: ") and "not a folder private" in line
    assert not list(folder.iterdir())


def test_a_new_server_removes_week_old_logs_and_locks(runtime_dir):
    folder = runtime_dir / "lmdynamics"
    folder.mkdir(mode=0o700)
    week = time.time() - warm.KEEP_SECONDS - 60
    old = [folder / "0123.log", folder / "0123.lock"]
    recent = folder / "4567.log"
    for path in [*old, recent]:
        path.write_text("")
    for path in old:
        os.utime(path, (week, week))
    assert lmdynamics(["--help"], environment(runtime_dir)).returncode == 0
    assert wait_for(lambda: not any(p.exists() for p in old))
    assert recent.exists()


def test_a_slurm_job_runs_cold(runtime_dir):
    done = lmdynamics(["--help"], environment(runtime_dir, SLURM_JOB_ID="42"))
    assert done.returncode == 0
    assert not (runtime_dir / "lmdynamics").exists()


@pytest.mark.parametrize(("config", "expected"), [
    ({"source": "tiny"}, True),
    ({"source": "hub"}, False),
    ({"source": "tiny", "execution": {"warm_start": False}}, False),
    ({"source": "hub", "execution": {"warm_start": True}}, True),
    ({"source": "hub", "execution": {"warm_start": None}}, False),
])
def test_warm_start_is_on_for_the_tiny_suite_unless_set(config, expected):
    assert resolved_warm_start(config) is expected
