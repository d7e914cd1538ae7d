"""The matched-budget study pairs runs with the baseline by seed and reports mean ± standard error."""

from __future__ import annotations

import json

import pytest
import yaml

from clbench.analyze import main
from clbench.errors import ConfigError
from clbench.studies.budget import collect


def write_run(root, name, seed, bwt, diagonal, strategy, removed=None, status="complete", model=None, op=0.5):
    folder = root / "runs" / f"{name}-seed{seed}"
    (folder / "importance").mkdir(parents=True)
    n = len(diagonal)
    matrix = [[None] * n] + [[d if j == i else None for j in range(n)] for i, d in enumerate(diagonal)]
    results = {"status": status, "tasks": [f"t{i}" for i in range(n)], "matrix": matrix}
    results["summary"] = {"OP": op, "BWT_TRACE": bwt}
    (folder / "results.json").write_text(json.dumps(results))
    config = {"seed_everything": seed, "strategy": strategy, "model": model or {"lr": 5e-5}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if removed is not None:
        gates = {f"t{i + 1}": {"update_mass_removed": r} for i, r in enumerate(removed)}
        (folder / "importance" / "gate.json").write_text(json.dumps(gates))


def attribution(estimator, q):
    return {
        "class_path": "strategies.attribution.Attribution",
        "init_args": {"estimator": estimator, "budget": q},
    }


def test_runs_are_paired_by_seed_and_summarised(tmp_path):
    for seed, bwt in ((1, -0.10), (2, -0.20)):
        write_run(tmp_path, "seqft", seed, bwt, [0.8, 0.6], {"class_path": "strategies.seqft.SeqFT"})
    write_run(tmp_path, "lrp-q20", 1, -0.05, [0.7, 0.6], attribution("lrp", 0.2), removed=[0.2, 0.3])
    write_run(tmp_path, "lrp-q20", 2, -0.20, [0.8, 0.5], attribution("lrp", 0.2), removed=[0.1, 0.2])
    write_run(tmp_path, "lrp-q50", 3, 0.0, [0.5, 0.5], attribution("lrp", 0.5))  # no seqft of seed 3
    write_run(tmp_path, "random-q20", 1, -0.1, [0.8, 0.6], attribution("random", 0.2), status="running")
    study = collect(tmp_path)
    assert set(study) == {("lrp", 0.2), ("baseline", 0.0)}  # unpaired and unfinished runs left out
    cell = study[("lrp", 0.2)]
    assert cell["seeds"] == [1, 2]
    mean, se = cell["d_bwt"]  # paired differences +0.05 and 0.00
    assert mean == pytest.approx(0.025) and se == pytest.approx(0.025)
    assert cell["removed"][0] == pytest.approx((0.25 + 0.15) / 2)
    assert cell["d_own"][0] == pytest.approx(((0.65 - 0.7) + (0.65 - 0.7)) / 2)
    assert study[("baseline", 0.0)]["bwt"] == pytest.approx((-0.15, 0.05))  # sample std 0.0707 / sqrt(2)


def test_cli_writes_table_and_plot_and_refuses_a_folder_without_baseline(tmp_path):
    write_run(tmp_path, "seqft", 1, -0.1, [0.8, 0.6], {"class_path": "strategies.seqft.SeqFT"})
    write_run(tmp_path, "magnitude-q05", 1, -0.08, [0.8, 0.6], attribution("magnitude", 0.05), removed=[0.05])
    main(["budget", str(tmp_path)])
    assert "| magnitude | 0.05 | 1 |" in (tmp_path / "budget_study.md").read_text()
    assert (tmp_path / "budget_study.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="no finished other run"):
        main(["budget", str(tmp_path), "--baseline", "other"])


def test_folders_are_read_together_and_each_source_is_paired_with_random_at_its_budget(tmp_path):
    """The matched control: LRP minus random at the same q on the same seeds, from a study split over
    two folders; a seed random did not run is left out of that pairing only."""
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, bwt in ((1, -0.10), (2, -0.20), (3, -0.15)):
        write_run(b, "seqft", seed, bwt, [0.8, 0.6], {"class_path": "strategies.seqft.SeqFT"})
    for seed, bwt in ((1, -0.04), (2, -0.16), (3, -0.15)):
        write_run(a, "lrp-q20", seed, bwt, [0.7, 0.6], attribution("lrp", 0.2))
    for seed, bwt in ((1, -0.08), (2, -0.17)):
        write_run(a, "random-q20", seed, bwt, [0.8, 0.6], attribution("random", 0.2))
    write_run(a, "random-q50", 1, -0.05, [0.6, 0.6], attribution("random", 0.5))
    study = collect([a, b])
    lrp = study[("lrp", 0.2)]
    assert lrp["n"] == 3 and lrp["vs_random"]["n"] == 2
    mean, se = lrp["vs_random"]["d_bwt"]  # +0.04 and +0.01
    assert mean == pytest.approx(0.025) and se == pytest.approx(0.015)
    assert lrp["vs_random"]["d_own"][0] == pytest.approx(-0.05)
    assert study[("random", 0.2)]["vs_random"] is None
    main(["budget", str(a), str(b), "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "budget_study.md").read_text()
    assert "| lrp | 0.2 | 3 |" in table and "+0.025 ± 0.015" in table
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| ") and "0." in line]
    assert rows == [["| lrp", "0.2"], ["| random", "0.2"], ["| random", "0.5"]]  # by q, then source
    assert not (a / "budget_study.md").exists()


def test_lrp_is_paired_against_each_cheaper_source_at_its_budget(tmp_path):
    """Does attribution choose better than gradient x weight? LRP minus the source, seed by seed;
    random is the matched control (its own column), so it gets no LRP row."""
    for seed in (1, 2, 3):
        write_run(tmp_path, "seqft", seed, -0.2, [0.8, 0.6], {"class_path": "strategies.seqft.SeqFT"})
    for seed, bwt, op in ((1, -0.05, 0.50), (2, -0.10, 0.40)):
        write_run(tmp_path, "lrp-q20", seed, bwt, [0.7, 0.6], attribution("lrp", 0.2), op=op)
    for seed, bwt, op in ((1, -0.08, 0.45), (2, -0.09, 0.42), (3, -0.10, 0.40)):
        write_run(tmp_path, "gxw-q20", seed, bwt, [0.8, 0.6], attribution("grad_x_weight", 0.2), op=op)
    write_run(tmp_path, "random-q20", 1, -0.15, [0.8, 0.6], attribution("random", 0.2))
    write_run(tmp_path, "gxw-q05", 1, -0.15, [0.8, 0.6], attribution("grad_x_weight", 0.05))
    study = collect(tmp_path)
    vs = study[("grad_x_weight", 0.2)]["lrp_vs"]
    assert vs["n"] == 2  # seed 3 has no LRP run
    assert vs["d_bwt"][0] == pytest.approx((0.03 - 0.01) / 2)  # LRP minus gxw: +0.03, -0.01
    assert vs["d_op"][0] == pytest.approx((0.05 - 0.02) / 2)
    assert vs["d_own"][0] == pytest.approx(-0.05)
    assert study[("lrp", 0.2)]["lrp_vs"] is None and study[("random", 0.2)]["lrp_vs"] is None
    assert study[("grad_x_weight", 0.05)]["lrp_vs"] is None  # no LRP at q 0.05
    main(["budget", str(tmp_path)])
    assert (
        "| grad_x_weight | 0.2 | 2 | +0.010 ± 0.020 | -0.050 ± 0.000 | +0.015 ± 0.035 |"
        in (tmp_path / "budget_study.md").read_text()
    )


def test_lora_and_full_runs_or_a_run_twice_are_refused(tmp_path):
    """LoRA runs would be paired with full fine-tuning's baseline; a run in two folders would count twice."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, "seqft", 1, -0.1, [0.8, 0.6], {"class_path": "strategies.seqft.SeqFT"})
    write_run(a, "lrp-q20", 1, -0.05, [0.7, 0.6], attribution("lrp", 0.2))
    write_run(b, "lrp-q20", 1, -0.06, [0.7, 0.6], attribution("lrp", 0.2))
    with pytest.raises(ConfigError, match="two finished runs of lrp-q20 seed 1"):
        collect([a, b])
    lora = tmp_path / "lora"
    write_run(lora, "lora-lrp-q20", 1, -0.05, [0.7, 0.6], attribution("lrp", 0.2), model={"lora": {"r": 8}})
    with pytest.raises(ConfigError, match="different model settings"):
        collect([a, lora])


@pytest.mark.parametrize(
    "runs, why",
    [
        (
            [("ewc", 1, {"class_path": "strategies.ewc.EWC"}), ("attr", 1, attribution("lrp", None))],
            "no finished attribution run with a budget (configs/study/) among its entries attr, ewc, seqft",
        ),
        (
            [("lrp-q20", 2, attribution("lrp", 0.2))],
            "the attribution runs with a budget ran seeds [2], the seqft runs [1]",
        ),
    ],
)
def test_nothing_to_pair_is_one_line_saying_why_and_writes_nothing(tmp_path, capsys, runs, why):
    from clbench.cli import main as clbench

    write_run(tmp_path, "seqft", 1, -0.1, [0.8, 0.6], {"class_path": "strategies.seqft.SeqFT"})
    for name, seed, strategy in runs:
        write_run(tmp_path, name, seed, -0.1, [0.8, 0.6], strategy)
    assert clbench(["analyze", "budget", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"clbench analyze: error: {tmp_path}: nothing to pair with seqft by seed: {why}"
    assert not (tmp_path / "budget_study.md").exists() and not (tmp_path / "budget_study.png").exists()


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    from clbench.cli import main as clbench

    write_run(tmp_path, "seqft", 1, -0.1, [0.8, 0.6], {"class_path": "strategies.seqft.SeqFT"})
    write_run(tmp_path, "magnitude-q05", 1, -0.08, [0.8, 0.6], attribution("magnitude", 0.05), removed=[0.05])
    (tmp_path / "afile").write_text("x")
    assert clbench(["analyze", "budget", str(tmp_path), "--out", str(tmp_path / "afile" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot create the folder" in err
