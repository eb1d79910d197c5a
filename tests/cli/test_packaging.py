"""The repo as a user meets it: processes started in the repo root, and the wheel that `pip install` builds."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _source_packages() -> set[str]:
    """Every folder of the source tree that holds Python modules, under the name the install gives it."""
    found = set()
    for top, name in ((ROOT / "fastppo", "fastppo"), (ROOT / "kernels", "fastppo.kernels")):
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and not (Path(folder, d).is_symlink())]
            if any(f.endswith(".py") for f in files):
                rel = Path(folder).relative_to(top).parts
                found.add(".".join((name, *rel)))
    return found


def test_repo_root_does_not_shadow_huggingface_kernels():
    """transformers imports Hugging Face's `kernels`; a Python started in the repo root has the root on sys.path
    and must still find the installed package, not the repo's kernels/ folder (which is fastppo.kernels)."""
    if importlib.util.find_spec("kernels") is None:
        pytest.fail("Hugging Face's kernels package is not installed (transformers requires it): run .ci/install")
    script = (
        "import importlib.util, sys\n"
        "import transformers\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,\n"
        "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
        "import kernels, fastppo.kernels.logprobs\n"
        "print(importlib.util.find_spec('kernels').origin)\n"
        "print(kernels.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in out.stdout.split():   # (a virtual environment inside the clone is fine: not the repo's folder)
        assert not Path(line).resolve().is_relative_to(ROOT / "kernels"), f"'kernels' is the repo's folder: {line}"
    cli = subprocess.run([sys.executable, "-m", "fastppo.cli", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and cli.stdout.startswith("fastppo "), cli.stderr[-3000:]


def test_wheel_ships_every_package(tmp_path):
    """The wheel holds every package of the source tree (an editable install would hide a missing one). Built from
    a copy of the tracked layout, so a build/ folder left in the clone cannot interfere."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fastppo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith(".py")}
    missing = _source_packages() - shipped
    assert not missing, f"the wheel leaves out {sorted(missing)}"
    assert "fastppo/py.typed" in names
    for name in ("fastppo/kernels/logprobs.py", "fastppo/integrations/trl.py", "fastppo/trainer/cli.py"):
        assert name in names
