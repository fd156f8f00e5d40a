"""Matplotlib figures: exact densities, velocities, responsibilities, samples, paths, losses.

Every figure function builds a ``matplotlib.figure.Figure`` directly (no pyplot state: safe under
the Agg backend, in scripts, tests and threads), returns it, and also writes a PNG when ``path``
is given. Functions that draw one axes accept ``ax=`` to draw into an existing axes instead (then
the returned figure is that axes' figure), so e.g. 1-D trajectories can be drawn over
``density_over_time``. Times default to the schedule's valid interval.

All figures share one look, applied by the ``styled`` decorator. To compose your own figure in
that look, decorate the function that builds it with ``styled`` and use ``figure`` for the axes
grid and ``save`` to write it; the figure functions can draw into its axes with ``ax=``.
Needs matplotlib (``fmjax[plot]``).
"""

from fmjax.plot._style import figure as figure
from fmjax.plot._style import save as save
from fmjax.plot._style import styled as styled
from fmjax.plot.curves import error_curve as error_curve
from fmjax.plot.curves import training_loss as training_loss
from fmjax.plot.exact import density_and_velocity as density_and_velocity
from fmjax.plot.exact import density_over_time as density_over_time
from fmjax.plot.exact import responsibilities as responsibilities
from fmjax.plot.images import image_rows as image_rows
from fmjax.plot.samples import histograms as histograms
from fmjax.plot.samples import samples_grid as samples_grid
from fmjax.plot.samples import trajectories as trajectories
from fmjax.plot.samples import trajectories_1d as trajectories_1d

__all__ = [
    "density_and_velocity",
    "responsibilities",
    "density_over_time",
    "trajectories",
    "trajectories_1d",
    "samples_grid",
    "histograms",
    "error_curve",
    "training_loss",
    "figure",
    "save",
    "styled",
    "image_rows",
]
