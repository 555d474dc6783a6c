"""The ``image-logreg`` command: a thin argparse layer over the Python API.

Results go to stdout (one JSON document with ``--json``); progress and logs go to stderr.
Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from . import __version__
from .console import say
from .curves import start as start_drawing
from .distributed import DistributedError, env_rank, env_world_size
from .errors import ImageLogregError, UsageError
from .settings import CONSTRAINTS, Interval, RunConfig, check_settings


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), like every other bad input."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv  # --nproc hands the command line on to torchrun
        return args.func(args) or 0
    except DistributedError as exc:  # not the user's input: a rank failed, was stopped or timed out
        return fail(str(exc), 1)
    except ImageLogregError as exc:
        return fail(_which_rank() + str(exc), 2)
    except KeyboardInterrupt:
        return fail(_which_rank() + "interrupted", 130)
    except BrokenPipeError:  # the reader has gone (`| head`): nothing more to say, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush stays quiet
        return 141
    except OSError as exc:  # disk full, permission denied and the like while writing results
        return fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), 1)


def command() -> int:
    """The ``image-logreg`` program: ``main`` on the process's arguments, for a process that ends with it."""
    code = main()
    # Python's last collections on the way out walk every object torch made (0.5-0.7 s, half as
    # long as importing it) only to find nothing to free before the process ends; frozen, they are
    # skipped, while files still close and atexit handlers still run.
    gc.freeze()
    return code


def _which_rank() -> str:
    """``rank N: `` in a process torchrun started, whose ranks may each report an error."""
    return f"rank {env_rank()}: " if env_world_size() > 1 else ""


def fail(message: str, code: int) -> int:
    # one write: ranks under torchrun share a stderr and run unbuffered (python -u), where print's
    # text and newline go out separately and another rank's line could land between them
    sys.stderr.write(f"image-logreg: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return code


log = say  # every line for the user goes to stderr; stdout is the result


def emit_json(data) -> None:
    """Indented JSON, with each list of numbers on one line (a 10x10 confusion matrix is 10 lines, not 120)."""
    sys.stdout.write(_NUMBER_LIST.sub(_one_line_list, json.dumps(data, indent=2)) + "\n")


_NUMBER_LIST = re.compile(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*|null(?:,\s+null)*)\s+\]")


def _one_line_list(match: re.Match) -> str:
    return "[" + ", ".join(item.strip() for item in match.group(1).split(",")) + "]"


# --- commands ---------------------------------------------------------------------------------


def cmd_train(args) -> int:
    check_settings({"nproc": args.nproc}, COMMAND_FLAGS)
    # flags left out (None) come from the preset, else the defaults; checked here, before any rank starts
    config = RunConfig.from_settings(settings_given(args), args.preset)
    if args.nproc > 1:
        from .distributed import launch
        from .files import refuse_existing

        if args.out:  # one line now, rather than rank 0's refusal and the others' lost contact
            refuse_existing(args.out, args.overwrite, "--out directory")
        return launch(args.nproc, args.argv)
    if env_rank() == 0:
        start_drawing()  # matplotlib loads in another process while this one imports torch and trains
    from .run import train_run

    if env_rank() != 0:  # the other ranks train in silence: rank 0 logs and prints the results
        args.quiet, args.json, args.report = True, False, False

    summary = train_run(
        config, args.out, overwrite=args.overwrite, progress=not args.quiet, log=None if args.quiet else log,
        tensorboard=args.tensorboard, init=args.init,
    )
    if args.report:  # only now: the report reads the finished run directory
        from .report import write_report

        try:
            summary["report"] = str(write_report(summary["run_dir"], config.data_dir, download=config.download))
        except ImageLogregError as exc:  # say the run itself is safe, not just what went wrong
            raise type(exc)(f"run saved to {summary['run_dir']}, but its report failed: {exc}") from None
    if env_rank() != 0:
        return 0
    if args.json:
        emit_json(summary)
    else:
        if "val_accuracy" in summary:
            metrics = f"val accuracy {summary['val_accuracy']:.4f}, val loss {summary['val_loss']:.4f}"
        else:  # --val-fraction 0: the training figures are all there is
            metrics = f"train accuracy {summary['train_accuracy']:.4f}, train loss {summary['train_loss']:.4f} (no validation set)"
        kept = f", weights of epoch {summary['kept_epoch']}" if summary.get("kept_epoch", summary["epochs"]) != summary["epochs"] else ""
        print(f"{metrics} after {summary['epochs']} epochs ({summary['seconds']:.2f}s{kept}); run saved to {summary['run_dir']}")
        if "report" in summary:
            print(f"report written to {summary['report']}")
    return 0


