"""The control plane's imports stay torch-free: checked in a fresh interpreter, not just by import-linter."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["trainer.contract", "cli.main"])
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0, (
        f"{module} imports torch"
    )
