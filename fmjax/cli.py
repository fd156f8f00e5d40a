"""The ``fmjax`` command: demo, experiments, training, sampling and benchmarks.

    fmjax demo [--out outputs/demo] [--quick]          # the `make demo` run (~30 s on a CPU)
    fmjax experiment gmm_to_gmm [--quick] [--out DIR]  # one of the seed experiments
    fmjax train --data checkerboard --schedule linear --steps 5000 --out runs/cb
    fmjax sample --model runs/cb --method sde --n 5000 --out runs/cb/samples
    fmjax bench [all|exact_velocity|train_throughput|sampling|...|builtin] [flags for the script]

Every subcommand takes ``--config FILE``: a JSON or TOML file whose keys are the subcommand's
long options with underscores (``batch_size = 512``); flags given on the command line win over
the file. For ``experiment`` and ``demo`` the keys are the fields of the experiment's config
dataclass (``fmjax.experiments.DemoConfig`` ...), applied over the quick or full preset.
Results are written as ``results.json`` next to the PNG figures in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from pathlib import Path

_DATA = ("gmm", "checkerboard", "moons", "eight_gaussians", "rings", "swiss_roll")
_SCHEDULES = ("linear", "cosine", "vp")


# ----------------------------------------------------------------------------- config files


def _load_config(path) -> dict:
    """Read a JSON (``.json``) or TOML (anything else) config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"fmjax: --config file not found: {p}")
    text = p.read_text()
    try:
        return json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"fmjax: cannot parse --config {p}: {e}") from None


