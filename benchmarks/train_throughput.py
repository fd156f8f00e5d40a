"""Training throughput: fmjax.train.fit vs Meta's ``flow_matching`` (torch), 2-D checkerboard.

Meta's 2-D example (examples/2d_flow_matching.ipynb): an MLP on [x, t] with 4 hidden layers of 512
and swish, batch 4096, Adam 1e-3, linear (CondOT) path, source N(0, I), loss = mean over batch and
coordinates of (v(x_t, t) - (x1 - x0))^2, checkerboard target sampled fresh every step. Both
frameworks train one model for the same number of steps on the same device in the same process;
steps/s is the median over timed segments (the first segment, with compilation / warm-up, is
dropped; on the fmjax side one more interval, see ``_run_fmjax``), and the final loss is
measured (i) as the mean training loss of the last segment and
(ii) on one fixed evaluation set (the same numpy arrays for both).

The peer is optional: without torch + flow_matching it prints "peer unavailable". To run both:

    python3.11 -m venv /tmp/venv-peer
    /tmp/venv-peer/bin/pip install torch flow_matching numpy jax flax optax jaxtyping tqdm
    /tmp/venv-peer/bin/python -m benchmarks.train_throughput      # from the repository root

Defaults are small for a CPU (batch 1024, 200 steps in 5 segments, at least 3); ``--full`` runs
Meta's configuration (batch 4096, 20000 steps in 20 segments).

Work per timed call (one training step, batch B, layer sizes [3, w, ..., w, 2]; see
``_common.training_flops_bytes``): flops = 3 x 2 B sum(fan_in fan_out) (forward, and backward
for inputs and weights); bytes = 4 (3 B sum(fan_in + fan_out) + 10 P) with P the parameter count
(activations written and read forward, read again backward; parameters read forward and
backward, gradient written, Adam's reads and writes of parameters and moments).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import mlp_layers, save_results, training_flops_bytes
from fmjax import data, losses, models, schedules, train
from fmjax._report import format_table

# ----------------------------------------------------------------------------- fmjax side


def _model_and_loss(args):
    """Meta's 2-D MLP ([x, t] -> 4 x 512 swish -> 2) and the CFM loss with its mean reduction."""
    model = models.MLP(2, width=args.width, depth=args.depth, time_embedding="raw")
    pairs = data.independent_pairs(data.gaussian_source(2), data.checkerboard)
    loss_fn = losses.cfm(model.apply, pairs, schedules.linear(), args.batch, reduction="mean")
    return model, loss_fn


def run_fmjax(args, precision, eval_set):
    """Train with ``jax.default_matmul_precision(precision)`` (read when the step is traced)."""
    with jax.default_matmul_precision(precision):
        return _run_fmjax(args, eval_set)


def _run_fmjax(args, eval_set):
    model, loss_fn = _model_and_loss(args)
    params = models.init(model, key=jax.random.key(args.seed))
    seg = args.steps // args.segments
    stamps = []
    res = train.fit(
        loss_fn,
        params,
        key=jax.random.key(args.seed + 1),
        steps=seg * args.segments,
        learning_rate=args.lr,
        steps_per_call=seg,
        progress=False,
        # Called once chunk k's losses are on the host, i.e. when chunk k has finished.
        callback=lambda step, losses, aux: stamps.append(time.perf_counter()),
    )
    # fit dispatches chunk k + 1 before reading chunk k's losses. With asynchronous dispatch
    # (GPU) stamp k is the end of chunk k; where a call runs synchronously (small programs on a
    # CPU) it is the end of chunk k + 1 and the last two stamps come together. Dropping the first
    # and the last interval leaves whole chunks (2..S-1 or 3..S) either way; the first chunk
    # includes warm-up after compilation.
    durations = np.diff(stamps)[:-1]
    t0, x0, x1 = (jnp.asarray(a) for a in eval_set)
    xt = t0[:, None] * x1 + (1 - t0[:, None]) * x0
    v = jax.jit(model.apply)(res.params, t0, xt)
    eval_loss = float(jnp.mean((v - (x1 - x0)) ** 2))
    return {
        "steps": res.step,
        "steps_per_s_median": seg / statistics.median(durations),
        "steps_per_s_segments": [seg / d for d in durations],
        "compile_s": res.compile_time,
        "final_train_loss": float(np.mean(res.losses[-seg:])),
        "final_eval_loss": eval_loss,
    }


