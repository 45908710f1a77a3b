"""Clustering operations of ClusPro (ICLR 2025): pure tensor functions, no module state.

Everything here is a function of its inputs (plus an explicit ``torch.Generator`` where noise is
drawn), so each piece is unit-tested on its own (tests/test_clustering.py) and the model in
``cluspro.py`` only wires them together.

* :func:`structured_ot`: the local-aware prototype assignment (docs/cluspro.md "The clustering",
  step 1): entropic optimal transport of a batch of features onto K prototypes with batch-wide equipartition,
  a structure (local-coherence) term, solved by a generalized conditional gradient (GCG) outer
  loop around Sinkhorn with the released solver's interpolating Armijo line search
  (:func:`armijo_interpolating`). Batched: all primitives present in a batch are solved as one
  ``[C, B, K]`` problem.
* :func:`ema_update`: the momentum prototype update (Eq. 9), touching assigned prototypes only.
* :func:`prototype_contrastive_loss` / :func:`pcl_targets`: L_PCL (Eq. 10).
* :func:`nhsic`: the normalised HSIC used by L_PDL (Eq. 11), as the released code computes it.
* :func:`participation_ratio`, :func:`mean_offdiag_cosine`, :func:`marginal_error`: the
  per-epoch collapse diagnostics (docs/cluspro.md "Diagnostics in the run record").

Conventions: a transport plan ``G`` has shape ``[C, B, K]`` (problem, sample, prototype) and
probability-mass marginals: every row sums to ``1/B`` and every column to ``1/K`` (the code's
scaling; the paper's ``L`` is ``B * G``, which has the same argmax).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

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
    every problem at the start and after every outer iteration (non-increasing by construction);
    ``steps`` is ``[n_outer, C]``: the step each problem took (0 once it has converged).
    """

    plan: Tensor
    objective_trace: Tensor
    n_outer: int
    steps: Tensor


