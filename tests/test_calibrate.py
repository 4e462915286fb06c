"""Calibration core on synthetic exit scores of known difficulty: budgets met, LTT's guarantee holds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from eecompile.bundle import Manifest, TensorInfo
from eecompile.calibrate import (
    ExitTable,
    assign_exits,
    binom_cdf,
    candidate_thresholds,
    correctness,
    evaluate,
    hoeffding_bentkus_pvalue,
    load_data,
    ltt_thresholds,
    oracle_exits,
    samples_needed,
    search_thresholds,
)
from eecompile.errors import CalibrationError, DataError

COSTS = [1.0, 2.0, 3.0, 4.0]  # cumulative cost of leaving at exit k (the final exit last)
CAPS = [0.35, 0.55, 0.75, 1.2]  # how hard a sample each exit still gets right


def synthetic(n: int, rng: np.random.Generator, labels: bool = True, entropy_exit: bool = False) -> ExitTable:
    """Each sample has a difficulty; exit k is right (and confident) mostly when it is below CAPS[k]."""
    d = rng.uniform(size=n)
    logit = (np.asarray(CAPS)[:, None] - d[None]) * 15.0
    p_right = 1 / (1 + np.exp(-logit))
    correct = rng.uniform(size=p_right.shape) < p_right
    if not labels:
        correct[-1] = True  # the reference is the final exit itself
    scores = 1 / (1 + np.exp(-(logit[:-1] + rng.normal(0, 0.5, size=(3, n)))))
    fires = [True, True, True]
    if entropy_exit:  # exit 1 reports an entropy-like score: small = confident
        scores[1] = 1 - scores[1]
        fires[1] = False
    return ExitTable(scores, correct, fires, has_labels=labels)


def test_assign_exits_first_firing_gate_and_nan_never_fires() -> None:
    scores = np.array([[0.9, 0.1, np.nan, 0.2], [0.5, 0.95, 0.99, 0.3]])
    idx = assign_exits(scores, [0.8, 0.9], [True, True])
    assert idx.tolist() == [0, 1, 1, 2]
    # entropy-style gate fires below; +inf / -inf are "never"
    assert assign_exits(scores, [0.15, math.inf], [False, True]).tolist() == [2, 0, 2, 2]
    assert assign_exits(scores, [math.inf, math.inf], [True, True]).tolist() == [2, 2, 2, 2]


def test_correctness_with_and_without_labels() -> None:
    preds = np.array([[0, 1, 2], [0, 2, 2], [1, 2, 2]])
    assert correctness(preds, None).tolist() == [[False, False, True], [False, True, True], [True, True, True]]
    assert correctness(preds, np.array([0, 2, 1]))[-1].tolist() == [False, True, False]
    with pytest.raises(DataError, match="labels"):
        correctness(preds, np.array([0, 1]))


@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("budget", [0.005, 0.01, 0.05])
def test_search_meets_budget_on_calibration_data(labels: bool, budget: float) -> None:
    table = synthetic(3000, np.random.default_rng(1), labels=labels, entropy_exit=True)
    thr = search_thresholds(table, COSTS, budget)
    ev = evaluate(table, thr, COSTS)
    assert ev.drop <= budget + 1e-12
    assert ev.expected_cost < COSTS[-1] * 0.9  # it does find exits worth taking
    assert ev.shares[0] > 0.05


def test_search_spends_a_bigger_budget_on_lower_cost() -> None:
    table = synthetic(3000, np.random.default_rng(2))
    costs = [evaluate(table, search_thresholds(table, COSTS, b), COSTS).expected_cost for b in (0.002, 0.01, 0.05, 0.2)]
    assert all(a >= b - 1e-9 for a, b in zip(costs, costs[1:], strict=False))


def test_oracle_is_at_least_as_cheap_as_any_threshold() -> None:
    table = synthetic(2000, np.random.default_rng(3), labels=False)
    oracle_cost = np.asarray(COSTS)[oracle_exits(table)].mean()
    ev = evaluate(table, search_thresholds(table, COSTS, 1e-9), COSTS)
    assert oracle_cost <= ev.expected_cost


def test_candidates_run_strict_to_loose() -> None:
    s = np.random.default_rng(0).uniform(size=500)
    up = candidate_thresholds(s, True, 10)
    down = candidate_thresholds(s, False, 10)
    assert up[0] == math.inf and up[1:] == sorted(up[1:], reverse=True)
    assert down[0] == -math.inf and down[1:] == sorted(down[1:])


def test_binomial_tail_matches_known_values() -> None:
    assert binom_cdf(0, 10, 0.1) == pytest.approx(0.9**10)
    assert binom_cdf(2, 5, 0.5) == pytest.approx(0.5)
    assert binom_cdf(5, 5, 0.3) == 1.0
    # Hoeffding-Bentkus is valid but never tighter than the exact tail for 0/1 losses
    assert hoeffding_bentkus_pvalue(3, 400, 0.02) >= binom_cdf(3, 400, 0.02)


def test_samples_needed_is_the_zero_error_bound() -> None:
    n = samples_needed(0.01, 0.05)
    assert n == 299
    assert 0.99**n <= 0.05 < 0.99 ** (n - 1)


@pytest.mark.parametrize(("errors", "n"), [(0, 1), (0, 50), (1, 50), (3, 500), (17, 300), (99, 100), (100, 100)])
@pytest.mark.parametrize("delta", [0.01, 0.05, 0.1, 0.3])
def test_statistics_match_scipy(errors: int, n: int, delta: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    from eecompile.calibrate import (
        binomial_pvalue,
        clopper_pearson_interval,
        clopper_pearson_upper,
        max_certified_errors,
    )

    for p in (0.001, 0.01, 0.2, 0.5):
        assert binom_cdf(errors, n, p) == pytest.approx(stats.binom.cdf(errors, n, p), rel=1e-9, abs=1e-300)
        assert binomial_pvalue(errors, n, p) == pytest.approx(stats.binom.cdf(errors, n, p), rel=1e-9, abs=1e-300)
    # One-sided Clopper-Pearson: the 1 - delta quantile of Beta(k + 1, n - k).
    want = 1.0 if errors == n else stats.beta.ppf(1 - delta, errors + 1, n - errors)
    assert clopper_pearson_upper(errors, n, delta) == pytest.approx(want, abs=1e-12)
    ci = stats.binomtest(errors, n).proportion_ci(confidence_level=1 - delta, method="exact")
    lo, hi = clopper_pearson_interval(errors, n, 1 - delta)
    assert lo == pytest.approx(ci.low, abs=1e-10) and hi == pytest.approx(ci.high, abs=1e-10)
    # The most errors a budget tolerates is where the binomial tail crosses delta.
    for budget in (0.01, 0.05, 0.3):
        k = max_certified_errors(n, budget, delta)
        assert k == -1 or stats.binom.cdf(k, n, budget) <= delta
        assert k == n or stats.binom.cdf(k + 1, n, budget) > delta
        assert (k >= 0) == (n >= samples_needed(budget, delta))


def test_hoeffding_bentkus_against_its_formula() -> None:
    stats = pytest.importorskip("scipy.stats")
    for errors, n, alpha in ((0, 300, 0.01), (3, 400, 0.02), (40, 500, 0.05), (60, 500, 0.05)):
        rhat = errors / n
        r = min(rhat, alpha)
        h1 = (r * math.log(r / alpha) if r > 0 else 0.0) + (1 - r) * math.log((1 - r) / (1 - alpha))
        want = min(1.0, math.exp(-n * h1), math.e * stats.binom.cdf(math.ceil(n * rhat), n, alpha))
        assert hoeffding_bentkus_pvalue(errors, n, alpha) == pytest.approx(want, rel=1e-9)


def test_samples_needed_at_a_rate() -> None:
    from eecompile.calibrate import samples_needed_at_rate

    assert samples_needed_at_rate(0.0, 0.01, 0.05) == samples_needed(0.01, 0.05)
    n = samples_needed_at_rate(0.005, 0.01, 0.05)
    assert n is not None and binomial_pvalue_at(0.005, n, 0.01) <= 0.05
    assert samples_needed_at_rate(0.01, 0.01, 0.05) is None  # a rate at the budget is never certified


def binomial_pvalue_at(rate: float, n: int, budget: float) -> float:
    return binom_cdf(math.floor(rate * n + 1e-9), n, budget)


@pytest.mark.parametrize("labels", [True, False])
def test_bounded_search_keeps_the_upper_bound_within_budget(labels: bool) -> None:
    from eecompile.calibrate import bounded_search, clopper_pearson_upper

    table = synthetic(2000, np.random.default_rng(11), labels=labels)
    res = bounded_search(table, COSTS, 0.02, 0.9)
    ev = evaluate(table, res.thresholds, COSTS)
    assert res.feasible and ev.expected_cost < COSTS[-1] * 0.9
    assert res.errors == ev.errors <= res.allowed_errors
    assert res.drop_upper == pytest.approx(clopper_pearson_upper(ev.errors, 2000, 0.1)) and res.drop_upper <= 0.02
    assert res.loss_interval[0] <= ev.loss <= res.loss_interval[1]
    # The point-estimate search spends the whole budget; the bounded one stays below it.
    naive = evaluate(table, search_thresholds(table, COSTS, 0.02, risk="loss"), COSTS)
    assert naive.loss > ev.loss and naive.expected_cost <= ev.expected_cost


def test_bounded_search_with_too_few_samples_deploys_nothing() -> None:
    from eecompile.calibrate import bounded_search

    table = synthetic(100, np.random.default_rng(12))
    res = bounded_search(table, COSTS, 0.01, 0.95)  # 299 samples are needed even with zero errors
    assert not res.feasible and res.allowed_errors == -1 and res.samples_needed == 299
    assert all(t == math.inf for t in res.thresholds)


def test_bounded_search_when_exiting_does_not_pay_deploys_never() -> None:
    """Exits that cost more than the whole chain (a tiny model timed under load): "every gate never" is the
    answer, and a deployable one; it must not read as "nothing meets the budget"."""
    from eecompile.calibrate import bounded_search

    table = synthetic(2000, np.random.default_rng(11))
    slow = [COSTS[-1] * 1.5] * (len(COSTS) - 1) + [COSTS[-1]]  # leaving early is dearer than the full chain
    res = bounded_search(table, slow, 0.02, 0.9)
    assert res.feasible and not res.exits_pay
    assert all(t == math.inf for t in res.thresholds)
    paying = bounded_search(table, COSTS, 0.02, 0.9)
    assert paying.feasible and paying.exits_pay


def test_bounded_search_with_heads_that_always_disagree_is_not_feasible() -> None:
    from eecompile.calibrate import bounded_search

    table = synthetic(150, np.random.default_rng(11), labels=False)
    table.correct[:-1] = False  # no early exit ever agrees with the final one
    res = bounded_search(table, COSTS, 0.02, 0.9)  # 150 samples allow no error at all (114 are needed for that)
    assert not res.feasible and res.allowed_errors == 0 and res.samples_needed <= 150


def test_threshold_path_is_monotone_strict_to_loose() -> None:
    from eecompile.calibrate import threshold_path

    table = synthetic(600, np.random.default_rng(13), entropy_exit=True)
    path = threshold_path(table, COSTS, max_points=150)
    assert 50 <= len(path) <= 150
    sign = np.array([1.0 if a else -1.0 for a in table.fires_above])
    for a, b in zip(path, path[1:], strict=False):
        assert np.all(sign * np.asarray(b) <= sign * np.asarray(a))  # every threshold only loosens
    costs = [evaluate(table, t, COSTS).expected_cost for t in path]
    assert costs[-1] < costs[0] and costs[0] < COSTS[-1]


def test_ltt_guarantee_holds_in_simulation() -> None:
    """Over many random calibration sets, the chosen thresholds' true risk exceeds the budget in <= delta of them.

    The naive search on the same sets overshoots far more often: the test has power.
    """
    budget, delta, trials = 0.03, 0.1, 60
    population = synthetic(200_000, np.random.default_rng(100), labels=True)
    rng = np.random.default_rng(7)
    ltt_violations = search_violations = certified = 0
    for _ in range(trials):
        cal = synthetic(1000, rng, labels=True)
        res = ltt_thresholds(cal, COSTS, budget, delta, seed=int(rng.integers(1 << 30)))
        certified += res.certified
        ltt_violations += evaluate(population, res.thresholds, COSTS).loss > budget
        naive = search_thresholds(cal, COSTS, budget, risk="loss")
        search_violations += evaluate(population, naive, COSTS).loss > budget
    assert certified >= trials * 0.8  # it does certify something useful most of the time
    assert ltt_violations / trials <= delta
    assert search_violations > ltt_violations


def test_ltt_with_too_few_samples_says_how_many() -> None:
    table = synthetic(200, np.random.default_rng(0))
    with pytest.raises(CalibrationError, match=r"at least 299 test samples.*at least 428 calibration samples"):
        ltt_thresholds(table, COSTS, 0.01, 0.05)


def test_ltt_reports_when_nothing_can_be_certified() -> None:
    # The early exits are wrong wherever the final exit is right, and the test split (301 samples) is just
    # big enough to certify zero errors: no threshold that lets anything exit can be certified.
    rng = np.random.default_rng(0)
    n = 430
    correct = np.zeros((4, n), bool)
    correct[-1] = True
    table = ExitTable(rng.uniform(size=(3, n)), correct, [True] * 3)
    res = ltt_thresholds(table, COSTS, 0.01, 0.05)
    assert not res.certified
    assert all(t == math.inf for t in res.thresholds)  # every gate set to never fire


def test_ltt_certifies_on_an_easy_problem() -> None:
    table = synthetic(3000, np.random.default_rng(4), labels=False)
    res = ltt_thresholds(table, COSTS, 0.02, 0.05)
    assert res.certified and res.p_value is not None and res.p_value <= 0.05
    assert evaluate(table, res.thresholds, COSTS).expected_cost < COSTS[-1]


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.1, 1.5])
def test_budget_outside_unit_interval(budget: float) -> None:
    table = synthetic(2000, np.random.default_rng(0))
    with pytest.raises(CalibrationError, match=r"max-drop must be in \(0, 1\)"):
        ltt_thresholds(table, COSTS, budget, 0.05)


def test_delta_outside_unit_interval() -> None:
    table = synthetic(2000, np.random.default_rng(0))
    with pytest.raises(CalibrationError, match=r"delta must be in \(0, 1\)"):
        ltt_thresholds(table, COSTS, 0.01, 1.0)


def _manifest() -> Manifest:
    x = TensorInfo("input", "float32", ["batch", 4])
    return Manifest(source_model={}, inputs=[x], outputs=[TensorInfo("logits", "float32", ["batch", 3])],
                    segments=[], files={})


def test_data_without_the_model_inputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "cal.npz"
    np.savez(p, images=np.zeros((3, 4), np.float32))
    with pytest.raises(DataError, match=r"no array named 'input'.*'images'"):
        load_data(p, _manifest())


def test_data_with_wrong_shape_or_label_count(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "cal.npz"
    np.savez(p, input=np.zeros((3, 5), np.float32))
    with pytest.raises(DataError, match="shape"):
        load_data(p, _manifest())
    np.savez(p, input=np.zeros((3, 4)), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="'labels' has shape"):
        load_data(p, _manifest())
    np.savez(p, input=np.zeros((3, 4)), labels=np.zeros(3, np.int64))  # float64 is cast to the model's float32
    inputs, labels = load_data(p, _manifest())
    assert inputs["input"].dtype == np.float32 and labels is not None


# ------------------------------------------------------------------------- bundle level, end to end

GATE_CASES = [("max_prob", 0.9), ("entropy", 0.1), ("margin", 0.5), ("patience", 2.0), ("saturation", 0.99)]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The blob MLP with trained heads, compiled once per gate kind (copies are calibrated per test)."""
    pytest.importorskip("torch")
    from eecompile.train import train_heads
    from tests.test_train import make_bundle, save_data

    root = tmp_path_factory.mktemp("gates")
    for kind, thr in GATE_CASES:
        d = root / kind
        d.mkdir()
        bundle = make_bundle(d, gates=(kind, kind), thresholds=(thr, thr))
        train_heads(bundle, save_data(d / "train.npz", 400, seed=2), epochs=8, quiet=True)
        save_data(d / "cal.npz", 500, seed=5)
        save_data(d / "cal_nolabels.npz", 500, seed=5, labels=False)
    return root


