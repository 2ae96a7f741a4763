"""Where the dashboard finds runs and stores uploads: the arguments after `--`, else environment variables."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUNS_DIR = "runs"
DEFAULT_MAX_UPLOAD_BYTES = 2 << 30


@dataclass(frozen=True)
class Settings:
    runs_dir: Path
    run: Path | None  # the run opened when a session starts without one in its URL
    workspace: Path  # uploads are stored here (analyzers.loading.workspace)
    max_upload_bytes: int


def parse_settings(argv: list[str], environ: dict | None = None) -> Settings:
    """`--runs-dir DIR --run RUN --workspace DIR --max-upload-mb N` from `argv` (unknown arguments are ignored, so the
    arguments of a test runner do no harm); DASHBOARD_RUNS_DIR, DASHBOARD_RUN, DASHBOARD_WORKSPACE and
    DASHBOARD_MAX_UPLOAD_MB fill what argv does not say. N bounds the whole upload workspace."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runs-dir", default=environ.get("DASHBOARD_RUNS_DIR", DEFAULT_RUNS_DIR))
    parser.add_argument("--run", default=environ.get("DASHBOARD_RUN"))
    parser.add_argument("--workspace", default=environ.get("DASHBOARD_WORKSPACE"))
    parser.add_argument("--max-upload-mb", type=int, default=environ.get("DASHBOARD_MAX_UPLOAD_MB"))
    args, _ = parser.parse_known_args(argv)
    runs_dir = Path(args.runs_dir)
    workspace = Path(args.workspace) if args.workspace else runs_dir.resolve().parent / "workspace"
    max_bytes = args.max_upload_mb * (1 << 20) if args.max_upload_mb else DEFAULT_MAX_UPLOAD_BYTES
    return Settings(runs_dir=runs_dir, run=Path(args.run) if args.run else None, workspace=workspace,
                    max_upload_bytes=max_bytes)
