"""omniseg asks OpenMP for sleeping (not spinning) waiters before PyTorch starts OpenMP, and
keeps a policy the user chose. (Why: see omniseg/__init__.py; measured in the README.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Prints the policy in the environment at the moment torch is first imported.
PROBE = """
import os, sys
class TorchImportProbe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("policy when torch loads:", os.environ.get("OMP_WAIT_POLICY"), flush=True)
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, TorchImportProbe())
import omniseg
"""


def _policy_when_torch_loads(**env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environment.update(env, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_wait_policy_is_set_before_torch_loads(given, expected):
    env = {} if given is None else {"OMP_WAIT_POLICY": given}
    assert _policy_when_torch_loads(**env) == f"policy when torch loads: {expected}"