@pytest.mark.parametrize("kind", [k for k, _ in GATE_CASES])
def test_each_gate_kind_is_calibrated_and_run(trained_dir: Path, tmp_path: Path, kind: str) -> None:
    import shutil

    import eecompile
    from eecompile.bundle import Bundle
    from eecompile.calibrate import calibrate_bundle

    bundle = tmp_path / "b.eebundle"
    shutil.copytree(trained_dir / kind / "model.eebundle", bundle)
    report = calibrate_bundle(bundle, trained_dir / kind / "cal.npz", max_drop=0.02, costs=[1.0, 1.0, 4.0], quiet=True)
    assert report.drop <= 0.02
    b = Bundle.load(bundle)
    assert b.manifest.calibration is not None and b.manifest.calibration["method"] == "search"
    thresholds = b.manifest.thresholds
    assert thresholds == [e["threshold"] for e in report.exits[:-1]]
    # Running the chain with the written thresholds reproduces the calibration's exits and accuracy.
    data = np.load(trained_dir / kind / "cal.npz")
    res = eecompile.load(b).run({"x": data["x"]})
    shares = res.exit_counts / res.exit_counts.sum()
    np.testing.assert_allclose(shares, [e["share"] for e in report.exits], atol=1e-9)
    acc = (res.outputs["logits"].argmax(1) == data["labels"]).mean()
    assert acc == pytest.approx(report.accuracy)


