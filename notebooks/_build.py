"""Generate the experiment notebooks (without outputs) from the cell sources below.

    python notebooks/_build.py          # rewrite notebooks/*.ipynb
    python notebooks/_build.py --check  # exit 1 if a committed notebook differs

``00_quickstart`` teaches the API step by step; each other notebook calls one function of
``fmjax.experiments`` (the heavy lifting, the numbers and the figures live there, so the notebooks
stay short and in sync with the CLI) and shows the key API calls behind it. ``FMJAX_QUICK=1`` in the
environment selects the small CI configuration.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

# The install cell: fmjax from a source the user sets (no package index has it yet).
INSTALL = """\
# Setup: fmjax must be importable. Where it is not installed (e.g. in Colab), set FMJAX_SOURCE to
# where pip should get it: a wheel you built with `make wheel` in a checkout and uploaded to this
# session (found automatically as fmjax-*.whl in the working folder), a wheel's URL, or a
# repository URL such as "git+https://github.com/OWNER/fmjax". Locally: `pip install -e .`.
import glob
import importlib.util
import os
import subprocess
import sys

FMJAX_SOURCE = ""

if importlib.util.find_spec("fmjax") is None:
    source = FMJAX_SOURCE or os.environ.get("FMJAX_SOURCE", "")
    source = source or next(iter(sorted(glob.glob("fmjax-*.whl"))), "")
    if not source:
        raise SystemExit(
            "fmjax is not installed: set FMJAX_SOURCE in the first cell to an uploaded wheel "
            "(make wheel; upload dist/fmjax-*.whl) or to a repository URL "
            "(git+https://github.com/OWNER/fmjax), then run it again."
        )
    local = os.path.exists(source)
    requirement = f"{source}[all]" if local else f"fmjax[all] @ {source}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True)"""

DEVICES = """\
print("JAX", jax.__version__, "| backend:", jax.default_backend(), "| devices:", jax.devices())
if jax.default_backend() == "cpu":
    print("No GPU/TPU found: running on the CPU (in Colab: Runtime > Change runtime type).")"""

# The experiment notebooks' setup: the install cell, then imports and the device report.
SETUP = (
    INSTALL,
    "import jax\n"
    "from IPython.display import Image, display\n\n"
    "from fmjax import experiments\n\n" + DEVICES + "\n"
    "QUICK = experiments.quick_from_env()  # FMJAX_QUICK=1: small CI settings\n"
    'print("QUICK =", QUICK)',
)


class _Md(str):
    """A markdown cell's source (plain ``str`` items are code cells)."""


def _api(module: str, *calls: str) -> _Md:
    """A markdown cell listing the key API calls of the experiment in ``module``."""
    items = "\n".join(f"- {c}" for c in calls)
    head = f"**The API calls behind this experiment** (`fmjax/experiments/{module}.py`):"
    return _Md(f"{head}\n\n{items}")


def _show(*names: str) -> str:
    return "\n".join(f'display(Image(result.figures["{n}"]))' for n in names)


