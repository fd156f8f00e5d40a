"""The ``fmjax`` command: demo, experiments, training, sampling and benchmarks.

    fmjax demo [--out outputs/demo] [--quick]          # the `make demo` run (~30 s on a CPU)
    fmjax experiment gmm_to_gmm [--quick] [--out DIR]  # one of the seed experiments
    fmjax train --data checkerboard --schedule linear --steps 5000 --out runs/cb
    fmjax sample --model runs/cb --method sde --n 5000 --out runs/cb/samples
    fmjax bench builtin                                # a timing that runs anywhere
    fmjax bench [all|exact_velocity|...] [ARGS]        # benchmarks/ of a source checkout

``demo``, ``experiment``, ``train`` and ``sample`` take ``--config FILE``: a JSON or TOML file of
option values; flags given on the command line win over the file. For ``demo``, ``experiment``
and ``train`` the keys are the fields of the config dataclass (``fmjax.experiments.DemoConfig``,
``TrainConfig``, ...); for ``sample`` the long options with underscores (``n = 5000``). A value
of the wrong type is refused like a wrong flag. Results are written as ``results.json`` next to
the PNG figures in ``--out``; an output folder that is not empty is refused without
``--overwrite`` (``train`` resumes the run whose checkpoints it holds instead), and one that
another fmjax run is writing to is refused. ``train`` checkpoints into ``--out``/checkpoints
and, on SIGINT (Ctrl-C) or SIGTERM, saves a checkpoint and exits with status 130 / 143; the same
command continues the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path

_FN = "cli"
_EXPERIMENTS = (
    "gmm_to_gmm",
    "ot_vs_vp",
    "flows_and_scores",
    "cfm_equals_fm",
    "stochastic_interpolants",
    "couplings",
    "digits",
)
_CHECKOUT = (
    "fmjax bench {name} runs the scripts in benchmarks/ of a source checkout: git clone the "
    "fmjax repository, then run `python -m benchmarks` (or `python -m fmjax.cli bench {name}`) "
    "from its root; `fmjax bench builtin` works anywhere"
)


def _exit(error: Exception) -> SystemExit:
    return SystemExit(str(error))


def _check(check, name: str, value, **kw):
    """Run a ``fmjax._checks`` check for option ``name``; a failure exits with its message."""
    from fmjax import _checks

    try:
        return getattr(_checks, check)(_FN, name, value, **kw)
    except (TypeError, ValueError) as e:
        raise _exit(e) from None


# ----------------------------------------------------------------------------- config files


def _load_config(path) -> dict:
    """Read a JSON (``.json``) or TOML (anything else) config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"cli: `--config` must be an existing file, got {str(p)!r}")
    text = p.read_text()
    try:
        return json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(
            f"cli: `--config` must be valid JSON or TOML, got {str(p)!r}: {e}"
        ) from None


def _dataclass_config(cls, args, flags: dict, quick: bool = False):
    """``cls`` built from the ``--config`` file's values, then the flags given (not None)."""
    values = _load_config(args.config) if args.config else {}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise SystemExit(f"cli: `--config` has unknown keys for {cls.__name__}: {unknown}")
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls.quick(**values) if quick else cls(**values)
    except (TypeError, ValueError) as e:
        raise _exit(e) from None


# ----------------------------------------------------------------------------- parser


def _common(p, out_default: str, overwrite: str = "write into --out even if it is not empty"):
    p.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    p.add_argument("--overwrite", action="store_true", help=overwrite)
    p.add_argument("--config", help="JSON or TOML file of option values (flags win)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars or status lines (stderr)")  # fmt: skip