# ----------------------------------------------------------------------------- Meta's side


def _torch_mlp(torch, args, device):
    """Meta's MLP in torch: [x, t] -> depth x (Linear(width), swish) -> Linear(2)."""

    class Swish(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) * x

    layers, d_in = [], 3
    for _ in range(args.depth):
        layers += [torch.nn.Linear(d_in, args.width), Swish()]
        d_in = args.width
    return torch.nn.Sequential(*layers, torch.nn.Linear(d_in, 2)).to(device)


def _checkerboard_sampler(torch, device):
    def inf_train_gen(n):  # verbatim from Meta's example
        x1 = torch.rand(n, device=device) * 4 - 2
        x2_ = torch.rand(n, device=device) - torch.randint(high=2, size=(n,), device=device) * 2
        x2 = x2_ + (torch.floor(x1) % 2)
        return (1.0 * torch.cat([x1[:, None], x2[:, None]], dim=1) / 0.45).float()

    return inf_train_gen


def _train_peer(torch, args, device, mlp, vf, path):
    """Meta's training loop in ``args.segments`` segments: (losses per segment, timed durations)."""
    inf_train_gen = _checkerboard_sampler(torch, device)
    optim = torch.optim.Adam(mlp.parameters(), lr=args.lr)
    seg = args.steps // args.segments
    losses, durations = [], []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for s in range(args.segments):
        sync()
        t0 = time.perf_counter()
        seg_losses = []
        for _ in range(seg):
            optim.zero_grad()
            x_1 = inf_train_gen(args.batch)
            x_0 = torch.randn_like(x_1)
            t = torch.rand(x_1.shape[0], device=device)
            ps = path.sample(t=t, x_0=x_0, x_1=x_1)
            loss = torch.pow(vf(ps.x_t, ps.t) - ps.dx_t, 2).mean()
            loss.backward()
            optim.step()
            seg_losses.append(loss.detach())
        losses.append(torch.stack(seg_losses).cpu().numpy())
        sync()
        if s > 0:  # the first segment warms up the allocator / kernels
            durations.append(time.perf_counter() - t0)
    return losses, durations


def _peer_eval_loss(torch, vf, eval_set, device) -> float:
    with torch.no_grad():
        te, x0, x1 = (torch.as_tensor(a, device=device) for a in eval_set)
        xt = te[:, None] * x1 + (1 - te[:, None]) * x0
        return float(torch.mean((vf(xt, te) - (x1 - x0)) ** 2))