def test_calibrate_where_exiting_does_not_pay_writes_never_and_says_why(trained_dir: Path, tmp_path: Path) -> None:
    """Measured exit costs above the whole chain's (a tiny bundle timed on a busy machine): the budget is met
    by "every gate never"; it is written and the report says why, instead of claiming nothing meets it."""
    import shutil

    from eecompile.bundle import Bundle
    from eecompile.calibrate import calibrate_bundle

    kind = GATE_CASES[0][0]  # per-segment costs; cumulative 5, 3, 1 ms: leaving at exit 0 is the dearest
    bundle = tmp_path / "b.eebundle"
    shutil.copytree(trained_dir / kind / "model.eebundle", bundle)
    report = calibrate_bundle(bundle, trained_dir / kind / "cal.npz", max_drop=0.02, costs=[5.0, -2.0, -2.0],
                              quiet=True)
    assert report.deployed and report.drop == 0.0
    assert any("exiting does not pay" in n for n in report.notes), report.notes
    assert all(math.isinf(t) for t in Bundle.load(bundle).manifest.thresholds)


def test_calibrate_measures_latency_writes_plot_and_ltt(trained_dir: Path, tmp_path: Path) -> None:
    import shutil

    from eecompile.bundle import Bundle
    from eecompile.calibrate import calibrate_bundle

    bundle = tmp_path / "b.eebundle"
    shutil.copytree(trained_dir / "max_prob" / "model.eebundle", bundle)
    plot = tmp_path / "pareto.png"
    report = calibrate_bundle(bundle, trained_dir / "max_prob" / "cal_nolabels.npz", max_drop=0.05, method="ltt",
                              delta=0.1, repeats=10, plot=plot, reference_model=trained_dir / "max_prob" / "model.onnx",
                              quiet=True)
    assert report.reference == "final exit" and report.baseline == "unsplit model"
    assert report.certified is not None and report.ltt is not None
    cum = [e["cumulative_ms"] for e in report.exits]
    assert all(c > 0 for c in cum) and cum == sorted(cum)
    assert report.oracle_speedup > 0 and report.expected_speedup > 0
    assert plot.stat().st_size > 1000
    assert Bundle.load(bundle).manifest.calibration["method"] == "ltt"


