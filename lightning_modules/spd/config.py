"""SPDLightningModule's settings in small groups, each a dataclass that checks itself in `__post_init__`
(choices are typed `str` and checked there, so a bad value's error names it and the valid ones).

LightningCLI reads every group from YAML as a nested mapping (`model.init_args.objective.loss_coeffs`);
the module stores them as plain dicts (`dataclasses.asdict`) so checkpoints load with
`torch.load(weights_only=True)`, and a dict, as a checkpoint holds it, rebuilds the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .ci_functions import CI_FN_KINDS
from .routing import SUBSET_ROUTINGS
from .sigmoids import SIGMOIDS

LOSS_NAMES = (
    "faithfulness",
    "stochastic_recon",
    "stochastic_recon_layerwise",
    "stochastic_recon_subset",
    "importance_minimality",
    "ci_masked_recon",
    "ci_masked_recon_subset",
    "ci_masked_recon_layerwise",
    "unmasked_recon",
    "pgd_recon",
    "pgd_recon_subset",
    "pgd_recon_layerwise",
    "stochastic_hidden_acts_recon",
)
MULTIBATCH_ROUTINGS = ("all", "subset")
SAMPLINGS = ("continuous", "binomial")
OUTPUT_LOSS_TYPES = ("mse", "kl")
FIGURE_SCHEDULES = ("all", "end", "off")  # when SPD draws its figures (hundreds of modules: "end")
PGD_INITS = ("random", "ones", "zeros")
PGD_MASK_SCOPES = ("unique_per_datapoint", "shared_across_batch")


def check_loss_coeffs(loss_coeffs: dict[str, float]) -> dict[str, float]:
    """Validated {name: coeff}: known names, finite coefficients >= 0, at least one > 0."""
    unknown = sorted(set(loss_coeffs) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"unknown loss name(s) {unknown} in loss_coeffs; valid names: {list(LOSS_NAMES)}")
    out = {}
    for name, coeff in loss_coeffs.items():
        coeff = float(coeff)
        if not math.isfinite(coeff) or coeff < 0:
            raise ValueError(f"loss_coeffs[{name!r}]={coeff!r} must be a finite number >= 0")
        out[name] = coeff
    if not any(out.values()):
        raise ValueError(f"loss_coeffs={loss_coeffs!r} has no positive coefficient")
    return out


@dataclass
class ComponentConfig:
    """What decomposes each module: the causal-importance functions and their sigmoid, and tied components."""

    ci_fn_type: str = "mlp"  # one of ci_functions.CI_FN_KINDS
    ci_fn_hidden_dims: list[int] = field(default_factory=lambda: [16])
    sigmoid_type: str = "leaky_hard"  # a sigmoids.SIGMOIDS name; leaky_hard: lower / upper leaky
    tied_components: dict[str, str] | None = None  # {dst: src}: dst's V, U share src's U^T, V^T

    def __post_init__(self) -> None:
        if self.ci_fn_type not in CI_FN_KINDS:
            raise ValueError(f"ci_fn_type={self.ci_fn_type!r}; valid: {list(CI_FN_KINDS)}")
        dims = list(self.ci_fn_hidden_dims)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(
                f"ci_fn_hidden_dims={self.ci_fn_hidden_dims!r} must be a non-empty list of ints >= 1"
            )
        self.ci_fn_hidden_dims = dims
        if self.sigmoid_type not in SIGMOIDS:
            raise ValueError(f"sigmoid_type={self.sigmoid_type!r}; valid: {sorted(SIGMOIDS)}")
        for dst, src in (self.tied_components or {}).items():
            if dst == src:
                raise ValueError(f"tied_components ties {dst!r} to itself; give {{dst: src}} of two modules")


@dataclass
class PGDSettings:
    """Adversarial-mask settings: sign-gradient ascent on mask sources in [0, 1].

    n_steps / step_size / init / mask_scope: the training terms pgd_recon, pgd_recon_subset and
    pgd_recon_layerwise (one batch each). multibatch_*: the evaluation-only multi-batch PGD (one source
    per module shared by every example, its gradient summed over multibatch_n_batches validation batches
    before each step), reported as `pgd_multibatch_recon[_subset]` in spd_results.json; 0 batches: off.
    """

    n_steps: int = 1
    step_size: float = 0.1
    init: str = "random"  # the sources' start: random | ones | zeros
    mask_scope: str = "unique_per_datapoint"  # or shared_across_batch (one source for all examples)
    multibatch_n_batches: int = 0  # validation batches per multi-batch PGD step (0: no evaluation)
    multibatch_n_steps: int = 20
    multibatch_step_size: float = 0.1
    multibatch_init: str = "random"
    multibatch_routings: list[str] = field(default_factory=lambda: ["all"])  # all | subset (subset_routing)

    def __post_init__(self) -> None:
        for prefix, n_steps, step_size, init in (
            ("", self.n_steps, self.step_size, self.init),
            ("multibatch_", self.multibatch_n_steps, self.multibatch_step_size, self.multibatch_init),
        ):
            if n_steps < 0 or not step_size >= 0:
                raise ValueError(
                    f"pgd needs {prefix}n_steps >= 0 and {prefix}step_size >= 0, got {n_steps}, {step_size}"
                )
            if init not in PGD_INITS:
                raise ValueError(f"pgd {prefix}init={init!r}; valid: {list(PGD_INITS)}")
        if self.mask_scope not in PGD_MASK_SCOPES:
            raise ValueError(f"pgd mask_scope={self.mask_scope!r}; valid: {list(PGD_MASK_SCOPES)}")
        if self.multibatch_n_batches < 0:
            raise ValueError(
                f"pgd multibatch_n_batches must be >= 0 (0: off), got {self.multibatch_n_batches}"
            )
        self.multibatch_routings = list(self.multibatch_routings)
        bad = [r for r in self.multibatch_routings if r not in MULTIBATCH_ROUTINGS]
        if bad or not self.multibatch_routings:
            raise ValueError(
                f"pgd multibatch_routings={self.multibatch_routings!r}: a non-empty list of "
                f"{list(MULTIBATCH_ROUTINGS)}"
            )


@dataclass
class ObjectiveConfig:
    """The training objective: loss terms and coefficients, how masks are drawn, the importance-minimality
    exponent's schedule (importance_p, annealed linearly to importance_p_end between the two fractions of
    training; constant if importance_p_end is None), the subset terms' router (routing.py) and the PGD
    settings."""

    loss_coeffs: dict[str, float] = field(
        default_factory=lambda: {"stochastic_recon": 1.0, "importance_minimality": 1e-3}
    )  # {name: coeff}, names in LOSS_NAMES
    sampling: str = "continuous"  # masks m = ci + (1 - ci) r with r ~ U(0, 1) (or r in {0, 1}: binomial)
    n_mask_samples: int = 1  # masks drawn per stochastic term
    output_loss_type: str = "mse"  # mse (toys) or kl (LMs)
    use_delta_component: bool = True  # add r (W_target - V U) in stochastic forwards
    importance_p: float = 1.0
    importance_p_end: float | None = None
    p_anneal_start_frac: float = 1.0
    p_anneal_end_frac: float = 1.0
    subset_routing: str = "uniform_k_subset"  # or static_probability: each module routed with p
    subset_routing_p: float | None = None  # static_probability's p
    pgd: PGDSettings = field(default_factory=PGDSettings)
    # stochastic_recon_layerwise: modules per forward (1: one forward per module, from the clean prefix;
    # k > 1: k modules' forwards batched into one, k times fewer kernel launches, k times the activations;
    # k >= the modules, with stochastic_recon next to it in loss_coeffs: that term joins the same forward)
    layerwise_batch: int = 1
    # the stochastic terms' delta term r (W - V U) x from the target module's own output on x, as
    # r (y - b - x V U), instead of forming Delta = W - (V U)^T each step (the reference's way): the same
    # function, without Delta's matmuls and ~5 operator calls per module; rounding differs
    delta_from_target_output: bool = False

    def __post_init__(self) -> None:
        self.loss_coeffs = check_loss_coeffs(self.loss_coeffs)
        if self.layerwise_batch < 1:
            raise ValueError(
                f"layerwise_batch must be >= 1 (1: one forward per module), got {self.layerwise_batch}"
            )
        if isinstance(self.pgd, dict):
            self.pgd = PGDSettings(**self.pgd)
        if self.subset_routing not in SUBSET_ROUTINGS:
            raise ValueError(
                f"unknown subset_routing {self.subset_routing!r}; valid: {list(SUBSET_ROUTINGS)}"
            )
        if self.subset_routing == "static_probability" and not (
            self.subset_routing_p is not None and 0.0 <= self.subset_routing_p <= 1.0
        ):
            raise ValueError(
                "subset_routing='static_probability' needs subset_routing_p in [0, 1], "
                f"got {self.subset_routing_p}"
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {self.sampling!r}; valid: {list(SAMPLINGS)}")
        if self.output_loss_type not in OUTPUT_LOSS_TYPES:
            raise ValueError(
                f"unknown output_loss_type {self.output_loss_type!r}; valid: {list(OUTPUT_LOSS_TYPES)}"
            )
        if self.n_mask_samples < 1:
            raise ValueError(f"n_mask_samples must be >= 1, got {self.n_mask_samples}")
        if self.importance_p <= 0 or (self.importance_p_end is not None and self.importance_p_end <= 0):
            raise ValueError(
                f"importance p must be > 0, got importance_p={self.importance_p}, "
                f"importance_p_end={self.importance_p_end}"
            )
        if not 0.0 <= self.p_anneal_start_frac <= self.p_anneal_end_frac <= 1.0:
            raise ValueError(
                f"need 0 <= p_anneal_start_frac <= p_anneal_end_frac <= 1, got "
                f"{self.p_anneal_start_frac}, {self.p_anneal_end_frac}"
            )


@dataclass
class FaithfulnessWarmupConfig:
    """V, U fitted to the target weights (faithfulness loss, own AdamW) before the first training step."""

    steps: int = 0
    lr: float = 1e-2
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"faithfulness_warmup.steps must be >= 0 (0 = no warm-up), got {self.steps}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(
                f"faithfulness_warmup needs lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )


@dataclass
class EvalConfig:
    """Validation and the end-of-fit evaluation (spd_results.json)."""

    ci_alive_threshold: float = 0.1  # a component is alive if its CI exceeds this on some input
    identity_ci_patterns: list[str] | None = None  # toy modules whose CIs should be the identity (None: all)
    final_eval_batches: int = 8  # validation batches of the end-of-fit evaluation
    figures: str = "all"  # all: every validation and the end; end: only the end of fit; off: none

    def __post_init__(self) -> None:
        if self.figures not in FIGURE_SCHEDULES:
            raise ValueError(f"evaluation.figures={self.figures!r}; valid: {list(FIGURE_SCHEDULES)}")
        if not 0.0 <= self.ci_alive_threshold < 1.0:
            raise ValueError(f"ci_alive_threshold must be in [0, 1), got {self.ci_alive_threshold}")
        if self.final_eval_batches < 0:
            raise ValueError(f"final_eval_batches must be >= 0, got {self.final_eval_batches}")


GROUPS = {
    "components": ComponentConfig,
    "objective": ObjectiveConfig,
    "faithfulness_warmup": FaithfulnessWarmupConfig,
    "evaluation": EvalConfig,
}


def regroup_flat_hparams(flat: dict[str, Any]) -> dict[str, Any]:
    """{group: {field: value}, ...} from the groups' fields given flat (`ci_fn_type`,
    `faithfulness_warmup_steps`, ...; `lr_final_frac` is `min_lr_ratio`); None values keep the default."""
    owner = {
        f.name: group for group in ("components", "objective", "evaluation") for f in fields(GROUPS[group])
    }
    grouped: dict[str, Any] = {}
    for key, value in flat.items():
        name = key.removeprefix("faithfulness_warmup_")
        group = "faithfulness_warmup" if name != key else owner.get(key)
        if key == "lr_final_frac":
            grouped["min_lr_ratio"] = value
        elif group is None:
            raise TypeError(f"SPDLightningModule got an unexpected argument {key!r}")
        elif value is not None:
            grouped.setdefault(group, {})[name] = value
    return grouped
