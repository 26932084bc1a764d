"""RepNoise: the retain loss is the CE of the harmless (alignment) rows, the noise loss the MMD between
the harmful rows' masked MLP outputs and masked Gaussian noise, and the ascent term
-alpha * log(mean of the final and logit-lens CEs of the harmful rows + 1), as the reference."""

from __future__ import annotations

import pytest
import torch

from cwac.data.prompts import collate_train, pad_id
from cwac.losses import response_loss, target_ce
from tests.baselines.conftest import features, make_ctx, make_method, padded_batch as _batch


def _repnoise(tiny_model, tmp_path, **cfg):
    model, tok, fmt, tcfg = tiny_model
    m = make_method("repnoise", make_ctx(tcfg, tok, fmt, tmp_path, stage="align"), **cfg)
    m.prepare(model)
    return m


def _mmd_reference(x, y, mul=2.0, num=5):
    """The reference's MMD_loss, written out with the (2n, 2n, D) expansion."""
    n = x.shape[0]
    total = torch.cat([x, y])
    d2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    m = total.shape[0]
    bw = d2.detach().sum() / (m * m - m) / mul ** (num // 2)
    k = sum(torch.exp(-d2 / (bw * mul ** i)) for i in range(num))
    return (k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]).mean()


def test_the_three_terms_on_the_right_rows_and_activations(tiny_model, tmp_path):
    model, *_ = tiny_model
    alpha, beta = 1.0, 1e-3
    m = _repnoise(tiny_model, tmp_path, alpha=alpha, beta=beta, harmful_batch_size=3)
    batch = _batch(tiny_model)
    gen_state = m.gen.get_state()
    out = m.compute_loss(model, batch, step=0)
    assert set(out.losses) == {"task", "noise", "ascent"}
    assert all(not layer.mlp._forward_hooks for layer in model.model.layers)   # hooks removed

    # retain: the response CE of the loop's (harmless) batch
    torch.testing.assert_close(out.losses["task"].detach(), response_loss(model, batch).detach())

    # the harmful rows the method drew, and the MLP outputs on them (not on the harmless rows)
    hb = collate_train([m.harmful.features[i] for i in m.last["harmful_ids"]], m.harmful.pad)
    acts = []
    hs = [layer.mlp.register_forward_hook(lambda mod, a, o: acts.append(o.detach())) for layer in model.model.layers]
    try:
        with torch.no_grad():
            o = model(input_ids=hb["input_ids"], attention_mask=hb["attention_mask"], output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    for mine, ref in zip(m.last["mlp_outputs"], acts):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    mask = hb["labels"] != -100
    assert torch.equal(m.last["mask"], mask) and mask.any() and not mask.all()   # the harmful answer's positions

    # noise: mean over layers of MMD(masked MLP output, masked noise from the same seeded generator)
    g = torch.Generator().manual_seed(0)
    g.set_state(gen_state)
    mmds = []
    for a in acts:
        hid = a * mask.unsqueeze(-1)
        noise = torch.randn(hid.shape, generator=g) * mask.unsqueeze(-1)
        mmds.append(_mmd_reference(hid.flatten(1), noise.flatten(1)))
    assert float(out.losses["noise"].detach()) == pytest.approx(beta * float(torch.stack(mmds).mean()), rel=1e-3)
    assert float(torch.stack(mmds).mean()) > 0

    # ascent: -alpha * log((CE(final) + sum of the logit-lens CEs) / (L + 1) + 1), on the harmful rows
    targets = hb["labels"][:, 1:]
    with torch.no_grad():
        ce = target_ce(o.logits[:, :-1], targets)
        for h in o.hidden_states:
            ce = ce + target_ce(model.lm_head(model.model.norm(h))[:, :-1], targets)
    harmful_ce = ce / len(o.hidden_states)
    assert len(o.hidden_states) == len(model.model.layers) + 1
    assert float(out.losses["ascent"].detach()) == pytest.approx(-alpha * float(torch.log(harmful_ce + 1)), rel=1e-4)

    # the gradient reaches the model through all three terms; the ascent term raises the harmful CE
    out.total.backward()
    assert all(p.grad is not None for p in model.model.layers[0].mlp.parameters())


def test_the_ascent_term_pushes_the_harmful_ce_up(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _repnoise(tiny_model, tmp_path, harmful_batch_size=4)
    out = m.compute_loss(model, _batch(tiny_model), step=0)
    hb = collate_train([m.harmful.features[i] for i in m.last["harmful_ids"]], m.harmful.pad)
    before = float(response_loss(model, hb).detach())
    out.losses["ascent"].backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
    assert float(response_loss(model, hb).detach()) > before


def test_mmd_is_zero_for_equal_sets_and_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g) + 1.0
    from baselines.repnoise import mmd

    assert float(mmd(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd(x, y)) == pytest.approx(float(_mmd_reference(x, y)), rel=1e-4)


def test_finetune_stage_is_plain_sft(tiny_model, tmp_path):
    _, tok, fmt, _ = tiny_model
    from tests.conftest import compose

    from cwac.experiment.preflight import check_settings

    with pytest.raises(ValueError, match="method@alignment.method=repnoise model.align=true"):   # pre-flight
        check_settings(compose("model=tiny", "budget=smoke", "method=repnoise"))
    ok = compose("model=tiny", "model.align=true", "method=repnoise", "method@alignment.method=repnoise")
    out = make_method("repnoise", make_ctx(ok, tok, fmt, tmp_path)).compute_loss(tiny_model[0], _batch(tiny_model), 0)
    assert set(out.losses) == {"task"} and not out.metrics


def test_smoke_cell_builds_its_own_aligned_artifact(tiny_cfg):
    from cwac.experiment.align import alignment_log
    from cwac.experiment.cell import run_cell

    rec = run_cell(tiny_cfg("model.align=true", "harmful=p0.1", "eval.hs_n=4", "eval.harmless_n=0", "eval.fa_n=4",
                            "method=repnoise", "method@alignment.method=repnoise"))
    assert rec["status"] == "complete" and 0 <= rec["metrics"]["hs"] <= 100
    assert rec["info"]["alignment"]["meta"]["method"] == "repnoise" and rec["info"]["method"]["stage"] == "finetune"
    assert rec["info"]["method"]["alignment_method"]["name"] == "repnoise"
    # the build's own terms travel with the artifact (cwac.experiment.align.alignment_log), one row a step
    log = alignment_log(rec["info"]["start_model"])
    assert len(log) == rec["info"]["alignment"]["meta"]["steps"]
    assert all({"align/losses/noise", "align/losses/ascent", "align/metrics/repnoise_mmd"} <= set(r) for r in log)
