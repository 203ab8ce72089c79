"""What an evaluation scores and how: `evaluate.*` of the config (configs/default.yaml), validated before anything
is read, and the digest of every setting that changes a number (the results store's key).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rafmedia.core.errors import UserError
from rafmedia.core.registry import unknown_name_error
from rafmedia.evaluate import raf
from rafmedia.evaluate.finetune import AUGMENTATIONS
from rafmedia.evaluate.group_metrics import classification_metrics
from rafmedia.evaluate.latent import list_latent_tests
from rafmedia.evaluate.mil import MIL_FUSIONS
from rafmedia.evaluate.ordinal_heads import list_ordinal_heads
from rafmedia.evaluate.probes import PROBES, categorical_probes, list_probes, volume_adaptors
from rafmedia.evaluate.registration import RegistrationConfig
from rafmedia.evaluate.results import digest
from rafmedia.shards.alterations import alteration_seed, create_alteration

RESULTS_VERSION = 4  # raise when a computation changes, so that results stores never serve cells computed the old way


@dataclass
class SegmentationConfig:
    """`evaluate.segmentation`: off unless `enabled`; needs a label channel in the cohort."""

    enabled: bool = False
    channel: str = "label"
    structures: dict[str, int] = field(default_factory=lambda: {"body": 1, "heart": 2, "liver": 3, "kidney": 4})
    head_steps: int = 150
    head_lr: float = 1e-2
    nsd_tolerance_mm: float = 2.0
    shape_prior: str = ""  # shape_prior.safetensors of a shape_prior_dae run: adds the reconstruction-error score
    reference_cohort: str = ""  # a labelled store to train the head and draw RCA references from (see above)
    rca_references: int = 8  # training subjects used as RCA's reference set (0: no RCA)
    rca_method: str = "voxel_classifier"

    def validate(self) -> None:
        if self.enabled and not self.structures:
            raise UserError("evaluate.segmentation.structures is empty: name the label values to score, "
                            "e.g. {heart: 2, liver: 3}")


@dataclass
class WeakLabelsConfig:
    """`evaluate.weak_labels`: the weak-label study of small multimodal cohorts with one ordinal grade per patient
    (docs/weak-labels.md). When `enabled`, each encoder's cell is this study instead of the scan-level RAF analyses."""

    enabled: bool = False
    target: str = "grade"  # the (rated) ordinal grade per patient, 0..K-1
    truth_target: str = "grade_true"  # the planted grade of a synthetic cohort ("" or absent column: none)
    channels: list[str] = field(default_factory=list)  # empty: every channel the store holds
    patch_size: int = 16  # MIL instances: a grid of patches of this side
    overlap: float = 0.5  # fraction shared by neighbouring patches (0.5: a stride of half a patch)
    fusion: str = "late"  # the main comparison's fusion: late, early or per_channel
    fusions: list[str] = field(default_factory=lambda: ["late", "early", "per_channel"])  # the fusion comparison
    head: str = "corn"  # the main comparison's ordinal head
    heads: list[str] = field(default_factory=lambda: ["cross_entropy", "corn", "cumulative_link", "qwk"])
    label_smoothing: float = 0.2  # the smoothed variant of the head comparison (share moved to neighbouring grades)
    folds: int = 5  # outer stratified folds at patient level
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # one repetition of the outer CV per seed
    inner_folds: int = 3  # nested CV choosing weight_decay on each outer training set
    weight_decay_grid: list[float] = field(default_factory=lambda: [1e-3, 1e-1])
    epochs: int = 100  # full-batch Adam epochs per fit: the fixed compute budget of every MIL fit
    noise_levels: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3])  # rater noise of the curve
    curriculum: bool = True  # also train easy-to-hard and report the difference
    knn_k: int = 3  # neighbours of the patch anomaly score
    pointing_tolerance: float = -1.0  # voxels around the lesion that count as a hit; < 0: half the patch stride
    overlays_per_grade: int = 2
    bootstrap_resamples: int = 1000  # patient bootstrap of every interval

    def validate(self) -> None:
        if not self.enabled:
            return
        for key, values, allowed in (("fusions", [self.fusion, *self.fusions], MIL_FUSIONS),
                                     ("heads", [self.head, *self.heads], list_ordinal_heads())):
            for value in values:
                if value not in allowed:
                    raise unknown_name_error(f"evaluate.weak_labels.{key[:-1]}", value, allowed)
        if self.patch_size < 4 or not 0 <= self.overlap < 1:
            raise UserError(f"evaluate.weak_labels.patch_size must be >= 4 and overlap in [0, 1); got "
                            f"{self.patch_size} and {self.overlap}")
        if self.folds < 2 or self.inner_folds < 2 or not self.seeds or self.epochs < 1:
            raise UserError("evaluate.weak_labels needs folds >= 2, inner_folds >= 2, at least one seed and epochs "
                            f">= 1; got folds={self.folds}, inner_folds={self.inner_folds}, seeds={self.seeds}, "
                            f"epochs={self.epochs}")
        if any(not 0 <= level <= 1 for level in self.noise_levels) or not 0 <= self.label_smoothing < 1:
            raise UserError(f"evaluate.weak_labels.noise_levels must be in [0, 1] and label_smoothing in [0, 1); got "
                            f"{self.noise_levels} and {self.label_smoothing}")
        if not self.weight_decay_grid or any(value < 0 for value in self.weight_decay_grid):
            raise UserError(f"evaluate.weak_labels.weight_decay_grid must list values >= 0, got {self.weight_decay_grid}")


