"""Tests are marked by folder (tests/conftest.py): the kinds, pyproject's markers and testpaths and the
folders that hold tests agree, so no folder of tests silently falls out of `make test` or of a `-m` run."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, TEST_KINDS, folders_with_tests, is_test_file, pytest_collection_modifyitems

PYTEST = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
TESTS = ROOT / "tests"


def test_every_folder_with_tests_is_a_testpath_and_vice_versa():
    assert {"tests/unit", "tests/integration"} <= folders_with_tests()  # the walk sees them
    assert folders_with_tests() == set(PYTEST["testpaths"])


def test_no_test_file_directly_in_tests():
    assert not [p.name for p in TESTS.iterdir() if is_test_file(p.name)]


def test_every_testpath_is_a_kind_with_a_registered_marker():
    registered = {m.split(":", 1)[0].strip() for m in PYTEST["markers"]}
    assert set(TEST_KINDS) <= registered
    assert {p.removeprefix("tests/") for p in PYTEST["testpaths"]} <= set(TEST_KINDS)
    assert "--strict-markers" in PYTEST["addopts"]


def test_this_test_carries_its_folders_marker(request):
    assert request.node.get_closest_marker("unit")
    assert not request.node.get_closest_marker("integration")


class Item:
    def __init__(self, path: Path):
        self.path, self.markers = path, []

    def add_marker(self, marker) -> None:
        self.markers.append(marker.name)


EXPLICIT = SimpleNamespace(args_source=pytest.Config.ArgsSource.ARGS)  # `pytest <paths>`


def test_the_hook_marks_each_test_with_its_folder():
    items = [Item(TESTS / kind / "sub" / "test_x.py") for kind in TEST_KINDS] + [Item(ROOT / "loadtest" / "test_y.py")]
    pytest_collection_modifyitems(EXPLICIT, items)
    assert [i.markers for i in items] == [[kind] for kind in TEST_KINDS] + [[]]  # outside tests/: left alone


@pytest.mark.parametrize("path", ["newkind/test_x.py", "test_at_the_top.py"])
def test_a_test_outside_the_known_folders_stops_the_collection(path):
    with pytest.raises(pytest.UsageError, match="tests/" + path.split("/")[0] + " is "):
        pytest_collection_modifyitems(EXPLICIT, [Item(TESTS / "unit" / "test_ok.py"), Item(TESTS / path)])


def test_a_plain_run_stops_when_a_folder_of_tests_is_not_in_testpaths():
    def config(testpaths):
        return SimpleNamespace(args_source=pytest.Config.ArgsSource.TESTPATHS, getini={"testpaths": testpaths}.get)

    pytest_collection_modifyitems(config(sorted(folders_with_tests())), [])
    with pytest.raises(pytest.UsageError, match="tests/tls is not in testpaths"):
        pytest_collection_modifyitems(config(sorted(folders_with_tests() - {"tests/tls"})), [])
