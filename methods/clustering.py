"""Clustering operations of ClusPro (ICLR 2025): pure tensor functions, no module state.

Everything here is a function of its inputs (plus an explicit ``torch.Generator`` where noise is
drawn), so each piece is unit-tested on its own (tests/test_clustering.py) and the model in
``cluspro.py`` only wires them together.

* :func:`structured_ot`: the local-aware prototype assignment (spec-cluspro §3.3): entropic
  optimal transport of a batch of features onto K prototypes with batch-wide equipartition,
  a structure (local-coherence) term, solved by a generalized conditional gradient (GCG) outer
  loop around log-domain Sinkhorn. Batched: all primitives present in a batch are solved as one
  ``[C, B, K]`` problem sharing one ``[B, B]`` similarity matrix.
* :func:`ema_update`: the momentum prototype update (Eq. 9), touching assigned prototypes only.
* :func:`prototype_contrastive_loss` / :func:`pcl_targets`: L_PCL (Eq. 10).
* :func:`nhsic`: the normalised HSIC used by L_PDL (Eq. 11).
* :func:`participation_ratio`, :func:`mean_offdiag_cosine`, :func:`marginal_error`: the
  per-epoch collapse diagnostics recommended in spec §8.2.

Conventions: a transport plan ``G`` has shape ``[C, B, K]`` (problem, sample, prototype) and
probability-mass marginals: every row sums to ``1/B`` and every column to ``1/K`` (the code's
scaling; the paper's ``L`` is ``B * G``, which has the same argmax).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed CPU ops on one intra-op thread.

    The clustering works on tensors of ~10^4 numbers; splitting such ops across threads only adds
    synchronisation, which on a busy 2-core machine costs ~100x the op itself (measured: a
    ``[15, 64, 5]`` logsumexp takes ~60 us on one thread and several ms on two).
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Optimal transport
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OTResult:
    """A batched transport plan and how the solver got there.

    ``plan`` is ``[C, B, K]``; ``objective_trace`` is ``[n_outer + 1, C]``: the GCG objective of
    every problem at the start and after every outer iteration (non-increasing by construction).
    """

    plan: Tensor
    objective_trace: Tensor
    n_outer: int


def sinkhorn(cost: Tensor, eps: float, max_iter: int = 1000, tol: float = 1e-6) -> Tensor:
    """Balanced entropic OT with uniform marginals, batched over the leading dimension.

    Solves ``min_G <cost, G> + eps * sum G log G`` over ``G >= 0`` with rows summing to ``1/B``
    and columns to ``1/K``, for ``cost`` of shape ``[C, B, K]``. Sinkhorn scaling iterations stop
    when the row-marginal error is below ``tol`` (relative to ``1/B``) or after ``max_iter``
    iterations; the plan is then *rounded* onto the transport polytope (Altschuler et al., 2017),
    so both marginals hold to floating-point precision whatever the number of iterations.

    The iterations run on the kernel ``exp(-(cost - row min) / eps)`` (two small batched
    products per iteration) when it is representable in the cost's dtype, and in the log domain
    (stable for any ``eps``, ~4x the kernels) otherwise; both give the same plan.
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must be [C, B, K], got shape {tuple(cost.shape)}")
    # shifting a row of the cost is absorbed by that row's scaling: the plan is unchanged
    log_kernel = -(cost - cost.amin(dim=2, keepdim=True)) / eps
    kernel = torch.exp(log_kernel)
    # every row holds a 1; a column whose entries all (nearly) underflow would need a scaling
    # beyond the dtype's range, so such problems go to the log domain
    if bool((kernel.sum(dim=1) > math.sqrt(torch.finfo(cost.dtype).tiny)).all()):
        plan = _sinkhorn_scaling(kernel, max_iter, tol)
        if bool(torch.isfinite(plan).all()):
            return round_to_polytope(plan)
    return round_to_polytope(_sinkhorn_log_domain(log_kernel, max_iter, tol))


