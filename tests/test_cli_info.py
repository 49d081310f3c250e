"""`pyface info` without a GPU and without the compiled extension: it runs, exits 1 with the
reason, and each op whose default backend fell back says so on its line. A `pyface._C` found
outside this package (another checkout's editable install) is reported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyface.info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _info_without_extension(*args):
    code = ("import sys; sys.modules['pyface._C'] = None\n"      # the import fails, as unbuilt
            "from pyface.cli import main\n"
            f"sys.exit(main(['info', *{list(args)!r}]))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    env.pop("PYFACE_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_info_runs_without_gpu_or_extension_and_says_each_fallback():
    r = _info_without_extension()
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    out = r.stdout
    assert "GPU: none visible" in out
    assert "extension pyface._C: NOT LOADED - pyface._C is not built or failed to load" in out
    assert "ERROR: " in out
    # rasterize_mesh's CPU default is the C++ kernel: without it the reference runs, and says so
    block = out[out.index("\nrasterize_mesh:"):]
    assert "  cpu   -> reference   (FALLBACK: cpu unavailable, see below; order cpu, reference" \
        in block.split("\n  cuda")[0]
    r = _info_without_extension("--json")
    data = json.loads(r.stdout)
    assert r.returncode == 1 and not data["extension"]["loaded"] and data["cuda_device"] is None
    assert data["ops"]["rasterize_mesh"]["default"]["cpu"] == "reference"
    assert "not built" in data["ops"]["rasterize_mesh"]["fallback"]["cpu"]["cpu"]
    assert data["ops"]["rasterize_mesh"]["fallback"]["cuda"] == {}   # reference is the order


def test_info_reports_an_extension_loaded_from_another_checkout():
    info = pyface.info.collect()
    ext = info["extension"]
    if ext["loaded"]:                      # this package's own build: no warning
        assert os.path.dirname(ext["file"]) == ext["package"]
        assert pyface.info.foreign_extension(info) is None
    other = {**info, "extension": {**ext, "loaded": True,
                                   "file": "/elsewhere/pyface/_C.cpython-311-x86_64-linux-gnu.so"}}
    report = pyface.info.format_report(other)
    assert ("extension pyface._C: loaded from /elsewhere/pyface/_C.cpython-311-x86_64-linux-gnu.so"
            in report)
    assert (f"  WARNING: pyface._C was loaded from /elsewhere/pyface/_C.cpython-311-x86_64-linux-"
            f"gnu.so, outside this pyface ({ext['package']})") in report


def test_info_says_what_torch_compile_would_compile_with(tmp_path):
    """`pyface info` names the C++ compiler Inductor would use on CPU (CXX, else g++ / clang++ /
    c++ on PATH), or says that without one only aot_eager / eager work there."""
    from pyface.info import compile_toolchain, format_report

    empty = tmp_path / "bin"
    empty.mkdir()
    none = compile_toolchain({"PATH": str(empty)})
    assert none == {"cpu_cxx": None, "cpu_cxx_looked_for": "g++, clang++, c++"}
    cxx = empty / "my-c++"
    cxx.write_text("#!/bin/sh\n")
    cxx.chmod(0o755)
    assert compile_toolchain({"PATH": str(empty), "CXX": "my-c++"}) == {
        "cpu_cxx": str(cxx), "cpu_cxx_looked_for": "CXX=my-c++"}
    info = pyface.info.collect()
    assert set(info["compile"]) == {"cpu_cxx", "cpu_cxx_looked_for"}
    report = format_report({**info, "compile": none})
    assert ("torch.compile (--compile, train.compile; off unless asked): CPU: NO C++ compiler "
            "(g++, clang++, c++ not found): only the aot_eager / eager modes work on CPU; "
            "install g++ or set CXX") in report
    report = format_report({**info, "compile": {"cpu_cxx": "/usr/bin/g++",
                                                "cpu_cxx_looked_for": "g++, clang++, c++"}})
    assert "CPU: Inductor's C++ compiler /usr/bin/g++; CUDA: Inductor writes Triton kernels" \
        in report
