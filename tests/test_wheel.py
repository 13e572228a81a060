"""The built wheel: it holds every package of grpo_fast/, the kernels and the model shapes, and
its planner, installed away from the source checkout, plans the shipped hub-id presets from
another directory.

    pytest tests/test_wheel.py

The wheel is built without build isolation (setuptools comes with the dev extra) from a copy of
the files the build reads, so nothing is written into the checkout. It is installed with
`pip install --target` and imported through PYTHONPATH, with the editable install's finder
taken off sys.meta_path: a package missing from the wheel then fails to import instead of being
found in the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from grpo_fast.plan import HUB_SHAPES

REPO = Path(__file__).resolve().parents[1]

# What pyproject.toml's build reads: its packages (two mapped from outside grpo_fast/), the
# readme and the license.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "grpo_fast", "kernels", "configs/models")

# Run inside the installed copy: plans each preset given on the command line (copied into the
# working directory) and reports what it printed and where every grpo_fast module came from.
PLAN_FROM_WHEEL = """
import contextlib, io, json, sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable___grpo_fast")]
from grpo_fast.cli import main
from grpo_fast.plan import SHAPES_DIR
plans = {}
for preset in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["plan", "--config", preset, "--gpu-memory", "12GiB"])
    plans[preset] = {"rc": rc, "out": out.getvalue()}
files = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
         if name == "grpo_fast" or name.startswith("grpo_fast.")}
print(json.dumps({"plans": plans, "files": files, "shapes_dir": str(SHAPES_DIR)}))
"""


def _hub_presets() -> list[Path]:
    """The shipped preset configs whose model_path is a hub id with a shipped shape."""
    return [p for p in sorted((REPO / "configs").glob("*.yaml"))
            if str(yaml.safe_load(p.read_text()).get("model_path", "")).lower() in HUB_SHAPES]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
          "-q", "-w", str(tmp / "dist")])
    (built,) = (tmp / "dist").glob("grpo_fast-*.whl")
    return built


def test_wheel_holds_every_package_the_kernels_and_the_model_shapes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"grpo_fast/{p.relative_to(REPO / 'grpo_fast').as_posix()}"
                for p in (REPO / "grpo_fast").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"grpo_fast/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    expected |= {f"grpo_fast/model_configs/{p.name}"
                 for p in (REPO / "configs" / "models").glob("*.json")}
    assert "grpo_fast/model_configs/qwen2.5-1.5b.json" in expected
    assert "grpo_fast/kernels/__init__.py" in expected
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"


def test_installed_wheel_plans_the_hub_presets_from_another_directory(wheel, tmp_path):
    site, work = tmp_path / "site", tmp_path / "work"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
          str(wheel)])
    presets = _hub_presets()
    assert len(presets) >= 3
    work.mkdir()
    for preset in presets:
        shutil.copy2(preset, work / preset.name)
    # An empty Hugging Face cache, so the shapes can only come from the wheel.
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1"}
    done = _run([sys.executable, "-c", PLAN_FROM_WHEEL, *(p.name for p in presets)], cwd=work,
                env=env)
    report = json.loads(done.stdout.strip().splitlines()[-1])

    elsewhere = {name: f for name, f in report["files"].items()
                 if f and not f.startswith(str(site))}
    assert report["files"]["grpo_fast"] == str(site / "grpo_fast" / "__init__.py")
    assert not elsewhere, f"imported from outside the installed wheel: {elsewhere}"
    assert report["shapes_dir"] == str(site / "grpo_fast" / "model_configs")
    for preset in presets:
        model_path = yaml.safe_load(preset.read_text())["model_path"]
        plan = report["plans"][preset.name]
        assert plan["rc"] == 0, plan
        assert f"VRAM plan for {model_path} (online GRPO)" in plan["out"]
        assert f"shape from configs/models/{HUB_SHAPES[model_path.lower()]}" in plan["out"]
        assert "card 12GiB (12.00 GiB): " in plan["out"]
        assert "largest that fit" in plan["out"]
