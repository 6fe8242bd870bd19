"""The validation split: held out of the training split with a fixed seed, the same for every run."""

import jax
import numpy as np
import pytest

from bnstudy.app import data
from bnstudy.app.config import ConfigError
from conftest import imports_tensorflow


@pytest.mark.parametrize("num_train, n_val", [(256, 26), (8000, 800), (10, 0)])
def test_validation_split_is_a_disjoint_cover_of_the_training_split(num_train, n_val):
    val, train = data.validation_split(num_train, n_val)
    assert len(val) == n_val and len(train) == num_train - n_val
    assert not set(val) & set(train)
    assert np.array_equal(np.sort(np.concatenate([val, train])), np.arange(num_train))
    assert np.all(np.diff(train) > 0)  # the remaining examples keep the split's order (train_subset = first N)


def test_validation_split_ignores_every_global_seed_and_nests():
    np.random.seed(1)
    first = data.validation_split(1000, 100)[0]
    np.random.seed(2)
    assert np.array_equal(first, data.validation_split(1000, 100)[0])
    assert set(data.validation_split(1000, 50)[0]) <= set(first)  # a smaller val is a subset of a larger one
    assert not np.array_equal(first, np.arange(100))  # drawn, not the split's first examples


@pytest.mark.parametrize("val_size, expected", [(0.1, 26), (0.5, 128), (40, 40), (0, 0)])
def test_validation_count_reads_a_fraction_or_a_count(val_size, expected):
    assert data.validation_count(val_size, 256) == expected


def test_validation_count_refuses_to_leave_no_training_examples():
    with pytest.raises(ConfigError, match="dataset.val_size"):
        data.validation_count(256, 256)


@imports_tensorflow
def test_loaded_validation_split_is_identical_across_subsets_and_never_trained_on(mock_tfds):
    full = data.load("mnist", val_size=40)
    small = data.load("mnist", val_size=40, train_subset=100)
    assert np.array_equal(full.arrays.val_images, small.arrays.val_images)
    assert np.array_equal(full.arrays.val_labels, small.arrays.val_labels)
    assert full.num_val == 40 and full.num_train == 216 and small.num_train == 100
    rows = lambda a: {x.tobytes() for x in np.asarray(jax.device_get(a))}
    val, train = rows(full.arrays.val_images), rows(full.arrays.train_images)
    assert len(val) == 40 and not val & train  # the random mock images are distinct: no example is in both
    assert rows(small.arrays.train_images) <= train


@imports_tensorflow
def test_no_validation_split_leaves_the_training_split_whole(mock_tfds):
    d = data.load("mnist", val_size=0)
    assert d.num_val == 0 and d.arrays.val_images is None and d.num_train == 256
