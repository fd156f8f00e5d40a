"""Generate the experiment notebooks (without outputs) from the cell sources below.

    python notebooks/_build.py          # rewrite notebooks/*.ipynb
    python notebooks/_build.py --check  # exit 1 if a committed notebook differs

Each notebook calls one function of ``fmjax.experiments``; the heavy lifting, the numbers and the
figures live there, so the notebooks stay short and in sync with the CLI. ``FMJAX_QUICK=1`` in the
environment selects the small CI configuration.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
REPO_URL = "https://github.com/<org>/fmjax"  # placeholder: the repository's GitHub address

SETUP = f"""\
# Setup. In Colab this installs fmjax from GitHub (replace <org> in the URL with the owner);
# elsewhere install it first: `pip install -e .` in a checkout.
import importlib.util
import subprocess
import sys

if "google.colab" in sys.modules and importlib.util.find_spec("fmjax") is None:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "git+{REPO_URL}"], check=True)

import jax
from IPython.display import Image, display

from fmjax import experiments

print("JAX", jax.__version__, "| backend:", jax.default_backend(), "| devices:", jax.devices())
if jax.default_backend() == "cpu":
    print("No GPU/TPU found: running on the CPU (in Colab: Runtime > Change runtime type).")
QUICK = experiments.quick_from_env()  # FMJAX_QUICK=1: small CI settings
print("QUICK =", QUICK)"""


class _Md(str):
    """A markdown cell's source (plain ``str`` items are code cells)."""


def _show(*names: str) -> str:
    return "\n".join(f'display(Image(result.figures["{n}"]))' for n in names)


