import numpy as np
import pytest
import tensorflow as tf

from keras_resmem import search
from tests import numpy_reference as ref


@pytest.mark.parametrize("chunk_size", [7, 100, 16384])
def test_exact_search_equals_brute_force(rng, chunk_size):
    keys = rng.normal(size=(250, 5)).astype("float32")
    queries = rng.normal(size=(33, 5)).astype("float32")
    ids = search.ExactSearch(tf.constant(keys), chunk_size).search(tf.constant(queries), 11)
    np.testing.assert_array_equal(ids.numpy(), ref.knn(keys, queries, 11)[0])


def test_auto_backend_picks_by_memory_size():
    assert search.resolve_backend("auto", 10_000) == "exact"
    assert search.resolve_backend("auto", search.AUTO_SCANN_THRESHOLD) == "scann"
    assert search.resolve_backend("exact", 10**8) == "exact"
    with pytest.raises(ValueError, match="Received: search='faiss'"):
        search.resolve_backend("faiss", 10)


def test_scann_index_saves_to_plain_files_and_loads(rng, tmp_path):
    keys = rng.normal(size=(30000, 8)).astype("float32")
    queries = rng.normal(size=(100, 8)).astype("float32")
    index = search.ScannSearch.build(keys)
    assert index.options["brute_force"] is False
    want = index.search(tf.constant(queries), 10).numpy()
    index.save(tmp_path)
    suffixes = {p.suffix for p in tmp_path.iterdir()}
    assert suffixes <= {".npy", ".bin"}
    for npy in tmp_path.glob("*.npy"):
        np.load(npy, allow_pickle=False)  # no object arrays, nothing to unpickle
    loaded = search.ScannSearch.load(tmp_path, tf.constant(keys), index.options)
    np.testing.assert_array_equal(loaded.search(tf.constant(queries), 10).numpy(), want)
