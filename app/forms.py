"""The new-job form: widget values <-> ``RunConfig`` dict, one widget per config field.

``FormValues`` holds what the widgets show; :data:`FIELDS` says which config field each widget
edits. ``form_to_config`` builds the full config (preset, then the widgets on top) and validates
it with ``RunConfig.from_dict``; ``config_to_form`` is its inverse. ``predict`` plans the final
shape from the source's config.json alone (seconds, no torch). Every user mistake surfaces as
an ``EfficientLLMError`` whose message the UI shows as is.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

from app import model_policy
from efficientllm.config import RunConfig, field_docs
from efficientllm.errors import ConfigError, DataError, ModelNotFoundError
from efficientllm.presets import DEMO_MODEL, merge, preset_dict, preset_names
from efficientllm.pruning.budget import Plan, parse_budget, plan

KNOWN_MODELS = [
    DEMO_MODEL,
    "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-360M",
    "HuggingFaceTB/SmolLM2-1.7B",
    "Qwen/Qwen2.5-0.5B",
    "meta-llama/Llama-3.2-1B",
]
DEMO_DATA = "demo:austen"
DEMO_HELDOUT = "demo:austen-heldout"
UPLOAD_PREFIX = "upload:"
UPLOAD_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_PRESET = "cpu-demo"
_UPLOAD_NAME = re.compile(r"^[0-9a-f]{12}-[A-Za-z0-9._-]{1,100}$")

ADVANCED: dict[str, tuple[str, str]] = {
    "start_fraction": ("schedule", "start_fraction"),
    "trajectory": ("schedule", "trajectory"),
    "lr_schedule": ("train", "lr_schedule"),
    "saliency_mode": ("saliency", "mode"),
    "saliency_beta": ("saliency", "beta"),
    "distill_weight": ("distill", "weight"),
    "distill_temperature": ("distill", "temperature"),
    "distill_phases": ("distill", "phases"),
    "distill_teacher": ("distill", "teacher"),
    "gguf": ("export", "gguf"),
}
"""Advanced widgets that hold their config field's value as is (numbers parsed, text stripped);
their defaults, choices and help texts come from the config dataclasses."""

FIELDS: dict[str, tuple[str, str]] = {
    "model": ("model", "source"),
    "budget": ("budget", "target"),
    "dataset": ("data", "train"),
    "total_tokens": ("train", "total_tokens"),
    "prune_fraction": ("schedule", "prune_fraction"),
    "granularity": ("budget", "granularity"),
    "scorer": ("saliency", "scorer"),
    **ADVANCED,
}
"""Widget name -> (config section, field). ``preset`` is the base the widgets apply to."""


def _section_class(section: str) -> type:
    return type(getattr(RunConfig(), section))


def config_default(section: str, key: str) -> Any:
    """The dataclass default of config field ``section.key``."""
    return getattr(getattr(RunConfig(), section), key)


def config_choices(section: str, key: str) -> list[str]:
    """The choices of a ``Literal`` config field (empty for other types)."""
    return list(get_args(get_type_hints(_section_class(section))[key]))


@functools.cache
def config_help(section: str, key: str) -> str:
    """The docstring of config field ``section.key`` on one line (the widget's info text)."""
    return " ".join(field_docs(_section_class(section))[key].split())


@dataclass(frozen=True, kw_only=True)
class FormValues:
    """What the new-job widgets hold (the dataset is a name: demo:austen, upload:<f>, hub:<id>)."""

    preset: str = DEFAULT_PRESET
    model: str = DEMO_MODEL
    budget: str = "50%"
    dataset: str = DEMO_DATA
    total_tokens: int = 65536
    prune_fraction: float = 0.5
    granularity: str = "global"
    scorer: str = "taylor1"
    start_fraction: float = config_default("schedule", "start_fraction")
    trajectory: str = config_default("schedule", "trajectory")
    lr_schedule: str = config_default("train", "lr_schedule")
    saliency_mode: str = config_default("saliency", "mode")
    saliency_beta: float = config_default("saliency", "beta")
    distill_weight: float = config_default("distill", "weight")
    distill_temperature: float = config_default("distill", "temperature")
    distill_phases: str = config_default("distill", "phases")
    distill_teacher: str = config_default("distill", "teacher")
    gguf: str = config_default("export", "gguf")

    def as_list(self) -> list[Any]:
        """Values in widget order (the order of the dataclass fields)."""
        return list(asdict(self).values())


FIELD_ORDER = ("preset", *FIELDS)
"""Widget order: the preset first, then one widget per entry of :data:`FIELDS`."""


def uploads_dir(data_root: Path, owner: str) -> Path:
    """Where ``owner``'s uploaded datasets live (server-chosen, below the data directory)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", owner)[:64] or "_"
    return Path(data_root).resolve() / "uploads" / safe


def save_upload(src: str | Path, *, owner: str, data_root: Path, max_bytes: int) -> str:
    """Copy an uploaded file below the data dir; returns the dataset name ``upload:<file>``."""
    src = Path(src)
    suffix = src.suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise DataError(f"{src.name}: upload a .txt, .jsonl or .parquet file")
    size = src.stat().st_size
    if size == 0:
        raise DataError(f"{src.name} is empty; upload a file with training text")
    if size > max_bytes:
        raise DataError(f"{src.name} is larger than the {max_bytes // 2**20} MiB upload limit")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", src.stem)[:80].strip(".") or "data"
    name = f"{digest}-{stem}{suffix}"
    dest = uploads_dir(data_root, owner) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copyfile(src, dest)
    return UPLOAD_PREFIX + name


def dataset_paths(
    dataset: str, *, owner: str, data_root: Path, hub_ids_only: bool = False
) -> tuple[list[str], list[str]]:
    """(data.train, data.heldout) for a dataset name; only the three kinds are accepted
    (``hub_ids_only``, with login on: ``hub:<id>`` must be a valid Hub id, never a path)."""
    dataset = dataset.strip()
    if dataset == DEMO_DATA:
        return [DEMO_DATA], [DEMO_HELDOUT]
    if dataset.startswith("hub:") and len(dataset) > 4:
        if hub_ids_only and not model_policy.is_hub_id(dataset[4:]):
            raise DataError(f"{dataset[:70]!r}: write hub:<dataset id> with a valid Hub id")
        return [dataset], []
    if dataset.startswith(UPLOAD_PREFIX):
        name = dataset[len(UPLOAD_PREFIX) :]
        path = uploads_dir(data_root, owner) / name
        if _UPLOAD_NAME.match(name) and path.is_file():
            return [str(path)], []
        raise DataError(f"uploaded dataset {name!r} not found; upload the file again")
    raise DataError(
        f"dataset {dataset!r}: choose {DEMO_DATA}, upload a .txt/.jsonl/.parquet file, "
        "or write hub:<dataset id>"
    )


def form_to_config(
    values: FormValues, *, owner: str, data_root: Path, models_dir: Path | None = None
) -> dict[str, Any]:
    """The validated config dict for these widget values (raises ``ConfigError`` & co.).

    ``models_dir`` (login on): the model fields take hub ids and folders inside it only
    (:mod:`app.model_policy`), and ``hub:`` datasets valid Hub ids; None: anything, as before.
    """
    problems: list[str] = []
    if values.preset not in preset_names():
        problems.append(f"preset {values.preset!r} is unknown")
    base = preset_dict(values.preset) if not problems else {}
    try:
        train, heldout = dataset_paths(
            values.dataset, owner=owner, data_root=data_root, hub_ids_only=models_dir is not None
        )
    except DataError as err:
        problems.append(f"data.train: {err}")
        train, heldout = [], []
    model = _checked_source(values.model, models_dir, "model.source", problems)
    tokens = _number(values.total_tokens, "train.total_tokens", problems, integer=True)
    fraction = _number(values.prune_fraction, "schedule.prune_fraction", problems)
    advanced = _advanced_overrides(values, problems)
    teacher = advanced.get("distill", {}).get("teacher")
    if teacher:
        advanced["distill"]["teacher"] = _checked_source(
            teacher, models_dir, "distill.teacher", problems
        )
    if problems:
        raise ConfigError(problems)
    overrides = {
        "model": {"source": model},
        "budget": {"target": values.budget.strip(), "granularity": values.granularity},
        "data": {"train": train, "heldout": heldout},
        "train": {"total_tokens": tokens},
        "schedule": {"prune_fraction": fraction},
        "saliency": {"scorer": values.scorer},
    }
    return RunConfig.from_dict(merge(base, merge(overrides, advanced))).to_dict()


def _advanced_overrides(values: FormValues, problems: list[str]) -> dict[str, dict[str, Any]]:
    """The config sections the :data:`ADVANCED` widgets set (numbers parsed, text stripped)."""
    out: dict[str, dict[str, Any]] = {}
    for widget, (section, key) in ADVANCED.items():
        value, hint = getattr(values, widget), get_type_hints(_section_class(section))[key]
        if hint in (int, float):
            value = _number(value, f"{section}.{key}", problems, integer=hint is int)
        elif isinstance(value, str):
            value = value.strip()
        out.setdefault(section, {})[key] = value
    return out


def _checked_source(value: Any, models_dir: Path | None, where: str, problems: list[str]) -> Any:
    """A model field's value after :func:`app.model_policy.check_source` (stripped text)."""
    text = value.strip() if isinstance(value, str) else value
    if models_dir is None or not isinstance(text, str) or not text:
        return text  # RunConfig's own validation reports an empty or non-text source
    try:
        return model_policy.check_source(text, models_dir=models_dir, where=where)
    except ConfigError as err:
        problems.extend(err.problems)
        return text


def _number(value: Any, where: str, problems: list[str], *, integer: bool = False) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        problems.append(f"{where}: {value!r} is not a number")
        return None
    if integer and number.is_integer():
        return int(number)
    return number


def config_to_form(
    config: dict[str, Any], *, preset: str, owner: str, data_root: Path
) -> FormValues:
    """Widget values that show ``config`` (the inverse of :func:`form_to_config`)."""
    cfg = RunConfig.from_dict(merge(_defaults(), config)) if config else RunConfig()
    train = cfg.data.train[0] if cfg.data.train else DEMO_DATA
    uploads = uploads_dir(data_root, owner)
    if Path(train).parent == uploads:
        train = UPLOAD_PREFIX + Path(train).name
    return FormValues(
        preset=preset,
        model=cfg.model.source or DEMO_MODEL,
        budget=cfg.budget.target,
        dataset=train,
        total_tokens=cfg.train.total_tokens,
        prune_fraction=cfg.schedule.prune_fraction,
        granularity=cfg.budget.granularity,
        scorer=cfg.saliency.scorer,
        **{w: getattr(getattr(cfg, sec), key) for w, (sec, key) in ADVANCED.items()},
    )


def preset_form(preset: str, current: FormValues) -> FormValues:
    """The widgets after choosing ``preset``: its values, keeping model/data it leaves open."""
    if preset not in preset_names():
        raise ConfigError(
            f"preset {preset!r} is unknown; choose one of {', '.join(preset_names())}"
        )
    d = preset_dict(preset)
    model = d.get("model", {}).get("source") or current.model
    train = d.get("data", {}).get("train") or [DEMO_DATA]
    budget = d.get("budget", {})
    return FormValues(
        preset=preset,
        model=model,
        budget=budget.get("target", RunConfig().budget.target),
        dataset=train[0] if train[0] == DEMO_DATA or train[0].startswith("hub:") else DEMO_DATA,
        total_tokens=d.get("train", {}).get("total_tokens", RunConfig().train.total_tokens),
        prune_fraction=d.get("schedule", {}).get("prune_fraction", 0.5),
        granularity=budget.get("granularity", RunConfig().budget.granularity),
        scorer=d.get("saliency", {}).get("scorer", "taylor1"),
        **{
            w: d.get(sec, {}).get(key, config_default(sec, key))
            for w, (sec, key) in ADVANCED.items()
        },
    )


def _defaults() -> dict[str, Any]:
    return {"model": {"source": DEMO_MODEL}, "data": {"train": [DEMO_DATA]}}


def model_folder(source: str) -> str:
    """The folder or hub id whose config.json describes ``source`` ("demo" -> its cache)."""
    source = source.strip()
    if source != DEMO_MODEL:
        return source
    from efficientllm.assets import cache_root, demo_model_dir_name

    folder = cache_root() / demo_model_dir_name()
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            "the demo model is not prepared on this server yet; run `efficientllm demo-model` "
            "once (or choose another model)"
        )
    return str(folder)


def predict(config: dict[str, Any]) -> Plan:
    """The predicted final shape and exact count for a validated config (config.json only)."""
    from efficientllm.model_io import source_shape

    cfg = RunConfig.from_dict(config)
    shape = source_shape(model_folder(cfg.model.source))
    b = cfg.budget
    target = parse_budget(b.target, shape.num_params())
    return plan(
        shape,
        target,
        granularity=b.granularity,
        hidden_multiple=b.hidden_multiple,
        ffn_multiple=b.ffn_multiple,
        tolerance=b.tolerance,
    )