def _default(cls, name: str, text: str) -> str:
    """``text`` followed by the default of field ``name`` of the config dataclass ``cls``."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f"{text} (default {field.default})"


def _add_demo(sub) -> None:
    from fmjax.experiments.demo import DemoConfig

    p = sub.add_parser(
        "demo",
        help="2-D GMM demo: train, compare with the exact velocity, sample, table + figures",
        description="N(0, I) -> 5-component GMM in 2-D: exact density, velocity and "
        "trajectories; a short CFM training; ODE and SDE sampling; a table of loss, loss floor, "
        "velocity error, energy distances and NLL for the learned model and the exact field. "
        "A progress bar for training and a status line for each other phase (stderr).",
    )
    _common(p, "outputs/demo")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings (CI; about 20-30 s on 2 CPU cores, mostly compilation)",
    )
    p.add_argument("--steps", type=int, default=None,
                   help=_default(DemoConfig, "steps", "training steps"))  # fmt: skip


def _add_experiment(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="run one seed experiment (figures + results.json)",
        description="Run one of the experiments of fmjax.experiments: a progress bar for each "
        "training, and a status line when the experiment starts and ends (stderr).",
    )
    p.add_argument("name", choices=_EXPERIMENTS)
    _common(p, "outputs/<name>")
    p.add_argument("--quick", action="store_true", help="the small CI configuration")


#: ``fmjax train`` options: TrainConfig field -> (flags, type, help text before the default).
_TRAIN_OPTIONS = {
    "data": (("--data",), str, "target: gmm (the demo mixture, with exact scores), "
             "checkerboard, moons, eight_gaussians, rings or swiss_roll"),
    "schedule": (("--schedule",), str, "linear, cosine or vp"),
    "steps": (("--steps",), int, "optimizer steps"),
    "batch_size": (("--batch-size",), int, "pairs per step"),
    "width": (("--width",), int, "hidden width"),
    "depth": (("--depth",), int, "hidden layers"),
    "learning_rate": (("--lr", "--learning-rate"), float, "peak learning rate, cosine decay"),
    "time_embedding": (("--time-embedding",), str, "raw or fourier"),
    "problem": (("--problem",), str, "a named problem of fmjax.problems instead of --data "
                "(e.g. digits_gmm): pairs from its coupling, exact scores reported"),
    "model": (("--model",), str, "mlp, or unet (problems of images: digits_gmm)"),
    "channels": (("--channels",), int, "UNet base channels"),
}  # fmt: skip
_CHECKPOINT_EVERY = 500


def _add_train(sub) -> None:
    from fmjax.experiments.train_model import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a velocity MLP by conditional flow matching (checkpointed, resumable)",
        description="Train an MLP velocity field by CFM from N(0, I) to a 2-D target "
        "(fmjax.experiments.train_model) and save params.msgpack + model.json (for `fmjax "
        "sample --model`), a loss figure and results.json. With --data gmm (the demo mixture) "
        "the exact loss floor and velocity error are reported too. Checkpoints go to "
        "OUT/checkpoints every --checkpoint-every steps; rerunning the same command resumes "
        "from the latest one (a run with other settings is refused: pass --overwrite to start "
        "over). SIGINT (Ctrl-C) or SIGTERM saves a checkpoint at the end of the current chunk "
        "of steps and exits with status 130 / 143 (a second signal stops at once, losing the "
        "steps since the last checkpoint).",
    )
    _common(p, "outputs/train", "start over: delete the checkpoints and model files in --out "
            "(other files are kept), and write into it even if it is not empty")  # fmt: skip
    for name, (flags, kind, text) in _TRAIN_OPTIONS.items():
        p.add_argument(*flags, dest=name, type=kind, default=None,
                       help=_default(TrainConfig, name, text))  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=_CHECKPOINT_EVERY,
                   help=f"steps between checkpoints (default {_CHECKPOINT_EVERY})")  # fmt: skip


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample a trained model (or the exact GMM velocity) by ODE or SDE",
        description="Draw samples by the flow ODE (adaptive Tsit5 or fixed steps) or the "
        "marginal-preserving SDE over the schedule's valid interval; write samples.npy, "
        "samples.png and results.json (NFE, energy distance to fresh target samples). A status "
        "line for each phase (stderr).",
    )
    _common(p, "outputs/sample")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="folder written by `fmjax train`")
    src.add_argument("--exact", action="store_true", help="exact velocity of the demo GMM")
    p.add_argument("--method", choices=("ode", "sde"), default="ode", help="(default ode)")
    p.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    p.add_argument("--solver", default=None, help="ODE: tsit5 (default), dopri5, rk4, midpoint, "
                   "heun, euler; SDE: euler (default), heun, shark")  # fmt: skip
    p.add_argument("--steps", type=int, default=None,
                   help="fixed steps (default: ODE adaptive, SDE 200)")  # fmt: skip
    p.add_argument(
        "--diffusion",
        type=float,
        default=None,
        help="SDE: a constant noise scale g (default: g(t)^2 = 2 (1 - t) on the linear path, "
        "vanishing at the data end where the score from a learned velocity is ill-conditioned; "
        "see fmjax.sample.sde)",
    )


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: a built-in timing, or benchmarks/ of a source checkout",
        description="`fmjax bench builtin` times the exact GMM velocity after warm-up (median "
        "of --repeats, compile time apart) and writes JSON: it works from an installed "
        "package. `fmjax bench NAME [ARGS...]` runs benchmarks/NAME.py and `fmjax bench all` "
        "every benchmark (`python -m benchmarks`); these need the `benchmarks` package of a "
        "source checkout to be importable (run `python -m fmjax.cli bench ...` from the "
        "checkout's root). Default: 'all' where benchmarks is importable, else 'builtin'.",
    )
    p.add_argument("name", nargs="?", default=None, help="builtin, all, or a benchmark script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    p.add_argument("--out", default=None, help="JSON path (builtin: outputs/bench/results.json)")
    _builtin_options(p)


def _builtin_options(p, defaults=None) -> None:
    d = defaults or {"n": 100_000, "k": 8, "dim": 2, "repeats": 5}
    p.add_argument("--n", type=int, default=d["n"], help="builtin: points")
    p.add_argument("--k", type=int, default=d["k"], help="builtin: mixture components")
    p.add_argument("--dim", type=int, default=d["dim"], help="builtin: dimension")
    p.add_argument("--repeats", type=int, default=d["repeats"], help="builtin: timed repeats")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmjax",
        description="Flow matching on Gaussian mixtures, with exact answers.",
        epilog="Run `fmjax COMMAND --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from fmjax import leaderboard  # `fmjax evaluate`: parser and command live in leaderboard.py

    for add in (_add_demo, _add_experiment, _add_train, _add_sample, _add_bench,
                leaderboard.add_parser):  # fmt: skip
        add(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse; for ``sample`` parse again with the ``--config`` file's values as defaults."""
    args = parser.parse_args(argv)
    if args.command == "sample" and args.config:
        values = _load_config(args.config)
        sample = _subparser(parser, "sample")
        unknown = sorted(set(values) - {a.dest for a in sample._actions})
        if unknown:
            raise SystemExit(f"cli: `--config` has unknown keys for `sample`: {unknown}")
        sample.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def _subparser(parser, name):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


