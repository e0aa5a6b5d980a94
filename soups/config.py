"""One typed configuration, validated once at the edge and passed down unchanged.

Every section has defaults that run offline on a 2-core CPU machine; a YAML file overrides any field.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from soups.pretrained import PretrainedStart, parse_pretrained
from soups.splits import OOD_VAL_MEAN

Precision = Literal["fp32", "bf16"]
"""What evaluation computes in (`eval.precision`)."""


class _Section(BaseModel):
    """Unknown fields are errors, so a typo in a config file never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field("soups-vit-tiny", description="open_clip architecture name (ours or open_clip's).")
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag, a local checkpoint file, 'local-dir:/dir', or null: then the flows "
        "fill in the offline pretrained start (or random init when `pretrain` is null) once, at their entry.",
    )

    @property
    def start(self) -> PretrainedStart:
        """What ``pretrained`` names (`soups.pretrained`): the one place its prefixes are read."""
        return parse_pretrained(self.pretrained)


class DataConfig(_Section):
    class Heldout(_Section):
        """Where the model-selection split comes from (YAML key ``from``, a Python keyword, hence the alias)."""

        model_config = ConfigDict(populate_by_name=True)

        source: Literal["val", "train"] = Field(
            "val",
            alias="from",
            description="'val': the val/ folder (csv: split 'val') is held-out. 'train': a stratified, seeded "
            "`fraction` of each train class is held-out, as the paper did on ImageNet, and the one of val/ or "
            "test/ present is the test split (both present is an error: ImageNet's val is the paper's test set).",
        )
        fraction: float = Field(0.02, gt=0, lt=1, description="Share of each train class held out with 'train'.")
        mask: Path | None = Field(
            None,
            description="A .npy 0/1 or boolean array over the train images in torchvision ImageFolder order (class "
            "folders sorted, files sorted within each; csv: the manifest's train rows in order): the 1s are held "
            "out, the 0s fine-tune. The paper's official split is imagenet_98_idxs.npy (26 per class). Implies "
            "from: train; fraction is then unused.",
        )

        @model_validator(mode="before")
        @classmethod
        def _mask_means_train(cls, value: Any) -> Any:
            if isinstance(value, dict) and value.get("mask") is not None:
                source = value.get("from", value.get("source", "train"))
                if source != "train":
                    raise ValueError(
                        f"a held-out mask selects train images, but from is {source!r}; drop from or set it to train"
                    )
                return {**value, "from": "train"}
            return value

    name: Literal["digits", "imagefolder", "csv"] = Field(
        "digits", description="digits (scikit-learn's, offline), imagefolder (data.root) or csv (data.manifest)."
    )
    root: Path | None = Field(None, description="imagefolder: folder with train/ val/ test/ (+ shift folders).")
    manifest: Path | None = Field(None, description="csv: manifest with columns path,label[,split].")
    seed: int = Field(0, description="Seed of the split and of the generated shift sets.")
    ood_val: list[str] = Field(
        default_factory=list,
        description="Shift sets for robustness-aware selection, never built from test images: digits builds the "
        "named transforms (rotate, noise, blur, invert) from held-out images; imagefolder/csv take the named "
        "extra folders / split values out of the reported shifts.",
    )
    heldout: Heldout = Field(
        default_factory=Heldout, description="Held-out split: {from: val | train, fraction: 0.02} (imagefolder/csv)."
    )
    classnames: str | None = Field(
        None,
        description="Names the text tower reads: null (train folder names / csv labels; digits' own), 'imagenet' "
        "(open_clip's IMAGENET_CLASSNAMES; needs exactly 1000 WordNet-id train folders, sorted), or a file of "
        "'folder<TAB>name' or 'folder,name' lines.",
    )
    templates: str = Field(
        "default",
        description="Prompt templates: 'default' (digits' own, generic photo prompts otherwise), 'openai_imagenet' "
        "(open_clip's 80), 'simple' (open_clip's 7), or a file with one template containing {} per line.",
    )
    label_maps: dict[str, str] = Field(
        default_factory=dict,
        description="Per shift folder (csv: split value) whose classes are not named like train's: 'index' (class "
        "folders named 0..N-1, as ImageNetV2), a file of 'its name<TAB>train folder name' lines, or a .json file "
        "(many-to-one, the official objectnet_to_imagenet_1k.json format) mapping each of its class folders to train "
        "classes joined by '; ', named by train folder (WordNet id) or by data.classnames name: the set then has "
        "its own classes (ObjectNet: 113), each scored by the max of its train classes' logits.",
    )
    class_subsets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per shift / ood_val set: the train class folder names (csv: labels) it is scored on, "
        "overriding the classes inferred from its class folders (csv: its labels); logits are restricted to them "
        "(not for a set with a .json label map, which pools its own).",
    )
    border_crop: dict[str, int] = Field(
        default_factory=dict,
        description="Per set (folder; csv: split value): pixels cropped off every side of each of its images as it "
        "is read, before any preprocessing (the official ObjectNet evaluation crops 2).",
    )
    cache_dir: Path | None = Field(
        None,
        description="imagefolder: where folder listings are cached (default <root>/.soups-cache); an unwritable "
        "one only warns, and every load lists the folders again.",
    )
    bad_files: Literal["error", "skip"] = Field(
        "error",
        description="An unreadable image met while reading: 'error' raises naming it; 'skip' warns, records it "
        "in the dataset's bad_files and returns the next readable image instead.",
    )

    @model_validator(mode="after")
    def _paths_given(self) -> DataConfig:
        if self.name == "imagefolder" and self.root is None:
            raise ValueError("data.root is required when data.name is 'imagefolder'")
        if self.name == "csv" and self.manifest is None:
            raise ValueError("data.manifest is required when data.name is 'csv'")
        return self

    @model_validator(mode="after")
    def _layout_options_fit(self) -> DataConfig:
        if self.name == "digits" and (
            self.heldout.source == "train" or self.label_maps or self.class_subsets or self.border_crop
        ):
            raise ValueError(
                "data.heldout.from train (or a mask), data.label_maps, data.class_subsets and data.border_crop are "
                "for imagefolder/csv data; digits has fixed splits and full-class shift sets: remove them"
            )
        if "train" in self.label_maps:
            raise ValueError("data.label_maps names 'train', whose folders define the classes; map shift sets only")
        pooled = sorted(name for name, label_map in self.label_maps.items() if label_map.lower().endswith(".json"))
        core = [name for name in pooled if name in ("val", "test")]
        if core:
            raise ValueError(
                f"data.label_maps gives {core[0]!r} a .json (many-to-one) map, which only shift and ood_val sets may "
                "have: held-out and test are scored on the model's classes"
            )
        small = [f"{name}: {pixels}" for name, pixels in self.border_crop.items() if pixels < 1]
        if small:
            raise ValueError(f"data.border_crop {small[0]} crops nothing; give a pixel count >= 1 or drop the entry")
        both = [name for name in pooled if name in self.class_subsets]
        if both:
            raise ValueError(
                f"data.class_subsets names {both[0]!r}, whose .json label map already says which train classes "
                "score each of its classes; drop its class_subsets entry"
            )
        empty = [name for name, classes in self.class_subsets.items() if not classes]
        if empty:
            raise ValueError(f"data.class_subsets[{empty[0]!r}] is empty; list the class folders the set covers")
        return self


