"""The posterior comparison's machinery on a tiny config: the equal-compute rule against the schemes'
own transition counters, the files it writes, and one-line errors for pairs it cannot run."""

import csv
import math

import pytest
from omegaconf import OmegaConf

from gram_pyro.config import compose_config
from gram_pyro.experiments import reproduce
from gram_pyro.experiments.compare_posteriors import Pair, compare_posteriors, main, pair_config, plan, transitions_spent

TINY = ["task.n=6", "task.removals=[2,3]", "model.dim=16", "model.ffn_hidden=16", "model.num_layers=1",
        "model.n_sup=2", "model.num_prefix=2", "trainer.batch_size=8", "trainer.eval_inputs=2",
        "trainer.eval_samples=2", "trainer.warmup_steps=2", "compare.eval_inputs=4", "compare.eval_samples=2",
        "compare.evidence_inputs=3",
        "compare.evidence_particles=4", "compare.evidence_chunk=3"]
N_SUP, T = 2, 2


@pytest.mark.parametrize("objective, options, per_batch", [
    ("truncated", [], N_SUP * T),
    ("truncated", ["objective.prior_weight=0.5"], 2 * N_SUP * T),  # the prior rollouts' chain
    ("truncated", ["objective.prior_weight=0.5", "objective.prior_target=nearest"], 2 * N_SUP * T),
    ("truncated", ["objective.overshoot_weight=1"], 2 * N_SUP * T),  # overshooting runs the same chain
    ("truncated", ["objective.prior_weight=0.5", "objective.prior_start=1"], N_SUP * T),  # not yet
    ("truncated_mc", [], N_SUP * T),
    ("iwae", [], 3 * N_SUP * T),
    ("smc", [], 3 * N_SUP * T),
    ("rws", ["objective.insomnia=0.5"], 2 * 3 * N_SUP * T),
    ("mcmc_em", ["objective.kernel=hmc", "objective.num_steps=4", "objective.warmup_steps=2",
                 "objective.num_samples=3", "objective.m_step_samples=2"], N_SUP * T * (1 + 5 * 4 + 2)),
    ("mcmc_em_short", [], N_SUP * T * (1 + 1 + 2 + 1)),
    ("mcmc_em_short", ["objective.num_steps=0"], N_SUP * T * (1 + 1)),
])
def test_cost_per_batch_follows_the_rule(objective, options, per_batch):
    pair = Pair(f"gaussian-{objective}", "gaussian", objective)
    assert transitions_spent(pair_config([*TINY, *options], pair, 3), 1) == per_batch


def test_a_pair_with_overrides_gets_them_alone_and_the_prior_chain_is_charged_from_prior_start():
    recipe = ("{name: recipe, guide: gaussian, objective: truncated, overrides: ['guide.posterior_steps=1', "
              "'objective.prior_weight=0.5', 'objective.prior_start=6']}")  # quoted: = inside a list
    first_step = "{guide: gaussian, objective: iwae, overrides: ['guide.posterior_steps=1', 'objective.num_particles=2']}"
    settings = [*TINY, "compare.budget_batches=10", "compare.num_particles=4",
                f"compare.pairs=[[gaussian,truncated],{recipe},{first_step}]"]
    runs = plan(compose_config("compare_posteriors", settings), settings)
    assert [pair.name for pair, _ in runs] == ["gaussian-truncated", "recipe", "gaussian-iwae"]
    plain, recipe_cfg, iwae = (cfg for _, cfg in runs)
    assert plain.guide.posterior_steps is None and recipe_cfg.guide.posterior_steps == 1
    assert iwae.objective.num_particles == 2  # the pair's own value wins over compare.num_particles
    # 10 batch-units: the plain surrogate 10 batches; the recipe 6 alone + 2 with the prior chain (6 + 2 x 2)
    assert [cfg.trainer.max_batches for _, cfg in runs] == [10, 8, 5]
    assert {transitions_spent(cfg, cfg.trainer.max_batches) for _, cfg in runs} == {10 * N_SUP * T}


