"""Training end to end through the CLI: paper configs, quickstart, DDP, resume, errors, logging."""

from __future__ import annotations

import csv
import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_imagenet_args, write_image_folder

from dcd_lightning.callbacks import TemperatureSchedule
from dcd_lightning.classifier import UNBOUNDED_STEPS, ImageClassifier, mix_batch, stepping
from dcd_lightning.cli import SIGTERM_STATUS, describe_run, main
from dcd_lightning.data import DigitsDataModule
from dcd_lightning.data.imagenet import CorruptImageError
from dcd_lightning.loggers import wandb_can_sync
from dcd_lightning.models import create_model
from dcd_lightning.paper_configs import config_files
from dcd_lightning.profile_cmd import model_from_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def fit(*args: str) -> None:
    assert main(["fit", *args]) == 0


def metrics(root: Path) -> list[dict[str, str]]:
    (path,) = glob.glob(str(root / "**" / "metrics.csv"), recursive=True)
    return list(csv.DictReader(open(path)))


def _one_file_per_model() -> list[str]:
    """Each registry model's first paper config (files of the same model differ only in comments)."""
    chosen: dict[str, str] = {}
    for filename in sorted(config_files()):
        chosen.setdefault(filename.split("_", 1)[1], filename)
    return sorted(chosen.values())


def test_paper_configs_of_one_model_are_the_same_config() -> None:
    files = config_files()
    body = {name: "\n".join(line for line in text.splitlines() if not line.startswith("#") and "group:" not in line)
            for name, text in files.items()}  # the W&B group is the file's table
    for filename, text in body.items():
        assert text == body[next(f for f in _one_file_per_model() if f.split("_", 1)[1] == filename.split("_", 1)[1])]


def test_paper_configs_are_grouped_by_their_table() -> None:
    for filename, text in config_files().items():
        group = yaml.safe_load(text)["trainer"]["logger"][1]["init_args"]["group"]
        assert group.startswith(filename.split("_", 1)[0]), (filename, group)


@pytest.mark.parametrize("filename", _one_file_per_model())
def test_every_paper_config_fits_on_a_tiny_image_folder(filename: str, image_folder: Path, tmp_path: Path) -> None:
    fit("--config", str(ROOT / "configs" / "paper" / filename), *tiny_imagenet_args(image_folder),
        "--data.init_args.train_crop=32", "--data.init_args.eval_resize=36", "--data.init_args.eval_crop=32",
        "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}")


def test_quickstart_reaches_95_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's main job: above 95% on digits, its files under default_root_dir and nothing in
    the working folder. The run stops once validation reaches 95% (the mark checked here; epoch 3
    of 6 when measured, half the test's time), with the quickstart's own schedule and settings
    otherwise. (`python -m dcd_lightning fit --config QUICKSTART` in a new process is the SIGTERM
    test below; DDP processes are test_shards.py's.)"""
    here, root = tmp_path / "cwd", tmp_path / "out"
    here.mkdir()
    monkeypatch.chdir(here)
    at_95 = ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping", "--trainer.callbacks.monitor=val/acc1",
             "--trainer.callbacks.mode=max", "--trainer.callbacks.stopping_threshold=0.95",
             "--trainer.callbacks.patience=1000"]
    fit("--config", QUICKSTART, *QUIET, *at_95, f"--trainer.default_root_dir={root}")
    best = max(float(row["val/acc1"]) for row in metrics(root) if row.get("val/acc1"))
    assert best >= 0.95
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert list((root / "checkpoints").glob("best-*.ckpt"))
    assert list(root.glob("*/version_0/config.yaml"))
    assert not list(here.iterdir())


RESUME_ARGS = [
    "--config", QUICKSTART, *QUIET,
    "--data.init_args.augment=false", "--data.init_args.image_size=8", "--data.init_args.batch_size=16",
    "--model.init_args.backbone.init_args.conv.class_path=dcd_lightning.ops.DyConv2d",
    "--model.init_args.backbone.init_args.conv.init_args.num_kernels=2",
    "--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
    "--temperature.epochs=2",
]


def _interrupted_fit(*args: str) -> None:
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            fit(*args)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a KeyboardInterrupt


@pytest.mark.parametrize("workers", [0, 2])  # with workers a loader draws its first indices before the epoch is set
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, workers: int) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*RESUME_ARGS, f"--data.init_args.num_workers={workers}"]
    fit(*args, f"--trainer.default_root_dir={straight}")
    _interrupted_fit(*args, f"--trainer.default_root_dir={resumed}",
                     "--trainer.callbacks+=_training_helpers.InterruptAtEpoch", "--trainer.callbacks.epoch=1")
    stopped = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert (stopped["epoch"], stopped["global_step"]) == (0, 3)
    fit(*args, f"--trainer.default_root_dir={resumed}", "--ckpt_path=last")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (2, 9)
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    temperatures = [v for k, v in b["state_dict"].items() if k.endswith("temperature")]
    assert temperatures and all(float(t) == 1.0 for t in temperatures)  # schedule over 2 epochs ended
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.allclose(state_a["momentum_buffer"], state_b["momentum_buffer"], atol=1e-6)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 9


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_mid_epoch_resumes_with_the_batches_not_yet_seen(tmp_path: Path, workers: int) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*RESUME_ARGS, f"--data.init_args.num_workers={workers}"]
    fit(*args, f"--trainer.default_root_dir={straight}")
    _interrupted_fit(*args, f"--trainer.default_root_dir={resumed}",
                     "--trainer.callbacks+=_training_helpers.InterruptAtStep", "--trainer.callbacks.step=4")
    stopped = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert (stopped["epoch"], stopped["global_step"]) == (1, 4)
    fit(*args, f"--trainer.default_root_dir={resumed}", "--ckpt_path=last")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 9
    for key, value in a["state_dict"].items():  # the same batches in the same order: the same weights
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key