def test_calibration_data_without_the_model_inputs(trained_dir: Path, tmp_path: Path) -> None:
    from eecompile.calibrate import calibrate_bundle

    p = tmp_path / "bad.npz"
    np.savez(p, images=np.zeros((10, 16), np.float32))
    with pytest.raises(DataError, match="'x'"):
        calibrate_bundle(trained_dir / "max_prob" / "model.eebundle", p, max_drop=0.01, quiet=True)


def test_calibrate_bundle_too_few_samples_for_ltt(trained_dir: Path) -> None:
    from eecompile.calibrate import calibrate_bundle

    with pytest.raises(CalibrationError, match=r"needs at least \d+ calibration samples"):
        calibrate_bundle(trained_dir / "max_prob" / "model.eebundle", trained_dir / "max_prob" / "cal.npz",
                         max_drop=0.001, method="ltt", delta=0.05, quiet=True)


@pytest.mark.parametrize("budget", [0.0, 1.0])
def test_calibrate_bundle_budget_outside(trained_dir: Path, budget: float) -> None:
    from eecompile.calibrate import calibrate_bundle

    with pytest.raises(CalibrationError, match="max-drop"):
        calibrate_bundle(trained_dir / "max_prob" / "model.eebundle", trained_dir / "max_prob" / "cal.npz",
                         max_drop=budget, quiet=True)


