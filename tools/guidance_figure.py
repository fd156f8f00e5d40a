"""Guidance curves: accuracy and cross-entropy of class-conditional samples against w.

Builds a 2-D labelled mixture (3 overlapping classes, 2 components each), trains a
class-conditional MLP with label dropout (``losses.cfm(..., num_classes=3, p_uncond=0.2)``),
and scores the exact conditional field and the learned one with classifier-free guidance at
several weights w by ``fmjax.evaluate_conditional``. Writes docs/guidance.png and prints the
table. Run: ``python tools/guidance_figure.py [--steps N] [--out PATH]``.
"""

import argparse
import functools
import math

import jax
import numpy as np

import fmjax
from fmjax import conditional, exact, losses, models, schedules

WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def labelled_problem() -> fmjax.JointGaussianMixture:
    """3 overlapping classes on a ring of radius 2.5, two components (std 0.8) each."""
    angles = np.arange(6) * 2 * math.pi / 6
    means = 2.5 * np.stack([np.cos(angles), np.sin(angles)], -1)
    covs = np.stack([0.8**2 * np.eye(2)] * 6)
    target = fmjax.GaussianMixture(
        np.full(6, 1 / 6), means, covs, labels=np.array([0, 1, 2, 0, 1, 2])
    )
    return fmjax.independent_coupling(fmjax.standard_normal(2), target)


def make_model() -> models.MLP:
    """The class-conditional MLP of the figure (label 3: the null class)."""
    return models.MLP(dim=2, width=128, depth=3, num_classes=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--out", default="docs/guidance.png")
    args = parser.parse_args()
    coupling, schedule = labelled_problem(), schedules.linear()
    model = make_model()
    params = models.init(model, key=jax.random.PRNGKey(0), dim=2)
    loss = losses.cfm(
        model.apply,
        conditional.labelled_pairs(coupling),
        schedule,
        512,
        num_classes=3,
        p_uncond=0.2,
    )
    fit = fmjax.fit(loss, params, key=jax.random.PRNGKey(1), steps=args.steps, progress=False)
    fields = {
        "exact": conditional.velocity_field(exact.prepare(coupling), schedule),
        "learned (MLP, CFG)": functools.partial(model.apply, fit.params),
    }
    rows = {}
    for name, field in fields.items():
        reports = [
            fmjax.evaluate_conditional(
                field, coupling, schedule, key=jax.random.PRNGKey(2), weight=w, n=args.n, null=3
            )
            for w in WEIGHTS
        ]
        rows[name] = reports
        for r in reports:
            print(
                f"{name:20s} w={r.weight:3.1f} accuracy {r.mean_accuracy:.3f} "
                f"(Bayes {r.mean_bayes_accuracy:.3f})  CE-H {r.mean_cross_entropy_gap:+.3f} "
                f"nats  rel. velocity error {r.relative_velocity_error:.4f}"
            )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for (name, reports), style in zip(rows.items(), ("-o", "--s"), strict=True):
        acc = [r.mean_accuracy for r in reports]
        gap = [r.mean_cross_entropy_gap for r in reports]
        ax1.plot(WEIGHTS, acc, style, label=name)
        ax2.plot(WEIGHTS, gap, style, label=name)
    bayes = rows["exact"][0].mean_bayes_accuracy
    ax1.axhline(bayes, color="gray", lw=0.8, ls=":", label="Bayes accuracy of p1(x|y)")
    ax2.axhline(0.0, color="gray", lw=0.8, ls=":", label="entropy H(p1(x|y))")
    ax1.set(
        xlabel="guidance weight w",
        ylabel="exact Bayes-classifier accuracy",
        title="class accuracy of samples",
    )
    ax2.set(
        xlabel="guidance weight w",
        ylabel="cross-entropy - entropy (nats)",
        title="-E log p1(X|y) - H(p1(.|y))",
    )
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    main()
