"""The inference profile: how fast the model runs, where its time goes, and how large it is.

`inference_profile(model, x, *, batch_sizes=(1, 8, 32, 128), repeats=20, warmup=3, device="cpu",
profile_batch_size=None, profile_repeats=5) -> InferenceProfile`:

- Latency and throughput against batch size. For each batch size b, a batch of the first b rows of `x` (rows
  repeated in order when `x` holds fewer) is made once, as a float32 tensor on `device` (as every analysis feeds
  the model), and run `warmup` times untimed, then `repeats` times, each forward alone between two
  `time.perf_counter()` calls (after `torch.cuda.synchronize()` on a GPU, so the time is the work's and not the
  launch's). Reported: the median (p50) and the 95th percentile (p95, numpy's linear interpolation) of the
  per-batch latency, and the throughput b / p50 in samples per second. Nothing else (the copy of the batch, the
  profiler) is inside the timed span.
- Time and memory per layer: one more run of `profile_repeats` forwards at `profile_batch_size` (the largest batch
  size by default) under `torch.profiler.profile(activities=[ProfilerActivity.CPU] (+ CUDA on a GPU),
  profile_memory=True, record_shapes=False)`. The profiler's own module hierarchy (`with_modules`) covers only
  TorchScript, so each submodule's call is made a range of its own: a forward pre-hook enters a
  `torch.profiler.record_function("layer::<name>")` and the forward hook leaves it, a stack that nests as the calls
  do; the hooks are put on by a context manager that removes them, and closes any range a failing forward left
  open, on the way out (`guard.analysis_mode` then also checks no hook was left). A layer's `time` is its ranges'
  total CPU time (`cpu_time_total`: inclusive, so a container holds its children's time) per forward, its `share`
  that time over the forward's (a range around the whole call), and its `memory_bytes` the net bytes the profiler
  saw allocated inside its ranges per forward (allocations less frees: what the layer leaves behind, its
  activation, since the temporaries it frees cancel out), beside `output_bytes`, the bytes of the tensors the layer
  returned as the forward hook saw them. A layer that ran several times per forward (a shared block) adds up;
  `calls` says how many times. A layer that never ran has 0 everywhere. The profiler's hooks cost time of their own
  (measured below), so the shares are the thing to read there and the latencies above are the timings.
- Size: `param_bytes` and `buffer_bytes` (each tensor's numel × element size, a tensor shared by two modules counted
  once, as `module.parameters()` does), `model_bytes` their sum, `num_params`, and each layer's own parameters
  (`params`: `module.parameters(recurse=False)`, so a container's are its own, not its children's).

The model is handed back as it was: analysed in eval mode under its lock (`guard.analysis_mode`), without gradients
(`torch.inference_mode`), moved to `device` and back (`engines.inference.on_device`).

Measured on the shipped samples (CPU, one thread, shared cores): the median latency agrees with a plain
perf_counter timing of `module(batch)` to within 1-3 % (digits, batch 32, 60 repeats, four tries). At batch 128 the
profiled forward took 5.38 ms against a p50 of 5.47 ms on digits (38,282 parameters, 153,128 bytes), 29.0 against
25.8 ms on shapes (+12 %), and 0.34 against 0.07 ms on tabular (the hooks and ranges of 7 layers cost about 0.04 ms
each, more than its layers): read a small model's shares as where its time goes under the profiler. The memory the
profiler sees in a layer equals the bytes of its output for every convolution, ReLU, pooling and linear layer of
digits and shapes; a view (Flatten, an eval-mode Dropout) allocates 0. The first profile in a process pays about
2 s for the profiler's start.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

from ..errors import AnalyzerError, InvalidOption, whole_number
from ..loading.sandbox import runs_in_worker

RANGE_PREFIX = "layer::"  # the profiler range of a submodule's call
FORWARD_RANGE = "profile::forward"  # the range around one whole forward
PERCENTILES = (50, 95)


@dataclass(frozen=True)
class InferenceProfile:
    """Latency and throughput per batch size, time and memory per layer, and the model's size; see the module's
    docstring. Times are seconds, sizes bytes."""

    device: str
    batch_sizes: np.ndarray  # (B,) int64, ascending
    latency_p50: np.ndarray  # (B,) seconds per batch, the median over `repeats`
    latency_p95: np.ndarray  # (B,)
    latency_mean: np.ndarray  # (B,)
    throughput: np.ndarray  # (B,) samples per second: batch size / latency_p50
    repeats: int
    warmup: int
    profile_batch_size: int
    profile_repeats: int
    profiled_time: float  # seconds per forward at profile_batch_size, under the profiler (its hooks included)
    layers: tuple  # submodule names, in named_modules() order
    kinds: tuple  # each one's class name
    leaf: np.ndarray  # (L,) bool: it has no submodules
    params: np.ndarray  # (L,) int64: its own parameters (recurse=False)
    calls: np.ndarray  # (L,) int64 calls per forward
    time: np.ndarray  # (L,) seconds per forward, inclusive of its submodules
    share: np.ndarray  # (L,) time / profiled_time
    memory_bytes: np.ndarray  # (L,) int64 net bytes allocated in its calls per forward (the profiler's)
    output_bytes: np.ndarray  # (L,) int64 bytes of what it returned per forward
    num_params: int
    param_bytes: int
    buffer_bytes: int
    model_bytes: int

    def __post_init__(self):
        # what a sandboxed worker sends is checked before a page draws it
        object.__setattr__(self, "batch_sizes", np.asarray(self.batch_sizes, dtype=np.int64))
        for name in ("latency_p50", "latency_p95", "latency_mean", "throughput", "time", "share"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        for name in ("params", "calls", "memory_bytes", "output_bytes"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        object.__setattr__(self, "leaf", np.asarray(self.leaf, dtype=bool))
        object.__setattr__(self, "layers", tuple(str(n) for n in self.layers))
        object.__setattr__(self, "kinds", tuple(str(k) for k in self.kinds))
        b, count = self.batch_sizes.shape, len(self.layers)
        if (self.batch_sizes.ndim != 1 or not len(self.batch_sizes) or np.any(self.batch_sizes < 1)
                or any(getattr(self, n).shape != b for n in ("latency_p50", "latency_p95", "latency_mean",
                                                             "throughput"))
                or len(self.kinds) != count
                or any(getattr(self, n).shape != (count,) for n in ("leaf", "params", "calls", "time", "share",
                                                                    "memory_bytes", "output_bytes"))
                or int(self.model_bytes) != int(self.param_bytes) + int(self.buffer_bytes)
                or not np.all(np.isfinite(self.latency_p50)) or np.any(self.latency_p50 < 0)):
            raise AnalyzerError("the inference profile came back malformed (arrays that do not match the batch "
                                "sizes or layers): run the profile again")

    def table(self):
        """One row per batch size: latency p50 and p95 (ms) and throughput (samples/s)."""
        import pandas as pd

        return pd.DataFrame({"batch_size": self.batch_sizes, "latency_p50_ms": self.latency_p50 * 1e3,
                             "latency_p95_ms": self.latency_p95 * 1e3, "throughput": self.throughput})

    def layer_table(self):
        """One row per layer: kind, own parameters, calls, time (ms) and share, memory and output bytes."""
        import pandas as pd

        return pd.DataFrame({"layer": list(self.layers), "kind": list(self.kinds), "leaf": self.leaf,
                             "params": self.params, "calls": self.calls, "time_ms": self.time * 1e3,
                             "share": self.share, "memory_bytes": self.memory_bytes,
                             "output_bytes": self.output_bytes})


def _tensor_bytes(value) -> int:
    """Bytes of the tensors in a layer's output (a tensor, or a tuple, list or dict of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


