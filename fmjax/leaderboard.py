"""The leaderboard of the built-in models and the ``fmjax evaluate`` command.

``leaderboard(names)`` trains the built-in models (an MLP on every problem, a UNet on image
problems) by CFM on each ``fmjax.problems`` problem and scores them and the exact field with
``fmjax.evaluate`` (written as ``leaderboard.md`` and ``leaderboard.json``).
``add_parser`` / ``run`` are the ``fmjax evaluate`` command: ``--model DIR`` scores a model
written by ``fmjax train``, ``--exact`` the exact field, ``--all`` runs the leaderboard.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from fmjax import _checks, exact, problems
from fmjax._report import write_json
from fmjax.evaluation import evaluate

__all__ = ["LEADERBOARD_PROBLEMS", "leaderboard", "add_parser", "run"]

# ----------------------------------------------------------------------------- leaderboard

#: Problems of ``leaderboard`` by default (quick: without the 256-D one).
LEADERBOARD_PROBLEMS = ("gmm_1d", "demo_2d", "gmm_2d_joint", "eight_gaussians", "two_modes_3d",
                        "digits_gmm", "gmm_256")  # fmt: skip
#: ``fmjax evaluate --all --quick``: the settings of ``leaderboard`` (CI; see ``add_parser``).
_QUICK = dict(steps=300, n=300, width=64, channels=8)
_COLUMNS = ("problem", "model", "relative_velocity_error", "excess_loss", "nll_gap", "energy",
            "energy_noise", "sample_cross_entropy", "target_entropy", "cross_entropy_z",
            "worst_spread_ratio", "nfe_to_accuracy")  # fmt: skip


def _builtin_models(problem: problems.Problem, width: int, channels: int) -> dict:
    from fmjax import models

    out = {f"MLP {width}x3": models.MLP(dim=problem.dim, width=width, depth=3)}
    if problem.image_shape is not None:
        out[f"UNet {channels}"] = models.UNet(image_shape=problem.image_shape, channels=channels,
                                              channel_mults=(1, 2))  # fmt: skip
    return out


def leaderboard(
    names: Sequence[str] = LEADERBOARD_PROBLEMS,
    *,
    steps: int = 3000,
    batch_size: int = 256,
    width: int = 128,
    channels: int = 32,
    n: int = 1000,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train the built-in models by CFM on each problem; score them and the exact field.

    Models: an MLP (``width`` x 3 hidden layers, Fourier time features) on every problem, and a
    UNet (``channels``, two levels) on image problems; Adam with cosine decay from 2e-3 for
    ``steps`` steps of ``batch_size`` coupled pairs. Each row is ``evaluate``'s summary (with
    ``n`` samples, no W2) plus "model" and "train_steps"; the exact field's row is the check.

    Returns:
        the rows; with ``out``, also written as ``leaderboard.json`` and ``leaderboard.md``.

    Args:
        names: problems of ``fmjax.problems`` to run.
        steps: training steps per model.
        batch_size: pairs per step.
        width: hidden width of the MLP.
        channels: base channels of the UNet.
        n: samples per estimate of ``evaluate``.
        seed: random seed.
        out: folder for ``leaderboard.json`` and ``leaderboard.md``, or None.
        progress: progress bars.
    """
    from fmjax import losses, models
    from fmjax._report import format_table
    from fmjax.train import fit

    rows = []
    key = jax.random.key(seed)
    for name in names:
        problem = problems.get(name)
        c, s = problem.coupling, problem.schedule
        fields = {"exact": exact.velocity_field(exact.prepare(c), s)}
        for label, model in _builtin_models(problem, width, channels).items():
            params = models.init(model, key=jax.random.fold_in(key, 1))
            loss_fn = losses.cfm(model.apply, c.sample, s, batch_size)
            result = fit(loss_fn, params, key=jax.random.fold_in(key, 2), steps=steps,
                         learning_rate=2e-3, lr_schedule="cosine", progress=progress,
                         steps_per_call=max(1, min(steps, 1000)))  # fmt: skip
            fields[label] = jax.jit(functools.partial(model.apply, result.params))
        for label, v in fields.items():
            r = evaluate(v, problem, key=jax.random.fold_in(key, 3), n=n, w2=False)
            trained = 0 if label == "exact" else steps
            rows.append({"problem": name, "model": label, "train_steps": trained, **r.summary()})
            if progress:
                print(format_table([rows[-1]], _COLUMNS))
    if out is not None:
        out = Path(out)
        write_json(out / "leaderboard.json", rows)
        (out / "leaderboard.md").write_text(_markdown(rows) + "\n")
    return rows


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _markdown(rows: list[dict]) -> str:
    """The leaderboard as a Markdown table."""
    head = "| " + " | ".join(_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r.get(c)) for c in _COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


