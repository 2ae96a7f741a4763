"""Untrusted models run in a sandboxed worker process; the dashboard and the CLI only ever talk to it over a pipe.

The worker (`python -m analyzers.loading.worker`) is started under Debian's bubblewrap:
- its own user, PID, IPC, UTS, cgroup and network namespaces: no network at all, not even loopback of the host;
- a filesystem view of `/usr`, the Python environment and this project's code, read-only, plus one private scratch
  directory it may write; no other file of the server exists inside;
- the model and data files are opened by the parent and handed over as file descriptors, so the worker reads
  exactly those files and cannot name any other;
- uid 65534 in its own user namespace, with no capabilities, in a new session, killed with its parent, and under
  a seccomp filter that refuses to create processes (threads are allowed);
- rlimits on address space, CPU seconds, file size and open files (prlimit), and a wall-clock timeout per request
  enforced by the parent.

Where bubblewrap is missing or namespaces are forbidden, the worker still runs as a separate process under the same
rlimits (and without a network if `unshare -n` works). `sandbox_support().level` is then "reduced", and the UI and
`run.json` say so and why.

What crosses is JSON and `.npy` (`analyzers.loading.wire`): never a pickle. A worker that crashes, hangs past its
timeout or runs out of memory ends alone, with one line naming what happened.

Functions that take a model are marked `@runs_in_worker`: called with a `SandboxedModel` they run in its worker,
called with a local model they run here, unchanged.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import importlib
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AnalyzerError, first_line
from . import wire
from .layers import LayerGroups
from .scratch import process_scratch

LOG = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("analyzers", "sample_models")  # what the worker may import from this project
NOBODY = 65534
SCRATCH = "/scratch"  # the worker's writable directory, inside the sandbox
REGISTRY: dict = {}  # "module:qualname" -> the undecorated function a worker may run


ISOLATIONS = ("auto", "sandbox", "process")


def sandboxed(spec: str, arch: str | None, isolation: str) -> bool:
    """Whether `load_model` with these arguments runs the model in a sandboxed worker."""
    if isolation != "auto":
        return isolation == "sandbox"
    return not spec.startswith("sample:") and not (arch and ":" in arch)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one worker. Defaults fit the 100k-sample runs of `make bench` on a 24 GiB machine."""

    memory_bytes: int = 8 << 30  # address space; torch reserves little beyond what it uses on CPU
    cpu_seconds: int = 4 * 3600
    file_bytes: int = 8 << 30  # largest file the worker may write (a run's embeddings)
    open_files: int = 256
    start_timeout_s: float = 120.0
    request_timeout_s: float = 900.0

    @classmethod
    def from_environment(cls) -> "SandboxLimits":
        """Limits from ANALYZERS_WORKER_MEMORY_MB, ANALYZERS_WORKER_TIMEOUT_S (the server operator's settings)."""
        values = {}
        if os.environ.get("ANALYZERS_WORKER_MEMORY_MB"):
            values["memory_bytes"] = int(os.environ["ANALYZERS_WORKER_MEMORY_MB"]) << 20
        if os.environ.get("ANALYZERS_WORKER_TIMEOUT_S"):
            values["request_timeout_s"] = float(os.environ["ANALYZERS_WORKER_TIMEOUT_S"])
        return cls(**values)


@dataclass(frozen=True)
class SandboxSupport:
    """How strongly workers are isolated on this machine: "full" (bubblewrap) or "reduced" (and why)."""

    level: str
    tool: str  # "bwrap", "unshare" or "rlimits"
    reason: str

    def as_dict(self) -> dict:
        return {"level": self.level, "tool": self.tool, "reason": self.reason}


_SUPPORT: SandboxSupport | None = None
_SUPPORT_LOCK = threading.Lock()


def sandbox_support() -> SandboxSupport:
    """Probe once per process which isolation works here: bubblewrap, else `unshare -n`, else rlimits alone."""
    global _SUPPORT
    with _SUPPORT_LOCK:
        if _SUPPORT is None:
            _SUPPORT = _probe_support()
        return _SUPPORT


