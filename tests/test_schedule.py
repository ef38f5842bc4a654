"""Golden-number tests of `diffseg_engine.sampling.schedule` against closed forms and direct float64 loops."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from diffseg_engine.sampling import schedule as S
from diffseg_engine.core.errors import UsageError

RNG = np.random.default_rng(0)
IDX = {name: i for i, name in enumerate(S.COEF_NAMES)}


@pytest.fixture(scope="module")
def lin() -> S.DiffusionTables:
    return S.tables_for("linear", 1000)


# ----------------------------------------------------------------------------------------------- schedules
def test_linear_betas_endpoints_and_final_alphas_cumprod(lin):
    assert lin.betas[0] == pytest.approx(1e-4, rel=1e-15) and lin.betas[-1] == pytest.approx(0.02, rel=1e-15)
    assert np.allclose(np.diff(lin.betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    prod = 1.0
    for beta in lin.betas:
        prod *= 1.0 - beta
    assert lin.alphas_cumprod[-1] == pytest.approx(prod, rel=1e-12)
    assert lin.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)
    short = S.betas_for("linear", 100)  # scale = 1000 / T
    assert short[0] == pytest.approx(1e-3) and short[-1] == pytest.approx(0.2)


def test_cosine_betas_capped_and_alpha_bar_follows_cosine():
    t = 1000
    betas = S.betas_for("cosine", t)
    assert betas.max() == 0.999 and betas[-1] == 0.999 and betas.min() > 0

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    acp = S.DiffusionTables.from_betas(betas).alphas_cumprod
    want = np.array([f((i + 1) / t) / f(0) for i in range(t)])
    uncapped = np.flatnonzero(betas < 0.999)
    assert uncapped.size == t - 1
    assert np.allclose(acp[uncapped], want[uncapped], rtol=1e-9, atol=0)
    assert betas[0] == pytest.approx(1 - f(1 / t) / f(0), rel=1e-12)


def test_bad_schedules_raise_usage_error():
    with pytest.raises(UsageError, match="unknown noise schedule"):
        S.betas_for("quadratic", 100)
    with pytest.raises(UsageError):
        S.betas_for("linear", 20)  # beta_end would be 1
    with pytest.raises(UsageError):
        S.betas_for("cosine", 0)


# -------------------------------------------------------------------------------------------------- tables
def test_tables_match_hand_formulas_and_are_read_only():
    betas = np.array([0.1, 0.2, 0.3, 0.25])
    tb = S.DiffusionTables.from_betas(betas)
    acp = np.array([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.7 * 0.75])
    acp_prev = np.array([1.0, *acp[:-1]])
    assert np.allclose(tb.alphas_cumprod, acp, rtol=1e-15)
    assert np.allclose(tb.alphas_cumprod_prev, acp_prev, rtol=1e-15)
    assert np.allclose(tb.alphas_cumprod_next, [*acp[1:], 0.0], rtol=1e-15)
    post_var = betas * (1 - acp_prev) / (1 - acp)
    assert post_var[0] == 0 and np.allclose(tb.posterior_variance, post_var, rtol=1e-14)
    assert np.allclose(tb.posterior_log_variance_clipped, np.log([post_var[1], *post_var[1:]]), rtol=1e-14)
    assert np.allclose(tb.sqrt_recip_alphas_cumprod * tb.sqrt_alphas_cumprod, 1.0, rtol=1e-15)
    assert np.allclose(tb.sqrt_recipm1_alphas_cumprod, np.sqrt((1 - acp) / acp), rtol=1e-14)
    assert np.allclose(tb.log_one_minus_alphas_cumprod, np.log(1 - acp), rtol=1e-14)
    assert tb.num_steps == 4 and tb.timestep_map.dtype == np.int64 and list(tb.timestep_map) == [0, 1, 2, 3]
    for f in ("betas", "alphas_cumprod", "posterior_variance", "timestep_map"):
        arr = getattr(tb, f)
        assert arr.dtype in (np.float64, np.int64) and not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 0
    betas[0] = 0.5  # the tables hold a copy
    assert tb.betas[0] == 0.1
    with pytest.raises(ValueError):
        S.DiffusionTables.from_betas([0.1, 1.0])


def test_q_posterior_is_the_gaussian_conjugate(lin):
    x0, xt = RNG.uniform(-1, 1, (3, 1, 2, 2)), RNG.normal(size=(3, 1, 2, 2))
    t = np.array([1, 500, 999])
    mean, var, log_var = S.q_posterior(lin, x0, xt, t)
    # prior x_{t-1}|x0 = N(sqrt(acp_prev) x0, 1-acp_prev); likelihood x_t|x_{t-1} = N(sqrt(alpha) x_{t-1}, beta)
    for j, ti in enumerate(t):
        beta, acp_prev = lin.betas[ti], np.prod(1 - lin.betas[:ti])
        prec = 1 / (1 - acp_prev) + (1 - beta) / beta
        want = (math.sqrt(acp_prev) * x0[j] / (1 - acp_prev) + math.sqrt(1 - beta) * xt[j] / beta) / prec
        assert np.allclose(mean[j], want, rtol=1e-9, atol=1e-12)
        assert np.allclose(var[j], 1 / prec, rtol=1e-9) and np.allclose(log_var[j], math.log(1 / prec), rtol=1e-9)
    assert mean.shape == var.shape == log_var.shape == xt.shape
    m0, v0, _ = S.q_posterior(lin, x0, xt, np.zeros(3, dtype=np.int64))  # t = 0: x_{-1} is x0 itself
    assert np.allclose(m0, x0, rtol=1e-12) and np.all(v0 == 0)


def test_q_sample_and_eps_x0_round_trip(lin):
    x0, eps = RNG.uniform(-1, 1, (2, 1, 3, 3)), RNG.normal(size=(2, 1, 3, 3))
    t = np.array([10, 900])
    xt = S.q_sample(lin, x0, t, eps)
    acp = np.cumprod(1 - lin.betas)[t].reshape(2, 1, 1, 1)
    assert np.allclose(xt, np.sqrt(acp) * x0 + np.sqrt(1 - acp) * eps, rtol=1e-12)
    assert np.allclose(S.predict_x0_from_eps(lin, xt, t, eps), x0, atol=1e-10)
    assert np.allclose(S.predict_eps_from_x0(lin, xt, t, x0), eps, atol=1e-10)
    assert S.q_sample(lin, x0.astype(np.float32), t, eps.astype(np.float32)).dtype == np.float32
    with pytest.raises(ValueError):
        S.q_sample(lin, x0, np.array([0, 1000]), eps)


def test_learned_range_endpoints(lin):
    t = np.array([0, 1, 700])
    log_beta = np.log(lin.betas[t]).reshape(3, 1, 1, 1)
    clipped = lin.posterior_log_variance_clipped[t].reshape(3, 1, 1, 1)
    ones = np.ones((3, 1, 2, 2))
    assert np.allclose(S.learned_range_log_variance(lin, -ones, t), clipped, rtol=1e-14)
    assert np.allclose(S.learned_range_log_variance(lin, ones, t), log_beta, rtol=1e-14)
    assert np.allclose(S.learned_range_log_variance(lin, 0 * ones, t), (log_beta + clipped) / 2, rtol=1e-14)
    assert clipped[0] == clipped[1] and clipped[1] < log_beta[1]  # element 0 takes element 1's value


# ------------------------------------------------------------------------------------------------ respacing
def test_space_timesteps_known_outputs():
    assert S.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert S.space_timesteps(1000, "ddim1000") == set(range(1000))
    assert S.space_timesteps(300, [10]) == {0, 33, 66, 100, 133, 166, 199, 233, 266, 299}
    assert S.space_timesteps(10, [5]) == {0, 2, 4, 7, 9}  # round(4.5) == 4, Python's round-half-even
    assert S.space_timesteps(1000, "1000") == set(range(1000))
    got = S.space_timesteps(100, [10, 15, 20])  # sections of 34, 33, 33 steps
    assert got == ({0, 4, 7, 11, 15, 18, 22, 26, 29, 33}
                   | {34, 36, 39, 41, 43, 45, 48, 50, 52, 55, 57, 59, 61, 64, 66}
                   | {67, 69, 70, 72, 74, 75, 77, 79, 80, 82, 84, 86, 87, 89, 91, 92, 94, 96, 97, 99})
    assert S.space_timesteps(100, "10,15,20") == got


@pytest.mark.parametrize("counts", ["ddim30", [101], [10, 40, 40], "ddimx", "a,b"])
def test_space_timesteps_impossible_counts_raise(counts):
    with pytest.raises(UsageError):
        S.space_timesteps(100, counts)


def test_respace_all_steps_is_identity_and_kept_steps_keep_alphas_cumprod(lin):
    same = S.respace(lin, range(1000))
    for f in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
              "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_recipm1_alphas_cumprod"):
        assert np.allclose(getattr(same, f), getattr(lin, f), rtol=1e-9, atol=0), f
    assert np.array_equal(same.timestep_map, lin.timestep_map)
    keep = sorted(S.space_timesteps(1000, [10, 15, 20]))
    sp = S.respace(lin, keep)
    assert sp.num_steps == 45 and list(sp.timestep_map) == keep
    assert np.allclose(sp.alphas_cumprod, lin.alphas_cumprod[keep], rtol=1e-12)
    assert sp.betas[1] == pytest.approx(1 - lin.alphas_cumprod[keep[1]] / lin.alphas_cumprod[keep[0]], rel=1e-12)
    assert sp.betas[1] > lin.betas[keep[1]] * 10  # respaced betas are much larger than the original's
    twice = S.respace(sp, [0, 5, 44])  # respacing composes the map
    assert list(twice.timestep_map) == [keep[0], keep[5], keep[44]]
    assert np.allclose(twice.alphas_cumprod, lin.alphas_cumprod[twice.timestep_map], rtol=1e-12)
    with pytest.raises(UsageError):
        S.respace(lin, [])
    with pytest.raises(UsageError):
        S.respace(lin, [0, 1000])


# ------------------------------------------------------------------------------------------------ sampling
def _batch(shape=(3, 1, 4, 4)):
    return RNG.uniform(-0.9, 0.9, shape), RNG.normal(size=shape)


def test_ddim_eta0_with_true_noise_lands_on_q_sample_of_previous_step(lin):
    sp = S.respace(lin, S.space_timesteps(1000, "ddim50"))
    coefs = S.ddim_coefficients(sp, 0.0)
    x0, eps = _batch()
    v = RNG.uniform(-1, 1, x0.shape)
    for i in (49, 30, 1):
        t = np.full(3, i)
        xt = S.q_sample(sp, x0, t, eps)
        prev = S.apply_step(coefs[i], xt, eps, v, RNG.normal(size=x0.shape), clip=(-1.0, 1.0))
        acp_prev = lin.alphas_cumprod[sp.timestep_map[i - 1]]  # original process, previous kept step
        assert np.allclose(prev, math.sqrt(acp_prev) * x0 + math.sqrt(1 - acp_prev) * eps, rtol=0, atol=1e-9)
    last = S.apply_step(coefs[0], S.q_sample(sp, x0, np.zeros(3, np.int64), eps), eps, v, eps, clip=None)
    assert np.allclose(last, x0, atol=1e-10)


def test_clip_applies_to_predicted_x0(lin):
    x0, eps = _batch()
    x0 = 3 * x0  # out of range
    row = S.ddim_coefficients(lin, 0.0)[0]  # i = 0: x_prev = x0 prediction
    xt = S.q_sample(lin, x0, np.zeros(3, np.int64), eps)
    assert np.allclose(S.apply_step(row, xt, eps, eps, eps, clip=(-1.0, 1.0)), np.clip(x0, -1, 1), atol=1e-10)
    assert np.allclose(S.apply_step(row, xt, eps, eps, eps, clip=None), x0, atol=1e-10)


def test_ddim_eta1_equals_ddpm_fixed_small(lin):
    sp = S.respace(lin, range(0, 1000, 37))
    ddim, ddpm = S.ddim_coefficients(sp, 1.0), S.ddpm_coefficients(sp, learn_sigma=False)
    assert np.allclose(ddim, ddpm, rtol=1e-7, atol=1e-12)
    assert np.allclose(ddpm[1:, IDX["g_fixed"]], np.sqrt(sp.posterior_variance[1:]), rtol=1e-14)
    with pytest.raises(UsageError):
        S.ddim_coefficients(sp, 1.5)


def test_ddpm_with_true_eps_gives_posterior_mean_and_learned_std(lin):
    sp = S.respace(lin, range(0, 1000, 10))
    coefs = S.ddpm_coefficients(sp)
    x0, eps = _batch()
    v, z = RNG.uniform(-1, 1, x0.shape), RNG.normal(size=x0.shape)
    t = np.full(3, 60)
    xt = S.q_sample(sp, x0, t, eps)
    mean, _, _ = S.q_posterior(sp, x0, xt, t)
    assert np.allclose(S.apply_step(coefs[60], xt, eps, v, 0 * z, clip=(-1.0, 1.0)), mean, atol=1e-10)
    log_var = S.learned_range_log_variance(sp, v, t)
    frac = (v + 1) / 2  # by hand, with the respaced beta
    beta = 1 - lin.alphas_cumprod[600] / lin.alphas_cumprod[590]
    acp, acp_prev = lin.alphas_cumprod[600], lin.alphas_cumprod[590]
    assert np.allclose(log_var, frac * math.log(beta) + (1 - frac) * math.log(beta * (1 - acp_prev) / (1 - acp)))
    got = S.apply_step(coefs[60], xt, eps, v, z, clip=(-1.0, 1.0))
    assert np.allclose(got, mean + np.exp(0.5 * log_var) * z, atol=1e-10)


def test_last_step_rows_add_no_noise(lin):
    sp = S.respace(lin, [0, 500, 999])
    rows = [S.ddpm_coefficients(sp)[0], S.ddpm_coefficients(sp, learn_sigma=False)[0], S.ddim_coefficients(sp, 1.0)[0]]
    x, eps = _batch()
    v = RNG.uniform(-1, 1, x.shape)
    for row in rows:
        assert row[IDX["g_learned"]] == 0 and row[IDX["g_fixed"]] == 0
        assert np.array_equal(S.apply_step(row, x, eps, v, 100 + 0 * x), S.apply_step(row, x, eps, v, 0 * x))
    assert S.ddpm_coefficients(sp)[1, IDX["g_learned"]] == 1 and S.ddim_coefficients(sp, 1.0)[1, IDX["g_fixed"]] > 0


def test_apply_step_batched_rows_equal_per_sample_and_keep_dtype(lin):
    coefs = S.ddpm_coefficients(lin)
    steps = np.array([999, 3, 0])
    x, eps = _batch()
    v, z = RNG.uniform(-1, 1, x.shape), RNG.normal(size=x.shape)
    got = S.apply_step(coefs[steps], x, eps, v, z, clip=(-1.0, 1.0))
    for j, i in enumerate(steps):
        one = S.apply_step(coefs[i], x[j:j + 1], eps[j:j + 1], v[j:j + 1], z[j:j + 1], clip=(-1.0, 1.0))
        assert np.array_equal(got[j:j + 1], one)
    assert not np.allclose(got[0], got[1])
    f32 = [a.astype(np.float32) for a in (x, eps, v, z)]
    out32 = S.apply_step(coefs[steps], *f32, clip=(-1.0, 1.0))
    assert out32.dtype == np.float32 and np.allclose(out32, got, atol=1e-5)
    with pytest.raises(ValueError):
        S.apply_step(coefs[:2], x, eps, v, z)


def test_model_timesteps_and_module_imports(lin):
    sp = S.respace(lin, S.space_timesteps(1000, "ddim50"))
    ts = S.model_timesteps(sp)
    assert ts.dtype == np.float32 and np.array_equal(ts, np.arange(0, 1000, 20, dtype=np.float32))
    assert S.COEF_NAMES == ("a", "b", "c_x0", "c_x", "min_log", "max_log", "g_learned", "g_fixed")
    tree = ast.parse(Path(S.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in roots and roots <= {"__future__", "dataclasses", "math", "collections", "numpy", "core"}


@pytest.mark.parametrize("steps", [1000, 50])
def test_ddpm_rows_with_the_exact_noise_reproduce_the_forward_marginals(lin, steps):
    """With the ε of a known x0 (a perfect denoiser for one mask value) and the posterior variance (v = -1),
    the DDPM rows, full or respaced, walk x_t with mean sqrt(ᾱ_t)·x0 and std sqrt(1-ᾱ_t) down to x0 itself:
    if the sampler's samples fall short of ±1, the network is the cause, not the update."""
    tables = lin if steps == 1000 else S.respace(lin, S.space_timesteps(1000, [steps]))
    coefs, ts = S.ddpm_coefficients(tables, learn_sigma=True), S.model_timesteps(tables).astype(int)
    rng = np.random.default_rng(0)
    x0 = -1.0
    x = rng.standard_normal((20000, 1, 1, 1))
    for i in range(len(coefs) - 1, -1, -1):
        t = ts[i]
        eps = (x - math.sqrt(lin.alphas_cumprod[t]) * x0) / math.sqrt(1 - lin.alphas_cumprod[t])
        x = S.apply_step(coefs[i], x, eps, -np.ones_like(x), rng.standard_normal(x.shape), clip=(-1.0, 1.0))
        if i and t in {ts[len(ts) * 4 // 5], ts[len(ts) // 2], ts[len(ts) // 5]}:
            prev = ts[i - 1]  # x is now x_{prev}
            assert abs(x.mean() - math.sqrt(lin.alphas_cumprod[prev]) * x0) < 0.02, (t, x.mean())
            assert abs(x.std() - math.sqrt(1 - lin.alphas_cumprod[prev])) < 0.02, (t, x.std())
    np.testing.assert_allclose(x, x0, atol=1e-6)
