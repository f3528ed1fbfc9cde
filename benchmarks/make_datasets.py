"""Rebuild the bundled sentiment datasets in src/lntune/data/ from the VADER ICWSM-2014 files.

The files come from the ``vaderSentiment`` 3.3.2 source distribution on PyPI (MIT license):
``additional_resources/hutto_ICWSM_2014.tar.gz``. Each line is ``id<TAB>mean human rating<TAB>text``,
the rating being the mean of 20 raters on a -4..+4 scale. A snippet is ``positive`` when the mean
is above +0.5, ``negative`` below -0.5, and left out otherwise (too ambiguous to label).

Usage:
    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
    tar xzf /tmp/vader/vaderSentiment-3.3.2.tar.gz -C /tmp/vader
    tar xzf /tmp/vader/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz -C /tmp/vader
    python benchmarks/make_datasets.py /tmp/vader/hutto_ICWSM_2014
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "lntune" / "data"
# name -> (source file, examples per class in train, examples per class in test)
SPLITS = {
    "movie_reviews": ("movieReviewSnippets_GroundTruth.txt", 1000, 250),
    "amazon_reviews": ("amazonReviewSnippets_GroundTruth.txt", 500, 250),
    "nyt_editorials": ("nytEditorialSnippets_GroundTruth.txt", 500, 250),
}


def read_snippets(path: Path) -> dict[str, list[str]]:
    """Texts by label (``negative``/``positive``); ambiguous and duplicate snippets are dropped."""
    by_label: dict[str, list[str]] = {"negative": [], "positive": []}
    seen: set[str] = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        _, rating, text = line.split("\t", 2)
        text = " ".join(text.split())
        value = float(rating)
        if abs(value) <= 0.5 or not text or text in seen:
            continue
        seen.add(text)
        by_label["positive" if value > 0 else "negative"].append(text)
    return by_label


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the extracted hutto_ICWSM_2014 folder")
    args = parser.parse_args()
    for name, (filename, n_train, n_test) in SPLITS.items():
        by_label = read_snippets(args.source / filename)
        rng = random.Random(0)
        train: list[tuple[str, str]] = []
        test: list[tuple[str, str]] = []
        for label, texts in sorted(by_label.items()):
            rng.shuffle(texts)
            train += [(t, label) for t in texts[:n_train]]
            test += [(t, label) for t in texts[n_train : n_train + n_test]]
        rng.shuffle(train)
        rng.shuffle(test)
        write_csv(OUT / f"{name}_train.csv", train)
        write_csv(OUT / f"{name}_test.csv", test)
        print(f"{name}: {len(train)} train, {len(test)} test")


if __name__ == "__main__":
    main()
