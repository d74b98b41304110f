"""The package as users install it: one `chestxpert` namespace in a wheel, installed into a
fresh virtualenv next to Hugging Face `datasets`, and run from outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_layers import LAYERS

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def test_every_package_folder_is_in_the_wheel_under_chestxpert() -> None:
    """A new subpackage that is not listed in pyproject.toml would be missing from the wheel
    (the editable install would still find it, so only this test notices)."""
    mapping = SETUPTOOLS["package-dir"]
    assert mapping == {"chestxpert": "chestxpert"} | {f"chestxpert.{p}": p for p in LAYERS[:-1]}
    expected = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            expected.add(".".join((package, *relative)))
    assert expected <= set(SETUPTOOLS["packages"]), sorted(expected - set(SETUPTOOLS["packages"]))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (a build writes `build/` beside them)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in SETUPTOOLS["package-dir"].values():
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert "deprecat" not in build.stderr.lower(), build.stderr
    (found,) = out.glob("chestxpert-*.whl")
    return found


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"chestxpert", wheel.name.split("-py3")[0] + ".dist-info"}, top
    for data in (
        "chestxpert/cli.py",
        "chestxpert/datasets/nih_label_rates.json",
        "chestxpert/sweeps/examples/demo-cpu.yaml",
        "chestxpert/sweeps/spec.schema.json",  # the examples' yaml-language-server $schema
    ):
        assert data in names, data
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    )
    assert b"License-Expression: MIT" in metadata


def _venv_with_project_dependencies(root: Path) -> Path:
    """A new virtualenv whose third-party packages are the project venv's, read-only.

    Installing TensorFlow, Ray and MLflow again would cost minutes and 3 GB per run; the
    venv instead sees them through a folder of links to every distribution of the project
    venv except ChestXpert itself (and its editable-install hook), so the only ChestXpert
    it can import is the wheel installed into it.
    """
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    borrowed = root / "borrowed-site-packages"
    borrowed.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name.startswith(("chestxpert", "__editable__", "_chestxpert")):
            continue
        (borrowed / entry.name).symlink_to(entry)
    (purelib,) = (root / "lib").glob("python3*/site-packages")
    # appended after the venv's own site-packages: what the venv installs wins
    (purelib / "zz_borrowed.pth").write_text(f"{borrowed}\n")
    return root / "bin"


def test_installed_wheel_runs_outside_the_repo_beside_hugging_face_datasets(
    wheel: Path, tmp_path: Path
) -> None:
    bin_dir = _venv_with_project_dependencies(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHESTXPERT_", "PYTHON"))}
    env["CHESTXPERT_WORKSPACE"] = str(tmp_path / "ws")
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*argv: str, timeout: float = 600) -> str:
        result = subprocess.run(
            argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, f"{argv}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
    run(*pip, "--no-deps", str(wheel))
    run(*pip, "datasets")  # Hugging Face's, with whatever it needs beyond the project's packages
    where = run(
        str(bin_dir / "python"),
        "-c",
        "import datasets, chestxpert.datasets as ours, chestxpert.cli as cli, chestxpert.demo;"
        "assert chestxpert.demo.DEMO_SPEC.is_file(), chestxpert.demo.DEMO_SPEC;"
        "from chestxpert.sweeps.spec.reference import SCHEMA_FILE; assert SCHEMA_FILE.is_file();"
        "print(datasets.load_dataset.__module__); print(ours.__file__); print(cli.__file__);"
        "print(chestxpert.demo.DEMO_SPEC)",
    ).split()
    assert where[0].startswith("datasets."), "the name `datasets` is Hugging Face's"
    for path in where[1:]:
        assert path.startswith(str(tmp_path / "venv")) and str(REPO) not in path, path

    chestxpert = str(bin_dir / "chestxpert")
    version = PYPROJECT["project"].get("version") or run(chestxpert, "--version").split()[-1]
    assert run(chestxpert, "--version").strip() == f"chestxpert {version}"
    run(
        chestxpert,
        "data",
        "synth",
        "--out",
        "synth",
        "--images",
        "12",
        "--size",
        "64",
        "--workers",
        "1",
    )
    assert len(list((work / "synth").rglob("*.png"))) == 12
    # The dry run opens the dataset it names (and checks its image size against the backbone).
    prepare = ("--source", "nih", "--input", "synth", "--out", "prepared", "--image-size", "64")
    run(chestxpert, "data", "prepare", *prepare, "--workers", "1")
    (work / "spec.yaml").write_text(
        "name: from-a-wheel\ndataset: prepared\n"
        "trial: {backbone: densenet_tiny, image_size: 64, epochs: 2}\n"
        "space:\n  learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
    )
    plan = run(chestxpert, "sweep", "run", "spec.yaml", "--dry-run")
    assert "from-a-wheel" in plan and "learning_rate: loguniform(0.0001, 0.01)" in plan
