"""The seed experiments, shared by the ``fmjax`` command and the notebooks.

Each experiment is one function ``name(config=None, *, quick=None, out=..., progress=False)``
that writes PNG figures and ``results.json`` into ``out`` and returns an ``ExperimentResult``
(experiment, config, metrics, figures, wall_time_s; the same values as the JSON file).
``config`` is the experiment's frozen config dataclass; when it is None, ``quick`` picks the
small CI configuration (``Config.quick()``) or the full one (``Config()``), and ``quick=None``
reads the environment variable ``FMJAX_QUICK`` (``1``/``true``/``yes`` mean quick).

Experiments (``EXPERIMENTS`` maps names to functions, ``CONFIGS`` to config classes):

* ``demo``: the 2-D N(0, I) -> 5-component GMM problem behind ``fmjax demo``: exact density,
  velocity and trajectories; a short CFM training; ODE and SDE sampling; a table comparing
  the learned model with the exact velocity (loss, loss floor, velocity error, energy
  distances, NLL).
* ``gmm_to_gmm``: stochastic interpolants between Gaussian mixtures: an independent and a joint
  (cross-covariance) coupling with the same marginals, under the linear, cosine and VP
  schedules; exact velocities, responsibilities and trajectories; learned-vs-exact velocity
  error over t; the 1-D problem 2 modes (+-3) -> 3 modes (-6, 0, 6).
* ``ot_vs_vp``: conditional-OT (linear) path vs VP-diffusion path on the checkerboard and two
  moons (Lipman et al., 2023): samples over t, trajectories, adaptive-solver NFE.
* ``flows_and_scores``: a 2-mode GMM in R^3, Fourier-time MLP, RK4 ODE vs Euler-Maruyama SDE
  (score from the velocity), histograms of the predicted target x_hat_1 along the path and the
  time each settles on the modes.
* ``cfm_equals_fm``: gradients of the conditional and the marginal (exact-target) losses agree:
  cosine similarity to the exact gradient vs batch size.
* ``stochastic_interpolants``: x_t = b x0 + a x1 + gamma z between Gaussian mixtures (2-D one
  Gaussian -> 3 components; 1-D +-3 -> -6, 0, 6), linear and trig with gamma = 0 / brownian:
  exact density over (t, x), ODE and SDE samples from exact and learned drift + score, energy
  distances to the target.

Times always stay in each schedule's valid interval (``schedule.interval``): the VP schedule's
ends at 1 - 1e-3, before its singularity at t = 1.

* ``digits``: MLP vs UNet trained by CFM on scikit-learn's 8x8 digits (samples per NFE, over
  t, nearest training images, bits per dimension, a classifier's histogram / confidence /
  Frechet distance), then on the 64-D digits GMM scored by ``fmjax.evaluate`` against the exact
  field (needs ``fmjax[images]``).

``train_model`` / ``load_model`` train, save and load the velocity MLP of ``fmjax train`` and
``fmjax sample --model``.
"""

from fmjax.experiments._common import ExperimentResult as ExperimentResult
from fmjax.experiments._common import quick_from_env as quick_from_env
from fmjax.experiments.cfm_equals_fm import CFMConfig as CFMConfig
from fmjax.experiments.cfm_equals_fm import cfm_equals_fm as cfm_equals_fm
from fmjax.experiments.demo import DemoConfig as DemoConfig
from fmjax.experiments.demo import demo as demo
from fmjax.experiments.demo import demo_problem as demo_problem
from fmjax.experiments.demo import demo_table as demo_table
from fmjax.experiments.digits import DigitsConfig as DigitsConfig
from fmjax.experiments.digits import digits as digits
from fmjax.experiments.flows_and_scores import FlowsScoresConfig as FlowsScoresConfig
from fmjax.experiments.flows_and_scores import flows_and_scores as flows_and_scores
from fmjax.experiments.flows_and_scores import flows_scores_target as flows_scores_target
from fmjax.experiments.gmm_to_gmm import GMMConfig as GMMConfig
from fmjax.experiments.gmm_to_gmm import gmm_1d_problem as gmm_1d_problem
from fmjax.experiments.gmm_to_gmm import gmm_problems as gmm_problems
from fmjax.experiments.gmm_to_gmm import gmm_to_gmm as gmm_to_gmm
from fmjax.experiments.ot_vs_vp import DATASETS as DATASETS
from fmjax.experiments.ot_vs_vp import OTvsVPConfig as OTvsVPConfig
from fmjax.experiments.ot_vs_vp import ot_vs_vp as ot_vs_vp
from fmjax.experiments.registry import CONFIGS as CONFIGS
from fmjax.experiments.registry import EXPERIMENTS as EXPERIMENTS
from fmjax.experiments.stochastic_interpolants import SIConfig as SIConfig
from fmjax.experiments.stochastic_interpolants import si_problems as si_problems
from fmjax.experiments.stochastic_interpolants import si_table as si_table
from fmjax.experiments.stochastic_interpolants import (
    stochastic_interpolants as stochastic_interpolants,
)
from fmjax.experiments.train_model import TrainConfig as TrainConfig
from fmjax.experiments.train_model import TrainedModel as TrainedModel
from fmjax.experiments.train_model import load_model as load_model
from fmjax.experiments.train_model import train_model as train_model

__all__ = [
    "CFMConfig",
    "CONFIGS",
    "DATASETS",
    "DemoConfig",
    "EXPERIMENTS",
    "ExperimentResult",
    "FlowsScoresConfig",
    "GMMConfig",
    "OTvsVPConfig",
    "TrainConfig",
    "TrainedModel",
    "cfm_equals_fm",
    "demo",
    "demo_problem",
    "demo_table",
    "flows_and_scores",
    "flows_scores_target",
    "gmm_1d_problem",
    "gmm_problems",
    "gmm_to_gmm",
    "load_model",
    "ot_vs_vp",
    "quick_from_env",
    "train_model",
    "SIConfig",
    "si_problems",
    "si_table",
    "stochastic_interpolants",
    "DigitsConfig",
    "digits",
]
