"""Fused sparse-row gradient ascent and influence scoring, and per-token cross-entropy (Triton, with a
torch reference).

    from gradstore_kernels import ascent_score, score, token_cross_entropy, topk_influence, TopK

Each op takes `backend="auto" | "triton" | "reference"`: "auto" runs Triton on CUDA and the
torch reference elsewhere (logged once on the "gradstore_kernels" logger). The reference is
the specification the kernels are tested against.
"""

from .ascent import ascent_score, ascent_score_reference
from .cross_entropy import token_cross_entropy, token_cross_entropy_reference
from .errors import BackendUnavailableError, KernelDtypeError, KernelInputError
from .scoring import score, score_reference
from .topk import TopK, topk_influence

__all__ = [
    "BackendUnavailableError",
    "KernelDtypeError",
    "KernelInputError",
    "TopK",
    "ascent_score",
    "ascent_score_reference",
    "score",
    "score_reference",
    "token_cross_entropy",
    "token_cross_entropy_reference",
    "topk_influence",
]
