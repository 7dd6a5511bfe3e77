"""raylm.methods.unimported on a stand-in library (no torch): which modules' checks answer "absent",
when the library's own checks come back, nested blocks, a package that is imported.

    pytest tests/methods/test_unimported.py
"""

from __future__ import annotations

import sys
import types

import pytest

from raylm.methods import unimported

pytestmark = pytest.mark.quick


@pytest.fixture
def library(monkeypatch):
    """`fakelib.imports` defines the check, `fakelib.user` imported it by name, `otherlib.user` (another
    library) too; the package it asks about, `fakepkg`, is not imported."""

    def is_fakepkg_available() -> bool:
        return True

    modules = {}
    for name in ("fakelib.imports", "fakelib.user", "otherlib.user"):
        modules[name] = types.ModuleType(name)
        modules[name].is_fakepkg_available = is_fakepkg_available
        monkeypatch.setitem(sys.modules, name, modules[name])
    monkeypatch.setitem(sys.modules, "fakelib.gone", None)  # sys.modules may hold None
    monkeypatch.delitem(sys.modules, "fakepkg", raising=False)
    monkeypatch.setitem(unimported.CHECKS, "fakepkg", ("fakelib", "fakelib.imports", "is_fakepkg_available"))
    return modules, is_fakepkg_available


def test_the_library_checks_say_absent_within_the_block_and_are_their_own_after(library, monkeypatch):
    modules, original = library
    with unimported_block():
        assert modules["fakelib.imports"].is_fakepkg_available() is False
        assert modules["fakelib.user"].is_fakepkg_available() is False
        assert modules["otherlib.user"].is_fakepkg_available is original  # not the library's own module
        # a module of the library imported within the block takes the check as it is then
        late = types.ModuleType("fakelib.late")
        late.is_fakepkg_available = modules["fakelib.imports"].is_fakepkg_available
        monkeypatch.setitem(sys.modules, "fakelib.late", late)
        # and so does a module of another package that imports it by name then
        elsewhere = types.ModuleType("otherlib.late")
        elsewhere.is_fakepkg_available = modules["fakelib.imports"].is_fakepkg_available
        monkeypatch.setitem(sys.modules, "otherlib.late", elsewhere)
        # once the package is imported, the library's own answer
        monkeypatch.setitem(sys.modules, "fakepkg", types.ModuleType("fakepkg"))
        assert modules["fakelib.user"].is_fakepkg_available() is True
    for module in (*modules.values(), late, elsewhere):
        assert module.is_fakepkg_available is original


def test_nested_blocks_keep_the_swap_until_the_outer_one_ends(library):
    modules, original = library
    with unimported_block():
        with unimported_block():
            pass
        assert modules["fakelib.user"].is_fakepkg_available() is False
    assert modules["fakelib.user"].is_fakepkg_available is original


def test_the_checks_come_back_when_the_block_raises(library):
    modules, original = library
    with pytest.raises(RuntimeError), unimported_block():
        raise RuntimeError("a save that failed")
    assert modules["fakelib.user"].is_fakepkg_available is original


def unimported_block():
    return unimported.unimported_as_absent("fakepkg")
