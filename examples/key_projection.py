"""Key projection on the main job: a PCA of the 1568-d `pool2` keys, traded against accuracy.

Trains the main job's CNN to convergence exactly as `examples/fashion_mnist.py`
does (early stopping on a validation split carved from the training data,
best weights restored), keys a ResMem memory on its 1568-d `pool2` feature
map, and compares the memory without a projection with memories whose keys
are projected onto their top principal components
(`key_projection=keras_resmem.projection.PCA(dim)`). For each, `k`, `sigma`
and `T` are chosen on the validation split; the test set is scored once.
Reports the test accuracy of DeepNet and ResMem, the memory's bytes (its
variables, and its `.keras` file), and serving time per batch of 256 and of 1
(median over compiled calls, rounds alternating between the memories), as
ratios against the 1568-d memory. Writes `results.json` and `results.md`
to --output-dir.

    python examples/key_projection.py                          # seed 0: ~15 min on 2 CPU cores
    python examples/key_projection.py --train-size 2000 --max-epochs 1   # a smoke run
"""

import argparse
import json
import os
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import keras_resmem
from keras_resmem import _io

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _protocol as protocol  # noqa: E402
from fashion_mnist import build_cnn, load_splits, train_cnn  # noqa: E402

LAYER = "pool2"
# The protocol's sigma grid, extended: full 1568-d distances are larger than
# those of the pre-logit layer the grid was written for.
SIGMAS = [*protocol.SIGMAS, 16.0, 32.0]


def _label(dim, key_dim):
    return f"none ({key_dim}-d)" if dim is None else f"PCA {dim}"


def _serving_times(models, x, batch_sizes, rounds, calls):
    """Median seconds per compiled call, by model name and batch size.

    Each round times every model in turn, in an order that rotates from round
    to round, so that a slow spell of the shared machine falls on all of them.
    """
    fns = {
        name: tf.function(lambda b, m=model: m(b, training=False), reduce_retracing=True)
        for name, model in models.items()
    }
    times = {name: {b: [] for b in batch_sizes} for name in models}
    batches = {b: tf.constant(x[:b]) for b in batch_sizes}
    for fn in fns.values():  # trace and warm up
        for b in batch_sizes:
            fn(batches[b]).numpy()
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for b in batch_sizes:
                for _ in range(calls):
                    start = time.perf_counter()
                    fns[name](batches[b]).numpy()
                    times[name][b].append(time.perf_counter() - start)
    return {name: {b: float(np.median(t)) for b, t in by.items()} for name, by in times.items()}


def _file_bytes(model):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resmem.keras")
        _io.save_model(model, path)
        return os.path.getsize(path)


def run_seed(args, seed):
    seed_start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_splits(args.val_size, seed)
    if args.train_size:
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    base = build_cnn()
    training = train_cnn(base, (x_train, y_train), (x_val, y_val), args, seed)
    deepnet_test = base.predict(x_test, batch_size=1024, verbose=0)
    deepnet_accuracy = float((deepnet_test.argmax(-1) == y_test).mean())
    features = keras.Model(base.inputs, [base.get_layer(LAYER).output, base.output])
    grids = {"resmem": protocol.grids(args.ks, sigmas=SIGMAS)["resmem"]}

    configs, models, total_variance = {}, {}, None
    for dim in [None, *args.dims]:
        start = time.perf_counter()
        resmem = keras_resmem.attach_memory(
            base, LAYER, (x_train, y_train), search=args.search, key_projection=dim, verbose=0
        )
        attach_seconds = time.perf_counter() - start
        memory = resmem.get_layer("residual_memory")
        keys = memory.keys.numpy()
        variance = float(keys.var(axis=0, dtype=np.float64).sum())
        if dim is None:
            total_variance = variance
        start = time.perf_counter()
        choice = protocol.choose_methods(memory, features, x_val, y_val, grids)["resmem"]
        choose_seconds = time.perf_counter() - start
        choice.apply(memory)
        test = keras_resmem.compare(
            y_test, deepnet_test, resmem.predict(x_test, batch_size=1024, verbose=0)
        )
        name = _label(dim, memory.key_dim)
        configs[name] = {
            "dim": dim,
            "stored_key_dim": memory.stored_key_dim,
            "explained_variance": variance / total_variance,
            "settings": choice.settings,
            "val_accuracy": choice.accuracy,
            "test_accuracy": test.resmem_accuracy,
            "storage_bytes": memory.storage_bytes(),
            "keras_file_bytes": _file_bytes(resmem),
            "seconds": {"attach_memory": attach_seconds, "choose_on_validation": choose_seconds},
        }
        models[name] = resmem
        print(
            f"[seed {seed}] {name}: validation {choice.accuracy:.2%} "
            f"({', '.join(f'{k}={v:g}' for k, v in choice.settings.items())}), test "
            f"{test.resmem_accuracy:.2%}, {memory.storage_bytes()['total'] / 1e6:.1f} MB "
            f"(attached in {attach_seconds:.0f} s, chosen in {choose_seconds:.0f} s)",
            flush=True,
        )
    times = _serving_times(models, x_test, (256, 1), args.timing_rounds, args.timing_calls)
    full = next(iter(configs))  # no projection
    for name, config in configs.items():
        config["serving_seconds"] = {str(b): t for b, t in times[name].items()}
        config["vs_full"] = {
            "accuracy_points": 100 * (config["test_accuracy"] - configs[full]["test_accuracy"]),
            "bytes": config["storage_bytes"]["total"] / configs[full]["storage_bytes"]["total"],
            "keras_file_bytes": config["keras_file_bytes"] / configs[full]["keras_file_bytes"],
            **{f"time_batch_{b}": t / times[full][b] for b, t in times[name].items()},
        }
    return {
        "seed": seed,
        "training": training,
        "train_size": len(x_train),
        "val_size": len(x_val),
        "test_size": len(x_test),
        "deepnet_test_accuracy": deepnet_accuracy,
        "configs": configs,
        "seconds": time.perf_counter() - seed_start,
    }


