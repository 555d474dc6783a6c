"""`suggest`: which unlabelled images a person should label next, and copies of them ready to sort."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_toy_split, run_cli, write_toy_dataset
from PIL import Image

from image_logreg.files import copy_new
from image_logreg.model import LogisticRegression
from image_logreg.suggest import expected_gradient_length, rank


RAW = ["--no-normalize"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A run trained on the toy MNIST (a bright block per class), with its novelty score."""
    from image_logreg.cli import main

    root = tmp_path_factory.mktemp("suggest")
    data = write_toy_dataset(root / "data", "MNIST")
    out = root / "run"
    assert main(["train", "--data-dir", str(data), "--out", str(out), "--epochs", "3", "--quiet", "--no-download"]) == 0
    return out


def write_pngs(folder: Path, n: int, seed: int = 3) -> list[Path]:
    """``n`` toy digits as 28x28 PNG files, to be read as the toy run's own images were (``--no-normalize``:
    the toy's noisy background would not pass as MNIST's black one)."""
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = make_toy_split(n, seed)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"img{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def one_pixel_model() -> LogisticRegression:
    """Two classes decided by the sign of a single input: an input near 0 is a coin toss."""
    model = LogisticRegression((1,), 2)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[4.0], [-4.0]]))
        model.linear.bias.zero_()
    return model


class FixedNovelty:
    """A stand-in novelty score: the scores given, in the order the images are."""

    def __init__(self, scores, threshold=1.0):
        self.scores, self.threshold = torch.tensor(scores, dtype=torch.float32), threshold

    def score(self, x, logits):
        return self.scores[: len(x)]

    def rejects(self, scores):
        return scores > self.threshold


# --- the ranking ---------------------------------------------------------------------------------


def test_the_most_uncertain_images_come_first():
    """Among 200 images, the 5 next to the boundary lead; a random order would put them there
    with a chance of 1 in 2.5 billion."""
    generator = torch.Generator().manual_seed(0)
    far = (torch.rand(195, generator=generator) + 0.5) * torch.where(torch.rand(195, generator=generator) < 0.5, -1, 1)
    near = torch.tensor([0.01, -0.02, 0.04, -0.08, 0.1])
    x = torch.cat([far[:100], near, far[100:]])[:, None]
    ranking = rank(one_pixel_model(), x)
    assert sorted(ranking.order[:5].tolist()) == list(range(100, 105))
    assert ranking.order[:5].tolist() == [100, 101, 102, 103, 104]  # nearest the boundary first
    assert torch.all(ranking.margin[ranking.order].diff() >= 0)  # margins rise down the whole list
    assert ranking.novelty is None and ranking.rejected is None


def test_rejected_images_come_after_every_accepted_one_least_unlike_first():
    model = one_pixel_model()
    x = torch.tensor([[2.0], [0.0], [1.5], [0.01], [0.02], [3.0]])
    model.novelty = FixedNovelty([0.2, 9.0, 0.3, 5.0, 1.5, 0.1])  # rejected: 1, 3, 4 (the most uncertain)
    ranking = rank(model, x)
    assert ranking.order.tolist() == [2, 0, 5, 4, 3, 1]
    assert ranking.rejected.tolist() == [False, True, False, True, True, False]


def test_a_typicality_discount_orders_equally_uncertain_images_by_novelty():
    model = one_pixel_model()
    x = torch.tensor([[0.05], [-0.05], [0.05], [1.0]])
    model.novelty = FixedNovelty([0.9, 0.5, 0.1, 0.0])
    assert rank(model, x).order.tolist() == [0, 1, 2, 3]  # by default none: ties keep the files' order
    ranking = rank(model, x, typical=0.03)
    assert ranking.order.tolist() == [2, 1, 0, 3]
    assert ranking.worth[2] > ranking.worth[1] > ranking.worth[0]
    # the discount is small: a clearly more uncertain image still comes before a more typical one
    model.novelty = FixedNovelty([0.9, 0.0])
    assert rank(model, torch.tensor([[0.01], [0.2]]), typical=0.03).order.tolist() == [0, 1]