NOTEBOOKS = {
    "00_quickstart.ipynb": [
        _Md(
            "# 0. Quick start: the API step by step\n\n"
            "A 2-D problem whose answers are known exactly: N(0, I) to a mixture of eight "
            "Gaussians on the linear path x_t = (1 - t) x0 + t x1. We compute the exact "
            "velocity field, train a small network by conditional flow matching, sample from "
            "it, compute log-likelihoods, and score it against the exact answers with "
            "`fmjax.evaluate`. With `FMJAX_QUICK=1` (CI) the training is short."
        ),
        INSTALL,
        "%matplotlib inline\n"
        "import functools\n\n"
        "import jax\n"
        "import jax.numpy as jnp\n\n"
        "import fmjax\n"
        "import fmjax.experiments\n"
        "import fmjax.plot\n"
        "from fmjax import data, exact, likelihood, losses, metrics, models, problems, sample\n\n"
        "QUICK = fmjax.experiments.quick_from_env()  # FMJAX_QUICK=1: small CI settings\n"
        "STEPS = 300 if QUICK else 3000\n" + DEVICES,
        _Md(
            "## 1. A problem with exact answers\n\n"
            "A coupling is a `JointGaussianMixture` of (X0, X1); `independent_coupling` "
            "builds p0 x p1. A schedule gives (a_t, b_t) and their derivatives."
        ),
        "p0 = fmjax.standard_normal(2)\n"
        "p1 = data.eight_gaussians_mixture()\n"
        "coupling = fmjax.independent_coupling(p0, p1)\n"
        "s = fmjax.schedules.linear()\n"
        "print(p1)\n"
        "print(coupling)",
        _Md(
            "## 2. The exact field\n\n"
            "`exact.velocity(coupling, s, t, x)` is u_t(x) in closed form; `log_prob`, "
            "`score` and `divergence` likewise. `velocity_field` wraps it as a field "
            "`(t, x)` that every sampler takes."
        ),
        "x = p0.sample(jax.random.key(0), 1000)\n"
        "u = exact.velocity(coupling, s, 0.5, x)  # (1000, 2)\n"
        "logp = exact.log_prob(coupling, s, 0.5, x)  # (1000,)\n"
        'print("u:", u.shape, "log p:", logp.shape)\n'
        "exact_field = exact.velocity_field(coupling, s)\n"
        "fmjax.plot.density_and_velocity(coupling, s, [0.25, 0.5, 0.75, 1.0])",
        _Md(
            "## 3. Train a network by conditional flow matching\n\n"
            "`losses.cfm` regresses a network onto x1 - x0 at random times; its minimum is "
            "not zero but the loss floor, known exactly here. `fmjax.fit` runs many optax "
            "steps per compiled call."
        ),
        "model = models.MLP(dim=2, width=64, depth=3)\n"
        "params = models.init(model, key=jax.random.key(1))\n"
        "loss_fn = losses.cfm(model.apply, data.coupling_pairs(coupling), s, batch_size=256)\n"
        "floor = losses.loss_floor(coupling, s, 4096, key=jax.random.key(2))\n"
        "result = fmjax.fit(\n"
        "    loss_fn, params, key=jax.random.key(3), steps=STEPS, learning_rate=3e-3, "
        "progress=False\n"
        ")\n"
        "learned = functools.partial(model.apply, result.params)  # a field (t, x)\n"
        "final = float(result.losses[-50:].mean())\n"
        'print(f"final loss {final:.3f}, floor {float(floor.mean):.3f} '
        '+- {float(floor.stderr):.3f}")',
        _Md(
            "## 4. Compare with the exact velocity\n\n"
            "E|v_t(X_t) - u_t(X_t)|^2 over X_t ~ p_t, for the learned field and the zero "
            "field (the scale of u_t)."
        ),
        "ts = jnp.linspace(0.0, 1.0, 11)\n"
        "err = metrics.velocity_error(learned, coupling, s, ts, 512, key=jax.random.key(4))\n"
        "zero_field = lambda t, x: jnp.zeros_like(x)  # noqa: E731\n"
        "zero = metrics.velocity_error(zero_field, coupling, s, ts, 512, key=jax.random.key(4))\n"
        'fmjax.plot.error_curve(ts, {"learned": err, "zero field": zero}, ylabel="E|v - u|^2")',
        _Md(
            "## 5. Sample\n\n"
            "`sample.ode` integrates a field with diffrax (here 20 midpoint steps, 40 "
            "evaluations); `sample.sde` adds noise and a score and keeps the same marginals. "
            "After the 300 steps of the quick (CI) settings the eight modes are still blurred into "
            "a ring; the 3000 steps of the full settings separate them, and step 7 measures it."
        ),
        "x0 = sample.draw_source(jax.random.key(5), 2000, 2)\n"
        'ode = sample.ode(learned, x0, solver="midpoint", steps=20)\n'
        "sde = sample.sde(learned, s, x0, key=jax.random.key(6), steps=50)\n"
        'print("NFE: ODE", int(ode.nfe), "| SDE", int(sde.nfe))\n'
        "fmjax.plot.samples_grid(\n"
        '    {"target": p1.sample(jax.random.key(7), 2000), "ODE": ode.x, "SDE": sde.x}, '
        "lim=(-5, 5)\n"
        ")",
        _Md(
            "## 6. Likelihood\n\n"
            "The log-likelihood of a point under a flow comes from the augmented ODE "
            "(the divergence integrated along the path). For the exact field it equals the "
            "exact log-density."
        ),
        "x1 = p1.sample(jax.random.key(8), 200)\n"
        "want = exact.log_prob(coupling, s, 1.0, x1)\n"
        "lp_exact = likelihood.log_likelihood(exact_field, x1).log_prob\n"
        "lp_learned = likelihood.log_likelihood(learned, x1).log_prob\n"
        'print(f"exact -log p1: {-float(want.mean()):.3f}")\n'
        'print(f"exact field:   {-float(lp_exact.mean()):.3f}")\n'
        'print(f"learned field: {-float(lp_learned.mean()):.3f}")',
        _Md(
            "## 7. Score the model against the exact answers\n\n"
            "`fmjax.evaluate` runs all of the above on a named problem (here the same "
            "`eight_gaussians`) and returns one `EvaluationReport`: velocity error, excess "
            "loss over the floor, NLL gap, sample distances, the two-sided sample checks and "
            "the NFE a fixed-step solver needs."
        ),
        'problem = problems.get("eight_gaussians")\n'
        "# quick: fewer points, times and step counts, a fixed-step likelihood (CI settings)\n"
        "quick = dict(n=200, n_times=5, nfe_step_counts=(8, 32), likelihood_steps=8, w2=False)\n"
        "settings = quick if QUICK else {}\n"
        "report = fmjax.evaluate(learned, problem, key=jax.random.key(9), **settings)\n"
        'names = ("relative_velocity_error", "excess_loss", "nll_gap", "cross_entropy_z")\n'
        'for name in (*names, "worst_spread_ratio", "nfe_to_accuracy"):\n'
        '    print(f"{name:>24s}: {getattr(report, name)}")',
    ],
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
        _api(
            "gmm_to_gmm",
            "`fmjax.exact.velocity_field(coupling, schedule)` and `exact.responsibilities`, "
            "`exact.marginal`: the exact field on each coupling and schedule",
            '`fmjax.sample.ode(field, x0, solver="tsit5", rtol=1e-5, atol=1e-5)`: trajectories '
            "and NFE",
            "`fmjax.losses.cfm(model.apply, coupling.sample, schedule, batch_size)` and "
            "`fmjax.fit`: the learned field",
            "`fmjax.metrics.velocity_error(learned, coupling, schedule, ts, n, key=...)`: "
            "learned against exact over t",
        ),
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
        _api(
            "ot_vs_vp",
            "`fmjax.schedules.linear()` and `fmjax.schedules.vp()`: the two paths (each with its "
            "valid interval)",
            "`fmjax.data.independent_pairs(data.gaussian_source(2), data.checkerboard)`: "
            "training pairs",
            "`fmjax.losses.cfm(...)` and `fmjax.fit(...)`: one MLP per path",
            '`fmjax.sample.ode(learned, x0, schedule=s, solver="tsit5")`: samples over t and the '
            "NFE",
        ),
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
        _api(
            "flows_and_scores",
            "`fmjax.losses.cfm(...)` and `fmjax.fit(...)`: a velocity MLP with Fourier time "
            "features",
            '`fmjax.sample.ode(learned, x0, solver="rk4", steps=...)`: the ODE sampler',
            "`fmjax.sample.sde(learned, schedule, x0, key=..., diffusion=...)`: the SDE with the "
            "score derived from the velocity",
            "`fmjax.convert.velocity_to_x1(schedule, t, x, u)`: the predicted target along the "
            "path",
        ),
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
        _api(
            "cfm_equals_fm",
            "`fmjax.losses.cfm(model.apply, pairs, schedule, batch_size)`: the conditional loss",
            "`fmjax.losses.marginal_fm(model.apply, coupling, schedule, batch_size)`: the "
            "marginal loss with the exact target",
            "`jax.grad` of each at `fmjax.models.init(model, key=...)`: the gradients compared",
        ),
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
        _api(
            "stochastic_interpolants",
            "`fmjax.schedules.linear().with_noise(fmjax.schedules.brownian())` and "
            "`schedules.trig(...)`: interpolants with latent noise",
            '`fmjax.losses.cfm(..., target="drift")` and `target="score"`: the two learned fields',
            "`fmjax.convert.drift_to_velocity(schedule, t, x, v, score=s)`: u = v - gamma dgamma s",
            "`fmjax.sample.sde(u, schedule, x0, key=..., diffusion=..., score=score)`: SDE from "
            "any source",
        ),
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
        _api(
            "couplings",
            "`fmjax.couplings.mixture_ot(p0, p1)` and `couplings.schrodinger_bridge(p0, p1, "
            "sigma)`: the couplings in closed form",
            "`fmjax.couplings.transport_cost(coupling)` and `fmjax.exact.velocity(...)`: cost "
            "and kinetic energy",
            "`fmjax.losses.ot_pairs(...)` with `losses.cfm(...)`: minibatch OT-CFM",
            "`fmjax.exact.velocity_field(coupling, schedule)` and `fmjax.sample.ode`: "
            "trajectories and NFE",
        ),
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
            "# 5. Digits: an MLP and a UNet, a 64-D exact ground truth, and class-conditional "
            "digits\n\n"
            "scikit-learn ships 1,797 handwritten digits of 8x8 pixels (`fmjax.data.digits`, no "
            "download; `pip install 'fmjax[images]'`). An MLP and a small UNet "
            "(`fmjax.models.UNet`, which takes flat points (n, 64) and reshapes them to images "
            "inside, so `fit`, `sample` and `likelihood` are unchanged) are trained by "
            "conditional flow matching from N(0, I). Then the same two networks are trained on "
            "samples of a 20-component Gaussian mixture fitted to the digits "
            "(`fmjax.problems.get('digits_gmm')`), whose velocity, loss floor and density are "
            "known exactly, and scored by `fmjax.evaluate`. Last, a class-conditional UNet with "
            "label dropout, sampled with classifier-free guidance at several $w$, is scored "
            "against the exact per-class answers of a labelled digits GMM."
        ),
        SETUP,
        _api(
            "digits",
            "`fmjax.data.digits(flat=True)`, `data.from_array`, `data.independent_pairs`: the data",
            "`fmjax.models.UNet(image_shape=(8, 8, 1), channels=...)` and `models.MLP`: the "
            "networks",
            "`fmjax.losses.cfm(...)`, `fmjax.fit(...)`, `fmjax.sample.ode(...)`, "
            "`fmjax.likelihood.log_likelihood(...)`: train, sample, bits/dim",
            '`fmjax.problems.get("digits_gmm")` and `fmjax.evaluate(learned, problem, key=...)`: '
            "the 64-D exact ground truth",
            "`problems.digits_gmm_labelled()`, `conditional.labelled_pairs`, "
            "`losses.cfm(..., num_classes=10, p_uncond=...)`, `sample.guided`, "
            "`fmjax.evaluate_conditional`: class-conditional digits and guidance",
        ),
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
        _Md(
            "## Class-conditional digits: guidance against exact answers\n\n"
            "A UNet with a label input (`models.UNet(num_classes=10)`) is trained by "
            "`losses.cfm(..., num_classes=10, p_uncond=0.2)` (label dropout) on labelled pairs "
            "of `problems.digits_gmm_labelled()` (one GMM per digit, so the exact "
            "class-conditional field and the Bayes classifier are known in 64-D), then sampled "
            "with classifier-free guidance (`sample.guided(field, y, w, null=10)`) at several "
            "$w$. `fmjax.evaluate_conditional` scores the learned UNet and the exact field (the "
            "reference row): accuracy of the samples under the exact Bayes classifier against "
            "the Bayes accuracy, cross-entropy minus the class entropy (CE − H, nats: 0 when "
            "the samples follow $p(x \\mid y)$), relative velocity error against "
            "$u_t(x \\mid y)$; the logistic-regression classifier of real digits scores the "
            "same samples. One row per digit, at $w$ = 0, 1, 3 (quick setting: 200 training "
            "steps, a weak model; guidance still raises its accuracy)."
        ),
        _show("conditional_samples", "guidance_curves"),
        'print(m["conditional"]["table"])',
    ],
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` (no outputs, Python 3 kernel metadata)."""
    cells = []
    for item in NOTEBOOKS[name]:
        for src in item if isinstance(item, tuple) else (item,):  # SETUP is two cells
            cells.append(
                new_markdown_cell(str(src)) if isinstance(src, _Md) else new_code_cell(src)
            )
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