# ----------------------------------------------------------------------------- output folders

_LOCKS: list[int | None] = []  # descriptors holding the output folders' locks until main ends


def _writable(folder, flag: str = "--out") -> None:
    """Exit with one line unless ``folder`` can be created and written to (a read-only file
    system, a folder without write permission or a full disk fail here, in milliseconds)."""
    from fmjax.train.checkpoint import unwritable

    why = unwritable(folder)
    if why is not None:
        raise SystemExit(f"cli: `{flag}` must be a folder that can be created and written to, "
                         f"got {str(folder)!r} ({why})")  # fmt: skip


def _claim(args, keep: tuple[str, ...] = ()) -> Path:
    """Create and lock ``args.out``; refuse it if another run holds it, or if it is not empty
    and neither ``--overwrite`` is given nor everything in it is in ``keep``."""
    from fmjax.train.checkpoint import lock_directory

    out = Path(args.out)
    _writable(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cli: `--out` must be a folder that can be created, got {str(out)!r}: "
                         f"{e.strerror}") from None  # fmt: skip
    try:
        _LOCKS.append(lock_directory(out, ""))
    except RuntimeError:
        raise SystemExit(
            f"cli: `--out` {str(out)!r} is in use by another fmjax run (it holds a lock on the "
            "folder); wait until that run ends, or pass another --out"
        ) from None
    others = sorted(set(os.listdir(out)) - set(keep))
    if others and not args.overwrite:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise SystemExit(
            f"cli: `--out` {str(out)!r} is not empty (it holds {shown}); pass --overwrite to "
            "write over it, or another --out"
        )
    return out


class _Progress:
    """Status lines (stderr) around phases without a progress bar, unless ``--no-progress``:
    ``what ...`` when a phase starts, `` 1.2 s`` when it ends (as the experiments print them)."""

    def __init__(self, args):
        self.enabled = not args.no_progress

    def __call__(self, what: str):
        from fmjax._report import phase  # lazily, as everywhere here: `--help` imports no jax

        return phase(what, self.enabled)


# ----------------------------------------------------------------------------- demo, experiment


def _print_outputs(result, out) -> None:
    print(f"\nfigures ({out}):")
    for path in result.figures.values():
        print(f"  {path}")
    print(f"results: {Path(out) / 'results.json'}   ({result.wall_time_s:.1f} s)")


