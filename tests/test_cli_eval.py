"""``pyface eval`` with the mistakes users make: weights of another network, a file that is no
state dict, an unknown model, out-of-range numbers, output paths that cannot be written, a
cross-identity protocol on a set without one, a folder that is no dataset. Each is one line
naming the option and the value, given before any evaluation; the printed table and the JSON
report hold the same numbers."""
import json
import os

import pytest
import torch

from _eval_data import eval_set

from pyface.cli import main

BASE = ["--quiet", "--device", "cpu", "--detector", "none", "--metrics", "psnr"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evalcli") / "ds")
    return eval_set(out, 2, identities=2, videos_per_identity=1, frames=3, resolution=16)


@pytest.fixture(scope="module")
def one_identity(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evalcli1") / "ds")
    return eval_set(out, 2, identities=1, videos_per_identity=1, frames=3, resolution=16,
                    cross=False)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    from pyface.nn.vgg import VGG19

    path = tmp_path_factory.mktemp("w") / "vgg19.pth"
    torch.save({k: torch.zeros_like(v) for k, v in VGG19().state_dict().items()}, path)
    return str(path)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("pyface eval: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_weights_of_another_network_name_the_option(root, vgg_file, tmp_path, capsys):
    args = ["eval", "copy-source", "--data", root, *BASE[:-2]]
    assert main(args + ["--metrics", "csim", "--weights", f"csim={vgg_file}"]) == 1
    err = _err(capsys)
    assert f"metric 'csim': --weights csim={vgg_file} is not an ArcFace IResNet" in err
    assert main(args + ["--metrics", "lpips", "--weights", f"lpips={vgg_file}"]) == 1
    assert f"metric 'lpips': --weights lpips={vgg_file} is not the ImageNet backbone" in \
        _err(capsys)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert main(args + ["--metrics", "csim", "--weights", f"csim={tmp_path / 'list.pth'}"]) == 1
    assert "list.pth: expected a state dict (names -> tensors), got list" in _err(capsys)


def test_unknown_metric_names_the_option(root, capsys):
    assert main(["eval", "copy-source", "--data", root, *BASE[:-1], "psnr,foo"]) == 2
    assert "--metrics psnr,foo: metric: expected one of psnr, ssim" in _err(capsys)


def test_a_baseline_with_a_checkpoint_is_refused(root, capsys):
    assert main(["eval", "copy-source", "--checkpoint", root, "--data", root, *BASE]) == 2
    assert "--checkpoint: copy-source is a baseline and takes none" in _err(capsys)


def test_unknown_model_is_a_message(root, capsys):
    assert main(["eval", "nope", "--checkpoint", root, "--data", root, *BASE]) == 2
    assert "unknown model 'nope'; registered: " in _err(capsys)
    assert main(["eval", "--runs", f"nope={root}", "--data", root, *BASE]) == 2
    assert "unknown model 'nope'" in _err(capsys)


@pytest.mark.parametrize("extra, msg", [
    (["--max-pairs", "0"], "--max-pairs: expected an integer >= 1 or none, got 0"),
    (["--batch-size", "-1"], "--batch-size: expected an integer >= 1, got -1"),
    (["--sheet-rows", "-1"], "--sheet-rows: expected an integer >= 0, got -1"),
    (["--sheet-rows", "0", "--sheet", "s.png"], "--sheet needs at least 1 row, got 0"),
    (["--workers", "-2"], "--workers: expected an integer >= 0, got -2"),
    (["--sheet", "sheet.txt"], "--sheet: expected a file name ending in .png"),
    (["--json", "report"], "--json: expected a file name ending in .json"),
    (["--json", "FILE/r.json"], "cannot create its folder: "),
])
def test_option_errors_come_before_the_evaluation(root, tmp_path, capsys, extra, msg):
    (tmp_path / "FILE").write_text("x")
    extra = [os.path.join(str(tmp_path), e) if e.endswith((".png", ".txt", ".json", "report"))
             else e for e in extra]
    assert main(["eval", "copy-source", "--data", root, *BASE, *extra]) == 2
    assert msg in _err(capsys)
    assert sorted(os.listdir(tmp_path)) == ["FILE"]


@pytest.mark.parametrize("metrics", ["akd", "psnr,aed,apd"])
def test_a_detector_metric_with_the_detector_off_is_a_command_line_error(root, tmp_path, capsys,
                                                                        monkeypatch, metrics):
    import pyface.eval.evaluate as E

    def no_loading(*a, **k):
        raise AssertionError("networks loaded before the command line was refused")

    monkeypatch.setattr(E, "load_networks", no_loading)
    args = ["eval", "copy-source", "--data", root, *BASE[:-1], metrics]
    assert main(args) == 2
    err = _err(capsys)
    first = metrics.split(",")[-2 if "," in metrics else 0]
    assert f"--metrics {metrics}: '{first}'" in err and "--detector none" in err
    monkeypatch.setenv("PYFACE_PARSE_ONLY", "1")     # the same answer without running anything
    assert main(args) == 2
    assert "--detector none" in _err(capsys)
    missing = ["eval", "copy-source", "--data", str(tmp_path / "later"), *BASE[:-1], metrics]
    assert main(missing) == 2            # --data not there yet: still refused
    assert "--detector none" in capsys.readouterr().err


def test_runs_out_that_is_a_file(root, tmp_path, capsys):
    (tmp_path / "FILE").write_text("x")
    assert main(["eval", "--runs", "--data", root, *BASE, "--out", str(tmp_path / "FILE")]) == 2
    assert "FILE: exists and is not a folder" in _err(capsys)


def test_cross_protocol_on_a_set_without_cross_pairs(one_identity, capsys):
    for proto in ("cross", "both"):
        assert main(["eval", "copy-source", "--data", one_identity, *BASE, "--protocol",
                     proto]) == 2
        assert f"--protocol {proto}: {one_identity} has no cross-identity pairs" in _err(capsys)


def test_runs_without_sheet_rows_write_no_sheets(root, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--runs", "--data", root, *BASE, "--max-pairs", "1", "--sheet-rows",
                 "0", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["copy-source.json", "report.json", "table.md",
                                       "warp-baseline.json"]


def test_data_that_is_not_a_dataset(tmp_path, capsys):
    """A missing or unusable --data is an input's failure: exit code 1 (README: exit codes)."""
    (tmp_path / "a.png").write_bytes(b"x")
    assert main(["eval", "copy-source", "--data", str(tmp_path), *BASE]) == 1
    assert "no index.json and no video folders" in _err(capsys)
    assert main(["eval", "copy-source", "--data", str(tmp_path / "nope"), *BASE]) == 1
    assert "nope: not found (expected a pyface dataset root" in _err(capsys)
    assert main(["eval", "copy-source", "--data", str(tmp_path / "a.png"), *BASE]) == 1
    assert f"--data {tmp_path / 'a.png'}: a file, not a folder (expected a pyface dataset " \
        "root" in _err(capsys)


def test_sheet_and_json_into_a_folder_and_the_table_matches_the_json(root, tmp_path, capsys):
    out = str(tmp_path / "new") + os.sep
    assert main(["eval", "copy-source", "--data", root, *BASE[:-1], "psnr,ssim", "--json", out,
                 "--sheet", out]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "new")) == ["copy-source.json", "copy-source.png"]
    with open(tmp_path / "new" / "copy-source.json") as f:
        report = json.load(f)
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in printed.splitlines()
            if line.split()[:1] and line.split()[0] in report["protocols"]}
    assert len(rows) == sum(len(r["subsets"]) for r in report["protocols"].values()) > 0
    for proto, r in report["protocols"].items():
        for subset, s in r["subsets"].items():
            count, psnr, psnr_face, ssim, ssim_face, fps = rows[(proto, subset)]
            assert int(count) == s["count"]
            assert psnr == f"{s['psnr']['image']:.2f}" and psnr_face == f"{s['psnr']['face']:.2f}"
            assert ssim == f"{s['ssim']['image']:.4f}" and ssim_face == f"{s['ssim']['face']:.4f}"
            assert fps == f"{r['fps']:.1f}"


def test_under_torchrun_argument_errors_come_before_the_process_group(root, tmp_path,
                                                                      monkeypatch, capsys):
    """Launched by torchrun (WORLD_SIZE=2) every rank checks the arguments before joining the
    process group (the sharded evaluation itself: tests/test_eval_shard.py): a bad option is one
    line on each rank, rank 1's prefixed with its rank, exit code 2, nothing written."""
    out = str(tmp_path / "r.json")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, prefix in (("0", ""), ("1", "[rank 1] ")):
        monkeypatch.setenv("RANK", rank)
        assert main(["eval", "copy-source", "--data", root, *BASE, "--json", out,
                     "--max-pairs", "0"]) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and not os.path.exists(out), (rank, cap.out)
        assert cap.err == (f"{prefix}pyface eval: --max-pairs: expected an integer >= 1 or none, "
                           "got 0\n")
    monkeypatch.setenv("WORLD_SIZE", "1")        # torchrun with one process: an ordinary run
    monkeypatch.setenv("RANK", "0")
    assert main(["eval", "copy-source", "--data", root, *BASE, "--json", out]) == 0
    assert os.path.isfile(out) and json.load(open(out))["world_size"] == 1


def test_another_models_checkpoint_names_the_option_it_came_from(root, tmp_path, capsys):
    """--checkpoint and --runs NAME=RUN of another model's run: what it holds and what the model
    takes, after the option that named it."""
    import torch

    from pyface import checkpoint as ckpt

    run = tmp_path / "goha-run"
    latest = ckpt.save_folder(ckpt.checkpoint_path(str(run), 5), {"model.a": torch.zeros(1)},
                              {"kind": "train", "step": 5,
                               "experiment": {"model": "goha", "model_config": {}}})
    ckpt.mark_latest(latest)
    detail = (f" (its latest checkpoint {latest}): holds model 'goha' (a training checkpoint of "
              "step 5), not 'mmfa': expected a run folder or training checkpoint of 'mmfa' "
              "(pyface train mmfa)\n")
    assert main(["eval", "mmfa", "--checkpoint", str(run), "--data", root, *BASE]) == 1
    assert capsys.readouterr().err == f"pyface eval: --checkpoint {run}" + detail
    # no --checkpoint at all is a usage error (2), named before anything loads
    assert main(["eval", "mmfa", "--data", root, *BASE]) == 2
    assert capsys.readouterr().err == (
        "pyface eval: --checkpoint: required for model 'mmfa' (only copy-source, warp-baseline "
        "runs without one)\n")
    assert main(["eval", "--runs", f"mmfa={run}", "--out", str(tmp_path / "e"), "--data", root,
                 *BASE]) == 1
    assert capsys.readouterr().err == f"pyface eval: --runs mmfa={run}" + detail


# -- --compile -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """An example-model run at the eval set's 16^2 (1 step)."""
    run = tmp_path_factory.mktemp("evalcli_example") / "run"
    sets = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
            "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
            "data.resolution=16", "data.size=16", "train.batch_size=4", "train.progress=false",
            "train.tensorboard=false", "train.image_every=0", "train.steps=1",
            f"train.run_dir={run}"]
    assert main(["train", "example", *sum((["--set", s] for s in sets), [])]) == 0
    return str(run)


def test_compile_mode_is_checked_and_refused_for_a_baseline(root, capsys):
    assert main(["eval", "copy-source", "--data", root, *BASE, "--compile", "fast"]) == 2
    assert _err(capsys) == ("pyface eval: --compile: expected one of off, default, "
                            "reduce-overhead, max-autotune, max-autotune-no-cudagraphs, "
                            "aot_eager, eager, got 'fast'\n")
    assert main(["eval", "copy-source", "--data", root, *BASE, "--compile"]) == 2
    assert "--compile: copy-source is a baseline, with no modules to compile" in _err(capsys)


def test_compile_reaches_the_pipeline_and_the_report(root, example_run, tmp_path, capsys,
                                                     monkeypatch):
    """--compile MODE compiles the model's pipeline (pyface.models.load(compile=)); the JSON
    records the mode and the modules ("off" and none without it). The example's pipeline names
    none: the mode reaches Pipeline.compile, which records it and compiles nothing."""
    from pyface.train.example import ExamplePipeline

    seen = []
    compile_ = ExamplePipeline.compile
    monkeypatch.setattr(ExamplePipeline, "compile",
                        lambda self, options: seen.append(options) or compile_(self, options))
    args = ["eval", "example", "--checkpoint", example_run, "--data", root, *BASE,
            "--protocol", "same", "--max-pairs", "2"]
    assert main(args + ["--json", str(tmp_path / "c.json"), "--compile", "eager"]) == 0
    assert [o.backend for o in seen] == ["eager"]
    out = capsys.readouterr().out
    assert "--compile eager: compiled nothing; same: no chunk compiled" in out
    rep = json.load(open(tmp_path / "c.json"))
    assert rep["compile"] == "eager" and rep["compiled_modules"] == []
    assert main(args + ["--json", str(tmp_path / "p.json")]) == 0
    assert "--compile" not in capsys.readouterr().out
    rep = json.load(open(tmp_path / "p.json"))
    assert rep["compile"] == "off" and rep["compiled_modules"] == []
    assert "compile_chunks" not in rep["protocols"]["same"]


# -- --option --------------------------------------------------------------------------------

def test_option_reaches_load_and_the_report(root, example_run, tmp_path, capsys, monkeypatch):
    """--option KEY=VALUE: the model's inference options, checked (exit 2 naming the key or
    model.KEY, before any metric or model loads), passed to pyface.models.load(options=) and
    recorded in the JSON report ({} without)."""
    import pyface.models
    from pyface.eval import evaluate as E
    from pyface.train.example import TriplaneAutoencoder

    monkeypatch.setattr(TriplaneAutoencoder, "inference_options", ("depth_samples",))
    seen = []
    load = pyface.models.load
    monkeypatch.setattr(pyface.models, "load",
                        lambda *a, **k: seen.append(k.get("options")) or load(*a, **k))
    args = ["eval", "example", "--checkpoint", example_run, "--data", root, *BASE,
            "--protocol", "same", "--max-pairs", "2"]
    assert main(args + ["--json", str(tmp_path / "o.json"), "--option",
                        "model.depth_samples=2"]) == 0
    assert seen == [{"depth_samples": 2}]
    assert json.load(open(tmp_path / "o.json"))["options"] == {"model.depth_samples": 2}
    seen.clear()
    assert main(args + ["--json", str(tmp_path / "n.json")]) == 0
    assert seen == [None] and json.load(open(tmp_path / "n.json"))["options"] == {}
    # a field of a nested config by its dotted path (EG3D's) reaches load as well (the example
    # run is not an EG3D checkpoint: load refuses it after the options passed)
    seen.clear()
    eg3d = ["eval", "eg3d", "--checkpoint", example_run, "--data", root, *BASE,
            "--protocol", "same", "--max-pairs", "2"]
    assert main(eg3d + ["--option", "generator.render.depth_resolution=96"]) == 1
    assert seen == [{"generator.render.depth_resolution": 96}]
    capsys.readouterr()

    def no_loading(*a, **k):
        raise AssertionError("the metrics load after the options are checked")

    monkeypatch.setattr(E, "load_networks", no_loading)
    seen.clear()
    assert main(args + ["--option", "hidden=4"]) == 2
    assert "options: 'hidden' is not an inference option of model 'example'" in _err(capsys)
    assert main(args + ["--option", "depth_samples=many"]) == 2
    assert "model.depth_samples: expected int, got 'many'" in _err(capsys)
    assert main(args + ["--option", "depth_samples"]) == 2
    assert "--option 'depth_samples': expected key=value" in _err(capsys)
    assert main(eg3d + ["--option", "model.generator.render.depth_resolution=many"]) == 2
    assert "model.generator.render.depth_resolution: expected int, got 'many'" in _err(capsys)
    assert main(eg3d + ["--option", "generator.render.ray_start=2"]) == 2
    assert "options: 'generator.render.ray_start' is not an inference option of model 'eg3d'" \
        in _err(capsys)
    assert main(["eval", "copy-source", "--data", root, *BASE, "--option", "a=1"]) == 2
    assert "--option: copy-source is a baseline, with no inference options" in _err(capsys)
    assert main(["eval", "--runs", f"example={example_run}", "--out", str(tmp_path / "r"),
                 "--data", root, *BASE, "--option", "depth_samples=2"]) == 2
    assert "--runs takes no --option" in _err(capsys)
    assert seen == []


def test_help_explains_option(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--option KEY=VALUE" in text and "--option model.pti_steps=50" in text


def test_an_interrupted_json_write_keeps_the_earlier_report(root, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the report is written: --json keeps the earlier, complete report (the JSON
    goes to a temporary renamed over it), and no temporary is left."""
    out = tmp_path / "r.json"
    assert main(["eval", "copy-source", "--data", root, *BASE, "--max-pairs", "2",
                 "--json", str(out)]) == 0
    before = out.read_text()
    json.loads(before)

    def dump(obj, f, **kw):
        f.write('{"data": ')                  # part of it written, then the signal lands
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", dump)
    assert main(["eval", "copy-source", "--data", root, *BASE, "--max-pairs", "2",
                 "--json", str(out)]) == 130
    assert capsys.readouterr().err.strip() == "pyface eval: interrupted"
    assert out.read_text() == before and os.listdir(tmp_path) == ["r.json"]
