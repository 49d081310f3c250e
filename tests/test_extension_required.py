"""A missing or broken pyface._C fails the kernel tests instead of skipping them (conftest.py).

pytest runs in a subprocess on a small test file with this suite's conftest.py, with the import
of pyface._C blocked before anything loads it. (The working case is every `cpp` test of the
suite itself.)
"""
import os
import shutil
import subprocess
import sys

import torch

TESTS = '''
import pytest

@pytest.mark.cpp
def test_needs_extension():
    import torch
    assert hasattr(torch.ops.pyface, "triplane_sample")

@pytest.mark.cpp
@pytest.mark.gpu
def test_needs_extension_and_gpu():
    pass

def test_plain():
    pass
'''

BREAK = '''
import sys
sys.modules["pyface._C"] = None  # import pyface._C now raises ImportError
'''


def run_suite(tmp_path):
    shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_kernels.py").write_text(TESTS)
    (tmp_path / "break_extension.py").write_text(BREAK)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "break_extension", "-p",
           "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull,
           str(tmp_path / "test_kernels.py")]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def outcome(stdout, test):
    """PASSED / FAILED / ERROR / SKIPPED of test_kernels.py::test in pytest -v output."""
    for line in stdout.splitlines():
        if line.startswith(f"test_kernels.py::{test} "):
            return line.split()[1]
    raise AssertionError(f"{test} not reported:\n{stdout}")


def test_broken_extension_fails_instead_of_skipping(tmp_path):
    proc = run_suite(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pyface._C: NOT LOADED" in proc.stdout
    # the check runs in setup: an error (exit status 1), never a skip
    assert outcome(proc.stdout, "test_needs_extension") == "ERROR"
    assert "test_needs_extension needs the compiled extension: pyface._C is not built or " \
           "failed to load" in proc.stdout
    assert outcome(proc.stdout, "test_plain") == "PASSED"
    # the only skip left is a gpu test without CUDA
    expected = "ERROR" if torch.cuda.is_available() else "SKIPPED"
    assert outcome(proc.stdout, "test_needs_extension_and_gpu") == expected
