"""fmjax: flow matching and stochastic interpolants on Gaussian mixtures, with exact answers."""

from fmjax import conditional as conditional
from fmjax import convert as convert
from fmjax import couplings as couplings
from fmjax import data as data
from fmjax import exact as exact
from fmjax import likelihood as likelihood
from fmjax import losses as losses
from fmjax import metrics as metrics
from fmjax import models as models
from fmjax import problems as problems
from fmjax import sample as sample
from fmjax import schedules as schedules
from fmjax import sharding as sharding
from fmjax import train as train
from fmjax import typing as typing
from fmjax.evaluation import EvaluationReport as EvaluationReport
from fmjax.evaluation import evaluate as evaluate
from fmjax.guidance import ConditionalReport as ConditionalReport
from fmjax.guidance import evaluate_conditional as evaluate_conditional
from fmjax.mixtures import GaussianMixture as GaussianMixture
from fmjax.mixtures import JointGaussianMixture as JointGaussianMixture
from fmjax.mixtures import independent_coupling as independent_coupling
from fmjax.mixtures import random_gaussian_mixture as random_gaussian_mixture
from fmjax.mixtures import random_joint_mixture as random_joint_mixture
from fmjax.mixtures import standard_normal as standard_normal
from fmjax.train import FitResult as FitResult
from fmjax.train import fit as fit
from fmjax.train import fit_many as fit_many

__version__ = "0.2.0"

__all__ = [
    "FitResult",
    "GaussianMixture",
    "JointGaussianMixture",
    "conditional",
    "convert",
    "couplings",
    "data",
    "exact",
    "fit",
    "fit_many",
    "independent_coupling",
    "likelihood",
    "losses",
    "metrics",
    "models",
    "random_gaussian_mixture",
    "random_joint_mixture",
    "sample",
    "schedules",
    "sharding",
    "standard_normal",
    "train",
    "typing",
    "problems",
    "evaluate",
    "EvaluationReport",
    "evaluate_conditional",
    "ConditionalReport",
]