def test_expected_gradient_length_is_the_mean_norm_of_autograd_gradients():
    torch.manual_seed(0)
    model = LogisticRegression((4, 4), 3)
    x = torch.rand(5, 4, 4)
    proba = model.predict_proba(x)
    expected = torch.zeros(5)
    for i in range(5):
        for k in range(3):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 1]), torch.tensor([k])).backward()
            norm = torch.sqrt(model.linear.weight.grad.pow(2).sum() + model.linear.bias.grad.pow(2).sum())
            expected[i] += proba[i, k] * norm
    assert torch.allclose(expected_gradient_length(proba, x), expected, rtol=1e-5)
    ranking = rank(model, x, by="egl")
    assert ranking.order.tolist() == expected.argsort(descending=True).tolist()


# --- the command ---------------------------------------------------------------------------------


def test_suggest_prints_a_table_in_rank_order(capsys, toy_run, tmp_path):
    write_pngs(tmp_path / "pool" / "deeper", 30)
    (tmp_path / "pool" / "notes.png").write_bytes(b"not an image")
    code, out, err = run_cli(capsys, "suggest", toy_run, tmp_path / "pool", "--n", "5", *RAW)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("5 of 30 images in ") and "1 unusable" in lines[0]
    assert lines[1].split() == ["rank", "predicted", "or", "prob", "margin", "novelty", "file"]
    rows = lines[2:7]
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4", "5"]
    assert all("deeper" in row for row in rows)  # folders are searched recursively
    assert "notes.png" in err and "warning: skipped" in err


def test_suggest_json_matches_predict_and_ranks_by_worth(capsys, toy_run, tmp_path):
    paths = write_pngs(tmp_path / "pool", 30)
    code, out, err = run_cli(capsys, "suggest", toy_run, tmp_path / "pool", "--n", "30", "--json", *RAW)
    assert code == 0, err
    result = json.loads(out)
    assert result["found"] == result["ranked"] == 30 and result["skipped"] == [] and result["by"] == "margin"
    entries = result["suggestions"]
    assert [e["rank"] for e in entries] == list(range(1, 31))
    assert sorted(e["source"] for e in entries) == sorted(map(str, paths))
    accepted = [e for e in entries if not e["rejected"]]
    rejected = [e for e in entries if e["rejected"]]
    assert entries == accepted + rejected and accepted and rejected
    assert all(a["ood_score"] <= b["ood_score"] for a, b in zip(rejected, rejected[1:]))
    assert all(a["worth"] >= b["worth"] for a, b in zip(accepted, accepted[1:]))
    # read as predict reads a file: the same probabilities
    code, out, err = run_cli(capsys, "predict", toy_run, entries[0]["source"], "--json", *RAW)
    predicted = json.loads(out)[0]
    assert predicted["label"] == entries[0]["label"]
    assert predicted["top_k"][0]["probability"] == pytest.approx(entries[0]["probability"], abs=1e-6)
    assert predicted["top_k"][1]["label"] == entries[0]["runner_up"]


