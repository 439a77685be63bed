"""The feature recipe and the compute setting: built once from user input, passed to every flow.

A `FeatureRecipe` says how an image's input vector is made: which backbones in which order, from
which weights, at which image size and numeric precision. It is validated when it is built, is
immutable, is recorded in every model, and is the one place that turns itself into the keys that
stored vectors carry (`weights_id`, `size_key`): every stage asks the recipe, so no two stages can
key vectors differently. A `Compute` says where and how wide the backbone actors run.

Both are plain frozen dataclasses of JSON values, so Prefect validates them as flow parameters and
a deployment can pass them as dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.features import backbones as bb

if TYPE_CHECKING:  # the record module imports this one
    from leukoflow.store.records import ModelRecord

WEIGHTS_KINDS = ("imagenet", "none")
PRECISIONS = ("fp32", "bf16")
PRECISION_CHOICES = (*PRECISIONS, "auto")
# The recipe's and the compute's defaults, which the command line shows and uses.
DEFAULT_WEIGHTS = "imagenet"
DEFAULT_IMAGE_SIZE = 224  # the backbones' native input
DEFAULT_PRECISION = "fp32"
DEFAULT_BATCH_SIZE = 32  # images per extraction batch


@dataclass(frozen=True)
class FeatureRecipe:
    """Backbones in concatenation order, their weights, the image size and the precision.

    `weights` is `imagenet`, `none` (random initialisation from `seed`: non-clinical) or a folder
    of Keras notop files (then it means imagenet from that folder). `precision` `auto` resolves to
    what this machine runs natively (see backbones.native_precision) when the recipe is built.
    """

    backbones: tuple[str, ...] = bb.DEFAULT_BACKBONES
    weights: str = DEFAULT_WEIGHTS
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = choices.DEFAULT_SEED
    precision: str = DEFAULT_PRECISION
    weights_dir: str | None = field(default=None, compare=False)  # where, not what

    def __post_init__(self) -> None:
        names = tuple(bb.parse_backbones(self.backbones))
        bb.check_image_size(list(names), self.image_size)
        choice = bb.parse_weights(self.weights, self.weights_dir, self.seed)
        precision = self.precision
        if precision not in PRECISION_CHOICES:
            raise LeukoflowError(
                f"--precision wants one of {', '.join(PRECISION_CHOICES)}, got {precision!r}"
            )
        if precision == "auto":
            precision = bb.native_precision()
        # Normalised in place: a folder given as --weights means imagenet from that folder.
        object.__setattr__(self, "backbones", names)
        object.__setattr__(self, "weights", choice.kind)
        object.__setattr__(self, "weights_dir", choice.folder)
        object.__setattr__(self, "precision", precision)

    @property
    def choice(self) -> bb.WeightsChoice:
        return bb.WeightsChoice(self.weights, folder=self.weights_dir, seed=self.seed)

    @cached_property
    def weights_ids(self) -> dict[str, str]:
        """Per backbone, the id of the exact weights and precision its vectors come from.

        ImageNet files are MD5-checked here (once per recipe): a missing or damaged file stops
        the command before any work starts.
        """
        return {
            name: bb.weights_id(bb.BACKBONES[name], self.choice, self.precision)
            for name in self.backbones
        }

    def size_key(self, name: str) -> int:
        """The image size that `name`'s vectors are keyed by (0 for full-resolution extractors)."""
        return bb.size_key(bb.BACKBONES[name], self.image_size)

    def vector_key(self, name: str) -> tuple[str, int]:
        """(weights id, image size key): what identifies `name`'s vectors of this recipe."""
        return self.weights_ids[name], self.size_key(name)

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(bb.BACKBONES[name].feature_dim for name in self.backbones)

    @property
    def feature_dim(self) -> int:
        return sum(self.dims)

    @property
    def weights_id(self) -> str:
        """All backbones' weights ids in order: one string for run rows and summaries."""
        return ",".join(self.weights_ids[name] for name in self.backbones)

    @property
    def non_clinical(self) -> bool:
        """True when some CNN runs random-initialised: outputs are not clinically meaningful."""
        return bb.uses_random_weights(list(self.backbones), self.choice)

    def subset(self, names: list[str] | tuple[str, ...]) -> FeatureRecipe:
        """The same recipe over some of its backbones (experiments compare singles and pairs)."""
        return FeatureRecipe(
            tuple(names), self.weights, self.image_size, self.seed, self.precision,
            self.weights_dir,
        )  # fmt: skip

    def to_record(self) -> dict:
        """What a model stores of its recipe (model.json `feature_recipe`)."""
        return {
            "backbones": list(self.backbones),
            "dims": list(self.dims),
            "feature_dim": self.feature_dim,
            "weights": self.weights,
            "weights_ids": dict(self.weights_ids),
            "image_size": self.image_size,
            "seed": self.seed,
            "precision": self.precision,
        }