SHARED_BUDGET = ("steps", "batch_size", "augmentation", "threads", "seed")  # per protocol, never per adaptor
DEFAULT_ADAPTORS = ["logistic", "knn", "mlp", "finetune_partial", "finetune_full", "lora"]


@dataclass
class AdaptorsConfig:
    """`evaluate.adaptors`: the adaptor protocol (`rafmedia.evaluate.adaptors`, docs/evaluation.md); off unless
    `enabled`. Every adaptor x label budget x seed on the primary target, with 95% intervals over seeds."""

    enabled: bool = False
    adaptors: list[str] = field(default_factory=lambda: list(DEFAULT_ADAPTORS))  # registered probes (raf list probes)
    budgets: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # label fractions of the training split
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # each: its own label subset and initialisation
    steps: int = 50  # the compute budget of every volume adaptor: AdamW steps x batch_size volumes
    batch_size: int = 8
    augmentation: str = "flips"  # none or flips, the same for every volume adaptor
    threads: int = 1  # torch threads per fit on the CPU (0: torch's default)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # by adaptor: its factory options (lr, rank, ...)

    def validate(self) -> None:
        if not self.enabled:
            return
        allowed = [*categorical_probes(), *volume_adaptors()]
        if not self.adaptors:
            raise UserError(f"evaluate.adaptors.adaptors is empty: name at least one of {', '.join(allowed)}")
        for name in [*self.adaptors, *self.options]:
            if name not in allowed:
                raise unknown_name_error("evaluate.adaptors adaptor (a probe for binary targets)", name, allowed)
        for name, options in self.options.items():
            shared = sorted(set(options) & set(SHARED_BUDGET))
            if shared:
                raise UserError(f"evaluate.adaptors.options.{name} sets {shared}: the compute budget and the seeds are "
                                f"the same for every adaptor; set evaluate.adaptors.<key> instead")
            accepted = PROBES.options(name)
            unknown = sorted(set(options) - accepted) if accepted is not None else []
            if unknown:
                raise UserError(f"evaluate.adaptors.options.{name} has unknown option(s) {unknown}; {name} takes "
                                f"{', '.join(sorted(accepted))}")
        if not self.budgets or any(not 0 < budget <= 1 for budget in self.budgets):
            raise UserError(f"evaluate.adaptors.budgets must list label fractions in (0, 1] (e.g. [0.01, 0.1, 1.0]); "
                            f"got {self.budgets}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"evaluate.adaptors.seeds must list distinct seeds (e.g. [0, 1, 2, 3, 4]); got {self.seeds}")
        if self.steps < 1 or self.batch_size < 1 or self.threads < 0:
            raise UserError(f"evaluate.adaptors needs steps >= 1, batch_size >= 1 and threads >= 0; got "
                            f"steps={self.steps}, batch_size={self.batch_size}, threads={self.threads}")
        if self.augmentation not in AUGMENTATIONS:
            raise unknown_name_error("evaluate.adaptors.augmentation", self.augmentation, AUGMENTATIONS)


@dataclass
class EvaluateConfig:
    """What to score and how."""

    cohort: str = ""  # path of a cohort store
    encoders: list[str] = field(default_factory=list)  # exports (.safetensors + .card.json) or SPEC=WEIGHTS
    encoder_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # by spec: factory options
    random_baseline: bool = True  # also score a randomly initialised encoder of the same architecture
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one replicate (split, random init) per seed
    test_fraction: float = 0.5
    primary_target: str = "disease"  # the scan-level label of the fairness, robustness and RAF analyses
    targets: list[str] = field(default_factory=lambda: ["disease", "sex"])  # binary probe targets
    group_by: list[str] = field(default_factory=lambda: ["sex", "site"])
    min_group_size: int = 10  # smaller groups are reported and flagged, not merged
    alterations: list[str] = field(default_factory=lambda: ["gaussian_noise", "bias_field"])
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    probe: str = "logistic"
    few_shot: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # label fractions of the primary target
    ordinal_targets: list[str] = field(default_factory=list)  # graded columns: ordinal probe, QWK and Spearman
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    weak_labels: WeakLabelsConfig = field(default_factory=WeakLabelsConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)  # breathing pairs (docs/paired.md)
    adaptors: AdaptorsConfig = field(default_factory=AdaptorsConfig)
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    bootstrap_resamples: int = 500
    permutations: int = 1000  # label shuffles of each fairness gap's permutation test
    intersections: bool = True  # also score every pair of group_by attributes ("sex x site")
    age_bins: list[float] = field(default_factory=lambda: [0, 40, 60, 200])  # bands of an "age" group_by column
    raf_weights: dict[str, float] = field(default_factory=lambda: {"performance": 1.0, "robustness": 1.0,
                                                                   "fairness": 1.0})
    batch_size: int = 16
    patch_size: int = 0  # > 0: embed each volume as the mean of a grid of patches of this size (large volumes)
    num_workers: int = 2  # DataLoader workers reading subjects while the encoder runs (0: read in the main process)

    def validate(self) -> None:
        if not self.cohort:
            raise UserError("evaluate.cohort is not set: pass --cohort PATH (a store made by `raf synth`)")
        if not self.encoders:
            raise UserError("no encoder to evaluate: pass --encoder PATH.safetensors (one or more)")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"evaluate.test_fraction must be in (0, 1), got {self.test_fraction}")
        for name in self.alterations:
            create_alteration(name)  # unknown names raise with "did you mean"
        if not self.seeds:
            raise UserError("evaluate.seeds is empty: give at least one seed")
        unknown = set(self.raf_weights) - set(raf.COMPONENTS)
        if unknown:
            raise UserError(f"evaluate.raf_weights has unknown component(s) {sorted(unknown)}; use "
                            f"{', '.join(raf.COMPONENTS)}")
        self.weights().normalised()
        self.segmentation.validate()
        self.weak_labels.validate()
        if self.registration.enabled:
            self.registration.validate()
            if self.weak_labels.enabled:
                raise UserError("evaluate.registration and evaluate.weak_labels are each a study of their own: "
                                "enable one of them per run")
        self.adaptors.validate()
        if any(not 0 < fraction <= 1 for fraction in self.few_shot):
            raise UserError(f"evaluate.few_shot fractions must be in (0, 1], got {self.few_shot}")
        if self.num_workers < 0:
            raise UserError(f"evaluate.num_workers must be >= 0 (0 reads the volumes in the main process), got "
                            f"{self.num_workers}")
        if self.probe not in categorical_probes():
            raise unknown_name_error("evaluate.probe (a probe for binary targets)", self.probe, categorical_probes())

    def weights(self) -> raf.RafWeights:
        return raf.RafWeights(**self.raf_weights)

    def alteration_seeds(self) -> dict[str, list[int]]:
        """The seed of every evaluated alteration at every severity (`alteration_seed`)."""
        return {name: [alteration_seed(name, severity) for severity in self.severities] for name in self.alterations}

    def settings_digest(self) -> str:
        """Every option that changes a cell's numbers (not which encoders or cohorts, batch size or readers), the alteration
        seeds, and the registered metrics, probes and latent tests a cell holds (a new one is computed, not missing)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("cohort", "encoders", "batch_size",
                                                                                 "num_workers")}
        registered = {"group_metrics": classification_metrics(), "probes": list_probes(),
                      "latent_tests": list_latent_tests()}
        return digest(settings, self.alteration_seeds(), registered, RESULTS_VERSION)