class TrainConfig(_Section):
    """One fine-tuning run; the paper's sweep space is expressible field by field."""

    lr: float = Field(3e-4, gt=0, description="AdamW's peak learning rate (cosine decay after the warmup).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled weight decay.")
    epochs: int = Field(3, ge=1, description="Passes over the train split.")
    batch_size: int = Field(32, ge=1, description="Images per optimisation step.")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear learning-rate warmup from 0.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradients' global L2 norm to this; null: never.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy; 0: off.")
    mixup_alpha: float = Field(0.0, ge=0, description="Beta(alpha, alpha) mixup; 0 turns it off.")
    randaugment_m: int = Field(0, ge=0, le=30, description="RandAugment magnitude.")
    randaugment_n: int = Field(0, ge=0, le=4, description="RandAugment ops per image; 0 turns it off.")
    init: Literal["zero_shot", "linear_probe"] = Field(
        "zero_shot",
        description="Where fine-tuning starts: 'zero_shot' (the zero-shot head) or 'linear_probe' (LP-FT, as the "
        "paper's released models: the head is first fitted on frozen, unit-norm train features from the zero-shot "
        "head, once per sweep, then the whole model is fine-tuned from it).",
    )
    probe_steps: int = Field(
        100, ge=1, description="L-BFGS iterations of the linear probe on the train features (init linear_probe)."
    )
    probe_weight_decays: list[float] = Field(
        default_factory=lambda: [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2],
        min_length=1,
        description="L2 penalties (wd/2 * |W|^2) the linear probe is fitted with (init linear_probe); with more "
        "than one, the one with the lowest held-out cross-entropy is the start (a start should be calibrated, "
        "not only accurate: unpenalised heads on separable features grow without bound).",
    )
    seed: int = Field(0, description="Seeds initialisation order, augmentation and mixup (a trial adds its number).")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'.")
    bf16: bool = Field(True, description="bfloat16 autocast for training on CUDA (ignored on CPU).")
    threads: int | None = Field(None, ge=1, description="CPU threads for this run (default: all cores).")
    deterministic: bool = Field(
        False,
        description="PyTorch's deterministic algorithms, cuDNN's deterministic kernels and the cuBLAS workspace "
        "setting, so a rerun on the same GPU is bit-identical (slower; see README, Reproducibility). CPU runs "
        "are bit-identical without it for the same machine, seed and thread count.",
    )
    eval_batch_size: int = Field(512, ge=1, description="Images per forward pass when scoring.")
    crop_scale: tuple[float, float] | None = Field(
        None,
        description="Random resized crop scale range at the model's resolution (the paper's ImageNet runs: timm's "
        "[0.08, 1.0]); null: resize and centre-crop (the digits default).",
    )
    hflip: bool = Field(False, description="Random horizontal flip, p 0.5 (ImageNet yes; digits must not flip).")
    cache_bytes: ByteSize = Field(
        8 << 30,
        ge=0,
        description="Decode the train split once into memory when it fits; stream it from disk beyond. "
        "Bytes, or with a unit: 16GiB, 512MB.",
    )
    workers: int = Field(4, ge=0, description="DataLoader worker processes when the train split is streamed.")
    prefetch: int = Field(2, ge=1, description="Batches each worker prepares ahead.")
    checkpoint_every: int = Field(
        1,
        ge=0,
        description="Epochs between training states kept (weights, AdamW moments, schedule, generators) so a lost "
        "trial resumes at its next epoch; a sweep keeps the latest in the trial's MLflow run and deletes it once the "
        "ingredient is registered. 0: none.",
    )

    @field_validator("probe_weight_decays")
    @classmethod
    def _decays_not_negative(cls, decays: list[float]) -> list[float]:
        if any(not decay >= 0 for decay in decays):
            raise ValueError(f"probe_weight_decays must all be >= 0, got {decays}")
        return decays

    @model_validator(mode="after")
    def _crop_scale_range(self) -> TrainConfig:
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(self.crop_scale)}")
        return self


