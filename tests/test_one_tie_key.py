"""One order for every choice made on held-out data (accuracy, then held-out loss, then fewer ingredients, then
the older version), and per-candidate outputs keyed by the candidate, not by its recipe."""

from __future__ import annotations

import torch

from soups.candidates import Candidate
from soups.checkpoint import Ingredient, save_state_dict
from soups.recipes import RecipeInputs, cook
from soups.recipes.greedy import GreedyDetails, GreedyStep
from soups.report import kitchen_figures, leaderboard
from soups.selection import best_first
from tasks.registration import RegisteredCandidate


def _tied(folder, losses: dict[str, float], versions: dict[str, str]) -> list[Ingredient]:
    """Ingredients all at held-out accuracy 0.9, told apart only by loss and version; weight w = their index."""
    out = []
    for k, name in enumerate(losses):
        path = save_state_dict({"w": torch.full((2,), float(k))}, folder / f"{name}.safetensors")
        out.append(Ingredient(path, 0.9, name, {"version": versions[name]}, losses[name]))
    return out


def test_tied_ingredients_rank_by_loss_then_by_version_not_by_registry_order(tmp_path):
    pool = _tied(
        tmp_path,
        {"v1-worst": 0.9, "v2-best": 0.2, "v3-best": 0.2, "v4": 0.5},
        {"v1-worst": "1", "v2-best": "2", "v3-best": "3", "v4": "4"},
    )
    assert [i.name for i in best_first(pool)] == ["v2-best", "v3-best", "v4", "v1-worst"]
    (best,) = cook("best", pool)
    assert best.details.ingredient == "v2-best", "the best single model: lowest loss, then the older version"
    (wise_ft,) = cook("wise_ft", pool, RecipeInputs(base=pool[0].path), alphas=[1.0])
    assert torch.equal(wise_ft.state_dict["w"], torch.full((2,), 1.0)), "WiSE-FT's fine-tuned end is that model too"


def test_greedy_starts_from_the_same_model_as_the_best_single(tmp_path):
    pool = _tied(tmp_path, {"a": 0.7, "b": 0.1, "c": 0.4}, {"a": "1", "b": "2", "c": "3"})
    (greedy,) = cook("greedy", pool, RecipeInputs(evaluate=lambda sd: 0.0))  # every soup scores worse: kept alone
    assert [s.ingredient for s in greedy.details.trajectory] == ["b", "c", "a"]
    assert [i.name for i in greedy.ingredients] == ["b"]


def test_promotion_breaks_a_full_tie_by_the_older_version():
    def version(number: str) -> RegisteredCandidate:
        return RegisteredCandidate(
            name=f"v{number}",
            recipe="greedy",
            version=number,
            scores={"heldout": 0.9, "heldout_loss": 0.3},
            ingredients=2,
        )

    ranked = sorted([version("12"), version("3"), version("7")], key=lambda c: c.key("heldout"), reverse=True)
    assert [c.version for c in ranked] == ["3", "7", "12"], "numerically: version 12 is newer than version 3"


def _greedy(label: str, kept: int, scores: list[float]) -> Candidate:
    steps = [GreedyStep(f"t{k}", 0.5, s, k < kept, min(k + 1, kept)) for k, s in enumerate(scores)]
    details = GreedyDetails(heldout_score=max(scores), strict=False, combine=label, evaluations=3, trajectory=steps)
    scores_ = {"heldout": 0.9, "heldout_loss": 0.3, "test": 0.9, "shift_mean": 0.5}
    return Candidate(label, "greedy", [f"t{k}" for k in range(kept)], scores_, None, details)


def test_each_greedy_candidate_gets_its_own_trajectory_figure_with_its_own_data():
    greedy = _greedy("greedy", kept=3, scores=[0.80, 0.82, 0.85])
    later = _greedy("greedy_task_arithmetic", kept=1, scores=[0.80, 0.40, 0.30])
    figures = kitchen_figures([greedy, later], leaderboard([greedy, later]))
    for candidate in (greedy, later):
        figure = figures[f"{candidate.stored_name}_trajectory.png"]
        (soups,) = [c for c in figure.axes[0].collections if c.get_offsets().shape[0] == 3]
        plotted = [float(y) for _, y in soups.get_offsets()]
        assert plotted == [s.candidate_score for s in candidate.details.trajectory], candidate.name