NOTEBOOKS = {
    "01_gmm_to_gmm.ipynb": [
        _Md(
            "# 1. Gaussian mixture to Gaussian mixture\n\n"
            "When the pair (X0, X1) is a Gaussian mixture on R^{2d}, the interpolant "
            "x_t = b_t x0 + a_t x1 has a closed-form density p_t, velocity u_t and posterior "
            "component probabilities (responsibilities). Here two couplings with the **same "
            "marginals** (3 source and 3 target components in 2-D) are compared: the independent "
            "coupling p0 x p1 and a joint coupling whose components pair source k with target k "
            "with correlation 0.9 (cross-covariance). Then: exact ODE trajectories under the "
            "linear, cosine and VP schedules; a small network trained by conditional flow "
            "matching, with its velocity error against the exact field over t; and a 1-D "
            "problem, 2 modes (+-3) -> 3 modes (-6, 0, 6)."
        ),
        SETUP,
        'result = experiments.gmm_to_gmm(quick=QUICK, out="outputs/01_gmm_to_gmm")\n'
        'print(f"{result.wall_time_s:.1f} s")',
        _Md(
            "## Exact velocity and responsibilities\n\n"
            "Colour: log p_t (shared scale); arrows: u_t. With the joint coupling each source "
            "component travels to its partner, so the field is simpler than the independent one, "
            "which splits every source component among all targets."
        ),
        _show(
            "velocity_independent",
            "velocity_joint",
            "responsibilities_independent",
            "responsibilities_joint",
        ),
        _Md(
            "## Exact ODE trajectories and solver effort\n\n"
            "Adaptive Tsit5 (rtol = atol = 1e-5) on the exact field, over each schedule's valid "
            "interval (`schedule.interval`): the VP schedule has db_t -> -inf at t = 1, so its "
            "interval ends at 1 - 1e-3. Linear and cosine schedules "
            "give the same endpoint map here (for x_t = b x0 + a x1 the marginals of "
            "x_t / (a_t + b_t) depend on t only through a_t / b_t: a time change), so their sample "
            "energies agree."
        ),
        _show("trajectories"),
        "m = result.metrics\n"
        'print("NFE:", m["nfe"])\n'
        'print("energy distance, exact ODE vs exact target samples:", m["energy_exact_ode"])\n'
        'print("(two exact target samples:", round(m["energy_between_target_samples"], 4), ")")',
        _Md(
            "## Learned vs exact velocity\n\n"
            "E|v_t(X_t) - u_t(X_t)|^2 over X_t ~ p_t for the trained network and for the zero "
            "field (the scale of u_t)."
        ),
        _show("velocity_error"),
        'print("learned:", m["velocity_error"], "| zero field:", m["zero_field_error"])',
        _Md(
            "## 1-D: 2 modes -> 3 modes\n\n"
            "Exact density p_t(x) over (t, x) with exact ODE paths. Paths never cross, so each "
            "source mode splits its mass in order between neighbouring target modes."
        ),
        _show("density_1d"),
        'print("fraction of paths ending at each mode:", m["mode_fractions_1d"])\n'
        'print("target weights:", m["mode_weights_1d"])',
    ],
    "02_ot_vs_vp.ipynb": [
        _Md(
            "# 2. Conditional-OT path vs VP-diffusion path\n\n"
            "Lipman et al. (2023) compare the conditional optimal-transport path "
            "x_t = (1 - t) x0 + t x1 with the variance-preserving diffusion path "
            "x_t = alpha_{1-t} x1 + sqrt(1 - alpha_{1-t}^2) x0. The same MLP is trained on both by "
            "conditional flow matching on the checkerboard and on two moons. The OT path moves "
            "samples along nearly straight lines and needs fewer velocity evaluations (NFE) of an "
            "adaptive solver (Tsit5, rtol = atol = 1e-5). VP has db_t -> -inf at t = 1: its valid "
            "interval (`schedule.interval`) ends at 1 - 1e-3, where training times and the "
            "integration stop."
        ),
        SETUP,
        'result = experiments.ot_vs_vp(quick=QUICK, out="outputs/02_ot_vs_vp")\n'
        'print(f"{result.wall_time_s:.1f} s")',
        _Md(
            "## Samples along the path (top: OT, bottom: VP)\n\n"
            "The VP samples stay close to noise much longer and form the data only at the very end."
        ),
        _show("samples_checkerboard", "samples_moons"),
        _Md("## Trajectories and NFE"),
        _show("trajectories_checkerboard", "trajectories_moons"),
        "m = result.metrics\n"
        'print("NFE (learned):", m["nfe"])\n'
        'print("NFE, exact 8-Gaussians velocity (no training):", m["nfe_exact_8gaussians"])\n'
        'print("energy distance to data:", m["energy"])',
    ],
    "03_flows_and_scores.ipynb": [
        _Md(
            "# 3. Flows and scores\n\n"
            "After the *Matching Flows and Scores* notes: a 2-mode Gaussian mixture in R^3 (means "
            "(-1, -0.5, 1.5) and (1, 1.5, 0.25), per-axis std (0.25, 0.25, 0.15)), a velocity MLP "
            "with Fourier time features trained by CFM on the linear path from N(0, I). The same "
            "velocity gives two samplers: the ODE (RK4) and, with the score recovered from the "
            "velocity, s_t(x) = (t u_t(x) - x) / (1 - t), the SDE "
            "dX = [u + g^2/2 s] dt + g dW (Euler-Maruyama), which has the same marginals. Along "
            "each path we follow the predicted target "
            "x_hat_1 = E[X1 | x_t] = x_t + (1 - t) u_t(x_t) (`fmjax.convert.velocity_to_x1`)."
        ),
        SETUP,
        'result = experiments.flows_and_scores(quick=QUICK, out="outputs/03_flows_and_scores")\n'
        'print(f"{result.wall_time_s:.1f} s")',
        _Md(
            "## The predicted target along the path\n\n"
            "Early on x_hat_1 is the mean of the target; it splits into the two modes around the "
            "middle of the path."
        ),
        _show("x1_histograms"),
        _Md(
            "## When does x_hat_1 settle on the modes?\n\n"
            "Fraction of x_hat_1 within 3 std (every axis) of a mode; the settling time is the "
            "first t where it passes 95 %. Dashed: the same with the exact velocity."
        ),
        _show("settling"),
        "m = result.metrics\n"
        'print("settling time:", m["settle_time"])\n'
        'print("energy distance to target samples:", m["energy"])\n'
        'print("(two exact target samples:", round(m["energy_between_target_samples"], 4), ")")',
        _show("samples"),
    ],
    "04_cfm_equals_fm.ipynb": [
        _Md(
            "# 4. Conditional flow matching has the gradients of flow matching\n\n"
            "The conditional loss E|v(t, x_t) - (x1 - x0)|^2 and the marginal loss "
            "E|v(t, x_t) - u_t(x_t)|^2 differ by a constant (the loss floor), so their gradients "
            "have the same expectation (Lipman et al., 2023). With a Gaussian-mixture problem the "
            "marginal target u_t is exact, so both can be computed. For each batch size B we "
            "compare CFM and FM minibatch gradients with a large-batch reference gradient by "
            "cosine similarity: both tend to 1; FM gets there with smaller batches because its "
            "target has no conditional noise."
        ),
        SETUP,
        'result = experiments.cfm_equals_fm(quick=QUICK, out="outputs/04_cfm_equals_fm")\n'
        'print(f"{result.wall_time_s:.1f} s")',
        _show("gradient_cosine"),
        "m = result.metrics\n"
        'for b, c, f in zip(m["batch_sizes"], m["cosine_cfm"], m["cosine_fm"], strict=True):\n'
        '    print(f"B = {b:6d}   CFM {c:.3f}   FM {f:.3f}")\n'
        'print("CFM vs FM on the reference batch size:", round(m["cosine_large_batch"], 4))',
    ],
    "06_stochastic_interpolants.ipynb": [
        _Md(
            "# 6. Stochastic interpolants: ODE and SDE from any source\n\n"
            "The stochastic interpolant x_t = b_t x0 + a_t x1 + gamma_t z (Albergo, Boffi & "
            "Vanden-Eijnden) adds latent noise gamma_t z, z ~ N(0, I), with gamma_0 = gamma_1 = 0. "
            "For Gaussian-mixture couplings everything stays exact: p_t gains gamma^2 I per "
            "component. Sampling by the probability-flow ODE dx = u dt, or by the SDE "
            "dX = [u + eps s] dt + sqrt(2 eps) dW for any eps >= 0 with the score s given "
            "explicitly, works from any source. Two upstream problems: 2-D, one Gaussian -> "
            "three components; 1-D, modes +-3 -> modes -6, 0, 6; linear and trig interpolants "
            "with gamma = 0 and gamma = brownian. A drift MLP (the gamma = 0 part of the "
            "velocity) and a score MLP (the denoiser eta = -gamma * net) are learned by "
            "regression and combined as u = v - gamma dgamma s, finite at t = 0 and 1."
        ),
        SETUP,
        "result = experiments.stochastic_interpolants("
        'quick=QUICK, out="outputs/06_stochastic_interpolants")\n'
        'print(f"{result.wall_time_s:.1f} s")',
        _Md(
            "## The exact density over time (1-D)\n\n"
            "Without noise the modes move on straight lines and split; with brownian noise the "
            "path is blurred in the middle (gamma_t^2 = t (1 - t) added to every variance)."
        ),
        _show("density_1d"),
        _Md(
            "## Samples at t = 1\n\n"
            "ODE (RK4) and SDE (Euler-Maruyama) with the exact velocity and score, and with the "
            "learned drift + score, against the exact target density (black)."
        ),
        _show("samples_2d", "samples_1d"),
        _Md("## Learned fields against the exact ones over t"),
        _show("errors"),
        _Md(
            "## Energy distance to exact target samples\n\n"
            "Lower is better; the Monte Carlo floor is the distance between two exact samples."
        ),
        "print(experiments.si_table(result))",
    ],
    "07_couplings.ipynb": [
        _Md(
            "# 7. Couplings: how straight is a coupling, and what does OT-CFM learn?\n\n"
            "Flow matching transports p0 to p1 along x_t = (1 - t) x0 + t x1 for pairs (x0, x1) "
            "drawn from a coupling. `fmjax.couplings` builds couplings whose exact velocity is "
            "closed form: the independent coupling p0 x p1, the mixture-Wasserstein coupling "
            "`mixture_ot` (Delon & Desolneux: an exact discrete OT plan between components, each "
            "pair joined by its Gaussian OT map) and Schrodinger bridges (`schrodinger_bridge`: "
            "entropic OT per component pair, Brownian-bridge noise sigma sqrt(t (1 - t)) z on the "
            "path). For each we compare the kinetic energy of the exact field, "
            "int E|u_t(X_t)|^2 dt, with the coupling's transport cost E|X1 - X0|^2 (equal only "
            "when paths do not cross), the fixed-step error against the number of function "
            "evaluations, and the trajectories. Then minibatch OT-CFM (exact OT within each batch) "
            "is trained at several batch sizes and compared with the exact `mixture_ot` field."
        ),
        SETUP,
        'result = experiments.EXPERIMENTS["couplings"](quick=QUICK, out="outputs/07_couplings")\n'
        'print(f"{result.wall_time_s:.1f} s")',
        _Md(
            "## Kinetic energy vs transport cost\n\n"
            "For a deterministic path, int E|u_t|^2 dt <= E|X1 - X0|^2 (Jensen: u_t averages the "
            "pair velocities x1 - x0 that pass through x), and it is >= W2^2(p0, p1) for every "
            "field that transports p0 to p1 (Benamou-Brenier). The gap is how much the paths "
            "cross."
        ),
        _show("kinetic_energy"),
        "m = result.metrics\n"
        'for prob, per in m["straightness"].items():\n'
        "    for name, r in per.items():\n"
        '        k, c = r["kinetic_energy"], r["transport_cost"]\n'
        '        print(f"{prob:16s} {name:12s} kinetic {k:8.3f}   cost {c:8.3f}")',
        _Md(
            "## Solver effort\n\n"
            "RMSE of fixed-step Euler (solid) and midpoint (dashed) end points against an accurate "
            "solve from the same starting points."
        ),
        _show("nfe", "trajectories"),
        _Md(
            "## What minibatch OT-CFM learns\n\n"
            "Left: E|v_t - u_t|^2 of the learned OT-CFM field against the exact `mixture_ot` "
            "velocity (dotted: the exact independent field's distance to it). Right: the cost of "
            "minibatch-OT pairs against MW2^2 (dashed) and a large-batch OT cost (dotted, an "
            "estimate of W2^2 between the mixtures). Minibatch OT approaches the OT between the "
            "mixtures, whose cost is below MW2^2: it does not converge to `mixture_ot`."
        ),
        _show("ot_cfm"),
        'for prob, r in m["ot_cfm"].items():\n'
        '    mw2, big = r["mixture_ot_cost"], r["large_batch_pair_cost"]\n'
        '    print(prob, f"MW2^2 {mw2:.3f}   large-batch OT {big:.3f}")\n'
        '    rows = zip(r["batch_sizes"], r["velocity_error"], r["pair_cost"], strict=True)\n'
        "    for b, e, c in rows:\n"
        '        print(f"  B = {b:5d}   error vs mixture_ot {e:.3f}   pair cost {c:.3f}")',
    ],
    "05_digits.ipynb": [
        _Md(
            "# 5. Digits: an MLP and a UNet, and a 64-D exact ground truth\n\n"
            "scikit-learn ships 1,797 handwritten digits of 8x8 pixels (`fmjax.data.digits`, no "
            "download; `pip install 'fmjax[images]'`). An MLP and a small UNet "
            "(`fmjax.models.UNet`, which takes flat points (n, 64) and reshapes them to images "
            "inside, so `fit`, `sample` and `likelihood` are unchanged) are trained by "
            "conditional flow matching from N(0, I). Then the same two networks are trained on "
            "samples of a 20-component Gaussian mixture fitted to the digits "
            "(`fmjax.problems.get('digits_gmm')`), whose velocity, loss floor and density are "
            "known exactly, and scored by `fmjax.evaluate`."
        ),
        SETUP,
        'result = experiments.digits(quick=QUICK, out="outputs/05_digits")\n'
        'print(f"{result.wall_time_s:.1f} s", result.metrics["time_s"])',
        _Md(
            "## Samples at several NFE, and over t\n\n"
            "Fixed-step midpoint with 2, 4, 8 ... evaluations, and an adaptive Tsit5 solve, from "
            "the same source points (quick setting: NFE 2 and 8, no adaptive solve); then one "
            "row per time along the ODE of the last solver."
        ),
        _show("samples_nfe", "samples_over_t"),
        _Md(
            "## Memorisation check and sample quality\n\n"
            "Each sample next to its nearest training image (L2). A logistic-regression digits "
            "classifier trained in the same run scores the samples: class histogram (near "
            "uniform when every digit is produced), mean confidence, and the Frechet distance "
            "between real and generated images in the space of its 10 logits. Bits per "
            "dimension: -log2 density of dequantised test digits / 64 + 3 (grey levels 1/8 "
            "apart); 4.09 is a uniform guess over the 17 levels."
        ),
        _show("nearest"),
        "m = result.metrics\n"
        'real = m["images"]["real"]\n'
        'acc, conf = real["classifier_test_accuracy"], real["quality"]["mean_confidence"]\n'
        'print(f"real test digits: classifier accuracy {acc:.3f}, confidence {conf:.3f}")\n'
        'for name in ("MLP", "UNet"):\n'
        '    mm = m["images"][name]\n'
        '    bpd, near = mm["bits_per_dim"], mm["nearest_train_distance"]\n'
        '    print(f"{name}: bits/dim {bpd:.3f}, nearest-train distance {near:.2f}")\n'
        '    for sampler, q in mm["quality"].items():\n'
        '        conf, fd = q["mean_confidence"], q["frechet_logits"]\n'
        '        print(f"   {sampler:>22s}: confidence {conf:.3f}, Frechet {fd:.2f}")\n'
        'print("test digits: nearest-train distance", round(real["nearest_train_distance"], 2))',
        _Md(
            "## The 64-D digits GMM: learned against exact\n\n"
            "Velocity error over t against the exact field, excess CFM loss over the exact "
            "floor, the NLL gap to the exact log-density, the energy distance to exact samples "
            "and the NFE a midpoint solver needs, for the exact field itself (a check: ~0; "
            "not in the quick setting), the MLP and the UNet."
        ),
        _show("gmm_velocity_error", "gmm_samples"),
        'cols = ("relative_velocity_error", "excess_loss", "nll_gap", "energy", '
        '"nfe_to_accuracy")\n'
        'for name, r in m["gmm64"].items():\n'
        '    print(f"{name:>6s}: " + ", ".join(f"{c} {r[c]}" for c in cols))',
    ],
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` (no outputs, Python 3 kernel metadata)."""
    cells = []
    for src in NOTEBOOKS[name]:
        cells.append(new_markdown_cell(str(src)) if isinstance(src, _Md) else new_code_cell(src))
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"provenance": []}
    # Stable cell ids, so regenerating does not change unchanged notebooks.
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in NOTEBOOKS:
        text = nbformat.writes(build(name)) + "\n"
        path = HERE / name
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale notebooks (run python notebooks/_build.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
