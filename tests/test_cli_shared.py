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
    with pytest.raises(ValueError, match="^--weights vgg=MISSING: no such file$"):
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
