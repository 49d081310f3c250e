"""Released weights -> `pyface convert` -> the command the docs name for the folder: a small GOHA
release (its names written back from pyface's by the table of tests/test_convert_goha.py)
converts on the command line and animates with `pyface animate goha --checkpoint OUT`."""
from __future__ import annotations

import torch

from pyface.cli import main
from test_cli_animate import _video_folder
from test_convert_goha import _TO_GOHA


def test_goha_release_converts_and_animates(tmp_path, capsys):
    from pyface.models.goha import GOHASR
    from test_model_goha import tiny_config

    torch.manual_seed(0)
    src = GOHASR(tiny_config(encoder_width=32, share_upsampler_weights=True))
    model, disc = {}, {}
    for k, v in src.state_dict().items():
        if k.startswith("discriminator."):
            disc[k[len("discriminator."):]] = v
            continue
        pre = next(p for p in _TO_GOHA if k.startswith(p[0]))
        model[pre[1] + k[len(pre[0]):]] = v
    torch.save({"iter": 825000, "model_state_dict": model, "discriminator_dict": disc},
               tmp_path / "checkpoint825000.ckpt")
    out = str(tmp_path / "goha-release")
    assert main(["convert", "goha", "--render-resolution", "32",
                 str(tmp_path / "checkpoint825000.ckpt"), out]) == 0
    assert capsys.readouterr().out.strip() == out
    video = _video_folder(tmp_path, "v")
    assert main(["animate", "goha", "--checkpoint", out, "--source", video, "--driving", video,
                 "--out", str(tmp_path / "goha.mp4"), "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "goha.mp4").stat().st_size > 0
