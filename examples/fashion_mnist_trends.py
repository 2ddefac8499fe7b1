"""The paper's trends on Fashion-MNIST: data size, network size, random labels, near misses.

Each run trains the main job's CNN (examples/fashion_mnist.py) and attaches a
memory keyed on its `pool2` feature map (the layer the main job picks on
validation). It chooses k, sigma and T, and the kNN-on-labels baseline's k and
sigma, on a validation split carved from the training data, then measures test
accuracy once, plus training accuracy on up to 10,000 training images. Sweeps:

- `data`: 10%, 25%, 50%, 100% of the training split (the paper's Figure 3, left);
- `width`: CNN widths 4, 8, 16, 32, at full data (Figure 3, right);
- `noise`: 0%, 20%, 50%, 100% of the training (and validation) labels replaced
  by random ones, with clean test labels (Zhang et al., 2017).

The full-data, width-16 run also writes a figure of test images that ResMem
fixed and broke, with their nearest training images (the paper's Figure 2).
Writes tables and PNG figures to `results/fashion_mnist_trends/`.

    python examples/fashion_mnist_trends.py               # ~8 minutes on 2 CPU cores
    python examples/fashion_mnist_trends.py --sweeps data  # one sweep
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

import keras_resmem
from keras_resmem import _io, diagnostics, residuals

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fashion_mnist import build_cnn, choose, load_splits  # noqa: E402

CLASS_NAMES = [
    "T-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "boot",
]  # fmt: skip
GRID = {
    "k": [10, 25, 50, 100],
    "sigma": [0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 4.0, 8.0],
    "temperature": [0.5, 1.0, 1.4, 2.0, 3.0],
}


def run(splits, *, width, epochs, seed, layer, train_eval_size, figure=None):
    """Trains one CNN, attaches its memory, and measures DeepNet, ResMem and kNN."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits
    keras.utils.set_random_seed(seed)
    base = build_cnn(width=width)
    base.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    base.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=0)
    resmem = keras_resmem.attach_memory(base, layer, (x_train, y_train), verbose=0)
    memory = resmem.get_layer("residual_memory")
    features = keras.Model(base.inputs, [base.get_layer(layer).output, base.output])
    max_k = min(max(GRID["k"]), memory.memory_size)
    grid = {**GRID, "k": [k for k in GRID["k"] if k <= max_k]}

    def cache(x):
        embeddings, scores = features.predict(x, batch_size=512, verbose=0)
        return keras_resmem.tuning.NeighborCache(memory, embeddings, scores, max_k), scores

    val, _ = cache(x_val)
    chosen, val_accuracy = choose(val.predict, grid, y_val)
    knn_chosen, _ = choose(val.knn_label_scores, {"k": grid["k"], "sigma": grid["sigma"]}, y_val)
    test, test_scores = cache(x_test)
    resmem_test = test.predict(**chosen)
    comparison = keras_resmem.compare(y_test, test_scores, resmem_test)
    knn = float((test.knn_label_scores(**knn_chosen).argmax(-1) == y_test).mean())
    subset = np.random.default_rng(seed).permutation(len(x_train))[:train_eval_size]
    train, train_scores = cache(x_train[subset])
    train_cmp = keras_resmem.compare(y_train[subset], train_scores, train.predict(**chosen))
    row = {
        "width": width,
        "parameters": base.count_params(),
        "train_size": len(x_train),
        "chosen": chosen,
        "knn_chosen": knn_chosen,
        "val_resmem_accuracy": val_accuracy,
        "test_deepnet": comparison.deepnet_accuracy,
        "test_resmem": comparison.resmem_accuracy,
        "test_knn_labels": knn,
        "tpr": comparison.tpr,
        "fpr": comparison.fpr,
        "gain": comparison.gain,
        "train_deepnet": train_cmp.deepnet_accuracy,
        "train_resmem": train_cmp.resmem_accuracy,
        "seconds": time.perf_counter() - start,
    }
    if figure:
        row["near_misses"] = near_miss_figure(
            test, chosen, test_scores, resmem_test, x_test, y_test, x_train, memory, figure
        )
    return row