def settings_given(args, but=()) -> dict:
    """The run settings the command line gave, by name (a flag left out is None: not given), but ``but``'s."""
    return {name: getattr(args, name) for name in CONSTRAINTS if name not in but and getattr(args, name, None) is not None}


# Flags that are no run setting, checked as the settings are.
COMMAND_FLAGS = {name: [Interval(int, 1, None, closed="left")] for name in ("nproc", "top_k", "n", "count")}


def cmd_evaluate(args) -> int:
    from .run import evaluate_model, read_eval_data
    from .train import resolve_device

    model, meta, checkpoint = open_model(args)
    data = read_eval_data(meta, args.split, checkpoint, args.data_dir, download=not args.no_download)
    result = evaluate_model(model, meta, data, resolve_device(args.device))
    result = {"model": str(checkpoint), "dataset": meta["dataset"], "split": args.split, **result}
    if args.json:
        emit_json(result)
    else:
        print_evaluation(result, data.classes)
    return 0


# Classes past which evaluate's confusion matrix no longer fits a terminal's width.
CONFUSION_PRINTED = 30


def print_evaluation(result: dict, classes: list[str]) -> None:
    print(f"{result['dataset']} {result['split']}: {result['n']} images, loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}")
    print(f"calibration: expected calibration error {result['ece']:.4f} (temperature {result['temperature']:.3f})")
    if "rejected" in result:
        rest = "none left" if result["accepted_accuracy"] is None else f"accuracy {result['accepted_accuracy']:.4f} on the rest"
        print(f"rejected as unlike the training images: {result['rejected']:.2%} ({rest})")
    width = max(len(c) for c in classes)
    print(f"\n{'class':<{width}}    recall  precision        f1")
    for c in classes:
        fmt = lambda v: "       -" if v is None else f"{v:8.4f}"
        print(f"{c:<{width}}  {fmt(result['recall'][c])}   {fmt(result['precision'][c])}  {fmt(result['f1'][c])}")
    if len(classes) > CONFUSION_PRINTED:
        print(f"\nconfusion matrix: {len(classes)} x {len(classes)}, too wide to print; see --json or `image-logreg report`")
        return
    labels = [c if c.startswith(str(i)) else f"{i} {c}" for i, c in enumerate(classes)]  # rows name their column
    labels = [c if len(c) <= 20 else c[:19] + "~" for c in labels]
    width = max(len(c) for c in labels)
    print("\nconfusion matrix (rows: true class, columns: predicted, numbered as the rows)")
    print(" " * width + " " + " ".join(f"{i:>5d}" for i in range(len(classes))))
    for label, row in zip(labels, result["confusion"]):
        print(f"{label:<{width}} " + " ".join(f"{v:5d}" for v in row))


def cmd_predict(args) -> int:
    import torch

    from .files import refuse_existing
    from .predict import predict_file, predict_images
    from .preprocess import find_image_files
    from .run import read_eval_data

    if not args.files and args.index is None:
        raise UsageError("give image FILEs or folders, or --index N to predict dataset samples")
    check_settings({"top_k": args.top_k}, COMMAND_FLAGS)
    check_settings({"max_pixels": args.max_pixels})
    if args.csv:
        refuse_existing(args.csv, args.overwrite, "--csv file")
    model, meta, checkpoint = open_model(args)
    if model.novelty is None:
        log(f"{checkpoint} has no novelty score (trained before image-logreg could tell): nothing is rejected")
    results, errors = [], []
    answers = []  # --json: each prediction and each bad file's error, in order

    if args.index is not None:
        data = read_eval_data(meta, args.split, checkpoint, args.data_dir, download=not args.no_download)
        bad = [i for i in args.index if not 0 <= i < len(data)]
        if bad:
            raise UsageError(f"--index {bad[0]} is out of range: the {args.split} set has {len(data)} images (0..{len(data) - 1})")
        chosen = torch.tensor(args.index)
        preds = predict_images(model, data.images[chosen], meta, [f"{args.split}[{i}]" for i in args.index], args.top_k)
        for p, i in zip(preds, args.index):
            p["true_label"] = data.classes[int(data.labels[i])]
        results += preds
        answers += preds

    if args.files:
        paths = find_image_files(args.files)
        if not paths:
            raise UsageError(f"no image files (PNG, JPEG, GIF, BMP, WebP, TIFF) found in {', '.join(args.files)}")
        for n, path in enumerate(paths):
            try:
                result, image = predict_file(model, meta, path, args.top_k, normalize=not args.no_normalize,
                                             max_pixels=args.max_pixels)
            except ImageLogregError as exc:
                fail(str(exc), 2)  # one line per bad file; the others are still predicted
                errors.append({"source": str(path), "error": str(exc)})
                answers.append(errors[-1])
                continue
            answers.append(result)
            results.append(result)
            if args.save_preprocessed:
                results[-1]["preprocessed"] = str(save_preprocessed(image, args.save_preprocessed, n, path, args.overwrite))

    if args.csv:
        write_predictions_csv(args.csv, results, errors)
    if args.json:
        emit_json(answers)
    else:
        for r in results:
            ranked = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
            truth = f" (true: {r['true_label']})" if "true_label" in r else ""
            answer = NOT_RECOGNISED if r.get("rejected") else r["label"]
            print(f"{r['source']}: {answer}{truth}   [{ranked}]")
    return 2 if errors else 0


