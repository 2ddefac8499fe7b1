"""The paper's trends on Fashion-MNIST: data size, network size, random labels, near misses.

Each run trains the main job's CNN (examples/fashion_mnist.py) and attaches a
memory keyed on its `pool2` feature map (the layer the main job picks on
validation). It chooses the settings of ResMem and of the two baselines over the
same neighbours (kNN on labels; kNN-LM-style interpolation) on a validation
split carved from the training data, then measures test accuracy once, plus
training accuracy on up to 10,000 training images. Sweeps:

- `data`: 10%, 25%, 50%, 100% of the training split (the paper's Figure 3, left);
- `width`: CNN widths 4, 8, 16, 32, at full data (Figure 3, right);
- `noise`: 0%, 20%, 50%, 100% of the labels of a 1,000-image training subset
  (and of its validation split) replaced by random ones, with clean test labels
  (Zhang et al., 2017).

The data and width sweeps train each CNN to convergence: early stopping on the
validation loss, best weights restored (examples/_protocol.py). The random-label
sweep follows Zhang et al. instead: it trains until the network fits its
training labels (99.9% training accuracy, or the training loss stops
improving), with no early stopping on validation, since fitting the noise is
the point; its subset is small enough for that to happen on a CPU.

The full-data, width-16 run also writes a figure of test images that ResMem
fixed and broke, with their nearest training images (the paper's Figure 2).
Writes tables and PNG figures to `results/fashion_mnist_trends/`.

    python examples/fashion_mnist_trends.py                # 3 seeds, over 2 hours on 2 CPU cores
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
import _protocol as protocol  # noqa: E402
from fashion_mnist import build_cnn, load_splits  # noqa: E402

CLASS_NAMES = [
    "T-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "boot",
]  # fmt: skip
KS = [10, 25, 50, 100]


def run(splits, *, width, seed, layer, train_eval_size, fit, max_epochs, figure=None):
    """Trains one CNN (`fit`: "converge" or "memorize"), attaches its memory, and
    measures DeepNet, ResMem and the two baselines, each chosen on validation."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits
    keras.utils.set_random_seed(seed)
    base = build_cnn(width=width)
    base.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    if fit == "converge":
        training = protocol.train_to_convergence(
            base, (x_train, y_train), (x_val, y_val), verbose=0, max_epochs=max_epochs
        )
    else:
        training = fit_training_set(base, x_train, y_train, max_epochs=max_epochs)
    resmem = keras_resmem.attach_memory(base, layer, (x_train, y_train), verbose=0)
    memory = resmem.get_layer("residual_memory")
    features = keras.Model(base.inputs, [base.get_layer(layer).output, base.output])
    max_k = min(max(KS), memory.memory_size)
    grids = protocol.grids([k for k in KS if k <= max_k])

    def cache(x):
        embeddings, scores = features.predict(x, batch_size=512, verbose=0)
        return keras_resmem.tuning.NeighborCache(memory, embeddings, scores, max_k), scores

    val, _ = cache(x_val)
    choices = val.choose_all(y_val, grids)
    test, test_scores = cache(x_test)
    test_predictions = {m: test.predict(method=m, **c.settings) for m, c in choices.items()}
    comparisons = keras_resmem.compare(y_test, test_scores, test_predictions)
    subset = np.random.default_rng(seed).permutation(len(x_train))[:train_eval_size]
    train, train_scores = cache(x_train[subset])
    train_cmp = keras_resmem.compare(
        y_train[subset], train_scores, train.predict(method="resmem", **choices["resmem"].settings)
    )
    row = {
        "width": width,
        "parameters": base.count_params(),
        "train_size": len(x_train),
        "epochs_run": training["epochs_run"],
        "best_epoch": training["best_epoch"],
        "capped": training["capped"],
        "chosen": {m: c.settings for m, c in choices.items()},
        "val": {m: c.accuracy for m, c in choices.items()},
        "test_deepnet": comparisons["resmem"].deepnet_accuracy,
        "test_resmem": comparisons["resmem"].resmem_accuracy,
        "test_knn": comparisons["knn"].resmem_accuracy,
        "test_interpolation": comparisons["interpolation"].resmem_accuracy,
        "tpr": comparisons["resmem"].tpr,
        "fpr": comparisons["resmem"].fpr,
        "gain": comparisons["resmem"].gain,
        "resmem_minus_best_baseline": comparisons["resmem"].resmem_accuracy
        - max(comparisons["knn"].resmem_accuracy, comparisons["interpolation"].resmem_accuracy),
        "train_deepnet": train_cmp.deepnet_accuracy,
        "train_resmem": train_cmp.resmem_accuracy,
        "seconds": time.perf_counter() - start,
    }
    if figure:
        row["near_misses"] = near_miss_figure(
            test,
            choices["resmem"].settings,
            test_scores,
            test_predictions["resmem"],
            x_test,
            y_test,
            x_train,
            memory,
            figure,
        )
    return row