def _probe_support() -> SandboxSupport:
    if os.environ.get("ANALYZERS_SANDBOX") == "reduced":  # the operator asked for it (or a test of the fallback)
        return SandboxSupport("reduced", "rlimits", "ANALYZERS_SANDBOX=reduced was set")
    bwrap = shutil.which("bwrap")
    problem = "bubblewrap (bwrap) is not installed: run `make setup`, or apt-get install bubblewrap"
    if bwrap:
        with tempfile.TemporaryDirectory(prefix="analyzers-probe-") as scratch:
            fds: list = []
            try:
                argv = _bwrap_argv(bwrap, Path(scratch), fds) + [sys.executable, "-c", "pass"]
                done = subprocess.run(argv, capture_output=True, timeout=60, pass_fds=fds)
                if done.returncode == 0:
                    return SandboxSupport("full", "bwrap", "bubblewrap: no network, private filesystem view, "
                                                           "unprivileged user, rlimits")
                problem = f"bubblewrap cannot create namespaces here ({first_line(done.stderr.decode(errors='replace') or 'exit ' + str(done.returncode))})"
            except (OSError, subprocess.SubprocessError) as exc:
                problem = f"bubblewrap failed to start ({first_line(exc)})"
            finally:
                for fd in fds:
                    os.close(fd)
    unshare = shutil.which("unshare")
    if unshare:
        try:
            done = subprocess.run([unshare, "-r", "-n", "/usr/bin/true"], capture_output=True, timeout=30)
            if done.returncode == 0:
                return SandboxSupport("reduced", "unshare", f"{problem}; the worker has no network (unshare -n) "
                                                            f"but sees the server's files")
        except (OSError, subprocess.SubprocessError):
            pass
    return SandboxSupport("reduced", "rlimits", f"{problem}; the worker is a separate process under rlimits only")


# seccomp: no new processes. Threads (clone with CLONE_THREAD) are allowed; fork, vfork and clone without
# CLONE_THREAD fail with EPERM, clone3 with ENOSYS (glibc then falls back to clone, which is checked). execve stays
# allowed so that bubblewrap can start Python, but it only replaces the one process. Root's RLIMIT_NPROC is not
# enforced by the kernel, so this is what limits processes.
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "clone": 56, "clone3": 435}),
                   "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435})}


def seccomp_program() -> bytes | None:
    """The BPF filter bytes for this machine's architecture, or None where it is not known."""
    import platform
    import struct

    arch = _SECCOMP_ARCHES.get(platform.machine())
    if arch is None:
        return None
    audit_arch, numbers = arch
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    kill_process = 0x80000000

    def op(code, jt, jf, k):
        return struct.pack("<HBBI", code, jt, jf, k)

    load_word, jump_eq, jump_set, ret = 0x20, 0x15, 0x45, 0x06
    program = [op(load_word, 0, 0, 4), op(jump_eq, 1, 0, audit_arch), op(ret, 0, 0, kill_process),
               op(load_word, 0, 0, 0)]
    for name in ("fork", "vfork"):
        if name in numbers:
            program += [op(jump_eq, 0, 1, numbers[name]), op(ret, 0, 0, eperm)]
    program += [op(jump_eq, 0, 1, numbers["clone3"]), op(ret, 0, 0, enosys)]
    program += [op(jump_eq, 0, 3, numbers["clone"]), op(load_word, 0, 0, 16), op(jump_set, 1, 0, 0x00010000),
                op(ret, 0, 0, eperm), op(ret, 0, 0, allow)]
    return b"".join(program)