def summary_table(runs):
    """Markdown: one row per projection, mean ± std over seeds."""
    lines = [
        "| key projection | stored dims | explained variance | test accuracy | vs 1568-d "
        "(points) | memory MB (bytes vs 1568-d) | .keras MB | time / batch 256 (vs 1568-d) "
        "| time / batch 1 (vs 1568-d) | chosen k, sigma, T |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| DeepNet (no memory) | - | - | "
        f"{protocol.pct([r['deepnet_test_accuracy'] for r in runs])} | - | - | - | - | - | - |",
    ]
    for name in runs[0]["configs"]:
        configs = [r["configs"][name] for r in runs]

        def mean(f, configs=configs):
            return float(np.mean([f(c) for c in configs]))

        settings = "; ".join(", ".join(f"{v:g}" for v in c["settings"].values()) for c in configs)
        lines.append(
            f"| {name} | {configs[0]['stored_key_dim']} "
            f"| {mean(lambda c: c['explained_variance']):.1%} "
            f"| {protocol.pct([c['test_accuracy'] for c in configs])} "
            f"| {mean(lambda c: c['vs_full']['accuracy_points']):+.2f} "
            f"| {mean(lambda c: c['storage_bytes']['total']) / 1e6:.1f} "
            f"({mean(lambda c: c['vs_full']['bytes']):.3f}) "
            f"| {mean(lambda c: c['keras_file_bytes']) / 1e6:.1f} "
            f"| {1e3 * mean(lambda c: c['serving_seconds']['256']):.1f} ms "
            f"({mean(lambda c: c['vs_full']['time_batch_256']):.3f}) "
            f"| {1e3 * mean(lambda c: c['serving_seconds']['1']):.2f} ms "
            f"({mean(lambda c: c['vs_full']['time_batch_1']):.3f}) "
            f"| {settings} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--max-epochs", type=int, default=300, help="cap; never reached")
    parser.add_argument("--patience", type=int, default=8, help="early stopping, on val loss")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--val-size", type=int, default=6000)
    parser.add_argument("--train-size", type=int, default=None, help="use a subset (smoke runs)")
    parser.add_argument("--search", default="exact", choices=["auto", "exact", "ivf", "scann"])
    parser.add_argument(
        "--dims",
        default="8,16,32,64,128,156",
        type=lambda s: [int(d) for d in s.split(",")],
        help="PCA dims compared with no projection",
    )
    parser.add_argument(
        "--ks", default="10,25,50,100", type=lambda s: [int(k) for k in s.split(",")]
    )
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--timing-calls", type=int, default=5, help="timed calls a round")
    parser.add_argument("--verbose", action="store_true", help="print every training epoch")
    parser.add_argument("--output-dir", default="results/key_projection")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]

    start = time.perf_counter()
    runs = [run_seed(args, seed) for seed in seeds]
    table = summary_table(runs)
    seconds = time.perf_counter() - start
    command = (
        f"python examples/key_projection.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    ).strip()
    run = runs[0]
    text = (
        f"# Key projection: PCA of the main job's `{LAYER}` keys\n\n`{command}`\n\n"
        f"DeepNet trained to convergence ({run['training']['epochs_run']} epochs, best "
        f"{run['training']['best_epoch']}, seed {run['seed']}); one memory entry per training "
        f"image ({run['train_size']:,}), keyed on `{LAYER}`, searched with `{args.search}`. "
        f"k, sigma, T chosen on {run['val_size']:,} validation images for each projection; "
        f"{run['test_size']:,} test images scored once. Memory bytes: the layer's variables "
        "(`storage_bytes()['total']`); time: median of compiled calls of the whole model "
        f"({args.timing_rounds} alternating rounds of {args.timing_calls} calls). Seeds "
        f"{', '.join(str(r['seed']) for r in runs)}. {seconds:.0f} s.\n\n{table}\n"
    )
    print("\n" + text)
    os.makedirs(args.output_dir, exist_ok=True)
    with _io.atomic_path(os.path.join(args.output_dir, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    results = {"command": command, "seconds": seconds, "runs": runs}
    with _io.atomic_path(os.path.join(args.output_dir, "results.json")) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
