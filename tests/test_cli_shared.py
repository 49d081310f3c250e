"""Helpers shared by the commands (pyface.cli): the NAME=PATH options of `pyface eval` and
`pyface animate` are parsed by one function, with one set of messages."""
import pytest

from pyface.cli import parse_name_paths


def test_parse_name_paths(tmp_path):
    f = tmp_path / "vgg.pth"
    f.write_bytes(b"")
    assert parse_name_paths(None) == {}
    assert parse_name_paths(["a=x", "b=y=z", "a=w"]) == {"a": "w", "b": "y=z"}   # last one wins
    for bad in ("vgg", "=x", "vgg="):
        with pytest.raises(ValueError, match=f"^--weights: expected NAME=PATH, got '{bad}'$"):
            parse_name_paths([bad])
    with pytest.raises(ValueError, match=r"^--weights: expected NAME in \['a', 'b'\], got 'c'$"):
        parse_name_paths(["c=x"], names={"b", "a"})
    with pytest.raises(FileNotFoundError, match="^--weights vgg=MISSING: no such file$"):
        parse_name_paths(["vgg=MISSING"], must_exist=True)
    assert parse_name_paths([f"vgg={f}"], must_exist=True) == {"vgg": str(f)}
    with pytest.raises(ValueError, match="^--set: expected NAME=PATH"):
        parse_name_paths(["x"], "--set")


def test_eval_and_animate_share_the_parser(monkeypatch):
    """Both commands go through parse_name_paths (one place for the syntax and its messages)."""
    import argparse

    import pyface.cli
    from pyface.eval.weights import parse_weights
    from pyface.train import animate_cli

    calls = []
    real = pyface.cli.parse_name_paths

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(pyface.cli, "parse_name_paths", spy)
    monkeypatch.setattr(animate_cli, "parse_name_paths", spy)
    assert parse_weights(["fid=a"]) == {"fid": "a", "kid": "a"}
    args = argparse.Namespace(batch=None, stride=None, frames=None, source="s", driving=None,
                              checkpoint="c", fps=None, truncation=1.0, weights=[])
    animate_cli.check_animate_args(args)
    assert args.weights == {}
    assert [sorted(k) for k in calls] == [["names"], ["must_exist"]]


TORCHRUN_REFUSED = [
    # (command name printed, argv); every one of them writes files or measures on one process
    ("pyface animate", ["animate", "eg3d", "--checkpoint", "run", "--source", "src.png",
                        "--out", "a.mp4"]),
    ("pyface animate", ["animate", "eg3d", "--checkpoint", "run", "--seeds", "0-1"]),
    ("pyface invert", ["invert", "eg3d", "src.png", "--checkpoint", "run", "--out", "inv"]),
    ("pyface convert vgg19", ["convert", "vgg19", "src.pth", "out"]),
    ("pyface bench", ["bench", "triplane", "--device", "cpu", "--no-compile", "--json", "b/"]),
    ("pyface data cache --build", ["data", "cache", "--build", "16"]),
    ("pyface data index", ["data", "index", "root"]),
    ("pyface data bench", ["data", "bench", "--root", "root"]),
    ("python -m pyface.bench.train", ["--steps", "1", "--json", "b/"]),
    ("python -m pyface.bench.train MODEL", ["example", "--steps", "1", "--json", "b/"]),
]


@pytest.mark.parametrize("command,argv", TORCHRUN_REFUSED,
                         ids=["animate", "animate-seeds", "invert", "convert", "bench",
                              "data-cache", "data-index", "data-bench", "bench.train",
                              "bench.train-MODEL"])
def test_commands_without_distributed_code_are_refused_under_torchrun(
        tmp_path, monkeypatch, capsys, command, argv):
    """Launched by torchrun (WORLD_SIZE=2), every rank ran the whole command and wrote the same
    files (or timed the same ops on a machine the other ranks loaded): rank 0 says once to run it
    without torchrun, every rank exits with code 2 before any work, and nothing is written."""
    from PIL import Image

    from pyface.bench import harness
    from pyface.bench import train as bench_train
    from pyface.cli import main

    def ran(*a, **k):
        pytest.fail("the command ran under torchrun")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYFACE_CACHE", str(tmp_path / "cache"))
    for module, fn in ((harness, "run_case"), (bench_train, "engine_overhead"),
                       (bench_train, "model_backends")):
        monkeypatch.setattr(module, fn, ran)
    Image.new("RGB", (16, 16)).save(tmp_path / "src.png")
    (tmp_path / "root").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run = bench_train.main if command.startswith("python") else main
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert run(list(argv)) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and sorted(p.name for p in tmp_path.rglob("*")) == before
        if rank == "1":
            assert cap.err == ""
            continue
        assert cap.err.count("\n") == 1 and cap.err.startswith(
            f"{command}: runs as one process, not under torchrun (WORLD_SIZE=2: every rank "
            "would run all of it and write the same files); run the same "), cap.err


def test_bench_train_overlap_is_not_refused_under_torchrun(tmp_path, monkeypatch):
    """``--overlap`` is the benchmark made for torchrun: it gets past the refusal to its run."""
    from pyface.bench import train as bench_train

    def measured(*a, **k):
        raise KeyboardInterrupt            # stands for the measurement: reached

    monkeypatch.setattr(bench_train, "overlap_bench", measured)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert bench_train.main(["--overlap", "--json", f"{tmp_path}/"]) == 130
