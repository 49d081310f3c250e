"""A tiny evaluation set for the eval tests: synthetic videos plus a static video (every frame is
frame 0 of the first video, so copy-source is exact on it)."""
import numpy as np

from pyface.data import format as fmt
from pyface.data import synthetic as S


def eval_set(out: str, static_frames: int, **synth) -> str:
    S.generate(out, S.default_config(**synth), progress=False)
    rec = fmt.load_index(out)[0]
    frame = fmt.read_frame(out, rec, 0)
    mask = fmt.read_mask(out, rec, 0) > 127
    c, lab = fmt.load_coeffs(out, rec)[:1], fmt.load_labels(out, rec)[:1]
    lms = fmt.load_landmarks(out, rec)[:1]
    n = static_frames
    fmt.write_video(out, "static", np.repeat(frame[None], n, 0), np.repeat(c, n, 0),
                    np.repeat(lab, n, 0), identity="static", masks=np.repeat(mask[None], n, 0),
                    landmarks=np.repeat(lms, n, 0),
                    extra_meta={"generator": "pyface.data.synthetic"})   # exact ground truth
    fmt.write_index(out)
    return out
