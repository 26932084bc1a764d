"""The two offline-built constraints of CWAC (Peng et al., Findings of ACL 2026, arXiv 2604.12384).

* ``activations``: prompt batching and streaming of a decoder's activations (linear-map inputs,
  residual stream) with padding masked and an early exit after the last layer needed.
* ``subspace``: the weight constraint. Input covariance of each constrained linear map over
  harmful prompts, its eigendecomposition, the protected basis ``U_r`` and the projection
  ``g <- g - (g U_r) U_r^T`` (docs/method.md §3).
* ``sae``: the activation constraint. A TopK SAE on the residual stream, the selected
  safety latents, their recorded aligned values and the regulariser (docs/method.md §4).
* ``pool``: the held-in harmful prompt pool, split into calibration / regularisation /
  held-out parts, optionally restricted to prompts the aligned model refuses.
"""