def sinkhorn(cost: Tensor, eps: float, max_iter: int = 1000, tol: float = 1e-6) -> Tensor:
    """Balanced entropic OT with uniform marginals, batched over the leading dimension.

    Solves ``min_G <cost, G> + eps * sum G log G`` over ``G >= 0`` with rows summing to ``1/B``
    and columns to ``1/K``, for ``cost`` of shape ``[C, B, K]``. Sinkhorn scaling iterations stop,
    for each problem on its own, when its row-marginal error is below ``tol`` (relative to
    ``1/B``), all after ``max_iter`` iterations; the plan is then *rounded* onto the transport
    polytope (Altschuler et al., 2017), so both marginals hold to floating-point precision
    whatever the number of iterations.

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
    done = None  # [C, 1, 1] once a check has run: problems that met the tolerance keep their scalings
    for it in range(max_iter):
        u_new = a_val / (kernel @ v)  # [C, B, 1]
        v_new = b_val / (kernel_t @ u_new)  # [C, K, 1]
        u, v = (u_new, v_new) if done is None else (torch.where(done, u, u_new), torch.where(done, v, v_new))
        if it % 10 == 9:
            # columns are exact after the v-update; check the rows, per problem, so that a batched
            # solve stops each problem where a solve of that problem alone would
            err = ((u * (kernel @ v)) * b - 1.0).abs().amax(dim=(1, 2), keepdim=True)
            done = err < tol if done is None else done | (err < tol)
            if bool(done.all()):
                break
    return u * kernel * v.transpose(1, 2)


def _sinkhorn_log_domain(log_kernel: Tensor, max_iter: int, tol: float) -> Tensor:
    _, b, k = log_kernel.shape
    log_a = -math.log(b)
    log_b = -math.log(k)
    u = torch.zeros(log_kernel.shape[:2], dtype=log_kernel.dtype, device=log_kernel.device)  # [C, B]
    v = torch.zeros((log_kernel.shape[0], k), dtype=log_kernel.dtype, device=log_kernel.device)  # [C, K]
    done = None  # [C, 1], as in _sinkhorn_scaling
    for it in range(max_iter):
        u_new = log_a - torch.logsumexp(log_kernel + v[:, None, :], dim=2)
        v_new = log_b - torch.logsumexp(log_kernel + u_new[:, :, None], dim=1)
        u, v = (u_new, v_new) if done is None else (torch.where(done, u, u_new), torch.where(done, v, v_new))
        if it % 10 == 9:
            rows = torch.logsumexp(log_kernel + u[:, :, None] + v[:, None, :], dim=2)
            err = (rows.exp() * b - 1.0).abs().amax(dim=1, keepdim=True)
            done = err < tol if done is None else done | (err < tol)
            if bool(done.all()):
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


#: First trial of the released solver's line search: 0.99 rounded to float32, the value of every
#: accepted first trial in the official outputs (tests/fixtures/golden).
ARMIJO_FIRST_STEP = float(torch.tensor(0.99, dtype=torch.float32))


def armijo_interpolating(
    phi: Callable[[Tensor], Tensor],
    phi0: Tensor,
    slope: Tensor,
    *,
    c1: float = 1e-4,
    alpha0: float = ARMIJO_FIRST_STEP,
    max_trials: int = 30,
) -> tuple[Tensor, Tensor]:
    """Armijo line search by interpolation, batched over problems; returns ``(alpha, phi(alpha))``.

    The rule of SciPy's ``scalar_search_armijo`` (Nocedal & Wright 1999, pp. 56-57), the one the
    released ClusPro solver uses: the first trial ``alpha`` with
    ``phi(alpha) <= phi0 + c1 * alpha * slope`` is taken, trying ``alpha0``, then the minimiser of
    the quadratic through ``phi0``, ``slope`` and ``phi(alpha0)``, then minimisers of cubics through
    ``phi0``, ``slope`` and two interpolation points. The points are at first ``alpha0`` and the
    quadratic trial; after a rejected cubic trial SciPy's safeguard (which always fires) moves the
    newer point to half its step but keeps the rejected trial's value there, and so does this
    function, to take the same steps. A search ends without a step (``alpha = 0``, value ``phi0``)
    when its next point is not positive (or NaN: a trial outside the domain of ``phi``); SciPy
    searches until then, this function for at most ``max_trials`` evaluations (by then the step
    would be below ``alpha0 / 2**(max_trials - 2)``).

    ``phi`` maps one step per problem ``[C]`` to the objectives ``[C]``; ``phi0`` is ``phi(0)``
    and ``slope`` its derivative at 0, both ``[C]``. The accepted step is not clipped.
    """
    zero = torch.zeros_like(phi0)

    def sufficient(a: Tensor, f: Tensor) -> Tensor:
        return f <= phi0 + c1 * a * slope  # False where f is NaN

    p0 = torch.full_like(phi0, alpha0)
    g0 = phi(p0)
    accepted = sufficient(p0, g0)
    alpha = torch.where(accepted, p0, zero)
    value = torch.where(accepted, g0, phi0)
    trial = -slope * alpha0**2 / (2.0 * (g0 - phi0 - slope * alpha0))  # the quadratic's minimiser
    p1 = g1 = None
    for _ in range(max_trials - 1):
        searching = ~accepted & (trial > 0 if p1 is None else p1 > 0)
        if not bool(searching.any()):
            break
        if p1 is not None:  # the cubic through (p0, g0) and (p1, g1)
            r0 = g0 - phi0 - slope * p0
            r1 = g1 - phi0 - slope * p1
            scale = p0 * p0 * p1 * p1 * (p1 - p0)
            ca = (p0 * p0 * r1 - p1 * p1 * r0) / scale
            cb = (p1 * p1 * p1 * r0 - p0 * p0 * p0 * r1) / scale
            trial = (-cb + torch.sqrt((cb * cb - 3.0 * ca * slope).abs())) / (3.0 * ca)
        trial = torch.where(searching, trial, zero)  # finished problems: a harmless evaluation
        f = phi(trial)
        ok = searching & sufficient(trial, f)
        alpha = torch.where(ok, trial, alpha)
        value = torch.where(ok, f, value)
        accepted |= ok
        if p1 is None:  # the quadratic trial becomes the newer interpolation point
            p1, g1 = trial, f
        else:
            p0, g0, p1, g1 = p1, g1, torch.where(torch.isnan(trial), trial, p1 / 2), f
    return alpha, value


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
) -> OTResult:
    """Local-aware OT assignment (docs/cluspro.md "The clustering", step 1), batched over problems.

    ``cost`` and ``weight`` are ``[C, B, K]`` (paper: ``cost = -log Q``, ``weight = Q`` with
    ``Q = softmax_k cos(f, p)``; released code: ``cost = -P``, ``weight = P``); ``similarity`` is the
    symmetric ``[B, B]`` feature-similarity matrix with a zero diagonal, shared by all problems, or
    one such matrix per problem ``[C, B, B]``.

    GCG (as in CSOT and the released solver): start from the independent plan ``a b^T``; at each
    outer step solve the entropic OT linearised at the current plan (cost
    ``cost + kappa * grad Omega``), then move towards it by the step of
    :func:`armijo_interpolating` clipped to ``[0, 1]``. A step that would raise the objective
    (possible only when the inexact inner plan is no descent direction) is not taken, so the
    objective never increases. Each problem stops on its own once its absolute or relative
    change is below ``tol`` (it then keeps its plan, as a separate solve would), all after
    ``max_outer`` steps. Every iterate is a convex combination of feasible plans, so the result
    meets both marginals.
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
    trace, steps = [obj], []
    running = torch.ones(c, dtype=torch.bool, device=cost.device)
    n_outer = 0
    for _ in range(max_outer):
        n_outer += 1
        x, sx = _structure_parts(plan, weight, similarity)  # shared by the gradient and the line search
        linear = cost + kappa * _structure_grad_from(sx, weight)
        target = sinkhorn(linear, eps, max_iter=sinkhorn_iters, tol=sinkhorn_tol)
        delta = target - plan
        # exact directional derivative of the full objective along delta (entropy gradient log G + 1)
        slope = ((linear + eps * (torch.log(plan.clamp_min(1e-300)) + 1.0)) * delta).sum((1, 2))
        # The objective along plan + t*delta: the transport and structure terms are polynomials in
        # t (degree 1 and 2, S symmetric), so a trial step costs one entropy, not a [B, B] product.
        y = weight * delta
        o0, o1, o2 = (sx * x).sum((1, 2)), (sx * y).sum((1, 2)), ((similarity @ y) * y).sum((1, 2))
        l0, l1 = (cost * plan).sum((1, 2)), (cost * delta).sum((1, 2))

        def along(t: Tensor) -> Tensor:
            entropy = _entropy_term(plan + t[:, None, None] * delta)
            return l0 + t * l1 + eps * entropy - kappa * (o0 + 2.0 * t * o1 + t * t * o2)

        alpha, new_obj = armijo_interpolating(along, obj, slope, c1=armijo_c1)
        clipped = alpha.clamp(0.0, 1.0)  # the released solver clips the accepted step to [0, 1]
        if bool((clipped != alpha).any()):
            new_obj = torch.where(clipped == alpha, new_obj, along(clipped))
            alpha = clipped
        keep = ~running | ~(new_obj <= obj)  # converged, or the step would not decrease
        alpha = torch.where(keep, torch.zeros_like(alpha), alpha)
        new_obj = torch.where(keep, obj, new_obj)
        change = (new_obj - obj).abs()
        plan = plan + alpha[:, None, None] * delta
        obj = new_obj
        trace.append(obj)
        steps.append(alpha)
        running &= ~((change < tol) | (change < tol * obj.abs()))
        if not bool(running.any()):
            break
    return OTResult(plan=plan, objective_trace=torch.stack(trace), n_outer=n_outer, steps=torch.stack(steps))


