"""Booster: three passes a micro-batch, and the optimizer's gradient is
grad f(w) + lam * (grad h(w) - grad h(w - alpha * grad h / ||grad h||)), with w restored; fine-tuning
after it is plain SFT."""

from __future__ import annotations

import pytest
import torch

from cwac.data.prompts import collate_train, pad_id
from cwac.losses import response_loss
from tests.baselines.conftest import features, make_ctx, make_method, params, padded_batch as _batch


def _booster(tiny_model, tmp_path, **cfg):
    model, tok, fmt, tcfg = tiny_model
    m = make_method("booster", make_ctx(tcfg, tok, fmt, tmp_path, stage="align"), **cfg)
    m.prepare(model)
    return m


def _grads(model, loss):
    ps = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, ps, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, ps)]


def test_three_passes_and_the_attenuated_gradient(tiny_model, tmp_path):
    model, *_ = tiny_model
    lam, alpha = 5.0, 0.1
    m = _booster(tiny_model, tmp_path, lam=lam, alpha=alpha, harmful_batch_size=3)
    batch = _batch(tiny_model)
    before = params(model)
    fwd, bwd = [], []
    last = model.model.layers[-1]
    h1 = last.register_forward_hook(lambda *a: fwd.append(1))
    h2 = last.register_full_backward_hook(lambda *a: bwd.append(1))
    try:
        out = m.compute_loss(model, batch, step=0)
        assert len(fwd) == 3 and len(bwd) == 2   # h(w), h(w'), f(w) forwards; two autograd.grad calls so far
        out.total.backward()
        assert len(bwd) == 3                       # the loop's backward is the third
    finally:
        h1.remove()
        h2.remove()
    assert set(out.losses) == {"task", "attenuation"}
    for n, p in model.named_parameters():          # the weights are restored after the perturbed pass
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)

    # the same quantities, computed independently on the harmful rows the method drew
    hb = collate_train([m.harmful.features[i] for i in m.last["harmful_ids"]], m.harmful.pad)
    ps = [p for p in model.parameters() if p.requires_grad]
    g = _grads(model, response_loss(model, hb))
    gnorm = torch.sqrt(sum((x ** 2).sum() for x in g))
    h_w = float(response_loss(model, hb).detach())
    with torch.no_grad():
        for p, x in zip(ps, g):
            p.sub_(alpha * x / (gnorm + 1e-7))        # w' = w - alpha g / ||g||: a harmful *descent* step
    g2 = _grads(model, response_loss(model, hb))
    h_w2 = float(response_loss(model, hb).detach())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    gf = _grads(model, response_loss(model, batch))
    for p, a, b, c in zip(ps, gf, g, g2):
        torch.testing.assert_close(p.grad, a + lam * (b - c), rtol=1e-4, atol=1e-6)
    assert h_w2 < h_w   # the inner step lowers the harmful loss, so the attenuation term is positive
    assert float(out.losses["attenuation"].detach()) == pytest.approx(lam * (h_w - h_w2), rel=1e-4)
    assert out.metrics["booster_harmful_loss"] == pytest.approx(h_w, rel=1e-5)
    assert all(not layer._forward_hooks for layer in model.model.layers)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_harmful_chunks_sum_to_the_whole_batch(tiny_model, tmp_path, reduction):
    """harmful_chunk splits passes 1 and 2 into forward/backward passes of fewer rows, weighted so that
    the optimizer's gradient and the attenuation are those of the whole harmful batch in one pass."""
    model, *_ = tiny_model
    batch = _batch(tiny_model)
    grads, outs = {}, {}
    for chunk in (None, 1, 2):
        m = _booster(tiny_model, tmp_path, harmful_batch_size=3, harmful_chunk=chunk)
        m.loss_reduction = reduction
        model.zero_grad(set_to_none=True)
        fwd = []
        h = model.model.layers[-1].register_forward_hook(lambda *a: fwd.append(1))
        try:
            out = m.compute_loss(model, batch, step=0)
        finally:
            h.remove()
        assert len(fwd) == 2 * -(-3 // (chunk or 3)) + 1   # chunks of h(w), of h(w'), then f(w)
        out.total.backward()
        grads[chunk] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        outs[chunk] = (float(out.losses["attenuation"].detach()), out.metrics["booster_harmful_loss"])
        assert m.last["harmful_ids"] == outs.setdefault("ids", m.last["harmful_ids"])   # same seeded rows
    for chunk in (1, 2):
        assert outs[chunk][0] == pytest.approx(outs[None][0], rel=1e-4, abs=1e-6)
        assert outs[chunk][1] == pytest.approx(outs[None][1], rel=1e-5)
        for a, b in zip(grads[chunk], grads[None]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_harmful_chunk_is_checked_and_planned():
    from tests.conftest import compose

    from cwac.experiment.preflight import check_settings
    from cwac.memory import PlanSpec
    from cwac.plan import model_shapes

    with pytest.raises(ValueError, match=r"alignment.method.harmful_chunk=0 is not valid"):
        check_settings(compose("model=tiny", "budget=smoke", "model.align=true", "method=booster",
                               "method@alignment.method=booster", "alignment.method.harmful_chunk=0"))
    from baselines.booster import Booster

    spec = PlanSpec(shapes=model_shapes(compose("model=tiny")), dtype_bytes=2)
    node = compose("model=llama3_8b_instruct", "budget=paper", "method=booster").method
    assert node.harmful_chunk == 1   # the paper preset
    whole = Booster.planned_memory(compose("method=booster", "method.harmful_chunk=null").method, spec)
    chunked = Booster.planned_memory(node, spec)
    # a chunk of one row at micro-batch 1 holds no activations beyond the loop's; one more gradient buffer
    assert not any("activations" in k for k in chunked) and any("activations" in k for k in whole)
    assert sum(chunked.values()) == 3 * spec.trainable * 2 < sum(whole.values())


def test_harmful_rows_are_the_defence_range_and_never_evaluation_prompts(tiny_model, tmp_path):
    from cwac.data.harmful import beavertails_pairs, eval_harmful_norms, prompt_set
    from cwac.utils import normalize_prompt

    m = _booster(tiny_model, tmp_path)
    pool = beavertails_pairs("local")
    assert len(m.harmful.features) == 99
    attack_front = {normalize_prompt(e.instruction) for e in pool[:100]}
    banned = eval_harmful_norms() | {normalize_prompt(p) for p in prompt_set("beavertails_attack_val")}
    from baselines._harmful import harmful_pairs

    rows = harmful_pairs("local", None)
    assert all(normalize_prompt(e.instruction) not in banned | attack_front for e in rows)
    with pytest.raises(ValueError, match="method.n_harmful=500"):
        harmful_pairs("local", 500)


def test_finetune_stage_requires_a_booster_alignment(tiny_model, tmp_path):
    _, tok, fmt, _ = tiny_model
    from tests.conftest import compose

    from cwac.experiment.preflight import check_settings

    with pytest.raises(ValueError, match="method@alignment.method=booster model.align=true"):   # pre-flight
        check_settings(compose("model=tiny", "budget=smoke", "method=booster"))
    ok = compose("model=tiny", "model.align=true", "method=booster", "method@alignment.method=booster")
    m = make_method("booster", make_ctx(ok, tok, fmt, tmp_path))
    out = m.compute_loss(tiny_model[0], _batch(tiny_model), 0)
    assert set(out.losses) == {"task"} and not out.metrics   # plain SFT
    assert m.record_info()["alignment_method"]["name"] == "booster"
    with pytest.raises(ValueError, match="config training.zero_stage=3: Booster is not supported under ZeRO-3"):
        check_settings(compose("model=tiny", "budget=smoke", "training.zero_stage=3", "model.align=true",
                               "method@alignment.method=booster"))


def test_smoke_cell_builds_its_own_aligned_artifact(tiny_cfg):
    from cwac.experiment.align import alignment_log
    from cwac.experiment.cell import run_cell

    rec = run_cell(tiny_cfg("model.align=true", "harmful=p0.1", "eval.hs_n=4", "eval.harmless_n=0", "eval.fa_n=4",
                            "method=booster", "method@alignment.method=booster"))
    assert rec["status"] == "complete" and 0 <= rec["metrics"]["hs"] <= 100
    assert rec["info"]["alignment"]["meta"]["method"] == "booster" and rec["info"]["method"]["stage"] == "finetune"
    assert rec["info"]["method"]["alignment_method"]["name"] == "booster"
    # the build's own terms travel with the artifact (cwac.experiment.align.alignment_log), one row a step
    log = alignment_log(rec["info"]["start_model"])
    assert len(log) == rec["info"]["alignment"]["meta"]["steps"]
    assert all({"align/losses/attenuation", "align/metrics/booster_harmful_loss",
                "align/metrics/booster_harmful_loss_perturbed"} <= set(r) for r in log)
