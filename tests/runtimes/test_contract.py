"""The runtime's one contract: thresholds per gate kind, extra outputs, on_exit, closed runners, session options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from eecompile import names
from eecompile.bundle import GateInfo
from eecompile.errors import BackendError, DataError, SpecError, ThresholdError
from eecompile.runtimes.base import POLICIES, GateSetting, check_threshold, resolve_thresholds
from eecompile.runtimes.chain import EarlyExitRunner
from eecompile.runtimes.onnxruntime import with_extra_outputs
from eecompile.runtimes.sessions import session_options
from eecompile.spec import parse_spec
from tests.runtimes.handmade import Handmade, make_bundle

N = 40


@pytest.fixture(scope="module")
def hm(tmp_path_factory: pytest.TempPathFactory) -> Handmade:
    return make_bundle(tmp_path_factory.mktemp("hm") / "b.eebundle")


def _gates(*kinds: str, threshold: float = 0.5) -> list[GateInfo]:
    return [GateInfo(kind, threshold, f"ee{k}.gate", f"ee{k}.threshold") for k, kind in enumerate(kinds)]


# ------------------------------------------------------------------------------------------- thresholds


def test_scalar_sequence_strings_and_none_entries() -> None:
    g = _gates("max_prob", "entropy", threshold=0.4)
    assert resolve_thresholds(g, 0.5).as_list() == [0.5, 0.5]
    assert resolve_thresholds(g, np.float32(0.25)).as_list() == [0.25, 0.25]
    assert resolve_thresholds(g, [None, "0.3"]).as_list() == [0.4, 0.3]  # None: the bundle's own
    assert resolve_thresholds(g, np.array([0.1, 0.2])).as_list() == [pytest.approx(0.1), pytest.approx(0.2)]
    r = resolve_thresholds(g, ["always", "never"])
    assert r[0] == GateSetting(0.4, "always") and r[1] == GateSetting(0.4, "never") and not r.all_never
    assert resolve_thresholds(g, "never").all_never
    assert resolve_thresholds(g, r) is r


@pytest.mark.parametrize(("kind", "value", "message"), [
    ("max_prob", -0.5, r"outside \[0, 1\] for gate kind 'max_prob'"),
    ("max_prob", 2.0, r"outside \[0, 1\]"),
    ("margin", 1.5, r"outside \[0, 1\]"),
    ("entropy", -0.1, r"outside \[0, 1\]"),
    ("entropy", math.inf, r"outside \[0, 1\]"),  # entropy fires below: +inf would fire always
    ("max_prob", -math.inf, r"outside \[0, 1\]"),
    ("patience", 0, r"outside \[1, inf\]"),
    ("patience", 2.5, "positive integer"),
    ("score", math.nan, "NaN"),
    ("saturation", -math.inf, "the finite numbers and \\+inf"),
])
def test_range_per_gate_kind(kind: str, value: float, message: str) -> None:
    with pytest.raises(ThresholdError, match=message) as e:
        resolve_thresholds(_gates(kind, "max_prob"), [value, 0.5])
    assert "thresholds[0]" in str(e.value)
    assert isinstance(e.value, SpecError) and isinstance(e.value, DataError)  # old catch-sites keep working


@pytest.mark.parametrize(("kind", "value"), [("max_prob", 1.0), ("max_prob", 0.0), ("entropy", -math.inf),
                                             ("max_prob", math.inf), ("patience", 3), ("score", -1e30),
                                             ("saturation", 0.99)])
def test_accepted_per_gate_kind(kind: str, value: float) -> None:
    assert resolve_thresholds(_gates(kind), [value]).as_list() == [float(value)]


PROBES = (-math.inf, -1e7, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 1e6, 1e7, math.inf, math.nan)
LOOP_GATE_NEEDS = {"logit_gap": {"logits": "y", "tokens": "x", "mask_id": 0}, "change": {"of": "y"},
                   "score": {"output": "y"}}


def _spec_accepts(kind: str, value: float, loop: bool) -> bool:
    """Whether a spec with this gate (an exit's, or the loop's) and threshold parses."""
    if loop:
        doc = {"model": "m.onnx", "loop": {"feedback": {"y": "x"}, "steps": 4,
                                           "gate": {"kind": kind, "threshold": value, **LOOP_GATE_NEEDS[kind]}}}
    else:
        doc = {"model": "m.onnx", "exits": [{"at": "h", "head": "h.onnx", "gate": {"kind": kind, "threshold": value}}]}
    try:
        parse_spec(yaml.safe_dump(doc))
    except SpecError as e:
        assert "threshold" in str(e), e  # refused for its threshold, not for the spec around it
        return False
    return True


def _runtime_accepts(kind: str, value: float) -> bool:
    """Whether the runtime takes the threshold: ``resolve_thresholds`` for exits (given at run time or read from a
    manifest) and ``LoopRunner`` for the loop gate both go through ``check_threshold``."""
    try:
        check_threshold(kind, value, "t")
    except ThresholdError:
        return False
    return True


@pytest.mark.parametrize(("kind", "loop"), [(k, False) for k in names.GATE_KINDS]
                         + [(k, True) for k in names.LOOP_GATE_KINDS])
def test_the_spec_and_the_runtime_accept_the_same_thresholds(kind: str, loop: bool) -> None:
    """Every exit and loop gate kind, from -inf to +inf and NaN: a threshold the spec takes, the runtime takes, and
    the other way round (the spec once took +inf for ``change`` and the runtime refused it at run time; the runtime
    took a negative ``logit_gap`` the spec refuses)."""
    spec = [_spec_accepts(kind, v, loop) for v in PROBES]
    runtime = [_runtime_accepts(kind, v) for v in PROBES]
    assert spec == runtime, [(v, s, r) for v, s, r in zip(PROBES, spec, runtime, strict=True) if s != r]
    if not loop:
        gate_runtime = []
        for v in PROBES:
            try:
                resolve_thresholds(_gates(kind), [v])
                gate_runtime.append(True)
            except ThresholdError:
                gate_runtime.append(False)
        assert gate_runtime == runtime
    assert not runtime[PROBES.index(math.nan)]


@pytest.mark.parametrize(("kind", "accepted", "refused"), [
    ("change", [0.0, 2.5, math.inf, -math.inf], [-0.5]),  # +inf fires on every finite change; -inf never fires
    ("logit_gap", [0.0, 4.0, math.inf], [-0.5, -math.inf]),
    ("score", [-1e7, 1e7, math.inf], [-math.inf]),
    ("patience", [1.0, 2.0, math.inf], [0.0, 2.5]),
    ("max_prob", [0.0, 1.0, math.inf], [1.5, -math.inf]),
    ("entropy", [0.0, 1.0, -math.inf], [1.5, math.inf]),
])
def test_threshold_ranges_of_the_loop_and_exit_gates(kind: str, accepted: list[float], refused: list[float]) -> None:
    assert all(_runtime_accepts(kind, v) for v in accepted)
    assert not any(_runtime_accepts(kind, v) for v in refused)


@pytest.mark.parametrize("bad", [True, {"a": 1}, object(), [[0.5]], ["sometimes"], [0.5, 0.5, 0.5]])
def test_malformed_thresholds_are_one_clear_error(bad: object) -> None:
    with pytest.raises(ThresholdError, match="thresholds"):
        resolve_thresholds(_gates("max_prob", "max_prob"), bad)  # type: ignore[arg-type]


def test_the_runner_checks_thresholds_once_per_gate_kind(hm: Handmade) -> None:
    with EarlyExitRunner(hm.path, threads=1) as r:
        feeds = hm.inputs(N)
        with pytest.raises(ThresholdError, match="outside"):
            r.run(feeds, thresholds=[-0.5, 0.5])
        resolved = r.resolve([0.6, 0.7])
        np.testing.assert_array_equal(r.run(feeds, thresholds=resolved).exit_index,
                                      r.run(feeds, thresholds=[0.6, 0.7]).exit_index)
        assert r.run(feeds, thresholds=0.0).exit_counts.tolist() == [N, 0, 0]  # scalar: every early exit
    assert POLICIES == ("compact", "wait-all", "never")


def test_no_gate_can_fire_per_gate_kind() -> None:
    """``none_fires``: every gate "never", or a threshold no score of its kind reaches (the no-exit path's test)."""
    kinds = ("max_prob", "entropy", "margin", "patience", "saturation")
    inf = math.inf
    assert resolve_thresholds(_gates(*kinds), "never").none_fires
    assert resolve_thresholds(_gates(*kinds), [inf, -inf, inf, inf, inf]).none_fires
    assert resolve_thresholds(_gates(*kinds), ["never", -inf, "never", inf, "never"]).none_fires
    assert not resolve_thresholds(_gates(*kinds), [inf, -inf, inf, inf, 0.9]).none_fires
    assert not resolve_thresholds(_gates("max_prob", "max_prob"), ["never", "always"]).none_fires
    assert not resolve_thresholds(_gates("max_prob"), None).none_fires
    assert resolve_thresholds(_gates("max_prob", threshold=inf), None).none_fires  # calibrate's "never exit here"
    # A score gate's score is a head's raw output: +inf is not "never" there (only the override is).
    assert not resolve_thresholds(_gates("score"), inf).none_fires
    assert resolve_thresholds(_gates("score"), "never").none_fires


def test_thresholds_are_parsed_once_per_distinct_value(hm: Handmade, monkeypatch: pytest.MonkeyPatch) -> None:
    import eecompile.runtimes.chain as chain

    calls: list[object] = []
    real = chain.resolve_thresholds
    monkeypatch.setattr(chain, "resolve_thresholds", lambda e, t: calls.append(t) or real(e, t))
    with EarlyExitRunner(hm.path, threads=1) as r:
        a = r.resolve([0.6, 0.7])
        assert r.resolve([0.6, 0.7]) is a and r.resolve((0.6, 0.7)) is a and len(calls) == 1
        assert r.resolve([0.6, "never"]) is not a and len(calls) == 2
        assert r.resolve(1).as_list() == [1.0, 1.0]
        with pytest.raises(ThresholdError):  # True == 1 as a dict key, but only numbers are thresholds
            r.resolve(True)
        with pytest.raises(ThresholdError):
            r.resolve([math.nan, 0.5])
        with pytest.raises(ThresholdError):
            r.resolve([math.nan, 0.5])  # NaN is never a cache hit
        assert r.resolve(np.array([0.6, 0.7])).as_list() == [0.6, 0.7]  # unhashable: parsed each time


# ------------------------------------------------------------------------------------------- extra outputs


def test_extra_outputs_per_run_and_exposed_up_front(hm: Handmade) -> None:
    feeds = hm.inputs(N)
    with EarlyExitRunner(hm.path, threads=1) as r:
        res = r.run(feeds, policy="never", extra_outputs={0: ["pre0", "h0"], 1: ["u"]})
        assert set(res.extra) == {0, 1} and set(res.extra[0]) == {"pre0", "h0"}
        np.testing.assert_allclose(res.extra[0]["h0"], np.maximum(res.extra[0]["pre0"], 0), rtol=0, atol=0)
        assert res.extra[1]["u"].shape == (N, 8)
        plain = r.run(feeds, policy="never")  # sessions with extra outputs give the same answers
        np.testing.assert_array_equal(plain.exit_index, res.exit_index)
        with pytest.raises(SpecError, match="policy 'never'"):
            r.run(feeds, extra_outputs={0: ["h0"]})
        with pytest.raises(BackendError, match="no_such_tensor"):
            r.run(feeds, policy="never", extra_outputs={0: ["no_such_tensor"]})
        with pytest.raises(SpecError, match="segment 7"):
            r.run(feeds, policy="never", extra_outputs={7: ["h0"]})
    with EarlyExitRunner(hm.path, threads=1, expose={0: ["pre0"]}) as r:
        res2 = r.run(feeds, policy="never", extra_outputs={0: ["pre0"]})
        np.testing.assert_allclose(res2.extra[0]["pre0"], res.extra[0]["pre0"], rtol=1e-6)


def test_extra_outputs_of_a_per_sample_bundle_stay_in_input_order(tmp_path_factory: pytest.TempPathFactory) -> None:
    hm1 = make_bundle(tmp_path_factory.mktemp("ps") / "b.eebundle", per_sample=True)
    feeds = hm1.inputs(5)
    with EarlyExitRunner(hm1.path, threads=1) as r:
        res = r.run(feeds, policy="never", extra_outputs={0: ["h0"]})
        one = r.run({k: v[3:4] for k, v in feeds.items()}, policy="never", extra_outputs={0: ["h0"]})
    assert res.extra[0]["h0"].shape[0] == 5
    np.testing.assert_allclose(res.extra[0]["h0"][3:4], one.extra[0]["h0"])


def test_appended_outputs_are_a_valid_model(hm: Handmade) -> None:
    import onnx

    raw = (hm.path / "segments/seg0.onnx").read_bytes()
    model = onnx.ModelProto.FromString(with_extra_outputs(raw, ["pre0", "mm0"]))
    assert [o.name for o in model.graph.output][-2:] == ["pre0", "mm0"]
    assert len(model.graph.node) == len(onnx.ModelProto.FromString(raw).graph.node)


# ------------------------------------------------------------------------------------------- on_exit, close


@pytest.mark.parametrize("policy", ["compact", "wait-all"])
def test_on_exit_reports_rows_as_they_leave(hm: Handmade, policy: str) -> None:
    feeds = hm.inputs(N)
    seen: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []
    with EarlyExitRunner(hm.path, threads=1) as r:
        res = r.run(feeds, thresholds=[0.6, 0.7], policy=policy,
                    on_exit=lambda k, rows, outs: seen.append((k, rows.copy(), outs)))
    rows_all = np.concatenate([rows for _, rows, _ in seen])
    assert sorted(rows_all.tolist()) == list(range(N))  # every row reported once
    for k, rows, outs in seen:
        assert (res.exit_index[rows] == k).all()
        np.testing.assert_array_equal(outs["logits"], res.outputs["logits"][rows])


def test_a_closed_runner_says_so(hm: Handmade) -> None:
    r = EarlyExitRunner(hm.path, threads=1)
    r.close()
    assert r.closed
    with pytest.raises(BackendError, match="closed"):
        r.run(hm.inputs(2))
    with pytest.raises(BackendError, match="closed"):
        r.backend.run_segment(0, {"x": hm.inputs(2)["x"]}, 0.5)


# ------------------------------------------------------------------------------------------- sessions


def test_session_options_factory() -> None:
    import onnxruntime as ort

    so = session_options(3, optimization="basic", disabled_optimizers=("SkipLayerNormFusion",))
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("optimization.disable_specified_optimizers") == "SkipLayerNormFusion"
    assert session_options(0).intra_op_num_threads == 0  # ONNX Runtime's own default
    with pytest.raises(BackendError, match="optimization 'fast'"):
        session_options(1, optimization="fast")
