"""benchmarks/spd_reference_worker.py's loader: the reference (Python 3.13) imported on an older Python by
rewriting PEP 695 type-parameter lists, which only annotate; and its logging packages stubbed where missing."""

import sys
import textwrap
import typing

import pytest

from benchmarks.spd_reference_worker import _Finder, _StubFinder, strip_type_params

SOURCE = textwrap.dedent(
    '''
    """A module in the reference's style."""
    from collections.abc import Callable


    class Box[T]:
        def __init__(self, item: T) -> None:
            self.item = item


    class Items[Q](list[Q]):
        pass


    def first[T](xs: list[T]) -> T:
        return xs[0]


    def wrap[**P, R](fn: Callable[P, R]) -> Callable[P, R]:
        return fn


    def biggest[N: int](xs: list[N]) -> N:
        return max(xs)
    '''
)


def test_type_params_become_module_level_typevars_and_generic_bases():
    out = strip_type_params(SOURCE)
    assert "class Box(_typing.Generic[T]):" in out and "def first(xs: list[T])" in out
    namespace: dict = {}
    exec(compile(out, "<reference>", "exec"), namespace)  # valid on this Python
    assert isinstance(namespace["T"], typing.TypeVar) and isinstance(namespace["P"], typing.ParamSpec)
    assert namespace["N"].__bound__ is int
    assert typing.Generic in namespace["Box"].__mro__ and namespace["Box"](3).item == 3
    assert issubclass(namespace["Items"], list)
    assert namespace["first"]([4, 5]) == 4 and namespace["biggest"]([1, 7, 2]) == 7
    assert namespace["wrap"](len) is len


def test_source_without_type_params_is_unchanged():
    source = "x: list[int] = [1]\n\ndef f(a: dict[str, int]) -> None:\n    return None\n"
    assert strip_type_params(source) == source


def test_the_finder_loads_an_spd_package_written_for_a_newer_python(tmp_path, monkeypatch):
    package = tmp_path / "spd"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "utils.py").write_text(SOURCE)
    finder = _Finder(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    for name in [n for n in sys.modules if n == "spd" or n.startswith("spd.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        from spd.utils import first  # noqa: PLC0415

        assert first(["a"]) == "a"
        assert finder.find_spec("numpy", None) is None  # only the spd package goes through it
    finally:
        for name in [n for n in sys.modules if n == "spd" or n.startswith("spd.")]:
            del sys.modules[name]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the syntax compiles as is from 3.12")
def test_the_unrewritten_source_does_not_compile_here():
    with pytest.raises(SyntaxError):
        compile(SOURCE, "<reference>", "exec")


def test_missing_logging_packages_are_served_as_empty_modules(monkeypatch):
    """An offline GPU image without wandb: the reference's module-level imports and annotations still run."""
    name = "wandb_stub_probe"  # a name no installed package has
    finder = _StubFinder([name])
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, finder])
    try:
        source = textwrap.dedent(
            f"""
            import {name}
            from {name}.sdk.wandb_run import Run
            def compute() -> dict[str, float | {name}.plot.CustomChart]:
                return {{"x": 1.0}}
            def log(run: Run[int] | None = None) -> None:
                {name}.log({{"x": 1}})
            """
        )
        namespace: dict = {}
        exec(compile(source, "<reference>", "exec"), namespace)
        assert namespace["compute"]() == {"x": 1.0}
        namespace["log"]()
        assert finder.find_spec("numpy", None) is None  # only the named packages
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] == name]:
            del sys.modules[key]
