"""A velocity MLP trained under cosine(), sampled under linear() by convert.change_schedule,
scored by fmjax.evaluate against the linear problem; the same model scored under cosine.

The measurement in docs/how-to/conditional.md. Run: python tools/schedule_change_measure.py
"""

import functools
import time

import jax

import fmjax
from fmjax import convert, losses, models, problems, schedules


def make_model() -> models.MLP:
    """The velocity MLP of the measurement."""
    return models.MLP(dim=2, width=128, depth=3)


def main() -> None:
    prob_lin = problems.get("gmm_2d")
    cos, lin = schedules.cosine(), schedules.linear()
    prob_cos = prob_lin._replace(schedule=cos)
    model = make_model()
    params = models.init(model, key=jax.random.key(0), dim=2)
    loss = losses.cfm(model.apply, prob_lin.coupling.sample, cos, 512)
    t0 = time.time()
    fit = fmjax.fit(loss, params, key=jax.random.key(1), steps=4000, progress=False)
    print("train", time.time() - t0)
    v_cos = functools.partial(model.apply, fit.params)
    v_lin = convert.change_schedule(v_cos, cos, lin)
    for name, v, p in (
        ("cosine (as trained)", v_cos, prob_cos),
        ("changed to linear", v_lin, prob_lin),
    ):
        r = fmjax.evaluate(v, p, key=jax.random.key(2), n=1000)
        print(
            f"{name:20s} rel.vel.err {r.relative_velocity_error:.4f} "
            f"excess loss {r.excess_loss:.4f} "
            f"nll gap {r.nll_gap:.4f} energy {r.energy:.5f} (noise {r.energy_noise:.5f}) "
            f"CE z {r.cross_entropy_z:.2f} nfe {r.nfe_adaptive}"
        )
    exact_lin = fmjax.convert.change_schedule(
        fmjax.exact.velocity_field(prob_lin.coupling, cos), cos, lin
    )
    r = fmjax.evaluate(exact_lin, prob_lin, key=jax.random.key(2), n=1000)
    print(
        f"{'exact cos->linear':20s} rel.vel.err {r.relative_velocity_error:.2e} "
        f"nll gap {r.nll_gap:.4f}"
    )


if __name__ == "__main__":
    main()
