"""The sweep spec as a typed model: its sections, their defaults and every check on them,
including those that need more than one field; `param_space()` turns a valid spec into the
fixed trial settings plus Ray Tune sampling objects.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from chestxpert.cluster.endpoints import normalize_storage_uri
from chestxpert.sweeps.space import (
    DIMENSION_MODELS,
    NOT_SEARCHABLE,
    SETTING_KINDS,
    Choice,
    Dimension,
    backbone_problem,
    did_you_mean,
    dimension_problems,
    to_tune,
    value_problem,
)
from chestxpert.sweeps.spec.messages import Problem, fail_at, problems_of, raise_if_any
from chestxpert.trainable.config import ConfigError, TrialConfig

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Metrics the trainable reports each epoch that are worth optimising, and which way is
# better; one label's AUC (`val_auc_<label>`, higher is better) is allowed too.
METRIC_MODES = {
    "val_auc_macro": "max",
    "val_pr_auc_macro": "max",
    "val_loss": "min",
    "train_loss": "min",
}
LABEL_AUC = re.compile(r"^val_auc_(?!labels$)[A-Za-z0-9_]+$")

_SECTIONS = ("mlflow", "trial", "resources", "space", "search", "scheduler")
_DIMENSION: TypeAdapter[Any] = TypeAdapter(Dimension)


class _Section(BaseModel):
    # The string under each field is its description in the JSON Schema and the README's spec
    # reference; sweeps/spec/reference.py reads them from the source (pydantic's
    # use_attribute_docstrings would parse it on every import: 0.1-0.2 s of each CLI start).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class MlflowSettings(_Section):
    """Where trial metrics go: tracking URI (None: the cluster resolver decides) and experiment
    (None: the sweep's name, filled in on validation)."""

    tracking_uri: str | None = None
    """The MLflow server; `--mlflow-uri` wins over it; null: `MLFLOW_TRACKING_URI`, the local
    stack's server, else `sqlite:///<workspace>/mlflow.db`."""
    experiment: str | None = None
    """The MLflow experiment of the sweep's parent run and its trial runs; null: the sweep's
    `name`."""


class Resources(_Section):
    """What one trial reserves on the cluster: CPUs (> 0, fractions allowed) and GPUs (>= 0)."""

    cpus: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each trial (fractions allowed); TensorFlow runs as many threads,
    and the input pipeline reads as many row groups at once, unless `trial.cpus` says
    otherwise."""
    gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each trial: a fraction up to 1 shares one GPU (`0.5`: two trials
    on each), more than 1 is a whole number; a trial with several trains on all of them
    (MirroredStrategy)."""

    @field_validator("gpus")
    @classmethod
    def _gpus_share_one_or_are_whole(cls, value: float) -> float:
        # Ray itself refuses 1.5 GPUs, but only when the first trial starts
        if value > 1 and not float(value).is_integer():
            fail_at(
                ("resources", "gpus"),
                f"resources.gpus: {value} is neither a share of one GPU (at most 1, e.g. 0.5) "
                f"nor a whole number of GPUs; use {int(value)} or {int(value) + 1}",
            )
        return value


class Search(_Section):
    """How configurations are picked (Optuna TPE or random), how many trials, how many at once,
    and an optional wall-clock budget in seconds. TPE draws `startup_trials` configurations at
    random before it models the results (None: a third of num_samples, at most Optuna's 10).
    `study_storage` is the database that keeps the Optuna study."""

    algorithm: Literal["optuna", "random"] = "optuna"
    """`optuna`: Optuna's sampler (OptunaSearch); `random`: Tune's random search."""
    sampler: Literal["tpe"] = "tpe"
    """Optuna's sampler: TPE."""
    seed: int | None = 0
    """Seed of the search algorithm (the same seed draws the same configurations); null: a
    different search each run."""
    num_samples: int = Field(32, gt=0)
    """Trials in total, `points_to_evaluate` included."""
    max_concurrent: int = Field(4, gt=0)
    """Trials running at once (at most; the cluster's free resources may allow fewer)."""
    time_budget_s: float | None = Field(None, gt=0)
    """Wall-clock budget of the sweep in seconds: running trials stop when it is spent; null:
    none."""
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    """Configurations tried first, each a mapping of `space` keys to values (a known recipe,
    say), before the algorithm picks."""
    startup_trials: int | None = Field(None, ge=1)
    """Random configurations TPE draws before it models the results; null: a third of
    `num_samples`, at most 10."""
    study_storage: str | None = None
    """Where the Optuna study is kept, a database URL without a password (null:
    `$CHESTXPERT_STUDY_STORAGE`, else the workspace's `optuna.db`)."""

    @field_validator("study_storage")
    @classmethod
    def _study_storage_is_a_database(cls, value: str | None) -> str | None:
        from chestxpert.sweeps.study import storage_problem

        if value is not None and (problem := storage_problem(value)):
            fail_at(("search", "study_storage"), f"search.study_storage: {problem}")
        return value

    def tpe_startup_trials(self) -> int:
        """Random trials before TPE models: with Optuna's fixed 10, a sweep of 10 trials or
        fewer would be random search under another name."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(1, min(10, self.num_samples // 3))


class Scheduler(_Section):
    """Early stopping with ASHA, in epochs (max_t None: the trial's epochs, filled in on
    validation), or none."""

    type: Literal["asha", "none"] = "asha"
    """`asha`: stop weak trials early at rungs; `none`: every trial runs all its epochs."""
    max_t: int | None = Field(None, ge=1)
    """Epochs a trial may reach, at most `trial.epochs`; null: `trial.epochs`."""
    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before ASHA may stop it; less than `max_t`."""
    reduction_factor: int = Field(3, ge=2)
    """At each rung (`grace_period × reduction_factor^k` epochs) only the best
    1/`reduction_factor` of the trials that got there go on."""


class SweepSpec(_Section):
    """A validated sweep spec. Fields are checked in the order below, and a check that needs
    another field sees it only if that field passed (`space` sees `trial`, `search` sees
    `space`, `scheduler` sees `trial`)."""

    name: str
    """The sweep's name: its Tune experiment and its folder in storage; letters, digits, `_`,
    `.` and `-`."""
    dataset: str
    """The prepared dataset: the folder or `s3://` prefix `data prepare` wrote; a relative
    folder is taken from the directory the spec is read in."""
    storage: str | None = None
    """Checkpoints and results: a folder or `s3://bucket/prefix`; `--storage` wins over it;
    null: `CHESTXPERT_STORAGE`, the local stack's storage, else `<workspace>/storage`."""
    ray_address: str | None = None
    """The Ray cluster; `--address` wins over it; null: `RAY_ADDRESS`, the local stack, else
    Ray in-process."""
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    """Where each trial's metrics go: one parent run per sweep, one nested run per trial."""
    model_name: str | None = None
    """The name `final` registers the final model under in MLflow; null: the sweep's `name`."""
    trial: dict[str, Any] = Field(default_factory=dict)
    """Settings every trial shares: any trial setting (table below) except `dataset`; a key
    searched in `space` is not set here."""
    resources: Resources = Field(default_factory=Resources)
    """What one trial reserves on the cluster."""
    # validate_default: the cross-field checks below must run on defaults too
    space: dict[str, Dimension] = Field(default_factory=dict, validate_default=True)
    """The search space: trial setting → dimension (table below); empty: every trial runs the
    `trial` settings."""
    search: Search = Field(default_factory=Search, validate_default=True)
    """How configurations are picked, how many trials, how many at once."""
    scheduler: Scheduler = Field(default_factory=Scheduler, validate_default=True)
    """Early stopping, in epochs."""
    metric: str = "val_auc_macro"
    """What "best" means: `val_auc_macro`, `val_pr_auc_macro`, `val_loss`, `train_loss`, or
    one label's `val_auc_<label>` (spaces in label names become `_`)."""
    mode: Literal["max", "min"] = Field("max", validate_default=True)
    """Whether higher (`max`) or lower (`min`) `metric` is better; it must fit the metric."""
    max_retries: int = Field(2, ge=0)
    """Restarts of a failed trial (a lost node, out of memory), from its last checkpoint."""
    checkpoints_to_keep: int = Field(2, ge=1)
    """Checkpoints kept per trial: the best by `metric` (ties too), besides the latest, which
    a resume continues from; the others are deleted once no saved sweep state names them."""
    reuse_actors: bool = True
    """A worker process that finished or stopped a trial runs the next one, its Keras state
    cleared, instead of a new process importing TensorFlow again."""

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, data: Any) -> Any:
        # `scheduler:` with everything below it commented out reads as null
        if isinstance(data, dict):
            return {
                key: {} if value is None and key in _SECTIONS else value
                for key, value in data.items()
            }
        return data

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            fixed = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-._") or "my-sweep"
            message = (
                f"name {name!r} may only hold letters, digits, '_', '.' and '-' (it names "
                f"the Tune experiment and its storage folder); try {fixed!r}"
            )
            fail_at(("name",), message)
        return name

    @field_validator("dataset", "storage")
    @classmethod
    def _local_path_or_uri(cls, value: str | None, info: ValidationInfo) -> str | None:
        """As `s3://bucket/prefix` or `file:///absolute/path`: trials run in other working
        directories, so a relative folder is made absolute against the one the spec is read in."""
        if value is None:
            return None
        try:
            return normalize_storage_uri(value)
        except ValueError as err:
            fail_at((info.field_name,), f"{info.field_name} {err}")

    @field_validator("model_name")
    @classmethod
    def _model_name_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            fail_at(("model_name",), "model_name is blank; leave it out to use the sweep's name")
        return value

    @field_validator("trial")
    @classmethod
    def _trial_settings(cls, trial: dict[str, Any]) -> dict[str, Any]:
        """Each key checked on its own (so each bad key is reported at its line); values come
        back as TrialConfig's types (e.g. `learning_rate: 1` as 1.0)."""
        problems: list[Problem] = []
        clean: dict[str, Any] = {}
        for key, value in trial.items():
            path = ("trial", key)
            if key == "dataset":
                message = "trial.dataset: set the dataset with the top-level `dataset` key"
                problems.append((path, message))
                continue
            if key == "dataset_generation":
                message = (
                    "trial.dataset_generation: the sweep reads the dataset's version when it "
                    "starts and every trial keeps it; leave this key out"
                )
                problems.append((path, message))
                continue
            if key not in SETTING_KINDS:
                hint = did_you_mean(key, SETTING_KINDS)
                problems.append((path, f"trial key {key!r} is not a trial setting{hint}"))
                continue
            try:
                config = TrialConfig.from_dict({key: value}, where=f"trial.{key}")
            except ConfigError as err:
                problems.append((path, str(err)))
                continue
            clean[key] = getattr(config, key)
            if key == "backbone" and (problem := backbone_problem(value, "trial.backbone")):
                problems.append((path, problem))
        raise_if_any(problems)
        return clean

    @field_validator("space", mode="before")
    @classmethod
    def _space_dimensions(cls, space: Any, info: ValidationInfo) -> Any:
        """Each dimension parsed on its own, so a malformed one does not hide the range and
        legality problems of the others."""
        if not isinstance(space, dict):
            return space  # pydantic reports that it is not a mapping
        problems: list[Problem] = []
        parsed: dict[str, Any] = {}
        for key, raw in space.items():
            try:
                parsed[key] = _DIMENSION.validate_python(raw)
            except ValidationError as err:
                problems.extend(problems_of(err, known_keys, prefix=("space", key)))
                continue
            problems.extend(
                (("space", key), message) for message in dimension_problems(key, parsed[key])
            )
        trial = info.data.get("trial")  # None when trial itself is wrong (and reported)
        if trial is not None:
            for key in [k for k in space if k in trial and k not in NOT_SEARCHABLE]:
                message = (
                    f"{key} is set in both trial ({trial[key]!r}) and space: remove it from "
                    "trial to search it, or from space to keep it fixed"
                )
                problems.append((("space", key), message))
            if not problems:
                problems.extend(_input_size_problems(trial, parsed))
        raise_if_any(problems)
        return parsed

    @field_validator("search")
    @classmethod
    def _starting_points(cls, search: Search, info: ValidationInfo) -> Search:
        problems: list[Problem] = []
        points = search.points_to_evaluate
        if len(points) > search.num_samples:
            message = (
                f"search.points_to_evaluate has {len(points)} points but num_samples is "
                f"{search.num_samples}: each point is one trial; raise num_samples or drop points"
            )
            problems.append((("search", "points_to_evaluate"), message))
        space = info.data.get("space")  # None when space itself is wrong (and reported)
        for index, point in enumerate(points if space is not None else []):
            where = f"search.points_to_evaluate[{index}]"
            for key, value in point.items():
                path = ("search", "points_to_evaluate", index, key)
                if key in space:
                    if problem := value_problem(space[key], value):
                        problems.append((path, f"{where}.{key}: {problem}"))
                elif key in SETTING_KINDS:
                    message = (
                        f"{where}: {key!r} is not in space; a starting point sets searched "
                        f"keys only (add {key} to space or drop it from the point)"
                    )
                    problems.append((path, message))
                else:
                    hint = did_you_mean(key, space or SETTING_KINDS)
                    problems.append((path, f"{where}: {key!r} is not a search-space key{hint}"))
        raise_if_any(problems)
        return search

    @field_validator("scheduler")
    @classmethod
    def _scheduler_fits_epochs(cls, scheduler: Scheduler, info: ValidationInfo) -> Scheduler:
        if scheduler.type != "asha":
            return scheduler
        problems: list[Problem] = []
        trial = info.data.get("trial")  # None when trial itself is wrong (and reported)
        epochs = None if trial is None else int(trial.get("epochs", TrialConfig.epochs))
        named = "trial.epochs" if trial and "epochs" in trial else "the default trial.epochs"
        if scheduler.max_t is not None and epochs is not None and scheduler.max_t > epochs:
            message = (
                f"scheduler.max_t {scheduler.max_t} is more than {named} {epochs}: no trial "
                "trains past its epochs; lower max_t or raise trial.epochs"
            )
            problems.append((("scheduler", "max_t"), message))
        max_t = scheduler.max_t if scheduler.max_t is not None else epochs
        if max_t is not None and scheduler.grace_period >= max_t:
            which = f"max_t {max_t}" + (f" ({named})" if scheduler.max_t is None else "")
            message = (
                f"scheduler.grace_period must be < {which} (got {scheduler.grace_period}): ASHA "
                "needs room to stop trials early; lower grace_period or set scheduler.type: none"
            )
            problems.append((("scheduler", "grace_period"), message))
        raise_if_any(problems)
        return scheduler

    @field_validator("metric")
    @classmethod
    def _metric_is_reported(cls, metric: str) -> str:
        if metric in METRIC_MODES:
            return metric
        typo = difflib.get_close_matches(metric, METRIC_MODES, n=1, cutoff=0.85)
        if LABEL_AUC.match(metric) and not typo:
            return metric  # one label's AUC: labels are known only once the dataset is read
        hint = did_you_mean(metric, METRIC_MODES) or (
            f"; use one of {', '.join(METRIC_MODES)} or val_auc_<label>"
        )
        fail_at(("metric",), f"metric {metric!r} is not one trials report{hint}")

    @field_validator("mode")
    @classmethod
    def _mode_fits_metric(cls, mode: str, info: ValidationInfo) -> str:
        metric = info.data.get("metric")
        better = METRIC_MODES.get(metric, "max")  # a label's AUC is better when higher
        if metric is not None and mode != better:
            message = (
                f"mode {mode!r} would pick the worst trial: {metric} is better when "
                f"{'higher' if better == 'max' else 'lower'}; use mode: {better}"
            )
            fail_at(("mode",), message)
        return mode

    @model_validator(mode="after")
    def _fill_defaults(self) -> SweepSpec:
        # Filled in here so every reader (driver, MLflow, resume) sees the same values.
        if self.mlflow.experiment is None:
            self.mlflow.experiment = self.name
        if self.model_name is None:
            self.model_name = self.name
        if self.scheduler.max_t is None:
            self.scheduler.max_t = self.epochs()
        TrialConfig.from_dict(self.trial_config_base(), where="trial")  # every key together
        return self

    def trial_config_base(self) -> dict[str, Any]:
        """The settings every trial shares: `trial` plus `dataset`, as plain values.

        Settings the spec leaves out are not listed; `TrialConfig` fills in their defaults.
        """
        return {**self.trial, "dataset": self.dataset}

    def epochs(self) -> int:
        """Epochs per trial: `trial.epochs`, or TrialConfig's default when the spec leaves
        it out."""
        return int(self.trial.get("epochs", TrialConfig.epochs))

    def param_space(self) -> dict[str, Any]:
        """The Tuner's `param_space`: the fixed trial settings plus one Ray Tune sampling
        object per `space` key (see `sweeps.space.to_tune`)."""
        searched = {key: to_tune(dim) for key, dim in self.space.items()}
        return {**self.trial_config_base(), **searched}

    def to_plain_dict(self) -> dict[str, Any]:
        """The spec as flat `section.key` → plain value pairs (lists kept whole), e.g.
        `scheduler.max_t: 20`, `space.learning_rate.low: 1e-05`, for MLflow params."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), inner)
            else:
                flat[prefix] = value

        walk("", self.model_dump(mode="json"))
        return flat


def _input_size_problems(trial: dict[str, Any], space: dict[str, Any]) -> list[Problem]:
    """A fixed image_size (or the smallest searched one) below a backbone's minimum input."""
    if "image_size" not in trial and "image_size" not in space:
        return []
    from chestxpert.trainable.backbones import BACKBONES, DEFAULT_BACKBONE

    backbone_dim = space.get("backbone")
    names = (
        backbone_dim.values
        if isinstance(backbone_dim, Choice)
        else [trial.get("backbone", DEFAULT_BACKBONE)]
    )
    size_dim = space.get("image_size")
    if size_dim is None:
        sizes, where = [trial["image_size"]], "trial"
    else:
        sizes, where = (
            (size_dim.values if isinstance(size_dim, Choice) else [size_dim.low]),
            "space",
        )
    smallest = min((size for size in sizes if size), default=0)  # 0: the dataset's own size
    problems = []
    for name in names:
        if smallest and smallest < BACKBONES[name].min_size:
            message = (
                f"{where}.image_size: {name} needs images of at least "
                f"{BACKBONES[name].min_size} px, got {smallest:g}"
            )
            problems.append(((where, "image_size"), message))
    return problems


def known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping at pydantic location `loc` (for suggestions)."""
    sections = {
        "mlflow": MlflowSettings,
        "resources": Resources,
        "search": Search,
        "scheduler": Scheduler,
    }
    if not loc:
        return list(SweepSpec.model_fields)
    if len(loc) == 1 and loc[0] in sections:
        return list(sections[loc[0]].model_fields)
    if len(loc) == 3 and loc[0] == "space" and loc[2] in DIMENSION_MODELS:
        return list(DIMENSION_MODELS[loc[2]].model_fields)
    return []
