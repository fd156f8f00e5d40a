"""Sampling a flow with diffrax: the ODE dx/dt = u_t(x), and SDEs that keep its marginals p_t.

A velocity is any callable ``velocity(t, x) -> (..., d)`` (exact or learned); ``t`` is a scalar
and ``x`` the whole batch, so one solve moves all samples together.
"""

from fmjax._solve import ODE_SOLVERS as ODE_SOLVERS
from fmjax._solve import RK4 as RK4
from fmjax.sample._guided import GuidedVelocity as GuidedVelocity
from fmjax.sample._guided import guided as guided
from fmjax.sample._ode import ODESolution as ODESolution
from fmjax.sample._ode import ode as ode
from fmjax.sample._sde import SDE_SOLVERS as SDE_SOLVERS
from fmjax.sample._sde import SDESolution as SDESolution
from fmjax.sample._sde import sde as sde
from fmjax.sample._source import draw_source as draw_source

__all__ = [
    "GuidedVelocity",
    "ODE_SOLVERS",
    "RK4",
    "ODESolution",
    "SDESolution",
    "SDE_SOLVERS",
    "draw_source",
    "guided",
    "ode",
    "sde",
]
