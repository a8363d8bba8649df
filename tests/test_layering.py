"""The library core never imports the application layer (commands, integrations, run-output plotting), not even
lazily inside a function: read from the source of every core module."""

import ast
from pathlib import Path

import noisescale

PACKAGE = Path(noisescale.__file__).resolve().parent
APPLICATION_LAYER = ("noisescale.app", "noisescale.integrations")


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
    return names


def _core_modules() -> list[Path]:
    layers = {PACKAGE / name.split(".")[1] for name in APPLICATION_LAYER}
    return [path for path in PACKAGE.rglob("*.py") if not any(layer in path.parents for layer in layers)
            and path.name != "__main__.py"]


def test_the_core_imports_no_command_integration_or_plotting_module():
    core = _core_modules()
    assert len(core) >= 15 and PACKAGE / "monitor.py" in core and PACKAGE / "per_example" / "api.py" in core
    offending = {str(path.relative_to(PACKAGE)): sorted(name for name in _imported_modules(path)
                                                        if name.startswith(APPLICATION_LAYER))
                 for path in core}
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_scanner_sees_a_lazy_import_inside_a_function(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from noisescale.app.plot import save_figure\n    return save_figure\n")
    assert "noisescale.app.plot" in _imported_modules(sample)


def test_dir_lists_the_lazily_loaded_names():
    """The package loads its main names on first use (``__getattr__``); dir() and tab completion listed none of them
    (a new user's find). Each listed name resolves."""
    listed = dir(noisescale)
    for name in noisescale.__all__:
        assert name in listed
        assert getattr(noisescale, name) is not None
