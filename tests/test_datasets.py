"""Processed data, splits and normalisation, checked against the raw files in ../shared/data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from onepass import datasets, distributed, download_and_process_data
from onepass.schema import DatasetConfig

# The original's split sizes: (train+val, test) and (train, validation) at the shipped proportion.
EXPECTED_SIZES = {
    "uci_boston": (455, 51, 364, 91, 0.2),
    "uci_concrete": (927, 103, 742, 185, 0.2),
    "uci_energy": (692, 76, 614, 78, 0.11272),
    "uci_kin8nm": (7373, 819, 5898, 1475, 0.2),
    "uci_naval": (10741, 1193, 8593, 2148, 0.2),
    "uci_power": (8611, 957, 6889, 1722, 0.2),
    "uci_wine": (1439, 160, 1151, 288, 0.2),
    "uci_yacht": (277, 31, 222, 55, 0.2),
}
FEATURES = {"uci_boston": 13, "uci_concrete": 8, "uci_energy": 8, "uci_kin8nm": 8, "uci_naval": 16,
            "uci_power": 4, "uci_wine": 11, "uci_yacht": 6}


def splits_of(name, data_dir, proportion, **kwargs):
    cfg = DatasetConfig(name=name, validation_proportion=proportion, data_dir=str(data_dir), **kwargs)
    return datasets.make_splits(cfg, torch.float64, torch.device("cpu"))


@pytest.mark.parametrize("name", EXPECTED_SIZES)
def test_uci_split_sizes_match_the_original(name, data_dir):
    train_val, test, train, validation, proportion = EXPECTED_SIZES[name]
    splits = splits_of(name, data_dir, proportion)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (train, validation, test)
    assert len(splits.train) + len(splits.validation) == train_val
    assert splits.num_inputs == FEATURES[name] and splits.num_outputs == 1
    assert splits_of(name, data_dir, 0.0).validation is None


@pytest.mark.parametrize("name", EXPECTED_SIZES)
def test_processed_rows_are_the_raw_rows_in_the_shipped_order(name, data_dir, shared_data):
    raw_name = datasets.UCI_SETS[name][0]
    raw = np.loadtxt(shared_data / "uci" / raw_name / "data.txt")
    order = np.loadtxt(shared_data / "uci" / raw_name / "permutation_indices.txt", dtype=np.int64)
    inputs, targets, *_ = datasets.load_processed(name, data_dir)
    expected = raw[order][:, :-1] if name == "uci_naval" else raw[order]   # naval: first of two targets
    np.testing.assert_array_equal(inputs, expected[:, :-1])
    np.testing.assert_array_equal(targets[:, 0], expected[:, -1])
    assert download_and_process_data.same_rows(np.hstack([inputs, targets]),
                                               raw[:, :-1] if name == "uci_naval" else raw)


def test_splits_are_contiguous_train_first(data_dir):
    inputs, targets, *_ = datasets.load_processed("uci_energy", data_dir)
    splits = splits_of("uci_energy", data_dir, 0.11272, normalise_inputs=False, normalise_outputs=False)
    np.testing.assert_array_equal(splits.train.inputs.numpy(), inputs[:614])
    np.testing.assert_array_equal(splits.validation.inputs.numpy(), inputs[614:692])
    np.testing.assert_array_equal(splits.test.targets.numpy(), targets[692:])


def test_normalisation_uses_train_plus_validation_statistics(data_dir):
    raw_inputs, raw_targets, *_ = datasets.load_processed("uci_naval", data_dir)
    splits = splits_of("uci_naval", data_dir, 0.2, normalise_outputs=True)
    train_val = torch.cat([splits.train.inputs, splits.validation.inputs]).numpy()
    varying = raw_inputs[:10741].max(axis=0) > raw_inputs[:10741].min(axis=0)
    assert (~varying).sum() == 2                # naval has two constant columns: they become exactly 0
    np.testing.assert_allclose(train_val.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(train_val.std(axis=0)[varying], 1.0, rtol=1e-9)
    np.testing.assert_allclose(train_val[:, ~varying], 0.0, atol=1e-12)
    # The test split is transformed with the same statistics, and the target scale undoes it.
    mean, std = raw_targets[:10741].mean(), raw_targets[:10741].std()
    assert splits.target_std == pytest.approx(std)
    np.testing.assert_allclose(splits.test.targets.numpy() * splits.target_std + mean, raw_targets[10741:])
    column = np.flatnonzero(varying)[0]
    column_mean, column_std = raw_inputs[:10741, column].mean(), raw_inputs[:10741, column].std()
    np.testing.assert_allclose(splits.test.inputs[:, column].numpy(),
                               (raw_inputs[10741:, column] - column_mean) / column_std)


def test_bundled_datasets_need_no_files(tmp_path):
    diabetes = splits_of("diabetes", tmp_path, 0.2)
    assert (len(diabetes.train), len(diabetes.validation), len(diabetes.test)) == (318, 80, 44)
    digits = splits_of("digits", tmp_path, 0.2)
    assert digits.task == "classification" and digits.num_outputs == 10
    assert digits.train.targets.dtype == torch.long and digits.train.targets.dim() == 1


def test_missing_processed_file_says_how_to_create_it(tmp_path):
    with pytest.raises(datasets.DatasetMissing, match="download_and_process_data.py uci_yacht"):
        splits_of("uci_yacht", tmp_path, 0.2)


def test_minibatches_cover_every_row_once_per_epoch():
    split = datasets.Split(torch.arange(10.0)[:, None], torch.zeros(10, 1))
    stream = datasets.BatchStream(split, 4, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(stream)[0] for _ in range(3)])    # batches of 4, 4, 2
    assert sorted(epoch[:, 0].tolist()) == list(range(10))
    assert len(next(stream)[0]) == 4                           # the next epoch starts afresh


def test_full_batch_stream_returns_the_whole_split_in_order():
    split = datasets.Split(torch.arange(6.0)[:, None], torch.zeros(6, 1))
    batch = next(datasets.BatchStream(split, None, torch.Generator()))
    assert batch.inputs is split.inputs and batch.fraction == 1.0


def test_ranks_split_each_global_batch_into_disjoint_weighted_shards():
    split = datasets.Split(torch.arange(11.0)[:, None], torch.zeros(11, 1))
    streams = [datasets.BatchStream(split, 5, torch.Generator().manual_seed(0), distributed.Context(rank, 3))
               for rank in range(3)]
    single = datasets.BatchStream(split, 5, torch.Generator().manual_seed(0))
    for _ in range(4):                       # batches of 5, 5, 1, then a new epoch
        shards = [next(stream) for stream in streams]
        whole = next(single)
        torch.testing.assert_close(torch.cat([shard.inputs for shard in shards]), whole.inputs)
        assert sum(shard.fraction for shard in shards) == pytest.approx(1.0)
        assert [len(shard.inputs) for shard in shards] in ([2, 2, 1], [1, 0, 0])


def test_download_script_reports_a_missing_source_folder(tmp_path, capsys):
    assert download_and_process_data.main(["uci_energy", "--source", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no folder for 'energy'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_download_script_rejects_a_truncated_table(tmp_path, shared_data, capsys):
    folder = tmp_path / "uci" / "yacht"
    folder.mkdir(parents=True)
    lines = (shared_data / "uci/yacht/data.txt").read_text().splitlines()
    (folder / "data.txt").write_text("\n".join(lines[:100]))
    out = tmp_path / "out"
    assert download_and_process_data.main(["uci_yacht", "--source", str(tmp_path), "--out", str(out)]) == 2
    assert "expected 308 rows" in capsys.readouterr().err
    assert not out.exists()