def near_miss_figure(cache, chosen, deepnet, resmem, x_test, y_test, x_train, memory, path):
    """Figure 2: fixed and broken test images with their nearest training images."""
    k = chosen["k"]
    weights = residuals.neighbor_weights(cache.distances[:, :k], chosen["sigma"])
    changed = diagnostics.changed_examples(
        y_test,
        deepnet,
        resmem,
        cache.ids[:, :k].numpy(),
        weights.numpy(),
        memory.memory_targets.numpy(),
    )
    fixed = [c for c in changed if c.fixed]
    broke = [c for c in changed if not c.fixed]
    # Near misses first: fixed images whose true class was DeepNet's second choice.
    shown = sorted(fixed, key=lambda c: (c.label_rank != 2, c.index))[:6] + broke[:2]
    diagnostics.plot_changed_examples(
        shown, x_test, x_train, path, neighbors_shown=6, class_names=CLASS_NAMES
    )
    pairs = {}
    for c in fixed:
        key = f"{CLASS_NAMES[c.deepnet_class]} -> {CLASS_NAMES[c.resmem_class]}"
        pairs[key] = pairs.get(key, 0) + 1
    return {
        "fixed": len(fixed),
        "broke": len(broke),
        "fixed_where_true_class_was_deepnet_second": sum(c.label_rank == 2 for c in fixed),
        "most_common_fixes": sorted(pairs.items(), key=lambda kv: -kv[1])[:5],
    }


def randomize(labels, fraction, seed):
    """Replaces `fraction` of the labels by uniformly random classes (Zhang et al.)."""
    labels = labels.copy()
    # Its own random stream: the training-accuracy subset is drawn from
    # default_rng(seed), and must not pick out exactly the randomized examples.
    rng = np.random.default_rng([seed, 2017])
    idx = rng.permutation(len(labels))[: int(round(fraction * len(labels)))]
    labels[idx] = rng.integers(0, 10, len(idx))
    return labels


