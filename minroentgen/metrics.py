"""RoentGen's image metrics: FID (realism) and MS-SSIM between samples of one prompt (diversity).

As RoentGen's evaluation code computes them (Chambon et al. 2022; protocol in the project's notes):
FID compares Gaussians fitted to two sets of image features; MS-SSIM (Wang et al. 2003) compares
pairs of images of one prompt, lower meaning more diverse. Both take plain tensors, so any feature
extractor (the phantom reader, a chest X-ray classifier) and any images fit.
"""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- FID

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet distance of two Gaussians (FID,
    Heusel et al. 2017). S1 S2 = A B with A = S1^(1/2), B = S1^(1/2) S2, and AB, BA have the same
    eigenvalues, so those of S1 S2 are those of M = S1^(1/2) S2 S1^(1/2): symmetric PSD, real, >= 0.
    The principal root (S1 S2)^(1/2) has their square roots as eigenvalues, hence
    Tr((S1 S2)^(1/2)) = sum_i sqrt(eig_i(M)): two symmetric eigendecompositions, no sqrtm."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64)
                                for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^(1/2)
    m = root1 @ sigma2 @ root1
    # tiny negatives are round-off
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def fid(features_a, features_b) -> float:
    """The Frechet distance between Gaussians fitted to two (N, D) feature sets (unbiased
    covariance). With the centred features Xa (n1, D), Xb (n2, D): S1 S2 = Xa^T (Xa Xb^T Xb) / c,
    c = (n1 - 1)(n2 - 1), has the nonzero eigenvalues of (Xa Xb^T)(Xa Xb^T)^T / c, so
    Tr((S1 S2)^(1/2)) = (sum of the singular values of Xa Xb^T) / sqrt(c): one (n1, n2) SVD,
    cheaper than two (D, D) eigendecompositions for small sets."""
    fa, fb = (torch.as_tensor(f, dtype=torch.float64) for f in (features_a, features_b))
    (n1, n2), mu1, mu2 = (len(fa), len(fb)), fa.mean(0), fb.mean(0)
    xa, xb = fa - mu1, fb - mu2  # centred
    tr_covmean = torch.linalg.svdvals(xa @ xb.T).sum() / ((n1 - 1) * (n2 - 1)) ** 0.5
    return float((mu1 - mu2).square().sum() + xa.square().sum() / (n1 - 1)
                 + xb.square().sum() / (n2 - 1) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- MS-SSIM

WANG_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, Sec. 3.1
WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def num_scales(side: int) -> int:
    """The most scales (<= 5) whose coarsest image still holds a whole 11-px window: 5 at 256 px,
    4 at 128 px, 3 at 64 px. (5 scales of 11-px windows need > 160 px.)"""
    scales = next((s for s in range(5, 0, -1) if side // 2 ** (s - 1) >= WINDOW), 0)
    if not scales:
        raise ValueError(f"MS-SSIM needs images of at least {WINDOW}x{WINDOW} pixels, "
                         f"got side {side}")
    return scales


def _ssim_maps(x, y, data_range: float):
    """SSIM and its contrast-structure term cs per window (Wang et al. 2004, eqs. 6-13) with an
    11x11 Gaussian window (sigma 1.5). As torchmetrics (which RoentGen's evaluation used): the image
    is reflect-padded, SSIM is averaged over every pixel, cs over the windows that lie inside the
    image."""
    pad = WINDOW // 2
    g = torch.exp(-((torch.arange(WINDOW, dtype=x.dtype, device=x.device) - pad) / SIGMA) ** 2 / 2)
    g = g / g.sum()
    stack = F.pad(torch.cat([x, y, x * x, y * y, x * y]), (pad,) * 4,
                  mode="reflect")  # (5B, 1, H+10, W+10)
    # the 2-D Gaussian is separable
    stack = F.conv2d(F.conv2d(stack, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))
    mx, my, mxx, myy, mxy = stack.chunk(5)  # local means, each (B, 1, H, W)
    vx, vy, cxy = (mxx - mx * mx).clamp(min=0), (myy - my * my).clamp(min=0), mxy - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    cs = (2 * cxy + c2) / (vx + vy + c2)
    ssim = (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return ssim.flatten(1).mean(1), cs[..., pad:-pad, pad:-pad].flatten(1).mean(1)  # (B,), (B,)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0,
            as_published: bool = False) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) of grayscale pairs (B, 1, H, W) -> (B,):
    prod_j cs_j^w_j over the finer scales times SSIM_M^w_M at the coarsest, 2x2 average pooling
    between scales. Scales: `num_scales(min(H, W))`, Wang's weights for those scales renormalised to
    sum 1 (so identical images still give 1). Negative terms are clamped to 0
    (torchmetrics' "relu"). as_published: at 5 scales Wang's weights as printed (they sum to
    1.0001), torchmetrics' defaults, which RoentGen's evaluation called (3e-5 apart at 0.5)."""
    scales = num_scales(min(x.shape[-2:]))
    weights = torch.tensor(WANG_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    if not (as_published and scales == len(WANG_WEIGHTS)):
        weights = weights / weights.sum()
    terms = []
    for j in range(scales):
        ssim, cs = _ssim_maps(x, y, data_range)
        terms.append(ssim if j == scales - 1 else cs)
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return (torch.stack(terms).relu() ** weights[:, None]).prod(0)  # (B,)


def mean_pairwise_ms_ssim(images: torch.Tensor, as_published: bool = False) -> float:
    """Mean MS-SSIM over all N(N-1)/2 pairs of one prompt's images (B, 1, H, W) in [0, 1]
    (RoentGen: 4 images, 6 pairs; here 16 samples, all 120 pairs). Lower is more diverse."""
    i, j = torch.triu_indices(len(images), len(images), offset=1)
    return float(ms_ssim(images[i].float(), images[j].float(), as_published=as_published).mean())