def _sinkhorn_scaling(kernel: Tensor, max_iter: int, tol: float) -> Tensor:
    _, b, k = kernel.shape
    a_val, b_val = 1.0 / b, 1.0 / k
    kernel_t = kernel.transpose(1, 2)
    v = torch.full((kernel.shape[0], k, 1), 1.0, dtype=kernel.dtype, device=kernel.device)
    for it in range(max_iter):
        u = a_val / (kernel @ v)  # [C, B, 1]
        v = b_val / (kernel_t @ u)  # [C, K, 1]
        if it % 10 == 9:
            # columns are exact after the v-update; check the rows
            if ((u * (kernel @ v)) * b - 1.0).abs().max().item() < tol:
                break
    return u * kernel * v.transpose(1, 2)


def _sinkhorn_log_domain(log_kernel: Tensor, max_iter: int, tol: float) -> Tensor:
    _, b, k = log_kernel.shape
    log_a = -math.log(b)
    log_b = -math.log(k)
    u = torch.zeros(log_kernel.shape[:2], dtype=log_kernel.dtype, device=log_kernel.device)  # [C, B]
    v = torch.zeros((log_kernel.shape[0], k), dtype=log_kernel.dtype, device=log_kernel.device)  # [C, K]
    for it in range(max_iter):
        u = log_a - torch.logsumexp(log_kernel + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(log_kernel + u[:, :, None], dim=1)
        if it % 10 == 9:
            rows = torch.logsumexp(log_kernel + u[:, :, None] + v[:, None, :], dim=2)
            if (rows.exp() * b - 1.0).abs().max().item() < tol:
                break
    return torch.exp(log_kernel + u[:, :, None] + v[:, None, :])


def round_to_polytope(plan: Tensor) -> Tensor:
    """Project an approximate plan ``[C, B, K]`` onto exact uniform marginals (Altschuler rounding).

    Rows and columns that carry too much mass are scaled down, then the missing mass is added back
    as a rank-one outer product of the row and column deficits; the result is non-negative and
    meets both marginals exactly (up to floating-point rounding).
    """
    _, b, k = plan.shape
    a = plan.new_full((b,), 1.0 / b)
    c = plan.new_full((k,), 1.0 / k)
    row_scale = torch.clamp(a / plan.sum(2).clamp_min(1e-300), max=1.0)
    plan = plan * row_scale[:, :, None]
    col_scale = torch.clamp(c / plan.sum(1).clamp_min(1e-300), max=1.0)
    plan = plan * col_scale[:, None, :]
    err_r = a - plan.sum(2)  # [C, B] >= 0
    err_c = c - plan.sum(1)  # [C, K] >= 0
    total = err_r.sum(1).clamp_min(1e-300)  # equals err_c.sum(1)
    return plan + err_r[:, :, None] * err_c[:, None, :] / total[:, None, None]


def _entropy_term(plan: Tensor) -> Tensor:
    return torch.special.xlogy(plan, plan).sum((-2, -1))


def _structure_parts(plan: Tensor, weight: Tensor, similarity: Tensor) -> tuple[Tensor, Tensor]:
    # X = W*G and S X, from which the structure term and its gradient both follow
    x = weight * plan  # [..., B, K]
    return x, similarity @ x


def _structure_term(plan: Tensor, weight: Tensor, similarity: Tensor) -> Tensor:
    # Omega(G) = -<S, (W*G)(W*G)^T>, one value per problem (any leading dims before [B, K])
    x, sx = _structure_parts(plan, weight, similarity)
    return -(sx * x).sum((-2, -1))


def _structure_grad_from(sx: Tensor, weight: Tensor) -> Tensor:
    # d/dG of -<S, X X^T> with X = W*G and S symmetric: -2 (S X) * W
    return -2.0 * sx * weight


def _structure_grad(plan: Tensor, weight: Tensor, similarity: Tensor) -> Tensor:
    return _structure_grad_from(_structure_parts(plan, weight, similarity)[1], weight)


def gcg_objective(
    plan: Tensor, cost: Tensor, weight: Tensor, similarity: Tensor, eps: float, kappa: float
) -> Tensor:
    """The objective the GCG loop minimises, one value per problem ``[C]``:
    ``<cost, G> + eps * sum G log G + kappa * Omega(G)``, ``Omega(G) = -<S, (W*G)(W*G)^T>``."""
    return (
        (cost * plan).sum((-2, -1))
        + eps * _entropy_term(plan)
        + kappa * _structure_term(plan, weight, similarity)
    )


def structured_ot(
    cost: Tensor,
    weight: Tensor,
    similarity: Tensor,
    *,
    eps: float = 0.1,
    kappa: float = 1.0,
    max_outer: int = 10,
    sinkhorn_iters: int = 1000,
    sinkhorn_tol: float = 1e-6,
    tol: float = 1e-6,
    armijo_c1: float = 1e-4,
    max_backtracks: int = 12,
) -> OTResult:
    """Local-aware OT assignment (spec-cluspro §3.3), batched over problems.

    ``cost`` and ``weight`` are ``[C, B, K]`` (paper: ``cost = -log Q``, ``weight = Q`` with
    ``Q = softmax_k cos(f, p)``; released code: ``cost = -P``, ``weight = P``); ``similarity`` is the
    symmetric ``[B, B]`` feature-similarity matrix with a zero diagonal, shared by all problems, or
    one such matrix per problem ``[C, B, B]``.

    GCG (as in CSOT): start from the independent plan ``a b^T``; at each outer step solve the
    entropic OT linearised at the current plan (cost ``cost + kappa * grad Omega``), then move
    towards it with a step chosen by backtracking Armijo search over ``{1, 1/2, 1/4, ...}``; a
    problem whose step fails every test keeps its plan (step 0), so the objective never
    increases. Iteration stops once every problem's relative and absolute change is below
    ``tol`` or after ``max_outer`` steps. Every iterate is a convex combination of feasible plans,
    so the result meets both marginals.
    """
    if cost.shape != weight.shape or cost.dim() != 3:
        raise ValueError(
            f"cost {tuple(cost.shape)} and weight {tuple(weight.shape)} must both be [C, B, K]"
        )
    c, b, k = cost.shape
    if similarity.shape not in ((b, b), (c, b, b)):
        raise ValueError(f"similarity has shape {tuple(similarity.shape)}; expected ({b}, {b}) or ({c}, {b}, {b})")
    plan = cost.new_full((c, b, k), 1.0 / (b * k))
    obj = gcg_objective(plan, cost, weight, similarity, eps, kappa)
    trace = [obj]
    steps = torch.tensor([0.5**i for i in range(max_backtracks)], dtype=cost.dtype, device=cost.device)
    n_outer = 0
    for _ in range(max_outer):
        n_outer += 1
        x, sx = _structure_parts(plan, weight, similarity)  # shared by the gradient and the line search
        grad_struct = _structure_grad_from(sx, weight)
        target = sinkhorn(cost + kappa * grad_struct, eps, max_iter=sinkhorn_iters, tol=sinkhorn_tol)
        delta = target - plan
        # directional derivative of the full objective along delta (entropy gradient is log G + 1;
        # the +1 integrates to zero over a direction with zero total mass)
        slope = (
            (cost + kappa * grad_struct + eps * torch.log(plan.clamp_min(1e-300))) * delta
        ).sum((1, 2))
        # The objective along plan + t*delta, for every trial step at once: the transport and
        # structure terms are polynomials in t (degree 1 and 2, S symmetric), so only the entropy
        # is evaluated per step; one [B, B] product instead of one per trial step.
        y = weight * delta
        o0, o1, o2 = (sx * x).sum((1, 2)), (sx * y).sum((1, 2)), ((similarity @ y) * y).sum((1, 2))
        l0, l1 = (cost * plan).sum((1, 2)), (cost * delta).sum((1, 2))
        t = steps[:, None]  # [S, 1]
        candidates = plan[None] + steps[:, None, None, None] * delta[None]  # [S, C, B, K]
        cand_obj = (l0 + t * l1 + eps * _entropy_term(candidates)
                    - kappa * (o0 + 2.0 * t * o1 + t * t * o2))  # [S, C]
        ok = cand_obj <= obj[None] + armijo_c1 * steps[:, None] * slope[None]
        ok &= cand_obj <= obj[None]  # guard: never accept an increase (slope can be ~0 or > 0)
        first_ok = torch.where(ok.any(0), ok.float().argmax(0), torch.full_like(obj, -1).long())
        alpha = torch.where(first_ok >= 0, steps[first_ok.clamp_min(0)], torch.zeros_like(obj))
        new_plan = plan + alpha[:, None, None] * delta
        new_obj = torch.where(
            first_ok >= 0, cand_obj[first_ok.clamp_min(0), torch.arange(c, device=cost.device)], obj
        )
        change = (new_obj - obj).abs()
        plan, obj = new_plan, new_obj
        trace.append(obj)
        if bool(((change <= tol) | (change <= tol * obj.abs())).all()):
            break
    return OTResult(plan=plan, objective_trace=torch.stack(trace), n_outer=n_outer)


def marginal_error(plan: Tensor) -> float:
    """Largest relative deviation of a plan ``[C, B, K]`` from its uniform marginals."""
    _, b, k = plan.shape
    row = (plan.sum(2) * b - 1.0).abs().max()
    col = (plan.sum(1) * k - 1.0).abs().max()
    return float(torch.maximum(row, col))


def gumbel_hard_assign(plan: Tensor, tau: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """The released code's update assignment: ``gumbel_softmax(G, tau, hard=True)`` as an index.

    ``argmax_k (G + g) / tau`` with standard Gumbel noise ``g``. Because the entries of G are about
    ``1/(B K)`` while the noise has unit scale, this is close to uniform-random (spec §3.3, §3.6.2);
    it is kept only to reproduce the ``code`` variant.
    """
    u = torch.rand(plan.shape, generator=generator, dtype=plan.dtype, device="cpu").to(plan.device)
    g = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-12)))
    return ((plan + g) / tau).argmax(-1)


