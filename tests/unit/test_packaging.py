"""What ships: the product's wheel holds `preshard` only; the dev tooling is its own
distribution (dev/pyproject.toml) that adds `preshard demo` through an entry point.

The wheels are built for real (``pip wheel --no-deps --no-build-isolation``, the
setuptools/wheel pinned in the Makefile) from a copy of the sources in a temporary
directory, so the build never writes into the checkout, and their listings are read back.
"""

from __future__ import annotations

import configparser
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from preshard import __version__
from preshard.cli import PLUGIN_GROUP, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEV_PYPROJECT = tomllib.loads((ROOT / "dev" / "pyproject.toml").read_text())
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")


def build_wheel(project: Path, out: Path) -> Path:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(project)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def source_files(package: Path) -> set[str]:
    """The files a wheel must hold for this package directory: modules and py.typed."""
    return {
        p.relative_to(package.parent).as_posix()
        for p in package.rglob("*")
        if p.is_file()
        and (p.suffix == ".py" or p.name == "py.typed")
        and "__pycache__" not in p.parts
    }


def entry_points_of(wheel: zipfile.ZipFile, dist_info: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep the case of names
    parser.read_string(wheel.read(f"{dist_info}/entry_points.txt").decode())
    return {s: {k: v.strip() for k, v in parser[s].items()} for s in parser.sections()}


@pytest.fixture(scope="module")
def product_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    src = tmp_path_factory.mktemp("src")
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    # the whole operator/ tree, dev tooling included: the build itself must leave it out
    shutil.copytree(ROOT / "operator", src / "operator", ignore=IGNORE)
    with zipfile.ZipFile(build_wheel(src, tmp_path_factory.mktemp("dist"))) as whl:
        yield whl


@pytest.fixture(scope="module")
def dev_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    src = tmp_path_factory.mktemp("devsrc")
    shutil.copytree(ROOT / "dev", src / "dev", ignore=IGNORE)
    shutil.copytree(ROOT / "operator", src / "operator", ignore=IGNORE)
    with zipfile.ZipFile(build_wheel(src / "dev", tmp_path_factory.mktemp("devdist"))) as whl:
        yield whl


def test_the_wheel_holds_the_preshard_package_and_nothing_else(
    product_wheel: zipfile.ZipFile,
) -> None:
    names = product_wheel.namelist()
    dist_info = f"preshard-{__version__}.dist-info"
    assert not [n for n in names if "preshard_dev" in n]
    outside = [n for n in names if not n.startswith(("preshard/", f"{dist_info}/"))]
    assert outside == []
    # every module of the product, every subpackage included, and the typing marker
    assert {n for n in names if n.startswith("preshard/")} == source_files(
        ROOT / "operator" / "preshard"
    )
    assert "preshard/py.typed" in names


def test_the_wheel_declares_the_console_script_and_the_vllm_plugin(
    product_wheel: zipfile.ZipFile,
) -> None:
    dist_info = f"preshard-{__version__}.dist-info"
    eps = entry_points_of(product_wheel, dist_info)
    assert eps == {
        "console_scripts": PYPROJECT["project"]["scripts"],
        **PYPROJECT["project"]["entry-points"],
    }
    assert eps["console_scripts"] == {"preshard": "preshard.cli:main"}
    assert "vllm.general_plugins" in eps  # the worker's vLLM plugin
    # every entry point names a module the wheel holds
    names = set(product_wheel.namelist())
    for group, entries in eps.items():
        for name, target in entries.items():
            path = target.partition(":")[0].replace(".", "/")
            assert {f"{path}.py", f"{path}/__init__.py"} & names, (group, name, target)
    assert PLUGIN_GROUP not in eps  # the product contributes no dev command
    meta = email.parser.Parser().parsestr(product_wheel.read(f"{dist_info}/METADATA").decode())
    assert meta["Name"] == "preshard"
    assert [Requirement(r) for r in meta.get_all("Requires-Dist") or []] == [
        Requirement(r) for r in PYPROJECT["project"]["dependencies"]
    ]


def test_the_dev_wheel_holds_the_dev_tooling_and_registers_demo(
    dev_wheel: zipfile.ZipFile,
) -> None:
    names = dev_wheel.namelist()
    dist_info = f"preshard_dev-{DEV_PYPROJECT['project']['version']}.dist-info"
    assert {n for n in names if not n.startswith(f"{dist_info}/")} == source_files(
        ROOT / "operator" / "preshard_dev"
    )
    assert "preshard_dev/emulator/__init__.py" in names  # subpackages too
    eps = entry_points_of(dev_wheel, dist_info)
    assert eps == {PLUGIN_GROUP: {"demo": "preshard_dev.commands:register_demo"}}


def test_no_product_module_names_the_dev_tooling() -> None:
    # import-linter sees imports; this also catches a module named in a string
    # (importlib.import_module("preshard_dev..."), entry points written in code).
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "operator" / "preshard").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"preshard_dev", line)
    ]
    assert hits == []


# ------------------------------------------------------------ the preshard.commands group


def fake_distribution(site: Path, module: str, body: str, entry: str) -> None:
    """A real installed distribution (dist-info + module) on a directory of sys.path."""
    (site / f"{module}.py").write_text(body)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\n{entry}\n")


PLUGIN = """
calls = []

def register(sub):
    p = sub.add_parser("hello", help="say hello")
    p.add_argument("--to", default="world")
    return run

def run(args):
    calls.append(args.to)
    return 7
"""


def test_a_plugin_command_is_discovered_parsed_and_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "hello" not in subcommands()
    fake_distribution(
        tmp_path, "preshard_hello_plugin", PLUGIN, "hello = preshard_hello_plugin:register"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "hello" in subcommands()
    assert build_parser().parse_args(["hello", "--to", "you"]).to == "you"
    assert main(["hello", "--to", "you"]) == 7  # the plugin's own exit code
    assert sys.modules["preshard_hello_plugin"].calls == ["you"]
    sys.modules.pop("preshard_hello_plugin")


def test_a_plugin_never_replaces_a_built_in_command_and_a_broken_one_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution(
        tmp_path, "preshard_bad_plugin", PLUGIN, "convert = preshard_bad_plugin:register"
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "gone-1.0.dist-info").mkdir()
    (other / "gone-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gone\nVersion: 1.0\n"
    )
    (other / "gone-1.0.dist-info" / "entry_points.txt").write_text(
        f"[{PLUGIN_GROUP}]\ngone = preshard_module_that_is_gone:register\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(other))
    names = subcommands()
    assert "gone" not in names
    # `convert` is still the worker's: its flags, not the plugin's
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--to", "x"])
    assert "preshard_bad_plugin" not in sys.modules  # a shadowed plugin is not even loaded


def subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if a.dest == "command")
    assert isinstance(sub.choices, dict)
    return set(sub.choices)


def test_the_declared_demo_entry_point_registers_demo_with_its_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the entry point exactly as dev/pyproject.toml declares it, installed as metadata
    # (make install does the same with the real preshard-dev distribution)
    target = DEV_PYPROJECT["project"]["entry-points"][PLUGIN_GROUP]["demo"]
    assert target == "preshard_dev.commands:register_demo"
    info = tmp_path / "demo_entry-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-entry\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\ndemo = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = build_parser().parse_args(["demo", "--keep", "--dir", "/tmp/d"])
    assert (args.command, args.keep, args.dir, args.example) == ("demo", True, "/tmp/d", None)
    # building the parser imports only the light registration module, never the stack
    probe = (
        "import sys; from preshard.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('preshard_dev')))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "['preshard_dev', 'preshard_dev.commands']"
