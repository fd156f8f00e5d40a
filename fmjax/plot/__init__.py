"""Matplotlib figures: exact densities, velocities, responsibilities, samples, paths, errors.

Every function builds a ``matplotlib.figure.Figure`` directly (no pyplot state: safe under the
Agg backend, in scripts, tests and threads), returns it, and also writes a PNG when ``path`` is
given. Functions that draw one axes accept ``ax=`` to draw into an existing axes instead (then
the returned figure is that axes' figure), so e.g. 1-D trajectories can be drawn over
``density_over_time``. Exact quantities on grids are evaluated with one jitted, vmapped call
over all panel times.

The figures live in small private modules by what they show: ``fmjax._plot_exact`` (exact
densities, velocities, responsibilities), ``fmjax._plot_samples`` (samples, paths, histograms),
``fmjax._plot_curves`` (error curves), with the shared style in ``fmjax._plot_common``; this
module is the public namespace and re-exports them.
"""

from fmjax._plot_common import _RC as _RC  # the shared rc style, used by fmjax.experiments
from fmjax._plot_curves import error_curve as error_curve
from fmjax._plot_exact import density_and_velocity as density_and_velocity
from fmjax._plot_exact import density_over_time as density_over_time
from fmjax._plot_exact import responsibilities as responsibilities
from fmjax._plot_samples import histograms as histograms
from fmjax._plot_samples import samples_grid as samples_grid
from fmjax._plot_samples import trajectories as trajectories
from fmjax._plot_samples import trajectories_1d as trajectories_1d

__all__ = [
    "density_and_velocity",
    "responsibilities",
    "trajectories",
    "trajectories_1d",
    "density_over_time",
    "samples_grid",
    "error_curve",
    "histograms",
]