def _cmd_demo(args) -> int:
    from fmjax import experiments

    flags = {"steps": args.steps, "seed": args.seed}
    cfg = _dataclass_config(experiments.DemoConfig, args, flags, quick=args.quick)
    _claim(args)
    print(f"fmjax demo: N(0, I) -> 5-component GMM in 2-D, {cfg.steps} training steps ...",
          flush=True)  # fmt: skip
    result = experiments.demo(cfg, out=args.out, progress=not args.no_progress)
    ref = result.metrics["reference"]
    print()
    print(experiments.demo_table(result))
    print(
        f"\nloss: CFM loss on {cfg.n_eval} held-out pairs (the exact field reaches the floor); "
        f"velocity_error: E|v - u|^2 over t (zero field: {ref['zero_field_velocity_error']:.3g});"
        f"\nenergy_ode/sde: energy distance to exact target samples (two exact samples: "
        f"{ref['energy_between_target_samples']:.2g}); nll: -E log p(x) of target samples "
        f"under the flow (exact entropy {ref['target_entropy']:.4g})."
    )
    _print_outputs(result, args.out)
    return 0


def _cmd_experiment(args) -> int:
    from fmjax import experiments

    cls = experiments.CONFIGS[args.name]
    cfg = _dataclass_config(cls, args, {"seed": args.seed}, quick=args.quick)
    args.out = f"outputs/{args.name}" if args.out == "outputs/<name>" else args.out
    _claim(args)
    mode = "quick" if args.quick else "full"
    print(f"fmjax experiment {args.name} ({mode}) ...", flush=True)
    # The experiment's training bars come in between: a line when it starts and when it ends.
    status = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.no_progress else len
    t0 = time.perf_counter()
    status(f"experiment {args.name} ({mode}): training, sampling, metrics and figures ...")
    result = experiments.EXPERIMENTS[args.name](cfg, out=args.out, progress=not args.no_progress)
    status(f"experiment {args.name} ({mode}): done in {time.perf_counter() - t0:.1f} s")
    summary = {k: v for k, v in result.metrics.items() if not k.endswith(("_curve", "_ts"))}
    print(json.dumps(summary, indent=1))
    _print_outputs(result, args.out)
    return 0


# ----------------------------------------------------------------------------- train


class _Signals:
    """SIGINT and SIGTERM set ``received`` (the fit then checkpoints and stops at the end of its
    chunk); a second one raises ``KeyboardInterrupt`` at once. Restores the old handlers."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __call__(self) -> bool:
        return self.received is not None

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False


def _latest_checkpoint(ckpt: Path) -> int | None:
    steps = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit() and p.is_dir()]
    return max(steps) if steps else None


def _stopped(signum: int, step: int, cfg, ckpt: Path, trained: bool) -> int:
    """The one line of a run stopped by ``signum``; returns the exit status 128 + signum."""
    where = f"checkpoint at step {step} of {cfg.steps} saved in {ckpt}"
    if trained:
        where += " (training done; the model files were not written)"
    print(f"fmjax train: stopped by {signal.Signals(signum).name}: {where}; run the same command "
          "again to continue", file=sys.stderr)  # fmt: skip
    return 128 + signum


def _train_flags(args) -> dict:
    flags = {f: getattr(args, f) for f in (*_TRAIN_OPTIONS, "seed")}
    for name in ("steps", "batch_size", "width", "depth", "channels"):
        if flags[name] is not None:
            _check("check_int", f"--{name.replace('_', '-')}", flags[name])
    if flags["learning_rate"] is not None:
        _check("check_positive", "--lr", flags["learning_rate"])
    _check("check_int", "--checkpoint-every", args.checkpoint_every)
    return flags


def _train_error(e: Exception, out: Path) -> str:
    """One line for a failed ``train``: a checkpoint of another run or a broken one says what
    to do on the command line (``--overwrite``), not in ``fit``'s arguments."""
    msg = str(e)
    if isinstance(e, ValueError) and "which differs in " in msg:
        diff = msg.split("which differs in ", 1)[1]
        return (
            f"cli: `--out` {str(out)!r} holds checkpoints of a run with other settings (they "
            f"differ in {diff}); rerun with those settings to continue it, pass --overwrite to "
            "start over, or another --out"
        )
    if isinstance(e, RuntimeError) and "cannot write checkpoint" in msg:
        return msg
    if isinstance(e, RuntimeError) and "checkpoint" in msg:
        return f"{msg} (fmjax train: or pass --overwrite to start over in {out})"
    return msg


