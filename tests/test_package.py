"""Package-level behaviour: the quick-start job, the extension's build info, no silent fallback."""
import importlib

import pytest

from mcsmoe_fast import _ext


def test_demo_runs_the_pipeline():
    from mcsmoe_fast.demo.tour import run_demo

    lines = []
    figures = run_demo(print_fn=lines.append)
    assert set(figures) == {"switch", "mixtral"}
    for family, f in figures.items():
        assert f["aligned_change"] <= 1e-4, (family, f)  # alignment keeps the function (1e-5 bound: test_permute)
        assert f["load_change"] <= 1e-5, (family, f)  # the saved merged model loads back exactly
        assert f["size_ratio"] < 0.5, (family, f)  # a quarter of the experts: a much smaller file
    assert any("neurons moved" in line for line in lines) and any("groups per layer" in line for line in lines)


def test_build_info():
    assert isinstance(_ext._C.cuda_enabled, bool)
    assert _ext._C.openmp_threads() >= 1


def test_missing_extension_says_how_to_build(monkeypatch):
    real = importlib.import_module

    def fake_import(name, *args):
        if name == "mcsmoe_fast._C":
            raise ImportError("simulated: no such file")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match="pip install --no-build-isolation"):
        _ext.load()


def test_source_tree_without_extension_says_so(monkeypatch, tmp_path):
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "mcsmoe_fast").mkdir()
    monkeypatch.setattr(_ext, "__file__", str(tmp_path / "mcsmoe_fast" / "_ext.py"))
    monkeypatch.setattr(_ext, "_installed_elsewhere", lambda package_dir: tmp_path / "site-packages" / "mcsmoe_fast")
    message = _ext._hint(ImportError("no _C"))
    assert "source tree" in message and str(tmp_path / "mcsmoe_fast") in message
    assert "site-packages" in message and "another directory" in message and "build_ext --inplace" in message
    (tmp_path / "mcsmoe_fast" / "_C.cpython-311-x86_64-linux-gnu.so").write_text("")  # built in place: other cause
    assert "source tree" not in _ext._hint(ImportError("no _C"))


def test_an_older_transformers_is_refused_at_import_naming_both_versions():
    """transformers before MIN_TRANSFORMERS routes some families differently (Ernie 4.5 silently): refused at import
    with the installed and the required version; pyproject.toml states the same floor."""
    import re
    from pathlib import Path

    from mcsmoe_fast._requirements import MIN_TRANSFORMERS, check_transformers

    for older in ("5.0.0", "5.17.0", "5.23.1", "5.24.0.dev0"):
        with pytest.raises(ImportError, match=re.escape(f"needs transformers>={MIN_TRANSFORMERS}, found {older}")):
            check_transformers(older)
    for newer in (MIN_TRANSFORMERS, "5.25.0", "6.0.0"):
        check_transformers(newer)
    check_transformers()  # the installed one
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"transformers>=([\d.]+)"', pyproject).group(1)
    assert [int(x) for x in floor.split(".")] + [0] * (3 - len(floor.split("."))) == \
        [int(x) for x in MIN_TRANSFORMERS.split(".")]


def test_an_older_torch_is_refused_at_import_naming_both_versions():
    import re
    from pathlib import Path

    from mcsmoe_fast._requirements import MIN_TORCH, check_torch

    for older in ("2.4.0", "2.6.0+cu124", "2.7.1"):
        with pytest.raises(ImportError, match=re.escape(f"needs torch>={MIN_TORCH}, found {older}")):
            check_torch(older)
    for newer in ("2.8.0", "2.8.0+cu128", "2.11.0+cu130", "2.13.0"):
        check_torch(newer)
    check_torch()  # the installed one
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.findall(r'"torch>=([\d.]+)"', pyproject) == [MIN_TORCH, MIN_TORCH]  # build and run time