NOT_RECOGNISED = "not recognised (looks unlike the training images)"


def save_preprocessed(image, folder, n: int, source: Path, overwrite: bool) -> Path:
    """The image the model saw, numbered so same-named files from different folders stay apart."""
    from PIL import Image

    from .files import atomic_path, refuse_existing

    path = refuse_existing(Path(folder) / f"{n:04d}-{source.stem}.png", overwrite, "--save-preprocessed folder")
    with atomic_path(path) as tmp:
        Image.fromarray(image.transpose(1, 2, 0) if image.ndim == 3 else image).save(tmp, format="PNG")  # C x H x W: colour
    return path


def write_predictions_csv(path, results: list[dict], errors: list[dict]) -> None:
    from .files import write_csv

    rows = [
        {
            "source": r["source"],
            "label": r["label"],
            "probability": round(r["top_k"][0]["probability"], 6),
            "top_k": "; ".join(f"{t['label']}={t['probability']:.6f}" for t in r["top_k"]),
            "true_label": r.get("true_label", ""),
            "rejected": r.get("rejected", ""),
            "ood_score": round(r["ood_score"], 6) if "ood_score" in r else "",
            "error": "",
        }
        for r in results
    ]
    rows += [{"source": e["source"], "label": "", "probability": "", "top_k": "", "true_label": "", "rejected": "", "ood_score": "",
              "error": e["error"]} for e in errors]
    write_csv(path, rows)


def cmd_suggest(args) -> int:
    from .suggest import check_folder, copy_suggestions, suggest_files

    check_settings({"n": args.n}, COMMAND_FLAGS)
    check_settings({"max_pixels": args.max_pixels})
    check_folder(args.folder)  # before the model loads: a mistyped folder is one line at once
    if args.copy_to and Path(args.copy_to).exists() and not Path(args.copy_to).is_dir():
        raise UsageError(f"--copy-to {args.copy_to} is a file, not a folder")
    model, meta, checkpoint = open_model(args)
    if model.novelty is None:
        log(f"{checkpoint} has no novelty score (trained before image-logreg could tell): ranked by {args.by} alone")
    result = suggest_files(model, meta, args.folder, args.n, by=args.by, normalize=not args.no_normalize,
                           max_pixels=args.max_pixels, labelled=args.copy_to, log=log)
    result = {"model": str(checkpoint), **result}
    if args.copy_to:
        result["copied_to"] = str(copy_suggestions(result["suggestions"], args.copy_to, meta["classes"]))
    if args.json:
        emit_json(result)
    else:
        print_suggestions(result, args.model)
    return 0


