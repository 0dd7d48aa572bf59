"""The result scripts' job bookkeeping (scripts/common.py): every finished job is kept in
results/jobs/ and restored from there, so a fresh clone skips it and rebuilds its tables."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT
from gnnq.cli import config_dir
from gnnq.config import validate

sys.path.insert(0, str(ROOT / "scripts"))
import a2q  # noqa: E402
import common  # noqa: E402
import comparison  # noqa: E402
import smoothness  # noqa: E402

FAST = ["dataset=synthetic", "trainer.epochs=2", "tracking=none"]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """outputs/ and results/jobs/ of a throwaway checkout."""
    monkeypatch.setattr(common, "OUTPUTS", tmp_path / "outputs")
    monkeypatch.setattr(common, "ARCHIVE", tmp_path / "results" / "jobs")
    return tmp_path


def test_finished_shards_are_archived_restored_and_not_run_again(tree, monkeypatch):
    job = common.OUTPUTS / "cell"
    common.run_all([(job, FAST, 2, 2)], parallel=2)
    kept = common.ARCHIVE / "cell"
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        f"shard{k}/{name}" for k in (0, 1)
        for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "summary.json")]
    assert (job / "shard0" / "checkpoints" / "run0.pt").exists()  # kept out of the archive
    runs = common.pooled_runs(job)
    assert sorted(r["run"] for r in runs) == [0, 1]

    # A fresh clone: outputs/ is gone, the archive restores both shards ...
    shutil.rmtree(job)
    assert common.missing_runs(job, 2) == [0, 1]
    assert sorted(p.name for p in common.restore_jobs()) == ["shard0", "shard1"]
    assert common.pooled_runs(job) == runs and common.restore_jobs() == []

    # ... so nothing is trained again.
    def no_launch(*args):
        raise AssertionError(f"launched {args}")

    monkeypatch.setattr(common, "launch", no_launch)
    common.run_all([(job, FAST, 2, 2)], parallel=2)


def test_a_missing_run_is_added_as_its_own_part_and_archived_with_the_rest(tree):
    job = common.OUTPUTS / "cell"
    part = job / "shard0"
    (part / ".hydra").mkdir(parents=True)
    (part / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (part / "analysis").mkdir()
    (part / "analysis" / "bit_analysis.json").write_text("{}")
    (part / "analysis" / "bit_histograms.png").write_bytes(b"png")
    summary = {"runs": [{"run": 0, "test": 50.0}], "seconds": 1.0, "error": None}
    (part / "summary.json").write_text(json.dumps(summary))

    common.run_all([(job, FAST, 2, 2)], parallel=1)  # run 1 is missing: run1/
    assert sorted(r["run"] for r in common.pooled_runs(job)) == [0, 1]
    kept = common.ARCHIVE / "cell"
    assert (kept / "run1" / "summary.json").exists()
    assert (kept / "shard0" / "analysis" / "bit_analysis.json").exists()
    assert not (kept / "shard0" / "analysis" / "bit_histograms.png").exists()


def test_a_job_two_scripts_share_is_kept_once_and_linked_from_the_other(tree, monkeypatch):
    home = common.OUTPUTS / "comparison" / "gcn_cora" / "a2q"
    (home / "shard0").mkdir(parents=True)
    summary = {"runs": [{"run": 0, "test": 50.0}, {"run": 1, "test": 60.0}], "seconds": 1.0,
               "error": None}
    (home / "shard0" / "summary.json").write_text(json.dumps(summary))
    common.archive(home)
    shutil.rmtree(common.OUTPUTS)  # a fresh clone

    common.restore_jobs()
    other = common.OUTPUTS / "a2q" / "a2q_gcn_cora"
    assert other.is_symlink() and other.resolve() == home.resolve()
    assert not (common.OUTPUTS / "baselines").exists()  # no side of the FP32 cell exists

    def no_launch(*args):
        raise AssertionError(f"launched {args}")

    monkeypatch.setattr(common, "launch", no_launch)
    common.run_all([(other, FAST, 1, 2)])  # finished in its home: not trained again
    assert common.pooled_runs(other) == summary["runs"]
    assert not (common.ARCHIVE / "a2q").exists()  # its record stays in one place


def _runs(*indices):
    return [{"run": k} for k in indices]


def test_unfinished_jobs_are_compared_on_the_runs_they_share():
    assert (common.on_common_runs(_runs(0, 1, 3), _runs(1, 3, 4), [])
            == [_runs(1, 3), _runs(1, 3), []])
    # Neither job has a run yet (a table row whose cells were never run).
    assert common.on_common_runs([], []) == [[], []]


def test_the_fold_table_shows_every_kept_record_and_marks_the_missing_folds(tree, monkeypatch):
    monkeypatch.setattr(comparison, "OUT", common.OUTPUTS / "comparison")
    for method, part, folds in (("DQ-INT4", "run3", [3]), ("DQ-INT4", "run0", [0]),
                                ("FP32", "shard0", [0, 1])):
        path = comparison.folder("gin_reddit_binary", method) / part
        path.mkdir(parents=True)
        runs = [{"run": k, "test": 80.0 + k, "best_test": 90.0 + k, "avg_bits": 4.0}
                for k in folds]
        (path / "summary.json").write_text(json.dumps({"runs": runs, "seconds": 1.0}))
    lines = comparison.folds_table("gin_reddit_binary").splitlines()
    header = lines.index("| fold | FP32 | DQ-INT8 | DQ-INT4 | A²Q | QLR-INT4 | QLR-INT2-BT* |")
    assert lines[header + 2] == "| 0 | 80.00 / 90.00 | – | 80.00 / 90.00 | – | – | – |"
    assert lines[header + 3] == "| 1 | 81.00 / 91.00 | – | – | – | – | – |"
    assert lines[header + 5] == "| 3 | – | – | 83.00 / 93.00 | – | – | – |"
    assert lines[header + 12] == "| folds kept | 2 | 0 | 2 | 0 | 0 | 0 |"
    assert lines[header + 13] == ("| test @ best val | 80.50 ± 0.71 | – | 81.50 ± 2.12 | – | – "
                                  "| – |")


def _script_jobs() -> list[list[str]]:
    """The overrides of every job the result scripts can launch, each list once."""
    lists = [overrides for _, overrides, _ in a2q.jobs(set(a2q.PARTS), skip_reddit=False)]
    lists += [overrides for _, overrides, _ in comparison.jobs(list(comparison.ROWS),
                                                               list(comparison.METHODS))]
    lists += [overrides for group in smoothness.GROUPS for _, overrides in smoothness.jobs(group)]
    return [list(o) for o in dict.fromkeys(tuple(o) for o in lists)]


def test_every_result_script_job_names_presets_and_keys_that_exist():
    """A typo in a script's overrides (a misspelt key, a preset renamed) fails here, not hours
    into a results run."""
    jobs = _script_jobs()
    presets = {p.stem for p in (config_dir() / "experiment").glob("*.yaml")}
    named = {o.split("=", 1)[1] for job in jobs for o in job if o.startswith("+experiment=")}
    assert len(named) > 20 and named <= presets, named - presets
    # One job per set of overridden keys: composing all of them would take a minute.
    by_keys = {tuple(sorted(o.split("=", 1)[0] for o in job)): job for job in jobs}
    assert len(by_keys) > 20
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for overrides in by_keys.values():
            validate(compose("train", overrides=overrides))


def test_smoothness_tables_name_the_jobs_selected_by_the_earlier_tie_rule(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(smoothness, "OUT", tmp_path)
    for name, rule in (("spec", "train"), ("earliest", "first"), ("unset", None)):
        for shard in ("shard0", "shard1"):
            part = tmp_path / name / shard
            (part / ".hydra").mkdir(parents=True)
            (part / "summary.json").write_text("{}")
            trainer = {} if rule is None else {"val_ties": rule}
            (part / ".hydra" / "config.yaml").write_text(json.dumps({"trainer": trainer}))
    assert smoothness.earliest_tie_note(["spec"]) == ""
    note = smoothness.earliest_tie_note(["spec", "earliest", "unset", "not_run"])
    assert note.endswith("to rerun it): earliest, unset.")


def test_a_diverged_depth_cell_has_no_mean_and_its_note_reads_the_multiplier_record(
        tmp_path, monkeypatch):
    monkeypatch.setattr(smoothness, "OUT", tmp_path)

    def diverged(name: str, run: int, epoch: int, multiplier: float, tests: list[float]):
        error = (f"Training diverged: the loss became nan at epoch {epoch} of run {run} "
                 f"(seed {run}). Lower trainer.lr ...")
        record = {"runs": [{"run": r, "test": t} for r, t in enumerate(tests)], "error": error,
                  "seconds": 60.0, "diverged": {"run": run, "epoch": epoch, "last_epoch_metrics":
                                                {"train_loss": 0.4, "multiplier_min": multiplier}}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(record))

    diverged("smooth_smp_cora_int4-k32", 2, 197, -3.11, [81.0, 80.0])
    diverged("smooth_smp_cora_int4-k64", 0, 131, -2.95, [])
    results = smoothness.depth_results()
    table, notes = smoothness.depth_table(results)
    assert ("| INT4 | SMP | – | – | – | – | diverged (nan loss, epoch 197 of run 2; runs "
            "before: 80.50 ± 0.71) | diverged (nan loss, epoch 131) |") in table
    assert smoothness.mean_of(results[("int4", "SMP")][32]) is None
    assert "INT4 SMP: K = 64 did not train (diverged (nan loss, epoch 131))" in notes
    assert any("INT4 SMP diverged with the training pass's multiplier already at -3.11 (K = 32) "
               "and -2.95 (K = 64)" in note for note in notes)


def test_the_multiplier_table_retrains_only_the_missing_run0_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(smoothness, "OUT", tmp_path)
    names = {name for _, _, (name, _) in smoothness.trace_jobs()}
    assert names <= {name for group in smoothness.GROUPS for name, _ in smoothness.jobs(group)}
    record = {"runs": [{"run": 0, "val": 84.0, "test": 81.7}], "seconds": 1.0}
    for name in ("smooth_smp_cora_int4", "smooth_smp_cora_int8"):  # finished, kept records
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(record))
    (tmp_path / "smooth_smp_cora_int8" / "checkpoints").mkdir()
    (tmp_path / "smooth_smp_cora_int8" / "checkpoints" / "run0.pt").write_bytes(b"")
    launched = []

    class Done:
        def wait(self):
            return 0

    def launch(folder, overrides, runs):
        launched.append((folder, overrides, runs))
        return Done()

    monkeypatch.setattr(smoothness, "launch", launch)
    smoothness.retrain_trace_runs(parallel=2)
    assert launched == [(tmp_path / "smooth_smp_cora_int4" / smoothness.TRACE_RUN,
                         ["+experiment=smooth_smp_cora_int4", "tracking=none"], 1)]
    kept = smoothness.summary("smooth_smp_cora_int4")
    assert smoothness.run_zero({"val": 84.8, "test": 81.8}, kept) == \
        "84.80 / 81.80 (kept record: 84.00 / 81.70)"
    assert smoothness.run_zero({"val": 84.0, "test": 81.7}, kept) == "84.00 / 81.70"


def test_the_multiplier_grid_selects_on_validation_and_never_on_test(tmp_path, monkeypatch):
    monkeypatch.setattr(smoothness, "OUT", tmp_path)

    def record(name: str, val: float, test: float) -> None:
        runs = [{"run": r, "val": val + r, "test": test + r, "best_test": test + r + 1}
                for r in range(2)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"runs": runs,
                                                                  "seconds": 1.0}))

    record("smooth_smp_cora_int4-appnp", 80.0, 80.0)
    # (η_λ, bounded) -> (val, test): the best test sits on a row validation ranks lower
    scores = {(1e-5, False): (82.0, 80.0), (1e-5, True): (82.0, 79.0),
              (1e-4, True): (83.0, 80.5), (1e-3, True): (81.0, 85.0)}
    assert set(scores) == set(smoothness.MULTIPLIER_GRID)
    for (lr, bounded), (val, test) in scores.items():
        if lr != 1e-3:  # the last grid point is recorded below
            record(smoothness.multiplier_job("int4", lr, bounded)[0], val, test)
    assert smoothness.confirmation_jobs() == []  # not before every grid point has run
    record(smoothness.multiplier_job("int4", 1e-3, True)[0], 81.0, 85.0)
    table, picked = smoothness.multiplier_selection()
    # the released and the selected setting and APPNP again, on the splits of seeds 10-19
    assert smoothness.confirmation_jobs() == [
        ("smooth_smp_cora_int4-seed10", ["+experiment=smooth_smp_cora_int4", "seed=10"]),
        ("smooth_smp_cora_int4-seed10-eta0.0001-bounded",
         ["+experiment=smooth_smp_cora_int4", "seed=10", "model.multiplier_lr=0.0001",
          "model.multiplier_bound=2.5"]),
        ("smooth_smp_cora_int4-seed10-appnp",
         ["+experiment=smooth_smp_cora_int4", "seed=10", "model.propagation=appnp"])]
    record("smooth_smp_cora_int4-seed10-appnp", 70.0, 79.0)
    assert smoothness.confirmation_table()[1] == []  # SMP not confirmed yet
    record("smooth_smp_cora_int4-seed10-eta0.0001-bounded", 70.0, 80.0)
    assert smoothness.confirmation_table()[1] == ["INT4 selected: SMP − APPNP = +1.00 pp (≥ +1.0)"]
    assert smoothness.confirmation_table()[2] == ["INT4 selected: –"]  # +1 on both: no spread
    assert ("| INT4 | 0.0001 | 2.5 | 83.50 ± 0.71 | 81.00 ± 0.71 | +0.50 | 2 / 0, 0.00, –, – | "
            "82.00 ± 0.71 | 2 | ✔ |") in table
    assert ("| INT4 | 1e-05 | 2.5 | 82.50 ± 0.71 | 79.50 ± 0.71 | -1.00 | 0 / 2, 0.00, –, – |"
            in table)
    assert table.count("✔") == 1  # INT2-BT* has no records: nothing selected there
    assert picked == ["INT4: η_λ = 0.0001, |λ| ≤ 2.5, SMP − APPNP = +0.50 pp (< +1.0; splits "
                      "ahead / behind, std, paired t, 95 % CI: 2 / 0, 0.00, –, –)"]
    # equal validation means: the released pair, listed first, is kept
    shutil.rmtree(tmp_path / smoothness.multiplier_job("int4", 1e-4, True)[0])
    record(smoothness.multiplier_job("int4", 1e-4, True)[0], 81.0, 80.5)
    assert smoothness.multiplier_selection()[1][0].startswith(
        "INT4: η_λ = 1e-05, unbounded, SMP − APPNP = +0.00 pp (< +1.0;")
    # a paired t where the differences vary: +2 and +4 pp, std 1.41, t = 3 / (1.41 / √2) = 3;
    # the 95 % interval is 3 ± t(0.975, 1 dof) · 1.41 / √2 = 3 ± 12.71
    appnp = {"runs": [{"run": 0, "test": 80.0}, {"run": 1, "test": 80.0}]}
    smp = {"runs": [{"run": 1, "test": 84.0}, {"run": 0, "test": 82.0}, {"run": 2, "test": 1.0}]}
    assert (smoothness.paired(smoothness.differences(smp, appnp))
            == "2 / 0, 1.41, +3.00, [-9.71, +15.71]")
    assert smoothness.paired(smoothness.differences(smp, None)) == "–"
    assert smoothness.paired([2.0, 4.0]) == "2 / 0, 1.41, +3.00, [-9.71, +15.71]"


def test_the_interval_of_a_lead_says_where_the_target_lies():
    # mean 2, std 0.2, 3 splits: 2 ± 4.303 · 0.2 / √3 = [1.50, 2.50]
    low, high = smoothness.interval([1.8, 2.0, 2.2])
    assert (round(low, 2), round(high, 2)) == (1.5, 2.5)
    assert smoothness.interval([1.0, 1.0]) is None and smoothness.interval([3.0]) is None
    assert smoothness.interval_verdict("int4", [1.8, 2.0, 2.2]) == (
        "[+1.50, +2.50] over 3 splits, wholly above +1.0")
    assert smoothness.interval_verdict("int4", [-0.2, 0.0, 0.2]).endswith("wholly below +1.0")
    assert smoothness.interval_verdict("int2_btstar", [2.0, 4.0]) == (
        "[-9.71, +15.71] over 2 splits, contains +1.0")