def test_copy_to_never_replaces_a_file_and_does_not_suggest_a_file_twice(capsys, toy_run, tmp_path):
    write_pngs(tmp_path / "pool", 12)
    sort = tmp_path / "sort"
    (sort / "3").mkdir(parents=True)  # a class folder named by index: no second one for class 3
    code, out, err = run_cli(capsys, "suggest", toy_run, tmp_path / "pool", "--n", "4", "--copy-to", sort, "--json", *RAW)
    assert code == 0, err
    first = json.loads(out)["suggestions"]
    copies = [Path(e["copied_to"]) for e in first]
    assert [c.parent for c in copies] == [sort] * 4
    for entry, copy in zip(first, copies):
        assert copy.name.startswith(f"{entry['rank']:03d} [") and copy.name.endswith(Path(entry["source"]).name)
        assert copy.read_bytes() == Path(entry["source"]).read_bytes()
    folders = sorted(p.name for p in sort.iterdir() if p.is_dir())
    assert "3" in folders and "3 - three" not in folders and len(folders) == 10
    assert not [p for p in sort.iterdir() if p.name.startswith(".")]  # no temporary files left

    # sort one copy, put a file of one's own where the next run's first copy will go, and ask again
    os.replace(copies[0], sort / "3" / copies[0].name)
    from image_logreg.checkpoint import load_model
    from image_logreg.suggest import suggest_files

    model, meta = load_model(toy_run)
    coming = suggest_files(model, meta, tmp_path / "pool", 1, labelled=sort, normalize=False)["suggestions"][0]
    guess = "unrecognised" if coming["rejected"] else coming["label"]
    mine = sort / f"001 [{guess}] {Path(coming['source']).name}"
    mine.write_bytes(b"my own file")
    code, out, err = run_cli(capsys, "suggest", toy_run, tmp_path / "pool", "--n", "4", "--copy-to", sort, "--json", *RAW)
    assert code == 0, err
    second = json.loads(out)
    assert second["already_labelled"] == 4 and second["ranked"] == 8  # the four copies, sorted or not
    assert not {e["source"] for e in first} & {e["source"] for e in second["suggestions"]}
    assert mine.read_bytes() == b"my own file"
    assert Path(second["suggestions"][0]["copied_to"]) == mine.with_name(f"{mine.stem}-2{mine.suffix}")
    assert all(Path(c).read_bytes() == Path(e["source"]).read_bytes()
               for e in first[1:] for c in [sort / Path(e["copied_to"]).name])  # the earlier copies, untouched


def test_copy_new_picks_a_free_name(tmp_path):
    source = tmp_path / "a.png"
    source.write_bytes(b"new")
    taken = tmp_path / "out" / "x.png"
    taken.parent.mkdir()
    taken.write_bytes(b"mine")
    (tmp_path / "out" / "x-2.png").write_bytes(b"mine too")
    assert copy_new(source, taken) == tmp_path / "out" / "x-3.png"
    assert taken.read_bytes() == b"mine" and (tmp_path / "out" / "x-2.png").read_bytes() == b"mine too"
    assert (tmp_path / "out" / "x-3.png").read_bytes() == b"new"
    assert sorted(p.name for p in taken.parent.iterdir()) == ["x-2.png", "x-3.png", "x.png"]


def test_a_model_without_a_novelty_score_ranks_by_margin_alone(capsys, toy_run, tmp_path):
    from image_logreg.checkpoint import load_model

    model, _ = load_model(toy_run)
    torch.save(model.state_dict(), tmp_path / "old.pth")
    write_pngs(tmp_path / "pool", 10)
    code, out, err = run_cli(capsys, "suggest", tmp_path / "old.pth", tmp_path / "pool", "--n", "3", "--json", *RAW)
    assert code == 0, err
    entries = json.loads(out)["suggestions"]
    assert "no novelty score" in err and all("rejected" not in e for e in entries)
    assert entries[0]["margin"] <= entries[1]["margin"] <= entries[2]["margin"]


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("empty", "no image files"),
    ("unusable", "no images left to suggest"),
    ("a file", "is a file"),
    ("not a run", "run directory"),
    ("n 0", "--n must be at least 1"),
    ("copy-to a file", "is a file, not a folder"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, toy_run, tmp_path, case, message):
    pool = tmp_path / "pool"
    pool.mkdir()
    args = [toy_run, pool]
    if case == "missing":
        args = [toy_run, tmp_path / "nowhere"]
    elif case == "unusable":
        (pool / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif case == "a file":
        args = [toy_run, write_pngs(pool, 1)[0]]
    elif case == "not a run":
        write_pngs(pool, 1)
        args = [tmp_path, pool]
    elif case == "n 0":
        args += ["--n", "0"]
    elif case == "copy-to a file":
        write_pngs(pool, 1)
        (tmp_path / "file").write_text("x")
        args += ["--copy-to", tmp_path / "file"]
    code, out, err = run_cli(capsys, "suggest", *args)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("image-logreg: error:") and message in lines[0], err