class EvalConfig(_Section):
    """How the kitchen reads evaluation splits: decoded once into memory while they fit, streamed beyond."""

    cache_bytes: ByteSize = Field(
        8 << 30,
        ge=0,
        description="Memory for decoded evaluation splits (held-out first, then test, then shifts); the rest stream. "
        "Bytes, or with a unit: 16GiB, 512MB.",
    )
    workers: int = Field(2, ge=0, description="DataLoader worker processes for streamed evaluation splits.")
    precision: Precision = Field(
        "fp32",
        description="fp32: the official evaluation (no autocast); bf16: bfloat16 autocast, faster on a GPU and a "
        "little different (benchmarks/eval_precision.py measures both).",
    )


class FinetuneConfig(_Section):
    """Everything one fine-tuning run needs; a sweep trial is this plus sampled ``train`` fields."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class Distribution(_Section):
    """One hyperparameter's search range. ``or_zero`` samples 'off' (0) or a value from the range, as the paper
    did for label smoothing and mixup."""

    kind: Literal["loguniform", "uniform", "int", "categorical"] = Field(
        description="loguniform, uniform, int (both ends included) or categorical (from choices)."
    )
    low: float | None = Field(None, allow_inf_nan=False, description="The range's low end (not categorical).")
    high: float | None = Field(None, allow_inf_nan=False, description="The range's high end (not categorical).")
    choices: list[float | int | str] | None = Field(None, description="The values a categorical one picks from.")
    or_zero: bool = Field(
        False, description="Each draw first picks on or off; off is 0 (the paper's smoothing, mixup)."
    )

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        if self.kind == "categorical":
            if not self.choices:
                raise ValueError("a categorical distribution needs a non-empty 'choices' list")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"a {self.kind} distribution needs low <= high, got low={self.low} high={self.high}")
        elif self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform distribution needs low > 0, got {self.low}")
        return self


def paper_search_space() -> dict[str, Distribution]:
    """The random sweep behind the paper's 72 CLIP ViT-B/32 ingredients (see REFERENCE.md)."""
    return {
        "lr": Distribution(kind="loguniform", low=1e-6, high=1e-4),
        "weight_decay": Distribution(kind="loguniform", low=8e-5, high=0.53),
        "epochs": Distribution(kind="int", low=4, high=16),
        "label_smoothing": Distribution(kind="uniform", low=0.0, high=0.225, or_zero=True),
        "mixup_alpha": Distribution(kind="uniform", low=0.0, high=0.875, or_zero=True),
        "randaugment_m": Distribution(kind="int", low=1, high=20),
        "randaugment_n": Distribution(kind="int", low=0, high=2),
    }


