"""The reproduction command (experiments/reproduce.py) and the results page it feeds
(experiments/results_table.py): recipes compose, a tiny reproduction writes the promised results file,
reruns keep or resume its runs, and the page renders the files deterministically."""

import copy
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gram_pyro.experiments import export_pretrained, reproduce, results_table
from gram_pyro.checkpoint import FORMAT, REQUIRED
from gram_pyro.config import compose_config, group_options
from gram_pyro.training import config_differences, training_seconds

TINY = ["task.n=6", "task.removals=[2]", "model.dim=16", "model.ffn_hidden=16", "model.num_layers=1",
        "model.n_sup=2", "model.num_prefix=2", "trainer.batch_size=4", "trainer.eval_inputs=4",
        "trainer.eval_samples=2", "trainer.threads=1", "trainer.checkpoint_every=1",
        "eval.inputs=5", "eval.samples=3", "eval.select=[vote]", "jobs=1"]

FIXTURE = {
    "task": "nqueens", "budget": "cpu", "device": "cpu (2 cores)", "wall_seconds": 1830.0, "test_inputs": 772,
    "samples": 20, "recipe": {"train": ["task=nqueens"]},
    "models": {
        "TRM": {"accuracy": {"mean": 0.7401, "ci95": [0.7102, 0.7700]},
                "coverage@20": {"mean": 0.695, "ci95": [0.68, 0.71]}, "by_solutions": {}},
        "GRAM": {"accuracy": {"mean": 0.8823, "ci95": [0.8613, 0.9033]},
                 "coverage@20": {"mean": 0.9451, "ci95": [0.9351, 0.9551]}, "by_solutions": {}},
        "PTRM": {"accuracy": {"mean": 0.75, "ci95": None}, "coverage@20": {"mean": 0.7, "ci95": [None, None]}},
        "GRAM T=1.3": {"accuracy": {"mean": 0.87, "ci95": [0.85, 0.89]},
                       "coverage@20": {"mean": 0.96, "ci95": [0.95, 0.97]}, "by_solutions": {}},
    },
}


def test_every_recipe_composes_with_both_train_configs(tmp_path):
    names = group_options("reproduce")
    tasks = ["nqueens", "nqueens10", "coloring", "coloring10", "uncond_sudoku4", "uncond_sudoku", "sudoku", "digits"]
    assert {f"{task}-{budget}" for task in tasks for budget in ["cpu", "gpu"]} <= set(names)
    prior = compose_config("train", ["guide=prior"]).guide
    for name in names:
        recipe = compose_config(f"reproduce/{name}", [])
        reproduce.check_eval(recipe.eval)
        assert recipe.eval.samples == 20
        gram = reproduce.run_config(recipe, "gram", tmp_path / "gram", [])
        trm = reproduce.run_config(recipe, "trm", tmp_path / "trm", [])
        assert gram.model.noise == "learned" and trm.model.noise == "none" and trm.guide == prior
        # the held-out check's interval may differ: evaluation draws from its own random streams, so it
        # changes nothing a run learns (GRAM's recipes check it more often for the shortcut curve); so may
        # keeping a copy of each checkpoint (for diagnostics over training)
        same_size = [k for k in config_differences(gram, trm) if k.split(".")[0] in ("task", "trainer")
                     and k not in ("trainer.eval_every", "trainer.keep_checkpoints")]
        assert not same_size, f"{name}: GRAM and TRM differ in {same_size}"
        assert gram.trainer.device == {"cpu": "cpu", "gpu": "cuda"}[name.rpartition("-")[2]]


