"""Where the dashboard finds runs and stores uploads: the arguments after `--`, else environment variables."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUNS_DIR = "runs"
DEFAULT_MAX_UPLOAD_BYTES = 2 << 30
# With sign-in on (dashboard.access): "owner" shows each person their own runs and the operator's; "signed-in"
# shows every run to everyone signed in. Changing a run is for its owner under both.
VIEW_POLICIES = ("owner", "signed-in")


@dataclass(frozen=True)
class Settings:
    runs_dir: Path
    run: Path | None  # the run opened when a session starts without one in its URL
    workspace: Path  # uploads are stored here (analyzers.loading.workspace)
    max_upload_bytes: int
    view_policy: str = "owner"
    warm_up: bool = True  # start the model's worker and the first explanation in the background when a run opens


def parse_settings(argv: list[str], environ: dict | None = None) -> Settings:
    """`--runs-dir DIR --run RUN --workspace DIR --max-upload-mb N --view-policy owner|signed-in` from `argv`
    (unknown arguments are ignored, so the arguments of a test runner do no harm); DASHBOARD_RUNS_DIR,
    DASHBOARD_RUN, DASHBOARD_WORKSPACE, DASHBOARD_MAX_UPLOAD_MB and DASHBOARD_VIEW_POLICY fill what argv does not
    say. N bounds the whole upload workspace. `--no-warm-up` (DASHBOARD_WARM_UP=0) leaves the background warm-up off:
    the test suite's many short sessions would otherwise compete for its two cores."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runs-dir", default=environ.get("DASHBOARD_RUNS_DIR", DEFAULT_RUNS_DIR))
    parser.add_argument("--run", default=environ.get("DASHBOARD_RUN"))
    parser.add_argument("--workspace", default=environ.get("DASHBOARD_WORKSPACE"))
    parser.add_argument("--max-upload-mb", type=int, default=environ.get("DASHBOARD_MAX_UPLOAD_MB"))
    parser.add_argument("--view-policy", default=environ.get("DASHBOARD_VIEW_POLICY") or "owner")
    parser.add_argument("--no-warm-up", action="store_true", default=environ.get("DASHBOARD_WARM_UP") == "0")
    args, _ = parser.parse_known_args(argv)
    runs_dir = Path(args.runs_dir)
    workspace = Path(args.workspace) if args.workspace else runs_dir.resolve().parent / "workspace"
    max_bytes = args.max_upload_mb * (1 << 20) if args.max_upload_mb else DEFAULT_MAX_UPLOAD_BYTES
    if args.view_policy not in VIEW_POLICIES:
        raise ValueError(f"--view-policy must be {' or '.join(VIEW_POLICIES)}, got {args.view_policy!r}")
    return Settings(runs_dir=runs_dir, run=Path(args.run) if args.run else None, workspace=workspace,
                    max_upload_bytes=max_bytes, view_policy=args.view_policy,
                    warm_up=not args.no_warm_up)
