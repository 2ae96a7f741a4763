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
        print(f"{name}: test accuracy {summary['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
