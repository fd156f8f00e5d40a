"""The public API's shape: type hints resolve, keys sit where the convention puts them, facades
only re-export, shared aliases are defined once, and nothing matches schedule names."""

import ast
import importlib
import inspect
import pathlib
import typing

import pytest

import fmjax

PACKAGE = pathlib.Path(fmjax.__file__).parent
PUBLIC_MODULES = [
    "fmjax",
    "fmjax.conditional",
    "fmjax.convert",
    "fmjax.couplings",
    "fmjax.data",
    "fmjax.exact",
    "fmjax.guidance",
    "fmjax.experiments",
    "fmjax.leaderboard",
    "fmjax.likelihood",
    "fmjax.losses",
    "fmjax.metrics",
    "fmjax.mixtures",
    "fmjax.models",
    "fmjax.problems",
    "fmjax.plot",
    "fmjax.sample",
    "fmjax.schedules",
    "fmjax.sharding",
    "fmjax.train",
    "fmjax.typing",
]
SUBPACKAGES = ["sample", "train", "metrics", "plot"]
SHARED_ALIASES = {
    "PyTree", "Velocity", "LossFn", "PairSampler", "Precision", "TimeSampler", "Sampler"
}  # fmt: skip


def _public_objects():
    for mod_name in PUBLIC_MODULES:
        mod = importlib.import_module(mod_name)
        assert hasattr(mod, "__all__"), mod_name
        for name in mod.__all__:
            yield f"{mod_name}.{name}", getattr(mod, name)


PUBLIC = dict(_public_objects())


def _hinted(obj):
    """The callables whose hints a user's tools read: functions, and a class with its methods."""
    if inspect.isclass(obj):
        yield obj
        for attr in ("__init__", "__call__"):
            fn = obj.__dict__.get(attr)
            if fn is not None and inspect.isfunction(fn):
                yield fn
        for name, fn in vars(obj).items():
            if inspect.isfunction(fn) and not name.startswith("_"):
                yield fn
    elif callable(obj) and (inspect.isfunction(obj) or hasattr(obj, "__wrapped__")):
        yield inspect.unwrap(obj)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_type_hints_resolve(name):
    """``typing.get_type_hints`` works on every public name (no literal Ellipsis shapes)."""
    for fn in _hinted(PUBLIC[name]):
        typing.get_type_hints(fn)


def test_type_hint_check_can_fail():
    """Control: the invalid form that used to be in the code is caught by the same call."""
    from jaxtyping import Array, Float

    def bad(t): ...

    bad.__annotations__["t"] = "Float[Array, ...]"  # the invalid form, as a lazy annotation
    with pytest.raises(AttributeError):
        typing.get_type_hints(bad, globalns={"Float": Float, "Array": Array})
    bad.__annotations__["t"] = 'Float[Array, "..."]'  # the valid form resolves
    typing.get_type_hints(bad, globalns={"Float": Float, "Array": Array})


def _key_params():
    for name, obj in sorted(PUBLIC.items()):
        fns = [obj] if inspect.isfunction(inspect.unwrap(obj)) else []
        if inspect.isclass(obj):
            fns = [getattr(obj, m) for m in ("sample",) if inspect.isfunction(getattr(obj, m, 0))]
        for fn in fns:
            params = list(inspect.signature(inspect.unwrap(fn)).parameters.values())
            if params and params[0].name == "self":
                params = params[1:]
            for i, p in enumerate(params):
                if p.name in ("key", "keys"):
                    yield name, i, p


@pytest.mark.parametrize("name, index, param", list(_key_params()), ids=lambda v: str(v))
def test_key_is_first_or_keyword_only(name, index, param):
    """Drawing random numbers: the key first. A key among other inputs: keyword-only."""
    assert index == 0 or param.kind is inspect.Parameter.KEYWORD_ONLY, name


def test_key_convention_covers_the_named_functions():
    """The check above sees the functions the convention names (so it cannot pass vacuously)."""
    seen = {name for name, _, _ in _key_params()}
    for name in (
        "fmjax.fit",
        "fmjax.train.fit_many",
        "fmjax.sample.sde",
        "fmjax.losses.loss_floor",
        "fmjax.metrics.velocity_error",
        "fmjax.likelihood.log_likelihood",
        "fmjax.data.checkerboard",
        "fmjax.sample.draw_source",
    ):
        assert name in seen, name


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_subpackage_init_only_reexports(sub):
    tree = ast.parse((PACKAGE / sub / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.ImportFrom | ast.Import):
            continue
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]:
            continue
        pytest.fail(f"fmjax/{sub}/__init__.py defines something: {ast.dump(node)[:80]}")


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _group(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else "<flat>"


def test_no_private_module_crosses_groups():
    """A module imports another group's private module never (``fmjax._x`` flat helpers are
    shared by design: _checks, _typing, _solve, _report)."""
    shared = {"_checks", "_typing", "_solve", "_report"}
    bad = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("fmjax"):
                continue
            parts = node.module.split(".")[1:]
            names = [a.name for a in node.names]
            targets = [parts + [n] for n in names] if len(parts) <= 1 else [parts]
            for t in targets:
                private = [p for p in t if p.startswith("_") and p not in shared]
                if private and (len(t) < 2 or t[0] != _group(path)):
                    if not (len(t) == 1 and _group(path) == "<flat>" and t[0] in shared):
                        where = path.relative_to(PACKAGE)
                        bad.append(f"{where}: from {node.module} import {names}")
    assert not bad, bad


def test_shared_aliases_are_defined_once():
    where = {}
    for path in _modules():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in SHARED_ALIASES:
                        where.setdefault(t.id, []).append(str(path.relative_to(PACKAGE)))
    assert where == {name: ["_typing.py"] for name in SHARED_ALIASES}, where


def test_nothing_matches_schedule_names():
    """The valid interval is a property of the schedule, never rediscovered from its name."""
    needles = ('name.startswith("vp', '== "vp"', "== 'vp'", "vp_eps")
    found = [
        f"{p.relative_to(PACKAGE)}: {n}" for p in _modules() for n in needles if n in p.read_text()
    ]
    assert not found, found