class SweepConfig(_Section):
    sampler: Literal["tpe", "random", "qmc"] = Field(
        "tpe", description="Optuna sampler: tpe, random (the paper's sweep) or qmc (Sobol, scrambled)."
    )
    n_trials: int = Field(16, ge=1, description="Trials to add in this run (a resumed study keeps its old ones).")
    parallel: int = Field(1, ge=1, description="Trials running at once.")
    seed: int = Field(0, description="The sampler's seed.")
    pruning: bool = Field(False, description="Median pruning on per-epoch held-out accuracy.")
    study_name: str | None = Field(None, description="Defaults to the experiment name.")
    dispatch: Literal["local", "deployment"] = Field(
        "local",
        description="'local': trials run as tasks of the sweep's process; 'deployment': each trial is a flow run "
        "of the `sweep.deployment` deployment, taken by any worker of its pool (see README, Scaling out).",
    )
    deployment: str = Field(
        "trial/trial",
        pattern=r"^[^/]+/[^/]+$",
        description="'flow/deployment' that runs one trial when dispatch is 'deployment' (deployments/prefect.yaml).",
    )
    poll_seconds: float = Field(
        0.5, gt=0, description="How often a 'deployment' sweep checks its trials' flow runs and Optuna states."
    )
    heartbeat_seconds: int = Field(
        60,
        ge=1,
        description="Running trials record a heartbeat this often (RDB storages); the next sweep fails a trial "
        "whose process died once it has had none for twice this, with its MLflow run.",
    )


def _default_recipes() -> list[RecipeChoice]:
    from soups.recipes import DEFAULT_KITCHEN

    return [RecipeChoice.model_validate(choice) for choice in DEFAULT_KITCHEN]