def print_suggestions(result: dict, model: str) -> None:
    entries = result["suggestions"]
    left = [f"{result['duplicates']} the same as another"] if result["duplicates"] else []
    left += [f"{result['already_labelled']} already in --copy-to"] if result["already_labelled"] else []
    left += [f"{len(result['skipped'])} unusable"] if result["skipped"] else []
    threshold = result["novelty_threshold"]
    novelty = "no novelty score" if threshold is None else f"novelty threshold {threshold:.3g}"
    print(f"{len(entries)} of {result['ranked']} images in {result['folder']}, most worth labelling first "
          f"(by {result['by']}; {novelty})" + (f"; left out: {', '.join(left)}" if left else ""))
    width = max([len("predicted")] + [len(e["label"]) for e in entries])
    runner = max([len("or")] + [len(e["runner_up"] or "") for e in entries])
    print(f"{'rank':>4}  {'predicted':<{width}}  {'or':<{runner}}  {'prob':>5}  {'margin':>6}  {'novelty':>7}  file")
    for e in entries:
        score = "-" if "ood_score" not in e else f"{e['ood_score']:.2f}" + (" rejected" if e["rejected"] else "")
        print(f"{e['rank']:>4}  {e['label']:<{width}}  {e['runner_up'] or '':<{runner}}  {e['probability']:5.3f}  "
              f"{e['margin']:6.3f}  {score:>7}  {e['source']}")
    if "copied_to" in result:
        folder = result["copied_to"]
        print(f"copied {len(entries)} files into {folder}: move each into {folder}/<class>/ (unrecognised ones too, or delete "
              f"them), then `image-logreg learn {model} {folder} --out NEW`; files left unsorted are not learnt")


def cmd_show(args) -> int:
    import torch

    from .datasets import load_split
    from .files import refuse_existing
    from .plots import plot_grid

    config = RunConfig.from_settings(settings_given(args))  # the dataset, and how a folder's images are read
    out = refuse_existing(args.out or f"{config.dataset}-{args.split}-samples.png", args.overwrite)
    check_settings({"count": args.count}, COMMAND_FLAGS)
    data = load_split(config.dataset, config.data_dir, args.split, download=config.download, **config.dataset_options())
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.count]
    titles = [f"#{i}: {data.classes[int(data.labels[i])]}" for i in picks.tolist()]
    plot_grid([data.images[i].numpy() for i in picks.tolist()], titles, out, title=f"{config.dataset} {args.split} samples")
    print(f"wrote {len(picks)} {config.dataset} {args.split} samples to {out}")
    return 0


def cmd_sweep(args) -> int:
    start_drawing()
    from .settings import preset
    from .sweep import SWEEP_SETTINGS, grid_from_flags, print_summary, run_sweep

    given = {name: getattr(args, name) for name in SWEEP_SETTINGS}  # comma-separated values
    grid = grid_from_flags(given)
    # a preset sets what the flags leave out: one value on the grid, or a setting shared by all runs
    chosen = preset(args.preset, settings_given(args, but=SWEEP_SETTINGS))
    grid.update({name: [chosen[name]] for name in SWEEP_SETTINGS if name in chosen and given[name] is None})
    fixed = {k: v for k, v in chosen.items() if k not in SWEEP_SETTINGS}
    result = run_sweep(grid, fixed, args.out, overwrite=args.overwrite, progress=not args.quiet, log=None if args.quiet else log)
    if args.json:
        emit_json(result)
    else:
        print_summary(result)
    return 2 if result["failed"] else 0


def cmd_runs(args) -> int:
    from .runs import find_runs, print_runs

    runs = find_runs(args.dir, sort=args.sort, warn=log)
    if args.json:
        emit_json(runs)
    else:
        print_runs(runs, args.dir)
    return 0


def cmd_report(args) -> int:
    from .report import make_report

    result = make_report(args.run, args.data_dir, download=not args.no_download)
    if args.json:
        emit_json({"report": result["report"], "test_accuracy": result["test_accuracy"], "ece": result["ece"]})
    else:
        print(result["report"])
    return 0