def test_a_mid_epoch_resume_with_another_batch_size_is_refused(tmp_path: Path) -> None:
    """A mid-epoch position is one of a batch size and a number of processes: resumed with another,
    the run would skip other samples than it trained on. It stops before training, naming both,
    and leaves the checkpoint as it was."""
    _interrupted_fit(*RESUME_ARGS, f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.callbacks+=_training_helpers.InterruptAtStep", "--trainer.callbacks.step=4")
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ValueError, match=r"by 1 process\(es\) at batch_size 16; this run has 1 at batch_size 8"):
        fit(*RESUME_ARGS, "--data.init_args.batch_size=8", f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last")
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before
    fit(*RESUME_ARGS, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last")  # the same batch size resumes
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 9


@pytest.mark.parametrize("val_every", [1, 2])
def test_last_checkpoint_is_the_last_epoch_when_the_score_does_not_improve(tmp_path: Path, val_every: int) -> None:
    """Monitoring the epoch with mode=min makes epoch 0 the only best one: last.ckpt must still move on."""
    fit("--config", QUICKSTART, *QUIET, "--data.init_args.image_size=8", "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.check_val_every_n_epoch={val_every}", "--checkpoint.monitor=epoch", "--checkpoint.mode=min")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert len(list((tmp_path / "checkpoints").glob("best-*.ckpt"))) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_augmentation_mixup_and_dropout_is_exact(tmp_path: Path, workers: int) -> None:
    """Random draws are seeded per sample (augmentation) and per step (mixup, dropout), not carried
    in a generator's state: a run stopped mid-epoch and resumed ends with the uninterrupted run's
    weights, and the number of loader workers changes nothing."""
    random = ["--data.init_args.augment=true", "--model.init_args.mixup_alpha=0.4",
              "--model.init_args.backbone.init_args.dropout=0.3"]
    straight, resumed, other = tmp_path / "straight", tmp_path / "resumed", tmp_path / "other"
    args = [*RESUME_ARGS, *random, f"--data.init_args.num_workers={workers}"]
    fit(*args, f"--trainer.default_root_dir={straight}")
    _interrupted_fit(*args, f"--trainer.default_root_dir={resumed}",
                     "--trainer.callbacks+=_training_helpers.InterruptAtStep", "--trainer.callbacks.step=4")
    fit(*args, f"--trainer.default_root_dir={resumed}", "--ckpt_path=last")
    fit(*RESUME_ARGS, *random, f"--data.init_args.num_workers={2 - workers}", f"--trainer.default_root_dir={other}")
    a, b, c = (torch.load(root / "checkpoints" / "last.ckpt", weights_only=False) for root in (straight, resumed, other))
    assert a["global_step"] == b["global_step"] == c["global_step"] == 9
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
        assert torch.allclose(value.float(), c["state_dict"][key].float(), atol=1e-6), key


def test_sigterm_leaves_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    steps = 5  # per epoch
    short = ["--data.init_args.image_size=8", f"--trainer.limit_train_batches={steps}", "--trainer.limit_val_batches=2"]
    args = [sys.executable, "-m", "dcd_lightning", "fit", "--config", QUICKSTART, *QUIET, *short,
            "--trainer.max_epochs=1000", f"--trainer.default_root_dir={tmp_path}"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    try:
        for _ in range(600):  # wait (up to a minute) for the first epoch's checkpoint
            if last.exists():
                break
            time.sleep(0.1)
        assert last.exists(), "no checkpoint after a minute"
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    # saved now, or at the epoch's end just before the signal (then nothing was left to save)
    assert "SIGTERMException: saved the last completed step" in output or (
        "SIGTERMException: " in output and "already holds the last completed step" in output), output[-2000:]
    assert process.returncode == SIGTERM_STATUS, f"a run stopped by SIGTERM exited {process.returncode}"
    stopped = torch.load(last, weights_only=False)
    assert stopped["global_step"] >= steps  # at least the first epoch is kept
    fit("--config", QUICKSTART, *QUIET, *short, f"--trainer.max_epochs={stopped['epoch'] + 2}",
        f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last")
    assert torch.load(last, weights_only=False)["global_step"] == steps * (stopped["epoch"] + 2)


def test_predict_saves_probabilities_that_the_checkpoint_computes(tmp_path: Path) -> None:
    short = [*QUIET, "--data.init_args.image_size=8", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
             "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"]
    fit("--config", QUICKSTART, *short)
    assert main(["predict", "--config", QUICKSTART, *short, "--ckpt_path=last"]) == 0
    saved = torch.load(tmp_path / "predictions.pt")
    data = DigitsDataModule(image_size=8)
    data.setup("predict")
    images, labels = next(iter(torch.utils.data.DataLoader(data.splits["test"], batch_size=10_000)))
    model, _ = model_from_config([QUICKSTART], [])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()})
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(images), dim=1)
    assert saved["probabilities"].shape == (len(labels), 10)
    assert torch.equal(saved["index"], torch.arange(len(labels)))  # the test split, in order
    assert torch.equal(saved["targets"], labels)
    torch.testing.assert_close(saved["probabilities"], expected, rtol=1e-4, atol=1e-5)
    # the other evaluation commands find this folder's checkpoints by name, and say so where there are none
    for name in ("best", "last"):
        assert main(["validate", "--config", QUICKSTART, *short, f"--ckpt_path={name}"]) == 0
        with pytest.raises(FileNotFoundError, match=rf"validate --ckpt_path {name}: no .* in {tmp_path / 'empty'}"):
            main(["validate", "--config", QUICKSTART, *short, f"--ckpt_path={name}",
                  f"--trainer.default_root_dir={tmp_path / 'empty'}"])


def test_predict_on_image_folders_keeps_the_class_names(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data")
    bad = min((root / "val" / "n01443537").glob("*.JPEG"))
    bad.write_bytes(b"not a jpeg")
    config = str(ROOT / "configs" / "paper" / "table4_resnet18_static.yaml")
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        assert main(["predict", "--config", config, *tiny_imagenet_args(root), "--data.init_args.skip_corrupt=true",
                     "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                     f"--predictions.path={tmp_path / 'out' / 'p.pt'}"]) == 0
    saved = torch.load(tmp_path / "out" / "p.pt")
    assert saved["classes"] == sorted(path.name for path in (root / "val").iterdir())
    assert saved["probabilities"].shape == (5, 3) and len(saved["targets"]) == 5  # 6 images, 1 unreadable
    assert "index" not in saved  # a batch lost a row: the sampler's indices no longer match


def test_a_run_starts_from_init_weights_and_refuses_to_resume_from_weights_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning.pytorch import LightningDataModule, LightningModule

    from dcd_lightning.lightning_cli import DCDLightningCLI

    short = [*QUIET, "--data.init_args.image_size=8", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
             "--trainer.limit_val_batches=2", "--trainer.logger=false"]
    fit("--config", QUICKSTART, *short, f"--trainer.default_root_dir={tmp_path / 'first'}")
    trained = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    import lightning

    weights_only = {"state_dict": {k: v for k, v in trained.items() if k.startswith("model.")},
                    "pytorch-lightning_version": lightning.__version__}  # what import-official writes
    torch.save(weights_only, tmp_path / "weights.ckpt")
    torch.save({k.removeprefix("model."): v for k, v in weights_only["state_dict"].items()}, tmp_path / "backbone.pt")

    def validate(*args: str) -> float:
        cli = DCDLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                              run=False, save_config_callback=None,
                              args=["--config", QUICKSTART, *short, f"--trainer.default_root_dir={tmp_path}", *args])
        (result,) = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)
        return result["val/loss"]

    fresh = validate()
    restored = validate(f"--model.init_args.init_weights={tmp_path / 'weights.ckpt'}")
    assert restored == validate(f"--model.init_args.init_weights={tmp_path / 'backbone.pt'}") != fresh
    cli = DCDLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          run=False, save_config_callback=None,
                          args=["--config", QUICKSTART, *short, f"--trainer.default_root_dir={tmp_path}"])
    (expected,) = cli.trainer.validate(cli.model, cli.datamodule, verbose=False,
                                       ckpt_path=str(tmp_path / "first" / "checkpoints" / "last.ckpt"))
    assert restored == expected["val/loss"]
    with pytest.raises(ValueError, match=r"holds weights only .* --model.init_args.init_weights FILE instead"):
        fit("--config", QUICKSTART, *short, f"--trainer.default_root_dir={tmp_path / 'second'}",
            f"--ckpt_path={tmp_path / 'weights.ckpt'}")
    with pytest.raises(SystemExit) as stop:  # a constructor's check: reported as a usage error
        fit("--config", QUICKSTART, *short, "--model.init_args.init_weights=nowhere.pt")
    assert stop.value.code == 2 and "init_weights='nowhere.pt' is not a file" in capsys.readouterr().err
    fit("--config", QUICKSTART, *short, f"--trainer.default_root_dir={tmp_path / 'second'}",
        f"--model.init_args.init_weights={tmp_path / 'weights.ckpt'}")
    assert "init_weights" not in torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt",
                                            weights_only=False)["hyper_parameters"]


