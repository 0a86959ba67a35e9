"""How much of its input do the cut activations reveal? Distance correlation, on a probe batch.

Both methods send the cut-layer activations to the server. DSL's local objective (an aux
classifier at the cut) might make them carry more of the input, or less. We measure the
distance correlation dCor(X, Z) between the input images X (normalised, as the segment sees
them) and their activations Z = segment(X) on a fixed probe batch of test images, each round on
the client:

    dCor(X, Z) = dCov(X, Z) / sqrt(dCov(X, X) dCov(Z, Z)),  in [0, 1], 0 iff independent,

with dCov from centred pairwise Euclidean distance matrices: Szekely, Rizzo and Bakirov,
"Measuring and testing dependence by correlation of distances", Annals of Statistics 35 (2007).
NoPeek (Vepakomma, Gupta, Dubey, Raskar, 2019, arXiv:2008.09161) minimises this same quantity to
reduce leakage of the input through split-learning activations.
"""

from __future__ import annotations

import torch


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> float:
    """Bias-corrected distance correlation of two batches (n >= 4 samples, any shape each).

    The plain sample dCor of two *independent* batches of a few dozen images in thousands of
    dimensions is far above 0, which would swamp the differences we look for; the U-centred
    estimator
    (Szekely and Rizzo, "Partial distance correlation with methods for dissimilarities", Annals
    of Statistics 42, 2014) is unbiased for dCor^2 and near 0 there. Returned: the square root
    of that estimate, clipped at 0, so 1 means Z is a similarity transform of X.
    """
    if len(x) != len(z) or len(x) < 4:
        raise ValueError(f"need two batches of the same n >= 4, got {len(x)} and {len(z)}")
    a = _u_centred(x.reshape(len(x), -1).double())
    b = _u_centred(z.reshape(len(z), -1).double())
    dcov_xz, dcov_xx, dcov_zz = (a * b).sum(), (a * a).sum(), (b * b).sum()
    if dcov_xx <= 0 or dcov_zz <= 0:
        return 0.0
    return float((dcov_xz / (dcov_xx * dcov_zz).sqrt()).clamp(min=0).sqrt())


def _u_centred(v: torch.Tensor) -> torch.Tensor:
    n, d = len(v), torch.cdist(v, v)
    rows = d.sum(dim=1, keepdim=True) / (n - 2)
    u = d - rows - rows.T + d.sum() / ((n - 1) * (n - 2))
    return u.fill_diagonal_(0.0)
