"""The type aliases of fmjax's signatures: a velocity field, a loss, samplers, a precision.

They are what the public signatures name (``velocity: Velocity``); import them to annotate your
own code, e.g. ``from fmjax.typing import Velocity``.
"""

from fmjax._typing import ApplyFn as ApplyFn
from fmjax._typing import LossFn as LossFn
from fmjax._typing import Module as Module
from fmjax._typing import PairSampler as PairSampler
from fmjax._typing import Precision as Precision
from fmjax._typing import PyTree as PyTree
from fmjax._typing import Sampler as Sampler
from fmjax._typing import TimeSampler as TimeSampler
from fmjax._typing import Velocity as Velocity

__all__ = [
    "ApplyFn",
    "LossFn",
    "Module",
    "PairSampler",
    "Precision",
    "PyTree",
    "Sampler",
    "TimeSampler",
    "Velocity",
]
