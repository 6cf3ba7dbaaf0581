"""The built wheel: only `maskstream` at the top of site-packages, and it works from a folder that would shadow
the old top-level names (its own loader.py and pipeline.py); `import maskstream` alone stays light."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, TOKENIZER, write_sotu_subset

SOURCES = ("pyproject.toml", "README.md", "maskstream", "pipeline", "loader", "trainer", "bench")


def run(*cmd, cwd=None) -> str:
    """Run cmd; on failure, fail the test with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of its sources (the checkout's build/ and egg-info untouched)."""
    pytest.importorskip("build", reason="`build` is in the test extra: make install")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", src / "dist", src)
    (whl,) = (src / "dist").glob("maskstream-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_only_the_maskstream_package_and_its_dist_info(wheel):
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert "maskstream" in tops
    assert all(t == "maskstream" or (t.startswith("maskstream-") and t.endswith(".dist-info")) for t in tops), tops
    names = zipfile.ZipFile(wheel).namelist()
    for sub in ("pipeline", "loader", "trainer", "bench", "workflows"):
        assert f"maskstream/{sub}/__init__.py" in names


@pytest.mark.slow
def test_installed_wheel_preprocesses_and_loads_from_a_folder_with_its_own_loader_and_pipeline(wheel, tmp_path):
    # a fresh venv holding only the wheel; its dependencies are borrowed from this one through a .pth file,
    # written after the install so pip never sees this environment's (editable) maskstream
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    borrowed = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]   # .pth chains too
    (purelib / "borrowed-deps.pth").write_text("\n".join(borrowed) + "\n")

    work = tmp_path / "work"      # the current folder comes first on sys.path with `python -m` and `-c`
    work.mkdir()
    for name in ("loader", "pipeline"):
        (work / f"{name}.py").write_text(f"raise ImportError('the local {name}.py was imported')\n")
    corpus = write_sotu_subset(work / "sotu-4.jsonl", 4)
    run(python, "-m", "maskstream.pipeline.run", "--input", corpus, "--tokenizer", TOKENIZER, "--output",
        work / "shards", "--direct_running_mode=in_memory", "--quiet", cwd=work)
    out = run(python, "-c", """if True:
        import maskstream
        from maskstream import LoaderConfig, MaskingConfig, MLMLoader
        loader = MLMLoader("shards", LoaderConfig(batch_size=4), masking=MaskingConfig())
        batch = next(iter(loader))
        print(maskstream.__file__)
        print(tuple(batch["input_ids"].shape), int((batch["labels"] != -100).sum()))
        """, cwd=work)
    where, shape = out.splitlines()[-2:]
    assert Path(where).is_relative_to(purelib) and shape.startswith("(4, ")


def test_import_maskstream_alone_loads_neither_torch_nor_beam(tmp_path):
    out = run(sys.executable, "-c", "import sys, maskstream; "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'apache_beam'}))", cwd=tmp_path)
    assert out.strip() == "[]"
