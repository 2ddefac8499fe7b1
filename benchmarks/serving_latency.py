"""Serving overhead of ResMem: its SavedModels against the base model's own SavedModel.

Attaches a 60,000-entry memory (the Fashion-MNIST training set, keyed on the
CNN's 32-d `pre_logits` layer, k=50) to the main job's CNN, exports the base
model and the ResMem model (portable exact, portable IVF, ScaNN), and times each
SavedModel in a new process, loaded with TensorFlow's session loader (the path
TensorFlow Serving's C++ server mirrors). Reports the first request (where a
ScaNN index is built, once) and the median latency at batch 1 and batch 256 of
later requests, and the ResMem / base ratios. Writes
`results/benchmarks/serving_latency.{json,md}`.

    python benchmarks/serving_latency.py          # ~3 minutes on 2 CPU cores
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from embeddings import ROOT, fashion_mnist_embeddings

import keras_resmem
from keras_resmem import _io
from keras_resmem.datasets import load_fashion_mnist

TIMER = """
import json, sys, time
for name in ("keras", "keras_resmem", "tf_keras"):
    sys.modules[name] = None  # the server process has neither
import numpy as np
import tensorflow as tf
path, images, scann, repeats_1, repeats_256 = sys.argv[1:6]
if scann == "1":
    from scann.scann_ops.py import scann_ops  # noqa: F401  (registers the ops)
x = np.load(images)
with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
    sig = meta.signature_def["serving_default"]
    (name,) = sig.inputs
    feed = sig.inputs[name].name
    fetches = [info.name for info in sig.outputs.values()]

    def timed(batch):
        start = time.perf_counter()
        sess.run(fetches, {feed: batch})
        return 1000 * (time.perf_counter() - start)

    first = timed(x[:1])
    out = {"first_request_ms": first}
    for batch, repeats in ((1, int(repeats_1)), (256, int(repeats_256))):
        timed(x[:batch])
        times = [timed(x[(i * batch) % 9000 :][:batch]) for i in range(repeats)]
        out[f"batch_{batch}_ms"] = float(np.median(times))
        out[f"batch_{batch}_p90_ms"] = float(np.percentile(times, 90))
print("RESULT", json.dumps(out))
"""


def time_saved_model(path, images, scann, repeats_1, repeats_256):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    args = [str(a) for a in (path, images, int(scann), repeats_1, repeats_256)]
    result = subprocess.run(
        [sys.executable, "-c", TIMER, *args], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(result.stdout.split("RESULT")[-1])


def export_base(model, path):
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = [keras.InputSpec(shape=(None, *model.inputs[0].shape[1:]), dtype="float32")]
    archive.add_endpoint("serving_default", lambda x: {"scores": model(x)}, input_signature=spec)
    archive.write_out(path, verbose=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="pre_logits")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats-1", type=int, default=300)
    parser.add_argument("--repeats-256", type=int, default=40)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)

    *_, base = fashion_mnist_embeddings(copies=17)
    (x_train, y_train), (x_test, _) = load_fashion_mnist()
    x_train = (x_train.astype("float32") / 255.0)[..., None]
    x_test = (x_test.astype("float32") / 255.0)[..., None]
    work = tempfile.mkdtemp(prefix="serving-")
    images = os.path.join(work, "images.npy")
    np.save(images, x_test)

    export_base(base, os.path.join(work, "base"))
    variants = {"base": (os.path.join(work, "base"), False)}
    for search, mode in (("exact", "portable"), ("ivf", "portable"), ("scann", "scann")):
        model = keras_resmem.attach_memory(
            base,
            args.layer,
            (x_train, y_train.astype("int32")),
            k=args.k,
            search=search,
            verbose=0,
        )
        path = keras_resmem.export_saved_model(model, os.path.join(work, search), mode=mode)
        variants[f"resmem_{search}"] = (path, mode == "scann")

    results = {}
    for name, (path, scann) in variants.items():
        results[name] = time_saved_model(path, images, scann, args.repeats_1, args.repeats_256)
        print(name, results[name])
    base_row = results["base"]
    for row in results.values():
        row["ratio_batch_1"] = row["batch_1_ms"] / base_row["batch_1_ms"]
        row["ratio_batch_256"] = row["batch_256_ms"] / base_row["batch_256_ms"]
        row["added_batch_1_ms"] = row["batch_1_ms"] - base_row["batch_1_ms"]
    summary = {
        "memory_size": len(x_train),
        "key_layer": args.layer,
        "k": args.k,
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    _io.write_text(
        os.path.join(args.output_dir, "serving_latency.json"), json.dumps(summary, indent=2)
    )
    lines = [
        f"# Serving latency: {len(x_train):,}-entry memory, key `{args.layer}`, k={args.k}",
        "",
        "Median of later requests, each SavedModel in a new process (TF1 session loader).",
        "",
        "| SavedModel | first request ms | batch 1 ms | added at batch 1 | batch 256 ms "
        "| ratio batch 1 | ratio batch 256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['first_request_ms']:.1f} | {r['batch_1_ms']:.2f} | "
            f"{r['added_batch_1_ms']:+.2f} ms | {r['batch_256_ms']:.1f} | "
            f"{r['ratio_batch_1']:.2f}x | {r['ratio_batch_256']:.2f}x |"
        )
    _io.write_text(os.path.join(args.output_dir, "serving_latency.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
