import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from tests import numpy_reference as ref


def make_memory_data(rng, n=400, d=6, c=4):
    keys = rng.normal(size=(n, d)).astype("float32")
    logits = rng.normal(size=(n, c)).astype("float32") * 2
    labels = rng.integers(0, c, size=n)
    return keys, logits, labels


def make_queries(rng, m=50, d=6, c=4):
    return rng.normal(size=(m, d)).astype("float32"), rng.normal(size=(m, c)).astype("float32")


@pytest.mark.parametrize(
    "k,sigma,temperature", [(1, 0.5, 1.0), (7, 0.7, 1.4), (50, 2.0, 0.5), (400, 1.0, 3.0)]
)
def test_classification_matches_numpy_reference(rng, k, sigma, temperature):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng)
    memory = keras_resmem.ResidualMemory(k=k, sigma=sigma, temperature=temperature, search="exact")
    memory.memorize(keys, logits, labels)
    got = memory([queries, query_logits]).numpy()
    want = ref.resmem_classification(
        keys, logits, labels, queries, query_logits, k, sigma, temperature
    )
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_chunked_exact_search_matches_reference(rng):
    keys, logits, labels = make_memory_data(rng, n=1000)
    queries, query_logits = make_queries(rng)
    # 1000 entries in chunks of 64: 16 chunks, the last one padded.
    memory = keras_resmem.ResidualMemory(k=20, sigma=0.5, search="exact", chunk_size=64)
    memory.memorize(keys, logits, labels)
    ids, distances, weights = (t.numpy() for t in memory.neighbors(queries))
    want_ids, want_d = ref.knn(keys, queries, 20)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(distances, want_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weights, ref.weights(want_d, 0.5), atol=1e-6)
    want = ref.resmem_classification(keys, logits, labels, queries, query_logits, 20, 0.5, 1.0)
    np.testing.assert_allclose(memory([queries, query_logits]).numpy(), want, atol=2e-5)


def test_probabilities_input_equals_logits_input(rng):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng)
    with_logits = keras_resmem.ResidualMemory(k=9, sigma=0.7, temperature=1.4)
    with_logits.memorize(keys, logits, labels)
    with_probs = keras_resmem.ResidualMemory(k=9, sigma=0.7, temperature=1.4, from_logits=False)
    with_probs.memorize(keys, ref.softmax(logits), labels)
    np.testing.assert_allclose(
        with_probs([queries, ref.softmax(query_logits)]).numpy(),
        with_logits([queries, query_logits]).numpy(),
        atol=1e-5,
    )


def test_regression_matches_numpy_reference(rng):
    keys = rng.normal(size=(300, 3)).astype("float32")
    predictions = rng.normal(size=(300, 2)).astype("float32")
    targets = rng.normal(size=(300, 2)).astype("float32")
    queries, query_predictions = make_queries(rng, d=3, c=2)
    memory = keras_resmem.ResidualMemory(k=5, sigma=0.3, task="regression")
    memory.memorize(keys, predictions, targets)
    want = ref.resmem_regression(keys, predictions, targets, queries, query_predictions, 5, 0.3)
    np.testing.assert_allclose(memory([queries, query_predictions]).numpy(), want, atol=2e-5)


def test_weights_do_not_underflow_for_far_neighbours(rng):
    keys, logits, labels = make_memory_data(rng)
    memory = keras_resmem.ResidualMemory(k=5, sigma=1e-3)
    memory.memorize(keys, logits, labels)
    far = np.full((2, 6), 100.0, np.float32)  # exp(-d / sigma) is 0.0 in float32
    _, _, weights = memory.neighbors(far)
    assert np.isfinite(weights.numpy()).all()
    np.testing.assert_allclose(weights.numpy().sum(axis=1), 1.0, atol=1e-6)


def test_small_k_and_sigma_memorize_every_training_label(rng):
    """Remark 3.2: with distinct keys, ResMem reproduces every training label."""
    keys, logits, labels = make_memory_data(rng, n=500)
    memory = keras_resmem.ResidualMemory(k=3, sigma=1e-3)
    memory.memorize(keys, logits, labels)
    prediction = memory([keys, logits]).numpy().argmax(-1)
    assert (logits.argmax(-1) == labels).mean() < 0.5  # the "network" is poor
    np.testing.assert_array_equal(prediction, labels)


def test_neighbors_are_sorted_and_returned_by_call(rng):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng)
    memory = keras_resmem.ResidualMemory(k=8)
    memory.memorize(keys, logits, labels)
    prediction, ids, weights = memory([queries, query_logits], return_neighbors=True)
    assert prediction.shape == (50, 4) and ids.shape == (50, 8) and weights.shape == (50, 8)
    _, distances, _ = memory.neighbors(queries)
    assert (np.diff(distances.numpy(), axis=1) >= 0).all()
    np.testing.assert_array_equal(ids.numpy(), ref.knn(keys, queries, 8)[0])