def _experiment_config(name: str, quick: bool, overrides: dict):
    from fmjax import experiments

    cls = experiments.CONFIGS[name]
    fields = {f.name: f for f in __import__("dataclasses").fields(cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise SystemExit(f"fmjax: unknown {cls.__name__} keys in --config: {unknown}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    try:
        return cls.quick(**overrides) if quick else cls(**overrides)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"fmjax: bad {cls.__name__}: {e}") from None


# ----------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmjax",
        description="Flow matching on Gaussian mixtures, with exact answers.",
        epilog="Run `fmjax COMMAND --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p, out_default):
        p.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
        p.add_argument("--config", help="JSON or TOML file of option values (flags win)")
        p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    demo = sub.add_parser(
        "demo",
        help="2-D GMM demo: train, compare with the exact velocity, sample, table + figures",
        description="N(0, I) -> 5-component GMM in 2-D: exact density, velocity and "
        "trajectories; a short CFM training; ODE and SDE sampling; a table of loss, loss floor, "
        "velocity error, energy distances and NLL for the learned model and the exact field.",
    )
    common(demo, "outputs/demo")
    demo.add_argument("--quick", action="store_true", help="tiny settings (CI, a few seconds)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 3000)")

    exp = sub.add_parser(
        "experiment",
        help="run one seed experiment (figures + results.json)",
        description="Run one of the experiments of fmjax.experiments.",
    )
    exp.add_argument(
        "name", choices=("gmm_to_gmm", "ot_vs_vp", "flows_and_scores", "cfm_equals_fm")
    )
    common(exp, "outputs/<name>")
    exp.add_argument("--quick", action="store_true", help="the small CI configuration")

    tr = sub.add_parser(
        "train",
        help="train a velocity MLP by conditional flow matching",
        description="Train an MLP velocity field by CFM from N(0, I) to a 2-D target and save "
        "params.msgpack + model.json (for `fmjax sample --model`), a loss figure and "
        "results.json. With --data gmm (the demo mixture) the exact loss floor and velocity "
        "error are reported too.",
    )
    common(tr, "outputs/train")
    tr.add_argument("--data", choices=_DATA, default="gmm", help="target (default gmm)")
    tr.add_argument("--schedule", choices=_SCHEDULES, default="linear", help="path schedule")
    tr.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    tr.add_argument("--batch-size", type=int, default=256, help="pairs per step")
    tr.add_argument("--width", type=int, default=128, help="hidden width")
    tr.add_argument("--depth", type=int, default=3, help="hidden layers")
    tr.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay)")
    tr.add_argument("--time-embedding", choices=("raw", "fourier"), default="raw")

    sa = sub.add_parser(
        "sample",
        help="sample a trained model (or the exact GMM velocity) by ODE or SDE",
        description="Draw samples by the flow ODE (adaptive Tsit5 or fixed steps) or the "
        "marginal-preserving SDE; write samples.npy, samples.png and results.json (NFE, energy "
        "distance to fresh target samples).",
    )
    common(sa, "outputs/sample")
    src = sa.add_mutually_exclusive_group()
    src.add_argument("--model", help="folder written by `fmjax train`")
    src.add_argument("--exact", action="store_true", help="exact velocity of the demo GMM")
    sa.add_argument("--method", choices=("ode", "sde"), default="ode")
    sa.add_argument("--n", type=int, default=2000, help="number of samples")
    sa.add_argument("--solver", default=None, help="ODE: tsit5 (default), dopri5, rk4, midpoint, "
                    "heun, euler; SDE: euler (default), heun, shark")  # fmt: skip
    sa.add_argument("--steps", type=int, default=None, help="fixed steps (SDE default 200)")
    sa.add_argument("--diffusion", type=float, default=1.0, help="SDE noise scale g")

    be = sub.add_parser(
        "bench",
        help="benchmarks: dispatch to benchmarks/*.py in a checkout, or a built-in timing",
        description="`fmjax bench NAME [ARGS...]` runs `python -m benchmarks.NAME ARGS` from a "
        "source checkout (the current folder must hold benchmarks/); `fmjax bench all` runs "
        "`python -m benchmarks` (as `make bench`); `fmjax bench builtin` (the default when "
        "benchmarks/ is absent) times the exact GMM velocity after warm-up (median of --repeats, "
        "compile time apart) and writes JSON.",
    )
    be.add_argument(
        "name",
        nargs="?",
        default=None,
        help="a script of benchmarks/ (e.g. exact_velocity, train_throughput, sampling), 'all' "
        "(python -m benchmarks) or 'builtin'; default: 'all' in a checkout, else 'builtin'",
    )
    be.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    be.add_argument("--out", default=None, help="JSON path (builtin: outputs/bench/results.json)")
    be.add_argument("--n", type=int, default=100_000, help="builtin: points")
    be.add_argument("--k", type=int, default=8, help="builtin: mixture components")
    be.add_argument("--dim", type=int, default=2, help="builtin: dimension")
    be.add_argument("--repeats", type=int, default=5, help="builtin: timed repeats")
    return parser


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse twice: once to find --config, then with the file's values as defaults."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and args.command in ("train", "sample"):
        values = _load_config(args.config)
        dests = {a.dest for a in _subparser(parser, args.command)._actions}
        unknown = sorted(set(values) - dests)
        if unknown:
            raise SystemExit(f"fmjax: unknown keys in --config for `{args.command}`: {unknown}")
        _subparser(parser, args.command).set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def _subparser(parser, name):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


# ----------------------------------------------------------------------------- commands


def _cmd_demo(args) -> int:
    from fmjax import experiments

    overrides = _load_config(args.config) if args.config else {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = _experiment_config("demo", args.quick, overrides)
    print(f"fmjax demo: N(0, I) -> 5-component GMM in 2-D, {cfg.steps} training steps ...")
    result = experiments.demo(cfg, out=args.out, progress=not args.no_progress)
    print()
    print(result["table"])
    ref = result["metrics"]["reference"]
    print(
        f"\nloss: CFM loss on {cfg.n_eval} held-out pairs (the exact field reaches the floor); "
        f"velocity_error: E|v - u|^2 over t (zero field: {ref['zero_field_velocity_error']:.3g});"
        f"\nenergy_ode/sde: energy distance to exact target samples (two exact samples: "
        f"{ref['energy_between_target_samples']:.2g}); nll: -E log p(x) of target samples "
        f"under the flow (exact entropy {ref['target_entropy']:.4g})."
    )
    _print_outputs(result, args.out)
    return 0


def _print_outputs(result: dict, out) -> None:
    print(f"\nfigures ({out}):")
    for path in result["figures"].values():
        print(f"  {path}")
    print(f"results: {Path(out) / 'results.json'}   ({result['wall_time_s']:.1f} s)")


def _cmd_experiment(args) -> int:
    from fmjax import experiments

    overrides = _load_config(args.config) if args.config else {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = _experiment_config(args.name, args.quick, overrides)
    out = f"outputs/{args.name}" if args.out == "outputs/<name>" else args.out
    print(f"fmjax experiment {args.name} ({'quick' if args.quick else 'full'}) ...")
    result = experiments.EXPERIMENTS[args.name](cfg, out=out, progress=not args.no_progress)
    summary = {k: v for k, v in result["metrics"].items() if not k.endswith(("_curve", "_ts"))}
    print(json.dumps(summary, indent=1))
    _print_outputs(result, out)
    return 0


def _target_sampler(name: str):
    from fmjax import experiments

    if name == "gmm":
        coupling, _ = experiments.demo_problem()
        return coupling.target().sample, coupling
    return experiments.DATASETS[name], None


def _check_positive(args, *names):
    for name in names:
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise SystemExit(f"fmjax: --{name.replace('_', '-')} must be > 0, got {v}")


def _cmd_train(args) -> int:
    import flax.serialization
    import jax
    import numpy as np

    from fmjax import data, losses, metrics, models, schedules
    from fmjax.experiments._common import _loss_figure, _train

    _check_positive(args, "steps", "batch_size", "width", "depth", "lr")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed or 0
    sched = getattr(schedules, args.schedule)()
    target, coupling = _target_sampler(args.data)
    model_kw = dict(dim=2, width=args.width, depth=args.depth, time_embedding=args.time_embedding)
    model = models.MLP(**model_kw)
    times = losses.uniform_eps_time(1e-3) if args.schedule == "vp" else "uniform"
    pairs = data.independent_pairs(data.gaussian_source(2), target)
    loss_fn = losses.cfm(model.apply, pairs, sched, args.batch_size, time_sampler=times)
    key = jax.random.key(seed)
    floor = None
    if coupling is not None:
        floor = float(losses.loss_floor(coupling, sched, key, 20_000, time_sampler=times))
    print(f"fmjax train: {args.data}, {args.schedule} schedule, {args.steps} steps")
    fit = _train(model, loss_fn, key, args.steps, args.lr, not args.no_progress, floor)
    (out / "params.msgpack").write_bytes(flax.serialization.to_bytes(fit.params))
    spec = {"model": model_kw, "data": args.data, "schedule": args.schedule, "seed": seed}
    (out / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
    fig_path = _loss_figure(fit.losses, np.nan if floor is None else floor,
                                        out / "training_loss.png")  # fmt: skip
    tail = max(1, args.steps // 10)
    res = {
        "options": {k: v for k, v in vars(args).items() if k not in ("command",)},
        "final_loss": float(np.mean(fit.losses[-tail:])),
        "loss_floor": floor,
        "steps_per_second": fit.steps_per_second,
        "wall_time_s": fit.wall_time,
        "compile_time_s": fit.compile_time,
        "figures": {"training_loss": str(fig_path)},
    }
    if coupling is not None:
        import functools

        import jax.numpy as jnp

        v = functools.partial(model.apply, fit.params)
        ts = jnp.linspace(0.0, 1.0 - 1e-3 if args.schedule == "vp" else 1.0, 21)
        err = metrics.velocity_error(v, None, coupling, sched, jax.random.key(seed + 1), ts, 1000)
        res["velocity_error"] = float(jnp.mean(err))
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "options"}, indent=1))
    print(f"model: {out / 'params.msgpack'} + {out / 'model.json'}")
    return 0


def _cmd_sample(args) -> int:
    import functools

    import flax.serialization
    import jax
    import numpy as np

    from fmjax import exact, experiments, metrics, models, plot, sample, schedules

    _check_positive(args, "n", "steps")
    if args.diffusion < 0:
        raise SystemExit(f"fmjax: --diffusion must be >= 0, got {args.diffusion}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed or 0
    if args.model:
        folder = Path(args.model)
        if not (folder / "model.json").is_file():
            raise SystemExit(f"fmjax: --model {folder} has no model.json (run `fmjax train`)")
        spec = json.loads((folder / "model.json").read_text())
        model = models.MLP(**spec["model"])
        template = models.init(model, jax.random.key(0))
        params = flax.serialization.from_bytes(template, (folder / "params.msgpack").read_bytes())
        velocity = functools.partial(model.apply, params)
        sched = getattr(schedules, spec["schedule"])()
        data_name = spec["data"]
    else:  # exact demo field (the default without --model)
        coupling, sched = experiments.demo_problem()
        velocity = functools.partial(exact.velocity, coupling, sched)
        data_name = "gmm"
    target, _ = _target_sampler(data_name)
    t1 = 1.0 - 1e-3 if sched.name.startswith("vp") else 1.0
    key = jax.random.key(seed)
    x0 = sample.draw_source(key, args.n, 2)
    t0 = time.perf_counter()
    try:
        if args.method == "ode":
            kw = {"solver": args.solver or "tsit5", "steps": args.steps}
            sol = sample.ode(velocity, x0, t1=t1, **kw)
        else:
            steps = args.steps or 200
            kw = {"solver": args.solver or "euler", "steps": steps, "diffusion": args.diffusion}
            if t1 < 1.0:
                raise SystemExit("fmjax: --method sde needs a schedule with b_1 = 0 (not vp)")
            sol = sample.sde(velocity, sched, x0, jax.random.fold_in(key, 1), **kw)
    except ValueError as e:
        raise SystemExit(f"fmjax: {e}") from None
    x = np.asarray(jax.block_until_ready(sol.x))
    wall = time.perf_counter() - t0
    ref = np.asarray(target(jax.random.fold_in(key, 2), args.n))
    np.save(out / "samples.npy", x)
    fig_path = out / "samples.png"
    label = "exact GMM velocity" if not args.model else f"model {args.model}"
    plot.samples_grid(
        {"target samples": ref, f"{args.method.upper()} samples": x},
        title=f"{args.method.upper()} sampling, {label}",
        path=fig_path,
    )
    res = {
        "options": {k: v for k, v in vars(args).items() if k != "command"},
        "nfe": int(sol.nfe),
        "energy_distance": float(metrics.energy_distance(x[:4000], ref[:4000])),
        "wall_time_s": wall,
        "samples": str(out / "samples.npy"),
        "figures": {"samples": str(fig_path)},
    }
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "options"}, indent=1))
    return 0


