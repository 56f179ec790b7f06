"""The Dockerfile's SGLang base image must be the release pyproject.toml pins (Docker cannot build here)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pinned_sglang() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in deps if re.match(r"sglang\s*==", d)]
    return pin.split("==")[1].strip()


def test_base_image_matches_the_sglang_pin():
    dockerfile = (ROOT / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    match = re.fullmatch(r"lmsysorg/sglang:v(\d+\.\d+\.\d+(?:\.post\d+)?)(-cu\d+)?", base)
    assert match, f"FROM {base} is not a pinned lmsysorg/sglang release tag"
    assert match.group(1) == pinned_sglang()
    assert f"sglang.__version__ == '{pinned_sglang()}'" in dockerfile  # the build-time check agrees too


def test_entrypoint_is_our_launcher_and_the_context_is_small():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python3", "-m", "easyep_sglang.launch"]' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
