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

    python examples/fashion_mnist_trends.py                # 3 seeds, ~20 minutes on 2 CPU cores
    python examples/fashion_mnist_trends.py --seeds 0 --sweeps data  # one seed, one sweep
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


METRICS = (
    "test_deepnet", "test_resmem", "test_knn_labels", "gain", "tpr", "fpr",
    "train_deepnet", "train_resmem",
)  # fmt: skip


def aggregate(runs, **extra):
    """One row per sweep point: the mean and standard deviation of each metric over seeds."""
    row = {"width": runs[0]["width"], "parameters": runs[0]["parameters"], **extra}
    row["train_size"] = runs[0]["train_size"]
    for key in METRICS:
        values = [r[key] for r in runs]
        row[key], row[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    row["chosen"] = [r["chosen"] for r in runs]
    row["runs"] = runs
    return row


def plot(rows, x_key, x_label, title, path, log_x=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r[x_key] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    series = {
        "test": (("test_deepnet", "s-", "DeepNet"), ("test_resmem", "o-", "ResMem"),
                 ("test_knn_labels", "^--", "kNN on labels")),
        "train": (("train_deepnet", "s-", "DeepNet"), ("train_resmem", "o-", "ResMem")),
        "gain": (("gain", "o-", "ResMem - DeepNet"),),
    }  # fmt: skip
    for ax, (name, lines) in zip(axes, series.items(), strict=True):
        for key, style, label in lines:
            ys = [r[key] for r in rows]
            ax.errorbar(xs, ys, yerr=[r[f"{key}_std"] for r in rows], fmt=style, label=label,
                        capsize=3)  # fmt: skip
        ylabel = "test accuracy gain" if name == "gain" else f"{name} accuracy"
        ax.set(xlabel=x_label, ylabel=ylabel, title=ylabel)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    seeds = len(rows[0]["runs"])
    fig.suptitle(f"{title}; mean and standard deviation over {seeds} seed(s)")
    fig.tight_layout()
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def table(rows, first_key, first_label):
    pm = lambda r, key: f"{r[key]:.2%} ± {r[key + '_std']:.2%}"  # noqa: E731
    lines = [
        f"| {first_label} | params | DeepNet test | ResMem test | kNN test | gain | TPR | FPR "
        "| DeepNet train | ResMem train | k, sigma, T by seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chosen = "; ".join(f"{c['k']}, {c['sigma']}, {c['temperature']}" for c in r["chosen"])
        lines.append(
            f"| {r[first_key]} | {r['parameters']:,} | {pm(r, 'test_deepnet')} | "
            f"{pm(r, 'test_resmem')} | {pm(r, 'test_knn_labels')} | {pm(r, 'gain')} | "
            f"{r['tpr']:.2%} | {r['fpr']:.2%} | {r['train_deepnet']:.2%} | "
            f"{pm(r, 'train_resmem')} | {chosen} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default="data,width,noise")
    parser.add_argument("--fractions", default="0.1,0.25,0.5,1.0")
    parser.add_argument("--widths", default="4,8,16,32")
    parser.add_argument("--noise", default="0,0.2,0.5,1.0")
    parser.add_argument("--seeds", default="0,1,2", help="each seed: its own split and init")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--val-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=None, help="subset (smoke runs)")
    parser.add_argument("--train-size", type=int, default=None, help="subset (smoke runs)")
    parser.add_argument("--train-eval-size", type=int, default=10000)
    parser.add_argument("--layer", default="pool2")
    parser.add_argument("--output-dir", default="results/fashion_mnist_trends")
    args = parser.parse_args(argv)
    sweeps = args.sweeps.split(",")
    unknown = set(sweeps) - {"data", "width", "noise"}
    if unknown:
        parser.error(f"--sweeps takes data, width, noise. Received: {sorted(unknown)}")
    seeds = [int(v) for v in args.seeds.split(",")]
    out = args.output_dir
    common = dict(epochs=args.epochs, layer=args.layer, train_eval_size=args.train_eval_size)
    command = f"`python examples/fashion_mnist_trends.py {' '.join(argv or sys.argv[1:])}`"
    figure = os.path.join(out, "near_misses.png")

    def splits(seed):
        train, val, test = load_splits(args.val_size, seed)
        if args.train_size:
            train = (train[0][: args.train_size], train[1][: args.train_size])
        if args.test_size:
            test = (test[0][: args.test_size], test[1][: args.test_size])
        return train, val, test

    full_width_16 = {}  # seed -> the full-data, width-16 run, shared by the three sweeps

    def full_run(seed):
        if seed not in full_width_16:
            fig = figure if seed == seeds[0] else None
            full_width_16[seed] = run(splits(seed), width=16, seed=seed, figure=fig, **common)
        return full_width_16[seed]

    def sweep(name, values, one_run):
        rows = []
        for value in values:
            row = aggregate([one_run(value, seed) for seed in seeds], **{name: value})
            print(f"{name} {value}: " + ", ".join(f"{k} {row[k]:.4f}" for k in METRICS), flush=True)
            rows.append(row)
        return rows

    def data_run(fraction, seed):
        if fraction == 1.0:
            return full_run(seed)
        (x, y), val, test = splits(seed)
        n = int(round(fraction * len(x)))
        return run(((x[:n], y[:n]), val, test), width=16, seed=seed, **common)

    def width_run(width, seed):
        if width == 16:
            return full_run(seed)
        return run(splits(seed), width=width, seed=seed, **common)

    def noise_run(noise, seed):
        if noise == 0:
            return full_run(seed)
        (x, y), (xv, yv), test = splits(seed)
        noisy = ((x, randomize(y, noise, seed)), (xv, randomize(yv, noise, seed + 1)), test)
        return run(noisy, width=16, seed=seed, **common)

    results, sections = {}, []
    if "data" in sweeps:
        rows = sweep("fraction", [float(v) for v in args.fractions.split(",")], data_run)
        results["data"] = rows
        plot(rows, "fraction", "fraction of the training split", "Training-set size (width 16)",
             os.path.join(out, "data_size.png"))  # fmt: skip
        sections.append(("Training-set size (CNN width 16)", table(rows, "fraction", "fraction")))
    if "width" in sweeps:
        rows = sweep("width", [int(v) for v in args.widths.split(",")], width_run)
        results["width"] = rows
        plot(rows, "width", "CNN width (channels of the first conv)", "Network size (full data)",
             os.path.join(out, "width.png"), log_x=True)  # fmt: skip
        sections.append(("Network size (full training split)", table(rows, "width", "width")))
    if "noise" in sweeps:
        rows = sweep("noise", [float(v) for v in args.noise.split(",")], noise_run)
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
        f"# Fashion-MNIST trends\n\n{command}\n\nMean ± standard deviation over seeds "
        f"{seeds} (each seed: its own validation split and initialisation).\n\n"
        + "\n\n".join(f"## {title}\n\n{body}" for title, body in sections)
    )
    first = full_width_16.get(seeds[0], {})
    if "near_misses" in first:
        nm = first["near_misses"]
        second = nm["fixed_where_true_class_was_deepnet_second"]
        text += (
            f"\n\n## Fixed and broken test images (near_misses.png, seed {seeds[0]})\n\n"
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
