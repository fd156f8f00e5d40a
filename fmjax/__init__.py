"""fmjax: flow matching and stochastic interpolants on Gaussian mixtures, with exact answers."""

from fmjax import exact as exact
from fmjax import schedules as schedules
from fmjax.mixtures import GaussianMixture as GaussianMixture
from fmjax.mixtures import JointGaussianMixture as JointGaussianMixture
from fmjax.mixtures import independent_coupling as independent_coupling
from fmjax.mixtures import random_gaussian_mixture as random_gaussian_mixture
from fmjax.mixtures import random_joint_mixture as random_joint_mixture

__version__ = "0.1.0"
