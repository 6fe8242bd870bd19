"""A TFDS split is read through TFDS once per data_dir; later loads come from its numpy copy while the
prepared dataset it was read from is unchanged, and a data_dir bnstudy cannot write in still loads."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bnstudy.app import data
from bnstudy.perf import numpy_cache


@pytest.fixture
def fake_tfds(tmp_path, monkeypatch):
    """A prepared dataset folder and a TFDS reader that counts its reads."""
    source = tmp_path / "toy" / "1.0.0"
    source.mkdir(parents=True)
    (source / "dataset_info.json").write_text("{}")
    reads = []

    def read(name, split, data_dir, download):
        reads.append(split)
        rng = np.random.default_rng(len(reads))
        return rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8), rng.integers(0, 10, 5).astype(np.int32), str(source)

    monkeypatch.setattr(data, "_read_tfds_split", read)
    return source, reads


def test_the_second_load_comes_from_the_numpy_copy_with_the_same_arrays(tmp_path, fake_tfds):
    _, reads = fake_tfds
    first = data.load_split_numpy("toy", "train", str(tmp_path), False)
    second = data.load_split_numpy("toy", "train", str(tmp_path), False)
    assert reads == ["train"]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert numpy_cache.cache_file(tmp_path, "toy", "train").is_file()
    assert not list(numpy_cache.cache_file(tmp_path, "toy", "train").parent.glob("*.tmp"))


def test_a_re_prepared_dataset_is_read_through_tfds_again(tmp_path, fake_tfds):
    source, reads = fake_tfds
    data.load_split_numpy("toy", "train", str(tmp_path), False)
    info = source / "dataset_info.json"
    os.utime(info, ns=(info.stat().st_atime_ns, info.stat().st_mtime_ns + 10**9))
    again = data.load_split_numpy("toy", "train", str(tmp_path), False)
    assert reads == ["train", "train"]
    np.testing.assert_array_equal(again[0], numpy_cache.read(tmp_path, "toy", "train")[0])


def test_a_new_tfds_version_is_read_through_tfds_again(tmp_path, fake_tfds, monkeypatch):
    _, reads = fake_tfds
    data.load_split_numpy("toy", "test", str(tmp_path), False)
    monkeypatch.setattr(numpy_cache, "tfds_version", lambda: "99.0")
    data.load_split_numpy("toy", "test", str(tmp_path), False)
    assert reads == ["test", "test"]


def test_a_data_dir_that_cannot_be_written_loads_without_a_copy(tmp_path, fake_tfds):
    _, reads = fake_tfds
    (tmp_path / numpy_cache.FOLDER).write_text("a file where the copies' folder would go")
    images, labels = data.load_split_numpy("toy", "train", str(tmp_path), False)
    assert images.shape == (5, 4, 4, 1) and labels.shape == (5,)
    data.load_split_numpy("toy", "train", str(tmp_path), False)
    assert reads == ["train", "train"]


def test_a_torn_copy_is_ignored(tmp_path, fake_tfds):
    _, reads = fake_tfds
    path = numpy_cache.cache_file(tmp_path, "toy", "train")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not a whole npz")
    data.load_split_numpy("toy", "train", str(tmp_path), False)
    assert reads == ["train"] and numpy_cache.read(tmp_path, "toy", "train") is not None


def test_a_dataset_prepared_outside_the_data_dir_gets_no_copy(tmp_path, fake_tfds):
    """E.g. TFDS's mock data, whose folder is in the TFDS package: a copy would outlive the mock."""
    _, reads = fake_tfds
    data.load_split_numpy("toy", "train", str(tmp_path / "elsewhere"), False)
    assert not numpy_cache.cache_file(tmp_path / "elsewhere", "toy", "train").exists()
    data.load_split_numpy("toy", "train", str(tmp_path / "elsewhere"), False)
    assert reads == ["train", "train"]


def test_a_download_without_network_fails_in_seconds_before_tensorflow_and_says_what_to_do(tmp_path, monkeypatch):
    import socket
    import sys
    import time

    from bnstudy.app import download_checks

    for variable in download_checks.PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    hosts = []

    def no_network(address, timeout=None):
        hosts.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    imported_tf = "tensorflow_datasets" in sys.modules
    start = time.monotonic()
    with pytest.raises(data.DataUnavailableError) as err:
        data._read_tfds_split("mnist", "train", str(tmp_path), download=True)
    assert time.monotonic() - start < 1.0 and hosts == [("storage.googleapis.com", 443)]
    assert "cannot be reached" in str(err.value) and "`dataset.data_dir`" in str(err.value)
    assert "dataset=mnist_t10k" in str(err.value)  # the offline alternative
    assert ("tensorflow_datasets" in sys.modules) == imported_tf and not any(tmp_path.iterdir())


def test_a_failed_download_leaves_no_partial_files_or_empty_dataset_folder(tmp_path):
    from bnstudy.app.download_checks import Leftovers

    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)  # another dataset: untouched
    (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
    leftovers = Leftovers(tmp_path, "mnist")
    (tmp_path / "downloads" / "mnist").mkdir(parents=True)
    (tmp_path / "downloads" / "mnist" / "train-images.gz.tmp.1a2b").write_bytes(b"part")
    (tmp_path / "downloads" / "cvdf_mnist_t.gz.tmp.3c4d").mkdir()
    (tmp_path / "mnist" / "3.0.1.incomplete").mkdir(parents=True)
    leftovers.remove()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "cifar10",
        "cifar10/3.0.2",
        "cifar10/3.0.2/dataset_info.json",
        "downloads",
    ]