class RecipeChoice(_Section):
    """One recipe to cook and its options, checked against the options the recipe declares (a bare name in
    YAML keeps every default). ``grid`` lists values of options to try: the kitchen cooks every point, keeps
    the one with the best held-out score and records the whole curve; test data never chooses."""

    name: str
    label: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The candidate's name, when a recipe is listed more than once (e.g. greedy_ties).",
    )
    options: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Option name -> values to try.")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        """A bare name is valid too in the JSON schema that Prefect checks flow-run parameters against."""
        return {"anyOf": [{"type": "string", "title": "Recipe name"}, handler(core_schema)]}

    @model_validator(mode="after")
    def _declared_options(self) -> RecipeChoice:
        from soups.recipes import recipe_options

        self.options = recipe_options(self.name, self.options).model_dump(mode="json", by_alias=True)
        empty = [option for option, values in self.grid.items() if not values]
        if empty:
            raise ValueError(f"recipe {self.name!r} grid for {empty[0]!r} is empty; give at least one value")
        for point in self.grid_points():
            recipe_options(self.name, point)
        return self

    @property
    def key(self) -> str:
        """Which entry of the kitchen this is: its label, or the recipe's name."""
        return self.label or self.name

    @property
    def stored_name(self) -> str:
        """The entry's name where a store needs one (its Prefect task run, its record)."""
        from soups.names import stored_name

        return stored_name(self.key)

    def candidate_labels(self) -> list[str]:
        """The leaderboard labels of what it cooks: the recipe's dish names, or the label (prefixing each dish's
        name when the recipe cooks several)."""
        from soups.recipes import get_recipe, recipe_options

        names = get_recipe(self.name).names(recipe_options(self.name, self.options))
        if not self.label:
            return names
        return [self.label] if len(names) == 1 else [f"{self.label}_{name}" for name in names]

    def grid_points(self) -> list[dict[str, Any]]:
        """The options of every grid point (all options when there is no grid)."""
        names = list(self.grid)
        return [{**self.options, **dict(zip(names, values, strict=True))} for values in product(*self.grid.values())]


class KitchenConfig(_Section):
    recipes: list[RecipeChoice] = Field(
        default_factory=_default_recipes,
        description="Recipes to cook, each a name or {name, label, options, grid}; default: DEFAULT_KITCHEN of "
        "soups/recipes/__init__.py.",
    )
    learned_fit_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Part of held-out that learned soups fit on; the rest (the leaderboard's `heldout`) scores, "
        "selects and promotes every candidate. 0: the official protocol (the paper presets): learned soups fit "
        "on the whole held-out split and greedy scores it whole; the learned soups' held-out scores are then "
        "in-sample, marked so wherever they appear, and never promote them.",
    )
    paper: Literal["vit-b32"] | None = Field(
        None,
        description="The paper's published table this experiment reproduces (configs/paper/): report.md prints its "
        "numbers beside ours for the rows it reports.",
    )
    promotion_metric: Literal["heldout", "ood_val_mean"] = Field(
        "heldout",
        description="Metric that picks the champion: held-out accuracy, or the mean over data.ood_val sets (built "
        "from held-out images). Test and the reported shift sets never choose a model.",
    )
    bootstrap: int = Field(
        1000, ge=0, description="Bootstrap resamples behind each accuracy's 95 % interval; 0 turns intervals off."
    )
    ingredient_versions: list[int] | None = Field(None, description="Registry versions to cook; default: the study's.")

    @model_validator(mode="after")
    def _each_recipe_once(self) -> KitchenConfig:
        keys = [choice.key for choice in self.recipes]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"recipes {twice} are listed more than once; give each a distinct label")
        from soups.names import unique_stored_names

        labels = [label for choice in self.recipes for label in choice.candidate_labels()]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"recipes cook {twice} more than once; give the recipes distinct labels")
        unique_stored_names(labels)
        return self

    def recipe_names(self) -> list[str]:
        return [choice.name for choice in self.recipes]


