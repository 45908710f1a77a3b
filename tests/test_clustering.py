"""Unit tests of ClusPro's clustering operations (spec-cluspro §8.9)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from czsl_bench.methods import clustering as cl


def _problem(c: int, b: int, k: int, d: int, seed: int, mode: str = "paper"):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, d, generator=g, dtype=torch.float64)
    protos = torch.randn(c, k, d, generator=g, dtype=torch.float64)
    return cl.assignment_problem(feats, protos, mode=mode)


# ---- optimal transport ----------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 4),
    b=st.integers(2, 40),
    k=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(["paper", "code"]),
)
def test_ot_plan_meets_both_marginals(c, b, k, seed, mode):
    cost, weight, sim = _problem(c, b, k, 16, seed, mode)
    res = cl.structured_ot(cost, weight, sim, eps=0.1, kappa=2.0 if mode == "code" else 1.0)
    plan = res.plan
    assert (plan >= 0).all()
    torch.testing.assert_close(plan.sum(2), torch.full((c, b), 1.0 / b, dtype=plan.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((c, k), 1.0 / k, dtype=plan.dtype), atol=1e-6, rtol=0)
    assert cl.marginal_error(plan) < 1e-6


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 4), b=st.integers(2, 40), k=st.integers(2, 8), seed=st.integers(0, 10_000),
       kappa=st.sampled_from([0.0, 1.0, 2.0, 10.0]))
def test_gcg_objective_never_increases(c, b, k, seed, kappa):
    cost, weight, sim = _problem(c, b, k, 16, seed)
    res = cl.structured_ot(cost, weight, sim, eps=0.1, kappa=kappa, max_outer=10)
    trace = res.objective_trace
    assert trace.shape == (res.n_outer + 1, c)
    assert (trace[1:] <= trace[:-1] + 1e-12).all(), trace


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_one_batched_solve_with_per_problem_similarity_matches_separate_solves(mode):
    # ClusPro solves the attribute and the object problems together, each with its own S; every
    # problem stops on its own (GCG and Sinkhorn), so a batched solve is a set of separate solves,
    # also with the code variant's non-convex objective, where one extra step would move a plan
    cost_a, weight_a, sim_a = _problem(3, 24, 5, 16, 1, mode)
    cost_o, weight_o, sim_o = _problem(2, 24, 5, 16, 2, mode)
    # a problem with nothing to optimise converges at once while the others go on
    cost_t, weight_t = torch.zeros(1, 24, 5, dtype=torch.float64), torch.zeros(1, 24, 5, dtype=torch.float64)
    kappa = 2.0 if mode == "code" else 1.0
    parts = [(cost_a, weight_a, sim_a), (cost_o, weight_o, sim_o), (cost_t, weight_t, sim_a)]
    joint = cl.structured_ot(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                             torch.cat([p[2].expand(len(p[0]), -1, -1) for p in parts]), kappa=kappa)
    alone = [cl.structured_ot(cost[i:i + 1], weight[i:i + 1], sim, kappa=kappa)
             for cost, weight, sim in parts for i in range(len(cost))]
    torch.testing.assert_close(joint.plan, torch.cat([r.plan for r in alone]), atol=1e-15, rtol=0)
    assert cl.marginal_error(joint.plan) < 1e-6
    assert alone[-1].n_outer == 1 < joint.n_outer == max(r.n_outer for r in alone)
    assert (joint.steps[1:, -1] == 0).all()  # the converged problem kept its plan
    with pytest.raises(ValueError, match="similarity has shape"):
        cl.structured_ot(cost_a, weight_a, sim_o.expand(4, -1, -1))


def _wavy(coef: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # phi(t) = -s t + c2 t^2 + c3 t^3 + c4 t sin^2(w t): slope -s at 0, many shapes of failure
    s, c2, c3, c4, w = coef.unbind(-1)
    return -s * t + c2 * t * t + c3 * t * t * t + c4 * t * torch.sin(w * t) ** 2


def test_armijo_search_takes_scipys_steps():
    # the released solver's rule is SciPy's scalar_search_armijo (first trial 0.99); the batched
    # search must take the same step for every problem, through the quadratic and cubic stages
    from scipy.optimize._linesearch import scalar_search_armijo

    g = torch.Generator().manual_seed(0)
    n = 400
    coef = torch.rand(n, 5, generator=g, dtype=torch.float64)
    coef = coef * torch.tensor([1.0, 10.0, 60.0, 80.0, 40.0], dtype=torch.float64) + torch.tensor(
        [0.01, -3.0, -20.0, 0.0, 1.0], dtype=torch.float64)
    slope = -coef[:, 0]
    calls = torch.zeros(n, dtype=torch.long)

    def phi(t):
        return _wavy(coef, t)

    alpha, value = cl.armijo_interpolating(phi, torch.zeros(n, dtype=torch.float64), slope, max_trials=30)
    stages = set()
    for i in range(n):
        seen = []

        def phi_i(t, i=i, seen=seen):
            seen.append(t)
            return float(_wavy(coef[i], torch.tensor(float(t), dtype=torch.float64)))

        ref_alpha, ref_value = scalar_search_armijo(phi_i, 0.0, float(slope[i]), c1=1e-4,
                                                    alpha0=cl.ARMIJO_FIRST_STEP)
        calls[i] = len(seen)
        if len(seen) > 30:
            continue  # beyond the batched search's cap (none in this sample: checked below)
        stages.add(min(len(seen), 4))
        if ref_alpha is None:
            assert alpha[i] == 0 and value[i] == 0, i
        else:
            assert float(alpha[i]) == pytest.approx(ref_alpha, rel=1e-10, abs=1e-300), (i, seen)
            assert float(value[i]) == pytest.approx(ref_value, rel=1e-10, abs=1e-15), i
    assert stages == {1, 2, 3, 4}, stages  # first trial, quadratic, one cubic, several cubics
    assert int(calls.max()) <= 30


def test_armijo_search_gives_no_step_when_nothing_is_accepted():
    # an ascent direction that stays above the Armijo line at every trial: step 0, value phi0
    phi0 = torch.tensor([2.0, 2.0], dtype=torch.float64)
    alpha, value = cl.armijo_interpolating(lambda t: phi0 + t, phi0, torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert alpha.tolist() == [0.0, 0.0] and value.tolist() == [2.0, 2.0]
    # a first trial that is accepted is the float32 0.99 of the released solver
    alpha, _ = cl.armijo_interpolating(lambda t: phi0 - t, phi0, -torch.ones(2, dtype=torch.float64))
    assert alpha.tolist() == [0.9900000095367432] * 2


def test_sinkhorn_scaling_and_log_domain_paths_agree():
    cost, _, _ = _problem(3, 20, 4, 16, 5)
    log_kernel = -(cost - cost.amin(dim=2, keepdim=True)) / 0.1
    fast = cl._sinkhorn_scaling(log_kernel.exp(), max_iter=2000, tol=1e-12)
    stable = cl._sinkhorn_log_domain(log_kernel, max_iter=2000, tol=1e-12)
    torch.testing.assert_close(fast, stable, atol=1e-12, rtol=1e-9)


def test_sinkhorn_falls_back_to_the_log_domain_when_the_kernel_underflows():
    cost, _, _ = _problem(2, 12, 3, 16, 6)
    cost[..., 0] += 50.0  # prototype 0 far from every sample: with eps 0.01 its kernel column is 0
    assert (torch.exp(-(cost - cost.amin(2, keepdim=True)) / 0.01).sum(1)[:, 0] == 0).all()
    plan = cl.sinkhorn(cost, eps=0.01)
    assert torch.isfinite(plan).all() and cl.marginal_error(plan) < 1e-9
    # equipartition still sends 1/K of the mass to the far prototype
    torch.testing.assert_close(plan.sum(1)[:, 0], torch.full((2,), 1 / 3, dtype=plan.dtype))


def test_gcg_strictly_improves_on_the_independent_plan():
    cost, weight, sim = _problem(3, 32, 5, 16, 0)
    res = cl.structured_ot(cost, weight, sim, eps=0.1, kappa=1.0)
    assert (res.objective_trace[-1] < res.objective_trace[0] - 1e-4).all()


def test_sinkhorn_matches_scipy_free_reference_on_small_problem():
    # with kappa = 0 GCG must return the plain entropic OT plan: compare with a long
    # textbook (non-log) Sinkhorn run in float64. Every GCG step goes 0.99 of the way (the first
    # trial of the line search) until what is left of the start plan is rounding noise, so
    # without the stopping rule 10 steps reach the entropic plan.
    cost, weight, sim = _problem(1, 6, 3, 8, 1)
    res = cl.structured_ot(cost, weight, sim, eps=0.5, kappa=0.0, tol=0.0)
    assert res.n_outer == 10 and (res.steps[:3] == cl.ARMIJO_FIRST_STEP).all()
    kernel = torch.exp(-cost[0] / 0.5)
    a, b = torch.full((6,), 1 / 6, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    u = torch.ones(6, dtype=torch.float64)
    for _ in range(5000):
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
    ref = u[:, None] * kernel * v[None]
    torch.testing.assert_close(res.plan[0], ref, atol=1e-9, rtol=1e-6)


def test_equipartition_is_batch_wide():
    # all samples prefer prototype 0; equipartition still spreads the batch evenly over K
    feats = torch.randn(30, 8, dtype=torch.float64)
    protos = torch.zeros(1, 3, 8, dtype=torch.float64)
    protos[0, 0] = feats.mean(0)
    protos[0, 1:] = -feats.mean(0)
    cost, weight, sim = cl.assignment_problem(feats, protos)
    plan = cl.structured_ot(cost, weight, sim).plan
    torch.testing.assert_close(plan.sum(1)[0], torch.full((3,), 1 / 3, dtype=torch.float64))


def test_structure_term_matches_its_definition_and_gradient():
    cost, weight, sim = _problem(2, 7, 3, 5, 3)
    plan = torch.rand(2, 7, 3, dtype=torch.float64, requires_grad=True)
    x = weight * plan
    direct = torch.stack([-(sim * (x[i] @ x[i].T)).sum() for i in range(2)])
    torch.testing.assert_close(cl._structure_term(plan, weight, sim), direct)
    direct.sum().backward()
    torch.testing.assert_close(cl._structure_grad(plan.detach(), weight, sim), plan.grad)


def test_assignment_problem_paper_cost_is_minus_log_softmax():
    feats = torch.randn(5, 4, dtype=torch.float64)
    protos = torch.randn(2, 3, 4, dtype=torch.float64)
    cost, weight, sim = cl.assignment_problem(feats, protos, mode="paper")
    cos = F.normalize(feats, dim=-1) @ F.normalize(protos[1], dim=-1).T
    torch.testing.assert_close(cost[1], -torch.log_softmax(cos, -1))
    torch.testing.assert_close(weight.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    assert torch.diagonal(sim).abs().max() == 0
    with pytest.raises(ValueError, match="unknown assignment mode"):
        cl.assignment_problem(feats, protos, mode="nope")


def test_gumbel_assignment_on_tiny_couplings_is_nearly_uniform():
    # the released code's update assignment: on couplings ~1/(BK) it ignores the plan (§3.6.2)
    plan = torch.full((1, 4000, 5), 1 / (4000 * 5), dtype=torch.float64)
    plan[0, :, 0] *= 1.5  # the plan prefers prototype 0, Gumbel barely notices
    idx = cl.gumbel_hard_assign(plan, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(idx.flatten(), minlength=5).double() / 4000
    assert (freq - 0.2).abs().max() < 0.03


# ---- EMA ------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 6), k=st.integers(1, 6), n=st.integers(1, 20), seed=st.integers(0, 10_000),
       mu=st.sampled_from([0.0, 0.5, 0.9, 0.99]), renorm=st.booleans(),
       mean=st.sampled_from(["arithmetic", "normalized"]))
def test_ema_touches_only_assigned_prototypes(c, k, n, seed, mu, renorm, mean):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(c, k, 8, generator=g)
    feats = torch.randn(n, 8, generator=g)
    prim = torch.randint(c, (n,), generator=g)
    assign = torch.randint(k, (n,), generator=g)
    new, touched = cl.ema_update(protos, feats, prim, assign, mu, mean=mean, renormalize=renorm)
    expected = torch.zeros(c, k, dtype=torch.bool)
    expected[prim, assign] = True
    assert torch.equal(touched, expected)
    assert torch.equal(new[~touched], protos[~touched])
    for ci, ki in expected.nonzero().tolist():
        sel = (prim == ci) & (assign == ki)
        f_bar = feats[sel].mean(0) if mean == "arithmetic" else F.normalize(feats[sel].sum(0), dim=0)
        ref = mu * protos[ci, ki] + (1 - mu) * f_bar
        if renorm:
            ref = F.normalize(ref, dim=0)
        torch.testing.assert_close(new[ci, ki], ref)
    with pytest.raises(ValueError, match="unknown mean"):
        cl.ema_update(protos, feats, prim, assign, mu, mean="median")


def test_ema_from_zero_grows_like_one_minus_mu_power():
    # the code variant: zero init, no re-normalisation, so |p| = 1 - mu^n for a fixed direction
    protos = torch.zeros(1, 1, 4)
    f = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    for _ in range(10):
        protos, _ = cl.ema_update(protos, f, torch.tensor([0]), torch.tensor([0]), 0.9, renormalize=False)
    assert protos.norm().item() == pytest.approx(1 - 0.9**10, rel=1e-5)


def test_seed_prototypes_initialises_each_primitive_once():
    protos = torch.zeros(3, 2, 4)
    init = torch.zeros(3, dtype=torch.bool)
    feats = torch.randn(5, 4)
    prim = torch.tensor([0, 0, 2, 2, 2])
    g = torch.Generator().manual_seed(0)
    p1, init1 = cl.seed_prototypes(protos, init, feats, prim, generator=g)
    assert init1.tolist() == [True, False, True]
    assert torch.equal(p1[1], protos[1])
    torch.testing.assert_close(p1[[0, 2]].norm(dim=-1), torch.ones(2, 2))
    p2, _ = cl.seed_prototypes(p1, init1, torch.randn(5, 4), prim, generator=g)
    assert torch.equal(p2, p1)


# ---- L_PCL ----------------------------------------------------------------------------------


def test_pcl_targets_index_the_own_block():
    n_attr, n_obj, k = 4, 7, 3
    attr = torch.tensor([0, 3, 2, 3])
    obj = torch.tensor([6, 0, 5, 1])
    assign_a = torch.tensor([0, 2, 1, 2])
    assign_o = torch.tensor([1, 0, 2, 0])
    ta = cl.pcl_targets(attr, assign_a, k)
    to = cl.pcl_targets(obj, assign_o, k)
    assert ((0 <= ta) & (ta < n_attr * k)).all() and ((0 <= to) & (to < n_obj * k)).all()
    # the target column holds exactly the assigned prototype after the concatenation
    pa = torch.randn(n_attr, k, 5)
    po = torch.randn(n_obj, k, 5)
    attr_side = torch.cat([pa.reshape(-1, 5), po.reshape(-1, 5)])
    obj_side = torch.cat([po.reshape(-1, 5), pa.reshape(-1, 5)])
    for i in range(4):
        assert torch.equal(attr_side[ta[i]], pa[attr[i], assign_a[i]])
        assert torch.equal(obj_side[to[i]], po[obj[i], assign_o[i]])


def test_pcl_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 6, generator=g)
    own = torch.randn(4, 6, generator=g)
    other = torch.randn(5, 6, generator=g)
    targets = torch.tensor([0, 3, 2])
    tau = 0.1
    loss = cl.prototype_contrastive_loss(feats, own, other, targets, tau)
    allp = F.normalize(torch.cat([own, other]), dim=-1)
    manual = 0.0
    for i in range(3):
        s = F.normalize(feats[i], dim=0) @ allp.T / tau
        manual += -(s[targets[i]] - torch.logsumexp(s, 0))
    assert loss.item() == pytest.approx(manual.item() / 3, rel=1e-5)
    # per-sample copies (code variant) give the same value when the copies are identical
    per_sample = cl.prototype_contrastive_loss(
        feats, own.expand(3, -1, -1), other.expand(3, -1, -1), targets, tau
    )
    assert per_sample.item() == pytest.approx(loss.item(), rel=1e-5)


# ---- nHSIC ----------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(n=st.integers(4, 64), d=st.integers(2, 32), seed=st.integers(0, 10_000))
def test_nhsic_of_x_with_itself_is_one(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    assert cl.nhsic(x, x).item() == pytest.approx(1.0, abs=1e-5)


def test_nhsic_of_independent_inputs_is_near_zero():
    g = torch.Generator().manual_seed(0)
    # the statistic (the biased V-statistic tr(Kx H Ky H) / N^2) keeps a positive O(1/N) bias,
    # so the check uses a batch large enough for it to be small (N = 1024: bias ~ 0.01)
    x = torch.randn(1024, 8, generator=g)
    y = torch.randn(1024, 8, generator=g)
    assert abs(cl.nhsic(x, y).item()) < 0.03
    # and a shuffled copy of a dependent pair loses its dependence
    z = x + 0.1 * torch.randn(1024, 8, generator=g)
    assert cl.nhsic(x, z).item() > 0.8
    assert abs(cl.nhsic(x, z[torch.randperm(1024, generator=g)]).item()) < 0.03


def test_nhsic_is_differentiable_and_rejects_unpaired_inputs():
    x = torch.randn(16, 4, requires_grad=True)
    y = torch.randn(16, 4)
    cl.nhsic(x, y).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="paired samples"):
        cl.nhsic(torch.randn(3, 2), torch.randn(4, 2))


def _numpy_width(x: torch.Tensor) -> float:
    # the width as the released code defines it, built literally: numpy's median of the strictly
    # lower triangle of the squared distances of [x; x]; the mean if that is not positive; >= 0.01
    import numpy as np

    stacked = torch.cat([x, x]).double()
    d2 = cl.squared_distances(stacked).numpy()
    tri = d2[np.tril_indices(len(d2), -1)]
    med = np.median(tri)
    return max(med if med > 0 else tri.mean(), 0.01)


@pytest.mark.parametrize("n", [15, 16])  # odd and even counts of the stacked triangle
def test_kernel_width_is_the_median_over_the_input_stacked_twice(n):
    x = torch.nn.functional.normalize(torch.randn(n, 6, generator=torch.Generator().manual_seed(n), dtype=torch.float64), dim=-1)
    assert float(cl.kernel_width(cl.squared_distances(x))) == pytest.approx(_numpy_width(x), rel=1e-12)
    # n - 1 copies of e0 and one e1: the median is 0, so the width is the mean of the multiset,
    # 4 (n - 1) distances of 2 among n (2n - 1) values
    rep = torch.eye(2, 6, dtype=torch.float64).repeat_interleave(torch.tensor([n - 1, 1]), dim=0)
    width = float(cl.kernel_width(cl.squared_distances(rep)))
    assert width == pytest.approx(8 * (n - 1) / (n * (2 * n - 1)), rel=1e-12) == _numpy_width(rep)
    assert float(cl.kernel_width(cl.squared_distances(1e-3 * x))) == 0.01  # the floor


def test_nhsic_is_the_double_centred_trace_form_with_constant_widths():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = (x.detach() + torch.randn(12, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    h = torch.eye(12, dtype=torch.float64) - 1.0 / 12

    def gram(z):
        z = F.normalize(z, dim=-1)
        return torch.exp(-cl.squared_distances(z) / (2 * _numpy_width(z.detach()) ** 2))

    def hsic(kx, ky):
        return torch.trace(kx @ h @ ky @ h) / 144

    kx, ky = gram(x), gram(y)
    ref = hsic(kx, ky) / torch.sqrt(hsic(kx, kx) * hsic(ky, ky))
    ref_grad = torch.autograd.grad(ref, (x, y))
    value = cl.nhsic(x, y)  # computed in float32, as the released code
    grad = torch.autograd.grad(value, (x, y))
    assert value.item() == pytest.approx(ref.item(), abs=1e-6)
    for got, want in zip(grad, ref_grad):
        torch.testing.assert_close(got.double(), want, atol=1e-4 * float(want.abs().max()), rtol=0)


# ---- diagnostics ----------------------------------------------------------------------------


def test_participation_ratio_and_offdiag_cosine_extremes():
    eye = torch.eye(5)[None]  # 5 orthogonal prototypes
    same = torch.ones(1, 5, 3)  # 5 identical prototypes
    assert cl.participation_ratio(eye).item() == pytest.approx(5.0)
    assert cl.participation_ratio(same).item() == pytest.approx(1.0)
    assert cl.mean_offdiag_cosine(eye).item() == pytest.approx(0.0, abs=1e-6)
    assert cl.mean_offdiag_cosine(same).item() == pytest.approx(1.0)
    assert math.isnan(cl.mean_offdiag_cosine(torch.ones(2, 1, 3))[0].item())