def test_changing_hyperparameters_reaches_a_compiled_model(rng):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng)
    memory = keras_resmem.ResidualMemory(k=5, sigma=1.0, temperature=1.0)
    memory.memorize(keys, logits, labels)
    emb_in, logit_in = keras.Input((6,)), keras.Input((4,))
    model = keras.Model([emb_in, logit_in], memory([emb_in, logit_in]))
    model.predict([queries, query_logits], verbose=0)  # traces and caches predict
    memory.k, memory.sigma, memory.temperature = 30, 0.4, 2.5
    got = model.predict([queries, query_logits], verbose=0)
    want = ref.resmem_classification(keys, logits, labels, queries, query_logits, 30, 0.4, 2.5)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert memory.get_config()["k"] == 30 and memory.get_config()["sigma"] == 0.4


def test_config_round_trip(rng):
    keys, logits, labels = make_memory_data(rng)
    memory = keras_resmem.ResidualMemory(k=7, sigma=0.3, temperature=1.4, search="exact", name="m")
    memory.memorize(keys, logits, labels)
    config = memory.get_config()
    json.dumps(config)
    clone = keras_resmem.ResidualMemory.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(memory))
    assert isinstance(restored, keras_resmem.ResidualMemory)
    assert restored.get_config() == config


def test_scann_backend_recall_and_agreement_with_exact(rng):
    # Clustered keys, like real embeddings: 20,000 entries, above the
    # brute-force threshold, so ScaNN partitions and quantizes.
    centers = rng.normal(size=(50, 16)) * 3
    keys = (centers[rng.integers(0, 50, 20000)] + rng.normal(size=(20000, 16))).astype("float32")
    logits = rng.normal(size=(20000, 5)).astype("float32")
    labels = rng.integers(0, 5, 20000)
    queries = (centers[rng.integers(0, 50, 500)] + rng.normal(size=(500, 16))).astype("float32")
    query_logits = rng.normal(size=(500, 5)).astype("float32")
    exact = keras_resmem.ResidualMemory(k=50, sigma=0.7, search="exact")
    exact.memorize(keys, logits, labels)
    scann = keras_resmem.ResidualMemory(k=50, sigma=0.7, search="scann")
    scann.memorize(keys, logits, labels)
    assert scann.search_backend == "scann"
    exact_ids = exact.neighbors(queries)[0].numpy()
    scann_ids = scann.neighbors(queries)[0].numpy()
    recall = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(exact_ids, scann_ids, strict=True)])
    print(f"ScaNN recall@50 against exact search: {recall:.4f}")
    assert recall >= 0.95
    agree = (
        scann([queries, query_logits]).numpy().argmax(-1)
        == exact([queries, query_logits]).numpy().argmax(-1)
    ).mean()
    assert agree >= 0.98


def test_scann_brute_force_matches_reference(rng):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng)
    memory = keras_resmem.ResidualMemory(k=10, sigma=0.7, temperature=1.4, search="scann")
    memory.memorize(keys, logits, labels)  # small memory: ScaNN scores brute force
    want = ref.resmem_classification(keys, logits, labels, queries, query_logits, 10, 0.7, 1.4)
    np.testing.assert_allclose(memory([queries, query_logits]).numpy(), want, atol=2e-5)


def _memory_model(rng, search):
    keys, logits, labels = make_memory_data(rng, n=30000 if search == "scann" else 400)
    memory = keras_resmem.ResidualMemory(k=10, sigma=0.5, search=search)
    memory.memorize(keys, logits, labels)
    emb_in, logit_in = keras.Input((6,)), keras.Input((4,))
    return keras.Model([emb_in, logit_in], memory([emb_in, logit_in]))


