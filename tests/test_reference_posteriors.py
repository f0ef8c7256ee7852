"""Backends against reference posteriors computed elsewhere (posteriordb; ppl_lvm.testing.reference).

Tolerance: each z-score divides the error of a mean (or sd) by the combined Monte Carlo standard
error (ours and the reference's, see ppl_lvm/testing/reference/check.py), so for a correct backend
it is approximately N(0, 1); with 10 parameters per posterior the largest |z| exceeds 4 with
probability about 6e-4.  Fixed seeds.  Guide-based backends are checked on importance-corrected
moments (what their resampled draws and evidence promise), not on the raw guide.
"""

import warnings

import pytest

from ppl_lvm.errors import IncompatibleModelError
from ppl_lvm.testing import (REFERENCE_POSTERIORS, check_against_reference, load_reference,
                             reference_posteriors)
from ppl_lvm.testing.reference.check import _flatten
from ppl_lvm.traces import trace_program

Z = 4.0


def test_battery_lists_at_least_ten_posteriordb_posteriors_covering_the_shapes():
    names = reference_posteriors()
    from_pdb = [n for n, p in REFERENCE_POSTERIORS.items() if p.posteriordb]
    assert len(from_pdb) >= 10
    features = {f for p in REFERENCE_POSTERIORS.values() for f in p.features}
    for need in ("hierarchical", "centered", "non-centered", "linear regression", "logistic regression",
                 "time series", "Gaussian process", "mixture", "latent scale", "strong correlation", "funnel"):
        assert need in features, need
    assert set(names) == set(REFERENCE_POSTERIORS)


@pytest.mark.parametrize("name", sorted(REFERENCE_POSTERIORS))
def test_every_reference_parameter_is_produced_by_the_pyro_program(name):
    post = load_reference(name)
    rec = post.load()
    tr = trace_program(post.model, (), rec["data"])
    latents = {n: s["value"].unsqueeze(0) for n, s in tr.nodes.items()
               if s["type"] == "sample" and not s["is_observed"] and type(s["fn"]).__name__ != "_Subsample"}
    if post.derived is not None:
        latents.update(post.derived(latents, rec["data"]))
    produced = set(_flatten(latents, 1))
    missing = set(rec["reference"]["parameters"]) - produced
    assert not missing, missing
    for p, r in rec["reference"]["parameters"].items():
        assert r["sd"] > 0 and r["q05"] <= r["q50"] <= r["q95"], p


@pytest.mark.parametrize("name", sorted(n for n, p in REFERENCE_POSTERIORS.items() if p.posteriordb))
def test_the_translation_reproduces_the_reference_under_importance_sampling(name):
    # built by tools/build_reference.py: the Pyro program's own posterior (importance sampling
    # with a t proposal fitted to the reference draws) against the reference means
    check = load_reference(name).load()["translation_check"]
    if check["khat"] > 0.7:
        # eight_schools_centered: a t proposal cannot cover the centered funnel (k-hat 0.73-0.79
        # over builds); the same posterior of (mu, tau, theta) is checked through the
        # non-centered program (k-hat 0.44)
        pytest.skip(f"importance check uninformative at k-hat {check['khat']:.2f}")
    assert check["khat"] < 0.7 and check["worst_abs_z"] < Z and check["ess"] > 50, check


def test_unknown_posterior_is_refused_with_the_list():
    with pytest.raises(ValueError, match="available"):
        load_reference("eight_school")
    with pytest.raises(ValueError, match="draws must be"):
        check_against_reference("arK", "svi", draws="raw")


# --- one posterior per backend (seconds each) --------------------------------------------------

@pytest.mark.parametrize("backend", ["svi", "iwae", "chi2_vis"])
def test_guide_backends_importance_corrected_moments_and_evidence(backend):
    res = check_against_reference("eight_schools_noncentered", backend, seed=0, progress=False)
    if backend != "svi":
        assert res.reliable, res
    # SVI's mean-field guide is a borderline proposal here: PSIS k-hat 0.48-0.74 over seeds 0-3,
    # with and without iterate averaging (measured), so which side of 0.7 one seed lands on is
    # luck; the importance-corrected moments and the evidence passed in all 8 of those fits
    assert res.passed(Z, Z), res
    e, se, ref, ref_se, z = res.log_evidence
    assert abs(z) < Z, res