def run_peer(args, eval_set):
    import torch
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    mlp = _torch_mlp(torch, args, device)

    def vf(x, t):
        return mlp(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], dim=1))

    path = AffineProbPath(scheduler=CondOTScheduler())
    losses, durations = _train_peer(torch, args, device, mlp, vf, path)
    seg = args.steps // args.segments
    return {
        "steps": seg * args.segments,
        "steps_per_s_median": seg / statistics.median(durations),
        "steps_per_s_segments": [seg / d for d in durations],
        "final_train_loss": float(np.mean(losses[-1])),
        "final_eval_loss": _peer_eval_loss(torch, vf, eval_set, device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "device": device,
    }


def _peer_available() -> bool:
    try:
        import flow_matching  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--full", action="store_true", help="Meta's configuration: batch 4096, 20000 steps"
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (CPU default 1024)")
    p.add_argument("--steps", type=int, default=None, help="total steps (CPU default 200)")
    p.add_argument("--segments", type=int, default=None, help="timed segments (first dropped)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=65536)
    p.add_argument(
        "--precision",
        choices=["default", "highest", "both"],
        default="both",
        help="JAX matmul precision (GPU default is TF32 for float32; torch defaults to full fp32)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the peer (default: torch's choice; on a shared CPU, "
        "OpenMP spin-waiting makes 1 thread faster than 2)",
    )
    p.add_argument("--no-peer", action="store_true", help="skip Meta's flow_matching")
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    return p


def _parse_args(argv):
    """The flags, with the batch, steps and segments defaults of the CPU or --full sizes."""
    p = _parser()
    args = p.parse_args(argv)
    args.batch = args.batch or (4096 if args.full else 1024)
    args.steps = args.steps or (20000 if args.full else 200)
    args.segments = args.segments or (20 if args.full else 5)
    if args.segments < 3 or args.steps < args.segments:
        p.error("need --segments >= 3 and --steps >= --segments")
    return args


def _eval_set(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One fixed evaluation set (t, x0, x1) for both frameworks, x1 from the checkerboard."""
    rng = np.random.default_rng(1234)
    a = rng.random(n) * 4 - 2
    b = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(a) % 2
    return (
        rng.random(n).astype(np.float32),
        rng.standard_normal((n, 2)).astype(np.float32),
        (np.stack([a, b], axis=1) / 0.45).astype(np.float32),
    )


def _run_all(args, eval_set) -> tuple[list, dict]:
    """fmjax at each precision, then the peer; returns (table rows (name, result), results)."""
    rows, results = [], {}
    precisions = ["default", "highest"] if args.precision == "both" else [args.precision]
    for prec in precisions:
        r = run_fmjax(args, None if prec == "default" else prec, eval_set)
        r["matmul_precision"] = prec
        results[f"fmjax[{prec}]"] = r
        rows.append((f"fmjax (matmul precision {prec})", r))
    if args.no_peer:
        print("peer skipped (--no-peer)")
    elif _peer_available():
        r = run_peer(args, eval_set)
        results["flow_matching"] = r
        rows.append(
            (
                f"flow_matching (torch {r['torch']}, {r['torch_threads']} threads, "
                f"tf32={r['torch_tf32']})",
                r,
            )
        )
    else:
        print("peer unavailable (torch / flow_matching not importable)")
    return rows, results


def _print_table(args, dev, rows) -> None:
    print(
        f"\n2-D checkerboard CFM, MLP {args.depth}x{args.width} swish, batch {args.batch}, "
        f"{args.steps} steps ({args.segments} segments, first dropped), Adam {args.lr}\n"
        f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(
        format_table(
            [{"name": name, **r} for name, r in rows],
            [
                ("name", "", ""),
                ("steps_per_s_median", "steps/s (median)", ".2f"),
                ("final_train_loss", "final train loss", ".4f"),
                ("final_eval_loss", "eval loss", ".4f"),
                ("compile_s", "compile s", ".2f"),
            ],
        )
    )


def main(argv=None):
    args = _parse_args(argv)
    rows, results = _run_all(args, _eval_set(args.eval_size))
    dev = jax.devices()[0]
    _print_table(args, dev, rows)
    out = {
        "config": vars(args),
        "jax": jax.__version__,
        "jax_device": f"{dev.platform}:{dev.device_kind}",
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    save_results(out, args.out, "train_throughput.json")
    return out


def layer_sizes(config: dict) -> list[int]:
    """[x, t] -> depth x width -> 2."""
    return [3] + [config["width"]] * config["depth"] + [2]


def summary_rows(result: dict) -> list[dict]:
    """One row per fmjax precision, with the peer (if it ran) on each; see __main__.py."""
    cfg = result["config"]
    flops, nbytes = training_flops_bytes(mlp_layers(layer_sizes(cfg)), cfg["batch"])
    peer = result["results"].get("flow_matching")
    rows = []
    for name, r in result["results"].items():
        if not name.startswith("fmjax"):
            continue
        prec = r["matmul_precision"]
        row = {
            "benchmark": "train_throughput",
            "workload": f"MLP {cfg['depth']}x{cfg['width']} batch {cfg['batch']} {prec}",
            "precision": prec,
            "median_s": 1.0 / r["steps_per_s_median"],
            "compile_s": r["compile_s"],
            "throughput": r["steps_per_s_median"],
            "unit": "steps/s",
            "flops": flops,
            "bytes": nbytes,
        }
        if peer is not None:
            row.update(
                peer="flow_matching",
                peer_detail=f"flow_matching (torch {peer['torch']}, {peer['device']}, "
                f"{peer['torch_threads']} threads, tf32={peer['torch_tf32']})",
                peer_median_s=1.0 / peer["steps_per_s_median"],
                peer_throughput=peer["steps_per_s_median"],
                ratio=r["steps_per_s_median"] / peer["steps_per_s_median"],
            )
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