class TrackingConfig(_Section):
    root: Path = Field(Path("soups-data"), description="Folder holding MLflow, Optuna and checkpoint data.")
    mlflow_uri: str | None = Field(None, description="Tracking URI; default sqlite:///<root>/mlflow.db.")
    optuna_storage: str | None = Field(
        None, description="sqlite:///… / RDB URL / journal:<path>; default sqlite:///<root>/optuna.db."
    )
    cache_dir: Path | None = Field(
        None,
        description="This machine's cache of what it downloads (pretrained starts), one folder per sha256; "
        "default <root>/cache.",
    )

    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_uri or f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    def served(self) -> bool:
        """Whether MLflow is a tracking server (reached over HTTP from every machine) rather than a store on
        this machine."""
        return self.resolved_mlflow_uri().startswith(("http://", "https://"))

    def resolved_optuna_storage(self) -> str:
        return self.optuna_storage or f"sqlite:///{(self.root / 'optuna.db').resolve()}"

    @field_validator("mlflow_uri", "optuna_storage")
    @classmethod
    def _no_password(cls, uri: str | None, info: Any) -> str | None:
        """A config is logged, tracked and stored as Prefect flow-run parameters: no secret may be in it."""
        if uri and "://" in uri and urlsplit(uri).password is not None:
            raise ValueError(
                f"tracking.{info.field_name} has a password in it; a config is logged, tracked and stored as Prefect "
                "parameters, so remove ':<password>' from the URL and export it instead: PGPASSWORD (PostgreSQL), "
                "MYSQL_PWD (MySQL), MLFLOW_TRACKING_PASSWORD (an MLflow server)"
            )
        return uri

    def checkpoint_dir(self) -> Path:
        """Where fine-tunes on this machine write checkpoints before uploading them to the artifact store."""
        return (self.root / "checkpoints").resolve()

    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.root / "cache").resolve()

    def artifact_root(self) -> str:
        return (self.root / "artifacts").resolve().as_uri()


class PretrainConfig(_Section):
    """Offline contrastive pretraining, for when no pretrained CLIP weights can be had. Defaults tuned on
    soups-vit-tiny + digits on 2 CPU cores: 0.75-0.87 zero-shot held-out accuracy in about 7 s.

    Small batches give more steps per epoch (631 images); gradient clipping and Adam beta2 0.98 (CLIP's
    own) keep the text tower from collapsing to one embedding early on.
    """

    epochs: int = Field(6, ge=1, description="Passes over the pretraining images.")
    batch_size: int = Field(32, ge=2, description="Image-text pairs per contrastive step (at least 2).")
    lr: float = Field(1e-3, gt=0, description="AdamW's peak learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear learning-rate warmup from 0.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradients' global L2 norm to this; null: never.")
    seed: int = Field(0, description="Seeds the offline pretraining.")