def _bwrap_argv(bwrap: str, scratch: Path, fds: list) -> list:
    """bubblewrap's arguments: a user namespace in which the worker is uid 65534 with no capabilities, every other
    namespace new, and a filesystem of read-only system, Python and project directories plus the scratch directory.
    `fds` receives the descriptor of the seccomp filter, to be passed to the child."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    program = seccomp_program()
    if program is not None:
        read, write = os.pipe()
        os.write(write, program)  # a few hundred bytes: fits the pipe's buffer
        os.close(write)
        fds.append(read)
        argv += ["--seccomp", str(read)]
    # bubblewrap mounts in argument order: the fresh /tmp comes first, so that binds below it (a checkout or a
    # virtual environment under /tmp) land on top of it instead of being hidden by it
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr"]
    for link in ("/bin", "/lib", "/lib64", "/sbin"):
        target = Path(link)
        if target.is_symlink():
            argv += ["--symlink", os.readlink(target), link]
        elif target.is_dir():
            argv += ["--ro-bind", link, link]
    for item in ("/etc/ld.so.cache", "/etc/localtime"):
        if Path(item).exists():
            argv += ["--ro-bind", item, item]
    executable = Path(sys.executable)
    prefixes = {Path(sys.prefix), Path(sys.base_prefix).resolve(), executable.resolve().parents[1]}
    for prefix in sorted(prefixes, key=lambda p: len(str(p))):
        if str(prefix) != "/usr" and not str(prefix).startswith("/usr/"):
            argv += ["--ro-bind", str(prefix), str(prefix)]
    for name in CODE_DIRS:
        argv += ["--ro-bind", str(ROOT / name), str(ROOT / name)]
    argv += ["--bind", str(scratch), SCRATCH, "--chdir", str(ROOT), "--clearenv"]
    return argv


def _limits_argv(limits: SandboxLimits) -> list:
    # prlimit(1) sets the limits in the child before it execs the sandbox: no Python code runs between fork and
    # exec (a preexec_fn is unsafe in the dashboard's threaded server)
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        return []
    argv = [prlimit, f"--as={limits.memory_bytes}", f"--cpu={limits.cpu_seconds}", f"--fsize={limits.file_bytes}",
            f"--nofile={limits.open_files}", "--core=0"]
    return argv + ["--"]


# --- the worker handle --------------------------------------------------------------------------------------------

# bubblewrap's --die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that forked the worker ends, not
# the process: a worker started from a Streamlit script run (a thread per run) was killed a second after that run
# finished, while its model was still cached for the next one. Every worker is forked from this one thread instead,
# which lives as long as the process (an executor's idle thread waits for work; it does not exit).
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")


def _spawn(start):
    """`start()` (a Popen) run on the long-lived spawner thread."""
    return _SPAWNER.submit(start).result()


class WorkerError(AnalyzerError):
    """The worker failed: it crashed, timed out, ran out of memory or sent something malformed."""


class Worker:
    """One sandboxed worker process. Requests are serialised (one at a time); `close()` ends it."""

    def __init__(self, *, limits: SandboxLimits | None = None, name: str = "model"):
        self.limits = limits or SandboxLimits.from_environment()
        self.name = name
        self.support = sandbox_support()
        self._lock = threading.RLock()
        self._files: dict = {}  # key -> fd handed to the worker
        self._process = None
        # A private (0700) directory per worker: `scratch/` is bound into the sandbox, `worker.log` (its stderr) is
        # not, so the worker cannot rewrite what the operator reads.
        self._home = process_scratch("analyzers-worker-")  # swept by a later process should this one be killed
        self._scratch = self._home / "scratch"
        self._scratch.mkdir(mode=0o700)
        self._log = self._home / "worker.log"
        self._finalizer = weakref.finalize(self, _cleanup, None, self._home)

    @property
    def scratch(self) -> Path:
        """The worker's writable directory, as the parent sees it."""
        return self._scratch

    @property
    def scratch_inside(self) -> str:
        """The same directory as the worker sees it: `/scratch` in bubblewrap, the real path otherwise."""
        return SCRATCH if self.support.tool == "bwrap" else str(self._scratch)

    def hand_over(self, key: str, path: str | Path) -> int:
        """Open `path` for the worker to read; returns the descriptor number the worker will see. Call before start."""
        if self._process is not None:
            raise AnalyzerError("internal error: files are handed to a worker before it starts")
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise AnalyzerError(f"cannot open {Path(path).name!r} ({exc.strerror}): check the path") from exc
        self._files[key] = fd
        return fd

    def start(self) -> "Worker":
        with self._lock:
            if self._process is not None:
                return self
            support = self.support
            env = {"PATH": "/usr/bin:/bin", "HOME": SCRATCH, "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
                   "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1", "NUMBA_CACHE_DIR": f"{SCRATCH}/.numba",
                   "ANALYZERS_WORKER_THREADS": str(_torch_threads()), "LANG": "C.UTF-8",
                   "ANALYZERS_WORKER_SCRATCH": SCRATCH,
                   "LOKY_MAX_CPU_COUNT": str(_torch_threads())}  # joblib would spawn lscpu to count cores
            python = [sys.executable, "-s", "-E", "-m", "analyzers.loading.worker"]
            bind_fds: list = []
            if support.tool == "bwrap":
                argv = _bwrap_argv(shutil.which("bwrap"), self._scratch, bind_fds)
                for key, value in env.items():
                    argv += ["--setenv", key, value]
                argv += ["--", *python]
                env_arg, cwd = {}, None
            else:
                env["HOME"] = env["ANALYZERS_WORKER_SCRATCH"] = str(self._scratch)
                env["NUMBA_CACHE_DIR"] = str(self._scratch / ".numba")
                argv = (["unshare", "-r", "-n", "--"] if support.tool == "unshare" else []) + python
                env_arg, cwd = {"env": env}, str(ROOT)
            fds = tuple(self._files.values()) + tuple(bind_fds)
            for fd in fds:
                os.set_inheritable(fd, True)
            try:
                with open(self._log, "wb") as log:
                    self._process = _spawn(lambda: subprocess.Popen(
                        _limits_argv(self.limits) + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=log, pass_fds=fds, cwd=cwd, close_fds=True, start_new_session=True, **env_arg))
            except OSError as exc:
                raise WorkerError(f"the sandboxed worker could not start ({first_line(exc)})") from exc
            finally:
                for fd in fds:
                    os.close(fd)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _cleanup, self._process, self._home)
            _LIVE.add(self)
            ready = self._receive(self.limits.start_timeout_s, None)
            if not isinstance(ready, dict) or ready.get("ready") is not True:
                self.close()
                raise WorkerError("the sandboxed worker did not start properly")
            return self

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def request(self, message: dict, *, timeout: float | None = None, on_progress=None,
                max_reply_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES):
        """Send one request and return its result; progress frames go to `on_progress(stage, fraction)`. A reply
        announcing more than `max_reply_bytes` stops the worker before anything of it is allocated here."""
        with self._lock:
            if not self.alive:
                raise WorkerError(f"the worker of {self.name!r} is no longer running ({self._ending()}): load the "
                                  f"model again")
            try:
                wire.write_frame(self._process.stdin.fileno(), message)
            except (BrokenPipeError, OSError) as exc:
                raise self._failure("stopped before it took the request") from exc
            return self._receive(timeout or self.limits.request_timeout_s, on_progress, max_reply_bytes)

    def _receive(self, timeout: float, on_progress, max_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES):
        deadline = time.monotonic() + timeout
        fd = self._process.stdout.fileno()

        def wait() -> None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError

        while True:
            try:
                reply = wire.read_frame(fd, deadline=wait, max_bytes=max_bytes)
            except TimeoutError:
                self.kill()
                raise WorkerError(f"the model {self.name!r} did not answer within {timeout:.0f} s and its worker was "
                                  f"stopped: it may loop forever; raise ANALYZERS_WORKER_TIMEOUT_S if it is only slow")
            except EOFError:
                raise self._failure("ended without answering") from None
            except wire.WireError as exc:
                self.kill()
                raise WorkerError(f"the worker of {self.name!r} sent a malformed reply ({exc}) and was stopped")
            if not isinstance(reply, dict):
                self.kill()
                raise WorkerError(f"the worker of {self.name!r} sent a malformed reply and was stopped")
            if "progress" in reply:
                stage, fraction = (list(reply["progress"]) + [None, None])[:2]
                if on_progress is not None and isinstance(stage, str) and isinstance(fraction, (int, float)):
                    on_progress(stage, float(fraction))
                continue
            if "error" in reply:
                text = str(reply["error"])[:500].splitlines()[0] if str(reply["error"]).strip() else "failed"
                raise AnalyzerError(text)
            return reply.get("ok", reply)

    def _failure(self, what: str) -> WorkerError:
        ending = self._ending(wait=True)
        with contextlib.suppress(OSError):  # for the operator's log only: the person sees the one line below
            LOG.warning("worker of %r %s (%s); its stderr ended with:\n%s", self.name, what, ending,
                        self._log.read_bytes()[-2000:].decode(errors="replace"))
        return WorkerError(f"the worker running {self.name!r} {what}: {ending}; the dashboard and other sessions are "
                           f"unaffected")

    def _ending(self, wait: bool = False) -> str:
        if self._process is None:
            return "it never started"
        try:
            code = self._process.wait(timeout=5) if wait else self._process.poll()
        except subprocess.TimeoutExpired:
            self.kill()
            code = self._process.poll()
        if code is None:
            return "it is still running"
        if code < 0 or code > 128:
            number = -code if code < 0 else code - 128
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = str(number)
            if name == "SIGKILL":
                return "it was killed (SIGKILL), most likely for running out of memory"
            if name == "SIGXCPU":
                return "it used up its CPU-time limit (SIGXCPU)"
            return f"it crashed ({name})"
        if code == 3:
            return "it ran out of memory (the worker's memory limit; raise ANALYZERS_WORKER_MEMORY_MB)"
        return f"it exited with status {code}"

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)

    def close(self) -> None:
        """End the worker and remove its scratch directory.

        The worker holds nothing that is not already here (every answer has been read), so it is killed rather than
        asked to exit: an interpreter with torch and scikit-learn loaded takes seconds to tear itself down. Its
        scratch files go first, while it idles: deleting them while the kernel frees a large killed worker took
        0.2 s per directory (1.3 s for a 100k-sample run)."""
        shutil.rmtree(self._scratch, ignore_errors=True)
        self.kill()
        _LIVE.discard(self)
        self._finalizer()


