"""t-SNE and UMAP in a long-lived helper process, so that a person can watch them and cancel them.

umap-learn compiles its kernels with numba the first time a process uses it: about a minute on 2 cores, and most of
it again in every new process even with numba's disk cache (a fresh process took 52 s to fit 450 points, a warm
one 1 s). One helper process is therefore kept per dashboard process and warmed once (`Projector.warm`); a
projection is a request to it, and cancelling one ends that process, whose successor starts (and warms) on the
next request. The helper runs only this project's code on a run's stored activations, never a model; it writes
the projection into the run itself (atomically) and answers in JSON lines: no pickle crosses back.

Protocol, one JSON object a line: requests `{"warm": true}` or `{"run": PATH, "layer": NAME, "method": M}`; replies
`{"progress": F, "stage": TEXT}` any number of times, then `{"done": true}` or `{"error": ONE LINE}`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

WARM_POINTS = 120  # a tiny projection of each method compiles what every later one needs


@dataclass
class ProjectionJob:
    """One projection asked of the helper: how far it is, and how it ended. Read from any thread."""
    run: str
    layer: str
    method: str
    started: float = field(default_factory=time.monotonic)
    fraction: float = 0.0
    stage: str = "waiting for the projection helper"
    state: str = "running"  # running, done, failed, cancelled
    error: str | None = None
    _projector: "Projector | None" = field(default=None, repr=False)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def remaining_s(self) -> float | None:
        """Seconds left at the pace so far; None until a tenth of the work has reported (an estimate from less
        is mostly the start-up)."""
        if self.state != "running" or self.fraction < 0.1:
            return None
        return self.elapsed_s * (1 - self.fraction) / self.fraction

    def cancel(self) -> None:
        if self.state == "running" and self._projector is not None:
            self._projector.cancel(self)


class Projector:
    """The helper process and the one job it runs at a time (a second waits for the first)."""

    def __init__(self, *, log_path: str | Path | None = None):
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one request at a time: the helper is single-threaded
        self._log_path = log_path
        self.current: ProjectionJob | None = None

    def _ensure_process(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            log = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL
            root = str(Path(__file__).resolve().parents[2])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            self._process = subprocess.Popen([sys.executable, "-m", "analyzers.engines.projector"], cwd=root,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
        return self._process

    def _exchange(self, request: dict, job: ProjectionJob | None) -> None:
        process = self._ensure_process()
        process.stdin.write((json.dumps(request) + "\n").encode())
        process.stdin.flush()
        for line in process.stdout:
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # not a reply: the helper writes nothing else to this pipe, but a partial line may end it
            if "progress" in reply and job is not None:
                job.fraction, job.stage = float(reply["progress"]), str(reply.get("stage", ""))[:200]
            elif "done" in reply:
                if job is not None:
                    job.fraction, job.stage, job.state = 1.0, "done", "done"
                return
            elif "error" in reply:
                if job is not None:
                    job.state, job.error = "failed", str(reply["error"])[:300]
                return
        # the pipe closed: the helper ended (cancelled, or it died)
        if job is not None and job.state == "running":
            job.state, job.error = "failed", f"the projection helper ended (exit code {process.wait()})"

    def warm(self) -> threading.Thread:
        """Start the helper and compile umap-learn's kernels in it, in the background."""
        thread = threading.Thread(target=self._run, args=({"warm": True}, None), daemon=True, name="projector warm-up")
        thread.start()
        return thread

    def submit(self, run, layer: str, method: str) -> ProjectionJob:
        """Project `layer` of the run at `run` with `method`, in the background; the job reports its progress."""
        job = ProjectionJob(run=str(run), layer=layer, method=method, _projector=self)
        threading.Thread(target=self._run, args=({"run": str(run), "layer": layer, "method": method}, job),
                         daemon=True, name=f"projection {method} {layer}").start()
        return job

    def _run(self, request: dict, job: ProjectionJob | None) -> None:
        with self._lock:
            if job is not None and job.state != "running":
                return  # cancelled while it waited
            self.current = job
            try:
                self._exchange(request, job)
            except OSError as exc:  # the helper could not be started or was gone before it took the request
                if job is not None and job.state == "running":
                    job.state, job.error = "failed", f"the projection helper could not run: {exc}"
            finally:
                self.current = None

    def cancel(self, job: ProjectionJob) -> None:
        """Stop `job`: at once if it waits, by ending the helper if it runs (its successor starts on the next
        request; nothing half-written is left in the run, every file being written atomically)."""
        running = self.current is job
        job.state, job.stage = "cancelled", "cancelled"
        if running and self._process is not None:
            self._process.kill()

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


# --- the helper process ----------------------------------------------------------------------------------------------

def _serve() -> int:
    # The lowest CPU priority: on two cores, the warm-up's minute of compiling (and a long projection) would
    # otherwise halve the speed of the explanations a person is clicking through; idle cores it still gets whole.
    os.nice(19)
    import numpy as np

    from ..errors import AnalyzerError
    from ..explanations.projections import ensure_projection, project

    # replies go to the original stdout; anything a library prints goes to stderr (the log), not into the protocol
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(**message) -> None:
        replies.write(json.dumps(message) + "\n")

    def progress(fraction: float, stage: str) -> None:
        reply(progress=round(float(fraction), 4), stage=stage)

    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request.get("warm"):
                points = np.random.default_rng(0).normal(size=(WARM_POINTS, 8)).astype(np.float32)
                for method in ("umap", "tsne"):
                    project(points, method=method)
            else:
                ensure_projection(request["run"], str(request["layer"]), str(request["method"]), 2, progress=progress)
            reply(done=True)
        except (AnalyzerError, OSError, KeyError, ValueError) as exc:
            reply(error=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