def cmd_export(args) -> int:
    from .checkpoint import load_model, resolve_checkpoint
    from .export import FORMATS, export_model, input_spec
    from .files import refuse_existing

    if args.format not in FORMATS:  # before loading anything
        raise UsageError(f"unknown export format {args.format!r}; choose from {', '.join(FORMATS)}")
    out = refuse_existing(args.out, args.overwrite, "--out file")
    checkpoint = resolve_checkpoint(args.model)
    model, meta = load_model(checkpoint, dataset=args.dataset)
    path = export_model(model, meta, out, args.format, image_input=args.image_input)
    spec = input_spec(meta, args.image_input)
    result = {"model": str(checkpoint), "format": args.format, "out": str(path), "dataset": meta["dataset"],
              "input": spec, "output": {"name": "probabilities", "shape": ["batch", model.num_classes]},
              "deskew": bool((meta.get("preprocessing") or {}).get("deskew")), "image_input": args.image_input}
    if args.json:
        emit_json(result)
    else:
        steps = "deskew, x / 255" if result["deskew"] else "x / 255"
        if args.image_input:
            digit = "x".join(map(str, model.input_shape))
            steps = f"normalised as a digit ({digit}, centred by mass, as predict does), {steps}"
        dims = ", ".join(map(str, spec["shape"]))
        blank = "; NaN for a blank image" if args.image_input else ""
        print(f"wrote {path}: uint8 {spec['name']} [{dims}] -> {steps} -> probabilities [batch, {model.num_classes}] "
              f"({meta['dataset']}{blank})")
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    serve(
        args.models, host=args.host, port=args.port, token_file=args.token_file, no_auth=args.no_auth,
        cors_origins=args.cors_origin, max_body=args.max_body, max_images=args.max_images, max_pixels=args.max_pixels,
        dataset=args.dataset, device=args.device, http=args.http,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout, keep_alive=args.keep_alive,
        max_connections=args.max_connections, max_buffered=args.max_buffered,
        learn=args.learn, feedback_dir=args.feedback_dir, max_feedback=args.max_feedback,
        feedback_rate=args.feedback_rate, max_drop=args.max_drop, data_dir=args.data_dir,
    )
    return 0


def cmd_learn(args) -> int:
    start_drawing()
    from .learn import learn_run

    summary = learn_run(
        args.model, args.folder, args.out, replay=args.replay, held_out=args.hold_out, seed=args.seed, data_dir=args.data_dir,
        device=args.device, overwrite=args.overwrite, download=not args.no_download, log=None if args.quiet else log,
    )
    if args.json:
        emit_json(summary)
    else:
        print("\n".join(learning_lines(summary)))
    return 0


def learning_lines(summary: dict) -> list[str]:
    """``learn``'s results in words: accuracy before -> after on each set, then what was learnt."""
    before, after = summary["before"], summary["after"]

    def share(value) -> str:
        return "-" if value is None else f"{value:.1%}"

    def change(name: str, what: str) -> str:
        b, a = before[name], after[name]
        if not b["n"]:
            return f"{what}: none"
        points = f" ({100 * (a['accuracy'] - b['accuracy']):+.2f} points)" if name == "parent_test" else ""
        return (f"{what}, {b['n']} images: accuracy {b['accuracy']:.4f} -> {a['accuracy']:.4f}{points}, "
                f"rejected as unlike the training images {share(b['rejected'])} -> {share(a['rejected'])}")

    images, replay = summary["images"], summary["replay"]
    skipped = f", {images['skipped']} skipped" if images["skipped"] else ""
    known = f", {images['already_learnt']} learnt before" if images["already_learnt"] else ""
    known += f", {images['duplicates']} the same as another" if images["duplicates"] else ""
    return [
        change("parent_test", f"parent's {summary['dataset']} test split"),
        change("new_held_out", "new images held out (--hold-out)"),
        change("new_learnt", "new images learnt"),
        f"read {images['found']} files: {images['new']} new{known}{skipped}; learnt {images['learnt']}, replaying "
        f"{replay['images']} of the parent's training images"
        + (f" and the {replay['learnt_before']} images it learnt" if replay["learnt_before"] else "")
        + f" (--replay {replay['share']})",
        f"learnt in {summary['learning_seconds']:.2f}s ({summary['iterations']} L-BFGS iterations); run saved to {summary['run_dir']}",
    ]


def open_model(args):
    """Load ``args.model``; return (model, metadata, checkpoint path)."""
    from .checkpoint import load_model, resolve_checkpoint
    from .train import resolve_device

    checkpoint = resolve_checkpoint(args.model)
    model, meta = load_model(checkpoint, dataset=args.dataset, device=resolve_device(args.device))
    return model, meta, checkpoint


# --- parser -----------------------------------------------------------------------------------


def add_setting_flag(p, name: str) -> None:
    """Run setting ``name``'s flag, as its field and its row of ``CONSTRAINTS`` describe it: spelling,
    type, choices, help. Left out, it is None: the preset's value, else the default its help names."""
    from .settings import FLAGS, Options, flag

    field = {f.name: f for f in fields(RunConfig)}[name]
    row = CONSTRAINTS[name]
    spec = {"dest": name, "default": None, "help": field.metadata["help"].replace("%", "%%")}
    if bool in row:  # a switch: on (--deskew), off (FLAGS' --no-download), or either way (--keep-best, --no-keep-best)
        if field.default is False:
            spec["action"] = "store_true"
        elif name in FLAGS:
            spec.update(action="store_const", const=False)
        else:
            spec["action"] = argparse.BooleanOptionalAction
    else:
        spec["metavar"] = field.metadata["metavar"]
        choices = [c.choices for c in row if isinstance(c, Options)]
        if choices:
            spec["choices"] = choices[0]
        elif str not in row:
            spec["type"] = next(c.kind for c in row if isinstance(c, Interval))
    p.add_argument(flag(name), **spec)