_LIVE: "weakref.WeakSet[Worker]" = weakref.WeakSet()


def _cleanup(process, home: Path) -> None:
    if process is not None and process.poll() is None:
        with contextlib.suppress(Exception):
            process.kill()
            process.wait(timeout=5)
    shutil.rmtree(home, ignore_errors=True)


@atexit.register
def _close_all() -> None:
    for worker in list(_LIVE):
        with contextlib.suppress(Exception):
            worker.close()


def _torch_threads() -> int:
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else max(1, min(2, os.cpu_count() or 1))


# --- models in a worker ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SandboxedModel(LayerGroups):
    """A model loaded in a sandboxed worker: what `LoadedModel` says about it, and a way to run analyses there.

    Every `@runs_in_worker` function accepts it in place of a `LoadedModel`. It has no `module`: the weights and the
    graph live only in the worker."""

    spec: str
    sha256: str
    source: str
    input_shape: tuple
    num_classes: int
    class_names: tuple
    output_kind: str
    layers: tuple
    layer_kinds: dict = field(default_factory=dict, compare=False, hash=False)
    input_layout: object = field(default=None, compare=False)  # an inputs.InputLayout, or None for one float input
    feature_names: tuple | None = None  # what the model file calls its input features
    worker: Worker | None = field(default=None, compare=False, repr=False)
    sandbox: dict = field(default_factory=dict, compare=False)

    @property
    def module(self):
        raise AnalyzerError("this model runs in a sandboxed worker and has no module here: use the analyzers "
                            "functions (predict, explain, ...) with it, or load a trusted file with "
                            "isolation='process'")

    def call(self, function: str, *args, uses_dataset: bool = False, on_progress=None, timeout=None, **kwargs):
        """Run the registered function `module:qualname` in the worker, with the worker's model as first argument."""
        return self.worker.request({"op": "call", "function": function, "args": list(args), "kwargs": kwargs,
                                    "dataset": uses_dataset, "report": on_progress is not None},
                                   timeout=timeout, on_progress=on_progress)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def open_sandboxed(model_path: str | Path, *, name: str | None = None, spec: str | None = None, arch=None,
                   input_shape=None, class_names=None, data_path: str | Path | None = None, data_options=None,
                   limits: SandboxLimits | None = None, unchecked_archive_for_tests: bool = False):
    """Start a worker, load the model at `model_path` in it (and the dataset at `data_path`, if given).

    Returns `(SandboxedModel, dataset description or None)`. `unchecked_archive_for_tests` turns the archive policy
    off inside the worker, so a test can prove the sandbox alone contains a payload: never use it otherwise."""
    is_sample = str(model_path).startswith("sample:")
    model_path = Path(model_path) if not is_sample else model_path
    name = name or (model_path if is_sample else model_path.name)
    from .splits import check_split_specs

    # a run over split files hands the worker one file per split ({name: path}, splits.combine_splits)
    data_parts = None if data_path is None else (
        check_split_specs(data_path) if isinstance(data_path, dict) else {None: data_path})
    for kind, path in (("model", None if is_sample else model_path), *(("dataset", p) for p in
                                                                        (data_parts or {}).values())):
        if path is not None and not str(path).startswith("sample:") and not Path(path).is_file():
            raise AnalyzerError(f"{kind} file {str(path)!r} does not exist: check the path")
    if not is_sample and model_path.suffix.lower() == ".pt2" and not unchecked_archive_for_tests:
        from .archive_policy import sanitize_export_archive

        # refuse a hostile archive before any worker starts: one line, nothing of it parsed by torch
        sanitize_export_archive(model_path.read_bytes(), name)
    worker = Worker(limits=limits, name=name)
    try:
        model_fd = None if is_sample else worker.hand_over("model", model_path)
        parts = [{"split": split, "spec": str(path), "name": Path(str(path)).name,
                  "fd": None if str(path).startswith("sample:") else worker.hand_over(f"data:{split}", path)}
                 for split, path in (data_parts or {}).items()]
        worker.start()
        description = worker.request({"op": "load_model", "fd": model_fd, "name": name, "spec": spec or str(model_path),
                                      "arch": arch, "input_shape": list(input_shape) if input_shape else None,
                                      "class_names": list(class_names) if class_names else None,
                                      "check_archive": not unchecked_archive_for_tests})
        model = SandboxedModel(worker=worker, sandbox=worker.support.as_dict(), **_model_fields(description))
        dataset = None
        if data_path is not None:
            from ..evaluation.tasks import TASK_NAMES, read_for_task

            dataset = worker.request({"op": "load_dataset", "parts": parts, "options": dict(data_options or {})})
            if not isinstance(dataset, dict) or dataset.get("task") not in TASK_NAMES:
                raise WorkerError("the worker described the dataset in an unexpected form")
            # as the worker did: the model is read for the dataset's task
            model = read_for_task(model, dataset["task"])
        return model, dataset
    except BaseException:
        worker.close()
        raise