def test_pairs_train_at_equal_compute_and_the_files_come_from_the_runs(tmp_path):
    out = tmp_path / "cmp"
    rows = compare_posteriors([*TINY, f"out={out}", "compare.budget_batches=4", "compare.num_particles=2",
                               "compare.pairs=[[gaussian,truncated],[gaussian,iwae],[prior,smc]]"], quiet=True)
    assert [(r["guide"], r["objective"], r["particles"]) for r in rows] == \
        [("gaussian", "truncated", 1), ("gaussian", "iwae", 2), ("prior", "smc", 2)]
    assert [r["batches"] for r in rows] == [4, 2, 2]            # K = 2 particles buy half the batches
    assert [r["optimizer_steps"] for r in rows] == [8, 4, 4]    # one step per supervision step
    assert {r["transitions"] for r in rows} == {4 * N_SUP * T}  # equal compute, backbone K_low + 1 = 3 each
    assert {r["backbone_passes"] for r in rows} == {3 * 4 * N_SUP * T}
    for row in rows[1:]:  # the rule matches what the particle schemes count themselves (T K per update)
        with (out / f"{row['guide']}-{row['objective']}" / "metrics.csv").open() as f:
            reported = [float(r["transitions"]) * N_SUP for r in csv.DictReader(f)]
        assert reported == [row["transitions"] / row["batches"]] * row["batches"]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["coverage"] <= 1
        assert row["log_evidence"] < 0 and 1 <= row["ess"] <= 4
        assert row["khat"] == math.inf and row["khat_high"] == 1  # 4 weights: too few for a Pareto tail
    assert rows[0]["kl"] > 0 and math.isnan(rows[1]["kl"])  # only the surrogate reports a KL
    with (out / "comparison.csv").open() as f:
        written = list(csv.DictReader(f))
    assert [float(r["log_evidence"]) for r in written] == [r["log_evidence"] for r in rows]
    table = (out / "comparison.md").read_text()
    assert table.count("\n| gaussian-") == 2 and "\n| prior-smc | prior | smc | 2 | 2 | 4 |" in table
    assert 0 < (out / "comparison.png").stat().st_size < 150_000


def test_a_rerun_keeps_finished_runs_trains_missing_ones_and_refuses_a_run_of_another_config(tmp_path):
    out = tmp_path / "cmp"
    common = [*TINY, f"out={out}", "compare.budget_batches=2"]
    first = compare_posteriors([*common, "compare.pairs=[[gaussian,truncated]]"], quiet=True)
    checkpoint = out / "gaussian-truncated" / "checkpoint.pt"
    written = checkpoint.stat().st_mtime_ns
    both = compare_posteriors([*common, "compare.pairs=[[gaussian,truncated],[prior,truncated]]"], quiet=True)
    assert checkpoint.stat().st_mtime_ns == written  # kept, not trained again
    assert scores(both[:1]) == scores(first) and both[0]["train_seconds"] == first[0]["train_seconds"]
    assert (out / "prior-truncated" / "checkpoint.pt").is_file()
    with pytest.raises(Exception, match="holds a run of another config .*model.dim"):
        compare_posteriors([*common, "model.dim=8", "compare.pairs=[[prior,truncated_mc],[gaussian,truncated]]"], quiet=True)
    assert not (out / "prior-truncated_mc").exists()  # refused before anything trained


def test_short_mcmc_em_enters_the_comparison_and_reports_the_cost_the_rule_charges(tmp_path):
    out = tmp_path / "cmp"
    rows = compare_posteriors([*TINY, f"out={out}", "compare.budget_batches=10", "compare.evidence_particles=32",
                               "compare.pairs=[[gaussian,truncated],[gaussian,mcmc_em_short]]"], quiet=True)
    assert [r["batches"] for r in rows] == [10, 2]  # one batch of 5 whole programs: 5 x 4 = 20 transitions
    assert all(0 <= r["khat"] < math.inf and 0 <= r["khat_high"] <= 1 for r in rows)
    assert rows[1]["transitions"] == rows[0]["transitions"] == 10 * N_SUP * T
    with (out / "gaussian-mcmc_em_short" / "metrics.csv").open() as f:
        logged = list(csv.DictReader(f))
    assert [float(r["transitions"]) for r in logged] == [5 * N_SUP * T] * 2  # what the scheme counted itself
    assert all(0 <= float(r["accept"]) <= 1 for r in logged)
    assert "| gaussian-mcmc_em_short | gaussian | mcmc_em_short | 1 | 2 | 2 |" in (out / "comparison.md").read_text()


