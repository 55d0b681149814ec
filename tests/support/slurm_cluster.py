"""A one-node SLURM cluster on this machine, for the tests: Debian's slurm-wlm and munge.

``why_unavailable()`` says why this machine cannot host it (not root, no apt, a real cluster's
configuration or daemons already here); ``install()`` installs the packages with apt-get when
they are missing; ``one_node_cluster(state_dir)`` writes ``/etc/slurm/slurm.conf`` and
``gres.conf`` (the jobstep plugin drops ``SLURM_CONF``, so the inner ``srun`` reads only the
default path), starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as child
processes, waits until the node is idle, and on exit cancels the partition's jobs, stops exactly
the daemons it started (by PID) and removes the configuration it wrote.

The node has the machine's real CPUs and memory (``slurmd -C``) and one fake GPU
(``gres.conf`` ``File=/dev/null``), so that ``--gpus=1`` schedules; no accounting database
(``sacct`` cannot answer: use ``slurm-status-command: squeue``).

By hand (as root)::

    python tests/workflow/slurm_cluster.py /tmp/slurm-state    # starts it; Ctrl-C stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

SLURM_DIR = Path("/etc/slurm")
CONF_FILES = (SLURM_DIR / "slurm.conf", SLURM_DIR / "gres.conf")
MARKER = "# lmdynamics test cluster (tests/slurm_cluster.py): safe to delete"
PARTITION = "lmdtest"
PACKAGES = ("slurm-wlm", "munge")
COMMANDS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "srun", "scontrol")
MUNGE_RUN = Path("/run/munge")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def running(name: str) -> list[int]:
    """PIDs of processes whose command name is ``name`` (read from /proc, nothing is signalled)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with suppress(OSError):
            if comm.read_text().strip() == name:
                pids.append(int(comm.parent.name))
    return pids


def why_unavailable() -> str | None:
    """Why this machine cannot host the test cluster, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"a SLURM test cluster needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "not root: starting slurmctld/slurmd and writing /etc/slurm need root"
    if not all(map(_which, COMMANDS)) and _which("apt-get") is None:
        return "slurm-wlm/munge are not installed and there is no apt-get to install them"
    for conf in CONF_FILES:
        if conf.exists() and MARKER not in conf.read_text():
            return f"{conf} exists and was not written by this test: not touching a real cluster"
    for daemon in ("slurmctld", "slurmd"):
        if pids := running(daemon):
            return f"{daemon} is already running (pid {pids[0]}): not disturbing it"
    return None


def install(timeout: float = 600) -> None:
    """``apt-get install -y slurm-wlm munge`` unless every command is already there."""
    if all(map(_which, COMMANDS)):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-2000:]}")
    missing = [c for c in COMMANDS if not _which(c)]
    if missing:
        raise RuntimeError(f"installed {', '.join(PACKAGES)} but still missing: {missing}")


def node_line() -> str:
    """This machine as a node (``slurmd -C``: CPUs, sockets, cores, threads, RealMemory)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True,
                         check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


def slurm_conf(state: Path, node: str, partition: str) -> str:
    """slurm.conf of a one-node cluster keeping all its state, logs and PID files in ``state``."""
    name = node.split()[0].removeprefix("NodeName=")
    return f"""{MARKER}
ClusterName=lmdtest
SlurmctldHost={name}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
MpiDefault=none
ReturnToService=2
# finished jobs stay visible to squeue/scontrol for an hour (the plugin's squeue status
# command needs >= 3 x its first status interval; the test inspects finished jobs)
MinJobAge=3600
StateSaveLocation={state}/slurmctld
SlurmdSpoolDir={state}/slurmd
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
{node} NodeAddr=127.0.0.1 Gres=gpu:1 State=UNKNOWN
PartitionName={partition} Nodes={name} Default=NO MaxTime=INFINITE State=UP
"""


def gres_conf(node: str) -> str:
    """One fake GPU: a gres with a File, or slurmd leaves the node INVAL."""
    name = node.split()[0].removeprefix("NodeName=")
    return f"{MARKER}\nNodeName={name} Name=gpu File=/dev/null\n"