def build_parser() -> argparse.ArgumentParser:
    # plain data only: building the parser must not import torch (--version, --help answer at once)
    from .settings import DATASET_NAMES, DEVICES, FOLDER_SETTINGS, LEARN_HOLD_OUT, LEARN_REPLAY, PRESETS, SUGGEST_BY, SUGGEST_N
    from .sweep import SWEEP_SETTINGS

    defaults = RunConfig()
    parser = Parser(prog="image-logreg", description="Image classification with logistic regression in PyTorch.")
    parser.add_argument("--version", action="version", version=f"image-logreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    data_settings = ("dataset", "data_dir", "download")

    def data_flags(p):
        """The dataset, where it is, and how a folder's or CSV's images are decoded (refused for the other datasets)."""
        for name in data_settings:
            add_setting_flag(p, name)
        g = p.add_argument_group("folder and csv datasets")
        for name in FOLDER_SETTINGS:
            add_setting_flag(g, name)

    def run_flags(p, but=()):
        """The flags of the other run settings: how the weights are fitted, on what inputs and device."""
        for name in CONSTRAINTS:
            if name not in (*data_settings, *FOLDER_SETTINGS, *but):
                add_setting_flag(p, name)

    def model_data_flags(p):
        """Where a trained model's data is: the run's own unless told."""
        p.add_argument("--dataset", choices=list(DATASET_NAMES), default=None,
                       help="dataset the model was trained on (default: from the checkpoint; mnist for a state_dict)")
        p.add_argument("--data-dir", default=None,
                       help="folder holding MNIST/raw/, FashionMNIST/raw/ and the like, or a folder or CSV dataset's own "
                            "(default: $IMAGE_LOGREG_DATA if set, else the run's own, else ./data)")
        p.add_argument("--no-download", action="store_true", help="never download missing dataset files")

    tutorial = PRESETS["tutorial"]
    preset_help = (
        f"tutorial: the tutorial's exact run ({tutorial['optimizer']}, constant lr {tutorial['lr']}, batch "
        f"{tutorial['batch_size']}, {tutorial['val_fraction'] * 100:.0f}%% validation, {tutorial['epochs']} epochs); flags given override it"
    )

    p = sub.add_parser("train", help="train a model and save a run directory")
    data_flags(p)
    p.add_argument("--preset", choices=list(PRESETS), default=None, help=preset_help)
    run_flags(p)
    p.add_argument("--init", metavar="RUN", default=None,
                   help="start from the weights of RUN (run directory or checkpoint) instead of random ones: the same classes "
                        "and input shape, on any dataset that has them; the run records RUN as its parent")
    p.add_argument("--out", default=None, help="run directory to create (default: runs/<timestamp>-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--json", action="store_true", help="print one JSON document with the results")
    p.add_argument(
        "--tensorboard", nargs="?", const=True, default=None, metavar="DIR",
        help="log TensorBoard events to the run's tensorboard/ folder, or to DIR/<run name> (needs image-logreg[tensorboard])",
    )
    p.add_argument("--report", action="store_true", help="also write report.html into the run directory (see `report`)")
    p.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="train data-parallel in N processes on this machine, launched with torchrun (default: %(default)s, no torchrun)",
    )
    p.set_defaults(func=cmd_train)

    def model_flags(p):
        p.add_argument("model", metavar="MODEL", help="run directory, .safetensors checkpoint or tutorial state_dict (.pth)")
        model_data_flags(p)
        p.add_argument("--device", choices=DEVICES, default="auto", help="(default: %(default)s)")
        p.add_argument("--json", action="store_true", help="print one JSON document with the results")

    p = sub.add_parser("evaluate", help="loss, accuracy, per-class recall, precision and F1, confusion matrix")
    model_flags(p)
    p.add_argument("--split", choices=["test", "val"], default="test", help="(default: %(default)s)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict dataset samples (--index) or image files")
    model_flags(p)
    p.add_argument("files", nargs="*", metavar="FILE", help="image files or folders (searched recursively)")
    p.add_argument("--index", type=int, nargs="+", metavar="N", help="dataset sample(s) to predict")
    p.add_argument("--split", choices=["test", "val"], default="test", help="split for --index (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="probabilities to show per image (default: %(default)s)")
    p.add_argument("--no-normalize", action="store_true",
                   help="digit models: feed files as they are (grayscale, resized), no MNIST-style centring; "
                        "other models always decode files as their dataset's were")
    p.add_argument("--csv", metavar="FILE", help="also write the predictions (and any unreadable files) to a CSV file")
    p.add_argument("--save-preprocessed", metavar="DIR", help="write the image the model saw for each file into DIR (PNG)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file or preprocessed images")
    add_setting_flag(p, "max_pixels")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("suggest", help="rank unlabelled images by how much labelling them would teach the model")
    p.add_argument("model", metavar="RUN", help="run directory, .safetensors checkpoint or tutorial state_dict (.pth)")
    p.add_argument("folder", metavar="UNLABELLED_DIR", help="folder of image files, searched recursively (hidden ones left out)")
    p.add_argument("--n", type=int, default=SUGGEST_N, help="how many images to suggest (default: %(default)s)")
    p.add_argument("--by", choices=SUGGEST_BY, default=SUGGEST_BY[0],
                   help="margin: one less the gap between the two likeliest classes; egl: expected gradient length "
                        "(default: %(default)s; images the model rejects as unlike its training images come last either way)")
    p.add_argument("--copy-to", metavar="DIR",
                   help="copy the suggested files into DIR, beside a folder per class to sort them into for `learn RUN DIR`; "
                        "nothing there is replaced, and files already there are not suggested again")
    p.add_argument("--no-normalize", action="store_true", help="digit models: feed files as they are, as predict --no-normalize")
    add_setting_flag(p, "max_pixels")
    p.add_argument("--dataset", choices=list(DATASET_NAMES), default=None, help="what a tutorial state_dict was trained on")
    p.add_argument("--device", choices=DEVICES, default="auto", help="(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON document with the results")
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser("show", help="write a labelled grid of dataset samples")
    data_flags(p)
    p.add_argument("--split", choices=["train", "test"], default="train", help="(default: %(default)s)")
    p.add_argument("--count", type=int, default=32, help="number of samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for picking samples")
    p.add_argument("--out", default=None, help="PNG file to write (default: <dataset>-<split>-samples.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("sweep", help="train a grid of settings, compare them by validation accuracy (resumable)")
    data_flags(p)
    p.add_argument("--preset", choices=list(PRESETS), default=None, help=preset_help + " (the grid varies the flags given)")
    examples = {"lr": "0.001,0.01", "batch_size": "100,256", "val_fraction": "0.1,0.2", "train_subset": "1000,all",
                "optimizer": "sgd,adam", "weight_decay": "0,1e-4"}
    shown = {"lr": "per optimizer", "train_subset": "all"}  # where the default is None
    for name in SWEEP_SETTINGS:
        p.add_argument(f"--{name.replace('_', '-')}", metavar=examples[name],
                       help=f"comma-separated values (default: {shown.get(name, getattr(defaults, name))})")
    run_flags(p, but=SWEEP_SETTINGS)
    p.add_argument("--out", required=True, help="sweep directory: one run directory per configuration, plus sweep.csv/.md/.png")
    p.add_argument("--overwrite", action="store_true", help="retrain configurations that are already done")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print one JSON document with the results")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("runs", help="list the run directories under DIR")
    p.add_argument("dir", metavar="DIR", nargs="?", default="runs", help="folder searched recursively (default: %(default)s)")
    p.add_argument("--sort", choices=["created", "name", "val_accuracy", "val_loss", "seconds"], default="created",
                   help="order (default: %(default)s; val_accuracy best first)")
    p.add_argument("--json", action="store_true", help="print a JSON list of the runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("report", help="write report.html into a run directory: curves, weights, errors, calibration")
    p.add_argument("run", metavar="RUN", help="run directory made by `image-logreg train`")
    p.add_argument("--data-dir", default=None,
                   help="folder holding MNIST/raw/ and the like, or a folder or CSV dataset's own "
                        "(default: $IMAGE_LOGREG_DATA if set, else the run's own)")
    p.add_argument("--no-download", action="store_true", help="never download missing dataset files")
    p.add_argument("--json", action="store_true", help="print one JSON document: report path, test accuracy, ECE")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("learn", help="fine-tune a run on newly labelled images without forgetting; writes a new run")
    p.add_argument("model", metavar="RUN", help="run directory or checkpoint to learn from (left as it is)")
    p.add_argument("folder", metavar="DIR", help="the new images, DIR/<class>/*.png: a folder per class named by the "
                   "class's name or index (serve stores corrections so, in RUN/feedback)")
    p.add_argument("--out", required=True, help="run directory to create for the model that learnt")
    p.add_argument("--replay", type=float, default=LEARN_REPLAY, metavar="SHARE",
                   help="the replayed training images' share of what is learnt, against forgetting (default: %(default)s)")
    p.add_argument("--hold-out", type=float, default=LEARN_HOLD_OUT, metavar="SHARE",
                   help="share of each class's new images kept out of learning to measure it on (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the replayed images and the held-out ones (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="where the parent's data is (default: $IMAGE_LOGREG_DATA if set, else the run's own)")
    p.add_argument("--no-download", action="store_true", help="never download missing dataset files")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no lines on stderr but errors")
    p.add_argument("--json", action="store_true", help="print one JSON document with the results")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("export", help="write the model as ONNX or TorchScript, preprocessing included, to use without image-logreg")
    p.add_argument("model", metavar="MODEL", help="run directory, .safetensors checkpoint or tutorial state_dict (.pth)")
    p.add_argument("--format", default="onnx", help="onnx or torchscript (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--dataset", choices=list(DATASET_NAMES), default=None,
                   help="dataset the model was trained on (default: from the checkpoint; mnist for a state_dict)")
    p.add_argument("--image-input", action="store_true",
                   help="take gray uint8 images of any size ([batch, height, width]) and normalise each as predict "
                        "normalises a file (digit-style models only)")
    p.add_argument("--json", action="store_true", help="print one JSON document describing the exported file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve models over HTTP: the Open Inference Protocol, image files and a page")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="run directory, .safetensors or tutorial .pth, optionally NAME=PATH (default name: the folder's or file's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s; 0 picks a free port)")
    p.add_argument("--token-file", metavar="FILE", help="require 'Authorization: Bearer TOKEN' with the token in FILE "
                   "(or in $IMAGE_LOGREG_TOKEN); needed to listen beyond this machine")
    p.add_argument("--no-auth", action="store_true", help="listen beyond this machine without a token")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow browser requests from ORIGIN (repeatable)")
    p.add_argument("--max-body", type=int, default=None, metavar="BYTES", help="largest request body (default: 8 MiB)")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="most images per request (default: 1024)")
    add_setting_flag(p, "max_pixels")
    p.add_argument("--dataset", choices=list(DATASET_NAMES), default=None, help="what a tutorial state_dict was trained on")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="(default: %(default)s)")
    p.add_argument("--http", choices=["auto", "httptools", "h11"], default="auto",
                   help="HTTP/1.1 parser (default: %(default)s, httptools where installed)")
    g = p.add_argument_group("slow and idle clients")
    g.add_argument("--header-timeout", type=float, default=None, metavar="SECONDS",
                   help="close a connection whose request headers are not all in by then (default: 10)")
    g.add_argument("--body-timeout", type=float, default=None, metavar="SECONDS",
                   help="answer 408 to a request whose body is not all in by then (default: 60)")
    g.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS",
                   help="close a connection idle this long between requests (default: 5)")
    g.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="answer 503 on connections past N open at once (default: 1000)")
    g.add_argument("--max-buffered", type=int, default=None, metavar="BYTES",
                   help="answer 503 to bodies past BYTES held by all requests at once (default: 128 MiB)")
    g = p.add_argument_group("corrections (POST /v2/models/NAME/feedback, and the page's \"It's a ...\")")
    g.add_argument("--learn", action="store_true",
                   help="learn from each correction at once, as a new version of the model (stored too)")
    g.add_argument("--feedback-dir", metavar="DIR",
                   help="store corrections in DIR/<class>/ (default with --learn: RUN/feedback; several models: DIR/NAME/)")
    g.add_argument("--max-feedback", type=int, default=None, metavar="N", help="most corrections stored (default: 10000)")
    g.add_argument("--feedback-rate", type=float, default=None, metavar="N",
                   help="most corrections per client and minute (default: 30)")
    g.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help="roll the model back when its test accuracy falls more than POINTS below the original's "
                        "(checked every 50 corrections; default: 1)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where --learn reads the run's data (default: where the run found it)")
    p.set_defaults(func=cmd_serve)
    return parser