def test_calibrate_times_the_chosen_thresholds_on_the_data(trained_dir: Path, tmp_path: Path) -> None:
    """The speedup calibrate reports is the chosen thresholds timed on the calibration data against the unsplit
    model, as `eecompile bench` times a bundle; the cost model's figure is kept beside it."""
    import shutil

    from eecompile.bundle import Bundle
    from eecompile.calibrate import calibrate_bundle

    bundle = tmp_path / "b.eebundle"
    shutil.copytree(trained_dir / "max_prob" / "model.eebundle", bundle)
    report = calibrate_bundle(bundle, trained_dir / "max_prob" / "cal.npz", max_drop=0.05, repeats=10,
                              reference_model=trained_dir / "max_prob" / "model.onnx", quiet=True)
    assert report.deployed and report.measured is not None and not report.measured["never_deployed"]
    m = report.measured
    assert m["speedup"]["rounds"] >= 5 and m["n_batches"] >= 16
    assert report.expected_speedup == m["speedup"]["median"]
    assert m["speedup"]["min"] <= report.expected_speedup <= m["speedup"]["max"]
    assert report.model_speedup and report.model_speedup > 0 and m["chain_ms"] > 0 and m["unsplit_ms"] > 0
    text = "\n".join(report.summary_lines())
    assert "measured on the calibration data" in text and "cost model" in text
    assert Bundle.load(bundle).manifest.calibration["measured"]["speedup"]["median"] == report.expected_speedup