def fit_training_set(model, x, y, max_epochs=3000):
    """Zhang et al.'s protocol: train until the network fits its (random) training labels.

    Stops once training accuracy reaches 99.9%, or when the training loss has
    not improved for 50 epochs; the weights of the last epoch are kept. No
    early stopping on validation: the point is to fit the noise.
    """

    class StopWhenFitted(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs["accuracy"] >= 0.999:
                self.model.stop_training = True

    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=50)
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=1 / 3, patience=20, min_lr=1e-5
    )
    start = time.perf_counter()
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=max_epochs,
        callbacks=[StopWhenFitted(), stop, plateau],
        verbose=0,
    )
    epochs = len(history.history["loss"])
    accuracy = history.history["accuracy"][-1]
    return {
        "epochs_run": epochs,
        "best_epoch": epochs,
        "capped": epochs == max_epochs,
        "final_train_accuracy": float(accuracy),
        "seconds": time.perf_counter() - start,
    }


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
    "test_deepnet", "test_resmem", "test_knn", "test_interpolation", "gain", "tpr", "fpr",
    "resmem_minus_best_baseline", "train_deepnet", "train_resmem", "epochs_run",
)  # fmt: skip


def aggregate(runs, **extra):
    """One row per sweep point: the mean and standard deviation of each metric over seeds."""
    row = {"width": runs[0]["width"], "parameters": runs[0]["parameters"], **extra}
    row["train_size"] = runs[0]["train_size"]
    for key in METRICS:
        values = [r[key] for r in runs]
        row[key], row[f"{key}_std"] = protocol.mean_std(values)
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
                 ("test_knn", "^--", "kNN on labels"),
                 ("test_interpolation", "v--", "kNN-LM interpolation")),
        "train": (("train_deepnet", "s-", "DeepNet"), ("train_resmem", "o-", "ResMem")),
        "gain": (("gain", "o-", "ResMem - DeepNet"),
                 ("resmem_minus_best_baseline", "d--", "ResMem - better baseline")),
    }  # fmt: skip
    for ax, (name, lines) in zip(axes, series.items(), strict=True):
        for key, style, label in lines:
            ys = [r[key] for r in rows]
            ax.errorbar(xs, ys, yerr=[r[f"{key}_std"] for r in rows], fmt=style, label=label,
                        capsize=3)  # fmt: skip
        ylabel = "test accuracy difference" if name == "gain" else f"{name} accuracy"
        if name == "gain":
            ax.axhline(0, color="grey", lw=0.8)
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
    points = lambda r, key: f"{100 * r[key]:+.2f} ± {100 * r[key + '_std']:.2f}"  # noqa: E731
    lines = [
        f"| {first_label} | params | epochs | DeepNet test | ResMem test | kNN test "
        "| interpolation test | gain (points) | ResMem - better baseline (points) | TPR | FPR "
        "| DeepNet train | ResMem train |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r[first_key]} | {r['parameters']:,} | {r['epochs_run']:.0f} | "
            f"{pm(r, 'test_deepnet')} | {pm(r, 'test_resmem')} | {pm(r, 'test_knn')} | "
            f"{pm(r, 'test_interpolation')} | {points(r, 'gain')} | "
            f"{points(r, 'resmem_minus_best_baseline')} | {r['tpr']:.2%} | {r['fpr']:.2%} | "
            f"{pm(r, 'train_deepnet')} | {pm(r, 'train_resmem')} |"
        )
    lines += ["", "Chosen on validation, by seed (ResMem k, sigma, T; kNN k, sigma):", ""]
    for r in rows:
        per_seed = "; ".join(
            f"{c['resmem']['k']}, {c['resmem']['sigma']}, {c['resmem']['temperature']} / "
            f"{c['knn']['k']}, {c['knn']['sigma']}"
            for c in r["chosen"]
        )
        lines.append(f"- {first_label} {r[first_key]}: {per_seed}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default="data,width,noise")
    parser.add_argument("--fractions", default="0.1,0.25,0.5,1.0")
    parser.add_argument("--widths", default="4,8,16,32")
    parser.add_argument("--noise", default="0,0.2,0.5,1.0")
    parser.add_argument("--seeds", default="0,1,2", help="each seed: its own split and init")
    parser.add_argument(
        "--noise-train-size",
        type=int,
        default=1000,
        help="random-label sweep: training images (small enough for the CNN to fit them all)",
    )
    parser.add_argument("--noise-val-size", type=int, default=1000)
    parser.add_argument(
        "--max-epochs", type=int, default=300, help="cap at full data; never reached"
    )
    parser.add_argument("--noise-max-epochs", type=int, default=3000, help="cap; never reached")
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
    common = dict(layer=args.layer, train_eval_size=args.train_eval_size)
    converge = dict(common, fit="converge", max_epochs=args.max_epochs)
    memorize = dict(common, fit="memorize", max_epochs=args.noise_max_epochs)
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
            full_width_16[seed] = run(splits(seed), width=16, seed=seed, figure=fig, **converge)
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
        # The cap in optimizer steps stays that of the full data: a tenth of
        # the data gets ten times the epochs.
        cap = int(np.ceil(args.max_epochs / fraction))
        return run(
            ((x[:n], y[:n]), val, test), width=16, seed=seed, **{**converge, "max_epochs": cap}
        )

    def width_run(width, seed):
        if width == 16:
            return full_run(seed)
        return run(splits(seed), width=width, seed=seed, **converge)

    def noise_run(noise, seed):
        # A subset small enough for the CNN to fit every (random) label, as
        # Zhang et al. do; validation from the same noisy training data.
        (x, y), (xv, yv), test = splits(seed)
        n, nv = args.noise_train_size, args.noise_val_size
        y, yv = randomize(y[:n], noise, seed), randomize(yv[:nv], noise, seed + 1)
        return run(((x[:n], y), (xv[:nv], yv), test), width=16, seed=seed, **memorize)

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
                f"Random labels ({args.noise_train_size:,} training images, trained until "
                "they are fitted; training accuracy on the labels trained on; clean test "
                "labels)",
                table(rows, "noise", "random labels"),
            )
        )

    text = (
        f"# Fashion-MNIST trends\n\n{command}\n\nMean ± standard deviation over seeds "
        f"{seeds} (each seed: its own validation split and initialisation). Data and width "
        "sweeps: DeepNet trained to convergence (early stopping on the validation loss, best "
        "weights restored); the random-label sweep trains until the training labels are "
        "fitted. Each method's settings are chosen on validation; the test set is scored "
        "once.\n\n" + "\n\n".join(f"## {title}\n\n{body}" for title, body in sections)
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