def _distributed():
    """Start ``jax.distributed`` when ``FMJAX_COORDINATOR`` / ``FMJAX_NUM_PROCESSES`` /
    ``FMJAX_PROCESS_ID`` or a SLURM job step with several tasks say so (nothing for one
    process); returns the data mesh over all devices, or None with one device."""
    import jax

    from fmjax import sharding

    if not jax.distributed.is_initialized():
        try:
            sharding.initialize_distributed()
        except ValueError as e:
            raise _exit(e) from None
    return sharding.data_mesh() if jax.device_count() > 1 else None


def _claim_once(args, keep: tuple[str, ...], prepare) -> Path:
    """:func:`_claim` and ``prepare(out)`` by process 0 alone (it locks the shared folder); the
    others learn whether it refused, so that every process exits, or none does."""
    import jax

    if jax.process_count() == 1:
        out = _claim(args, keep)
        prepare(out)
        return out
    import numpy as np
    from jax.experimental import multihost_utils

    refused = None
    if jax.process_index() == 0:
        try:
            prepare(_claim(args, keep))
        except SystemExit as e:
            refused = e
    if int(multihost_utils.broadcast_one_to_all(np.int32(refused is not None))):
        raise refused or SystemExit(f"cli: process 0 refused `--out` {args.out!r} (see its error)")
    return Path(args.out)


def _cmd_train(args) -> int:
    import jax

    mesh = _distributed()  # started by main() already, before the parser made arrays
    from fmjax import experiments
    from fmjax.experiments.train_model import MODEL_FILES

    cfg = _dataclass_config(experiments.TrainConfig, args, _train_flags(args))
    first = jax.process_index() == 0  # prints and writes; every process trains

    def prepare(out: Path) -> None:
        ckpt = out / "checkpoints"
        if args.overwrite:  # start over: only this command's own files are removed
            shutil.rmtree(ckpt, ignore_errors=True)
            for name in MODEL_FILES:
                (out / name).unlink(missing_ok=True)
        if ckpt.exists():
            _writable(ckpt, "--out")

    keep = ("checkpoints", *MODEL_FILES) if not args.overwrite else ()
    out = _claim_once(args, keep, prepare)
    ckpt = out / "checkpoints"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fmjax train: --out ready")
    t_start = time.time()
    with _Signals() as signals:
        where = f" on {mesh.size} devices, {jax.process_count()} process(es)" if mesh else ""
        if first:
            what = f"{cfg.problem or cfg.data}, {cfg.model}, {cfg.schedule} schedule"
            print(f"fmjax train: {what}, {cfg.steps} steps -> {out}{where}", flush=True)
        try:
            trained = experiments.train_model(
                cfg, out=out, progress=not args.no_progress, checkpoint_dir=ckpt,
                checkpoint_every=args.checkpoint_every, stop=signals, mesh=mesh,
            )  # fmt: skip
        except KeyboardInterrupt:
            step = _latest_checkpoint(ckpt)
            kept = f"the last checkpoint is step {step}" if step else "no checkpoint was saved"
            print(f"fmjax train: stopped at once by a second signal; {kept} in {ckpt}; run the "
                  "same command again to continue", file=sys.stderr)  # fmt: skip
            return 128 + (signals.received or signal.SIGINT)
        except (ValueError, RuntimeError, FloatingPointError) as e:
            raise SystemExit(_train_error(e, out)) from None
    fit = trained.fit
    results_path = out / "results.json"
    saved = results_path.is_file() and results_path.stat().st_mtime >= t_start
    if signals.received is not None and not saved:
        # Stopped before the model was written (a signal after that changes nothing).
        if not first:
            return 128 + signals.received
        return _stopped(signals.received, fit.step, cfg, ckpt, fit.step == cfg.steps)
    if not first:
        return 0
    if fit.resumed_from is not None:
        print(f"resumed from step {fit.resumed_from} of {ckpt}")
    results = json.loads((out / "results.json").read_text())
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=1))
    print(f"model: {out / 'params.msgpack'} + {out / 'model.json'}")
    return 0


# ----------------------------------------------------------------------------- sample


