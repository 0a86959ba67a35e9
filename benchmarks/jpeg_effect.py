"""Does the JPEG copy of CIFAR-10 cost test accuracy? A trained model on the same 1,000 test
images, once as JPEG (the CIFAR-10 copy the app finds) and once with exact pixels.

    python benchmarks/jpeg_effect.py outputs/<run> [more run dirs] [--exact <subset.npz>]

The exact images default to `cifar10-exact-subset/subset.npz` in or beside the data folder
named by SPLIT_LEARNING_DATA_DIR (the folder holding `cifar10/`, or `cifar10/` itself).
Each run directory's config.json gives the model; its model.pt gives the weights. The printed
MAE should be about 5.8/255, the README's figure for the whole copy. `python -m
experiments.report` puts the same exact-pixel accuracy in its grid table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.exact_pixels import EXACT_NAME, ExactTest, accuracy, default_exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--exact", type=Path, default=default_exact())
    parser.add_argument("--data-dir", default="", help="CIFAR-10 folder ('' = the app's search)")
    args = parser.parse_args()
    if args.exact is None:
        parser.error(f"pass --exact, or set SPLIT_LEARNING_DATA_DIR to a folder with {EXACT_NAME}")
    test = ExactTest.load(args.exact, args.data_dir)
    print(f"{len(test.labels)} test images, JPEG vs exact pixels: MAE {test.mae:.2f}/255")
    for run in args.runs:
        jpeg, pixels = accuracy(run, test.jpeg, test.labels), accuracy(run, test.exact, test.labels)
        print(f"{str(run):50} JPEG {100 * jpeg:5.1f} %   exact {100 * pixels:5.1f} %")


if __name__ == "__main__":
    main()
