"""Map pieces shared by the classifier-based methods (``cam``, ``ham``, ``iam``).

* :func:`lse_pool`: log-sum-exp pooling over the spatial grid (Wang et al. 2017, eq. 1);
* :func:`class_activation_maps`: ``sum_d w_kd A_d(i, j)`` from a linear classifier's weights;
* :func:`minmax_normalize`: each map to [0, 1] (Wang's "normalise to [0, 255]", divided by 255);
* :func:`refine_maps`: HAM's refined maps, ``sigmoid(w (minmax(upsample(cam)) - sigma))``, and
  :func:`refined_threshold_in_normalized_units`, the normalised value a refined threshold means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lse_pool(features: torch.Tensor, r: float = 10.0) -> torch.Tensor:
    """``(B, D, h, w)`` -> ``(B, D)``: ``x* + (1/r) log(1/(hw) sum_ij exp(r (x_ij - x*)))``, ``x*`` the max.

    ``r -> 0`` tends to the average, ``r -> inf`` to the maximum. Computed as
    ``(logsumexp(r x) - log(hw)) / r``, which is the same value, stable for any ``r > 0``.
    """
    if r <= 0:
        raise ValueError(f"LSE pooling needs r > 0, got {r}")
    flat = features.flatten(2)
    return (torch.logsumexp(r * flat, dim=-1) - math.log(flat.shape[-1])) / r


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAMs: ``features (B, D, h, w)`` and classifier ``weight (K, D)`` -> ``(B, K, h, w)`` (no bias)."""
    return torch.einsum("kd,bdhw->bkhw", weight.to(features.dtype), features)


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each ``(h, w)`` map of ``(B, K, h, w)`` linearly to [0, 1] (a constant map becomes all 0)."""
    flat = maps.flatten(2)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    normalized = torch.where(span > eps, (flat - low) / span.clamp_min(eps), torch.zeros_like(flat))
    return normalized.reshape(maps.shape)


def refine_maps(cams: torch.Tensor, size: tuple[int, int], sigma: float = 0.4, sharpness: float = 100.0) -> torch.Tensor:
    """HAM's refined maps: ``(B, K, h, w)`` CAMs -> ``(B, K, H, W)`` in (0, 1).

    Each map is upsampled bilinearly to ``size = (H, W)`` (corners aligned, as the HAM authors do),
    min-max normalised to [0, 1] (:func:`minmax_normalize`; a constant map becomes 0) and passed through
    the steep sigmoid ``sigmoid(sharpness (x - sigma))``: about 0 below ``sigma``, about 1 above it.
    """
    if tuple(cams.shape[-2:]) != tuple(size):
        cams = F.interpolate(cams, size=tuple(size), mode="bilinear", align_corners=True)
    return torch.sigmoid(sharpness * (minmax_normalize(cams) - sigma))


def refined_threshold_in_normalized_units(threshold: float, sigma: float = 0.4, sharpness: float = 100.0) -> float:
    """The normalised-map value ``x`` at which ``sigmoid(sharpness (x - sigma)) = threshold`` (0.999 -> 0.4691)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"a refined-map threshold must be in (0, 1), got {threshold}")
    return sigma + math.log(threshold / (1.0 - threshold)) / sharpness
