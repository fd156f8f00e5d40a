"""Many devices: data-parallel meshes, sharded batches, sharded evaluation, multi-host start-up.

fmjax uses ``jax.sharding`` (a :class:`~jax.sharding.Mesh`, ``NamedSharding`` and
``PartitionSpec``) and lets XLA's SPMD partitioner insert the communication; there is no
``pmap`` and no second code path: a 1-device mesh runs the same program as the default device.

* :func:`data_mesh` builds a 1-D mesh over the devices (axis ``"data"``).
* :func:`replicate` places a pytree (parameters, optimizer state) on every device;
  :func:`shard_batch` splits arrays along their leading (batch) axis across the mesh;
  :func:`constrain_batch` does the same inside ``jit`` (a sharding constraint).
* :func:`sharded_pairs` wraps a pair sampler so that the batch a loss draws inside ``jit`` is
  generated on the devices, each device drawing its own shard, with the same numbers as on one
  device (needs ``jax_threefry_partitionable``, the default since JAX 0.5).
* :func:`evaluate` runs ``fn(x)`` under ``jit`` with the batch of ``x`` sharded and returns a
  sharded result: exact quantities on 10^6 points, ODE sampling from sharded x0, metrics.
* Across processes (:func:`initialize_distributed`): :func:`place` puts values every process
  holds whole onto a mesh spanning all of them, :func:`to_host` gathers global arrays back.

With the same key, sharded training equals single-device training up to the summation order of
the batch mean. Worked examples, the multi-host launch (SLURM or environment variables) and
what was verified across processes are in the documentation's "Train at scale" page.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax import _checks
from fmjax._typing import PyTree

__all__ = [
    "DistributedConfig",
    "data_mesh",
    "batch_sharding",
    "replicated",
    "replicate",
    "place",
    "to_host",
    "shard_batch",
    "constrain_batch",
    "sharded_pairs",
    "evaluate",
    "initialize_distributed",
]


# ----------------------------------------------------------------------------- meshes


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` for data parallelism.

    Args:
        devices: the devices, in order; default ``jax.devices()`` (all devices of all processes;
            in a single process, the local ones).
        axis: name of the mesh axis.

    Returns:
        ``Mesh(devices, (axis,))``.
    """
    fn = "sharding.data_mesh"
    _checks.check_instance(fn, "axis", axis, str, "a non-empty string")
    if not axis:
        _checks.fail(fn, "axis", "a non-empty string", axis)
    devs = jax.devices() if devices is None else list(devices)
    if not devs:
        _checks.fail(fn, "devices", "a non-empty sequence of jax devices", devs)
    if not all(isinstance(d, jax.Device) for d in devs):
        _checks.fail(fn, "devices", "a sequence of jax devices", devs, TypeError)
    if len(set(devs)) != len(devs):
        _checks.fail(fn, "devices", "distinct devices", devs)
    return Mesh(np.asarray(devs, dtype=object), (axis,))


def _check_mesh(fn: str, mesh) -> Mesh:
    return _checks.check_instance(
        fn, "mesh", mesh, Mesh, "a jax.sharding.Mesh (see sharding.data_mesh)"
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over all axes of ``mesh``, other axes whole: ``P(mesh.axis_names)``.

    Args:
        mesh: a device mesh.

    Returns:
        the ``NamedSharding``.
    """
    _check_mesh("sharding.batch_sharding", mesh)
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``: ``NamedSharding(mesh, P())``.

    Args:
        mesh: a device mesh.

    Returns:
        the ``NamedSharding``.
    """
    _check_mesh("sharding.replicated", mesh)
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------- placement


def _put_leaf(x, s: jax.sharding.Sharding):
    """``x`` placed with sharding ``s``, also when ``s`` spans devices of other processes.

    A global array is resharded by ``jax.device_put``; a value this process holds whole (a
    host array, or an array on its own devices) is taken to be the same on every process, and
    each process supplies the pieces of ``s`` on its devices (``device_put`` would refuse a
    committed array there, and compare a host one across processes, a gather per leaf).
    """
    if s.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, s)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        data = _put_leaf(jax.random.key_data(x), s)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(jnp.result_type(x)))
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])