def test_stream_timing_sizes_its_pass_by_the_model(trained_dir: Path) -> None:
    """A pass is about pass_s of the unsplit model: all the rows asked for when calls are cheap, one batch when a
    single call already costs more than 4 x pass_s (a heavy model at a large batch)."""
    import onnxruntime as ort

    from eecompile.calibrate.latency import measure_stream
    from eecompile.runtimes.chain import EarlyExitRunner

    d = trained_dir / "max_prob"
    with np.load(d / "cal.npz") as z:
        inputs = {"x": z["x"]}
    unsplit = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    runner = EarlyExitRunner(d / "model.eebundle")
    try:
        wide = measure_stream(runner, inputs, [0.9, 0.9], unsplit=unsplit, budget_s=0.0, pass_s=10.0, max_batches=40)
        tiny = measure_stream(runner, inputs, [0.9, 0.9], unsplit=unsplit, budget_s=0.0, pass_s=1e-9)
    finally:
        runner.close()
    assert wide.n_batches == 40 and tiny.n_batches == 1
    assert wide.rounds == tiny.rounds == 5  # min_rounds when the budget is spent
    assert wide.speedup is not None and wide.speedup["rounds"] == 5 and wide.unsplit_ms and wide.never_ms > 0


def test_calibrate_sets_never_when_the_chosen_thresholds_measure_slower(trained_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds within budget whose measured run is slower than never exiting are not deployed as they are:
    every gate is set to never, and the report says why with both figures."""
    import shutil

    import eecompile.calibrate as cal
    from eecompile.bundle import Bundle
    from eecompile.calibrate.latency import StreamTiming

    slow = StreamTiming(chain_ms=2.0, never_ms=1.0, unsplit_ms=1.0, speedup={"median": 0.5, "min": 0.4, "max": 0.6,
                        "rounds": 5}, never_speedup={"median": 0.5, "min": 0.4, "max": 0.6, "rounds": 5},
                        n_batches=16, rounds=5)
    seen: list[list[float]] = []
    monkeypatch.setattr(cal, "time_chosen", lambda b, inputs, thresholds, **kw: seen.append(list(thresholds)) or slow)
    bundle = tmp_path / "b.eebundle"
    shutil.copytree(trained_dir / "max_prob" / "model.eebundle", bundle)
    report = cal.calibrate_bundle(bundle, trained_dir / "max_prob" / "cal.npz", max_drop=0.05,
                                  costs=[1.0, 1.0, 4.0], quiet=True)
    assert not seen  # given costs (a replayed measurement): nothing is timed
    report = cal.calibrate_bundle(bundle, trained_dir / "max_prob" / "cal.npz", max_drop=0.05, repeats=5,
                                  reference_model=trained_dir / "max_prob" / "model.onnx", quiet=True)
    assert seen and report.deployed and report.measured is not None and report.measured["never_deployed"]
    assert "every gate never" in "\n".join(report.summary_lines())
    assert report.expected_speedup == 1.0  # what runs now: the never path timed (1.0 ms) against the unsplit (1.0)
    assert all(e["share"] == 0 for e in report.exits[:-1])
    assert any("so every gate is set to never" in n and "0.50x" in n for n in report.notes)
    gates = [s.exit.gate for s in Bundle.load(bundle).manifest.segments if s.exit.gate is not None]
    assert gates and all(float(g.threshold) == math.inf for g in gates)  # max_prob: +inf never fires


def test_source_model_is_used_only_inside_the_bundle(trained_dir: Path, tmp_path: Path) -> None:
    """A manifest's source_model is opened only when it lies inside the bundle (no '..', absolute path or link)."""
    import dataclasses
    import os
    import shutil

    from eecompile.bundle import Bundle, sha256_file
    from eecompile.calibrate import find_source_model

    bundle = tmp_path / "b.eebundle"
    shutil.copytree(trained_dir / "max_prob" / "model.eebundle", bundle)
    outside = trained_dir / "max_prob" / "model.onnx"
    digest = sha256_file(outside)
    b = Bundle.load(bundle)

    def with_source(name: str) -> Bundle:
        return Bundle(bundle, dataclasses.replace(b.manifest, source_model={"file": name, "sha256": digest}))

    assert find_source_model(with_source("model.onnx")) is None  # beside the bundle: not opened
    assert find_source_model(with_source(str(outside))) is None
    assert find_source_model(with_source("../../max_prob/model.onnx")) is None
    shutil.copy(outside, bundle / "source.onnx")
    assert find_source_model(with_source("source.onnx")) == bundle / "source.onnx"
    assert find_source_model(Bundle(bundle, dataclasses.replace(b.manifest, source_model={
        "file": "source.onnx", "sha256": "0" * 64}))) is None  # changed since compile
    os.symlink(outside, bundle / "link.onnx")
    assert find_source_model(with_source("link.onnx")) is None


def test_calibrated_bound_holds_on_new_data(trained_dir: Path, tmp_path: Path) -> None:
    """End to end: the drop on 4000 unseen samples stays within the budget the search bounded."""
    import shutil

    import eecompile
    from eecompile.calibrate import calibrate_bundle
    from tests.test_train import blobs

    bundle = tmp_path / "b.eebundle"
    shutil.copytree(trained_dir / "max_prob" / "model.eebundle", bundle)
    report = calibrate_bundle(bundle, trained_dir / "max_prob" / "cal.npz", max_drop=0.05, confidence=0.95,
                              costs=[1.0, 1.0, 4.0], quiet=True)
    assert report.deployed and report.drop_upper is not None and report.drop_upper <= 0.05
    assert report.expected_speedup > 1.2  # it does let samples exit
    x, y = blobs(4000, seed=99)
    runner = eecompile.load(bundle)
    chain = runner.run({"x": x}).outputs["logits"].argmax(1)
    full = runner.run({"x": x}, thresholds="never").outputs["logits"].argmax(1)
    assert (full == y).mean() - (chain == y).mean() <= 0.05
    assert ((full == y) & (chain != y)).mean() <= report.drop_upper + 0.01  # the loss bound, up to test noise


def test_calibrate_cli_leaves_the_bundle_and_fails_when_the_budget_needs_more_samples(
        trained_dir: Path, tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from eecompile.cli import cli

    bundle = tmp_path / "b.eebundle"
    shutil.copytree(trained_dir / "max_prob" / "model.eebundle", bundle)
    before = {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    for method in ("search", "ltt"):
        res = CliRunner().invoke(cli, ["calibrate", str(bundle), "--data", str(trained_dir / "max_prob" / "cal.npz"),
                                       "--max-drop", "0.002", "--method", method, "--confidence", "0.9"])
        assert res.exit_code == 1, res.output
        assert "1151" in res.output  # log(0.1) / log(1 - 0.002): samples for zero errors (ltt: / 0.7)
        assert {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_confidence_and_delta_must_agree(trained_dir: Path) -> None:
    from eecompile.calibrate import calibrate_bundle

    with pytest.raises(CalibrationError, match="disagree"):
        calibrate_bundle(trained_dir / "max_prob" / "model.eebundle", trained_dir / "max_prob" / "cal.npz",
                         max_drop=0.05, confidence=0.9, delta=0.05, quiet=True)
    with pytest.raises(CalibrationError, match=r"confidence must be in \(0, 1\)"):
        calibrate_bundle(trained_dir / "max_prob" / "model.eebundle", trained_dir / "max_prob" / "cal.npz",
                         max_drop=0.05, confidence=1.0, quiet=True)


def test_time_interleaved_rounds_take_turns() -> None:
    from eecompile.calibrate import time_interleaved

    order: list[int] = []
    calls = [lambda i=i: order.append(i) for i in range(3)]
    med = time_interleaved(calls, rounds=9, warmup=1, min_block_s=0.0, warm_per_block=0)
    assert len(med) == 3 and all(m > 0 for m in med)
    timed = order[3 * 2:]  # after each call's warm-up and single timing
    assert len(timed) == 27
    firsts = [timed[3 * r] for r in range(9)]
    assert firsts[:3] == [0, 1, 2]  # the order rotates from round to round
    assert sorted(timed[:3]) == [0, 1, 2]
    paired = time_interleaved(calls, rounds=7, warmup=1, reference=2)
    assert len(paired) == 3 and all(m > 0 for m in paired)
    # By default every block starts with an untimed call: the block times the callable warm, not the first call
    # after another one evicted its data from the caches.
    order.clear()
    time_interleaved(calls, rounds=4, warmup=1, min_block_s=0.0)
    blocks = order[3 * 2:]
    assert len(blocks) == 4 * 3 * 2 and all(blocks[i] == blocks[i + 1] for i in range(0, len(blocks), 2))


def test_paired_blocks_warm_each_block_untimed() -> None:
    """before_block runs before each of its function's blocks, outside the timed span (bench and calibrate's
    measured pass use it so a block does not pay for the other functions having flushed the caches)."""
    import time as _time

    from eecompile.runtimes.bench import paired_blocks

    order: list[str] = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    slow = {"a": lambda: (order.append("warm-a"), _time.sleep(0.02))}
    out = paired_blocks(fns, calls=2, rounds=3, warmup=0, before_block=slow)
    assert order == ["warm-a", "a", "a", "b", "b", "b", "b", "warm-a", "a", "a", "warm-a", "a", "a", "b", "b"]
    assert max(out["a"].wall) < 0.01  # the 20 ms warm-up is not in the block's time


def test_stratified_rows_keep_the_exit_mix() -> None:
    """The pass that times chosen thresholds (calibrate) or a bundle (bench) has the whole data's exit shares,
    every exit taken keeps a row, and the rows are distinct and seeded."""
    from eecompile.runtimes.bench import stratified_rows

    exits = np.array([0] * 770 + [1] * 140 + [2] * 50 + [3] * 40)
    rows = stratified_rows(exits, 100, seed=3)
    assert rows.size == 100 and np.unique(rows).size == 100
    assert np.bincount(exits[rows], minlength=4).tolist() == [77, 14, 5, 4]
    assert rows.tolist() == stratified_rows(exits, 100, seed=3).tolist()
    rare = np.array([0] * 999 + [3])
    assert 3 in rare[stratified_rows(rare, 10)]  # a rare deep exit keeps one row
    assert sorted(stratified_rows(exits[:50], 80).tolist()) == list(range(50))  # fewer rows than asked: all


def test_exit_table_of_a_time_major_model(tmp_path: Path) -> None:
    """Outputs [T, B, C] (batch on axis 1): one column per sample, correct only when every time step agrees."""
    import yaml

    import eecompile
    from eecompile.calibrate import collect_exit_table
    from tests.graphs.test_batch_axes import _time_major

    _time_major(tmp_path / "model.onnx")
    spec = {"model": "model.onnx", "exits": [{"at": "r", "head": {"output": "aux"},
                                               "gate": {"kind": "max_prob", "threshold": 0.5}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    bundle = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle")
    x = np.random.default_rng(1).standard_normal((9, 4, 6)).astype(np.float32)
    table = collect_exit_table(bundle, {"x": x}, None, batch_size=4, quiet=True)
    assert table.scores.shape == (1, 9) and table.correct.shape == (2, 9)
    res = eecompile.load(bundle).run({"x": x}, thresholds="never", policy="never")
    assert res.all_exits is not None and res.gate_scores is not None
    early, final = (a["y"].argmax(-1) for a in res.all_exits)  # [T, B]
    assert table.correct[0].tolist() == (early == final).all(axis=0).tolist()
    np.testing.assert_allclose(table.scores[0], res.gate_scores[0])


def _q_exit_table(n: int, rng: np.random.Generator) -> ExitTable:
    """Q-exit scores: the cumulative halting probability, non-decreasing over exits; a shared threshold."""
    base = synthetic(n, rng, labels=False)
    lam = np.clip(base.scores, 0, 1)
    scores = 1 - np.cumprod(1 - lam, axis=0)
    return ExitTable(scores, base.correct, [True, True, True], shared=True)


@pytest.mark.parametrize("method", ["search", "ltt"])
def test_shared_threshold_searches_move_every_exit_together(method: str) -> None:
    from eecompile.calibrate import bounded_search, threshold_path

    table = _q_exit_table(3000, np.random.default_rng(5))
    if method == "search":
        thr = bounded_search(table, COSTS, 0.05, 0.95).thresholds
    else:
        res = ltt_thresholds(table, COSTS, 0.05, 0.05)
        assert res.certified
        thr = res.thresholds
        path = threshold_path(table.subset(np.arange(1000)), COSTS)
        assert path and all(len(set(p)) == 1 for p in path)
        assert all(a[0] >= b[0] for a, b in zip(path, path[1:], strict=False))  # strict to loose
    assert len(set(thr)) == 1 and math.isfinite(thr[0]), thr
    assert evaluate(table, thr, COSTS).expected_cost < COSTS[-1]
    # search_thresholds on a shared table: the cheapest shared candidate within the empirical budget.
    from eecompile.calibrate.search import shared_candidates

    best = search_thresholds(table, COSTS, 0.05)
    feasible = [evaluate(table, [t] * 3, COSTS) for t in shared_candidates(table)]
    cheapest = min(ev.expected_cost for ev in feasible if ev.drop <= 0.05)
    assert evaluate(table, best, COSTS).expected_cost == pytest.approx(cheapest)