def test_sghmc_on_an_ar5_posterior():
    res = check_against_reference("arK", "sghmc", seed=0, progress=False)
    assert res.passed(Z, Z), res


def test_sgld_is_right_or_says_it_has_not_mixed():
    # SGLD has no Metropolis correction and mixes slowly on a latent scale: it is approximate
    # by design, so the promise tested is that a result off by more than the tolerance comes
    # with the R-hat/ESS warning (arK, seed 0: the sd of sigma 0.79x the reference, ESS 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = check_against_reference("arK", "sgld", seed=0, progress=False)
    warned = any("have not mixed" in str(w.message) for w in caught)
    assert res.passed(Z, Z) or warned, res


def test_smc_sampler_moments_and_its_log_evidence():
    res = check_against_reference("eight_schools_noncentered", "smc", seed=0, progress=False)
    assert res.passed(Z, Z), res
    assert abs(res.log_evidence[4]) < Z, res


def test_smc_sampler_refuses_an_improper_prior_by_name():
    with pytest.raises(IncompatibleModelError, match=r"\['beta'\] is improper"):
        check_against_reference("kidiq_momiq", "smc", progress=False)


def test_an_improper_prior_runs_under_svi_and_an_unconverged_fit_is_reported():
    # kidiq: flat prior on beta; mom_iq is uncentered (mean 100), so 3000 Adam steps at the
    # default rate leave the loss falling (1e4 -> 3e3 over the run): the run must say so,
    # and the importance k-hat marks the check unreliable
    with pytest.warns(RuntimeWarning, match="still falling"):
        res = check_against_reference("kidiq_momiq", "svi", seed=0, progress=False, log_evidence=False)
    assert not res.reliable


def test_smc_online_without_minibatches_warns_that_it_is_not_a_posterior_sampler():
    with pytest.warns(RuntimeWarning, match="without a subsampled plate"):
        check_against_reference("gp_regr", "smc_online", seed=0, progress=False, num_steps=5,
                                log_evidence=False)


@pytest.mark.parametrize("backend", ["gflownet_em", "smc_filter"])
def test_backends_valid_for_no_static_posterior_refuse_with_the_reason(backend):
    # gflownet_em needs discrete latents, smc_filter a state-space object: posteriordb's
    # reference posteriors are over continuous static parameters
    with pytest.raises(IncompatibleModelError):
        check_against_reference("gp_regr", backend, progress=False)


def test_particle_filter_log_likelihood_of_the_reference_hmm():
    # the HMM's state-space form at the reference posterior mean; exact value by the forward
    # algorithm; z from the spread of 10 independent filters of 1000 particles
    res = check_against_reference("hmm_example", "smc_filter", seed=0, progress=False)
    assert res.passed(Z), res


# --- the whole battery for the samplers that promise exact moments ------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n, p in REFERENCE_POSTERIORS.items()
                                        if p.proper_prior and n != "low_dim_gauss_mix"))
def test_smc_sampler_on_every_proper_reference_posterior(name):
    # low_dim_gauss_mix is left to benchmarks/reference_battery.py: about 20 s per temperature
    # on one thread (1000 points x 1000 particles), tens of minutes in all
    res = check_against_reference(name, "smc", seed=0, progress=False, log_evidence=False)
    assert res.passed(Z, Z), res


def test_sghmc_starts_at_the_mode_on_an_unscaled_regression_and_names_the_correlation():
    # kidiq: intercept-slope correlation -0.99, sds 6 and 0.06.  Before the L-BFGS start every
    # chain was still descending after 2000 steps (means 64 MCSE off, sd ratio 10.7); now the
    # means are right and the (slow-mixing) warning names the ridge and the fix
    with pytest.warns(RuntimeWarning, match="strong posterior correlation"):
        res = check_against_reference("kidiq_momiq", "sghmc", seed=0, progress=False, log_evidence=False)
    assert res.worst_z < Z, res


def test_a_support_that_depends_on_another_latent_is_refused_by_name():
    # garch11: beta1 ~ Uniform(0, 1 - alpha1); one fixed unconstraining transform put beta1
    # outside its support (SG-HMC diverged at step 17 before this check)
    with pytest.raises(IncompatibleModelError, match=r"\['beta1'\] depends on other latent sites"):
        check_against_reference("garch11", "sghmc", progress=False)