def _velocity_and_target(args):
    """(velocity, schedule, target sampler, label, exact target mixture or None) of ``--model``
    or the exact demo field."""
    from fmjax import exact, experiments
    from fmjax.experiments.train_model import trained_target

    if args.model:
        try:
            trained = experiments.load_model(args.model)
        except ValueError as e:
            raise _exit(e) from None
        sampler, coupling, dim = trained_target(trained.config)
        if dim != 2:
            raise SystemExit(
                f"cli: `--model` must be a 2-D model for fmjax sample, got one of problem "
                f"{trained.config.problem!r} (d = {dim}); score it with fmjax evaluate "
                f"--model {args.model}"
            )
        mixture = None if coupling is None else coupling.target()
        return trained.velocity, trained.schedule, sampler, f"model {args.model}", mixture
    coupling, s = experiments.demo_problem()
    p1 = coupling.target()
    return exact.velocity_field(coupling, s), s, p1.sample, "exact GMM velocity", p1


def _draw(args, velocity, s, key):
    """The ``--method`` sampler of ``velocity`` on ``--n`` source points, timed."""
    import jax

    from fmjax import sample
    from fmjax._report import time_calls

    x0 = sample.draw_source(key, args.n, 2)
    if args.method == "ode":
        kw = {"solver": args.solver or "tsit5", "steps": args.steps}
        run = lambda: sample.ode(velocity, x0, schedule=s, **kw)  # noqa: E731
    else:
        kw = {"solver": args.solver or "euler", "steps": args.steps or 200,
              "diffusion": args.diffusion}  # fmt: skip
        run = lambda: sample.sde(velocity, s, x0, key=jax.random.fold_in(key, 1), **kw)  # noqa: E731
    try:
        return time_calls(run, repeats=1, warmup=0)
    except ValueError as e:
        raise _exit(e) from None


def _cmd_sample(args) -> int:
    import jax
    import numpy as np

    from fmjax import metrics, plot
    from fmjax._report import write_json

    _check("check_int", "--n", args.n)
    if args.steps is not None:
        _check("check_int", "--steps", args.steps)
    if args.diffusion is not None:
        _check("check_positive", "--diffusion", args.diffusion, allow_zero=True)
    _writable(args.out)  # before any work
    velocity, s, target, label, mixture = _velocity_and_target(args)
    out = _claim(args)
    phase = _Progress(args)
    key = jax.random.key(args.seed or 0)
    method = args.method.upper()
    solver = args.solver or ("tsit5" if args.method == "ode" else "euler")
    with phase(f"sampling {args.n} points by {method} ({solver}; a first call with compilation, "
               "then a timed one)"):  # fmt: skip
        timing = _draw(args, velocity, s, key)
    x = np.asarray(timing.out.x)
    n_ref = min(args.n, 4000)
    with phase(f"energy distance of {n_ref} samples to {n_ref} target samples"):
        ref = np.asarray(target(jax.random.fold_in(key, 2), args.n))
        energy = float(metrics.energy_distance(x[:n_ref], ref[:n_ref]))
    checks = {}
    if mixture is not None:  # collapse lowers the cross-entropy below the entropy, spread raises it
        checks_of = jax.jit(metrics.sample_checks)  # x and ref: one program
        got, want = checks_of(x, mixture), checks_of(ref, mixture)
        checks = {
            "cross_entropy": got.cross_entropy,
            "target_entropy": want.cross_entropy,
            "target_entropy_stderr": want.cross_entropy_stderr,
            "cross_entropy_z": got.cross_entropy_z(want),
            "worst_spread_ratio": got.worst_spread_ratio,
            "worst_spread_ratio_noise": want.worst_spread_ratio,
        }
        checks = {k: float(v) for k, v in checks.items()}
    with phase(f"writing samples.npy, samples.png and results.json to {out}"):
        np.save(out / "samples.npy", x)
        figure = {"target samples": ref, f"{method} samples": x}
        plot.samples_grid(figure, title=f"{method} sampling, {label}", path=out / "samples.png")
        res = {
            "options": {k: v for k, v in vars(args).items() if k != "command"},
            "nfe": int(timing.out.nfe),
            "energy_distance": energy,
            **checks,
            "first_call_s": timing.first_s,
            "run_time_s": timing.median_s,
            "samples": out / "samples.npy",
            "figures": {"samples": out / "samples.png"},
        }
        write_json(out / "results.json", res)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in res.items()
                      if k not in ("options", "figures")}, indent=1))  # fmt: skip
    return 0


# ----------------------------------------------------------------------------- bench


