"""`eecompile calibrate` on a decoder bundle: speculative per batch size, exit mode by Learn-then-Test, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from eecompile.bundle import Bundle
from eecompile.cli import cli
from eecompile.decoder.calibrate import default_prompts, read_prompts
from eecompile.errors import DataError
from eecompile.runtimes.lm import DecoderRunner

PROMPTS = "The cat\nA longer prompt here\n\nimport os\\nimport sys\n"


@pytest.fixture()
def bundle(lm_bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "b.eebundle"
    shutil.copytree(lm_bundle, dest)
    return dest


@pytest.fixture()
def tiny_bundle_single_pass(tmp_path: Path) -> Path:
    import yaml

    import eecompile
    from tests.graphs.test_batch_axes import _time_major

    _time_major(tmp_path / "model.onnx")
    spec = {"model": "model.onnx", "exits": [{"at": "r", "head": {"output": "aux"},
                                               "gate": {"kind": "max_prob", "threshold": 0.5}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "single.eebundle").path


def _calibrate(*args: str, threads: bool = True) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["calibrate", *args, *(["--threads", "1"] if threads else [])])
    return res.exit_code, res.output


def test_speculative_takes_several_batch_sizes_after_one_flag(bundle: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    code, out = _calibrate(str(bundle), "--batch", "1", "2", "--tokens", "6", "--thresholds", "0.0,0.3",
                           "--draft-tokens", "2,3", "--min-speedup", "0", "--prompts", str(prompts))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["batch", "drafting", "speedup"]
    assert [ln.split()[0] for ln in lines[2:4]] == ["1", "2"]
    cal = Bundle.load(bundle).manifest.decoder["calibration"]["speculative"]  # type: ignore[index]
    assert set(cal) == {"1", "2"}
    for e in cal.values():  # min speedup 0: drafting is on, with a (threshold, k) of the grid
        assert e["threshold"] in (0.0, 0.3) and e["draft_tokens"] in (2, 3)
        assert len(e["grid"]) == 4 and e["r"] > 0 and e["g"] > 0
    # generate uses the entry for its batch size, and stays lossless
    r = DecoderRunner(bundle, threads=1)
    rows = read_prompts(prompts)
    plain = r.generate(rows, 8, batch=2)
    spec = r.generate(rows, 8, mode="speculative", batch=2)
    assert spec.stats["rounds"] > 0
    assert [x["token_ids"] for x in spec.results] == [x["token_ids"] for x in plain.results]


def test_speculative_falls_back_to_plain_decoding_where_drafting_does_not_pay(bundle: Path) -> None:
    code, out = _calibrate(str(bundle), "--batch", "1", "--batch", "3", "--tokens", "4", "--thresholds", "0.3",
                           "--draft-tokens", "2", "--min-speedup", "1e9")
    assert code == 0, out
    assert [ln.split()[1] for ln in out.splitlines()[2:4]] == ["off", "off"]
    cal = Bundle.load(bundle).manifest.decoder["calibration"]["speculative"]  # type: ignore[index]
    assert cal["1"]["off"] is True and cal["3"]["off"] is True
    res = DecoderRunner(bundle, threads=1).generate([[5, 17, 33]], 6, mode="speculative")
    assert res.stats.get("drafting_off") is True


def test_exit_mode_certifies_a_token_disagreement_budget(bundle: Path) -> None:
    code, out = _calibrate(str(bundle), "--max-disagreement", "0.2", "--delta", "0.1", "--tokens", "12",
                           "--batch", "1", "3", "--rounds", "2", "--min-speedup", "0")
    assert code == 0, out
    assert "certified: token disagreement <= 0.2 with probability >= 0.9" in out
    assert "after layer 1" in out
    rec = Bundle.load(bundle).manifest.decoder["calibration"]["exit"]  # type: ignore[index]
    assert rec["certified"] and rec["positions"] == len(default_prompts(24)) * 12
    assert rec["test_disagreement"] <= 0.2
    # per batch size: exits on (a minimum speedup of 0), two paired rounds each, shown in the report's table
    assert set(rec["batches"]) == {"1", "3"}
    assert all("off" not in e and len(e["speedup_rounds"]) == 2 for e in rec["batches"].values())
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["batch", "exits"])
    assert [ln.split()[:3] for ln in lines[head + 2:head + 4]] == [["1", "exits", "on"], ["3", "exits", "on"]]


def test_uncertified_budget_leaves_the_bundle_unchanged(bundle: Path) -> None:
    before = (bundle / "manifest.yaml").read_bytes()
    # 96 positions: enough test positions for a 5% budget only if the strictest exit setting made no error; the
    # untrained exit (it disagrees with the final layer on most positions) makes one: nothing is certified
    code, out = _calibrate(str(bundle), "--mode", "exit", "--max-drop", "0.05", "--tokens", "4")
    assert code == 1
    assert "no exit thresholds certify a token disagreement <= 0.05" in out and "bundle is unchanged" in out
    assert len(out.strip().splitlines()) == 1
    assert (bundle / "manifest.yaml").read_bytes() == before


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "x.npz"], "--data: not used for a decoder bundle"),
    (["--mode", "exit"], "Missing option '--max-disagreement'"),
    (["--max-disagreement", "0.1", "--thresholds", "0.3"], "--thresholds: only for --mode speculative"),
    (["--mode", "speculative", "--delta", "0.1"], "--delta: only for --mode exit"),
    (["--thresholds", "0.3,x"], "give comma-separated numbers"),
    (["--draft-tokens", "2.5"], "k is a whole number"),
])
def test_bad_options_are_usage_errors(bundle: Path, args: list[str], message: str) -> None:
    before = (bundle / "manifest.yaml").read_bytes()
    code, out = _calibrate(str(bundle), *args)
    assert code == 2 and message in out
    assert (bundle / "manifest.yaml").read_bytes() == before


def test_prompts_file_errors(bundle: Path, tmp_path: Path) -> None:
    code, out = _calibrate(str(bundle), "--prompts", str(tmp_path / "missing.txt"))
    assert code == 1 and "missing.txt: prompts file not found" in out
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(blank)
    assert read_prompts(_write(tmp_path / "p.txt", PROMPTS)) == ["The cat", "A longer prompt here",
                                                                "import os\nimport sys"]


def test_decoder_options_on_a_single_pass_bundle_are_refused(tiny_bundle_single_pass: Path) -> None:
    code, out = _calibrate(str(tiny_bundle_single_pass), "--data", "x.npz", "--max-drop", "0.1", "--mode", "exit")
    assert code == 2 and "--mode, --threads: only for decoder bundles" in out
    code, out = _calibrate(str(tiny_bundle_single_pass), "--data", "x.npz", "--max-drop", "0.1", "--batch", "1", "4",
                           threads=False)
    assert code == 2 and "one batch size" in out


def test_default_prompts_are_offline_and_not_the_training_text() -> None:
    from eecompile.decoder.train import default_corpus

    prompts = default_prompts(24)
    assert len(prompts) == len(set(prompts)) == 24
    corpus = " ".join(" ".join(t.split()) for t in default_corpus())
    assert not any(p in corpus for p in prompts[8:])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("mode", [["--batch", "1", "--thresholds", "0.5", "--draft-tokens", "2"],
                                  ["--max-disagreement", "0.3"]])
def test_a_prompt_that_does_not_fit_names_it_and_tokens(bundle: Path, tmp_path: Path, mode: list[str]) -> None:
    """A prompt too long for the cache (96 positions) was refused as "prompts[0]: 120 tokens + max_new_tokens 2
    exceed the cache" in speculative mode: neither the option (--tokens) nor its value (8; 2 was a warm-up's)."""
    before = (bundle / "manifest.yaml").read_bytes()
    code, out = _calibrate(str(bundle), *mode, "--tokens", "8", "--prompts",
                           str(_write(tmp_path / "p.txt", "short one\n" + "x" * 120)))
    said = " ".join(out.split())
    assert code == 1 and "calibration prompt 2 ('xxxxxxxx" in said and "120 tokens + --tokens 8 exceed the cache" \
        " (96 positions)" in said, out
    assert (bundle / "manifest.yaml").read_bytes() == before