def marginal_error(plan: Tensor) -> float:
    """Largest relative deviation of a plan ``[C, B, K]`` from its uniform marginals."""
    _, b, k = plan.shape
    row = (plan.sum(2) * b - 1.0).abs().max()
    col = (plan.sum(1) * k - 1.0).abs().max()
    return float(torch.maximum(row, col))


def gumbel_hard_assign(plan: Tensor, tau: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """The released code's update assignment: ``gumbel_softmax(G, tau, hard=True)`` as an index.

    ``argmax_k (G + g) / tau`` with standard Gumbel noise ``g``. Because the entries of G are about
    ``1/(B K)`` while the noise has unit scale, this is close to uniform-random (docs/cluspro.md "Variants");
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
    mean: Literal["arithmetic", "normalized"] = "normalized",
    renormalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Momentum update of the assigned prototypes (Eq. 9); returns ``(new, touched)``.

    ``prototypes`` is ``[C, K, D]``; sample ``n`` (feature ``features[n]``) belongs to primitive
    ``primitive[n]`` and is assigned to its prototype ``assignment[n]``. For every prototype that
    received at least one sample, ``p <- mu p + (1 - mu) f_bar``; all other prototypes are
    returned unchanged. ``f_bar`` is the mean of the assigned features (``mean="arithmetic"``,
    Eq. 9 as the paper writes it) or its L2-normalised direction (``"normalized"``, the released
    code). ``renormalize`` re-projects updated prototypes onto the unit sphere (``paper`` variant;
    the released code does not). ``touched`` is the ``[C, K]`` boolean mask of updated prototypes.
    """
    if mean not in ("arithmetic", "normalized"):
        raise ValueError(f"unknown mean {mean!r}; use 'arithmetic' or 'normalized'")
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
    if mean == "normalized":
        f_bar = F.normalize(sums, dim=-1)
    else:
        f_bar = sums / counts.clamp_min(1)[:, None].to(sums.dtype)
    updated = momentum * prototypes + (1.0 - momentum) * f_bar.view(c, k, d)
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
    """``paper``-variant initialisation (docs/cluspro.md "Variants"): the first time a primitive
    appears in a batch, its K prototypes become K of its features (drawn with replacement when fewer than K are
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


def squared_distances(x: Tensor) -> Tensor:
    """``|x_i|^2 + |x_j|^2 - 2 x_i . x_j`` for the rows of ``x`` ``[N, D]``, as an absolute value
    (the expanded form can round below 0), ``[N, N]``."""
    sq = (x * x).sum(-1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).abs()


def kernel_width(d2: Tensor) -> Tensor:
    """The released nHSIC's Gaussian width from a squared-distance matrix ``[N, N]``: a constant.

    The median (numpy's: the mean of the two middle values for an even count) of the strictly
    lower triangle of the squared distances of the input stacked twice, ``[x; x]``: N zeros (the
    self-distances) and every distance between two rows 4 times, N (2N - 1) values; the mean of
    that multiset if the median is not positive; at least 0.01. Computed from detached values
    (the code takes it in numpy), so no gradient flows through it. It is a median *squared*
    distance used as a width.
    """
    d2 = d2.detach()
    n = d2.shape[0]
    pairs = d2[torch.ones(n, n, dtype=torch.bool, device=d2.device).triu(1)]  # each distance once
    count = n * (2 * n - 1)

    def order_statistic(t: int) -> Tensor:
        # the t-th smallest (0-based) of the multiset: the N zeros first, then each pair 4 times
        return d2.new_zeros(()) if t < n else pairs.kthvalue((t - n) // 4 + 1).values

    if count % 2:
        median = order_statistic(count // 2)
    else:
        median = 0.5 * (order_statistic(count // 2 - 1) + order_statistic(count // 2))
    width = torch.where(median > 0, median, 4.0 * pairs.sum() / count)
    return width.clamp_min(0.01)


def _centred_kernel(x: Tensor) -> Tensor:
    # K H with H = I - 11^T/N. As a product, not as K minus its row means: the gradient is a
    # float32 difference of near-equal terms, and the product rounds closer to the released code
    # (measured on the golden cases: gradients within 7e-6 of the official, 1.4e-5 the other way)
    d2 = squared_distances(x)
    sigma = kernel_width(d2)
    kernel = torch.exp(-d2 / (2.0 * sigma * sigma))
    n = x.shape[0]
    return kernel @ (torch.eye(n, dtype=kernel.dtype, device=kernel.device) - 1.0 / n)


def _hsic(kx_centred: Tensor, ky_centred: Tensor) -> Tensor:
    # mean((Kx H) * (Ky H)^T) = tr(Kx H Ky H) / N^2: the transpose makes it double-centred
    return (kx_centred * ky_centred.T).mean()


def nhsic(x: Tensor, y: Tensor) -> Tensor:
    """Normalised HSIC ``HSIC(x, y) / (sqrt(HSIC(x, x)) sqrt(HSIC(y, y)))`` as in the released code
    (docs/cluspro.md "The clustering", step 4; definition in tests/fixtures/golden/README.md, where
    the test holds it).

    Rows are L2-normalised; Gaussian kernels ``exp(-d^2 / (2 sigma^2))`` with the constant width
    of :func:`kernel_width`; ``HSIC(X, Y) = tr(Kx H Ky H) / N^2``. ``nhsic(x, x) == 1``; for
    independent inputs it is near 0. Differentiable in both arguments (not through the widths).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"nhsic needs paired samples: x has {x.shape[0]} rows, y has {y.shape[0]}")
    with torch.autocast(x.device.type, enabled=False):  # kernels need float32 (the code: CPU fp32)
        kx = _centred_kernel(F.normalize(x.float(), dim=-1))
        ky = _centred_kernel(F.normalize(y.float(), dim=-1))
        # HSIC(X, X) = |H Kx H|_F^2 / N^2 >= 0; the clamps only guard rounding and constant inputs
        scale = _hsic(kx, kx).clamp_min(0).sqrt() * _hsic(ky, ky).clamp_min(0).sqrt()
        return _hsic(kx, ky) / scale.clamp_min(1e-12)


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
    the prototypes of the problems to solve ``[C, K, D]`` (docs/cluspro.md "The clustering", step 1,
    and "Variants").

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