@contextlib.contextmanager
def layer_ranges(module, names):
    """Each submodule of `module` named in `names` gets a profiler range per call (`RANGE_PREFIX` + name: a forward
    pre-hook enters a `record_function`, the forward hook leaves it) and counts its calls and output bytes: yields
    {name: [calls, output bytes]}. Every hook is removed, and every range still open (a forward that raised) is
    closed, on the way out."""
    from torch.profiler import record_function

    modules = dict(module.named_modules())
    counts = {name: [0, 0] for name in names}
    open_ranges: list = []
    handles = []

    def enter(name):
        def hook(_module, _args):
            scope = record_function(RANGE_PREFIX + name)
            scope.__enter__()
            open_ranges.append(scope)
        return hook

    def leave(name):
        def hook(_module, _args, output):
            open_ranges.pop().__exit__(None, None, None)
            counts[name][0] += 1
            counts[name][1] += _tensor_bytes(output)
        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(enter(name)))
            handles.append(modules[name].register_forward_hook(leave(name)))
        yield counts
    finally:
        for handle in handles:
            handle.remove()
        while open_ranges:
            open_ranges.pop().__exit__(None, None, None)


def _batch(x, size: int):
    rows = np.arange(size) % len(x)  # the first `size` rows, repeated in order when there are fewer
    return np.array(x[:size] if size <= len(x) else np.asarray(x)[rows], dtype=np.float32)