def test_pairs_in_parallel_processes_give_the_rows_of_one_process(tmp_path):
    pairs = "compare.pairs=[[gaussian,truncated],[prior,iwae]]"
    common = [*TINY, "compare.budget_batches=2", "compare.num_particles=2", pairs]
    serial = compare_posteriors([*common, f"out={tmp_path / 'serial'}"], quiet=True)
    parallel = compare_posteriors([*common, f"out={tmp_path / 'parallel'}", "compare.jobs=2"], quiet=True)
    assert scores(parallel) == scores(serial)
    assert (tmp_path / "parallel" / "comparison.csv").exists()


def scores(rows):
    """What a run measures, per row (nan, as for a KL the objective does not report, as None)."""
    keys = ["guide", "objective", "batches", "optimizer_steps", "accuracy", "coverage", "log_evidence", "ess", "kl"]
    return [[None if isinstance(r[k], float) and math.isnan(r[k]) else r[k] for k in keys] for r in rows]


@pytest.mark.parametrize("overrides, message", [
    (["compare.pairs=[[gaussian,mcmc_em]]"], "pair gaussian-mcmc_em: one batch costs"),
    (["compare.pairs=[[gaussian]]"], "each pair is [guide, objective] or {name, guide, objective, overrides}"),
    (["compare.pairs=[{guide: gaussian, objective: iwae, particles: 2}]"], "each pair is [guide, objective] or"),
    (["compare.pairs=[{guide: gaussian, objective: iwae, overrides: [posterior_steps]}]"], "a list of key=value"),
    (["compare.pairs=[{guide: gaussian, objective: iwae, overrides: ['guide=flow']}]"], "guide=flow: a pair's guide"),
    (["compare.pairs=[{name: ../up, guide: gaussian, objective: iwae}]"], "name '../up' is a run directory"),
    (["compare.pairs=[[gaussian,iwae],{guide: gaussian, objective: iwae, overrides: ['model.dim=8']}]"],
     "two pairs are named 'gaussian-iwae'"),
    (["compare.pairs=[[oracle,truncated]]"], "unknown guide 'oracle'"),
    (["guide=flow"], "guide and objective are set per pair"),
    (["compare.budget_batches=0"], "compare.budget_batches must be at least 1"),
    (["compare.jobs=0"], "compare.jobs must be a whole number of at least 1, got 0"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, capsys, overrides, message):
    assert main([*TINY, f"out={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def write_comparison(directory, rows):
    directory.mkdir()
    columns = ["name", "guide", "objective", "particles", "batches", "optimizer_steps", "transitions", "accuracy",
               "coverage", "log_evidence", "ess", "khat", "kl", "train_seconds"]
    with (directory / "comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for guide, objective, batches, accuracy, kl in rows:
            writer.writerow({"name": f"{guide}-{objective}", "guide": guide, "objective": objective,
                             "particles": 1, "batches": batches,
                             "optimizer_steps": 4 * batches, "transitions": 8 * batches, "accuracy": accuracy,
                             "coverage": 0.5, "log_evidence": -2.0, "ess": 10.0, "khat": 0.5, "kl": kl,
                             "train_seconds": 100})


def test_seed_summary_gives_mean_and_sample_sd_per_pair(tmp_path, capsys):
    from gram_pyro.experiments.compare_seeds import main as seeds_main

    write_comparison(tmp_path / "a", [("gaussian", "truncated", 240, 0.6, 0.05), ("gaussian", "iwae", 60, 0.1, "")])
    write_comparison(tmp_path / "b", [("gaussian", "iwae", 60, 0.3, ""), ("gaussian", "truncated", 240, 0.8, 0.07)])
    assert seeds_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    with (tmp_path / "a" / "comparison_seeds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["name"], r["guide"], r["objective"], r["seeds"]) for r in rows] == [
        ("gaussian-truncated", "gaussian", "truncated", "2"), ("gaussian-iwae", "gaussian", "iwae", "2")]
    assert math.isclose(float(rows[0]["accuracy_mean"]), 0.7)
    assert math.isclose(float(rows[0]["accuracy_sd"]), math.sqrt(0.02))  # sample sd of 0.6 and 0.8
    assert math.isnan(float(rows[1]["kl_mean"]))  # the particle schemes report no KL
    table = capsys.readouterr().out
    assert "| gaussian-truncated | gaussian | truncated | 1 | 240 | 70.0 ± 14.1 | 50.0 ± 0.0 |" in table and "| 0.060 ± 0.014 |" in table


def test_seed_summary_rejects_a_missing_file_and_a_different_comparison(tmp_path, capsys):
    from gram_pyro.experiments.compare_seeds import main as seeds_main

    write_comparison(tmp_path / "a", [("gaussian", "truncated", 240, 0.6, 0.05)])
    write_comparison(tmp_path / "b", [("gaussian", "truncated", 120, 0.8, 0.07)])
    assert seeds_main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "missing/comparison.csv: no such file" in capsys.readouterr().err
    assert seeds_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gaussian-truncated has batches=120" in err
    assert not (tmp_path / "a" / "comparison_seeds.csv").exists()


def test_the_uncond_sudoku4_preset_runs_the_reproduction_recipe_at_that_recipe_s_cost():
    settings = compose_config("compare_posteriors", ["comparison=uncond_sudoku4"])
    runs = {pair.name: cfg for pair, cfg in plan(settings, ["comparison=uncond_sudoku4"])}
    recipe = OmegaConf.load("experiments/configs/reproduce/uncond_sudoku4-cpu.yaml")
    trained = runs["gaussian-truncated-recipe"]
    for override in recipe.gram:
        key, _, value = override.partition("=")
        if key not in ("model", "guide"):
            assert str(OmegaConf.select(trained, key)) == value, key
    reproduction = dict(o.split("=") for o in recipe.train)
    assert trained.trainer.max_batches == int(reproduction["trainer.max_batches"])  # 300 + 2 x 100 = 500
    assert {cfg.task._target_ for cfg in runs.values()} == {"gram_pyro.tasks.sudoku.UnconditionalSudokuTask"}
    assert {(cfg.model.dim, cfg.trainer.batch_size) for cfg in runs.values()} == {(64, 128)}
    assert runs["gaussian-truncated"].trainer.max_batches == 500
    assert runs["gaussian-iwae-first-step"].trainer.max_batches == 125  # 4 particles


def test_the_steps_preset_gives_the_particle_schemes_the_surrogate_s_optimizer_steps():
    base = {pair.name: cfg for pair, cfg in plan(compose_config("compare_posteriors", ["comparison=uncond_sudoku4"]),
                                                 ["comparison=uncond_sudoku4"])}
    settings = compose_config("compare_posteriors", ["comparison=uncond_sudoku4_steps"])
    runs = {pair.name: cfg for pair, cfg in plan(settings, ["comparison=uncond_sudoku4_steps"])}
    assert sorted(runs) == ["gaussian-rws-first-step", "gaussian-smc-first-step"]
    for name, cfg in runs.items():
        assert cfg.trainer.max_batches == base["gaussian-truncated"].trainer.max_batches == 500
        cfg.trainer.max_batches = base[name].trainer.max_batches
        assert cfg == base[name]  # the same run as in the comparison but for its length


@pytest.mark.parametrize("task, budget, lever, init_scale", [
    ("coloring", 1000, "first-step", 0.1), ("coloring10", 900, "first-step", 0.1), ("nqueens10", 800, "small-noise", 0.1),
    ("uncond_sudoku", 2200, "first-step", 1.0)])
def test_a_task_preset_s_recipe_pair_is_the_reproduction_s_gram_run_at_its_cost(task, budget, lever, init_scale, tmp_path):
    settings = compose_config("compare_posteriors", [f"comparison={task}"])
    runs = {pair.name: cfg for pair, cfg in plan(settings, [f"comparison={task}"])}
    reproduction = reproduce.run_config(compose_config(f"reproduce/{task}-cpu", []), "gram", tmp_path, [])
    trained = runs["gaussian-truncated-recipe"]
    for section in ("task", "model", "guide", "objective"):
        assert trained[section] == reproduction[section], section
    for key in ("batch_size", "max_batches", "lr", "warmup_steps", "lr_schedule", "spike_factor"):
        assert trained.trainer[key] == reproduction.trainer[key], key  # the prior chain's batches count twice
    assert runs["gaussian-truncated"].trainer.max_batches == runs["prior-truncated"].trainer.max_batches == budget
    assert runs[f"gaussian-smc-{lever}"].trainer.max_batches == budget // 4
    levered = [cfg for name, cfg in runs.items() if name.endswith(lever)]
    assert len(levered) == 4 and {(cfg.model.init_scale, cfg.guide.init_scale) for cfg in levered} == {(init_scale,) * 2}
    assert {cfg.guide.posterior_steps for cfg in levered} == ({1} if lever == "first-step" else {None})