def plot(rows, x_key, x_label, title, path, log_x=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r[x_key] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, split in zip(axes, ("test", "train"), strict=True):
        ax.plot(xs, [r[f"{split}_deepnet"] for r in rows], "s-", label="DeepNet")
        ax.plot(xs, [r[f"{split}_resmem"] for r in rows], "o-", label="ResMem")
        if split == "test":
            ax.plot(xs, [r["test_knn_labels"] for r in rows], "^--", label="kNN on labels")
        ax.set(xlabel=x_label, ylabel=f"{split} accuracy", title=f"{split} accuracy")
        if log_x:
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def table(rows, first_key, first_label):
    lines = [
        f"| {first_label} | params | DeepNet test | ResMem test | kNN test | gain | TPR | FPR "
        "| DeepNet train | ResMem train | k, sigma, T |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["chosen"]
        lines.append(
            f"| {r[first_key]} | {r['parameters']:,} | {r['test_deepnet']:.2%} | "
            f"{r['test_resmem']:.2%} | {r['test_knn_labels']:.2%} | {r['gain']:+.2%} | "
            f"{r['tpr']:.2%} | {r['fpr']:.2%} | {r['train_deepnet']:.2%} | "
            f"{r['train_resmem']:.2%} | {c['k']}, {c['sigma']}, {c['temperature']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default="data,width,noise")
    parser.add_argument("--fractions", default="0.1,0.25,0.5,1.0")
    parser.add_argument("--widths", default="4,8,16,32")
    parser.add_argument("--noise", default="0,0.2,0.5,1.0")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--val-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=None, help="subset (smoke runs)")
    parser.add_argument("--train-size", type=int, default=None, help="subset (smoke runs)")
    parser.add_argument("--train-eval-size", type=int, default=10000)
    parser.add_argument("--layer", default="pool2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="results/fashion_mnist_trends")
    args = parser.parse_args(argv)
    sweeps = args.sweeps.split(",")
    unknown = set(sweeps) - {"data", "width", "noise"}
    if unknown:
        parser.error(f"--sweeps takes data, width, noise. Received: {sorted(unknown)}")
    out = args.output_dir
    train, val, test = load_splits(args.val_size, args.seed)
    if args.train_size:
        train = (train[0][: args.train_size], train[1][: args.train_size])
    if args.test_size:
        test = (test[0][: args.test_size], test[1][: args.test_size])
    common = dict(
        epochs=args.epochs, seed=args.seed, layer=args.layer, train_eval_size=args.train_eval_size
    )
    command = f"`python examples/fashion_mnist_trends.py {' '.join(argv or sys.argv[1:])}`"
    results, sections = {}, []
    full_width_16 = None

    if "data" in sweeps:
        rows = []
        for fraction in (float(v) for v in args.fractions.split(",")):
            n = int(round(fraction * len(train[0])))
            figure = os.path.join(out, "near_misses.png") if fraction == 1.0 else None
            row = run(((train[0][:n], train[1][:n]), val, test), width=16, figure=figure, **common)
            row["fraction"] = fraction
            rows.append(row)
            print(f"data {fraction:.0%}: {json.dumps(row, default=str)}", flush=True)
            if fraction == 1.0:
                full_width_16 = row
        results["data"] = rows
        plot(rows, "fraction", "fraction of the training split", "Training-set size (width 16)",
             os.path.join(out, "data_size.png"))  # fmt: skip
        sections.append(("Training-set size (CNN width 16)", table(rows, "fraction", "fraction")))

    if "width" in sweeps:
        rows = []
        for width in (int(v) for v in args.widths.split(",")):
            if width == 16 and full_width_16 is not None:
                row = dict(full_width_16)  # the same run as the data sweep's 100%
            else:
                figure = os.path.join(out, "near_misses.png") if width == 16 else None
                row = run((train, val, test), width=width, figure=figure, **common)
            rows.append(row)
            print(f"width {width}: {json.dumps(row, default=str)}", flush=True)
        results["width"] = rows
        plot(rows, "width", "CNN width (channels of the first conv)", "Network size (full data)",
             os.path.join(out, "width.png"), log_x=True)  # fmt: skip
        sections.append(("Network size (full training split)", table(rows, "width", "width")))

    if "noise" in sweeps:
        rows = []
        for noise in (float(v) for v in args.noise.split(",")):
            noisy = (
                (train[0], randomize(train[1], noise, args.seed)),
                (val[0], randomize(val[1], noise, args.seed + 1)),
                test,
            )
            if noise == 0 and full_width_16 is not None:
                row = dict(full_width_16)  # clean labels: the data sweep's 100% run
            else:
                row = run(noisy, width=16, **common)
            row["noise"] = noise
            rows.append(row)
            print(f"noise {noise:.0%}: {json.dumps(row, default=str)}", flush=True)
        results["noise"] = rows
        plot(rows, "noise", "fraction of random training labels", "Random labels (width 16)",
             os.path.join(out, "random_labels.png"))  # fmt: skip
        sections.append(
            (
                "Random labels (training accuracy on the labels trained on; clean test labels)",
                table(rows, "noise", "random labels"),
            )
        )

    text = (
        "# Fashion-MNIST trends\n\n"
        + command
        + "\n\n"
        + "\n\n".join(f"## {title}\n\n{body}" for title, body in sections)
    )
    if full_width_16 and "near_misses" in full_width_16:
        nm = full_width_16["near_misses"]
        second = nm["fixed_where_true_class_was_deepnet_second"]
        text += (
            "\n\n## Fixed and broken test images (near_misses.png)\n\n"
            f"ResMem fixed {nm['fixed']} and broke {nm['broke']} test images. In {second} of the "
            "fixed ones the true class was DeepNet's second choice. Most common fixes "
            f"(DeepNet -> ResMem): {nm['most_common_fixes']}"
        )
    _io.write_text(os.path.join(out, "results.md"), text + "\n")
    _io.write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2, default=str))
    print(text)
    return results


if __name__ == "__main__":
    main()
