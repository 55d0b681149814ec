"""Warm start: ``lmdynamics`` commands forked from one process that has imported the libraries.

A tiny-suite job does about a second of work and spends 4-6 s importing torch, transformers,
xarray and zarr (benchmarks/RESULTS.md, "Warm start"); across the 70 jobs of the tiny DAG that
start cost is most of the run. With ``execution.warm_start: true`` the workflow sets
:data:`ENV_VAR` for its jobs, and each ``lmdynamics <command>`` (the *client*) asks a *server*
for a process instead of importing:

- The server is one process per user, Python, installed code and environment (:func:`key`).
  The first client starts it (:func:`main`, ``serve KEY``, detached, with the client's
  ``sys.path``, its log in the socket folder); it imports :data:`PRELOAD` one module at a
  time between requests, and exits after :data:`IDLE_SECONDS` with nothing running. The
  environment is the one the command loads its libraries under
  (:func:`lmdynamics.cli.command_environment`: the job's, plus the thread pinning of a
  command that runs a model). Any change to it (the thread variables Snakemake sets for a
  job's ``threads``, ``HF_HUB_OFFLINE``, ...), to the interpreter, to the package's files, to
  a ``sys.path`` folder's entries (a ``pip install``), or to the umask, resource limits, CPU
  affinity or nice value gives another key, so another server: a server never runs code or
  settings a fresh process would not.
- Per request the server forks a child, which takes the client's working directory,
  environment, arguments and standard streams (passed as file descriptors) and runs
  :func:`lmdynamics.cli.run_command`, exactly what a fresh process runs. The client waits for
  the child's exit status and exits with it (128 + N for signal N, as a shell reports it); it
  forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the child, and if the client dies (Snakemake
  killed the job) the child kills itself. So each job is still its own process with its own
  outputs, log and exit status: the DAG, what reruns and what a failure marks incomplete are
  unchanged; only the imports are shared.
- The client falls back to running the command itself when no server can be had (another
  platform than Linux, a SLURM job, whose cgroup must hold its own work, a socket folder that is
  not private to the user, a path too long for a socket, a server that does not start within
  :data:`START_SECONDS`). It never runs a command twice: the child waits for the client's go
  (sent after the client has the child's pid) before it starts.

Snakemake's ``benchmark:`` files of a warm job time its wall clock correctly; their memory and
CPU columns describe the client (the child is not its descendant). Nothing about results
changes: the tiny DAG's tables and every array of its stores are identical warm and cold
(RESULTS.md).
"""

from __future__ import annotations

import array
import gc
import hashlib
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: ``1`` turns warm start on for the process and the jobs it starts (common.smk sets it from
#: the config's ``execution.warm_start``); anything else, or unset, leaves it off.
ENV_VAR = "LMDYNAMICS_WARM_START"
#: A server with no child running and no request for this long exits (a DAG's jobs follow
#: each other within milliseconds; each idle server holds about 450 MB).
IDLE_SECONDS = 10.0
#: How long a client waits for a server it started to accept, before running cold.
START_SECONDS = 20.0
#: What the server imports, in this order, between requests: what the commands import at their
#: start (torch and transformers' model classes for extraction, training and the reference
#: store; xarray, zarr, pandas and matplotlib for reductions, tables and figures). Importing is
#: all it does: no module's function runs before a fork.
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "lmdynamics.extraction.extract",
    "lmdynamics.extraction.reference",
    "lmdynamics.sources.tiny",
    "transformers.models.gpt_neox.modeling_gpt_neox",
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2",
    "xarray",
    "zarr",
    "pandas",
    "lmdynamics.reduction.metrics",
    "lmdynamics.reduction.stats",
    "lmdynamics.reduction.audit",
    "lmdynamics.report.figures",
    "lmdynamics.report.conjecture",
    "lmdynamics.report.tables",
)
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_HEADER = struct.Struct("!I")


def enabled(environ: dict | None = None) -> bool:
    """Whether this process should ask for a warm child: :data:`ENV_VAR` is ``1``, on Linux
    (fork after loading torch is what Linux's libraries support; macOS's frameworks are not
    fork-safe), outside a SLURM job."""
    env = os.environ if environ is None else environ
    return (env.get(ENV_VAR) == "1" and sys.platform.startswith("linux")
            and not env.get("SLURM_JOB_ID"))


