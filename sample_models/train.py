"""Retrain the sample models: `python -m sample_models.train [NAME ...] [--out DIR]` (default: all, into weights/)."""
from __future__ import annotations

import argparse

from . import SAMPLE_NAMES, WEIGHTS_DIR, get_sample


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(SAMPLE_NAMES), choices=list(SAMPLE_NAMES) + [[]])
    parser.add_argument("--out", default=str(WEIGHTS_DIR))
    args = parser.parse_args(argv)
    for name in args.names or SAMPLE_NAMES:
        summary = get_sample(name).module.train(args.out)
        score = (f"test MAE {summary['test_mae']:.4f}" if "test_mae" in summary
                 else f"test accuracy {summary['test_accuracy']:.4f}")
        print(f"{name}: {score}")


if __name__ == "__main__":
    main()
