"""The notebooks in notebooks/: stored without outputs, and each runs top to bottom in SMOKE mode
(tiny sizes, CPU, no downloads) through a real Jupyter kernel (nbclient)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_step6_colab", "03_step7_colab", "04_bk_core"]


def test_every_notebook_is_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_has_parameters(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    assert "REPO_URL" in code[0].source and "pip" in code[0].source, "first cell: clone if needed, then pip install -e"
    assert any("SMOKE" in c.source for c in code[1:3]), "a parameters cell with the SMOKE switch"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("RESNET_BK_SMOKE", "1")
    monkeypatch.setenv("RESNET_BK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # nothing may be downloaded
        monkeypatch.setenv(var, "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    print(f"{path.stem}: {time.perf_counter() - start:.1f}s")


def setup_cell(path: Path) -> str:
    nbformat = pytest.importorskip("nbformat")
    return next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def test_every_notebook_explains_colab_and_shares_one_setup_cell():
    nbformat = pytest.importorskip("nbformat")
    for path in NOTEBOOKS:
        intro = next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
        assert f"colab.research.google.com/github/OWNER/REPO/blob/main/notebooks/{path.name}" in intro, path
        assert ".zip" in intro and "REPO_URL" in intro, path  # both ways in are explained
    assert len({setup_cell(path) for path in NOTEBOOKS}) == 1


@pytest.mark.parametrize("copy", ["uploaded_zip", "git_url"])
def test_setup_cell_finds_an_uploaded_zip_or_clones_a_git_url(tmp_path, copy):
    """The setup cell, run where Colab runs it (an empty working folder), finds the package in an
    uploaded .zip (with GitHub's top folder) or in a clone of REPO_URL. The package is importable in
    the test environment, so the cell installs nothing; the copy holds only the files it looks for."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = setup_cell(NOTEBOOKS[0])
    files = ["pyproject.toml", "resnet_bk/bk_core.py"]
    work = tmp_path / "content"
    work.mkdir()
    if copy == "uploaded_zip":
        with zipfile.ZipFile(work / "resnet-bk-main.zip", "w") as archive:
            for name in files:
                archive.write(ROOT / name, f"resnet-bk-main/{name}")
        expected = work / "resnet-bk-src" / "resnet-bk-main"
    else:
        if shutil.which("git") is None:
            pytest.skip("no git")
        origin = tmp_path / "origin"
        for name in files:
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, origin / name)
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
        for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "copy"]):
            subprocess.run([*git, *args], cwd=origin, check=True)
        source = source.replace('REPO_URL = ""', f'REPO_URL = "{origin.as_uri()}"', 1)
        expected = work / "resnet-bk"
    run = subprocess.run([sys.executable, "-c", source], cwd=work, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == f"repository: {expected.resolve()}"
