"""What the Dockerfile's image would do, run here from the Dockerfile's own instructions (Docker cannot run here).

The build context is made by the Dockerfile's COPY lines under .dockerignore's rules; its `pip install .` is done
offline, non-editable, into a folder; then the RUN step's check, the ENTRYPOINT + CMD and every documented
`python -m easyep_sglang.<command>` run against that installed copy: `python -S` (no .pth file, so the editable
install of this checkout is out of sight) with only the installed copy and the venv's site-packages on the path,
from a directory outside the repository. Only the base image is taken on trust: its tag must be the pinned SGLang.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = ("calibrate", "select", "mask", "launch", "prune", "plan", "accuracy", "demo", "demo_model")


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    split = [line.split(None, 1) for line in text.splitlines() if line.strip()]
    return [(instruction.upper(), args.strip()) for instruction, args in split]


def only(name: str) -> str:
    [args] = [args for instruction, args in instructions() if instruction == name]
    return args


def run_commands() -> list[list[str]]:
    """The RUN steps as argv lists, split at `&&`."""
    commands = []
    for instruction, args in instructions():
        if instruction == "RUN":
            tokens = shlex.split(args)
            while "&&" in tokens:
                commands.append(tokens[:tokens.index("&&")])
                tokens = tokens[tokens.index("&&") + 1:]
            commands.append(tokens)
    return commands


def pinned_sglang() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in deps if re.match(r"sglang\s*==", d)]
    return pin.split("==")[1].strip()


def glob_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: `**` any number of folders, `*` and `?` within one name."""
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip().lstrip("!").strip().strip("/"))
    glob = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(glob.get(part, re.escape(part)) for part in parts))


def dockerignored(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides; `!` re-includes."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    prefixes = ["/".join(relative.split("/")[:i + 1]) for i in range(relative.count("/") + 1)]
    decision = False
    for line in (line for line in lines if line and not line.startswith("#")):
        if any(glob_regex(line).fullmatch(prefix) for prefix in prefixes):
            decision = not line.startswith("!")
    return decision


def context_files(source: str) -> list[Path]:
    """The files of `source` (relative to the repository) that the build context holds."""
    path = ROOT / source
    if path.is_file():
        return [path]
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not dockerignored(os.path.relpath(Path(folder, d), ROOT))]
        found += [Path(folder, f) for f in files if not dockerignored(os.path.relpath(Path(folder, f), ROOT))]
    return found


def copies() -> list[tuple[list[str], str]]:
    """The COPY steps: (sources, destination)."""
    return [(args.split()[:-1], args.split()[-1]) for instruction, args in instructions() if instruction == "COPY"]


def copy_into(workdir: Path) -> None:
    """The COPY steps, each source as Docker copies it: a folder's contents into the destination."""
    for sources, dest in copies():
        for source in sources:
            base = ROOT / source if (ROOT / source).is_dir() else (ROOT / source).parent
            target = workdir / dest if dest.endswith("/") or (ROOT / source).is_dir() else (workdir / dest).parent
            for file in context_files(source):
                (target / file.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target / file.relative_to(base))


@dataclass
class Image:
    installed: Path  # where `pip install .` put the package
    outside: Path  # an empty working directory

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        """`python3 ARGS` in the image: this venv's interpreter, seeing the installed copy and the venv's packages."""
        assert argv[0] == "python3", argv
        venv = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
        env = {"PATH": os.environ["PATH"], "HOME": str(self.outside), **image_env(),
               "PYTHONPATH": os.pathsep.join([str(self.installed), *venv])}
        return subprocess.run([sys.executable, "-S", *argv[1:]], cwd=self.outside, env=env, capture_output=True,
                              text=True, timeout=300)


def image_env() -> dict[str, str]:
    env = {}
    for instruction, args in instructions():
        if instruction == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(args))
    return env


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    root = tmp_path_factory.mktemp("image")
    workdir, installed, outside = root / "workdir", root / "site", root / "outside"
    outside.mkdir()
    copy_into(workdir)
    [install, *_checks] = run_commands()
    assert install == ["python3", "-m", "pip", "install", "."], "the test builds the package as this RUN step does"
    # The same install, offline and into a folder: a wheel built from the copied context, not an editable link.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--no-compile", "--target", str(installed), "."], cwd=workdir, check=True,
                   env={**os.environ, **image_env()}, timeout=300)
    return Image(installed, outside)