# ----------------------------------------------------------------------------- command line

_DEFAULT_PROBLEM = {"gmm": "demo_2d", "eight_gaussians": "eight_gaussians"}


def add_parser(sub) -> None:
    """Register ``fmjax evaluate`` on an argparse subparsers object.

    Args:
        sub: the subparsers object of the ``fmjax`` parser.
    """
    p = sub.add_parser(
        "evaluate",
        help="score a trained model (or the exact field) against a problem's exact answers",
        description="Velocity error over t, excess loss over the exact floor, NLL against the "
        "exact log-density, energy distance and sliced W2 to exact samples, the cross-entropy "
        "of the samples under the exact target against its entropy and their per-component "
        "weights, means and spreads (collapse and spread both show), and the NFE for a "
        "given accuracy, of a model written by `fmjax train` (--model DIR) or of the exact "
        "field (--exact) on a problem of fmjax.problems; writes report.json and PNG figures.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="folder written by `fmjax train`")
    src.add_argument("--exact", action="store_true", help="the problem's exact velocity")
    src.add_argument(
        "--all",
        action="store_true",
        help="the leaderboard: built-in models "
        "trained on every problem (or --problem A,B), scored with the exact field",
    )
    p.add_argument("--steps", type=int, default=3000, help="--all: training steps")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the leaderboard's CI settings: n = 300 and no sliced W2; with --all also 300 "
        "steps, width 64, no 256-D problem",
    )
    p.add_argument("--problem", default=None, help="a name of fmjax.problems (default: the "
                   "model's training target: gmm -> demo_2d, eight_gaussians)")  # fmt: skip
    p.add_argument("--n", type=int, default=None, help="samples per estimate (default 1000, "
                   "--quick 300)")  # fmt: skip
    p.add_argument("--tol", type=float, default=0.01, help="NFE accuracy (default 0.01)")
    p.add_argument("--out", default="outputs/evaluate", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-w2", action="store_true", help="skip the sliced W2 (needs ott-jax)")
    p.add_argument("--sde", action="store_true", help="--model/--exact: also check samples of "
                   "the SDE sampler (its defaults; problems with an N(0, I) source)")  # fmt: skip


def run(args) -> int:
    """The ``fmjax evaluate`` command; prints the summary, returns 0.

    Args:
        args: the parsed arguments of ``fmjax evaluate``.

    Returns:
        the exit status, 0.
    """
    import json

    from fmjax import exact

    name = args.problem
    if args.n is None:  # --quick: the leaderboard's quick sample size, for every source
        args.n = _QUICK["n"] if args.quick else 1000
    if args.all:
        return _run_all(args)
    try:
        if args.model:
            from fmjax.experiments.train_model import load_model

            trained = load_model(args.model)
            cfg = trained.config
            name = name or cfg.problem or _DEFAULT_PROBLEM.get(cfg.data)
            if name is None:
                raise ValueError(
                    f"cli: `--problem` must be given for a model trained on {cfg.data!r} "
                    "(no exact answers)"
                )
            problem = problems.get(name)
            dim = 2 if cfg.problem is None else problems.get(cfg.problem).dim
            if problem.dim != dim:
                raise ValueError(
                    f"cli: `--problem` must be {dim}-D for this model, got {name!r} "
                    f"(d = {problem.dim})"
                )
            velocity, label = trained.velocity, f"model {args.model}"
        else:
            problem = problems.get(name or "demo_2d")
            prepared = exact.prepare(problem.coupling)
            velocity, label = exact.velocity_field(prepared, problem.schedule), "exact"
        _checks.check_int("cli", "--n", args.n, 2)
        _checks.check_positive("cli", "--tol", args.tol)
        print(f"fmjax evaluate: {label} on {problem.name} ({problem.description}) ...")
        w2 = not (args.no_w2 or args.quick)  # quick: no sliced W2, as the quick leaderboard
        report = evaluate(velocity, problem, key=jax.random.key(args.seed), n=args.n,
                          nfe_tol=args.tol, w2=w2, sde=args.sde,
                          out=args.out)  # fmt: skip
    except (TypeError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(json.dumps(report.summary(), indent=1))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def _run_all(args) -> int:
    names = tuple(args.problem.split(",")) if args.problem else LEADERBOARD_PROBLEMS
    kw = dict(steps=args.steps, n=args.n, seed=args.seed, out=args.out)
    if args.quick:
        names = names if args.problem else LEADERBOARD_PROBLEMS[:-1]
        kw.update(_QUICK, n=args.n)
    try:
        for name in names:
            _checks.check_choice("cli", "--problem", name, problems.names())
        rows = leaderboard(names, **kw)
    except (TypeError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(_markdown(rows))
    print(f"leaderboard: {Path(args.out) / 'leaderboard.md'}")
    return 0