# --------------------------------------------------------------------------------------------
# Prototype memory
# --------------------------------------------------------------------------------------------


def ema_update(
    prototypes: Tensor,
    features: Tensor,
    primitive: Tensor,
    assignment: Tensor,
    momentum: float,
    *,
    renormalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Momentum update of the assigned prototypes (Eq. 9); returns ``(new, touched)``.

    ``prototypes`` is ``[C, K, D]``; sample ``n`` (feature ``features[n]``) belongs to primitive
    ``primitive[n]`` and is assigned to its prototype ``assignment[n]``. For every prototype that
    received at least one sample, ``p <- mu p + (1 - mu) normalize(sum of its features)`` (the
    L2-normalised mean, as in the code); all other prototypes are returned unchanged.
    ``renormalize`` re-projects updated prototypes onto the unit sphere (``paper`` variant; the
    released code does not). ``touched`` is the ``[C, K]`` boolean mask of updated prototypes.
    """
    c, k, d = prototypes.shape
    if features.shape[0] != primitive.shape[0] or features.shape[0] != assignment.shape[0]:
        raise ValueError(
            f"features ({features.shape[0]}), primitive ({primitive.shape[0]}) and assignment "
            f"({assignment.shape[0]}) must have one entry per sample"
        )
    flat = (primitive * k + assignment).long()
    sums = torch.zeros(c * k, d, dtype=prototypes.dtype, device=prototypes.device)
    sums.index_add_(0, flat, features.to(prototypes.dtype))
    counts = torch.bincount(flat, minlength=c * k)
    touched = (counts > 0).view(c, k)
    means = F.normalize(sums, dim=-1).view(c, k, d)
    updated = momentum * prototypes + (1.0 - momentum) * means
    if renormalize:
        updated = F.normalize(updated, dim=-1)
    new = torch.where(touched[..., None], updated, prototypes)
    return new, touched


def seed_prototypes(
    prototypes: Tensor,
    initialized: Tensor,
    features: Tensor,
    primitive: Tensor,
    *,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``paper``-variant initialisation (spec §8.2): the first time a primitive appears in a batch,
    its K prototypes become K of its features (drawn with replacement when fewer than K are
    present) plus Gaussian noise of scale ``noise``, L2-normalised. Returns ``(prototypes,
    initialized)``; primitives already initialised are left alone."""
    c, k, d = prototypes.shape
    present = torch.zeros(c, dtype=torch.bool, device=prototypes.device)
    present[primitive] = True
    todo = (present & ~initialized).nonzero().flatten().tolist()
    if not todo:
        return prototypes, initialized
    prototypes = prototypes.clone()
    initialized = initialized.clone()
    feats = F.normalize(features.to(prototypes.dtype), dim=-1)
    for cls in todo:
        rows = (primitive == cls).nonzero().flatten()
        pick = torch.randint(len(rows), (k,), generator=generator).to(rows.device)
        jitter = torch.randn((k, d), generator=generator, dtype=prototypes.dtype).to(prototypes.device)
        prototypes[cls] = F.normalize(feats[rows[pick]] + noise * jitter, dim=-1)
        initialized[cls] = True
    return prototypes, initialized


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def pcl_targets(primitive: Tensor, assignment: Tensor, k: int) -> Tensor:
    """Column of each sample's positive prototype in its own block: ``primitive * K + assignment``.

    The contrastive logits put the sample's own primitive type first (attribute side:
    ``[attr prototypes | obj prototypes]``; object side: ``[obj | attr]``), so targets of the
    attribute side lie in ``[0, |A| K)`` and those of the object side in ``[0, |O| K)``.
    """
    return primitive.long() * k + assignment.long()


def prototype_contrastive_loss(
    features: Tensor, own_prototypes: Tensor, other_prototypes: Tensor, targets: Tensor, tau: float
) -> Tensor:
    """L_PCL (Eq. 10): cross-entropy of cosine logits / tau over all K(M+N) prototypes.

    ``features`` ``[N, D]``; ``own_prototypes`` ``[C_own * K, D]`` (the block the targets index)
    or ``[N, C_own * K, D]`` for per-sample prototype copies (``code`` variant); likewise
    ``other_prototypes``. The positive is the sample's assigned prototype of its own primitive;
    the negatives are every other prototype, of either primitive type.
    """
    feats = F.normalize(features, dim=-1)
    protos = F.normalize(torch.cat([own_prototypes, other_prototypes], dim=-2), dim=-1)
    if protos.dim() == 2:
        logits = feats @ protos.T
    else:
        logits = torch.einsum("nd,npd->np", feats, protos)
    return F.cross_entropy(logits / tau, targets)


def _gaussian_kernel(x: Tensor) -> Tensor:
    d2 = torch.cdist(x, x).pow(2)
    n = x.shape[0]
    off = d2[~torch.eye(n, dtype=torch.bool, device=x.device)]
    sigma = off.median().clamp_min(0.01) if off.numel() else x.new_tensor(1.0)
    return torch.exp(-d2 / (2.0 * sigma**2))


def _hsic(kx_centred: Tensor, ky_centred: Tensor) -> Tensor:
    return (kx_centred * ky_centred).mean()


def nhsic(x: Tensor, y: Tensor) -> Tensor:
    """Normalised HSIC ``HSIC(x, y) / sqrt(HSIC(x, x) HSIC(y, y))`` as in the released code (§2.3).

    Rows are L2-normalised; Gaussian kernel ``exp(-d^2 / (2 sigma^2))`` with ``sigma`` the median
    pairwise squared distance between distinct rows (floored at 0.01); one-sided centring ``K H``;
    HSIC is the mean of the elementwise product. ``nhsic(x, x) == 1``; for independent inputs it is
    near 0 (a positive ``O(1/N)`` bias remains). Differentiable in both arguments.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"nhsic needs paired samples: x has {x.shape[0]} rows, y has {y.shape[0]}")
    n = x.shape[0]
    with torch.autocast(x.device.type, enabled=False):  # kernels need float32 (the code: CPU fp32)
        x = F.normalize(x.float(), dim=-1)
        y = F.normalize(y.float(), dim=-1)
        centring = torch.eye(n, device=x.device) - 1.0 / n
        kx = _gaussian_kernel(x) @ centring
        ky = _gaussian_kernel(y) @ centring
        return _hsic(kx, ky) / torch.sqrt(_hsic(kx, kx) * _hsic(ky, ky)).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def participation_ratio(prototypes: Tensor) -> Tensor:
    """Effective number of prototypes per primitive, ``[C, K, D] -> [C]``.

    The participation ratio of the singular values of each primitive's prototype matrix,
    ``(sum s^2)^2 / sum s^4``: K for orthogonal prototypes of equal norm, 1 when all coincide.
    """
    gram = prototypes.float() @ prototypes.float().transpose(1, 2)  # [C, K, K]
    eig = torch.linalg.eigvalsh(gram).clamp_min(0)
    return eig.sum(-1) ** 2 / (eig.pow(2).sum(-1)).clamp_min(1e-30)


def mean_offdiag_cosine(prototypes: Tensor) -> Tensor:
    """Mean cosine between distinct prototypes of the same primitive, ``[C, K, D] -> [C]``
    (NaN when K = 1)."""
    p = F.normalize(prototypes.float(), dim=-1)
    cos = p @ p.transpose(1, 2)
    k = p.shape[1]
    if k < 2:
        return torch.full((p.shape[0],), float("nan"))
    mask = ~torch.eye(k, dtype=torch.bool, device=p.device)
    return cos[:, mask].mean(-1)


# --------------------------------------------------------------------------------------------
# Building the assignment problem
# --------------------------------------------------------------------------------------------


def assignment_problem(features: Tensor, prototypes: Tensor, *, mode: str = "paper") -> tuple[Tensor, Tensor, Tensor]:
    """``(cost, weight, similarity)`` for :func:`structured_ot` from stage-1 features ``[B, D]`` and
    the prototypes of the problems to solve ``[C, K, D]`` (spec §3.3 and §8.1).

    * ``paper``: ``Q = softmax_k cos(f, p)``; ``cost = -log Q``; ``weight = Q``; ``S`` is the cosine
      similarity of the features with a zero diagonal.
    * ``code``: ``P = <normalize(f), p>`` with un-normalised prototypes; ``cost = -P``;
      ``weight = P``; ``S`` is the raw dot product of the un-normalised features, zero diagonal.
    """
    f_unit = F.normalize(features, dim=-1)
    if mode == "paper":
        cos = torch.einsum("bd,ckd->cbk", f_unit, F.normalize(prototypes, dim=-1))
        log_q = torch.log_softmax(cos, dim=-1)
        cost, weight = -log_q, log_q.exp()
        sim = f_unit @ f_unit.T
    elif mode == "code":
        p = torch.einsum("bd,ckd->cbk", f_unit, prototypes)
        cost, weight = -p, p
        sim = features @ features.T
    else:
        raise ValueError(f"unknown assignment mode {mode!r}; use 'paper' or 'code'")
    sim = sim - torch.diag_embed(torch.diagonal(sim))
    return cost, weight, sim