def place(tree: PyTree, shardings: Any) -> PyTree:
    """``jax.device_put(tree, shardings)`` that also works across processes.

    With several processes (``jax.distributed``), a sharding whose devices belong to other
    processes too cannot take an array committed to this process's devices; here every leaf
    that this process holds whole is assumed equal on all processes (same seed, same data),
    and each process places the rows of its own devices. Global arrays are resharded.

    Args:
        tree: a pytree of arrays (host or device).
        shardings: one sharding for every leaf, or a pytree of shardings that is a prefix of
            ``tree`` (as for ``jax.device_put``).

    Returns:
        ``tree`` as global arrays with those shardings.
    """

    def put(s, subtree):
        return jax.tree.map(lambda x: _put_leaf(x, s), subtree)

    is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)  # noqa: E731
    return jax.tree.map(put, shardings, tree, is_leaf=is_sharding)


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of the whole value of every leaf of ``tree``, on every process.

    A leaf split across processes (its shards live on devices of several processes) is
    gathered with ``jax.experimental.multihost_utils.process_allgather``: a collective, so every
    process must call ``to_host`` on the same structure. Other leaves (host arrays, arrays on
    this process's devices, replicated arrays) are copied without communication.

    Args:
        tree: a pytree of arrays (global, device or host).

    Returns:
        ``tree`` with every leaf a NumPy array of its whole (global) value.
    """

    def leaf(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(leaf, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Copy every array leaf of ``tree`` to all devices of ``mesh`` (parameters, opt state).

    Across processes, every process must pass the same values (see :func:`place`).

    Args:
        tree: a pytree of arrays.
        mesh: a device mesh.

    Returns:
        the same tree, each array replicated on the mesh.
    """
    return place(tree, replicated(_check_mesh("sharding.replicate", mesh)))


def _check_divisible(fn: str, name: str, tree: PyTree, n_devices: int) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = np.shape(leaf)
        where = f"{name}{jax.tree_util.keystr(path)}"
        if not shape:
            raise ValueError(f"{fn}: `{where}` is a scalar; it needs a leading batch axis")
        if shape[0] % n_devices:
            raise ValueError(
                f"{fn}: the leading (batch) axis of `{where}`, of size {shape[0]}, must be a "
                f"multiple of the number of devices {n_devices}"
            )


def shard_batch(x: PyTree, mesh: Mesh) -> PyTree:
    """Split the leading (batch) axis of every array leaf of ``x`` evenly across ``mesh``.

    Args:
        x: an array (n, ...) or a pytree of arrays sharing nothing but the rule that each
            leading size is a multiple of the number of devices.
        mesh: the mesh (e.g. :func:`data_mesh`).

    Returns:
        ``x`` as global arrays with sharding :func:`batch_sharding` (device ``i`` holds rows
        ``i * n / D ... (i + 1) * n / D``). Across processes, every process passes the whole
        batch and keeps the rows of its own devices.

    Raises:
        ValueError: naming ``x`` (and the leaf) when a batch size does not divide the device count.
    """
    _check_mesh("sharding.shard_batch", mesh)
    _check_divisible("sharding.shard_batch", "x", x, mesh.size)
    return place(x, batch_sharding(mesh))


def constrain_batch(x: PyTree, mesh: Mesh) -> PyTree:
    """Inside ``jit``: constrain the leading axis of every leaf of ``x`` to be split over ``mesh``.

    ``jax.lax.with_sharding_constraint`` with :func:`batch_sharding`; XLA then computes ``x``
    (and what it propagates to) shard by shard. Outside ``jit`` it places ``x`` like
    :func:`shard_batch`. Leading sizes must be multiples of the device count (checked on shapes,
    so also while tracing).

    Args:
        x: a pytree of arrays with a leading batch axis.
        mesh: a device mesh.

    Returns:
        the same tree, constrained (inside ``jit``) or placed (outside).
    """
    _check_mesh("sharding.constrain_batch", mesh)
    _check_divisible("sharding.constrain_batch", "x", x, mesh.size)
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def _check_partitionable(fn: str) -> None:
    if not jax.config.jax_threefry_partitionable:
        warnings.warn(
            f"{fn}: jax_threefry_partitionable is off, so random numbers drawn in a sharded batch "
            "differ from single-device ones and may be generated whole on one device; enable it "
            "with jax.config.update('jax_threefry_partitionable', True)",
            stacklevel=3,
        )


def sharded_pairs(sample_pairs: Callable, mesh: Mesh) -> Callable:
    """Wrap a pair sampler so that the batch it draws inside ``jit`` is sharded over ``mesh``.

    ``sample_pairs(key, n) -> (x0 (n, d), x1 (n, d))`` (any pytree of arrays with leading axis
    ``n``) becomes a sampler whose outputs carry a sharding constraint along ``n``: XLA's SPMD
    partitioner propagates it back to the random number generation, so each device draws its own
    ``n / D`` rows on device (no host transfer, no gather), and forward into the loss, so each
    device evaluates the model on its rows and the mean over the batch becomes an all-reduce.

    With ``jax_threefry_partitionable`` (default in recent JAX; a warning is given when it is off)
    the numbers drawn equal those of ``sample_pairs`` on one device, bit for bit.

    Args:
        sample_pairs: ``(key, n) -> (x0, x1)``, e.g. ``data.coupling_pairs(coupling)``.
        mesh: the data mesh; ``n`` must be a multiple of ``mesh.size``.

    Returns:
        A pair sampler with the same signature, for ``losses.cfm`` and friends.
    """
    _checks.check_callable("sharding.sharded_pairs", "sample_pairs", sample_pairs, "a callable")
    _check_mesh("sharding.sharded_pairs", mesh)
    _check_partitionable("sharding.sharded_pairs")

    def sample(key, n):
        if isinstance(n, int) and n % mesh.size:
            raise ValueError(
                f"sharding.sharded_pairs: the batch size n={n} must be a multiple of the number of "
                f"devices {mesh.size}"
            )
        return constrain_batch(sample_pairs(key, n), mesh)

    return sample


# ----------------------------------------------------------------------------- evaluation


def evaluate(fn: Callable[..., PyTree], x: PyTree, mesh: Mesh, *args: Any) -> PyTree:
    """``fn(x, *args)`` compiled with the batch of ``x`` and of the result split across ``mesh``.

    For functions that act row by row on a batch (exact velocity / log-density of many points,
    a model, an ODE solve from a batch of x0): each device computes its rows. Functions that mix
    rows (a mean, an adaptive step size shared by the batch) also work; XLA inserts the
    collectives, and the result equals the one-device result up to the summation order.

    ODE sampling (``fmjax.sample.ode``) from sharded x0 keeps the samples sharded through the
    solve; an adaptive solver's shared step size comes from an all-reduced max norm. diffrax's
    runtime error check (an ``equinox.error_if`` host callback on the final state) lives on one
    device, so XLA warns "Involuntary full rematerialization" once per compile and gathers the
    final state there once per solve (not per step); ``EQX_ON_ERROR=nan`` removes the callback.

    Args:
        fn: ``fn(x, *args) -> pytree`` whose every output leaf has the leading axis of ``x``.
        x: an array (n, ...) (or pytree) with ``n`` a multiple of ``mesh.size``; host arrays are
            sharded by :func:`shard_batch`, already placed arrays are resharded by ``jit``.
        mesh: the mesh.
        *args: further arguments, replicated on every device (e.g. params, t).

    Returns:
        ``fn(x, *args)`` as global arrays sharded along the leading axis.

    Raises:
        ValueError: naming ``x`` when its batch size does not divide the device count, or
            ``fn`` if an output leaf lacks that leading axis.
    """
    _checks.check_callable("sharding.evaluate", "fn", fn)
    _check_mesh("sharding.evaluate", mesh)
    _check_divisible("sharding.evaluate", "x", x, mesh.size)
    out_struct = jax.eval_shape(fn, x, *args)
    try:
        _check_divisible("sharding.evaluate", "fn(x)", out_struct, mesh.size)
    except ValueError as e:
        raise ValueError(
            f"{e} (`fn` must return arrays with the batch axis of `x` first)"
        ) from None
    # device_put (not in_shardings): it also reshards arrays already committed elsewhere.
    x = place(x, batch_sharding(mesh))
    args = place(args, replicated(mesh))
    return jax.jit(fn, out_shardings=batch_sharding(mesh))(x, *args)


# ----------------------------------------------------------------------------- multi-host


class DistributedConfig(NamedTuple):
    """How :func:`initialize_distributed` started (or would start) ``jax.distributed``.

    Attributes:
        coordinator_address: "host:port" of process 0's coordinator; None when JAX detects the
            cluster itself (SLURM, Open MPI, ...).
        num_processes: how many processes take part (None: detected by JAX).
        process_id: this process's index in 0..num_processes-1 (None: detected by JAX).
        source: where the settings came from: "arguments", "environment" (``FMJAX_*``),
            "slurm" or "single process".
    """

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    source: str


_ENV = ("FMJAX_COORDINATOR", "FMJAX_NUM_PROCESSES", "FMJAX_PROCESS_ID")


_DIST = "sharding.initialize_distributed"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{_DIST}: environment variable {name}={raw!r} is not an "
                         "integer") from None  # fmt: skip