@dataclass
class Cluster:
    """A running test cluster: its partition, state folder and the daemons it started."""

    partition: str
    state: Path
    node: str
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def ctld_log(self) -> Path:
        return self.state / "slurmctld.log"

    def scontrol(self, *args: str) -> str:
        return subprocess.run([_which("scontrol"), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout

    def logs(self) -> str:
        """Tails of the daemons' logs, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            with suppress(OSError):
                parts.append(f"--- {name}\n{(self.state / name).read_text()[-3000:]}")
        return "\n".join(parts)


def _start(cluster: Cluster, name: str, cmd: list[str], **kwargs) -> None:
    log = open(cluster.state / f"{name}.out", "ab")  # noqa: SIM115 (closed with the daemon)
    cluster.daemons[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, **kwargs)
    log.close()


def _munge_works() -> bool:
    munge, unmunge = _which("munge"), _which("unmunge")
    if not (munge and unmunge):
        return False
    cred = subprocess.run([munge, "-n"], capture_output=True, timeout=10)
    if cred.returncode != 0:
        return False
    return subprocess.run([unmunge], input=cred.stdout, capture_output=True,
                          timeout=10).returncode == 0


def _wait(predicate, what: str, cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.daemons.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for "
                                   f"{what}:\n{cluster.logs()}")
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{cluster.logs()}")


def _start_munge(cluster: Cluster) -> None:
    """Start munged as user munge unless one already answers (that one is left alone)."""
    if _munge_works():
        return
    MUNGE_RUN.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_RUN, "munge", "munge")
    MUNGE_RUN.chmod(0o755)
    munge_log = cluster.state / "munged.log"
    munge_log.touch()
    shutil.chown(munge_log, "munge", "munge")
    _start(cluster, "munged", [_which("munged"), "--foreground", f"--log-file={munge_log}"],
           user="munge", group="munge", extra_groups=[])
    _wait(_munge_works, "munged to answer", cluster, timeout=30)


def _node_idle(cluster: Cluster) -> bool:
    proc = subprocess.run([_which("sinfo"), "-h", "-N", "-p", cluster.partition, "-o", "%T"],
                          capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and proc.stdout.strip() == "idle"


def stop(cluster: Cluster, timeout: float = 20) -> None:
    """Cancel the partition's jobs, then stop the daemons this cluster started, by PID."""
    if "slurmctld" in cluster.daemons and cluster.daemons["slurmctld"].poll() is None:
        subprocess.run([_which("scancel"), "-p", cluster.partition], capture_output=True,
                       timeout=30)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.daemons.get(name)
        if proc is None or proc.poll() is not None:
            continue
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


@contextmanager
def one_node_cluster(state: Path, partition: str = PARTITION) -> Iterator[Cluster]:
    """Run a one-node cluster with partition ``partition`` while the block runs."""
    state = Path(state).resolve()
    (state / "slurmctld").mkdir(parents=True, exist_ok=True)
    (state / "slurmd").mkdir(parents=True, exist_ok=True)
    node = node_line()
    cluster = Cluster(partition=partition, state=state,
                      node=node.split()[0].removeprefix("NodeName="))
    SLURM_DIR.mkdir(parents=True, exist_ok=True)
    try:
        CONF_FILES[0].write_text(slurm_conf(state, node, partition))
        CONF_FILES[1].write_text(gres_conf(node))
        _start_munge(cluster)
        # -D: foreground (the PID is ours to stop); -i: ignore state left by an earlier run
        _start(cluster, "slurmctld", [_which("slurmctld"), "-D", "-i"])
        _start(cluster, "slurmd", [_which("slurmd"), "-D"])
        _wait(lambda: _node_idle(cluster), f"node {cluster.node} to be idle", cluster)
        yield cluster
    finally:
        stop(cluster)
        for conf in CONF_FILES:
            with suppress(OSError):
                if MARKER in conf.read_text():
                    conf.unlink()


if __name__ == "__main__":
    if reason := why_unavailable():
        raise SystemExit(reason)
    install()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on SIGTERM too
    with one_node_cluster(Path(sys.argv[1] if len(sys.argv) > 1 else "slurm-state")) as c:
        print(f"partition {c.partition} on node {c.node}; state in {c.state}; Ctrl-C stops it")
        with suppress(KeyboardInterrupt):
            signal.pause()