def test_a_resume_that_changes_the_schedule_says_so(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    short = [*QUIET, "--data.init_args.image_size=8", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
             "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    fit("--config", QUICKSTART, *short, "--trainer.max_epochs=2")
    fit("--config", QUICKSTART, *short, "--trainer.max_epochs=2", "--ckpt_path=last")  # the same span: quiet
    assert not [w for w in recwarn if "LR schedule spans" in str(w.message)]
    with pytest.warns(UserWarning, match=r"the checkpoint's LR schedule spans 4 optimizer steps \(2 per epoch\), "
                                         r"this run's 6 \(2 per epoch\).* from step 4, so the LR moves from 0 to 0\.01727 there"):
        fit("--config", QUICKSTART, *short, "--trainer.max_epochs=3", "--ckpt_path=last")


def test_fit_from_last_without_a_checkpoint_says_it_starts_anew(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fit("--config", QUICKSTART, *QUIET, "--data.init_args.image_size=8", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        "--ckpt_path=last")
    assert f"no last.ckpt in {tmp_path / 'checkpoints'}, so this run starts from the beginning" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_runs_sharing_a_log_folder_keep_their_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config", QUICKSTART, *QUIET, "--data.init_args.image_size=8", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=2",
            "--trainer.logger.init_args.version=shared", f"--trainer.default_root_dir={tmp_path}"]
    fit(*args, "--model.init_args.lr=0.01")
    time.sleep(1.1)
    capsys.readouterr()
    fit(*args, "--model.init_args.lr=0.02")
    configs = sorted((tmp_path / "digits_resnet10_dcd" / "shared").glob("config*.yaml"))
    assert len(configs) == 2
    assert {yaml.safe_load(c.read_text())["model"]["init_args"]["lr"] for c in configs} == {0.01, 0.02}
    (reported,) = {line.split("resolved config: ")[1] for line in capsys.readouterr().out.splitlines()
                   if "resolved config: " in line}  # the second run's own file
    assert yaml.safe_load(Path(reported).read_text())["model"]["init_args"]["lr"] == 0.02
    # limit_train_batches=1 is one batch (an int), not all of them (1.0)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_data_channels_that_the_backbone_does_not_take_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"DigitsDataModule gives images with 1 channels, but the backbone takes 3 "
                                         r"\(its in_chans\); set model.init_args.backbone.init_args.in_chans=1"):
        fit("--config", QUICKSTART, *QUIET, "--data.init_args.channels=1", f"--trainer.default_root_dir={tmp_path}")
    fit("--config", QUICKSTART, *QUIET, "--data.init_args.channels=1", "--data.init_args.image_size=8",
        "--model.init_args.backbone.init_args.in_chans=1", "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}")


def test_a_backbone_that_cannot_be_built_says_what_an_operator_parameter_needs() -> None:
    """'got multiple values' can be jsonargparse's two-int Callable called with five ints, or the
    backbone's own mistake: the advice is conditional there, and plain for a Namespace."""
    def shifted(in_channels, out_channels):
        return torch.nn.Conv2d(in_channels, out_channels, 1)

    def calls_positionally(num_classes):
        return shifted(3, 8, out_channels=8)

    with pytest.raises(TypeError, match=r"got multiple values for argument 'out_channels'\. If the backbone called an "
                                        r"operator given as a class_path: a backbone parameter that takes an operator"):
        ImageClassifier(backbone=calls_positionally, num_classes=4)

    def given_a_namespace(num_classes):
        return SimpleNamespace()(3, 8)

    with pytest.raises(TypeError, match=r"^'types.SimpleNamespace' object is not callable$"):  # not jsonargparse's: no advice
        ImageClassifier(backbone=given_a_namespace, num_classes=4)


def test_a_notebook_loads_a_trained_model_with_load_from_checkpoint(tmp_path: Path) -> None:
    """ImageClassifier.load_from_checkpoint rebuilds the run's model from the checkpoint alone
    (the backbone's config is in its hyperparameters); a backbone given in Python as a lambda is
    left out of them, so that checkpoints of such a module still pickle."""
    fit("--config", QUICKSTART, *QUIET, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}")
    path = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["hyper_parameters"]["backbone"]["class_path"] == "dcd_lightning.models.ResNet"
    module = ImageClassifier.load_from_checkpoint(path).eval()
    assert module.hparams.num_classes == 10 and type(module.model).__name__ == "ResNet"
    state = module.state_dict()
    assert state.keys() == saved["state_dict"].keys()
    assert all(torch.equal(state[key], value) for key, value in saved["state_dict"].items())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert module(images).shape == (2, 10)
    from dcd_lightning import create_model

    python = ImageClassifier(lambda n: create_model("resnet10_static", num_classes=n), num_classes=10)
    assert "backbone" not in python.hparams and "backbone" not in python.hparams_initial
    torch.save({"hyper_parameters": dict(python.hparams)}, tmp_path / "python.pt")  # no lambda to pickle


def test_a_saved_config_reruns_into_a_new_root(tmp_path: Path) -> None:
    """config.yaml keeps the loggers' save_dir '.': rerun with another default_root_dir, the new
    run's logs go there, not into the old run's folder."""
    short = [*QUIET, "--data.init_args.image_size=8", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
             "--trainer.limit_val_batches=1"]
    fit("--config", QUICKSTART, *short, f"--trainer.default_root_dir={tmp_path / 'first'}")
    (saved,) = (tmp_path / "first").glob("**/config.yaml")
    logger = yaml.safe_load(saved.read_text())["trainer"]["logger"]
    assert (logger[0] if isinstance(logger, list) else logger)["init_args"]["save_dir"] == "."
    fit("--config", str(saved), f"--trainer.default_root_dir={tmp_path / 'again'}")
    assert len(list((tmp_path / "first").glob("**/metrics.csv"))) == 1
    assert len(list((tmp_path / "again").glob("**/metrics.csv"))) == 1


def test_int_or_float_trainer_options_keep_the_type_they_are_written_with(capsys) -> None:
    # Lightning reads limit_*_batches=1 as one batch and 1.0 as every batch
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1.0",
              "--trainer.limit_test_batches=0.25", "--trainer.gradient_clip_val=2", "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["limit_train_batches"] == 1 and isinstance(trainer["limit_train_batches"], int)
    assert trainer["limit_val_batches"] == 1.0 and isinstance(trainer["limit_val_batches"], float)
    assert trainer["limit_test_batches"] == 0.25 and trainer["gradient_clip_val"] == 2


# -- errors that name what was wrong -------------------------------------------------------------


def test_corrupt_image_is_named_or_skipped(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data")
    bad = min((root / "train" / "n01443537").glob("*.JPEG"))
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = str(ROOT / "configs" / "paper" / "table4_resnet18_static.yaml")
    args = ["--config", config, *tiny_imagenet_args(root), "--data.init_args.batch_size=6",
            "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    with pytest.raises(RuntimeError, match=rf"cannot read image {bad}.*skip_corrupt=true"):
        fit(*args)
    with pytest.warns(UserWarning, match=rf"skipped unreadable image {bad}"):
        fit(*args, "--data.init_args.skip_corrupt=true")


def test_batches_with_no_readable_image_are_skipped(tmp_path: Path) -> None:
    # batch size 1: the corrupt training image and the corrupt validation image are each a whole batch
    root = write_image_folder(tmp_path / "data")
    for split in ("train", "val"):
        min((root / split / "n01443537").glob("*.JPEG")).write_bytes(b"not a jpeg")
    config = str(ROOT / "configs" / "paper" / "table4_resnet18_static.yaml")
    args = ["--config", config, *tiny_imagenet_args(root), "--data.init_args.batch_size=1", "--trainer.max_epochs=1",
            "--trainer.log_every_n_steps=1",
            "--data.init_args.skip_corrupt=true", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    import wandb

    try:
        with pytest.warns(UserWarning, match="skipped unreadable image"):
            fit(*args)
    finally:
        wandb.finish()  # the paper config's W&B run (offline), which later fits in this process must not reuse
    rows = metrics(tmp_path / "run")
    assert len([row for row in rows if row.get("train/loss_step")]) == 5  # 6 images, one batch skipped
    (accuracy,) = [float(row["val/acc1"]) * 5 for row in rows if row.get("val/acc1")]
    assert abs(accuracy - round(accuracy)) < 1e-5  # a count of 5 images


@pytest.mark.parametrize("name", ["ImageNetDataModule", "ImageNetShardsDataModule"])
def test_a_batch_with_no_readable_image_stops_a_multi_process_run(name: str) -> None:
    import dcd_lightning.data  # the shards' module imports litdata on first use

    module = getattr(dcd_lightning.data, name)
    data = module(root="unused", num_workers=0)
    data.trainer = SimpleNamespace(training=True, world_size=2, global_rank=1)
    with pytest.raises(CorruptImageError, match=f"{module.__name__}, rank 1: every image of a training batch"):
        data.on_before_batch_transfer(None, 0)
    data.trainer.world_size = 1  # one process: handed to Lightning, which skips the batch
    assert data.on_before_batch_transfer(None, 0) is None
    data.trainer.world_size, data.trainer.training = 2, False  # validation: ImageClassifier skips it
    assert data.on_before_batch_transfer(None, 0) is None


def test_a_crash_in_one_of_two_processes_ends_the_run_with_its_error(tmp_path: Path) -> None:
    """A corrupt training image read by one of two DDP processes: that process raises, and the
    run ends with the error. Saving a checkpoint on the exception takes every process, and the
    other one is inside a training step: that save used to hang the run with no message."""
    root = write_image_folder(tmp_path / "images", per_class=4)
    bad = sorted((root / "train").rglob("*.JPEG"))[5]
    bad.write_bytes(b"not a jpeg")
    config = str(ROOT / "configs" / "paper" / "table4_resnet10_static.yaml")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dcd_lightning", "fit", "--config", config, *tiny_imagenet_args(root),
             "--data.init_args.train_crop=32", "--data.init_args.eval_resize=36", "--data.init_args.eval_crop=32",
             "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=1", "--trainer.logger=false",
             f"--trainer.default_root_dir={tmp_path / 'run'}"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False,
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the run hung after the crash: {str(hung.stderr)[-2000:]}")
    assert result.returncode != 0
    assert f"cannot read image {bad.relative_to(tmp_path)}" in result.stderr or f"cannot read image {bad}" in result.stderr
    assert "processes; not saving a checkpoint" in result.stdout


def test_missing_root_names_the_path_and_layout(tmp_path: Path) -> None:
    config = str(ROOT / "configs" / "paper" / "table4_resnet18_static.yaml")
    with pytest.raises(FileNotFoundError, match=rf"root '{tmp_path / 'nowhere'}' does not exist; expected root/train"):
        fit("--config", config, *tiny_imagenet_args(tmp_path / "nowhere"), "--trainer.fast_dev_run=1")
    (tmp_path / "only_val" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"only_val' has no train/ folder"):
        fit("--config", config, *tiny_imagenet_args(tmp_path / "only_val"), "--trainer.fast_dev_run=1")


def test_a_folder_smaller_than_the_batch_trains_on_one_partial_batch(image_folder: Path, tmp_path: Path) -> None:
    """6 training images at batch_size 8: dropping the partial batch would leave no batch (the fit
    would end at once and exit 0); it trains on the 6 and says why."""
    config = str(ROOT / "configs" / "paper" / "table4_resnet10_static.yaml")
    with pytest.warns(UserWarning, match=r"6 training samples give 6 per process, fewer than batch_size=8"):
        fit("--config", config, *tiny_imagenet_args(image_folder), "--data.init_args.batch_size=8",
            "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false")
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_eval_shards_count_every_image_once() -> None:
    from dcd_lightning.data.sampling import EvalShard, MarkedPadding

    data = [(torch.zeros(1), torch.tensor(i % 3)) for i in range(269)]
    shards = [list(EvalShard(len(data), 4, rank)) for rank in range(4)]
    assert [len(s) for s in shards] == [68] * 4  # the same count on every process, as DDP needs
    samples = [MarkedPadding(data)[key] for shard in shards for key in shard]
    assert sum(int(label) == -1 for _, label in samples) == 4 * 68 - 269
    assert sorted(key for shard in shards for key in shard if key < 269) == list(range(269))


def test_ddp_epoch_loss_and_validation_equal_one_process(tmp_path: Path) -> None:
    """Two processes (gloo): train/loss_epoch is the mean over both processes' batches (it was
    rank 0's), and validation of the 269 digits counts each once (DistributedSampler's padding
    made it 270, with one image twice): the figures equal a one-process validation's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    common = ["--config", QUICKSTART, *QUIET, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    result = subprocess.run(
        [sys.executable, "-m", "dcd_lightning", "fit", *common, "--trainer.devices=2", "--trainer.strategy=ddp",
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
         "--trainer.logger+=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
         "--trainer.callbacks+=_training_helpers.RecordLosses", f"--trainer.callbacks.folder={tmp_path / 'losses'}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    batches = [line.split() for rank in (0, 1) for line in (tmp_path / "losses" / f"loss-rank{rank}.txt").read_text().splitlines()]
    expected = sum(float(loss) * int(n) for loss, n in batches) / sum(int(n) for _, n in batches)
    (logged,) = [float(row["train/loss_epoch"]) for row in metrics(tmp_path) if row.get("train/loss_epoch")]
    assert logged == pytest.approx(expected, rel=1e-5)

    def validate(*extra: str) -> dict[str, float]:
        run = subprocess.run(
            [sys.executable, "-m", "dcd_lightning", "validate", *common, "--ckpt_path=last", *extra],
            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, check=False,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        return {key: float(value) for key, value in re.findall(r"(val/\w+)[\s│|]+([0-9.]+)", run.stdout)}

    one, two = validate(), validate("--trainer.devices=2", "--trainer.strategy=ddp")
    assert set(one) == {"val/loss", "val/acc1", "val/acc5"}
    assert two == pytest.approx(one, rel=1e-6)
    assert round(one["val/acc1"] * 269, 4) == round(one["val/acc1"] * 269)  # a count of the 269 images


def test_the_partial_batch_is_kept_per_process_under_ddp(image_folder: Path) -> None:
    """6 training images over 2 processes at batch_size 4: each process gets 3, so dropping the
    partial batch would leave none; the loader keeps it and says so with the per-process count."""
    from dcd_lightning.data import ImageNetDataModule

    data = ImageNetDataModule(root=str(image_folder), num_classes=3, batch_size=4, num_workers=0)
    data.trainer = SimpleNamespace(world_size=2)
    data.setup("fit")
    with pytest.warns(UserWarning, match=r"6 training samples give 3 per process, fewer than batch_size=4"):
        assert not data.train_dataloader().drop_last
    data.trainer = SimpleNamespace(world_size=1)
    assert data.train_dataloader().drop_last


def test_unknown_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    learning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        fit("--config", QUICKSTART, "--config", str(bad))
    assert "learning_rat" in capsys.readouterr().err


# -- pieces --------------------------------------------------------------------------------------


def test_a_bad_callback_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        fit("--config", QUICKSTART, "--temperature.epochs=-1")
    assert stop.value.code == 2
    assert "error: TemperatureSchedule: epochs=-1.0 is not allowed; expected >= 0" in capsys.readouterr().err


def test_temperature_schedule_is_linear_per_step_then_flat() -> None:
    schedule = TemperatureSchedule(start=30.0, end=1.0, epochs=10)
    assert schedule.temperature(0, 100) == 30.0
    assert schedule.temperature(500, 100) == pytest.approx(15.5)
    assert schedule.temperature(1000, 100) == schedule.temperature(5000, 100) == 1.0
    with pytest.raises(ValueError, match="TemperatureSchedule: start=0"):
        TemperatureSchedule(start=0)


def test_steps_per_epoch_come_from_the_loader() -> None:
    def trainer(estimated: float, batches: float, accumulate: int = 1, max_epochs: int = 100) -> SimpleNamespace:
        return SimpleNamespace(estimated_stepping_batches=estimated, num_training_batches=batches,
                               accumulate_grad_batches=accumulate, max_epochs=max_epochs)

    assert stepping(trainer(8, 19)) == (8, 19)  # max_steps=8 ends the fit inside epoch 0
    assert stepping(trainer(1900, 19, accumulate=2)) == (1900, 10)
    assert stepping(trainer(float("inf"), 19, max_epochs=-1)) == (UNBOUNDED_STEPS, 19)
    assert stepping(trainer(300, float("inf"), max_epochs=3)) == (300, 100)  # a loader without a length


def test_max_steps_does_not_shorten_the_epochs_of_the_schedule(tmp_path: Path) -> None:
    """A step schedule dividing the LR every epoch: with max_steps=4 inside a 5-batch epoch it never divides."""
    fit("--config", QUICKSTART, *QUIET, "--data.init_args.image_size=8", "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=1", "--trainer.max_epochs=100", "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=1", "--model.init_args.schedule=step", "--model.init_args.step_epochs=1",
        "--model.init_args.warmup_epochs=0", f"--trainer.default_root_dir={tmp_path}")
    rates = [float(row["lr"]) for row in metrics(tmp_path) if row.get("lr")]
    assert len(rates) == 4 and set(rates) == {rates[0]}, rates


def test_lr_schedules_and_weight_decay_groups() -> None:
    module = ImageClassifier(lambda n: create_model("resnet10_static", num_classes=n), num_classes=10,
                             schedule="step", step_epochs=30, warmup_epochs=1, decay_norm_and_bias=False)
    assert module.lr_factor(0, 1000, 10) == pytest.approx(0.1)  # warm-up over 10 steps
    assert module.lr_factor(9, 1000, 10) == 1.0
    assert module.lr_factor(299, 1000, 10) == 1.0 and module.lr_factor(300, 1000, 10) == pytest.approx(0.1)
    decay, no_decay = module.parameter_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    cosine = ImageClassifier(lambda n: create_model("resnet10_static", num_classes=n), num_classes=10)
    assert cosine.lr_factor(500, 1000, 10) == pytest.approx(0.5) and cosine.lr_factor(1000, 1000, 10) == 0.0
    with pytest.raises(ValueError, match="ImageClassifier: label_smoothing=1.0"):
        ImageClassifier(lambda n: create_model("resnet10_static", num_classes=n), label_smoothing=1.0)


def test_channels_last_and_compile_options(tmp_path: Path) -> None:
    """channels_last stores the weights and feeds the backbone channels-last with the same outputs;
    compile (true or torch.compile's arguments) keeps the state-dict names, so checkpoints resume."""
    def backbone(n: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model("resnet10_dcd", num_classes=n).double()

    plain, last = (ImageClassifier(backbone, num_classes=10, channels_last=flag).eval() for flag in (False, True))
    assert last.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    last.model.layer1[0].conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(last(images), plain(images), rtol=1e-9, atol=1e-9)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    with pytest.raises(ValueError, match=r"compile=\{'mdoe': 'max-autotune'\} has unknown key\(s\) \['mdoe'\]"):
        ImageClassifier(backbone, num_classes=10, compile={"mdoe": "max-autotune"})

    args = ["--config", QUICKSTART, *QUIET, "--data.init_args.image_size=8", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2", "--model.init_args.channels_last=true",
            "--model.init_args.compile={backend: eager}", f"--trainer.default_root_dir={tmp_path}"]
    fit(*args, "--trainer.max_epochs=1")
    fit(*args, "--trainer.max_epochs=2", "--ckpt_path=last")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 1 and state["hyper_parameters"]["compile"] == {"backend": "eager"}
    assert "model.conv1.weight" in state["state_dict"] and not any("_orig_mod" in k for k in state["state_dict"])


def test_mixup_and_cutmix_mix_pairs() -> None:
    torch.manual_seed(0)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    targets = torch.arange(4)
    mixed, a, b, lam = mix_batch(images, targets, mixup_alpha=0.4, cutmix_alpha=0.0)
    assert torch.allclose(mixed[:, 0, 0, 0], lam * a.float() + (1 - lam) * b.float())
    mixed, a, b, lam = mix_batch(images, targets, mixup_alpha=0.0, cutmix_alpha=1.0)
    share_a = (mixed[:, 0] == a.float().view(4, 1, 1)).float().mean(dim=(1, 2))
    changed = a != b
    assert torch.allclose(share_a[changed], torch.full_like(share_a[changed], lam))


def test_run_name_and_tags_from_a_paper_config() -> None:
    config = yaml.safe_load((ROOT / "configs" / "paper" / "table3a_mobilenetv2_x0.5_dcd_pw_b4.yaml").read_text())
    name, tags = describe_run(config)
    assert name == "mobilenetv2_x0.5_pointwise-DCDReleaseConv2d"
    assert {"mobilenetv2_x0.5", "pointwise:DCDReleaseConv2d", "num_blocks=4", "fc_squeeze=8"} <= set(tags)
    # a user's own operator (class_path outside the package) names the run as the package's do
    config["model"]["init_args"]["backbone"]["init_args"]["depthwise"] = {
        "class_path": "my_research.ops.GatedDepthwise", "init_args": {"num_blocks": 2}}
    name, tags = describe_run(config)
    assert name == "mobilenetv2_x0.5_pointwise-DCDReleaseConv2d_depthwise-GatedDepthwise"
    assert {"depthwise:GatedDepthwise", "num_blocks=2", "num_blocks=4"} <= set(tags)
    config["model"]["init_args"]["backbone"]["init_args"]["depthwise"]["class_path"] = "GatedDepthwise"  # a bare name
    assert describe_run(config)[0] == "mobilenetv2_x0.5_pointwise-DCDReleaseConv2d_depthwise-GatedDepthwise"


def test_wandb_goes_offline_without_a_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_can_sync()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_can_sync()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not wandb_can_sync()


def test_wandb_offline_run_gets_config_params_and_madds(tmp_path: Path, image_folder: Path) -> None:
    """The paper configs log to W&B: offline here, named and tagged from the config, under default_root_dir."""
    import wandb

    fit("--config", str(ROOT / "configs" / "paper" / "table4_resnet10_dcd.yaml"), *tiny_imagenet_args(image_folder),
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={tmp_path}")
    run = wandb.run
    assert run is not None and run.offline
    try:
        assert run.config["madds"] > 0 and run.config["params"] > 0
        assert run.config["config"]["model"]["init_args"]["backbone"]["init_args"]["depth"] == 10
        assert run.config["config"]["model"]["init_args"]["num_classes"] == 3  # the data's, linked; not 1000
        assert run.name == "resnet10_conv-DCDReleaseConv2d_classifier-DCDReleaseLinear"
        assert {"conv:DCDReleaseConv2d", "layout=resnet_basic"} <= set(run.tags)
        assert str(run.dir).startswith(str(tmp_path))  # under default_root_dir
    finally:
        wandb.finish()
    assert list(tmp_path.glob("resnet10_dcd/version_0/metrics.csv"))  # the CSV logger beside it
