"""PYFACE_PARSE_ONLY=1: a command line is checked by the real parser and the command's own
option checks (the configs of a training run and of its stages), nothing run or written, and a
CUDA device is accepted on a machine without one (bench/gpu_session.sh --check proves the GPU
session's command lines so)."""
import os

import pytest

from pyface.cli import main


@pytest.fixture(autouse=True)
def parse_only(monkeypatch):
    monkeypatch.setenv("PYFACE_PARSE_ONLY", "1")


def _train(tmp_path, *sets):
    return ["train", "goha", "--preset", "gpu-short", "--overwrite",
            "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "train.device=cuda",
            "--set", f"data.path={tmp_path / 'data'}", *[a for s in sets for a in ("--set", s)]]


def test_train_checks_the_run_and_every_stage_config(tmp_path, capsys):
    assert main(_train(tmp_path, "stages.s1.train.steps=3")) == 0
    out, err = capsys.readouterr()
    assert "preset: gpu-short" in out and "arguments checked" in err
    assert not (tmp_path / "run").exists()            # nothing trained, nothing written
    # a key of a stage's config is checked too, naming the stage and the key
    assert main(_train(tmp_path, "stages.s1_gan.train.stepz=3")) == 2
    err = capsys.readouterr().err
    assert "stage 's1_gan'" in err and "train.stepz" in err
    assert main(_train(tmp_path, "train.precision=fp16")) == 2
    assert "train.precision: expected 'fp32' or 'bf16', got 'fp16'" in capsys.readouterr().err


def test_an_unknown_option_is_refused_by_the_parser(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*_train(tmp_path), "--stepz", "3"])
    assert exc.value.code == 2


def test_bench_checks_its_options_for_cuda_without_measuring(tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert main(["bench", "triplane", "--device", "cuda", "--size", "full", "--min-time", "0.1",
                 "--json", str(out)]) == 0
    assert "cases on cuda at --size full" in capsys.readouterr().err
    assert not out.exists()
    assert main(["bench", "triplane", "--device", "cuda", "--providers", "reference,bogus"]) == 2
    assert "'bogus'" in capsys.readouterr().err
    assert main(["bench", "triplane", "--device", "gpu"]) == 2
    assert "--device: expected cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


def test_animate_and_eval_check_their_values_and_name_missing_inputs(tmp_path, capsys):
    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    args = ["animate", "mmfa", "--checkpoint", run, "--source", data + "/a", "--driving",
            data + "/b", "--device", "cuda", "--out", str(tmp_path / "a.mp4")]
    assert main([*args, "--batch", "8"]) == 0
    err = capsys.readouterr().err
    assert f"not checked: --checkpoint {run}" in err and "arguments checked" in err
    assert not (tmp_path / "a.mp4").exists()
    assert main([*args, "--batch", "0"]) == 2
    assert "--batch: expected an integer >= 1, got 0" in capsys.readouterr().err
    args = ["eval", "mmfa", "--checkpoint", run, "--data", data, "--device", "cuda",
            "--json", str(tmp_path / "e.json"), "--sheet-rows", "0"]
    assert main([*args, "--metrics", "psnr"]) == 0
    assert f"not checked: --data {data}" in capsys.readouterr().err
    assert main([*args, "--metrics", "psnz"]) == 2
    assert "--metrics psnz" in capsys.readouterr().err
    assert main(["animate", "mmfa", "--checkpoint", run, "--seeds", "0-1"]) == 2
    assert "--seeds: model 'mmfa' is not a generator" in capsys.readouterr().err
    # a seed animation: its options, and EG3D's parse of --seeds
    eg3d = ["animate", "eg3d", "--checkpoint", run, "--frames", "64", "--device", "cuda"]
    assert main([*eg3d, "--seeds", "0-1"]) == 0
    assert main([*eg3d, "--seeds", "0-x"]) == 2
    assert "--seeds: expected integers, e.g. 0-3 or 0,5,9, got '0-x'" in capsys.readouterr().err
    assert main([*eg3d, "--seeds", "0-1", "--batch", "8"]) == 2
    assert "takes no --batch" in capsys.readouterr().err


def test_data_synth_checks_its_options_without_writing(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--identities", "4", "--resolution", "256",
                 "--multiview", "--quiet"]) == 0
    assert not out.exists()
    assert main(["data", "synth", "--out", str(out), "--frames", "0"]) == 2
    assert "--frames" in capsys.readouterr().err


def test_bench_train_checks_every_row_and_stage_config(tmp_path, capsys):
    from pyface.bench.train import main as bench_train

    out = tmp_path / "b.json"
    base = ["otavatar", "--preset", "gpu-short", "--device", "cuda", "--steps", "8",
            "--json", str(out)]
    assert bench_train([*base, "--compile", "default", "--warmup", "1"]) == 0
    assert "rows fused, reference, reference+compile, fused+compile on cuda" in \
        capsys.readouterr().err
    assert not out.exists() and not os.path.exists(tmp_path / "runs")
    assert bench_train([*base, "--no-compile", "--set", "stages.eg3d.train.batch_sise=2"]) == 2
    err = capsys.readouterr().err
    assert "stage 'eg3d'" in err and "batch_sise" in err


def test_invert_checks_its_values_and_options_without_reading(tmp_path, capsys):
    """pyface invert: --option's keys and values, --steps and --compile, --device for CUDA on any
    machine; the missing IMAGE and checkpoint are named, nothing is written."""
    run, out = str(tmp_path / "run"), str(tmp_path / "inv")
    args = ["invert", "eg3d", str(tmp_path / "face.png"), "--checkpoint", run, "--device",
            "cuda", "--out", out, "--option", "generator.render.depth_resolution=96"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"not checked: IMAGE {tmp_path / 'face.png'}, --checkpoint {run}" in err
    assert "pyface invert: arguments checked" in err
    for extra, msg in [(["--option", "generator.render.ray_start=2"],
                        "options: 'generator.render.ray_start' is not an inference option of "
                        "model 'eg3d'"),
                       (["--option", "generator.render.depth_resolution=1"],
                        "model.generator.render.depth_resolution: expected an int >= 2, got 1"),
                       (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
                       (["--compile", "fast"], "--compile: expected one of")]:
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("pyface invert: ") and msg in err, err
    assert not os.path.exists(out)