def worker_dataset(model: SandboxedModel):
    """The dataset the worker of `model` loaded and checked, copied here as plain arrays (`dataset_fields`).

    An upload is decoded only in the worker, so a file that slips past the declared-size checks ends the worker,
    not the dashboard; what arrives is bounded (`MAX_DATASET_BYTES`) and checked field by field. The worker drops
    its copy: analyses send it the rows they need."""
    from .datasets import MAX_DATASET_BYTES, dataset_from_fields

    fields = model.worker.request({"op": "dataset"}, max_reply_bytes=MAX_DATASET_BYTES + (64 << 20))
    return dataset_from_fields(fields)


def _model_fields(description) -> dict:
    if not isinstance(description, dict):
        raise WorkerError("the worker described the model in an unexpected form")
    try:
        fields = {
            "spec": str(description["spec"]), "sha256": str(description["sha256"]),
            "source": str(description["source"]),
            "input_shape": tuple(int(d) for d in description["input_shape"]),
            "num_classes": int(description["num_classes"]),
            "class_names": tuple(str(c) for c in description["class_names"]),
            "output_kind": str(description["output_kind"]),
            "layers": tuple(str(n) for n in description["layers"]),
            "layer_kinds": {str(k): str(v) for k, v in dict(description["layer_kinds"]).items()},
        }
        names = description.get("feature_names")
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or \
                    len(fields["input_shape"]) != 1 or len(names) != fields["input_shape"][0]:
                raise ValueError("its feature names do not fit its input")
            fields["feature_names"] = tuple(names)
        if description.get("inputs") is not None:
            from .inputs import InputLayout

            fields["input_layout"] = InputLayout.from_json(description["inputs"])
            if fields["input_layout"].sample_shape != fields["input_shape"]:
                raise ValueError("its inputs do not add up to its sample shape")
    except (KeyError, TypeError, ValueError, AnalyzerError) as exc:
        raise WorkerError(f"the worker described the model in an unexpected form ({first_line(exc)})") from exc
    from ..engines.inference import OUTPUT_KINDS
    from ..evaluation.tasks import VALUE_OUTPUT

    if fields["output_kind"] not in (*OUTPUT_KINDS, VALUE_OUTPUT):
        raise WorkerError("the worker reported an unknown output kind")
    if len(fields["class_names"]) != fields["num_classes"] or not 1 <= fields["num_classes"] <= 1_000_000:
        raise WorkerError("the worker reported class names that do not match the number of classes")
    return fields


