"""The layout of docs/layout.md holds: imports run one way (entry points -> engine -> model,
dataset, util), model/ reads no image files and draws nothing, and no project import hides in a function."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("app", "commands", "dataset", "engine", "model", "util", "tools", "tools/measure")


def modules(package):
    folder = os.path.join(ROOT, package)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))


def imports(path):
    """(top-level package, inside a function?) of every import in ``path``."""
    tree = ast.parse(open(path).read(), path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], in_function))
            elif isinstance(child, ast.ImportFrom):            # relative: within the package
                found.append((os.path.basename(os.path.dirname(path)), in_function))
            visit(child, nested)
    visit(tree, False)
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("model", {"app", "commands", "engine", "dataset", "tools", "cv2", "PIL"}),
    ("dataset", {"app", "commands", "engine", "model", "tools"}),
    ("util", {"app", "commands", "dataset", "model", "engine", "tools"}),
    ("engine", {"app", "commands", "tools"}),
    ("commands", {"app", "gradio"}),
    ("app", {"model", "dataset", "torch"})])   # the page calls the engine; it builds and runs no network itself
def test_imports_run_one_way(package, forbidden):
    for path in modules(package):
        bad = {name for name, _ in imports(path)} & forbidden
        assert not bad, f"{os.path.relpath(path, ROOT)} imports {sorted(bad)}"


def test_no_project_import_inside_a_function():
    paths = [p for pkg in PACKAGES for p in modules(pkg)]
    paths += [os.path.join(ROOT, f) for f in ("train.py", "test.py", "predict.py")]
    for path in paths:
        hidden = [name for name, in_function in imports(path) if in_function and name in PACKAGES + ("tools",)]
        assert not hidden, f"{os.path.relpath(path, ROOT)} imports {hidden} inside a function"


def test_importing_the_network_loads_no_engine_image_io_or_drawing():
    code = ("import sys, model; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('engine', 'cv2', 'PIL', 'matplotlib') or m == 'util.vis'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_warning_from_our_own_code_fails_the_suite():
    """pytest.ini turns a warning attributed to the project's modules (and the tests) into an
    error; a third-party module's own warning stays a warning."""
    import warnings
    for module in ("engine.trainer", "util.config", "model", "tools.measure.benchmark", "test_layout", "conftest"):
        with pytest.raises(UserWarning):
            warnings.warn_explicit("new", UserWarning, "x.py", 1, module=module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("theirs", UserWarning, "x.py", 1, module="torch.nn.modules.module")
    assert [str(w.message) for w in caught] == ["theirs"]


def test_training_evaluation_and_predict_py_run_without_the_pages_library():
    code = ("import sys, commands.train, commands.test, commands.predict, tools.demo; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'app')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
