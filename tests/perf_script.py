"""Load a perf/ script as a module, for the CPU tests of its logic."""

import importlib.util
from pathlib import Path

PERF = Path(__file__).resolve().parent.parent / "perf"


def load_perf_script(name: str):
    """perf/<name>.py as a module (perf/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, PERF / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
