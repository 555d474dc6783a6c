"""One run's configuration: the table of what each setting may be, the flags that follow from it, and config.json."""

import dataclasses
import json
import os
import re

import pytest

from image_logreg.cli import build_parser, settings_given
from image_logreg.errors import CheckpointError, UsageError
from image_logreg.files import read_json, write_json
from image_logreg.settings import (
    COLORS, CONSTRAINTS, FOLDER_SETTINGS, PRESETS, RESIZE_MODES, Interval, Options, RunConfig, TrainConfig, flag,
)

SETTINGS = [f.name for f in dataclasses.fields(RunConfig)]


def refused_value(row: list):
    """A value that no entry of ``row`` takes."""
    if any(isinstance(c, Options) for c in row):
        return "no-such-choice"
    if bool in row:
        return "yes"
    interval = next((c for c in row if isinstance(c, Interval)), None)
    if interval is None:  # text, a path, or None: a number is none of them
        return 3
    if interval.left is not None:
        return interval.left if interval.closed in ("right", "neither") else interval.left - 1
    return interval.right + 1


def subcommand(name: str):
    return next(a for a in build_parser()._actions if a.dest == "command").choices[name]


def test_every_setting_has_a_row_a_help_and_a_train_flag():
    assert sorted(SETTINGS) == sorted(CONSTRAINTS)
    assert all(f.metadata["help"] for f in dataclasses.fields(RunConfig))
    train = {action.dest: action for action in subcommand("train")._actions}
    assert set(SETTINGS) <= set(train)
    for name in SETTINGS:
        assert flag(name) in train[name].option_strings, name
        assert train[name].default is None, name  # left out: the preset's value, else the field's
    sweep = {action.dest for action in subcommand("sweep")._actions}
    assert set(SETTINGS) <= sweep  # a grid flag or a single value for every setting


def test_flags_follow_their_field_and_row():
    train = {action.dest: action for action in subcommand("train")._actions}
    assert train["optimizer"].choices == CONSTRAINTS["optimizer"][0].choices
    assert train["batch_size"].type is int and train["lr"].type is float and train["max_memory"].type is None
    assert "(default: 128)" in train["batch_size"].help and "(default: 20)" in train["lbfgs_iterations"].help
    assert train["download"].option_strings == ["--no-download"] and train["calibrate"].option_strings == ["--no-calibrate"]
    assert train["keep_best"].option_strings == ["--keep-best", "--no-keep-best"]


def test_the_command_line_builds_the_configuration_by_field_name():
    args = build_parser().parse_args(["train", "--lr", "0.5", "--no-calibrate", "--no-download", "--lbfgs-iterations", "7",
                                      "--dataset", "folder", "--no-cache", "--image-size", "8x6"])
    given = settings_given(args)
    assert given == {"lr": 0.5, "calibrate": False, "download": False, "lbfgs_iterations": 7, "dataset": "folder",
                     "no_cache": True, "image_size": "8x6"}
    config = RunConfig.from_settings(given, "tutorial")
    assert (config.lr, config.batch_size, config.calibrate, config.no_cache) == (0.5, 100, False, True)
    assert RunConfig.from_settings(settings_given(build_parser().parse_args(["train"]))) == RunConfig()


@pytest.mark.parametrize("name", SETTINGS)
def test_each_constraint_refuses_a_bad_value_naming_the_flag(name):
    bad = refused_value(CONSTRAINTS[name])
    with pytest.raises(UsageError) as refused:
        RunConfig(**{name: bad})
    message = str(refused.value)
    assert flag(name) in message and "\n" not in message, message


@pytest.mark.parametrize("settings, message", [
    (dict(lr=-1), "--lr must be positive, got -1"),
    (dict(lr=float("nan")), "--lr must be positive, got nan"),
    (dict(lr=float("inf")), "--lr must be positive, got inf"),
    (dict(epochs=0), "--epochs must be positive, got 0"),
    (dict(batch_size=1.5), "--batch-size must be a whole number, got 1.5"),
    (dict(batch_size=True), "--batch-size must be a whole number, got True"),
    (dict(momentum=-0.1), "--momentum must be zero or positive, got -0.1"),
    (dict(val_fraction=1), "--val-fraction must be at least 0 and below 1, got 1"),
    (dict(test_fraction=-0.1, dataset="folder"), "--test-fraction must be at least 0 and below 1, got -0.1"),
    (dict(train_subset=0), "--train-subset must be at least 1, got 0"),
    (dict(keep=0), "--keep must be above 0 and at most 1, got 0"),
    (dict(max_pixels=0), "--max-pixels must be at least 1, got 0"),
    (dict(max_memory=[1]), "--max-memory must be text or a number, got [1]"),
    (dict(optimizer="rmsprop"), "--optimizer: unknown optimizer 'rmsprop'; choose from sgd, adam, lbfgs"),
    (dict(class_weight="heavy"), "--class-weight: unknown class weight 'heavy'"),
    (dict(dataset="folder", resize="zoom"), "--resize: unknown resize mode 'zoom'; choose from fit, stretch, crop"),
    (dict(download="no"), "--no-download must be true or false, got 'no'"),
    # settings that must agree with the dataset and each other
    (dict(image_size="8x8"), "--image-size applies to --dataset folder and csv only, not mnist"),
    (dict(dataset="cifar10", deskew=True), "--deskew works on grayscale images only; cifar10 is colour"),
    (dict(dataset="folder", color="rgb", deskew=True), "--deskew works on grayscale images only; --color rgb makes colour"),
])
def test_refusals_say_what_a_good_value_is(settings, message):
    with pytest.raises(UsageError, match="^" + re.escape(message)):
        RunConfig(**settings)