class PipelineConfig(_Section):
    """The whole job: pretrain (optional) -> Optuna sweep of fine-tunes -> soup kitchen -> promotion."""

    experiment: str = Field(
        "digits-soups",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Names the MLflow experiment, the registered models (<experiment>, <experiment>-ingredients) "
        "and the Optuna study.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The architecture and its start.")
    data: DataConfig = Field(default_factory=DataConfig, description="The dataset, its splits and shift sets.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Base settings; the sweep samples over them.")
    space: dict[str, Distribution] = Field(
        default_factory=paper_search_space,
        description="What the sweep samples, by train field (default: the paper's seven dimensions).",
    )
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="The Optuna sweep of fine-tunes.")
    kitchen: KitchenConfig = Field(default_factory=KitchenConfig, description="What the kitchen cooks and picks.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="How evaluation splits are read and scored.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Where MLflow, Optuna and checkpoints keep their data."
    )
    pretrain: PretrainConfig | None = Field(
        default_factory=PretrainConfig,
        description="Pretrain offline when model.pretrained is null; set to null to fine-tune from random init.",
    )

    @model_validator(mode="after")
    def _digits_never_flip(self) -> PipelineConfig:
        flips = self.train.hflip or ("hflip" in self.space)
        if self.data.name == "digits" and flips:
            raise ValueError("train.hflip: digits must not flip (a mirrored 2 or 7 is no digit); set it false")
        return self

    @model_validator(mode="after")
    def _ood_val_to_promote_on(self) -> PipelineConfig:
        if self.kitchen.promotion_metric == OOD_VAL_MEAN and not self.data.ood_val:
            raise ValueError("kitchen.promotion_metric ood_val_mean needs data.ood_val sets; name some or use heldout")
        return self

    @model_validator(mode="after")
    def _space_fits_train(self) -> PipelineConfig:
        unknown = [name for name in self.space if name not in TrainConfig.model_fields]
        if unknown:
            raise ValueError(
                f"space names {unknown}, which are not training settings; allowed: "
                f"{', '.join(TrainConfig.model_fields)}"
            )
        # Every value the sampler can draw must be a valid training setting, or every trial fails at its start.
        from pydantic import ValidationError

        problems = []
        for name, dist in self.space.items():
            field = TrainConfig.model_fields[name]
            if dist.kind in ("uniform", "loguniform") and field.annotation in (int, int | None):
                problems.append(f"space.{name}: train.{name} is an integer; use kind int, not {dist.kind}")
                continue
            if dist.kind == "categorical":
                values = [(f"choice {choice!r}", choice) for choice in dist.choices]
            else:
                cast = int if dist.kind == "int" else float
                values = [
                    (f"{side} {cast(bound)!r}", cast(bound)) for side, bound in (("low", dist.low), ("high", dist.high))
                ]
            if dist.or_zero:
                values.append(("or_zero's 0", 0 if dist.kind == "int" else 0.0))
            for what, value in values:
                try:
                    TrainConfig.model_validate({name: value})
                except ValidationError as err:
                    limits = "; ".join(e["msg"] for e in err.errors() if tuple(e["loc"][:1]) in ((name,), ()))
                    problems.append(f"space.{name}: {what} is not a valid train.{name} ({limits or err})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def study_name(self) -> str:
        return self.sweep.study_name or self.experiment

    def finetune_config(self, params: dict[str, object] | None = None) -> FinetuneConfig:
        """A trial's fine-tuning config: base settings with sampled ``params`` applied (validated again)."""
        train = TrainConfig.model_validate({**self.train.model_dump(), **(params or {})})
        return FinetuneConfig(model=self.model, data=self.data, train=train)

    def with_pretrained(self, pretrained: str | None) -> PipelineConfig:
        """This config with the pretrained start filled in; flows call it once, at their entry."""
        return self.model_copy(update={"model": self.model.model_copy(update={"pretrained": pretrained})})


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the fields and what is allowed."""


def load_config(path: Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Read and validate a YAML config once, at the edge; no file means the embedded defaults."""
    import yaml
    from pydantic import ValidationError

    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML file or none for the defaults")
        try:
            text = path.read_bytes()  # bytes: PyYAML decodes UTF-8/16 itself and reports bad encodings as YAML errors
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from err
        # Besides YAMLError, PyYAML leaks ValueError (2001-02-30), KeyError (!!bool maybe), AttributeError
        # (!!timestamp x) and RecursionError (deep nesting): each means the file is not YAML the config can use.
        try:
            raw = yaml.safe_load(text) or {}
        except Exception as err:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (experiment, model, data, …)")
    for dotted, value in (overrides or {}).items():
        section = raw
        *parents, leaf = dotted.split(".")
        for depth, parent in enumerate(parents, 1):
            section = section.setdefault(parent, {})
            if not isinstance(section, dict):
                where = ".".join(parents[:depth])
                found = "null" if section is None else _one_line(repr(section))[:40]
                raise ConfigError(f"cannot set {dotted}: {where} is {found}, not a mapping of fields")
        section[leaf] = value
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid config{f' {path}' if path else ''}:\n{_describe(err)}") from None


def _describe(err) -> str:
    """One line per problem: the field's dotted path and what is wrong with it."""
    lines = []
    for problem in err.errors():
        where = ".".join(_one_line(str(part)) for part in problem["loc"]) or "(top level)"
        lines.append(f"  {where}: {_one_line(problem['msg'])}")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    """Text as it is when it is printable on one line; escaped otherwise (a key holding a newline, say)."""
    return text if text.isprintable() else repr(text)[1:-1]


def _yaml_problem(err: Exception) -> str:
    """PyYAML's error on one line: what it found and where, without its multi-line excerpt of the file."""
    import yaml

    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if isinstance(err, yaml.MarkedYAMLError) and mark is not None:
        what = "; ".join(_one_line(part) for part in (err.context, err.problem) if part) or type(err).__name__
        return f"{what} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(err, yaml.reader.ReaderError) and isinstance(err.character, int):
        return f"character #x{err.character:04x} at position {err.position}: {err.reason}"
    if isinstance(err, RecursionError):
        return "nested too deeply to read"
    text = _one_line(" ".join(str(err).split()))
    if isinstance(err, yaml.YAMLError):
        return text or type(err).__name__
    return f"a value cannot be read ({type(err).__name__}: {text})"
