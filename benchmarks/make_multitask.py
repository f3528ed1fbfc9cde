"""Build the multi-task and many-customer data sets of ``bench_multi_train.py --part quality`` (real text).

Two data sets, each a training and a test CSV with ``text``, ``label`` and an adapter column:

* ``multitask_{train,test}.csv`` (column ``task``), five tasks with 2, 3 and 20 classes:
    - ``movie``, ``amazon``, ``nyt``: the bundled sentiment sets (``src/lntune/data``; positive/negative),
      400 training and 200 test snippets each;
    - ``source``: which of the three bundled sets a snippet comes from (3 classes), 400 / 201 snippets not
      used by the three tasks above;
    - ``debian``: the Debian archive section of a package from its description (the 20 largest sections of
      ``apt-cache dumpavail``: ``libs``, ``python``, ``doc``...), 30 training and 15 test packages per section.
      The text is the short description and the start of the long one (at most 40 words), never the name.
* ``customers_{train,test}.csv`` (column ``customer``): the bundled movie reviews split among 12
  "customers" with very different amounts of data: 40, 80, 160 or 320 training snippets (in turn) and 40
  test snippets each (many small adapters of one kind).

Deterministic for a given machine: rows are drawn with ``random.Random(seed)`` from the bundled files and
from this machine's package lists (``apt-cache dumpavail``; another machine's lists give another ``debian``
task; the script prints how many packages it read). Nothing is downloaded. The files are small (about
300 KB) and written where you say, not into the repository.

Usage:
    python benchmarks/make_multitask.py /tmp/multitask [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import random
import subprocess
from collections import Counter
from importlib import resources
from pathlib import Path

SENTIMENT = {"movie": "movie_reviews", "amazon": "amazon_reviews", "nyt": "nyt_editorials"}
PER_TASK = (400, 200)  # training and test rows of each sentiment task
SOURCE = (400, 201)  # of the "source" task (a multiple of 3 for the test set)
SECTIONS = 20
PER_SECTION = (30, 15)
CUSTOMERS = 12
CUSTOMER_TRAIN = (40, 80, 160, 320)  # training rows of customer i: CUSTOMER_TRAIN[i % 4]
CUSTOMER_TEST = 40
WORDS = 40


def _bundled(name: str) -> list[dict[str, str]]:
    with (resources.files("lntune") / "data" / name).open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def debian_packages() -> list[tuple[str, str]]:
    """``(section, text)`` of every package of ``apt-cache dumpavail`` (first entry per package, texts unique)."""
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    seen_packages, seen_texts, out = set(), set(), []
    for block in dump.split("\n\n"):
        fields: dict[str, str] = {}
        description: list[str] = []
        for line in block.splitlines():
            if line.startswith(" ") and "Description" in fields:
                if line.strip() != ".":
                    description.append(line.strip())
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        name, section, short = fields.get("Package"), fields.get("Section"), fields.get("Description")
        if not (name and section and short) or name in seen_packages:
            continue
        seen_packages.add(name)
        text = " ".join(f"{short}. {' '.join(description)}".split()[:WORDS])
        if text not in seen_texts:
            seen_texts.add(text)
            out.append((section.rsplit("/", 1)[-1], text))
    return out


def multitask(seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train, test = [], []
    rest = {}
    for task, name in SENTIMENT.items():
        rows = {split: _bundled(f"{name}_{split}.csv") for split in ("train", "test")}
        for split, n, out in (("train", PER_TASK[0], train), ("test", PER_TASK[1], test)):
            rng.shuffle(rows[split])
            out += [{"text": r["text"], "label": r["label"], "task": task} for r in rows[split][:n]]
            rest[task, split] = rows[split][n:]  # the "source" task draws from what is left
    for split, n, out in (("train", SOURCE[0], train), ("test", SOURCE[1], test)):
        for i, task in enumerate(SENTIMENT):
            count = n // 3 + (1 if i < n % 3 else 0)
            out += [{"text": r["text"], "label": task, "task": "source"} for r in rest[task, split][:count]]
    packages = debian_packages()
    print(f"apt-cache dumpavail: {len(packages)} packages with a section and a description")
    largest = [section for section, _ in Counter(s for s, _ in packages).most_common(SECTIONS)]
    for section in largest:
        texts = [t for s, t in packages if s == section]
        rng.shuffle(texts)
        n_train, n_test = PER_SECTION
        train += [{"text": t, "label": section, "task": "debian"} for t in texts[:n_train]]
        test += [{"text": t, "label": section, "task": "debian"} for t in texts[n_train : n_train + n_test]]
    return train, test


def customers(seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed + 1)
    out = []
    for split in ("train", "test"):
        rows = _bundled(f"movie_reviews_{split}.csv")
        rng.shuffle(rows)
        chosen, start = [], 0
        for i in range(CUSTOMERS):
            n = CUSTOMER_TRAIN[i % len(CUSTOMER_TRAIN)] if split == "train" else CUSTOMER_TEST
            chosen += [
                {"text": r["text"], "label": r["label"], "customer": f"customer-{i:02d}"}
                for r in rows[start : start + n]
            ]
            start += n
        out.append(chosen)
    return out[0], out[1]


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def build(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write the four files into ``folder`` and return their paths by name (``multitask_train``...)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (train, test) in (("multitask", multitask(seed)), ("customers", customers(seed))):
        for split, rows in (("train", train), ("test", test)):
            paths[f"{name}_{split}"] = folder / f"{name}_{split}.csv"
            write(paths[f"{name}_{split}"], rows)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, path in build(args.folder, args.seed).items():
        with path.open(encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        column = "task" if name.startswith("multitask") else "customer"
        groups = Counter(r[column] for r in rows)
        classes = {g: len({r["label"] for r in rows if r[column] == g}) for g in groups}
        print(f"{path}: {len(rows)} rows; " + ", ".join(f"{g} {groups[g]} ({classes[g]} classes)" for g in groups))


if __name__ == "__main__":
    main()
