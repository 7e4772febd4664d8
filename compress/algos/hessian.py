"""The layer-wise Hessian H = 2 X Xᵀ / n that GPTQ and SparseGPT share, plus its damped inverse.

For a linear layer y = W x and the layer-wise loss ||W X - Ŵ X||², the Hessian with respect to each
row of W is ``2 X Xᵀ`` (X is [in_features, tokens]). Both papers average it over the calibration
set; we average over *tokens* (the IST-DASLab references average over sequences). A global scale
of H changes nothing in either algorithm: the OBS update uses H⁻¹ row ratios, the saliency
w²/[H⁻¹]_ii ranks within one layer, and dampening is relative to mean(diag H).

References: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ", ICLR 2023 (arXiv:2210.17323);
Frantar & Alistarh, "SparseGPT", ICML 2023 (arXiv:2301.00774).
"""
from __future__ import annotations

import torch

from compress.errors import CompressError, ConfigError


def accumulate_hessian(
    H: torch.Tensor | None, n_seen: int, x: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running mean ``H = 2/n · Σ x xᵀ``.

    ``x`` is ``[..., in_features]`` (any leading batch/sequence dims; every row is one token).
    ``H=None`` starts a new accumulator. Returns the updated ``(H, n_seen)``; ``n_seen`` counts
    tokens. The running-mean form keeps H's magnitude independent of the calibration size, so
    float32 accumulation does not grow with the number of tokens.
    """
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    n_new = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
    elif H.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"H has shape {tuple(H.shape)} but x has {x.shape[1]} features")
    if n_new == 0:
        return H, n_seen
    total = n_seen + n_new
    H = H * (n_seen / total)
    H = H + (2.0 / total) * (x.t() @ x)
    return H, total


class HessianAccumulator:
    """Stateful wrapper of ``accumulate_hessian`` for forward hooks: ``acc.add(inp)``; ``acc.H``."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_seen = 0
        self.dtype = dtype

    def add(self, x: torch.Tensor) -> None:
        self.H, self.n_seen = accumulate_hessian(self.H, self.n_seen, x.to(self.H.device), self.dtype)


def prepare_hessian(H: torch.Tensor, weight: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dead-input handling and dampening, as in the GPTQ/SparseGPT references.

    Inputs that were always zero (H_ii == 0) carry no information: their diagonal is set to 1 and
    their weights to 0 (they cannot affect the layer output on the calibration data). Then
    ``percdamp · mean(diag H)`` is added to the diagonal so H is safely positive definite.

    Returns ``(H_damped, W, dead)`` as new tensors; the inputs are not modified.
    """
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0.0 <= percdamp < 1.0:
        raise ConfigError(f"percdamp (dampening, fraction of mean diag H) must be in [0, 1), got {percdamp!r}")
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != weight.shape[1]:
        raise ValueError(f"H must be [in, in] = {weight.shape[1]}², got {tuple(H.shape)}")
    H = H.clone()
    W = weight.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    return H, W, dead


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U upper-triangular with H⁻¹ = Uᵀ U.

    Row i of U is the row of the inverse Hessian of the columns i.. that the sequential OBS update
    needs, divided by its square root: U[i, j] = [H_{i:,i:}⁻¹]_{0, j-i} / sqrt([H_{i:,i:}⁻¹]_{00}).
    This is the Cholesky reformulation of both papers (one factorisation instead of a rank-one
    inverse update per column).
    """
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise CompressError(
            "the calibration Hessian is not positive definite even after dampening; "
            "raise the dampening (percdamp) or use more calibration tokens"
        )
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0:
        raise CompressError("the inverse calibration Hessian lost positive definiteness; raise percdamp")
    return U