@pytest.mark.parametrize("search", ["exact", "ivf", "scann"])
def test_keras_file_round_trip_in_this_and_a_new_process(rng, tmp_path, search):
    model = _memory_model(rng, search)
    queries, query_logits = make_queries(rng, m=200)
    want = model.predict([queries, query_logits], verbose=0)
    path = tmp_path / "memory.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.predict([queries, query_logits], verbose=0), want)

    np.save(tmp_path / "q.npy", queries)
    np.save(tmp_path / "l.npy", query_logits)
    script = (
        "import sys, numpy as np, keras, keras_resmem\n"
        "d = sys.argv[1]\n"
        "m = keras.models.load_model(d + '/memory.keras')\n"
        "p = m.predict([np.load(d + '/q.npy'), np.load(d + '/l.npy')], verbose=0)\n"
        "np.save(d + '/p.npy', p)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=os.environ)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), want)


def test_scann_memory_loaded_from_weights_only_rebuilds_its_index(rng, tmp_path):
    model = _memory_model(rng, "scann")
    queries, query_logits = make_queries(rng, m=200)
    want = model.predict([queries, query_logits], verbose=0)
    model.save_weights(tmp_path / "w.weights.h5")
    clone = keras.Model.from_config(model.get_config())
    clone.load_weights(tmp_path / "w.weights.h5")
    got = clone.predict([queries, query_logits], verbose=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.98


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 0}, "`k` must be a positive integer. Received: k=0"),
        ({"k": 2.5}, "`k` must be a positive integer"),
        ({"sigma": 0}, "`sigma` must be a positive, finite number.*Received: sigma=0"),
        ({"temperature": float("nan")}, "`temperature` must be a positive, finite number"),
        ({"sigma": "wide"}, "`sigma` must be a positive number. Received: sigma='wide'"),
        ({"task": "ranking"}, "`task` must be one of"),
        ({"search": "faiss"}, r"`search` must be one of \('auto', 'exact', 'ivf', 'scann'\)"),
        ({"k": 11, "memory_size": 10, "key_dim": 2, "num_outputs": 2}, "at most the memory size"),
        ({"ivf_options": {"probes": 3}}, r"Unknown IVF option\(s\) \['probes'\]"),
        ({"ivf_options": {"num_probes": 0}}, "`num_probes` must be a positive integer"),
        ({"ivf_options": [1]}, "`ivf_options` must be a dict"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_resmem.ResidualMemory(**kwargs)


def test_memorize_rejects_bad_memories(rng):
    keys, logits, labels = make_memory_data(rng, n=20)
    with pytest.raises(
        ValueError, match="at most the memory size \\(20 entries\\). Received: k=21"
    ):
        keras_resmem.ResidualMemory(k=21).memorize(keys, logits, labels)
    bad = keys.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values.*first at entry 7"):
        keras_resmem.ResidualMemory(k=3).memorize(bad, logits, labels)
    with pytest.raises(ValueError, match=r"Class ids must lie in \[0, 4\)"):
        keras_resmem.ResidualMemory(k=3).memorize(keys, logits, labels + 4)
    with pytest.raises(ValueError, match="empty"):
        keras_resmem.ResidualMemory(k=3).memorize(keys[:0], logits[:0], labels[:0])
    memory = keras_resmem.ResidualMemory(k=3)
    memory.memorize(keys, logits, labels)
    with pytest.raises(ValueError, match="at most the memory size"):
        memory.k = 21
    with pytest.raises(ValueError, match="key_dim=6"):
        memory([np.zeros((2, 5), "float32"), np.zeros((2, 4), "float32")])


def test_calling_before_memorize_says_what_to_do():
    memory = keras_resmem.ResidualMemory()
    with pytest.raises(ValueError, match="holds no memory yet.*memorize"):
        memory([np.zeros((2, 5), "float32"), np.zeros((2, 4), "float32")])


def test_ivf_num_probes_reaches_a_compiled_model(rng):
    keys, logits, labels = make_memory_data(rng, n=2000)
    memory = keras_resmem.ResidualMemory(
        k=20, sigma=0.5, search="ivf", ivf_options={"num_partitions": 50, "num_probes": 2}
    )
    memory.memorize(keys, logits, labels)
    assert memory.num_probes == 2
    emb_in, logit_in = keras.Input((6,)), keras.Input((4,))
    model = keras.Model([emb_in, logit_in], memory([emb_in, logit_in]))
    queries, query_logits = make_queries(rng, m=100)
    model.predict([queries, query_logits], verbose=0)
    memory.num_probes = 50  # every partition: exact
    want = ref.resmem_classification(keys, logits, labels, queries, query_logits, 20, 0.5, 1.0)
    np.testing.assert_allclose(model.predict([queries, query_logits], verbose=0), want, atol=1e-5)
    with pytest.raises(ValueError, match="`num_probes` must be a positive integer"):
        memory.num_probes = 0
    exact = keras_resmem.ResidualMemory(k=3, search="exact")
    exact.memorize(keys, logits, labels)
    assert exact.num_probes is None
    with pytest.raises(ValueError, match="not a setting of the 'exact' search backend"):
        exact.num_probes = 4


def read_shares_the_buffer(variable):
    """Whether two whole reads of `variable` share one buffer (no copy-on-read)."""
    first = np.asarray(tf.convert_to_tensor(variable))
    second = np.asarray(tf.convert_to_tensor(variable))
    return first.ctypes.data == second.ctypes.data


@pytest.mark.parametrize("search", ["exact", "ivf", "scann"])
@pytest.mark.parametrize("sparse_residuals", [None, 2])
def test_memory_tables_are_read_without_copying_them(rng, search, sparse_residuals):
    """Once a table is copied on every whole read, each exact or IVF search copies the keys."""
    keys, logits, labels = make_memory_data(rng, n=2000)
    memory = keras_resmem.ResidualMemory(k=3, search=search, sparse_residuals=sparse_residuals)
    memory.memorize(keys, logits, labels)
    emb_in, logit_in = keras.Input((6,)), keras.Input((4,))
    model = keras.Model([emb_in, logit_in], memory([emb_in, logit_in]))
    queries, query_logits = make_queries(rng)
    model.predict([queries, query_logits], verbose=0)
    memory([queries, query_logits])
    memory.neighbors(queries)
    tables = [memory.keys, memory.memory_targets]
    tables += (
        [memory.memory_scores]
        if sparse_residuals is None
        else [memory.residual_ids, memory.residual_values]
    )
    for table in tables:
        assert read_shares_the_buffer(table), table.path
    np.testing.assert_array_equal(memory.keys.numpy(), keys)
    np.testing.assert_array_equal(memory.memory_targets.numpy(), labels)
