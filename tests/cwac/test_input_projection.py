"""cwac.constraints.input_projection: the projection computed on a map's inputs gives the
gradient-side hook's weight gradient (and the unchanged input gradient), and the choice per call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cwac.constraints import input_projection
from cwac.constraints.subspace import Subspace


def _subspace(d_in: int, r: int, kind: str) -> Subspace:
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))
    u = q[:, :r] if kind == "protected" else q[:, r:]
    return Subspace(u.float(), kind, r)


def _grads(lin: nn.Linear, x: torch.Tensor, hook=None):
    lin.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    h = lin.weight.register_hook(hook) if hook is not None else None
    (lin(x).pow(2).sum() + lin(x[:, :2]).sum()).backward()   # two calls in one backward
    if h is not None:
        h.remove()
    return lin.weight.grad.clone(), lin.bias.grad.clone(), x.grad.clone()


@pytest.mark.parametrize("kind", ["protected", "free"])
@pytest.mark.parametrize("where", ["input", "auto"])
def test_input_side_equals_the_gradient_hook(kind, where):
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    sub = _subspace(12, 4 if kind == "protected" else 9, kind)
    x = torch.randn(3, 4, 12)
    ref = _grads(lin, x, hook=sub.project)
    input_projection.install(lin, sub, where)
    got = _grads(lin, x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sub.protected_norm(got[0]) < 1e-5 * float(got[0].norm())   # no component in U_r
    input_projection.remove(lin)
    assert not input_projection.installed(lin) and "forward" not in lin.__dict__
    plain = _grads(lin, x)
    assert sub.protected_norm(plain[0]) > 1e-2 * float(plain[0].norm())   # removed: unprojected again


def test_auto_picks_the_inputs_when_a_call_has_fewer_tokens_than_outputs(monkeypatch):
    assert input_projection.input_side("auto", 100, 576) and not input_projection.input_side("auto", 600, 576)
    assert input_projection.input_side("input", 10_000, 4) and not input_projection.input_side("gradient", 1, 4)
    torch.manual_seed(0)
    lin, sub = nn.Linear(8, 3), _subspace(8, 2, "protected")
    seen = []
    real = sub.project

    def spy(t):
        seen.append(tuple(t.shape))
        return real(t)

    monkeypatch.setattr(sub, "project", spy)
    input_projection.install(lin, sub, "auto")
    lin(torch.randn(2, 8)).sum().backward()     # 2 tokens < 3 outputs: the inputs are projected
    lin(torch.randn(10, 8)).sum().backward()    # 10 tokens >= 3 outputs: the gradient is
    assert seen == [(2, 8), (3, 8)]


def test_no_graph_and_frozen_weights_use_the_plain_forward():
    lin, sub = nn.Linear(6, 2), _subspace(6, 2, "protected")
    input_projection.install(lin, sub, "input")
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
    lin.weight.requires_grad_(False)
    assert lin(x).grad_fn is None or "ProjectedLinear" not in type(lin(x).grad_fn).__name__
    with pytest.raises(ValueError, match="project_at"):
        input_projection.install(lin, sub, "gradient")
