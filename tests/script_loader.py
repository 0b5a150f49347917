"""Load a script file (recipes/, bench/: directories that are not packages) as a module, for the tests that call
its functions directly."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first: dataclasses in the script look their module up by name
    spec.loader.exec_module(module)
    return module
