"""Every public name documents its arguments and its result (the API reference is built from
these docstrings): a function with parameters has an ``Args:`` section, one that returns a value
a ``Returns:`` (or ``Yields:``) section, and a class with constructor arguments ``Args:`` or
``Attributes:``. ``KNOWN_GAPS`` lists the names still missing one; it may only shrink."""

import importlib
import inspect

import pytest

from tests.test_api import PUBLIC_MODULES

# Names still without the sections (remove a name when its docstring gains them):
KNOWN_GAPS: set[str] = set()


def missing_sections(obj) -> list[str]:
    """The sections ``obj``'s docstring lacks (empty: complete)."""
    doc = inspect.getdoc(obj) or ""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    params = [p for p in sig.parameters.values() if p.name != "self"]
    if inspect.isclass(obj):
        return (
            ["Args/Attributes"] if params and not ("Args:" in doc or "Attributes:" in doc) else []
        )
    out = ["Args"] if params and "Args:" not in doc else []
    returns = sig.return_annotation
    if returns not in (None, "None") and not ("Returns:" in doc or "Yields:" in doc):
        out.append("Returns")
    return out


def _public_callables():
    seen = set()
    for mod_name in PUBLIC_MODULES:
        if mod_name == "fmjax.typing":  # type aliases, documented by their own docstrings
            continue
        mod = importlib.import_module(mod_name)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not callable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{mod_name}.{name}", obj


PUBLIC = dict(_public_callables())


def test_every_public_name_has_args_and_returns():
    missing = {name: m for name, obj in PUBLIC.items() if (m := missing_sections(obj))}
    print(f"{len(PUBLIC)} public callables, {len(missing)} without Args/Returns")
    assert set(missing) <= KNOWN_GAPS, sorted(set(missing) - KNOWN_GAPS)
    assert not KNOWN_GAPS - set(missing), f"documented now: {sorted(KNOWN_GAPS - set(missing))}"


@pytest.mark.parametrize(
    "doc, want",
    [
        ('"""Summary."""', ["Args", "Returns"]),
        ('"""Summary.\n\n    Args:\n        x: the input.\n    """', ["Returns"]),
        ('"""Summary.\n\n    Args:\n        x: in.\n\n    Returns:\n        out.\n    """', []),
    ],
)
def test_the_check_can_fail(doc, want):
    """Control: a function without the sections is caught, one with them passes."""
    env: dict = {}
    exec(f"def f(x) -> int:\n    {doc}\n    return x\n", env)
    assert missing_sections(env["f"]) == want


def _examples():
    """The public callables whose docstrings hold ``>>>`` examples."""
    return sorted(name for name, obj in PUBLIC.items() if ">>>" in (inspect.getdoc(obj) or ""))


@pytest.mark.parametrize("name", _examples())
def test_docstring_examples_run(name):
    """Each docstring example runs as a doctest, in its module's namespace (float32)."""
    import doctest

    obj = PUBLIC[name]
    globs = dict(vars(importlib.import_module(obj.__module__)))
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner()
    for test in finder.find(obj, name, globs=globs):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0, name


def test_doctest_can_fail():
    """Control: a wrong expected output fails the same runner."""
    import doctest

    def f():
        """>>> 1 + 1
        3
        """

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(f, "f", globs={}):
        runner.run(test, out=lambda _: None)
    assert runner.failures == 1
