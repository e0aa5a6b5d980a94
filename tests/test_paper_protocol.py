"""The paper's Table 1 path end to end on a miniature ImageNet: released-layout checkpoints imported with
`soups import`, cooked by `soups kitchen` with the settings of `configs/paper/released-vit-b32.yaml`.

The fixture has ImageNet's shape in small: WordNet-id train folders with an official-style held-out mask, a
val/ test split, an index-named ImageNetV2-like set, a class-subset set (ImageNet-R-like), and an ObjectNet-like
set whose classes each map to several train classes (a `; `-joined JSON map) and whose images carry a 2-pixel
border the protocol crops. Each point of the protocol is checked on what the kitchen wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from cli.main import main
from soups.images import Preprocess
from soups.importing import convert
from soups.models import create_clip, load_classifier, model_embed_dim

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "paper" / "released-vit-b32.yaml"
TINY = "soups-vit-tiny"
WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark", "n01491361": "tiger shark"}
OBJECTNET = {"fish_like": "tench; goldfish", "shark_like": "great white shark; tiger shark"}
TRAIN_PER_CLASS, HELDOUT_PER_CLASS = 8, 3
EXPERIMENT = "paper-mini"


def _png(path: Path, colour: np.ndarray, rng: np.random.Generator, border: int = 0) -> None:
    """A 16x16 image of ``colour`` plus noise; ``border`` pixels of pure magenta around it."""
    pixels = np.clip(colour + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
    if border:
        pixels = np.pad(pixels, ((border, border), (border, border), (0, 0)))
        pixels[:border], pixels[-border:], pixels[:, :border], pixels[:, -border:] = 255, 255, 255, 255
        pixels[..., 1][:border], pixels[..., 1][-border:] = 0, 0
        pixels[:, :border, 1], pixels[:, -border:, 1] = 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def miniature_imagenet(root: Path) -> dict[str, Path]:
    """The fixture's folders and the two files the user supplies (mask, ObjectNet map)."""
    rng = np.random.default_rng(0)
    colours = {wnid: rng.uniform(40, 215, 3) for wnid in WNIDS}
    for wnid, colour in colours.items():
        for i in range(TRAIN_PER_CLASS):
            _png(root / "train" / wnid / f"{wnid}_{i:04d}.JPEG.png", colour, rng)
        for i in range(3):
            _png(root / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.png", colour, rng)
    for index, wnid in enumerate(sorted(WNIDS)):  # ImageNetV2: folders named by class index
        for i in range(2):
            _png(root / "imagenetv2" / str(index) / f"{i}.png", colours[wnid], rng)
    for wnid in sorted(WNIDS)[:2]:  # ImageNet-R-like: only some classes
        for i in range(2):
            _png(root / "imagenet-r" / wnid / f"{i}.png", colours[wnid], rng)
    by_name = {name: wnid for wnid, name in WNIDS.items()}
    for folder, names in OBJECTNET.items():
        for i in range(3):
            colour = colours[by_name[names.split("; ")[i % 2]]]
            _png(root / "objectnet" / folder / f"{i}.png", colour, rng, border=2)
    mask = np.zeros(len(WNIDS) * TRAIN_PER_CLASS, dtype=np.uint8)
    for k in range(len(WNIDS)):  # ImageFolder order: classes sorted, files sorted; the last 3 of each class
        mask[k * TRAIN_PER_CLASS + TRAIN_PER_CLASS - HELDOUT_PER_CLASS : (k + 1) * TRAIN_PER_CLASS] = 1
    np.save(root / "imagenet_98_idxs.npy", mask)
    (root / "objectnet_to_imagenet_1k.json").write_text(json.dumps(OBJECTNET))
    (root / "classnames.txt").write_text("".join(f"{wnid}\t{name}\n" for wnid, name in WNIDS.items()))
    return {"mask": root / "imagenet_98_idxs.npy", "objectnet_map": root / "objectnet_to_imagenet_1k.json"}


def released_checkpoints(folder: Path, count: int = 3) -> list[Path]:
    """Released-layout state dicts (`model.*` CLIP without its text transformer, `classification_head.*`),
    fine-tunes of one start: the start plus small seeded noise, each with its own head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = create_clip(TINY)[0].eval().state_dict()
    noise = torch.Generator().manual_seed(1)
    paths = []
    for k in range(count):
        kept = {
            f"model.{key}": value + 0.02 * torch.randn(value.shape, generator=noise)
            if value.is_floating_point()
            else value
            for key, value in start.items()
            if not key.startswith("transformer.")
        }
        head = {
            "classification_head.weight": 20 * torch.randn(len(WNIDS), model_embed_dim(TINY), generator=noise),
            "classification_head.bias": torch.zeros(len(WNIDS)),
        }
        paths.append(folder / f"model_{k}.pt")
        torch.save({**kept, **head}, paths[-1])
    return paths


def paper_config(root: Path, files: dict[str, Path], tracking: Path, out: Path) -> Path:
    """The released-checkpoint preset with this fixture's paths, the tiny architecture (no download) and CPU;
    its protocol (held-out mask, fp32, the whole-held-out kitchen, the learned budget, the paper's table) kept."""
    config = yaml.safe_load(PRESET.read_text())
    config["experiment"] = EXPERIMENT
    config["model"] = {"name": TINY, "pretrained": None}
    config["pretrain"] = None
    data = config["data"]
    data.update(
        root=str(root),
        classnames=str(root / "classnames.txt"),
        heldout={**data["heldout"], "mask": str(files["mask"])},
        label_maps={"imagenetv2": "index", "objectnet": str(files["objectnet_map"])},
        border_crop={"objectnet": 2},
        class_subsets={},
    )
    config["train"] = {**config.get("train", {}), "device": "cpu", "eval_batch_size": 16}
    config["tracking"] = {"root": str(tracking)}
    config["kitchen"]["bootstrap"] = 200
    out.write_text(yaml.safe_dump(config))
    return out


@pytest.fixture(scope="module")
def cooked(prefect_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("paper")
    root = work / "imagenet"
    files = miniature_imagenet(root)
    checkpoints = released_checkpoints(work)
    config = paper_config(root, files, work / "soups-data", work / "paper.yaml")
    args = ["import", "--experiment", EXPERIMENT, "--model", TINY, "--format", "model-soups", "--config", str(config)]
    assert main([*args, *map(str, checkpoints)]) == 0
    assert main(["kitchen", str(config)]) == 0
    (folder,) = (work / "soups-data" / "kitchen").iterdir()
    return {"root": root, "config": config, "checkpoints": checkpoints, "run": folder}


def _board(cooked) -> pd.DataFrame:
    return pd.read_csv(cooked["run"] / "leaderboard.csv", keep_default_na=False)


def _record(cooked, step: str) -> list[dict]:
    return json.loads((cooked["run"] / "cooked" / f"{step}.json").read_text())


def test_the_mask_selects_the_held_out_images(cooked):
    report = (cooked["run"] / "report.md").read_text()
    heldout = len(WNIDS) * HELDOUT_PER_CLASS
    assert f"Images per split: heldout {heldout}, test {3 * len(WNIDS)}," in report
    greedy = next(r for r in _record(cooked, "recipe-greedy") if r["name"] == "greedy")
    assert all(round(step["candidate_score"] * heldout, 6).is_integer() for step in greedy["details"]["trajectory"])


def test_objectnet_is_scored_border_cropped_and_max_pooled_in_fp32(cooked, tmp_path):
    """Each ingredient's ObjectNet accuracy recomputed by hand: crop 2 pixels, the model's preprocessing, fp32
    logits, the max over each ObjectNet class's train classes."""
    board = _board(cooked).set_index("model")
    index = {wnid: i for i, wnid in enumerate(sorted(WNIDS))}
    by_name = {name: wnid for wnid, name in WNIDS.items()}
    groups = [[index[by_name[n]] for n in OBJECTNET[folder].split("; ")] for folder in sorted(OBJECTNET)]
    for version, checkpoint in enumerate(cooked["checkpoints"], 1):
        converted = convert(checkpoint, TINY, "model-soups", tmp_path)
        model = load_classifier(converted.path, TINY, len(WNIDS)).eval()
        preprocess = Preprocess.of(model)
        hits = []
        for label, folder in enumerate(sorted(OBJECTNET)):
            for image in sorted((cooked["root"] / "objectnet" / folder).iterdir()):
                pil = Image.open(image).convert("RGB")
                pil = pil.crop((2, 2, pil.width - 2, pil.height - 2))
                pixels = preprocess.decode_transform()(pil).unsqueeze(0)
                with torch.no_grad():
                    logits = model(preprocess.normalize(pixels))[0]
                pooled = torch.stack([logits[g].max() for g in groups])
                hits.append(int(pooled.argmax()) == label)
        assert board.at[f"ingredient-v{version}", "objectnet"] == pytest.approx(sum(hits) / len(hits))
    assert yaml.safe_load(cooked["config"].read_text())["eval"]["precision"] == "fp32"


def test_learned_soups_fit_the_whole_held_out_split_for_five_epochs_and_are_marked_in_sample(cooked):
    board = _board(cooked).set_index("model")
    for name in ("learned", "learned_by_layer"):
        (row,) = _record(cooked, f"recipe-{name}")
        assert row["details"]["epochs"] == 5 and row["details"]["steps"] == 5, "12 images: one batch per epoch"
        assert row["details"]["fit_images"] == len(WNIDS) * HELDOUT_PER_CLASS, "fitted on the whole held-out split"
        assert row["in_sample"] == ["heldout", "heldout_loss"]
        assert board.at[name, "in_sample"] == "heldout,heldout_loss"
    report = (cooked["run"] / "report.md").read_text()
    assert "learned soups fit on it" in report and "* are in-sample" in report
    assert "| learned | " in report and "*" in report.split("| learned | ")[1].split("\n")[0]


def test_greedy_scores_the_whole_held_out_split_best_first_by_the_one_key(cooked):
    board = _board(cooked)
    ingredients = board[board.recipe == "ingredient"].copy()
    ingredients["version"] = ingredients.model.str.removeprefix("ingredient-v").astype(int)
    ranked = ingredients.sort_values(["heldout", "heldout_loss", "version"], ascending=[False, True, True])
    greedy = next(r for r in _record(cooked, "recipe-greedy") if r["name"] == "greedy")
    assert [s["ingredient"] for s in greedy["details"]["trajectory"]] == list(ranked.model)
    (best,) = _record(cooked, "recipe-best")
    assert best["details"]["ingredient"] == ranked.model.iloc[0]


def test_report_md_prints_paired_differences_and_the_papers_numbers(cooked):
    report = (cooked["run"] / "report.md").read_text()
    resolved = report.split("## What the data resolves")[1].split("## Figures")[0]
    assert "paired bootstrap" in resolved
    assert "- test: " in resolved and " points [" in resolved
    table = report.split("## The paper's table")[1].split("## What the data resolves")[0]
    assert "paper ImageNet" in table and "| best_single |" in table and "80.38 | 47.83" in table


def test_the_promotion_names_a_candidate_by_its_label_and_never_an_in_sample_one(cooked):
    from mlflow import MlflowClient

    uri = f"sqlite:///{(cooked['run'].parents[1] / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(EXPERIMENT, "champion")
    board = _board(cooked)
    assert champion.tags["candidate"] in set(board.model)
    assert champion.tags["recipe"] not in ("learned", "learned_by_layer")
