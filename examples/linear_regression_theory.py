"""The paper's theory (Section 5, Theorem 5.3): ResMem on norm-constrained linear regression.

x is uniform in the ball of radius sqrt(d + 2) in R^d (so E[x x^T] = I), and
y = <x, theta*> with ||theta*|| = 1. The base model is least squares restricted
to ||theta|| <= L < 1, so it can never fit y: its test risk plateaus near
(1 - L)^2. ResMem adds the residual of the 1 nearest training example (a
`keras_resmem.ResidualMemory` with task="regression", k=1); plain 1-NN predicts
the nearest training label. For each d and n the script measures the test risk
E[(f(x) - y)^2] of the three, averaged over seeds. It fits log-log slopes over
n >= 1,000 and prints them next to the theorem's rates. Writes
`results/linear_regression_theory/{results.md,results.json,risk_vs_n.png}`.

    python examples/linear_regression_theory.py      # ~1 minute on 2 CPU cores
"""

import argparse
import json
import os
import sys

import numpy as np

import keras_resmem
from keras_resmem import _io


def sample_ball(n, d, rng):
    """n points uniform in the ball of radius sqrt(d + 2): E[x x^T] = I."""
    directions = rng.normal(size=(n, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = np.sqrt(d + 2) * rng.random(n) ** (1.0 / d)
    return (directions * radii[:, None]).astype(np.float32)


def constrained_least_squares(x, y, norm_bound):
    """argmin ||X theta - y||^2 subject to ||theta|| <= norm_bound (ridge path + bisection)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    eigenvalues, vectors = np.linalg.eigh(x.T @ x)
    projected = vectors.T @ (x.T @ y)

    def theta(lam):
        return vectors @ (projected / (eigenvalues + lam))

    if np.linalg.norm(theta(1e-12)) <= norm_bound:
        return theta(1e-12)
    lo, hi = 0.0, 1.0
    while np.linalg.norm(theta(hi)) > norm_bound:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.linalg.norm(theta(mid)) > norm_bound else (lo, mid)
    return theta(hi)


def one_nn_prediction(x_train, f_train, y_train, x_test, f_test):
    """f(x) + (y - f)(nearest training x), through keras_resmem's regression memory."""
    memory = keras_resmem.ResidualMemory(k=1, task="regression", search="exact")
    memory.memorize(x_train, f_train[:, None], y_train[:, None])
    return memory([x_test, f_test[:, None].astype(np.float32)]).numpy()[:, 0]


def risks(n, d, norm_bound, test_size, seed):
    rng = np.random.default_rng(seed)
    theta_star = np.zeros(d)
    theta_star[0] = 1.0
    x_train, x_test = sample_ball(n, d, rng), sample_ball(test_size, d, rng)
    y_train, y_test = x_train @ theta_star, x_test @ theta_star
    theta = constrained_least_squares(x_train, y_train, norm_bound)
    f_train, f_test = x_train @ theta, x_test @ theta
    resmem = one_nn_prediction(x_train, f_train, y_train, x_test, f_test)
    nn_labels = one_nn_prediction(x_train, 0 * f_train, y_train, x_test, 0 * f_test)
    mse = lambda p: float(np.mean((p - y_test) ** 2))  # noqa: E731
    return {"base": mse(f_test), "resmem": mse(resmem), "nn_labels": mse(nn_labels)}


def slope(ns, values):
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="2,4,8")
    parser.add_argument("--ns", default="100,300,1000,3000,10000,30000,100000")
    parser.add_argument("--norm-bound", type=float, default=0.5, help="L < 1")
    parser.add_argument("--test-size", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fit-from", type=int, default=1000, help="fit slopes for n >= this")
    parser.add_argument("--output-dir", default="results/linear_regression_theory")
    args = parser.parse_args(argv)
    if not 0 < args.norm_bound < 1:
        parser.error(f"--norm-bound must lie in (0, 1). Received: {args.norm_bound}")
    dims = [int(v) for v in args.dims.split(",")]
    ns = [int(v) for v in args.ns.split(",")]
    models = ("base", "resmem", "nn_labels")

    table = {}
    for d in dims:
        for n in ns:
            runs = [risks(n, d, args.norm_bound, args.test_size, s) for s in range(args.seeds)]
            table[(d, n)] = {m: float(np.mean([r[m] for r in runs])) for m in models}
            print(f"d={d} n={n:>7,}: " + ", ".join(f"{m} {v:.4g}" for m, v in table[d, n].items()))

    fit_ns = [n for n in ns if n >= args.fit_from]
    slopes = {d: {m: slope(fit_ns, [table[d, n][m] for n in fit_ns]) for m in models} for d in dims}
    lines = [
        "# ResMem on norm-constrained linear regression (Theorem 5.3)",
        "",
        f"`python examples/linear_regression_theory.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"L = {args.norm_bound}, {args.test_size:,} test points, mean of {args.seeds} seeds. "
        f"Test risk E[(f(x) - y)^2]; the base model's limit is (1 - L)^2 = "
        f"{(1 - args.norm_bound) ** 2:.3f}.",
        "",
        "| d | n | base | ResMem | 1-NN on labels | ResMem / 1-NN |",
        "|---|---|---|---|---|---|",
    ]
    for (d, n), r in table.items():
        lines.append(
            f"| {d} | {n:,} | {r['base']:.4g} | {r['resmem']:.4g} | {r['nn_labels']:.4g} | "
            f"{r['resmem'] / r['nn_labels']:.3f} |"
        )
    lines += [
        "",
        f"Log-log slopes of the risk against n, fitted for n >= {args.fit_from:,}, next to the "
        "exponents of the theorem's bounds (base: a constant; ResMem: "
        "d^2 L^2 n^(-2/3) + d^2 (1-L)^2 [log(n^(1/d)) / n]^(1/d), so -min(2/3, 1/d) up to logs; "
        "1-NN on labels: n^(-1/d)):",
        "",
        "| d | base slope | ResMem slope | 1-NN slope | bound: base | bound: ResMem | "
        "bound: 1-NN |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in dims:
        s = slopes[d]
        lines.append(
            f"| {d} | {s['base']:+.3f} | {s['resmem']:+.3f} | {s['nn_labels']:+.3f} | 0 | "
            f"{-min(2 / 3, 1 / d):+.3f} | {-1 / d:+.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    results = {
        "norm_bound": args.norm_bound,
        "test_size": args.test_size,
        "seeds": args.seeds,
        "risks": [{"d": d, "n": n, **r} for (d, n), r in table.items()],
        "slopes": {str(d): s for d, s in slopes.items()},
    }
    _io.write_text(os.path.join(args.output_dir, "results.md"), text)
    _io.write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2))
    plot(table, dims, ns, slopes, args, os.path.join(args.output_dir, "risk_vs_n.png"))
    return results


def plot(table, dims, ns, slopes, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"base": "base (||theta|| <= L)", "resmem": "ResMem (1-NN residual)"}
    names["nn_labels"] = "1-NN on labels"
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), squeeze=False)
    for ax, d in zip(axes[0], dims, strict=True):
        for m, style in (("base", "s-"), ("resmem", "o-"), ("nn_labels", "^-")):
            label = f"{names[m]}, slope {slopes[d][m]:+.2f}"
            ax.plot(ns, [table[d, n][m] for n in ns], style, label=label)
        anchor = table[d, ns[0]]["resmem"]
        ax.plot(ns, [anchor * (n / ns[0]) ** (-1 / d) for n in ns], "k--", lw=0.8)
        ax.annotate(f"n^(-1/{d})", (ns[-1], anchor * (ns[-1] / ns[0]) ** (-1 / d)), fontsize=7)
        ax.axhline((1 - args.norm_bound) ** 2, color="gray", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="n (training examples)", title=f"d = {d}")
        ax.set_ylabel("test risk")
        ax.legend(fontsize=7)
    fig.suptitle(f"Theorem 5.3: L = {args.norm_bound}, mean of {args.seeds} seeds")
    fig.tight_layout()
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
