"""Integration tier: the one-shot refinements on the embedded SmolLM2-135M, end to end through
calibrate_and_convert (small calibration so it runs in a few minutes on a CPU)."""
import copy

import pytest
import torch

from harness.calibrate import CalibSpec
from harness.methods import calibrate_and_convert
from harness.methods._oneshot import heldout_windows
from harness.mla import Budget

pytestmark = pytest.mark.real

CALIB = CalibSpec("wiki", samples=8, seq_len=64, seed=0)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    import os

    os.environ["MLA_HARNESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from harness.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="fp32")


def test_heldout_windows_follow_the_calibration_windows(smollm):
    from harness.data import token_windows

    _, tok = smollm
    calib = token_windows(tok, "wiki", "calib", CALIB.samples, CALIB.seq_len, CALIB.seed)
    both = token_windows(tok, "wiki", "calib", CALIB.samples + 8, CALIB.seq_len, CALIB.seed)
    assert torch.equal(both[:CALIB.samples], calib)
    assert torch.equal(heldout_windows(tok, CALIB), both[CALIB.samples:])


def test_tuned_sensitivity_sequential_conversion_records_its_choices(smollm):
    model, tok = smollm
    opts = dict(key_metric="none", allocation="sensitivity", tune=["kv_scale"], sequential=True)
    m = copy.deepcopy(model)
    rec = calibrate_and_convert(m, tok, "aware_joint", Budget(kv_save=0.75), CALIB, progress=False, **opts)
    assert rec["tuned"]["chosen"]["kv_scale"] == rec["options"]["kv_scale"]
    widths = rec["options"]["widths"]
    assert sum(widths) == 30 * 96 and all(48 <= w <= 192 for w in widths)
    assert [lay["cache_width"] for lay in rec["layers"]] == widths
    assert rec["sequential"]["target"] == "original" and not rec["sequential"]["cached"]
    assert rec["calibration"]["sequential"] == "original"
    # the same conversion again: sensitivity probes and sequential statistics come from the cache
    m2 = copy.deepcopy(model)
    rec2 = calibrate_and_convert(m2, tok, "aware_joint", Budget(kv_save=0.75), CALIB, progress=False, **opts)
    assert rec2["sequential"]["cached"] and rec2["sensitivity"]["probes_reused"] > 0
    x = tok("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    assert torch.equal(m(x).logits, m2(x).logits)