def _check_address(address) -> str:
    if not isinstance(address, str) or address.count(":") < 1:
        raise ValueError(f"{_DIST}: `coordinator_address` must be 'host:port', got {address!r}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{_DIST}: `coordinator_address` must be 'host:port' with a port in "
            f"1..65535, got {address!r}"
        )
    return address


def _resolve_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    env: Mapping[str, str],
) -> DistributedConfig:
    """Validate the arguments, filling the missing ones from ``env``; no side effect."""
    for name, v in (("num_processes", num_processes), ("process_id", process_id)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer)):
            raise ValueError(f"{_DIST}: `{name}` must be an integer, got {v!r}")
    given = (coordinator_address, num_processes, process_id)
    source = "arguments" if any(v is not None for v in given) else None
    if coordinator_address is None:
        coordinator_address = env.get("FMJAX_COORDINATOR") or None
    if num_processes is None:
        num_processes = _env_int(env, "FMJAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int(env, "FMJAX_PROCESS_ID")
    if source is None and any(env.get(k) for k in _ENV):
        source = "environment"

    if source is None:  # nothing said: a SLURM job step with several tasks, or a single process
        ntasks = _env_int(env, "SLURM_NTASKS") or _env_int(env, "SLURM_NPROCS")
        if ntasks is not None and ntasks > 1 and env.get("SLURM_PROCID") is not None:
            # jax.distributed.initialize() detects SLURM (coordinator from the node list).
            return DistributedConfig(None, None, None, "slurm")
        return DistributedConfig(None, 1, 0, "single process")

    if num_processes is None:
        raise ValueError(
            f"{_DIST}: `num_processes` is missing (pass it or set FMJAX_NUM_PROCESSES)"
        )
    if num_processes < 1:
        raise ValueError(f"{_DIST}: `num_processes` must be >= 1, got {num_processes}")
    if process_id is None:
        if num_processes > 1:
            raise ValueError(f"{_DIST}: `process_id` is missing (pass it or set FMJAX_PROCESS_ID)")
        process_id = 0
    if not 0 <= process_id < num_processes:
        raise ValueError(f"{_DIST}: `process_id` must be in [0, {num_processes}), got {process_id}")
    if num_processes == 1:
        if coordinator_address is not None:
            _check_address(coordinator_address)
        return DistributedConfig(coordinator_address, 1, 0, "single process")
    if coordinator_address is None:
        raise ValueError(
            f"{_DIST}: {num_processes} processes need a `coordinator_address` "
            "'host:port' reachable by all of them (pass it or set FMJAX_COORDINATOR)"
        )
    return DistributedConfig(_check_address(coordinator_address), num_processes, process_id,
                             source)  # fmt: skip


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    heartbeat_timeout_seconds: int | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedConfig:
    """Start JAX's multi-process runtime (``jax.distributed.initialize``) when there are several.

    Call it once per process, before any other JAX call. Values come from the arguments, else from
    ``FMJAX_COORDINATOR`` ("host:port" of process 0), ``FMJAX_NUM_PROCESSES`` and
    ``FMJAX_PROCESS_ID``, else, inside a SLURM job step with several tasks (``SLURM_NTASKS > 1``),
    from JAX's own SLURM detection. With none of these, or with one process, it does nothing:
    the same script runs on a laptop and on a cluster.

    Args:
        coordinator_address: "host:port" of the coordinator (process 0 listens there).
        num_processes: total number of processes.
        process_id: this process's index in ``[0, num_processes)``.
        local_device_ids: restrict this process to these local devices (e.g. one process per GPU).
        heartbeat_timeout_seconds: after this long without a heartbeat from a process, JAX
            declares it dead and terminates the others with an error naming it (JAX's default:
            100 s). A process killed inside a collective is usually noticed sooner, by the
            collective's broken connection.
        env: environment to read (default ``os.environ``); for tests.

    Returns:
        The :class:`DistributedConfig` used; ``source == "single process"`` means nothing was
        started.

    Raises:
        ValueError: naming the argument (or environment variable) that is missing or invalid,
            e.g. several processes without a coordinator address, or a process id out of range.
    """
    cfg = _resolve_distributed(
        coordinator_address, num_processes, process_id, os.environ if env is None else env
    )
    if cfg.source == "single process":
        return cfg
    kwargs = {} if local_device_ids is None else {"local_device_ids": list(local_device_ids)}
    if heartbeat_timeout_seconds is not None:
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_seconds)
    if cfg.source != "slurm":
        kwargs.update(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    jax.distributed.initialize(**kwargs)
    return cfg
