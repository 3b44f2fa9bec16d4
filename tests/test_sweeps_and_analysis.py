"""Sweep files, the local sweep runner, Phi's variance, run loading, and the notebooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import tiny_imagenet_args
from dcd_lightning import create_model
from dcd_lightning.analysis import load_history, load_runs, load_wandb_runs, paper_comparison, phi_normalized_variance
from dcd_lightning.cli import main
from dcd_lightning.ops import DCDConv2d
from dcd_lightning.sweep import agent_command, expand, load_sweep, missing_configs, trials

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
EXPECTED_TRIALS = {"table1_formulation": 4, "table1_formulation_resnet18": 4, "table2_latent_mult": 4,
                   "table3a_blocks": 8, "table3b_placement": 8, "table4_operators": 19, "recipe_random": 10}
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=2"]


def test_there_is_a_sweep_per_table() -> None:
    assert {p.stem for p in SWEEPS} == set(EXPECTED_TRIALS)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_parses_and_expands(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = load_sweep(path)
    planned = trials(spec)
    assert len(planned) == EXPECTED_TRIALS[path.stem]
    assert spec["metric"] == {"name": "val/acc1", "goal": "maximize"}
    for trial in planned:
        assert trial.command[:5] == ["/usr/bin/env", "python", "-m", "dcd_lightning", "fit"]
        config = trial.command[trial.command.index("--config") + 1]
        assert (ROOT / config).is_file()
        for arg in trial.command[7:]:
            key, value = arg[2:].split("=", 1)
            assert value == str(trial.values[key])  # the agent writes str(value)
            if key == "config":
                assert (ROOT / value).is_file()
        # W&B refuses a tag over 64 characters (and the run): config files are tagged by name
        assert all(len(tag) <= 64 for tag in trial.tags()), trial.tags()
        if "config" in trial.values:
            assert f"config={Path(trial.values['config']).stem}" in trial.tags()
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{EXPECTED_TRIALS[path.stem]} trial(s)" in out
    assert out.count("[trial ") == EXPECTED_TRIALS[path.stem]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_first_trial_runs_through_the_agent_command(path: Path, image_folder: Path, tmp_path: Path) -> None:
    trial = trials(load_sweep(path), count=1)[0]
    extra = [*tiny_imagenet_args(image_folder), "--data.init_args.train_crop=32", "--data.init_args.eval_resize=36",
             "--data.init_args.eval_crop=32", "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"]
    assert trial.command[:4] == ["/usr/bin/env", "python", "-m", "dcd_lightning"]
    if path.stem == "table2_latent_mult":  # one of them as a separate process, exactly as the agent starts it
        command = [sys.executable if c == "python" else c for c in trial.command] + extra
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                                env=dict(os.environ, WANDB_MODE="offline"))
        assert result.returncode == 0, result.stderr[-3000:]
    else:  # the others in this process: the same arguments, without the interpreter start-up
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            assert main(trial.command[4:] + extra) == 0
        finally:
            os.chdir(cwd)


def test_sweep_values_that_str_cannot_round_trip_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "grid", "parameters": {"model.init_args.lr": {"values": [0.1, None]}}}))
    with pytest.raises(ValueError, match=r"value None.*use the string 'null'"):
        load_sweep(bad)
    bad.write_text(yaml.safe_dump({"method": "hyperband", "parameters": {"a": {"value": 1}}}))
    with pytest.raises(ValueError, match="method='hyperband' is not allowed"):
        load_sweep(bad)
    with pytest.raises(ValueError, match="bayes"):
        expand({"method": "bayes", "parameters": {"a": {"values": [1, 2]}}})
    bad.write_text("method: grid\nparameters:\n  model.init_args.lr: {values: [${lr}, 0.1}\n")
    with pytest.raises(ValueError, match=r"(?s)sweep: .*bad.yaml is not valid YAML: .*line 3"):
        load_sweep(bad)


@pytest.mark.parametrize(("args", "message"), [
    (["recipe_random.yaml", "--method", "grid"], "grid search needs 'values' for parameter"),
    (["table2_latent_mult.yaml", "--count", "-1"], "argument --count: -1 is too small; expected 1 or more"),
    (["table2_latent_mult.yaml", "--count", "0"], "argument --count: 0 is too small"),
    (["no_such_sweep.yaml"], "no_such_sweep.yaml is not a file; expected a W&B sweep file"),
])
def test_sweep_command_reports_bad_input(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    args[0] = str(ROOT / "configs" / "sweeps" / args[0])
    with pytest.raises(SystemExit) as stop:
        main(["sweep", *args, "--dry-run"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_sweep_run_where_its_config_paths_do_not_lead_says_so_before_any_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sweep files name configs relative to the repository root: run from elsewhere, every trial
    used to fail in turn, each with the parser's error; now the sweep stops first and says why."""
    monkeypatch.chdir(tmp_path)
    sweep = str(ROOT / "configs" / "sweeps" / "table2_latent_mult.yaml")
    with pytest.raises(SystemExit) as stop:
        main(["sweep", sweep, "--count", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "config file(s) ['configs/paper/table2_mobilenetv2_x0.5_dcd_pw.yaml'] do not exist from this folder" in err
    assert "run it from the repository root" in err
    assert main(["sweep", sweep, "--dry-run"]) == 0  # listed, with the note
    assert "sweep table2_latent_mult: note: the trials' config file(s)" in capsys.readouterr().out
    monkeypatch.chdir(ROOT)
    assert main(["sweep", sweep, "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert missing_configs(["fit", "--config", "{trainer: {max_epochs: 1}}", "--config=configs/quickstart.yaml"]) == []


def test_a_sweep_over_config_files_puts_every_trial_under_one_folder(capsys: pytest.CaptureFixture[str]) -> None:
    """The row configs of a table each have their own default_root_dir (runs/paper/<model>): the
    trials go under the folder holding them all, so load_runs(<root>/<sweep>) finds every one."""
    assert main(["sweep", str(ROOT / "configs/sweeps/table1_formulation.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "every trial goes under runs/paper/table1_formulation" in out
    assert out.count("--trainer.default_root_dir=runs/paper\n") == out.count("[trial ") == 4
    assert main(["sweep", str(ROOT / "configs/sweeps/table2_latent_mult.yaml"), "--dry-run"]) == 0
    assert "default_root_dir" not in capsys.readouterr().out  # one config: its own root


def test_random_search_is_seeded_and_in_range() -> None:
    spec = load_sweep(ROOT / "configs" / "sweeps" / "recipe_random.yaml")
    first, again = expand(spec, count=6, seed=3), expand(spec, count=6, seed=3)
    assert first == again and len(first) == 6
    assert all(0.01 <= t["model.init_args.lr"] <= 0.2 for t in first)
    assert agent_command({"program": "train.py"}, {"a.b": 1}) == ["/usr/bin/env", "python", "train.py", "--a.b=1"]


def test_local_sweep_runs_each_trial_as_its_own_run(small_runs: dict[str, Path]) -> None:
    """The fixture's `sweep --count 2` of table2_latent_mult: each trial a run of its own, with its checkpoint."""
    root = small_runs["sweep"]
    runs = load_runs(root)
    assert sorted(runs["latent_mult"]) == [0.25, 0.5]
    assert {Path(r).relative_to(root).parts[:2] for r in runs["run"]} == {("table2_latent_mult", "trial-000"),
                                                                          ("table2_latent_mult", "trial-001")}
    for trial in ("trial-000", "trial-001"):
        assert (root / "table2_latent_mult" / trial / "checkpoints" / "last.ckpt").is_file()


# -- Phi's normalized variance -------------------------------------------------------------------


def test_phi_variance_equals_its_definition() -> None:
    torch.manual_seed(0)
    op = DCDConv2d(16, 24, 1, reduction=2)
    images = [torch.randn(5, 16, 6, 6) * 2 + 1, torch.randn(3, 16, 6, 6)]
    result = phi_normalized_variance(torch.nn.Sequential(op), images)
    with torch.no_grad():
        phis = torch.cat([op.coefficients(x)[1].flatten(1) for x in images]).double()
    everything = torch.cat([x.flatten() for x in images]).double()
    expected = phis.var(dim=0, unbiased=False).mean() / everything.var(unbiased=False)
    assert result == {"0": pytest.approx(expected.item(), rel=1e-9)}
    same = phi_normalized_variance(torch.nn.Sequential(op), [images[0][:1].repeat(4, 1, 1, 1)])
    assert same["0"] == pytest.approx(0.0, abs=1e-12)  # one image repeated: nothing varies


def test_phi_variance_monitor_skips_the_images_labelled_as_repeats() -> None:
    """Under DDP, EvalShard's repeated images come labelled -1: the monitor counts each image once."""
    from dcd_lightning.analysis import _PhiStatistics
    from dcd_lightning.callbacks import PhiVarianceMonitor

    torch.manual_seed(0)
    op = DCDConv2d(16, 24, 1, reduction=2).eval()
    images, labels = torch.randn(6, 16, 6, 6), torch.tensor([0, 1, 2, 0, -1, -1])
    monitor = PhiVarianceMonitor()
    monitor._stats = _PhiStatistics([("0", op)])
    monitor._stats.attach()
    monitor.on_validation_batch_start(None, None, (images, labels), 0)
    with torch.no_grad():
        op(images)
    monitor._stats.detach()
    counted = _PhiStatistics.normalized_variance(monitor._stats.as_tensor("0"))
    assert monitor._stats.sums["0"][0] == 4
    assert counted == pytest.approx(phi_normalized_variance(torch.nn.Sequential(op), [images[:4]])["0"], rel=1e-9)


def test_phi_variance_covers_every_dcd_layer_of_a_model() -> None:
    model = create_model("mobilenetv2_x0.5_dcd_dw_pw", num_classes=10)
    result = phi_normalized_variance(model, [torch.randn(2, 3, 32, 32)])
    assert len(result) == 17 + 32  # 17 depthwise DCD layers, 2 pointwise in each of 16 blocks
    assert all(v >= 0 for v in result.values())


def test_phi_variance_names_the_layers_whose_phi_it_never_saw() -> None:
    """A copy from optimize_for_inference computes Phi in its folds, without the branch module the
    statistics watch: no value, and a warning that names the layers (not a silent empty result)."""
    from types import SimpleNamespace

    from dcd_lightning import optimize_for_inference
    from dcd_lightning.analysis import _PhiStatistics
    from dcd_lightning.callbacks import PhiVarianceMonitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(DCDConv2d(16, 24, 1, reduction=2), torch.nn.BatchNorm2d(24), DCDConv2d(24, 8, 1, reduction=2))
    images = [torch.randn(3, 16, 6, 6)]
    assert set(phi_normalized_variance(model, images)) == {"0", "2"}
    with pytest.warns(UserWarning, match=r"phi_normalized_variance: no Phi was seen for 2 of 2 DCD layers \(0, 2\).*"
                                         r"optimize_for_inference \(measure the model before it\)"):
        assert phi_normalized_variance(optimize_for_inference(model, fold_batch_norms=False), images) == {}

    # the callback: one layer ran, one did not
    model = torch.nn.Sequential(DCDConv2d(16, 24, 1, reduction=2), DCDConv2d(16, 8, 1, reduction=2)).eval()
    monitor, logged = PhiVarianceMonitor(), {}
    monitor._stats = _PhiStatistics([("0", model[0]), ("1", model[1])])
    monitor._stats.attach()
    with torch.no_grad():
        model[0](images[0])
    monitor._batches = 1
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(reduce=lambda value, reduce_op: value))
    module = SimpleNamespace(log=lambda key, value, **kwargs: logged.__setitem__(key, value))
    with pytest.warns(UserWarning, match=r"PhiVarianceMonitor: no Phi was seen for 1 of 2 DCD layers \(1\)"):
        monitor.on_validation_epoch_end(trainer, module)
    assert list(logged) == ["phi_var/00_0"]


# -- runs, notebooks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A DCD and a DY-Conv run on digits (with Phi's variance logged), and a two-trial latent sweep."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--config", QUICKSTART, "--data.init_args.image_size=8", "--trainer.max_epochs=2",
              "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
              "--trainer.log_every_n_steps=1"]
    assert main(["fit", *common, f"--trainer.default_root_dir={root / 'dcd'}",
                 "--trainer.callbacks+=dcd_lightning.analysis.PhiVarianceMonitor"]) == 0
    assert main(["fit", *common, f"--trainer.default_root_dir={root / 'dyconv'}",
                 "--model.init_args.backbone.init_args.conv.class_path=dcd_lightning.ops.DyConv2d"]) == 0
    sweep = ROOT / "configs" / "sweeps" / "table2_latent_mult.yaml"
    image_root = root / "images"
    from conftest import write_image_folder

    write_image_folder(image_root)
    csv_only = ('--trainer.logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger", '
                '"init_args": {"save_dir": ".", "name": "mobilenetv2_x0.5_dcd_pw"}}]')
    assert main(["sweep", str(sweep), "--count", "2", "--extra", *tiny_imagenet_args(image_root), *FAST, csv_only,
                 f"--trainer.default_root_dir={root / 'sweep'}"]) == 0
    (dcd_run,) = (root / "dcd").glob("*/version_0")
    (dyconv_run,) = (root / "dyconv").glob("*/version_0")
    return {"dcd": dcd_run, "dyconv": dyconv_run, "sweep": root / "sweep"}


def test_history_and_runs_tables(small_runs: dict[str, Path]) -> None:
    history = load_history(small_runs["dcd"])
    assert list(history.index) == [0, 1]
    assert {"train/error", "val/error"} <= set(history.columns)
    assert sum(c.startswith("phi_var/") for c in history.columns) == 9  # 8 DCD convolutions + the classifier
    dy = load_history(small_runs["dyconv"])
    assert dy["train/temperature"].dropna().iloc[-1] < 30
    runs = load_runs(small_runs["sweep"])
    assert sorted(runs["latent_mult"]) == [0.25, 0.5]
    table = paper_comparison(runs, "table2_mobilenetv2_x0.5_latent_multiplier")
    assert list(table["paper row"]) == [1, 2] and list(table["top1 (paper)"]) == [68.7, 69.0]
    assert paper_comparison(runs, "table2").equals(table)  # a unique prefix names the table
    with pytest.raises(KeyError, match=r"no table 'table9'; expected one of \['table1a_mobilenetv2_x0.5_formulations'"):
        paper_comparison(runs, "table9")
    other = runs.assign(name="resnet10_dcd")  # another backbone's runs are not Table 2's rows
    assert paper_comparison(other, "table2")["paper row"].isna().all()


def _logged_run(folder: Path, config: dict, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    columns = sorted({key for row in rows for key in row})
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_runs_table_joins_resumed_runs_and_leaves_out_evaluations(tmp_path: Path) -> None:
    def config(root: str, lr: float, tags: list[str], **more: object) -> dict:
        logger = [{"class_path": "CSVLogger", "init_args": {"name": "logs"}},
                  {"class_path": "WandbLogger", "init_args": {"name": root, "tags": tags}}]
        return {"trainer": {"default_root_dir": root, "logger": logger}, "model": {"init_args": {"lr": lr}}, **more}

    def epochs(first: int, accuracies: list[float]) -> list[dict]:
        return [row for e, acc in enumerate(accuracies, first)
                for row in ({"epoch": e, "train/loss_epoch": 1.0}, {"epoch": e, "val/acc1": acc, "val/acc5": 0.9})]

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _logged_run(tmp_path / "a" / "logs" / "version_0", config(a, 0.1, ["lr=0.1"]), epochs(0, [0.2, 0.5]))
    _logged_run(tmp_path / "a" / "logs" / "version_1", config(a, 0.1, ["lr=0.1"], ckpt_path="last"),
                epochs(1, [0.55, 0.6, 0.4]))  # resumed mid-epoch 1
    _logged_run(tmp_path / "a" / "logs" / "version_2", {**config(a, 0.1, ["lr=0.1"]), "verbose": True},
                [{"epoch": 0, "val/acc1": 0.4}])  # validate
    _logged_run(tmp_path / "b" / "logs" / "version_0", config(b, 0.2, ["lr=0.2"]), epochs(0, [0.3, 0.35]))
    stopped = tmp_path / "c" / "logs" / "version_0"  # stopped before its first logged step: named, not a row
    stopped.mkdir(parents=True)
    (stopped / "config.yaml").write_text(yaml.safe_dump(config(str(tmp_path / "c"), 0.3, ["lr=0.3"])))
    with pytest.warns(UserWarning, match=rf"left out 1 run folder\(s\) with a config but no metrics.csv .*{stopped}"):
        runs = load_runs(tmp_path).set_index("lr")
    assert sorted(runs.columns) == ["epochs", "name", "run", "val/acc1_best", "val/acc1_last", "val/acc5_best"]
    assert runs.loc[0.1, "epochs"] == 4 and runs.loc[0.1, "val/acc1_best"] == 0.6
    assert runs.loc[0.1, "val/acc1_last"] == 0.4 and runs.loc[0.1, "name"] == "logs"
    assert runs.loc[0.2, "epochs"] == 2 and runs.loc[0.2, "val/acc1_best"] == 0.35


def test_wandb_loader_builds_the_same_table_from_the_api() -> None:
    fake_run = SimpleNamespace(id="abc", name="trial", tags=["latent_mult=0.5"], summary={"val/acc1": 0.7},
                               config={"model": {"init_args": {"lr": 0.05}}, "_wandb": {}})
    api = SimpleNamespace(sweep=lambda path: SimpleNamespace(runs=[fake_run]), runs=lambda path: [fake_run])
    table = load_wandb_runs("me/dcd/sweep123", api=api)
    assert table.loc[0, "model.init_args.lr"] == 0.05 and table.loc[0, "val/acc1_last"] == 0.7


@pytest.mark.parametrize("notebook", ["convergence", "phi_variance", "ablation_tables"])
def test_notebook_executes_on_small_runs(notebook: str, small_runs: dict[str, Path], tmp_path: Path) -> None:
    import papermill

    parameters = {
        "convergence": {"dcd_run": str(small_runs["dcd"]), "dyconv_run": str(small_runs["dyconv"])},
        # the DY-Conv run has no Phi: left out with a warning, not a crash
        "phi_variance": {"runs": {"ResNet-10 DCD": str(small_runs["dcd"]), "DY-Conv": str(small_runs["dyconv"])}},
        "ablation_tables": {"sweep_dir": str(small_runs["sweep"]), "table": "table2_mobilenetv2_x0.5_latent_multiplier"},
    }[notebook]
    figure = tmp_path / f"{notebook}.png"
    papermill.execute_notebook(str(ROOT / "notebooks" / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={**parameters, "output": str(figure)}, kernel_name="python3",
                               cwd=str(ROOT), progress_bar=False)
    assert figure.stat().st_size > 10_000  # a real plot was drawn