def test_each_gpu_recipe_trains_and_scores_what_its_cpu_recipe_does(tmp_path):
    device_settings = {"trainer.device", "trainer.compile", "trainer.precision"}
    for name in group_options("reproduce"):
        task, _, budget = name.rpartition("-")
        if budget != "gpu":
            continue
        gpu, cpu = compose_config(f"reproduce/{name}", []), compose_config(f"reproduce/{task}-cpu", [])
        assert gpu.eval == cpu.eval, name
        for model in ("gram", "trm"):
            on_gpu = reproduce.run_config(gpu, model, tmp_path / model, [])
            on_cpu = reproduce.run_config(cpu, model, tmp_path / model, [])
            differences = set(config_differences(on_gpu, on_cpu, continuable=())) - device_settings
            assert not differences, f"{name}, {model}: {sorted(differences)}"
            assert (on_gpu.trainer.device, on_gpu.trainer.compile, on_gpu.trainer.precision) == ("cuda", "none", "auto")


def test_the_gpu_script_runs_each_reproduction_and_packs_what_publishing_needs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    tiny = [*TINY, "trainer.device=cpu", "trainer.max_batches=1"]  # a dry run on the CPU
    # one task at a time: the second reproduction of the same task keeps what the first wrote
    env = {**os.environ, "PYTHON": sys.executable, "REPRODUCE_ARGS": " ".join(tiny), "WIDTH": "1"}
    done = subprocess.run(["bash", "experiments/gpu_reproductions.sh", str(tmp_path), "300", "nqueens", "nqueens"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.count("nqueens: done in") == 2, done.stdout + done.stderr
    with tarfile.open(tmp_path / "nqueens.tar.gz") as pack:
        assert sorted(pack.getnames()) == sorted(f"nqueens/{name}" for name in [
            "results.json", "log.txt", "gram/config.yaml", "gram/checkpoint.pt", "gram/metrics.csv", "gram/eval.csv"])
    results = json.loads((tmp_path / "nqueens" / "results.json").read_text())
    assert (results["task"], results["budget"], results["test_inputs"]) == ("nqueens", "gpu", 5)
    late = subprocess.run(["bash", "experiments/gpu_reproductions.sh", str(tmp_path / "late"), "10", "coloring"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert "coloring: skipped, no time left" in late.stdout and not (tmp_path / "late" / "coloring").exists()


def test_a_tiny_reproduction_writes_the_results_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "nqueens-cpu"
    argv = ["task=nqueens", "budget=cpu", f"out={out}", *TINY, "eval.prior_temperatures=[0.5]", "eval.depth=3",
            "trainer.lr_schedule=constant", "trainer.compile=none"]  # a constant rate: continued to 2 batches
    assert reproduce.main([*argv, "trainer.max_batches=1"]) == 0
    assert reproduce.main([*argv, "trainer.max_batches=2"]) == 0
    printed = capsys.readouterr().out
    assert "GRAM: resuming at batch 1" in printed and "kept the evaluation" not in printed  # newer checkpoints
    first = json.loads((out / "results.json").read_text())
    monkeypatch.setattr(reproduce, "PUBLISHED", tmp_path / "published")
    assert reproduce.main([*argv, "trainer.max_batches=2", "publish=true"]) == 0
    printed = capsys.readouterr().out
    assert "GRAM: " in printed and "holds the finished run (2 batches); kept" in printed
    assert printed.count("kept the evaluation in") == 4  # GRAM, TRM, PTRM, GRAM T=0.5: same runs, same settings
    assert "| N-Queens 8x8 | cpu | cpu (" in printed

    results = json.loads((out / "results.json").read_text())
    assert (tmp_path / "published" / "nqueens-cpu.json").read_text() == (out / "results.json").read_text()
    assert {"task", "budget", "device", "wall_seconds", "test_inputs", "samples", "recipe", "models"} <= set(results)
    assert (results["task"], results["budget"], results["test_inputs"], results["samples"]) == ("nqueens", "cpu", 5, 3)
    assert (results["depth"], results["trained_depth"]) == (3, 2)
    assert "3 prior trajectories each of 3 supervision steps (trained with 2)" in results_table.note(results)
    assert results["recipe"]["gram"][:2] == ["model=gram", "guide=gaussian"] and "model.dim=16" in results["recipe"]["overrides"]
    assert set(results["models"]) == {"GRAM", "TRM", "PTRM", "GRAM T=0.5"}
    for metrics in results["models"].values():
        for name in ["accuracy", "coverage@3", "pass@3", "vote@3"]:
            low, high = metrics[name]["ci95"]
            assert set(metrics[name]) == {"mean", "ci95"} and low <= metrics[name]["mean"] <= high
        assert isinstance(metrics["by_solutions"], dict)
    assert results["wall_seconds"] >= sum(results["seconds"]["train"].values()) > 0
    assert (out / "eval" / "PTRM-test" / "metrics.json").is_file()
    tempered = json.loads((out / "eval" / "GRAM-T=0.5-test" / "metrics.json").read_text())
    assert tempered["prior_temperature"] == 0.5 and tempered["run"] == str(out / "gram") and tempered["depth"] == 3
    assert results["models"] == first["models"]  # the kept evaluations score as they did
    assert results["seconds"]["eval"] >= sum(json.loads((out / "eval" / f"{name}-test" / "metrics.json").read_text())
                                             ["sampling_seconds"] for name in ("GRAM", "TRM", "PTRM", "GRAM-T=0.5"))
    assert reproduce.main([*argv, "trainer.max_batches=2", "eval.samples=2"]) == 0
    assert "kept the evaluation" not in capsys.readouterr().out  # other settings: scored again


def test_side_by_side_runs_count_the_longer_training_in_the_wall_time(tmp_path, capfd):
    out = tmp_path / "r"
    argv = ["task=nqueens", "budget=cpu", f"out={out}", *TINY, "trainer.max_batches=1", "trainer.compile=none"]
    assert reproduce.main([*argv, "jobs=2"]) == 0  # both runs at once, in two processes
    assert "GRAM: training into" in capfd.readouterr().out
    results = json.loads((out / "results.json").read_text())
    seconds = results["seconds"]
    assert "trained side by side; recipe" in results_table.note(results)
    assert results["jobs"] == 2 and results["wall_seconds"] == pytest.approx(max(seconds["train"].values())
                                                                             + seconds["eval"], abs=0.2)
    assert all((out / model / "checkpoint.pt").is_file() for model in ("gram", "trm"))


@pytest.mark.parametrize("native, model, expected", [
    (True, "Intel(R) Xeon(R) Platinum 8480C", "cpu (2 cores, Intel(R) Xeon(R) Platinum 8480C)"),
    (False, "AMD EPYC", "cpu (2 cores, AMD EPYC, no native bf16)"),
    (False, None, "cpu (2 cores, no native bf16)")])
def test_a_cpu_result_names_the_cpu_and_whether_bf16_is_native(monkeypatch, native, model, expected):
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(reproduce, "cpu_model", lambda: model)
    monkeypatch.setattr(reproduce, "native_bf16", lambda device: native)
    assert reproduce.device_name(torch.device("cpu")) == expected


def test_the_cpu_model_is_read_from_cpuinfo_or_is_none(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n"
                       "model name\t: AMD EPYC\n")
    assert reproduce.cpu_model(cpuinfo) == "AMD EPYC"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: ARM\n")
    assert reproduce.cpu_model(cpuinfo) is None
    assert reproduce.cpu_model(tmp_path / "missing") is None


def test_training_seconds_of_a_checkpoint_older_than_its_record_come_from_metrics_csv(tmp_path):
    old = {"format": FORMAT, **dict.fromkeys(REQUIRED, 0)}  # the entries a checkpoint needs, no seconds
    torch.save(old, tmp_path / "checkpoint.pt")
    assert training_seconds(tmp_path) == 0.0
    (tmp_path / "metrics.csv").write_text("batch,seconds,loss\n1,10.5,1.0\n2,21.25,0.9\n")
    assert training_seconds(tmp_path) == 21.25
    torch.save({**old, "seconds": 30.0}, tmp_path / "checkpoint.pt")
    assert training_seconds(tmp_path) == 30.0


def test_a_run_of_another_config_is_not_touched(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["task=nqueens", "budget=cpu", f"out={out}", *TINY, "trainer.max_batches=1"]
    assert reproduce.main(argv) == 0
    capsys.readouterr()
    assert reproduce.main([*argv, "model.dim=8"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds a run of another config (it differs in model.dim)" in error


@pytest.mark.parametrize("argv, message", [
    (["task=chess", "budget=cpu"], "unknown task 'chess'; allowed: coloring,"),
    (["task=nqueens", "budget=tpu"], "unknown budget 'tpu'; allowed: cpu, gpu"),
    (["budget=cpu"], "task=<name> is required"),
    (["task=nqueens"], "budget=<name> is required"),
    (["task=nqueens", "budget=cpu", "eval.select=[best]"], "unknown selector 'best' in eval.select"),
    (["task=nqueens", "budget=cpu", "eval.bogus=1"], "unknown config key 'eval.bogus'"),
    (["task=nqueens", "budget=cpu", "eval.prior_temperatures=[1]"], "must list positive numbers other than 1"),
    (["task=nqueens", "budget=cpu", "eval.prior_temperatures=[-0.5]"], "must list positive numbers other than 1"),
    (["task=nqueens", "budget=cpu", "eval.depth=0"], "eval.depth=0; allowed: null (the trained depth) or an"),
    (["task=nqueens", "budget=cpu", "publish=yes"], "publish='yes'; allowed: true, false"),
    (["task=nqueens", "budget=cpu", "jobs=3"], "jobs='3'; allowed: 1 (one run after the other), 2 (both runs"),
    (["task=nqueens", "budget=cpu", "train.trainer.max_batches=2"], "a dotted key cannot reach into a list"),
    (["task=nqueens", "budget=cpu", "gram=[model=gram,guide=gaussian]"], "gram=['model=gram','guide=gaussian']"),
])
def test_bad_names_are_one_line_errors(argv, message, capsys, tmp_path):
    assert reproduce.main([*argv, f"out={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("reproduce: error: ") and error.count("\n") == 1 and message in error
    assert not list(tmp_path.iterdir())


def test_results_table_renders_a_fixture_deterministically(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "nqueens-cpu.json").write_text(json.dumps(FIXTURE))
    page = tmp_path / "results.md"
    args = ["--results", str(folder), "--out", str(page)]
    assert results_table.main(args) == 0
    text = page.read_text()
    assert text.startswith((results_table.HERE / "results_header.md").read_text().rstrip("\n"))
    assert text.endswith((results_table.HERE / "results_footer.md").read_text())
    assert "| task | budget | device | model | accuracy | coverage@20 | paper |" in text
    assert "| N-Queens 8x8 | cpu | cpu (2 cores) | GRAM | 88.2 ± 2.1 | 94.5 ± 1.0 | accuracy 99.7, coverage 90.3 |" in text
    assert "| N-Queens 8x8 | cpu | cpu (2 cores) | TRM | 74.0 ± 3.0 | 69.5 ± 1.5 | accuracy 66.8, coverage 36.1 |" in text
    assert "| PTRM | 75.0 | 70.0 |  |" in text
    rows = ["| GRAM |", "| GRAM T=1.3 | 87.0 ± 2.0 |", "| TRM |", "| PTRM |"]
    assert [text.index(row) for row in rows] == sorted(text.index(row) for row in rows)
    assert "- `nqueens-cpu`: 772 test inputs, 20 prior trajectories each; 30.5 min in all on cpu (2 cores)" in text
    assert "| N-Queens 8x8 | cpu | accuracy >= 97.0 | 88.2; T=1.3: 87.0 | 97.0 | no; T=1.3: no |" in text
    assert "| N-Queens 8x8 | cpu | coverage@20 >= 90.0 | 94.5; T=1.3: 96.0 | 90.0 | yes; T=1.3: yes |" in text
    assert results_table.main([*args, "--check"]) == 0
    assert results_table.main(args) == 0 and page.read_text() == text
    page.write_text(text + "edited by hand\n")
    capsys.readouterr()
    assert results_table.main([*args, "--check"]) == 1
    assert "is not the rendering" in capsys.readouterr().err


def test_a_target_reads_its_bound_from_another_row_and_the_best_selection_rule():
    models = {"GRAM": {"accuracy": {"mean": 0.80}, "vote@20": {"mean": 0.90}, "lprm@20": {"mean": 0.93},
                       "conflicts": {"mean": 0.1}},
              "TRM": {"accuracy": {"mean": 0.84}, "conflicts": {"mean": 0.6}},
              "PTRM": {"vote@20": {"mean": 0.88}, "halt@20": {"mean": 0.95}}}
    Target, Of = results_table.Target, results_table.Of
    plus_ten = Target("best_rule@20", ">=", Of("TRM", "accuracy", plus=0.10))
    assert plus_ten.check(models, "GRAM") == (0.93, pytest.approx(0.94), False)
    assert plus_ten.text() == "best_rule@20 >= TRM's accuracy + 10.0"
    assert Target("best_rule@20", ">=", Of("PTRM", "best_rule@20")).check(models, "GRAM")[1:] == (0.95, False)
    fifth = Target("conflicts", "<=", Of("TRM", "conflicts", times=0.2))
    assert fifth.check(models, "GRAM") == (0.1, pytest.approx(0.12), True)
    assert fifth.text() == "conflicts <= 0.2 x TRM's conflicts"
    assert Target("accuracy", ">", 0.80).check(models, "GRAM")[2] is False  # strict


def test_a_value_that_would_read_like_its_bound_gets_more_decimals():
    assert results_table.apart("conflicts", [0.1466, 0.1527], 0.1519) == ["0.147", "0.153", "0.152"]
    assert results_table.apart("conflicts", [0.10, 0.30], 0.1519) == ["0.10", "0.30", "0.15"]
    assert results_table.apart("coverage@20", [0.1862], 0.1810) == ["18.6", "18.1"]
    assert results_table.apart("coverage@20", [0.90], 0.90) == ["90.0", "90.0"]  # equal: nothing to part
    assert results_table.apart("grids", [288.0], 250) == ["288", "250"]


def test_a_result_whose_recipe_file_has_changed_says_so():
    recipe = compose_config("reproduce/nqueens-cpu", [])
    current = {"task": "nqueens", "budget": "cpu", "recipe": {
        key: list(recipe[key]) for key in ("train", "gram", "trm")} | {"eval": {"samples": 20, "ptrm_sigma": 0.1}}}
    assert not results_table.recipe_changed(current)
    assert "; recipe `experiments/configs/reproduce/nqueens-cpu.yaml`" in results_table.note(
        {**current, "device": "cpu", "wall_seconds": 60, "test_inputs": 772, "samples": 20, "models": {}})
    spelled_out = {**current["recipe"], "gram": [*current["recipe"]["gram"], "model.noise=learned"]}  # the default
    assert not results_table.recipe_changed({**current, "recipe": spelled_out})
    for changed in [{**current["recipe"], "train": [*current["recipe"]["train"], "trainer.max_batches=100"]},
                    {**current["recipe"], "gram": [*current["recipe"]["gram"], "objective.beta=3"]},
                    {**current["recipe"], "eval": {"samples": 10}}]:
        assert results_table.recipe_changed({**current, "recipe": changed})
    assert results_table.recipe_changed({**current, "budget": "tpu"})  # no such recipe file any more


def test_a_result_trained_before_its_task_recipe_changed_says_so():
    """The configs a result records are what it trained: a change of the task's recipe file (which both
    the recorded and the current recipe compose alike) shows against them."""
    recipe = compose_config("reproduce/sudoku-cpu", [])
    configs = {key: OmegaConf.to_container(compose_config("train", [*recipe.train, *recipe[key], "run_dir=."]),
                                           resolve=True) for key in ("gram", "trm")}
    current = {"task": "sudoku", "budget": "cpu", "configs": configs, "recipe": {
        key: list(recipe[key]) for key in ("train", "gram", "trm")} | {"eval": {"samples": 20}}}
    assert not results_table.recipe_changed(current)
    threads = copy.deepcopy(configs)
    threads["gram"]["trainer"]["threads"] = 1  # how many threads it took changes nothing it trained
    assert not results_table.recipe_changed({**current, "configs": threads})
    before = copy.deepcopy(configs)
    before["gram"]["model"]["norm_after_noise"] = False  # the sudoku recipe of an earlier time
    assert results_table.recipe_changed({**current, "configs": before})


def test_results_table_rejects_a_foreign_file_and_leaves_throughput_files_out(tmp_path, capsys):
    (tmp_path / "throughput-cpu.json").write_text(json.dumps({"updates_per_s": 4.7, "rows": []}))
    assert results_table.load_results(tmp_path) == []
    (tmp_path / "x.json").write_text(json.dumps({"task": "nqueens"}))
    assert results_table.main(["--results", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2
    assert "not a results file (no 'budget')" in capsys.readouterr().err


def test_the_committed_results_page_is_the_rendering():
    assert results_table.main(["--check"]) == 0


SHORTCUT_SUMMARY = {"task": "coloring", "inputs": 255, "kl": {"total": 2.4001},
                    "shortcut": {"prior_accuracy": 0.7561, "posterior_accuracy": 0.7623, "gap": 0.0062,
                                 "threshold": 0.2, "flagged": False}}


def test_results_table_renders_the_shortcut_checks_and_rejects_a_foreign_summary(tmp_path, capsys):
    folder = tmp_path / "results"
    (folder / "shortcut").mkdir(parents=True)
    (folder / "nqueens-cpu.json").write_text(json.dumps(FIXTURE))
    (folder / "shortcut" / "coloring.json").write_text(json.dumps(SHORTCUT_SUMMARY))
    flagged = {**SHORTCUT_SUMMARY, "task": "nqueens10",
               "shortcut": {**SHORTCUT_SUMMARY["shortcut"], "posterior_accuracy": 0.99, "gap": 0.2339, "flagged": True}}
    (folder / "shortcut" / "nqueens10.json").write_text(json.dumps(flagged))
    page = tmp_path / "results.md"
    assert results_table.main(["--results", str(folder), "--out", str(page)]) == 0
    text = page.read_text()
    assert "| `coloring` | coloring | 255 | accuracy | 75.6 | 76.2 | +0.6 | 2.4 | no shortcut (threshold 20) |" in text
    assert "| `nqueens10` | nqueens10 | 255 | accuracy | 75.6 | 99.0 | +23.4 | 2.4 | shortcut (threshold 20) |" in text
    assert text.index("### N-Queens") < text.index("### Posterior shortcut check") < text.index("## `make demo`")
    (folder / "shortcut" / "x.json").write_text(json.dumps({"task": "coloring"}))
    assert results_table.main(["--results", str(folder), "--out", str(page)]) == 2
    assert "x.json: not a diagnose summary" in capsys.readouterr().err


def test_exported_weights_are_checked_as_deep_as_their_results(tmp_path, monkeypatch):
    out = tmp_path / "nqueens-cpu"
    assert reproduce.main(["task=nqueens", "budget=cpu", f"out={out}", *TINY, "trainer.max_batches=1",
                           "eval.depth=3"]) == 0
    monkeypatch.setattr(export_pretrained, "PRETRAINED", tmp_path / "pretrained")
    shipped = export_pretrained.export(out / "gram", "tiny", out / "results.json")
    record = json.loads((shipped / "check.json").read_text())
    assert record["check"]["depth"] == 3 and record["results"]["file"] == str(out / "results.json")