def test_a_configuration_is_frozen_and_resolved_into_a_copy():
    config = RunConfig(optimizer="sgd")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.5
    resolved = config.resolved()
    assert config.lr is None and resolved.lr == 0.1 and type(resolved) is RunConfig
    assert TrainConfig(optimizer="lbfgs").check().lr == 1.0  # the name the walkthrough uses
    assert dataclasses.replace(config, lr=0.5).lr == 0.5
    with pytest.raises(UsageError, match="--lr"):
        dataclasses.replace(config, lr=0)  # a copy is checked as the original was


def test_presets_are_plain_overrides_and_unknown_names_are_refused():
    config = RunConfig.from_settings({"lr": 0.01, "epochs": None}, "tutorial")
    tutorial = dict(PRESETS["tutorial"], lr=0.01)
    assert {k: getattr(config, k) for k in tutorial} == tutorial
    with pytest.raises(UsageError, match="unknown setting"):
        RunConfig.from_settings({"learning_rate": 0.1})
    with pytest.raises(UsageError, match="unknown preset 'fast'"):
        RunConfig.from_settings({}, "fast")


def test_config_json_round_trips(tmp_path):
    from image_logreg.run import resolve, run_record

    images = tmp_path / "images"
    config = resolve(RunConfig(dataset="folder", data_dir=images, image_size="8x6", max_memory="1G", optimizer="sgd",
                               cache_dir=tmp_path / "cache", train_subset=50, keep_best=False))
    assert config.image_size == [8, 6] and config.max_memory == 1 << 30 and config.lr == 0.1
    assert config.data_dir == str(images) and os.path.isabs(config.cache_dir)
    write_json(tmp_path / "config.json", run_record(config, device_used="cpu", world_size=1, temperature=1.5))
    recorded = read_json(tmp_path / "config.json")
    assert RunConfig.from_dict(recorded) == config
    assert recorded["device_used"] == "cpu" and list(recorded)[: len(CONSTRAINTS)] == list(CONSTRAINTS)
    assert resolve(config) == config  # resolving twice changes nothing


def test_an_old_config_json_with_other_keys_still_loads(tmp_path):
    from image_logreg.run import run_settings

    run = tmp_path / "old-run"
    run.mkdir()
    old = {  # as earlier versions wrote it: records among the settings, a learnt run's full batch as None
        "dataset": "mnist", "data_dir": "/data", "val_fraction": 0.2, "optimizer": "lbfgs", "lr": 1.0, "batch_size": None,
        "streamed": False, "device_used": "cpu", "created": "2025-01-01T00:00:00+00:00", "a_setting_since_removed": 3,
        "learn": {"replay": 0.95}, "parent": {"path": "/runs/a", "sha256": "0" * 64},
    }
    (run / "config.json").write_text(json.dumps(old))
    config = run_settings(run / "model.safetensors")
    assert (config.optimizer, config.lr, config.data_dir, config.batch_size) == ("lbfgs", 1.0, "/data", 128)
    assert run_settings(tmp_path / "alone" / "model.safetensors") is None
    (run / "config.json").write_text(json.dumps(dict(old, lr=-1)))
    with pytest.raises(CheckpointError, match=r"config.json: --lr must be positive"):
        run_settings(run / "model.safetensors")


def test_the_folder_settings_are_settings_and_decode_knows_their_modes():
    from image_logreg.datasets import decode

    assert set(FOLDER_SETTINGS) <= set(CONSTRAINTS)
    for resize in RESIZE_MODES:
        for color in COLORS:
            assert decode.decode_settings(None, resize, color, None).resize == resize


def test_train_run_takes_a_configuration_or_a_dict(toy_data, tmp_path):
    from image_logreg.run import resolve, train_run

    config = RunConfig(data_dir=toy_data, download=False, epochs=1, batch_size=100, seed=2)
    train_run(config, tmp_path / "object")
    train_run({"data_dir": toy_data, "download": False, "epochs": 1, "batch_size": 100, "seed": 2}, tmp_path / "dict")
    recorded = [RunConfig.from_dict(read_json(tmp_path / name / "config.json")) for name in ("object", "dict")]
    assert recorded[0] == recorded[1] == resolve(config)
    with pytest.raises(UsageError, match="unknown setting"):
        train_run({"epoch": 1}, tmp_path / "typo")
