"""Training: optax loops that run many steps per compiled call, for one model or a batch."""

from fmjax.train.config import FitConfig as FitConfig
from fmjax.train.config import make_optimizer as make_optimizer
from fmjax.train.pipeline import FitResult as FitResult
from fmjax.train.pipeline import fit as fit
from fmjax.train.pipeline import fit_many as fit_many

__all__ = ["FitConfig", "FitResult", "fit", "fit_many", "make_optimizer"]
