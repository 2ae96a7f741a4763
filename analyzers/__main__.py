"""Command line: `python -m analyzers run|compare|explain ...`. Bad input exits 1 with one line on stderr."""
from __future__ import annotations

import argparse
import sys

from .errors import AnalyzerError
from .evaluation.tasks import TASK_NAMES


def _shape(text: str) -> tuple:
    try:
        return tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,32,32, got {text!r}") from exc


def _floats(text: str) -> list:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}") from exc


def _names(text: str) -> list:
    return [p.strip() for p in text.split(",") if p.strip()]


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): write an object such as '{{\"num_classes\": 10}}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object: write one such as '{\"num_classes\": 10}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analyzers", description="Analyse where and why a model is wrong.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="analyse a model on a dataset and store the run directory")
    run.add_argument("--model", required=True, help="sample:NAME, PATH.pt2, or a state dict (.safetensors/.pt)")
    run.add_argument("--data", required=True, action="append",
                     help="sample:NAME, .npz, .csv, .parquet, image-folder .zip, NAME.x.npy (beside NAME.y.npy), or a "
                          "directory or glob of such shards; for a run over splits give it once "
                          "per split as NAME=FILE (--data train=train.npz --data test=test.npz)")
    run.add_argument("--split-column", help="a column of the dataset that names each row's split (train, test, "
                                            "...); a column called split is read as one unasked")
    run.add_argument("--out", required=True, help="run directory to write")
    run.add_argument("--arch", help="architecture for a state dict: a sample name or package.module:callable")
    run.add_argument("--arch-kwargs", type=_json_object, metavar="JSON",
                     help="keyword arguments for an import-path --arch, e.g. '{\"num_classes\": 10}' (kept in run.json)")
    run.add_argument("--input-shape", type=_shape,
                     help="shape of one sample, e.g. 3,32,32 (import-path archs; default: the dataset's)")
    run.add_argument("--inputs", metavar="NAME:DTYPE:SHAPE,...",
                     help="an import-path arch's inputs when it takes token ids or several, e.g. "
                          "input_ids:int64:12,attention_mask:int64:12 (a .pt2 records its own)")
    run.add_argument("--class-names", type=_names, help="the model's class names in output order (comma-separated), "
                                                        "to match text labels and class folders by name")
    run.add_argument("--task", choices=TASK_NAMES,
                     help="what the model does (default: read from the labels and the model's output; asked for "
                          "when both fit)")
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--label-column", default="label",
                     help="a table's label column; several comma-separated 0/1 columns (e.g. circle,square) make "
                          "a multi-label dataset, one label per column in the model's output order")
    run.add_argument("--id-column")
    run.add_argument("--features", type=_names, help="comma-separated feature columns, in the model's order")
    run.add_argument("--image-size", type=_shape, help="H,W for image zips")
    run.add_argument("--mean", type=_floats, help="per-channel mean subtracted after scaling pixels to [0, 1]")
    run.add_argument("--std", type=_floats, help="per-channel std divided by after subtracting the mean")
    run.add_argument("--layer", help="layer whose input is stored as the embedding (default: the final classifier)")
    run.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    run.add_argument("--analyses", type=_names, help="comma-separated stages (default: all cheap ones)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--overwrite", action="store_true", help="replace a different run at --out once the new is done")
    run.add_argument("--isolation", default="auto", choices=("auto", "sandbox", "process"),
                     help="where the model runs: auto (files in a sandboxed worker, built-in samples here), sandbox, "
                          "or process (only for model files you trust)")
    run.add_argument("--engine", default="process", choices=("process", "ray"),
                     help="where inference runs: in this process, or in a Ray Data actor pool (pip install -r "
                          "requirements-ray.txt); the dataset may then be a directory or glob of shards")
    run.add_argument("--ray-address", help="the Ray cluster to run on (default: start a local Ray)")
    run.add_argument("--ray-actors", type=int, help="actors in the pool, each holding the model once "
                                                    "(default: one fewer than the cluster's CPUs)")

    compare = sub.add_parser("compare", help="compare two runs on the same dataset")
    compare.add_argument("run_a")
    compare.add_argument("run_b")
    compare.add_argument("--out", help="directory for the comparison tables (default: print a summary only)")

    explain = sub.add_parser("explain", help="attributions and faithfulness scores for chosen samples of a run")
    explain.add_argument("run_dir")
    explain.add_argument("--ids", required=True, type=_names, help="comma-separated sample ids")
    explain.add_argument("--method", default="saliency", type=_names, help="comma-separated methods")
    explain.add_argument("--target", default="pred", help="pred, label, or a class index")
    explain.add_argument("--layer", help="Grad-CAM layer")
    explain.add_argument("--batch-size", type=int, default=64)
    explain.add_argument("--engine", default="process", choices=("process", "ray"),
                         help="where the maps and scores are computed: in this process, or in a Ray Data actor pool")
    explain.add_argument("--ray-address", help="the Ray cluster to run on (default: start a local Ray)")
    explain.add_argument("--ray-actors", type=int, help="actors in the pool, each holding the model once "
                                                        "(default: one fewer than the cluster's CPUs)")

    report = sub.add_parser("report", help="write a run's findings as one self-contained HTML file")
    report.add_argument("run_dir")
    report.add_argument("--out", required=True, help="the HTML file to write, e.g. report.html")
    report.add_argument("--compare", metavar="RUN_B", help="a second run on the same dataset: adds the deltas")
    report.add_argument("--max-thumbnails", type=int, default=200, help="sample images in the report (default 200)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "compare":
            from .evaluation.comparison import compare_command

            return compare_command(args)
        if args.command == "report":
            from dashboard.report import report_command  # the dashboard's figure builders, without Streamlit

            return report_command(args)
        if args.command == "explain":
            from .explanations.explain_run import explain_command

            return explain_command(args)
    except AnalyzerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the run directory", file=sys.stderr)
        return 130
    return 2


def _run(args) -> int:
    from .engines.pipeline import run_analysis
    from .loading.runs import open_run

    from .loading.splits import parse_data_args

    out = run_analysis(args.model, parse_data_args(args.data), args.out, arch=args.arch, batch_size=args.batch_size,
                       label_column=args.label_column, id_column=args.id_column, features=args.features,
                       layer=args.layer, device=args.device, overwrite=args.overwrite, image_size=args.image_size,
                       mean=args.mean, std=args.std, input_shape=args.input_shape, seed=args.seed,
                       analyses=args.analyses, allow_import=True, progress=sys.stderr.isatty(),
                       isolation=args.isolation, arch_kwargs=args.arch_kwargs, class_names=args.class_names,
                       inputs=args.inputs, task=args.task, split_column=args.split_column, engine=args.engine,
                       ray_address=args.ray_address, ray_actors=args.ray_actors)
    run = open_run(out)
    headline = run.info.get("analyses", {}).get("evaluation", {})
    if run.info["accuracy"] is not None:
        score = f"accuracy {run.info['accuracy']:.4f}"
    else:  # a regression: its error, from the evaluation summary (tasks.Task.headline)
        score = ", ".join(f"{k.upper()} {headline[k]:.4g}" for k in ("mae", "rmse", "r2")
                          if isinstance(headline.get(k), (int, float))) or "no accuracy"
    print(f"{run.info['num_samples']} samples ({run.task}), {score}, run stored at {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