def recipe_from_record(record: ModelRecord, weights_dir: str | None = None) -> FeatureRecipe:
    """The recipe a model was trained on (store/records.ModelRecord), rebuilt here; refused when
    this code or these weights cannot reproduce its vectors."""
    model_id = record.model_id
    raw = record.feature_recipe or {}
    try:
        backbones = tuple(str(n) for n in raw["backbones"])
        dims = tuple(int(d) for d in raw["dims"])
        weights = str(raw["weights"])
        stored_ids = {str(k): str(v) for k, v in raw["weights_ids"].items()}
        image_size = int(raw["image_size"])
        # Models saved before the recipe carried them: the seed sat in the record, fp32 only.
        seed = int(raw.get("seed", record.seed or 0))
        precision = str(raw.get("precision", "fp32"))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise LeukoflowError(f"model {model_id} has no usable feature recipe ({error})") from error
    if weights not in WEIGHTS_KINDS:
        raise LeukoflowError(f"model {model_id} has unknown weights kind {weights!r}")
    if precision not in PRECISIONS:
        raise LeukoflowError(f"model {model_id} has unknown precision {precision!r}")
    try:
        names = bb.parse_backbones(list(backbones))
    except LeukoflowError as error:
        raise LeukoflowError(f"model {model_id}: {error}") from error
    expected_dims = tuple(bb.BACKBONES[name].feature_dim for name in names)
    if dims != expected_dims:
        raise LeukoflowError(
            f"model {model_id} expects {'+'.join(names)} vectors of sizes {list(dims)}, "
            f"but these backbones give {list(expected_dims)}: refusing to mis-score"
        )
    if set(stored_ids) != set(names):
        raise LeukoflowError(f"model {model_id}'s recipe lacks weights ids for some backbones")
    recipe = FeatureRecipe(backbones, weights, image_size, seed, precision, weights_dir)
    for name, stored in stored_ids.items():
        local = recipe.weights_ids[name]
        if local != stored:
            raise LeukoflowError(
                f"model {model_id} was trained on {name} features from weights {stored}, but "
                f"the weights here are {local}: refusing to mis-score (copy the model's weights "
                "files or retrain)"
            )
    return recipe


@dataclass(frozen=True)
class Compute:
    """Where the backbone actors run and how large a share each takes (docs/scaling.md).

    `ray_address` None: RAY_ADDRESS, else a private local Ray. `gpu_share` / `actor_cpus` None:
    sized from the cluster. `batch_timeout_s`: the longest wait for one batch's vectors before
    the run fails (None: no limit).
    """

    ray_address: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    gpu_share: float | None = None
    actor_cpus: float | None = None
    batch_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LeukoflowError(f"--batch-size wants a positive number, got {self.batch_size}")
        share = self.gpu_share
        if share is not None and (share <= 0 or (share > 1 and not float(share).is_integer())):
            raise LeukoflowError(
                f"--gpu-share wants a fraction of one GPU (e.g. 0.33) or whole GPUs, got {share}"
            )
        if self.actor_cpus is not None and self.actor_cpus <= 0:
            raise LeukoflowError(f"--actor-cpus wants a positive number, got {self.actor_cpus}")
        if self.batch_timeout_s is not None and self.batch_timeout_s <= 0:
            raise LeukoflowError(
                f"--batch-timeout wants a positive number of seconds, got {self.batch_timeout_s}"
            )

    def as_dict(self) -> dict:
        return asdict(self)