def _cmd_bench(args) -> int:
    name = args.name
    folder = Path("benchmarks")
    has_scripts = (folder / "__init__.py").is_file()
    if name is None:
        name = "all" if has_scripts else "builtin"
    if name != "builtin":
        if not has_scripts:
            raise SystemExit(
                "fmjax: benchmarks/ not found in the current folder; run from a source checkout "
                "or use `fmjax bench builtin`"
            )
        scripts = sorted(p.stem for p in folder.glob("[a-z]*.py"))
        if name != "all" and name not in scripts:
            raise SystemExit(
                f"fmjax: unknown benchmark {name!r}; choose from {scripts}, all, builtin"
            )
        import runpy

        extra = list(args.args)
        if args.out:
            extra += ["--out", args.out]
        module = "benchmarks" if name == "all" else f"benchmarks.{name}"
        sys.argv = [str(folder / f"{'__main__' if name == 'all' else name}.py")] + extra
        sys.path.insert(0, os.getcwd())
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    if args.args:  # options after the name land in args.args (REMAINDER): parse them now
        bench = argparse.ArgumentParser(prog="fmjax bench builtin")
        for flag in ("--n", "--k", "--dim", "--repeats"):
            bench.add_argument(flag, type=int, default=getattr(args, flag[2:]))
        bench.add_argument("--out", default=args.out)
        args = bench.parse_args(args.args, namespace=args)
    return _builtin_bench(args)