@runs_in_worker
def inference_profile(model, x, *, batch_sizes=(1, 8, 32, 128), repeats: int = 20, warmup: int = 3,
                      device: str = "cpu", profile_batch_size: int | None = None,
                      profile_repeats: int = 5) -> InferenceProfile:
    """Latency (p50, p95) and throughput per batch size, time and memory per layer, and the model's size; see the
    module's docstring for every choice."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ..engines.inference import on_device
    from ..guard import analysis_mode, unwrap

    try:
        sizes = sorted({whole_number(b, "batch_sizes", 1, "use sizes such as 1, 8, 32, 128") for b in batch_sizes})
    except TypeError:
        raise InvalidOption(f"batch_sizes must be a list of whole numbers (such as 1, 8, 32, 128), got "
                            f"{batch_sizes!r}") from None
    if not sizes:
        raise InvalidOption("batch_sizes is empty: give at least one batch size (such as 1, 8, 32, 128)")
    repeats = whole_number(repeats, "repeats", 1, "use 20 or more for a stable median")
    warmup = whole_number(warmup, "warmup", 0, "use 3, or 0 for none")
    profile_repeats = whole_number(profile_repeats, "profile_repeats", 1, "use 5")
    profile_size = sizes[-1] if profile_batch_size is None else whole_number(profile_batch_size, "profile_batch_size", 1,
                                                                       "use one of the batch sizes")
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise InvalidOption(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if np.ndim(x) < 2 or len(x) == 0:
        raise InvalidOption(f"the inputs must be a batch of samples (N, ...), got shape {np.shape(x)}: pass the "
                            f"dataset's inputs")

    module = unwrap(model)
    gpu = device.startswith("cuda")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    names = [name for name, _ in module.named_modules() if name]
    modules = dict(module.named_modules())
    p50, p95, mean = [], [], []

    def forward(batch):
        try:
            return module(batch)
        except Exception as exc:  # one line naming the batch, as forward_batches does
            from ..errors import first_line

            raise AnalyzerError(f"the model's forward failed on a batch of {len(batch)} ({first_line(exc)}): check "
                                f"the inputs match what it expects") from exc

    with analysis_mode(module), torch.inference_mode(), on_device(module, device):
        for size in sizes:
            batch = torch.from_numpy(_batch(x, size)).to(device)
            for _ in range(warmup):
                forward(batch)
            sync()
            spans = np.empty(repeats)
            for r in range(repeats):
                start = time.perf_counter()
                forward(batch)
                sync()
                spans[r] = time.perf_counter() - start
            low, high = np.percentile(spans, PERCENTILES)
            p50.append(low)
            p95.append(high)
            mean.append(spans.mean())

        batch = torch.from_numpy(_batch(x, profile_size)).to(device)
        forward(batch)  # the profiler's first forward is not a warm-up's
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with layer_ranges(module, names) as counts:
            with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
                for _ in range(profile_repeats):
                    with record_function(FORWARD_RANGE):
                        forward(batch)
                    sync()

    layer_time = dict.fromkeys(names, 0.0)
    layer_memory = dict.fromkeys(names, 0)
    whole = 0.0
    for event in prof.events():
        if event.name == FORWARD_RANGE:
            whole += event.cpu_time_total
        elif event.name.startswith(RANGE_PREFIX) and event.name[len(RANGE_PREFIX):] in layer_time:
            key = event.name[len(RANGE_PREFIX):]
            layer_time[key] += event.cpu_time_total
            layer_memory[key] += event.cpu_memory_usage + (event.device_memory_usage if gpu else 0)
    per_forward = whole / profile_repeats * 1e-6  # the profiler's times are microseconds
    times = np.array([layer_time[n] for n in names]) / profile_repeats * 1e-6
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    return InferenceProfile(
        device=device, batch_sizes=np.asarray(sizes), latency_p50=np.asarray(p50), latency_p95=np.asarray(p95),
        latency_mean=np.asarray(mean), throughput=np.asarray(sizes) / np.maximum(np.asarray(p50), 1e-12),
        repeats=repeats, warmup=warmup, profile_batch_size=profile_size, profile_repeats=profile_repeats,
        profiled_time=per_forward, layers=tuple(names), kinds=tuple(type(modules[n]).__name__ for n in names),
        leaf=np.array([next(modules[n].children(), None) is None for n in names], dtype=bool),
        params=np.array([sum(p.numel() for p in modules[n].parameters(recurse=False)) for n in names],
                        dtype=np.int64),
        calls=np.array([counts[n][0] // profile_repeats for n in names], dtype=np.int64),
        time=times, share=times / per_forward if per_forward > 0 else np.zeros(len(names)),
        memory_bytes=np.array([layer_memory[n] // profile_repeats for n in names], dtype=np.int64),
        output_bytes=np.array([counts[n][1] // profile_repeats for n in names], dtype=np.int64),
        num_params=sum(p.numel() for p in module.parameters()), param_bytes=param_bytes, buffer_bytes=buffer_bytes,
        model_bytes=param_bytes + buffer_bytes)
