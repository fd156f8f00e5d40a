"""Sampling with diffrax: the flow ODE dx/dt = u_t(x), and SDEs that keep the marginals p_t.

A velocity is any callable ``velocity(t, x) -> (..., d)`` (exact or learned); ``t`` is a scalar
and ``x`` the whole batch, so one solve moves all samples together (one shared step size for
adaptive solvers, with the error measured by the max norm, so every sample meets the tolerance).

ODE (``ode``): fixed-step Euler, Heun, Midpoint, classical RK4, or adaptive Tsit5 / Dopri5, from
t = 0 (source) to t = 1 (target) or backwards (t0=1, t1=0) to map data to the source.

SDE (``sde``): for an affine schedule x_t = b_t x0 + a_t x1 with Gaussian x0 ~ N(0, I), the score
follows from the velocity,

    score_t(x) = (a_t u_t(x) - da_t x) / (b_t (da_t b_t - a_t db_t)),

and for any diffusion coefficient g(t) >= 0 the SDE

    dX = [u_t(X) + g(t)^2 / 2 * score_t(X)] dt + g(t) dW

has the same marginals p_t as the ODE (its Fokker-Planck equation reduces to the continuity
equation). The score is singular at t = 1 (b_1 = 0), so ``sde`` integrates the SDE on
[0, 1 - eps] and covers the last stretch [1 - eps, 1] by one Euler step of the ODE (g = 0), the
"denoising step"; by default eps is one step, 1 / steps. ``eps=0`` is allowed only when
g(1) = 0 (checked eagerly); the score term is then dropped wherever g(t) = 0.

Reversed time (data at s = 0, noise at s = 1, as in the "Matching Flows and Scores" notes):
``sde(..., time="reversed")`` takes a velocity v_s = dx_s/ds, a schedule with x_s = b_s x_data +
a_s x_noise (the same ``Schedule`` type, roles of the endpoints swapped) and g as a function of s.
It flips to the forward clock, t = 1 - s: u_t(x) = -v_{1-t}(x), a_t <- b_{1-t}, b_t <- a_{1-t},
g(t) <- g(1 - t), and runs the same forward solve, so it returns the same samples.

The code lives in small private modules: ``fmjax._ode`` (``ode``, ``RK4``), ``fmjax._sde``
(``sde``) and ``fmjax._sample_common`` (argument checks, ``draw_source``); this module is the
public namespace and re-exports them.
"""

from fmjax._ode import ODE_SOLVERS as ODE_SOLVERS
from fmjax._ode import RK4 as RK4
from fmjax._ode import ODESolution as ODESolution
from fmjax._ode import ode as ode
from fmjax._sample_common import Velocity as Velocity
from fmjax._sample_common import draw_source as draw_source
from fmjax._sde import SDE_SOLVERS as SDE_SOLVERS
from fmjax._sde import SDESolution as SDESolution
from fmjax._sde import sde as sde

__all__ = [
    "RK4",
    "ODE_SOLVERS",
    "SDE_SOLVERS",
    "ODESolution",
    "SDESolution",
    "draw_source",
    "ode",
    "sde",
]