def _builtin_bench(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fmjax
    from fmjax import exact, schedules

    _check_positive(args, "n", "k", "dim", "repeats")
    key = jax.random.key(0)
    c = fmjax.random_joint_mixture(key, args.k, args.dim, mean_scale=2.0)
    x = exact.marginal(c, schedules.linear(), 0.5).sample(jax.random.fold_in(key, 1), args.n)
    fn = jax.jit(lambda c, x: exact.velocity(c, schedules.linear(), 0.5, x))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(c, x))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(fn(c, x))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(c, x))
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    res = {
        "benchmark": "exact_velocity (builtin)",
        "device": str(jax.devices()[0]),
        "n": args.n,
        "k": args.k,
        "dim": args.dim,
        "compile_s": compile_s,
        "median_s": med,
        "points_per_s": args.n / med,
        "dtype": str(jnp.result_type(float)),
    }
    out = Path(args.out or "outputs/bench/results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"exact velocity, N={args.n} K={args.k} d={args.dim} on {res['device']}: "
          f"median {med * 1e3:.2f} ms, {res['points_per_s']:.3g} points/s "
          f"(compile {compile_s:.2f} s) -> {out}")  # fmt: skip
    return 0


_COMMANDS = {
    "demo": _cmd_demo,
    "experiment": _cmd_experiment,
    "train": _cmd_train,
    "sample": _cmd_sample,
    "bench": _cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fmjax`` console script; returns the exit status."""
    parser = _parser()
    args = _parse(parser, argv)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
