"""pyface's EG3D generator against NVIDIA's own EG3D code (tools/eg3d_reference.py).

Runs only when ``PYFACE_EG3D_SRC`` points at an NVlabs/eg3d checkout (EG3D's code is not part
of pyface, so CI skips it); about 1 min per super-resolution module on one CPU core.
``PYFACE_EG3D_SR`` narrows the modules (comma-separated, default all five). The CI tests that
need no EG3D code are in tests/test_model_eg3d.py (structure transcription, converter, the
in-place alias of image_raw).
"""
import importlib.util
import os

import pytest

SRC = os.environ.get("PYFACE_EG3D_SRC")
_TOOL = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "eg3d_reference.py")


def _tool():
    spec = importlib.util.spec_from_file_location("eg3d_reference", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CASES = sorted(_tool().CASES)
SELECTED = [c for c in os.environ.get("PYFACE_EG3D_SR", ",".join(CASES)).split(",") if c]


@pytest.mark.skipif(not SRC, reason="PYFACE_EG3D_SRC (an NVlabs/eg3d checkout) is not set")
@pytest.mark.parametrize("case", CASES)
def test_outputs_match_eg3d_code(case, tmp_path):
    if case not in SELECTED:
        pytest.skip(f"not in PYFACE_EG3D_SR={SELECTED}")
    tool = _tool()
    res = tool.compare(case, SRC, batch=2, seed=0, work=str(tmp_path))
    d = res["max_abs_diff"]
    assert d["ws"] <= 1e-5 and d["planes"] <= 1e-4, d
    for k, tol in tool.TOLERANCES.items():
        assert d[k] <= tol, (k, d)