def _benchmarks_importable() -> bool:
    return importlib.util.find_spec("benchmarks") is not None


def _cmd_bench(args) -> int:
    name = args.name or ("all" if _benchmarks_importable() else "builtin")
    if name == "builtin":
        return _builtin_bench(args)
    if not _benchmarks_importable():
        raise SystemExit(_CHECKOUT.format(name=name))
    registry = importlib.import_module("benchmarks.__main__")
    if name != "all" and name not in registry.BENCHMARKS:
        raise SystemExit(
            f"cli: `name` must be one of builtin, all, {', '.join(registry.BENCHMARKS)}, "
            f"got {name!r}"
        )
    argv = list(args.args) + (["--out", args.out] if args.out else [])
    module = registry if name == "all" else importlib.import_module(f"benchmarks.{name}")
    result = module.main(argv)
    return result if isinstance(result, int) else 0


def _builtin_bench(args) -> int:
    """Median time of the jitted exact GMM velocity on ``--n`` points (compile time apart)."""
    if args.args:  # options after the name land in args.args (REMAINDER): parse them now
        p = argparse.ArgumentParser(prog="fmjax bench builtin")
        _builtin_options(p, {k: getattr(args, k) for k in ("n", "k", "dim", "repeats")})
        p.add_argument("--out", default=args.out)
        args = p.parse_args(args.args, namespace=args)
    for name in ("n", "k", "dim", "repeats"):
        _check("check_int", f"--{name}", getattr(args, name))

    import jax
    import jax.numpy as jnp

    import fmjax
    from fmjax import exact, schedules
    from fmjax._report import time_calls, write_json

    key = jax.random.key(0)
    s = schedules.linear()
    c = fmjax.random_joint_mixture(key, args.k, args.dim, mean_scale=2.0)
    x = exact.marginal(c, s, 0.5).sample(jax.random.fold_in(key, 1), args.n)
    timing = time_calls(jax.jit(lambda c, x: exact.velocity(c, s, 0.5, x)), c, x,
                        repeats=args.repeats)  # fmt: skip
    res = {
        "benchmark": "exact_velocity (builtin)",
        "device": str(jax.devices()[0]),
        "n": args.n,
        "k": args.k,
        "dim": args.dim,
        "compile_s": timing.compile_s,
        "median_s": timing.median_s,
        "points_per_s": args.n / timing.median_s,
        "dtype": str(jnp.result_type(float)),
    }
    out = write_json(args.out or "outputs/bench/results.json", res)
    print(f"exact velocity, N={args.n} K={args.k} d={args.dim} on {res['device']}: "
          f"median {timing.median_s * 1e3:.2f} ms, {res['points_per_s']:.3g} points/s "
          f"(compile {timing.compile_s:.2f} s) -> {out}")  # fmt: skip
    return 0


_COMMANDS = {
    "demo": _cmd_demo,
    "experiment": _cmd_experiment,
    "train": _cmd_train,
    "sample": _cmd_sample,
    "bench": _cmd_bench,
    "evaluate": lambda args: (
        _writable(args.out) or importlib.import_module("fmjax.leaderboard").run(args)
    ),
}


def _quiet() -> None:
    """One line per failure: no log records of absl (orbax logs a failed save or restore with
    its traceback), asyncio or orbax, and no traceback of the "Event loop is closed" errors
    that tensorstore's read callbacks raise after a failed restore has closed orbax's loop
    (reported as unraisable exceptions; every other one still reaches the default hook)."""
    import logging

    for name in ("absl", "asyncio", "orbax"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    default = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            default(unraisable)

    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fmjax`` console script; returns the exit status (130 after Ctrl-C,
    143 after SIGTERM for ``train``, which checkpoints first)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # jax.distributed first: the parser's imports compute arrays
        _distributed()
    parser = _parser()
    args = _parse(parser, argv)
    from fmjax.train.checkpoint import unlock_directory

    _quiet()
    t0 = time.perf_counter()
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"\nfmjax {args.command}: interrupted after {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)  # fmt: skip
        return 130
    except OSError as e:  # writing an output file failed (full disk, ...): one line
        where = f" ({e.filename})" if e.filename else ""
        raise SystemExit(f"fmjax {args.command}: {e.strerror or e}{where}") from None
    finally:
        while _LOCKS:
            unlock_directory(_LOCKS.pop())


if __name__ == "__main__":
    sys.exit(main())
