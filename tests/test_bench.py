"""The benchmark harness measures what it says (no performance assertions here)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pyface.bench.harness import BenchCase, format_table, peak_memory_mb, run_case


def _case():
    def make_inputs(device, seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(64, 64, generator=gen).to(device).requires_grad_()]

    return BenchCase("square", "tiny", {"n": 64}, make_inputs,
                     {"reference": lambda x: x * x, "other": lambda x: x.pow(2)})


def test_run_case_reports_every_provider_and_mode():
    results = run_case(_case(), torch.device("cpu"), min_time=0.01, max_reps=5,
                       compile_reference=False)
    got = {(m.provider, m.mode) for m in results}
    assert got == {(p, m) for p in ("reference", "other") for m in ("fwd", "bwd", "fwd+bwd")}
    for m in results:
        assert m.error is None and m.reps >= 3 and 0 < m.p20_ms <= m.median_ms <= m.p80_ms
    table = format_table(results)
    assert "reference" in table and "other" in table and "1.00x" in table


def test_spread_lies_between_the_fastest_and_slowest_rep(monkeypatch):
    # three reps, one an outlier (a preempted worker thread on a shared machine): the default
    # (exclusive) quantiles extrapolated p20 to -1.17 ms
    import pyface.bench.harness as harness

    monkeypatch.setattr(harness, "_time", lambda *a, **k: [7.94, 7.94, 0.35])
    for m in run_case(_case(), torch.device("cpu"), providers=["reference"], modes=("fwd",),
                      compile_reference=False):
        assert 0.35 <= m.p20_ms <= m.median_ms <= m.p80_ms <= 7.94, m


def test_failing_provider_is_reported_not_raised():
    case = _case()
    case.providers["broken"] = lambda x: x @ torch.zeros(3, 3)
    results = run_case(case, torch.device("cpu"), providers=["broken"], min_time=0.01,
                       max_reps=3, compile_reference=False)
    assert len(results) == 1 and "RuntimeError" in results[0].error


def test_cpu_peak_memory_sees_allocations():
    n = 1 << 20  # 4 MiB of float32

    def alloc_two():
        a = torch.ones(n)
        b = torch.ones(n)
        return a.sum() + b.sum()

    def alloc_one_at_a_time():
        for _ in range(2):
            a = torch.ones(n)
            a.sum()
            del a

    assert 7.9 < peak_memory_mb(alloc_two, torch.device("cpu")) < 8.5
    assert 3.9 < peak_memory_mb(alloc_one_at_a_time, torch.device("cpu")) < 4.5


def test_result_and_working_memory_are_separated():
    """fwd: the result is the output; fwd+bwd: the output and the input gradient. A provider
    with a 4 MiB temporary shows it as working memory, one without shows (almost) none."""
    def make_inputs(device, seed):
        return [torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))
                .requires_grad_()]

    case = BenchCase("square", "tiny", {"n": 64}, make_inputs, {
        "reference": lambda x: x * x,
        "wasteful": lambda x: x.unsqueeze(0).expand(256, 64, 64).contiguous().sum(0) / 256 * x})
    results = {(m.provider, m.mode): m
               for m in run_case(case, torch.device("cpu"), min_time=0.01, max_reps=3,
                                 compile_reference=False)}
    tile = 64 * 64 * 4 / 2**20
    assert abs(results["reference", "fwd"].result_mem_mb - tile) < 1e-9
    assert abs(results["reference", "fwd+bwd"].result_mem_mb - 2 * tile) < 1e-9
    assert results["reference", "fwd"].work_mem_mb < 0.1
    assert 3.9 < results["wasteful", "fwd"].work_mem_mb < 4.6
    assert results["reference", "bwd"].work_mem_mb is None
    row = results["wasteful", "fwd"].as_dict()
    assert row["work_mem_mb"] == results["wasteful", "fwd"].work_mem_mb and "error" in row


@pytest.mark.cpp
def test_cpu_peak_memory_sees_kernel_workspace_of_worker_threads():
    """The C++ warp kernels split whole batch items over worker threads, each with a
    channels-last slab; that workspace is allocated on the calling thread so the measure sees
    it (an allocation in a worker thread would escape the profiler)."""
    from pyface.ops import warp_by_keypoints

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        B, C, K, D, H, W = 2, 32, 3, 8, 32, 32
        vol = torch.randn(B, C, D, H, W)
        kp = torch.rand(B, K, 3) * 2 - 1
        masks = torch.rand(B, K + 1, D, H, W).softmax(1)
        peak = peak_memory_mb(lambda: warp_by_keypoints(vol, kp, kp.flip(1), masks,
                                                        backend="cpu"), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    out_mb = B * C * D * H * W * 4 / 2**20
    slab_mb = (D * H * W * 16 + 64 * 16 + D * H * W * 3) * 4 / 2**20  # per worker
    assert out_mb + 2 * slab_mb - 0.01 < peak < out_mb + 2 * slab_mb + 0.5


def test_cli_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pyface", "bench", "triplane", "--device", "cpu",
         "--providers", "cpu", "--no-compile", "--min-time", "0.01", "--size", "full",
         "--shapes", "small", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__
    modes = {(r["provider"], r["mode"]) for r in data["results"]}
    assert ("cpu", "fwd+bwd") in modes and all(r["error"] is None for r in data["results"])
    assert all(r["work_mem_mb"] is not None for r in data["results"] if r["mode"] != "bwd")
    assert {r["shape"] for r in data["results"]} == {"small"}  # --shapes left out "eg3d"
    assert "triplane_sample" in proc.stdout
    # enough to repeat the run and to compare its rows
    env = data["environment"]
    assert env["cpu_threads"] >= 1 and "commit_dirty" in env and env["pyface"]
    assert data["command"] == ("pyface bench triplane --device cpu --size full --min-time 0.01 "
                               "--shapes small --providers cpu --no-compile")
    assert data["options"]["providers"] == ["cpu"] and data["options"]["warmup"] >= 1
    assert data["options"]["min_reps"] == 3 and "in turn" in data["order"]
    assert data["default_backends"] == {"triplane_sample": "cpu"}
    assert data["cases"] == [{"op": "triplane_sample", "shape": "small",
                              "params": data["cases"][0]["params"]}]
    assert data["cases"][0]["params"]["B"] == 2


def test_cli_unknown_op_or_shape_is_an_error_naming_the_choices(tmp_path, capsys):
    from pyface.cli import main

    assert main(["bench", "triplane", "nosuchop", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown op or family 'nosuchop'" in err and "triplane_sample" in err
    assert main(["bench", "triplane", "--device", "cpu", "--shapes", "huge"]) == 2
    assert "--shapes huge: 'huge' is not a shape of the selected ops at --size small; shapes of " \
        "the selected ops: small" in capsys.readouterr().err


def _bench_error(capsys, *argv) -> str:
    """Runs `pyface bench triplane --device cpu ARGV`, which must stop with code 2 before
    measuring anything; returns its error line."""
    from pyface.cli import main

    assert main(["bench", "triplane", "--device", "cpu", *argv]) == 2
    out = capsys.readouterr()
    assert "# [1/" not in out.out      # nothing was measured
    return out.err


def test_cli_misspelt_names_get_near_matches(capsys):
    from pyface.cli import main

    assert main(["bench", "triplane_sampel", "--device", "cpu"]) == 2
    assert "did you mean triplane_sample" in capsys.readouterr().err
    assert "'smal' is not a shape" in _bench_error(capsys, "--shapes", "smal")
    assert "did you mean small?" in _bench_error(capsys, "--shapes", "smal")
    assert "did you mean cpu?" in _bench_error(capsys, "--providers", "cpuu")


def test_cli_every_listed_shape_must_exist(capsys):
    # one unknown name among known ones was left out silently
    err = _bench_error(capsys, "--shapes", "small,eg3d")
    assert "'eg3d' is not a shape of the selected ops at --size small" in err
    assert "(--size full has eg3d)" in err


def test_cli_unknown_provider_is_an_error_naming_the_choices(capsys):
    # an unknown provider used to be dropped, leaving an empty table and exit code 0
    err = _bench_error(capsys, "--providers", "cpu,nosuch")
    assert "--providers cpu,nosuch: unknown or unavailable provider 'nosuch' for the selected ops " \
        "on cpu; expected some of compile, cpu, reference" in err
    err = _bench_error(capsys, "--providers", "compile", "--no-compile")
    assert "(--no-compile leaves out 'compile'); expected some of cpu, reference" in err


@pytest.mark.parametrize("option", ["--shapes", "--providers"])
def test_cli_an_empty_list_of_names_is_an_error(capsys, option):
    # "" or "," selected nothing (--shapes "": everything) and printed an empty table
    for value in ("", ","):
        err = _bench_error(capsys, option, value)
        assert f"{option}: expected a comma-separated list of names, got {value!r}" in err


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_cli_min_time_must_be_a_finite_non_negative_number(capsys, value):
    err = _bench_error(capsys, "--min-time", value)
    assert "--min-time: expected a finite number of seconds >= 0" in err and value in err


@pytest.mark.parametrize("name,match", [
    ("r.csv", "--json: expected a file ending in .json or a folder"),
    ("results", "--json: expected a file ending in .json or a folder"),   # neither: ambiguous
    ("a_file/r.json", "--json TMP/a_file/r.json: cannot create its folder: TMP/a_file is a "
                      "file"),                                              # folder is a file
    ("a_file/sub/", "--json TMP/a_file/sub/: cannot create its folder: TMP/a_file is a file"),
])
def test_cli_bad_json_path_is_an_error_before_measuring(tmp_path, capsys, name, match):
    (tmp_path / "a_file").write_text("x")
    err = _bench_error(capsys, "--json", f"{tmp_path}/{name}")
    assert match.replace("TMP", str(tmp_path)) in err and str(tmp_path) in err
    assert err.count("\n") == 1 and "File exists" not in err, err


def test_json_path_resolution(tmp_path):
    from pyface.bench.harness import JsonPathError, resolve_json_path

    new = tmp_path / "new" / "deeper"
    assert resolve_json_path(f"{new}/", "x.json") == str(new / "x.json")   # created
    assert new.is_dir() and list(new.iterdir()) == []                      # probe removed
    assert resolve_json_path(str(new), "y.json") == str(new / "y.json")   # existing folder
    assert resolve_json_path(str(tmp_path / "a" / "r.json"), "x.json") == str(tmp_path / "a" /
                                                                                "r.json")
    (tmp_path / "d.json").mkdir()
    assert resolve_json_path(str(tmp_path / "d.json"), "x.json") == str(tmp_path / "d.json" /
                                                                         "x.json")
    with pytest.raises(JsonPathError, match="--out: expected a file ending in .json"):
        resolve_json_path(str(tmp_path / "r.txt"), "x.json", "--out")


def test_write_json_is_whole_or_nothing(tmp_path, monkeypatch):
    from pyface.bench import harness

    path = tmp_path / "r.json"
    harness.write_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def dump_half(data, f, **kw):
        f.write('{"results": [')
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.json, "dump", dump_half)
    with pytest.raises(KeyboardInterrupt):
        harness.write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}            # the old file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_cli_ctrl_c_prints_what_was_measured_and_writes_no_json(tmp_path, capsys, monkeypatch):
    from pyface.bench import harness
    from pyface.cli import main

    def interrupted(case, device, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_case", interrupted)
    out = tmp_path / "r.json"
    out.write_text("old")
    assert main(["bench", "triplane", "--device", "cpu", "--json", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the measurements above are not written" in err and str(out) in err
    assert out.read_text() == "old"


def _strict_json(text: str):
    """json.loads that rejects NaN / Infinity tokens (not JSON; many readers refuse them)."""
    def bad(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=bad)


def test_json_of_a_failing_provider_is_strict_json(tmp_path):
    # a failed provider's times are NaN, which json.dump wrote as the bare token NaN
    from pyface.bench.harness import write_json

    case = _case()
    case.providers["broken"] = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
    results = run_case(case, torch.device("cpu"), min_time=0, max_reps=3,
                       compile_reference=False, providers=["broken"])
    path = tmp_path / "r.json"
    write_json(str(path), {"results": [m.as_dict() for m in results],
                           "ratio": float("inf")})
    data = _strict_json(path.read_text())
    assert data["results"][0]["median_ms"] is None and "boom" in data["results"][0]["error"]
    assert data["ratio"] is None


def test_auto_named_json_never_replaces_an_earlier_run(tmp_path):
    from pyface.bench.harness import resolve_json_path

    first = resolve_json_path(f"{tmp_path}/", "op-cpu.json")
    assert first == str(tmp_path / "op-cpu.json")
    (tmp_path / "op-cpu.json").write_text("{}")
    second = resolve_json_path(f"{tmp_path}/", "op-cpu.json")
    assert second == str(tmp_path / "op-cpu-2.json")
    (tmp_path / "op-cpu-2.json").write_text("{}")
    assert resolve_json_path(str(tmp_path), "op-cpu.json") == str(tmp_path / "op-cpu-3.json")
    # a file named by the user is the one asked for
    assert resolve_json_path(str(tmp_path / "op-cpu.json"), "x.json") == str(tmp_path /
                                                                              "op-cpu.json")


def test_environment_records_whether_the_tree_differs_from_the_commit(monkeypatch):
    from pyface.bench import harness

    env = harness.environment(torch.device("cpu"))
    assert "commit_dirty" in env and env["commit_dirty"] in (True, False, None)
    assert (env["commit"] is None) == (env["commit_dirty"] is None)
    monkeypatch.setattr(harness, "_git", lambda *a: " M pyface/ops.py" if a[0] == "status"
                        else "abc1234")
    assert harness.environment(torch.device("cpu"))["commit_dirty"] is True
    monkeypatch.setattr(harness, "_git", lambda *a: "" if a[0] == "status" else "abc1234")
    assert harness.environment(torch.device("cpu"))["commit_dirty"] is False


def test_train_bench_trains_earlier_stages_for_few_steps():
    # otavatar's tiny eg3d stage was trained in full (minutes) before one step was timed
    from pyface.bench.train import stage_steps_overrides
    from pyface.train.registry import model_class

    assert stage_steps_overrides(model_class("otavatar"), ["train.batch_size=2"], 1) == [
        "stages.eg3d.train.steps=1", "train.batch_size=2"]
    given = ["stages.eg3d.train.steps=50"]
    assert stage_steps_overrides(model_class("otavatar"), given, 1) == given
    assert stage_steps_overrides(model_class("eg3d"), None, 1) == []


@pytest.mark.parametrize("argv,match", [
    (["otavtar"], "did you mean otavatar"),
    (["eg3d", "--preset", "tinny"], "tinny"),
    (["eg3d", "--device", "cuda:99"], "--device"),
    (["eg3d", "--steps", "0"], "--steps: expected an integer >= 1"),
    # a --set item for a stage the model does not have was dropped silently
    (["otavatar", "--set", "stages.eg3dd.train.steps=2"],
     "--set stages.eg3dd.train.steps=2: expected stages.<stage>.<key>=<value> with <stage> a "
     "stage of 'otavatar' (eg3d)"),
    (["eg3d", "--set", "stages.eg3d.train.steps=2"], "a stage of 'eg3d' (it has none)"),
])
def test_train_bench_bad_input_is_one_line_and_code_2(tmp_path, capsys, argv, match):
    from pyface.bench.train import main

    out = tmp_path / "r.json"
    assert main([*argv, "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and err.startswith("python -m pyface.bench.train: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_train_bench_overlap_without_torchrun_is_one_line_and_code_2(tmp_path, capsys,
                                                                      monkeypatch):
    # it raised RuntimeError (a traceback, code 1) after building the trainer
    from pyface.bench.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--overlap", "--json", f"{tmp_path}/"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("python -m pyface.bench.train: --overlap needs several ranks: torchrun "
                   "--standalone --nproc_per_node=2 -m pyface.bench.train --overlap")
    assert list(tmp_path.iterdir()) == []


def test_environment_names_no_commit_of_a_repository_that_only_contains_pyface(tmp_path,
                                                                                monkeypatch):
    # pyface installed in a virtualenv inside another project's checkout reported that
    # project's commit as pyface's
    from pyface.bench import harness

    project = tmp_path / "project"
    pkg = project / ".venv" / "site-packages" / "pyface" / "bench"
    pkg.mkdir(parents=True)
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    monkeypatch.setattr(harness, "__file__", str(pkg / "harness.py"))
    assert harness._git_commit() is None and harness._git_dirty() is None
    monkeypatch.setattr(harness, "__file__", str(project / "pyface" / "bench" / "harness.py"))
    assert harness._git_commit() is not None and harness._git_dirty() is False


@pytest.mark.parametrize("argv,message", [
    # without MODEL the engine-overhead benchmark ran on the CPU whatever --device said
    (["--device", "cuda"], "--device: not used by the engine-overhead and checkpoint benchmark"),
    (["--preset", "tiny"], "--preset: not used by the engine-overhead"),
    (["eg3d", "--repeats", "3"], "--repeats: not used by MODEL (eg3d: fused vs reference ops)"),
    (["eg3d", "--bucket-mb", "8"], "--bucket-mb: not used by MODEL"),
    (["--overlap", "eg3d", "--set", "train.batch_size=2"],
     "MODEL, --set: not used by --overlap (the all-reduce benchmark); it takes --bucket-mb"),
])
def test_train_bench_an_option_the_benchmark_does_not_use_is_an_error(tmp_path, capsys,
                                                                      monkeypatch, argv, message):
    from pyface.bench import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")       # --overlap's own check passes
    for fn in ("engine_overhead", "model_backends", "overlap_bench"):
        monkeypatch.setattr(train, fn, lambda *a, **k: pytest.fail("ran"))
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_second_run_into_a_folder_keeps_the_first(tmp_path, capsys, monkeypatch):
    from pyface.bench import harness
    from pyface.bench.harness import Measurement
    from pyface.cli import main

    def fake(case, device, **kw):
        return [Measurement(case.op, case.shape, "reference", "fwd", 1.0, 1.0, 1.0, 3)]

    monkeypatch.setattr(harness, "run_case", fake)
    argv = ["bench", "triplane", "--device", "cpu", "--no-compile", "--json", f"{tmp_path}/"]
    assert main(argv) == 0 and main(argv) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith("-2.json"), files
    out = capsys.readouterr().out
    assert "replacing" not in out
    assert main(["bench", "triplane", "--device", "cpu", "--no-compile", "--json",
                 str(tmp_path / files[1])]) == 0
    assert "(replacing the file that was there)" in capsys.readouterr().out


def test_auto_named_json_written_after_another_run_took_its_name_keeps_both(tmp_path):
    # the name is chosen before measuring; a run that finished meanwhile was replaced
    from pyface.bench.harness import resolve_json_path, write_json

    path = resolve_json_path(f"{tmp_path}/", "op-cpu.json")
    (tmp_path / "op-cpu.json").write_text('{"other": 1}')
    assert write_json(path, {"mine": 1}, keep_existing=True) == str(tmp_path / "op-cpu-2.json")
    assert json.loads((tmp_path / "op-cpu.json").read_text()) == {"other": 1}
    assert json.loads((tmp_path / "op-cpu-2.json").read_text()) == {"mine": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["op-cpu-2.json", "op-cpu.json"]
    assert write_json(path, {"mine": 2}) == path             # asked for: replaced
    assert json.loads((tmp_path / "op-cpu.json").read_text()) == {"mine": 2}


_TINY_EXAMPLE = ["--steps", "1", "--warmup", "0", "--device", "cpu", "--set", "train.batch_size=2",
                 "--set", "data.resolution=16", "--set", "model.resolution=16"]


def test_train_bench_json_records_the_backends_and_the_precision(tmp_path, monkeypatch, capsys):
    """PYFACE_BACKEND as the command found it (not applied: "fused" is each op's default),
    what the defaults run, each trainer's train.backend, precision, autocast dtype and
    parameter dtype; the environment records PYFACE_BACKEND as `pyface bench` does."""
    from pyface.bench.train import main

    monkeypatch.setenv("PYFACE_BACKEND", "reference")
    out = tmp_path / "r.json"
    assert main(["example", *_TINY_EXAMPLE, "--set", "train.precision=bf16",
                 "--json", str(out)]) == 0
    assert os.environ["PYFACE_BACKEND"] == "reference"              # given back
    data = json.loads(out.read_text())
    assert data["environment"]["PYFACE_BACKEND"] == "reference"
    (r,) = data["results"]
    assert r["pyface_backend_env"] == "reference"
    assert r["default_backends"]["triplane_sample"] == "cpu"
    fused, ref = r["results"]["fused"], r["results"]["reference"]
    assert fused["ops"] == {"triplane_sample": {"cpu": 1}}
    assert ref["ops"] == {"triplane_sample": {"reference": 1}}
    for x, backend in ((fused, None), (ref, "reference")):
        assert {k: x[k] for k in ("train_backend", "precision", "autocast_dtype",
                                  "param_dtype")} == {
            "train_backend": backend, "precision": "bf16", "autocast_dtype": "bfloat16",
            "param_dtype": "float32"}
    said = capsys.readouterr().out
    assert "precision bf16 (autocast bfloat16, parameters float32); PYFACE_BACKEND reference " \
           "(not applied" in said


def test_train_bench_compiled_rows(tmp_path, capsys):
    """--compile MODE adds reference+compile (torch.compile of the reference) and
    fused+compile: compiled in the warmup steps (compile_s, graphs_compiled), measured after,
    with the mode, backend and torch version in the JSON."""
    from pyface.bench.train import main

    out = tmp_path / "r.json"
    argv = ["example", "--steps", "2", "--warmup", "1", *_TINY_EXAMPLE[4:], "--compile",
            "aot_eager", "--json", str(out)]
    assert main(argv) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert list(r["results"]) == ["fused", "reference", "reference+compile", "fused+compile"]
    assert r["compile"] == {"mode": "aot_eager", "backend": "aot_eager", "inductor_mode": None,
                            "dynamic": None, "fullgraph": False, "torch": torch.__version__,
                            "modules": [""]}
    for label, x in r["results"].items():
        compiled = label.endswith("+compile")
        assert x["compile"] == ("aot_eager" if compiled else "off")
        assert x["train_backend"] == ("reference" if label.startswith("reference") else None)
        assert len(x["times_s"]) == 2 and len(x["warmup_times_s"]) == 1
        assert (x["ops"] is None) == compiled and (x["ops_peak_mem_mb"] is None) == compiled
        assert ("compile_s" in x) == compiled
        assert x["graphs_compiled"]["warmup"] >= (1 if compiled else 0)
        if not compiled:
            assert x["graphs_compiled"] == {"warmup": 0, "measured": 0}
    assert set(r["vs_fused"]) == {"reference", "reference+compile", "fused+compile"}
    said = capsys.readouterr().out
    assert "reference+compile: compiling took about" in said
    assert "train.compile=aot_eager (aot_eager; torch " in said


def test_train_bench_compile_defaults_and_bad_input(tmp_path, capsys):
    from pyface.bench.train import main, resolve_compile

    assert resolve_compile("cuda", None, False) == "default"
    assert resolve_compile("cpu", None, False) is None          # left out on cpu unless asked
    assert resolve_compile("cpu", "max-autotune", False) == "max-autotune"
    assert resolve_compile("cuda", None, True) is None and resolve_compile("cuda", "off",
                                                                             False) is None
    out = tmp_path / "r.json"
    for argv, match in (
            (["--compile", "aot_eager", "--no-compile"], "--compile and --no-compile"),
            (["--compile", "aot_eager", "--warmup", "0"], "--warmup 0: the torch.compile rows"),
            (["--set", "train.compile=default"], "--set train.compile=default: each row sets"),
            (["--compile", "fast"], None)):
        if match is None:       # argparse's own message and code
            with pytest.raises(SystemExit) as exc:
                main(["example", *argv, "--json", str(out)])
            assert exc.value.code == 2
            assert "invalid choice: 'fast'" in capsys.readouterr().err
            continue
        assert main(["example", *argv, "--json", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, err
    assert main(["--compile", "default", "--json", str(out)]) == 2
    assert "--compile: not used by the engine-overhead" in capsys.readouterr().err
    assert not out.exists()
    # cpu without --compile: the rows are left out, and the run says so
    assert main(["example", *_TINY_EXAMPLE, "--json", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("# torch.compile rows left out on cpu (") and "--compile default" in said
    (r,) = json.loads(out.read_text())["results"]
    assert r["compile"] is None and list(r["results"]) == ["fused", "reference"]


def test_engine_overhead_records_the_backends_and_the_precision(monkeypatch):
    from pyface.bench.train import engine_overhead

    monkeypatch.delenv("PYFACE_BACKEND", raising=False)
    r = engine_overhead(1, warmup=0, overrides=["train.batch_size=2", "data.resolution=16",
                                                "model.resolution=16"])
    assert r["pyface_backend_env"] is None and r["default_backends"]["triplane_sample"] == "cpu"
    assert (r["train_backend"], r["precision"], r["autocast_dtype"], r["param_dtype"]) == (
        None, "fp32", None, "float32")


def test_step_memory_separates_the_ops_from_the_rest_of_the_step():
    """A step that renders without gradients, then trains something bigger (GOHA's s2: the
    super-resolution network): its peak is the same on every backend, the peak inside the op
    is the op's own and differs."""
    from pyface.bench.harness import step_memory_mb
    from pyface.nn import OSGDecoder, RenderConfig, TriplaneRenderer

    cpu = torch.device("cpu")
    planes = torch.randn(1, 3, 8, 16, 16)
    o = torch.zeros(1, 64, 3) + torch.tensor([0.0, 0.0, 3.0])
    d = torch.zeros(1, 64, 3) + torch.tensor([0.0, 0.0, -1.0])
    dec = OSGDecoder(8, 16, 4)
    got = {}
    for backend in ("reference", "cpu"):
        renderer = TriplaneRenderer(RenderConfig.ffhq(depth_resolution=16,
                                                      depth_resolution_importance=16,
                                                      backend=backend))

        def step():
            with torch.no_grad():
                renderer(planes, dec, o, d)
            w = torch.randn(1024, 1024, requires_grad=True)         # 4 MiB, and its gradient
            (w * 2).sum().backward()

        got[backend] = step_memory_mb(step, cpu)
    (peak_r, ops_r), (peak_c, ops_c) = got["reference"], got["cpu"]
    assert peak_r == peak_c >= 8
    assert 0 < ops_r < peak_r and 0 < ops_c < peak_c and ops_r != ops_c
    assert step_memory_mb(lambda: torch.randn(100), cpu)[1] is None        # no op called


def test_train_bench_says_when_the_steps_peak_outside_the_ops(tmp_path, monkeypatch):
    from pyface.bench import harness
    from pyface.bench.train import model_backends

    peaks = iter([(10.0, 1.0), (10.0, 3.0)])                # fused, then reference
    monkeypatch.setattr(harness, "step_memory_mb", lambda fn, dev: next(peaks))
    r = model_backends("example", _TINY_EXAMPLE[-5::2], steps=1, warmup=0, device="cpu")
    assert r["memory_ratio"] == 1.0 and r["ops_memory_ratio"] == 3.0
    assert r["results"]["fused"]["ops_peak_mem_mb"] == 1.0
    assert r["memory_note"].startswith("the step's peak is the same on both: it is reached "
                                       "outside the ops")


def test_default_options_on_cuda_are_the_full_shapes_and_every_provider():
    from pyface.bench.cli import resolve_defaults

    # chosen without a GPU: the function that picks them, asked for cuda
    assert resolve_defaults("cuda") == {"size": "full", "left_out": {}, "compile": True}
    assert resolve_defaults("cuda", size="small")["size"] == "small"


def test_default_options_on_cpu_leave_out_the_slow_references_unless_asked():
    from pyface.bench.cli import CPU_SLOW, resolve_defaults

    got = resolve_defaults("cpu")
    assert got["size"] == "small"
    assert ("points_to_triplane", "reference") in got["left_out"]
    assert ("rasterize_mesh", "reference") in got["left_out"]
    assert got["left_out"] == CPU_SLOW and got["compile"] is False
    for asked in (dict(with_slow=True), dict(providers=["reference"])):
        assert resolve_defaults("cpu", **asked) == {"size": "small", "left_out": {},
                                                    "compile": True}


def test_cli_cpu_default_leaves_out_the_slow_reference_says_so_and_shows_progress(
        tmp_path, capsys):
    from pyface.cli import main

    out = tmp_path / "r.json"
    rc = main(["bench", "points_to_triplane", "--device", "cpu", "--min-time", "0",
               "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "# [1/1, 0 s] points_to_triplane [128]" in printed     # a progress line per case
    assert "# size: small (the cpu default" in printed
    # told up front what the run holds: the cpu backend alone, nothing to compile
    assert "# 1 case, 1 provider run of up to 3 measurements, each at least 0 s" in printed
    assert "compilations" not in printed
    note = [ln for ln in printed.splitlines() if ln.startswith("# left out on cpu:")]
    assert len(note) == 2      # before the run and after the table
    assert "--with-slow" in note[0] and "points_to_triplane reference" in note[0]
    data = json.loads(out.read_text())
    assert data["size"] == "small" and data["options"]["with_slow"] is False
    assert data["options"]["compile_reference"] is False
    assert {(e["op"], e["provider"]) for e in data["options"]["left_out"]} == {
        ("points_to_triplane", "reference"), ("points_to_triplane", "compile")}
    ran = {r["provider"] for r in data["results"]}
    assert ran and not ran & {"reference", "compile"}
    assert all(r["error"] is None and r["reps"] == 3 for r in data["results"])
    assert data["cases"][0]["params"] == {"B": 4, "N": 16384, "C": 32, "R": 128}
    assert data["command"] == "pyface bench points_to_triplane --device cpu --size small " \
                              "--min-time 0.0"
    rows = [ln.split() for ln in printed.splitlines() if ln.startswith("points_to_triplane")]
    assert rows and {r[2] for r in rows} == ran       # the printed rows: what ran, nothing else


def test_cli_explicit_providers_run_what_the_cpu_default_leaves_out(capsys, monkeypatch):
    import pyface.bench.harness as harness
    from pyface.cli import main

    asked = []
    monkeypatch.setattr(harness, "run_case",
                        lambda case, device, providers=None, **kw: asked.append(providers) or [])
    assert main(["bench", "points_to_triplane", "--device", "cpu", "--providers",
                 "reference,cpu", "--no-compile"]) == 0
    assert asked == [["reference", "cpu"]]
    assert "left out" not in capsys.readouterr().out
    asked.clear()
    assert main(["bench", "points_to_triplane", "--device", "cpu", "--with-slow",
                 "--no-compile"]) == 0
    assert asked == [None]
    assert main(["bench", "points_to_triplane", "--device", "cpu", "--with-slow"]) == 0
    assert "1 torch.compile compilation first" in capsys.readouterr().out