def socket_dir() -> Path:
    """The user's private folder of servers' sockets and logs: ``$XDG_RUNTIME_DIR/lmdynamics``
    or ``<tmp>/lmdynamics-<uid>``, mode 0700. Raises ``PermissionError`` if it exists but is
    not a folder owned by this user that only this user can open (another user could then
    answer as a server)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = (Path(base) / "lmdynamics" if base and os.path.isdir(base)
            else Path("/tmp") / f"lmdynamics-{os.getuid()}")
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path}: not a folder private to uid {os.getuid()} "
                              f"(owner {st.st_uid}, mode {st.st_mode & 0o777:o}); remove it "
                              "or set XDG_RUNTIME_DIR to a private folder")
    return path


def key(environ: dict | None = None) -> str:
    """What a process's imports depend on, hashed: the user, the interpreter and its flags,
    ``sys.path`` and each of its folders' modification time (installing or removing a package
    changes its folder), every file of the installed ``lmdynamics`` package (path, size,
    modification time), the whole environment, and the umask, resource limits, CPU affinity
    and nice value. Equal keys import the same code with the same settings, and a child of
    the server runs under what its client would have given a fresh process."""
    env = dict(os.environ if environ is None else environ)
    package = Path(__file__).parent
    files = []
    for root, dirs, names in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            st = os.stat(os.path.join(root, name))
            files.append((os.path.relpath(os.path.join(root, name), package), st.st_size,
                          st.st_mtime_ns))
    folders = []
    for entry in _import_path():
        try:
            folders.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            folders.append((entry, None))
    facts = [os.getuid(), sys.executable, sys.version, repr(sys.flags), sorted(sys._xoptions),
             str(package), files, folders, sorted(env.items()), _process_state()]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:24]


def _process_state() -> list:
    """What else a process inherits from the one that starts it, and a forked child takes
    from the server instead of from its client: the umask, the resource limits, the CPUs it
    may run on and its nice value."""
    import resource

    mask = os.umask(0)
    os.umask(mask)
    limits = [(name, resource.getrlimit(getattr(resource, name)))
              for name in sorted(dir(resource)) if name.startswith("RLIMIT_")]
    return [mask, limits, sorted(os.sched_getaffinity(0)), os.getpriority(os.PRIO_PROCESS, 0)]


# --- client -----------------------------------------------------------------------------------

def run(argv: Sequence[str], environ: dict[str, str] | None = None) -> int | None:
    """Run ``lmdynamics argv`` in a warm child whose environment is ``environ`` (default: this
    process's; :func:`lmdynamics.cli.command_environment` adds what the command sets before
    its imports); its exit status, or ``None`` if no server could be had (the caller then
    runs the command itself; nothing has run)."""
    env = dict(os.environ if environ is None else environ)
    try:
        folder = socket_dir()
    except OSError as exc:
        print(f"lmdynamics: warm start off: {exc}", file=sys.stderr, flush=True)
        return None
    k = key(env)
    path = folder / f"{k}.sock"
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
        return None
    conn = _connect(path)
    if conn is None:
        server = _start_server(folder, k, env)
        deadline = time.monotonic() + START_SECONDS
        while conn is None and time.monotonic() < deadline:
            time.sleep(0.02)
            conn = _connect(path)
            if conn is None and server.poll() is not None:
                conn = _connect(path)  # it exited: another server won the socket, or none
                if conn is None:
                    return None
        if conn is None:
            return None
    with conn:
        return _request(conn, list(argv), env)


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.fspath(path))
    except OSError:
        conn.close()
        return None
    return conn


def _import_path() -> list[str]:
    """``sys.path`` with each entry absolute (``''``, the working directory of ``python -c``,
    included): what a server, which works from ``/``, imports from."""
    return [os.path.abspath(entry) for entry in sys.path]


#: The server's start: the client's ``sys.path`` first (``-m`` or a console script would each
#: put another folder first), then :func:`main`.
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[3]); "
         "from lmdynamics.warm import main; raise SystemExit(main(sys.argv[1:3]))")


def _start_server(folder: Path, k: str, env: dict[str, str]) -> subprocess.Popen:
    with open(folder / f"{k}.log", "ab") as logfile:
        return subprocess.Popen([sys.executable, "-c", _BOOT, "serve", k,
                                 json.dumps(_import_path())],
                                stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                                start_new_session=True, close_fds=True, env=env)


def _request(conn: socket.socket, argv: list[str], env: dict[str, str]) -> int | None:
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}).encode()
    try:
        conn.sendmsg([_HEADER.pack(len(payload))],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        conn.sendall(payload)
        reader = conn.makefile("rb")
        first = reader.readline().split()
    except OSError:
        return None
    if len(first) != 2 or first[0] != b"pid" or not first[1].isdigit():
        return None  # the server went away (or answered nonsense) before our go: nothing ran
    pid = int(first[1])
    previous = {sig: signal.signal(sig, lambda s, _f: _forward(pid, s)) for sig in _SIGNALS}
    try:
        conn.sendall(b"go\n")
        while True:
            try:
                line = reader.readline().split()
                break
            except InterruptedError:  # pragma: no cover (PEP 475 retries these)
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if len(line) == 2 and line[0] == b"exit" and line[1].lstrip(b"-").isdigit():
        status = int(line[1])
        if 0 <= status <= 255:
            return status
        if -64 <= status < 0:
            known = {s.value: s.name for s in signal.Signals}
            print(f"lmdynamics: the job's process (pid {pid}) was killed by signal "
                  f"{known.get(-status, -status)}", file=sys.stderr, flush=True)
            return 128 - status
    print(f"lmdynamics: the warm-start server stopped (or answered {b' '.join(line)[:80]!r}) "
          f"before the job's process (pid {pid}) reported its exit status; see the server's "
          f"log in {socket_dir()}",
          file=sys.stderr, flush=True)
    while _alive(pid):  # it runs on (tied to this client), so its outputs are not done yet
        time.sleep(0.1)
    return 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover (the pid was reused by another user's process)
        return False
    return True


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- server -----------------------------------------------------------------------------------

def serve(k: str, idle: float = IDLE_SECONDS, preload: Sequence[str] = PRELOAD) -> None:
    """The server of key ``k``: bind its socket (or exit if a live server has it), then answer
    requests, importing ``preload`` one module at a time while none is waiting, until ``idle``
    seconds pass with no child running and no request."""
    # Like any daemon, it holds no job's folder (a killed run leaves nothing working in it);
    # its children take their client's.
    os.chdir("/")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s warm[{os.getpid()}] %(message)s")
    if k != key():
        log.info("key %s is not this process's (%s): the environment or code changed; exit",
                 k, key())
        return
    folder = socket_dir()
    _tidy(folder, k)
    path = folder / f"{k}.sock"
    listener = _bind(path, folder / f"{k}.lock")
    if listener is None:
        log.info("a live server has %s; exit", path)
        return
    inode = os.stat(path).st_ino
    log.info("serving %s (python %s)", path, sys.version.split()[0])
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "child")
    children: dict[int, socket.socket] = {}
    pending = list(preload)
    last = time.monotonic()
    while True:
        events = selector.select(0 if pending else 1.0)
        if not events and pending:
            name = pending.pop(0)
            started = time.monotonic()
            try:
                importlib.import_module(name)
            except Exception as exc:  # a module that fails here is imported (or fails) in the child
                log.info("preload %s failed: %s", name, exc)
            log.info("preloaded %s in %.2f s", name, time.monotonic() - started)
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_initialized():
                log.info("CUDA is initialised after importing %s: a forked child could not "
                         "use it; no more requests", name)  # their clients run cold
                selector.unregister(listener)
                listener.close()
                pending.clear()
            continue
        for selected, _ in events:
            if selected.data == "accept":
                conn, _ = listener.accept()
                inherited = [listener, selector, wake_r, wake_w, *children.values()]
                pid = _fork_child(conn, inherited)
                if pid is not None:
                    children[pid] = conn
                last = time.monotonic()
            else:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
        _reap(children)
        if children:
            last = time.monotonic()
        elif time.monotonic() - last > idle:
            break
    try:
        if os.stat(path).st_ino == inode:  # still ours, not a newer server's
            path.unlink()
    except FileNotFoundError:
        pass
    log.info("idle for %.0f s; exit", idle)


#: Logs and lock files of other keys untouched this long are removed when a server starts.
KEEP_SECONDS = 7 * 86400


def _tidy(folder: Path, k: str) -> None:
    """Remove the logs and lock files of servers (other keys) idle for :data:`KEEP_SECONDS`:
    every change of environment or code gives a new key, so they would pile up."""
    now = time.time()
    for old in [*folder.glob("*.log"), *folder.glob("*.lock")]:
        try:
            if old.stem != k and now - old.stat().st_mtime > KEEP_SECONDS:
                old.unlink()
        except FileNotFoundError:
            pass


def _bind(path: Path, lockfile: Path) -> socket.socket | None:
    import fcntl

    with open(lockfile, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        probe = _connect(path)
        if probe is not None:
            probe.close()
            return None
        try:
            path.unlink()  # a dead server's socket
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(path))
        os.chmod(path, 0o600)
        listener.listen(64)
    return listener


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        try:
            conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
        except OSError:
            pass  # the client is gone
        conn.close()


def _fork_child(conn: socket.socket, inherited: list) -> int | None:
    """Read one request from ``conn`` and fork its child; the child's pid (the parent keeps
    ``conn`` to send the exit status), or None for a request that could not be read.
    ``inherited``: the server's sockets, selector and fds, which the child closes."""
    request, fds = _receive(conn)
    if request is None:
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    _flush_streams()  # nothing of the server's may reach the job's log
    gc.freeze()  # the child's collections skip the server's objects (copy-on-write friendly)
    pid = os.fork()
    if pid == 0:
        for thing in inherited:
            os.close(thing) if isinstance(thing, int) else thing.close()
        _child(conn, request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    log.info("child %d: lmdynamics %s", pid, " ".join(request["argv"]))
    try:
        conn.sendall(f"pid {pid}\n".encode())
    except OSError:
        pass  # the child sees the client gone and exits without running
    return pid


def _receive(conn: socket.socket) -> tuple[dict | None, list[int]]:
    fds = array.array("i")
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.getuid():  # the folder is private; this is the second lock
        log.info("refused a request from uid %d", uid)
        return None, []
    conn.settimeout(10)
    try:
        data, ancillary, _flags, _addr = conn.recvmsg(
            _HEADER.size, socket.CMSG_SPACE(3 * fds.itemsize))
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        if len(data) != _HEADER.size or len(fds) != 3:
            return None, list(fds)
        (size,) = _HEADER.unpack(data)
        body = b""
        while len(body) < size:
            chunk = conn.recv(min(1 << 20, size - len(body)))
            if not chunk:
                return None, list(fds)
            body += chunk
        request = json.loads(body)
    except (OSError, ValueError):
        return None, list(fds)
    finally:
        conn.settimeout(None)
    ok = (isinstance(request, dict) and isinstance(request.get("cwd"), str)
          and isinstance(request.get("argv"), list)
          and all(isinstance(a, str) for a in request["argv"])
          and isinstance(request.get("env"), dict)
          and all(isinstance(k, str) and isinstance(v, str)
                  for k, v in request["env"].items()))
    return (request if ok else None), list(fds)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: wait for the client's go, become the job's process, run it and exit
    with the status a fresh ``lmdynamics`` process would have (``SystemExit``'s code, 1 and the
    traceback after an uncaught exception, death by SIGINT after Ctrl-C).

    It leaves by ``os._exit`` after flushing the logs and standard streams, as Python's own
    fork children do (``multiprocessing``; the os module's documentation: "the standard way to
    exit is ``sys.exit(n)``. ``_exit()`` should normally only be used in the child process after
    a fork()"): a normal interpreter exit tears down every module the server imported, which
    in a child writes to each copy-on-write page of the server's heap (1.2-1.4 s measured,
    against 0.02 s). The commands close what they open; none registers an exit handler.
    """
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if conn.makefile("rb").readline() != b"go\n":
        os._exit(0)  # the client is gone before it had our pid: run nothing
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    threading.Thread(target=_die_with_client, args=(conn,), daemon=True).start()
    logging.getLogger().handlers.clear()  # the server's; the command configures its own
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [sys.argv[0], *request["argv"]]
    from lmdynamics import cli

    try:
        code = cli.run_command(request["argv"])
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        _flush_streams()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    _flush_streams()
    os._exit(code & 0xFF)


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _die_with_client(conn: socket.socket) -> None:
    """The job's client is its process for Snakemake: when it goes (killed with the job), so does
    this child."""
    try:
        conn.recv(1)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "serve":
        print("usage: python -m lmdynamics.warm serve KEY", file=sys.stderr)
        return 2
    serve(args[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