def test_base_image_matches_the_sglang_pin():
    base = only("FROM")
    match = re.fullmatch(r"lmsysorg/sglang:v(\d+\.\d+\.\d+(?:\.post\d+)?)(-cu\d+)?", base)
    assert match, f"FROM {base} is not a pinned lmsysorg/sglang release tag"
    assert match.group(1) == pinned_sglang()
    [check] = [argv for argv in run_commands() if argv[:2] == ["python3", "-c"]]
    assert f"sglang.__version__ == '{pinned_sglang()}'" in check[2]  # the build-time check agrees too


def test_the_build_context_has_what_copy_needs_leaves_out_the_venv_and_git_and_is_small():
    for source in (source for sources, _ in copies() for source in sources):
        assert (ROOT / source).exists() and not dockerignored(source), f"COPY {source}: not in the build context"
    assert not dockerignored("easyep_sglang/data/demo_moe/model.safetensors")
    for bulky in (".venv/bin/python", ".git/HEAD", "easyep_sglang/__pycache__/a.pyc", "easyep_sglang.egg-info/RECORD"):
        assert dockerignored(bulky), bulky
    sent = context_files(".")  # what `docker build .` sends to the daemon
    assert sum(f.stat().st_size for f in sent) < 100e6, f"{sum(f.stat().st_size for f in sent) / 1e6:.0f} MB"


def test_pip_install_ships_every_module_and_data_file(image):
    def files(package: Path) -> dict[str, int]:
        return {str(f.relative_to(package)): f.stat().st_size for f in package.rglob("*")
                if f.is_file() and "__pycache__" not in f.parts}

    source, installed = files(ROOT / "easyep_sglang"), files(image.installed / "easyep_sglang")
    assert installed == source, sorted(set(source.items()) ^ set(installed.items()))
    for needed in ("select/__main__.py", "data/demo_moe/model.safetensors", "data/demo_mask_math.json",
                   "sglang_plugin/cpu_shim/sgl_kernel/__init__.py"):
        assert needed in installed, needed
    assert not (image.installed / "easyep_sglang" / "select" / "__init__.py").exists()  # a namespace folder


def test_build_check_and_entrypoint_run_against_the_installed_copy(image):
    for argv in run_commands()[1:]:
        proc = image.run(argv)
        assert proc.returncode == 0, f"RUN {shlex.join(argv)}:\n{proc.stderr[-2000:]}"
    command = json.loads(only("ENTRYPOINT")) + json.loads(only("CMD"))
    proc = image.run(command)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m easyep_sglang.launch") and "--mask" in proc.stdout, proc.stdout


# Each command as `python -m` runs it, in one process so that the imports they share are paid once.
COMMANDS = """
import contextlib, importlib.metadata, io, json, os, runpy, sys
site, report = sys.argv[1] + os.sep, {}

def run(module, *argv):
    sys.argv, out = [module, *argv], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = None
    except SystemExit as stop:
        code = stop.code
    return {"exit": code or 0, "stdout": out.getvalue()}

for command in sys.argv[2:]:
    report[command] = run(f"easyep_sglang.{command}", "--help")
from easyep_sglang.demo.server import DEMO_MASK, DEMO_MODEL
report["demo mask check"] = run("easyep_sglang.mask", "check", str(DEMO_MASK), "--model-path", str(DEMO_MODEL))
[plugin] = importlib.metadata.distribution("easyep-sglang").entry_points.select(group="sglang.srt.plugins")
report["plugin"] = f"{plugin.name}={plugin.load().__module__}"
origins = {name: getattr(module, "__file__", None) or next(iter(module.__path__))
           for name, module in sys.modules.items() if name.startswith("easyep_sglang")}
report["loaded from elsewhere"] = sorted(name for name, origin in origins.items() if not origin.startswith(site))
print(json.dumps(report))
"""


def test_every_documented_command_starts_from_the_installed_copy(image):
    documented = set(re.findall(r"-m easyep_sglang\.(\w+)(?![\w.])", "\n".join(
        p.read_text() for p in (ROOT / "README.md", ROOT / "launch" / "README.md", *ROOT.glob("launch/*.sh")))))
    assert documented >= set(DOCUMENTED), set(DOCUMENTED) - documented
    proc = image.run(["python3", "-c", COMMANDS, str(image.installed), *sorted(documented)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    for command in documented:
        assert report[command]["exit"] == 0, (command, report[command])
        assert report[command]["stdout"].startswith(f"usage: python -m easyep_sglang.{command}"), report[command]
    mask_check = report["demo mask check"]  # the bundled model and mask, as launch/cpu_demo.sh checks them first
    assert mask_check["exit"] == 0 and "experts kept" in mask_check["stdout"], mask_check
    assert report["plugin"] == "easyep=easyep_sglang.sglang_plugin"  # SGLang finds the plugin in the installed copy
    assert report["loaded from elsewhere"] == []