def runs_in_worker(function=None, *, scratch_kwargs: tuple = ()):
    """Mark an analysis that takes a model first: with a `SandboxedModel` it runs in that model's worker.

    `scratch_kwargs` name path arguments that are the parent's (a cache directory): in the worker they point into
    its scratch directory instead."""
    def decorate(fn):
        key = f"{fn.__module__}:{fn.__qualname__}"
        REGISTRY[key] = fn
        fn.__worker_scratch_kwargs__ = tuple(scratch_kwargs)

        @functools.wraps(fn)
        def wrapper(model, *args, **kwargs):
            if isinstance(model, SandboxedModel):
                for name in scratch_kwargs:
                    if kwargs.get(name) is not None:
                        kwargs[name] = None  # the worker substitutes its own scratch path
                # callbacks stay here: the worker reports progress in frames, passed on as (fraction, 1.0)
                on_batch = kwargs.pop("on_batch", None)
                kwargs.pop("progress", None)
                return model.call(key, *args, **kwargs, on_progress=(
                    (lambda stage, fraction: on_batch(fraction, 1.0)) if on_batch else None))
            return fn(model, *args, **kwargs)

        return wrapper

    return decorate(function) if function is not None else decorate


def registered(key: str):
    """The function a worker may run under `key`, importing its module (only analyzers' own) first."""
    module_name, _, _ = key.partition(":")
    if not module_name.startswith("analyzers.") or key.count(":") != 1:
        raise AnalyzerError(f"{key!r} is not an analysis the worker runs")
    importlib.import_module(module_name)
    if key not in REGISTRY:
        raise AnalyzerError(f"{key!r} is not an analysis the worker runs")
    return REGISTRY[key]


# --- what a worker leaves behind -----------------------------------------------------------------------------------

def copy_worker_output(source: Path, target: Path, *, max_bytes: int = 64 << 30) -> None:
    """Copy the tree a worker wrote into `target`, refusing anything but plain directories and regular files.

    A worker could leave a symlink to a server file (which the dashboard would then read or write through), a FIFO
    (which would block a reader for ever) or a hard link: each is refused, and nothing is followed."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        rel = Path(dirpath).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = os.lstat(path)
            if not name or name.startswith("..") or "/" in name:
                raise WorkerError(f"the worker wrote a file with an unsafe name {name[:40]!r}; nothing was stored")
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise WorkerError(f"the worker left {rel / name} that is not a regular file (a link or device); "
                                  f"nothing was stored")
            if info.st_nlink != 1:
                raise WorkerError(f"the worker left a hard link at {rel / name}; nothing was stored")
            total += info.st_size
            if total > max_bytes:
                raise WorkerError(f"the worker wrote more than {max_bytes} bytes; nothing was stored")
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as src, open(target / rel / name, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
