"""Every baseline runs as a cell through ``cwac.experiment.cell.run_cell`` on the tiny model (aligned by our
alignment stage, so base and aligned weights both exist) and records what it did."""

from __future__ import annotations

import pytest

from cwac.experiment.cell import run_cell

CASES = {
    "asft": ["method=asft"],
    "safeinstr": ["method=safeinstr"],
    "sppft": ["method=sppft"],
    "lisa": ["method=lisa", "method.align_steps=1", "method.finetune_steps=2"],
    "safelora_lora": ["method=safelora", "training=lora", "method.k=2"],
    # at the paper's rho=2 the tiny model's every answer is empty (a cell that is refused, not scored)
    "vaccine": ["method=vaccine", "method@alignment.method=vaccine", "alignment.method.rho=0.1"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_cell_runs_and_records_the_method(tiny_cfg, case):
    rec = run_cell(tiny_cfg("model.align=true", "harmful=p0.1", "eval.hs_n=4", "eval.harmless_n=0", "eval.fa_n=4",
                            *CASES[case]))
    assert rec["status"] == "complete" and 0 <= rec["metrics"]["hs"] <= 100
    info = rec["info"]["method"]
    if case == "asft":
        assert info["n_matrices"] == 14 and info["delta_w"] == "W - W_aligned"  # every linear map of 2 layers
    elif case == "safeinstr":
        assert info["n_safety_rows"] == 4 and rec["info"]["n_train_rows"] == 44
        assert rec["info"]["harmful_rows"] == 4   # the added safety rows are not counted as harmful
    elif case == "sppft":
        assert info["band"] == [0, 0] and info["frozen_params"] > 0
    elif case == "lisa":
        assert info["n_alignment_steps"] == 4 and info["n_steps"] == 10 and info["switch_steps"] == [0, 2, 3, 5, 6, 8]
    elif case == "safelora_lora":
        assert info["n_projected"] == 2 and info["delta_w"] == "B A" and len(info["cosines"]) == 4
    elif case == "vaccine":
        assert rec["info"]["alignment"]["meta"]["method"] == "vaccine" and info["stage"] == "finetune"
        assert info["alignment_method"] == {"name": "vaccine", "rho": 0.1, "norm": "batch"}
