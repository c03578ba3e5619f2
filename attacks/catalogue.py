"""The attack catalogue: names, descriptions and validated parameter models.

This module imports no torch. The HTTP API imports it to validate request
bodies and to publish JSON Schemas; the engine imports it to validate the same
parameters before any work starts. One source serves both sides.

Every attack has one frozen pydantic parameter model (``extra="forbid"``, so a
parameter an attack does not take is an error naming it) and one entry point,
``"module:function"``, resolved lazily by :func:`attacks.registry.resolve`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "AttackInfo",
    "CATALOGUE",
    "JobOptions",
    "HeadRecipe",
    "UnknownAttackError",
    "get_attack",
    "attack_names",
    "validate_job",
    "ValidationError",
]

# Names shared with attacks.data / attacks.encoders (checked equal by tests), kept
# here so that the API and the CLI can validate them without importing torch.
BUILTIN_DATASETS: tuple[str, ...] = ("digits", "mnist5k")
DATASET_KINDS: tuple[str, ...] = BUILTIN_DATASETS + ("cifar10", "cifar100", "npz", "imagefolder")
ARCHITECTURES: tuple[str, ...] = ("small_cnn", "resnet18", "resnet50", "vit_b_16", "clip_rn50", "clip_rn101",
                                  "clip_rn50x4")
# Backbones whose positional embeddings fix the input side (the spec must say it).
FIXED_INPUT_SIZE: dict[str, int] = {"vit_b_16": 224, "clip_rn50": 224, "clip_rn101": 224, "clip_rn50x4": 288}

PAPER = (
    "Lu, Yang, Kamath, Yu. Indiscriminate Data Poisoning Attacks on Pre-trained "
    "Feature Extractors. SaTML 2024."
)


class _Params(BaseModel):
    # inf/NaN are never a valid parameter (and inf would not survive a JSON column)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class HeadRecipe(_Params):
    """The one training recipe for the linear head: the clean head and every evaluation.

    The default is a well-posed victim: L2-regularised multinomial logistic regression,
    mean cross-entropy + (lambda / 2) ||W||^2 with lambda = l2 * s^2 (s^2 the mean squared
    clean feature norm, so the same l2 means the same thing at any feature scale), solved by
    full-batch L-BFGS until the gradient vanishes. Gradient Canceling cancels the gradient of
    this same objective. ``optimizer: "sgd"`` is the paper's recipe (plim: mini-batch SGD,
    lr 0.1, 100 epochs), kept for comparison."""

    optimizer: Literal["lbfgs", "sgd"] = Field(
        "lbfgs",
        description="lbfgs: full-batch L-BFGS (strong-Wolfe line search) on the regularised objective, to "
        "convergence (deterministic, scale-free). sgd: the paper's protocol, mini-batch SGD with a seeded "
        "shuffle for a fixed number of epochs.",
    )
    l2: float = Field(
        1e-5,
        ge=0,
        le=10,
        description="lbfgs: relative L2 strength; lambda = l2 * mean ||z||^2 over the clean training features.",
    )
    max_iter: int = Field(2000, ge=1, le=100_000, description="lbfgs: iteration budget (a cap, not a schedule).")
    tol: float = Field(
        1e-4, gt=0, le=1e-1,
        description="lbfgs: converged when the largest gradient entry of the objective, in units of the "
        "clean feature scale, is below this.",
    )
    epochs: int = Field(100, ge=1, le=10_000, description="sgd: epochs (paper: 100).")
    lr: float = Field(0.1, gt=0, le=100, description="sgd: learning rate (plim: 0.1).")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: momentum (plim uses none).")
    batch_size: int = Field(256, ge=1, le=65_536, description="sgd: mini-batch size.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="sgd: L2 penalty on W (plim: 0).")


# Stage 1's automatic target (GradPCParams.step "auto"): steps relative to the clean head's norm,
# each with the joint corruption of the paper and with the W-only step whose bias is re-fitted.
# Fixed once for every encoder and dataset, like AutoAttack's hyper-parameters.
AUTO_RELATIVE_STEPS = (0.25, 0.5, 1.0, 2.0, 4.0)
AUTO_CORRUPTIONS = (("joint", False), ("weights", True))


class GradPCParams(_Params):
    """Stage 1: target parameters by one normalised gradient-ascent step.

    By default (``step: "auto"``) the engine chooses the target itself: for each relative step in
    ``AUTO_RELATIVE_STEPS`` times ||omega|| and each corruption in ``AUTO_CORRUPTIONS`` it runs a
    short Gradient Canceling at the job's epsilon, retrains the victim on clean + those poisons and
    keeps the target whose retrained head has the lowest *training* accuracy (no test label is
    used). Setting ``eps_w`` (without ``step``) means the paper's absolute step; setting
    ``corrupt`` or ``refit_bias`` restricts the sweep to that corruption."""

    step: Literal["auto", "relative", "absolute"] = Field(
        "auto",
        description="auto: the target strength that maximises the retrained harm at the job's epsilon (a "
        "short sweep on cached features). relative: a step of eps_w_rel * ||omega||. absolute: the paper's "
        "step of L2 length eps_w, meaningful only for a head of bounded norm. Default auto; 'absolute' "
        "when eps_w is given and step is not.",
    )
    eps_w: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="step 'absolute': L2 length of the ascent step on (W, b) (the paper's eps_w = 1).",
    )
    eps_w_rel: float = Field(
        1.0, gt=0, le=1e3, description="step 'relative': the step's length as a multiple of ||omega||."
    )
    auto_gc_steps: int = Field(
        300, ge=1, le=100_000, description="step 'auto': Gradient Canceling steps per candidate target."
    )
    corrupt: Literal["joint", "weights"] = Field(
        "joint",
        description="Which parameters the ascent step moves: (W, b) jointly (the paper), or W only. "
        "Under step 'auto' both are tried unless this (or refit_bias) is set.",
    )
    refit_bias: bool = Field(
        False,
        description="After the step, re-fit b on the clean training set (W fixed), so the target's clean "
        "bias gradient is zero. A bias shift is a damage no bounded set of poisons can cancel (each "
        "poison adds at most sqrt(2) to the bias gradient); with this, Gradient Canceling can reach the "
        "target. Measured on a SimCLR mnist5k encoder: a joint eps_w 3 target at 68.8% was 94.6% after "
        "the refit, i.e. its damage was almost all in the bias.",
    )
    target_accuracy: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="If set, eps_w is found by bisection so that the target head's training accuracy "
        "is at most this value (eps_w is then the smallest such step, capped at 1e6); overrides step.",
    )

    @model_validator(mode="after")
    def _explicit_eps_w_is_absolute(self):
        if "eps_w" in self.model_fields_set and "step" not in self.model_fields_set:
            object.__setattr__(self, "step", "absolute")
        return self


class _GCParams(GradPCParams):
    """What Gradient Canceling takes in feature space and in input space alike."""

    gc_steps: int = Field(2000, ge=1, le=100_000, description="Gradient-descent steps on the poisons (paper: 2000).")
    cancel_bias: bool = Field(False, description="Also cancel the bias gradient (plim cancels only W).")
    stop_loss: float = Field(1.0, ge=0, description="Stop when 1/2||residual||^2 falls below this (paper: 1).")
    subset: Literal["random", "first"] = Field(
        "random", description="Which clean points initialise the poisons: a seeded random subset, or the first ones (plim)."
    )


class GCFeatureParams(_GCParams):
    """Stage 2: Gradient Canceling in feature space."""

    gc_lr: float = Field(
        0.1,
        gt=0,
        le=100,
        description="Relative step size for zeta: a first step moves a poison by about gc_lr times the "
        "mean clean feature norm (cosine-decayed), so it transfers across encoders and feature scales.",
    )
    feature_floor: Literal["none", "zero", "auto"] = Field(
        "none",
        description="Keep zeta where an image's features can be. 'zero': project every GC step onto "
        "zeta >= 0, the range of encoders whose features are ReLU outputs pooled (small_cnn, ResNets): "
        "a negative coordinate is reachable by no image, so a poison that needs one cannot be inverted. "
        "'auto': 'zero' when every cached clean feature is >= 0. 'none': GC unconstrained in feature "
        "space (the paper's stage 2; the default for gc_feature, whose poisons are features).",
    )
    feature_ceiling: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Keep zeta below this multiple of the largest value each feature coordinate takes over the "
        "clean training set (projected after every GC step, like the floor). GC left alone puts much of its "
        "harm into a few poisons with features several times larger than any image's, which feature matching "
        "cannot reach from nearby pixels; bounded, GC spreads the harm over features images have. "
        "None: no ceiling.",
    )
    solver: Literal["gc", "mta"] = Field(
        "gc",
        description="How stage 2 reaches the target head. 'gc' (default): Gradient Canceling (the paper). 'mta': the "
        "model-targeted attack of Suya et al. (ICML 2021): retrain the victim on clean + poisons so far, add the "
        "feasible (z, y) of largest loss gap between that head and the target, repeat until epsilon * N poisons. Its "
        "feasible set is the box of the clean features' per-coordinate range (times mta_box), within the floor and "
        "ceiling; labels may differ from their base points' (poisons are paired with the nearest clean point of "
        "their label).",
    )
    mta_rounds: int = Field(
        20, ge=1, le=10_000, description="mta: victim retrains; each adds about 1/mta_rounds of the poisons."
    )
    mta_steps: int = Field(
        50, ge=1, le=10_000, description="mta: projected sign-gradient ascent steps per round on the loss gap."
    )
    mta_starts: int = Field(
        16, ge=1, le=10_000, description="mta: clean features (per class) the ascent starts from in each round."
    )
    mta_box: float = Field(
        1.0, gt=0, le=1e6, description="mta: the feasible box is this multiple of the clean per-coordinate range "
        "(its upper end scaled, and its lower end when negative)."
    )


class FeatureMatchingParams(GCFeatureParams):
    """Stage 3: feature matching (Algorithm 1)."""

    feature_floor: Literal["none", "zero", "auto"] = Field(
        "auto", description=GCFeatureParams.model_fields["feature_floor"].description + " Default here: 'auto' "
        "(stage 3 inverts zeta into images, so zeta must be reachable).",
    )
    feature_ceiling: float | None = Field(
        1.0, gt=0, le=1e6, description=GCFeatureParams.model_fields["feature_ceiling"].description + " Default "
        "here: 1.0, the clean features' own range (measured on the SimCLR mnist5k encoder at epsilon 0.1, beta "
        "0.25: drop 2.4 points with it, 1.5 without; 2.0 at 0.8, 1.9 at 1.25, 1.1 at 2).",
    )

    rounds: int = Field(1, ge=1, le=1000, description="Outer rounds k of Algorithm 1 (paper: 1).")
    fm_steps: int = Field(2000, ge=1, le=100_000, description="Feature-matching steps t per round (paper: 2000).")
    round_gc_steps: int = Field(
        300, ge=0, le=100_000, description="GC steps on zeta in rounds after the first (Algorithm 1 line 6)."
    )
    pull: float = Field(
        1.0,
        ge=0,
        le=1e3,
        description="Strength of the pull of zeta toward f(nu) in rounds after the first (Algorithm 1 "
        "line 7, optional): each GC step then does zeta <- (zeta + rho f(nu)) / (1 + rho) with "
        "rho = pull * gamma * gc_lr * cosine(t). 0 turns it off.",
    )
    fm_lr: float = Field(0.1, gt=0, le=100, description="Step size eta (paper: 0.1, cosine schedule).")
    fm_optimizer: Literal["eq15", "gd", "adam"] = Field(
        "eq15",
        description="eq15 (default): Eq. 15 exactly, gamma/2 ||f(nu) - zeta||^2 + beta/2 ||nu - mu'||^2, minimised "
        "by Adam on its full gradient with per-poison best iterate and early stop (steps of about eq15_lr per "
        "pixel; beta is the paper's beta, normalize_features does not apply). gd: the paper's forward-backward "
        "splitting with a plain forward step (fm_lr). adam: the splitting with an Adam-preconditioned forward step.",
    )
    eq15_lr: float = Field(
        0.01, gt=0, le=10,
        description="fm_optimizer eq15: the step per pixel (cosine-decayed), in the data's units ([0, 1] images).",
    )
    gamma: float = Field(1.0, gt=0, le=1e6, description="Weight of the feature-matching term (paper: 1).")
    normalize_features: bool = Field(
        True,
        description="Measure the matching error in units of the mean clean feature norm, so that "
        "fm_lr transfers across encoders whose features differ in scale.",
    )
    pairing: Literal["nearest", "nearest_same_label", "nearest_unique", "gc_init"] = Field(
        "nearest_same_label",
        description="Base image for each zeta: the nearest among the clean images with zeta's GC label (default: "
        "the poison keeps the label GC computed zeta for), the clean image with the nearest feature (the "
        "paper; the poison takes that image's label), the nearest not yet taken (one-to-one), or the image "
        "that initialised zeta. Measured on digits (SimCLR small_cnn, epsilon 0.1, beta 0.25, seed 0): "
        "'nearest' relabelled 144 of 144 poisons and zeta under the new labels was harmless (91.7% against "
        "a clean 92.5%, so the images could drop 0.6 points at most); 'nearest_same_label' kept zeta's "
        "harm (72.2%) and the images dropped 6.4 points.",
    )
    batch_size: int = Field(512, ge=1, le=65_536, description="Poisons optimised per batch.")
    projected: bool = Field(
        False,
        description="Project every step onto the clean data range [lo, hi] (projected gradient): the poisons "
        "then pass any magnitude filter (feature matching-r's rule), as an attacker facing one would make them.",
    )


class FeatureMatchingRParams(FeatureMatchingParams):
    """Feature matching followed by the L_inf anomaly filter."""

    anomaly_margin: float = Field(
        0.5,
        ge=0,
        le=10,
        description="Magnitude-anomaly rule: a poison is an anomaly when a pixel leaves the clean data range "
        "[lo, hi] by more than anomaly_margin * (hi - lo) (the paper removes poisons of abnormal L_inf "
        "magnitude; 0 would flag a poison a rounding error outside the range).",
    )


class GCInputParams(_GCParams):
    """Gradient Canceling in input space: the GC objective with zeta = f(nu), optimised over pixels."""

    constrained: bool = Field(
        True,
        description="True: the paper's 'with constraints', adding penalty/2 ||nu - mu'||^2 and clipping nu "
        "to the clean data range after every step. False: the paper's 'no constraints' (poisons may "
        "leave the data range by any amount).",
    )
    penalty: float = Field(
        1.0, ge=0, le=1e6, description="Weight of 1/2 ||nu - mu'||^2 when constrained (paper: 1)."
    )
    gc_optimizer: Literal["gd", "adam"] = Field(
        "adam",
        description="'adam' (default: the stronger, measured in bench strength): the step preconditioned "
        "per pixel by Adam's moment estimates (the penalty and the clipping unchanged); 'gd': the paper's "
        "gradient descent on the pixels.",
    )
    gc_lr: float = Field(
        0.1,
        gt=0,
        le=100,
        description="Relative step size: a first step moves a poison by about gc_lr times the mean "
        "clean image L2 norm (cosine-decayed), so it transfers across datasets and encoders.",
    )
    batch_size: int = Field(256, ge=1, le=65_536, description="Poisons per chunk for the encoder passes.")


class TGDAParams(_Params):
    """Total Gradient Descent Ascent in input space with a frozen encoder.

    The leader (the poisons) takes one Adam step per mini-batch of ``batch_size`` poisons per
    epoch, in pixel units (a fraction ``leader_lr`` of the clean pixel range, cosine-decayed over
    the epochs); the constraint's proximal step uses the same unit, so ``penalty`` means the same
    thing for any encoder, pixel scale and step size. The follower is the victim itself: its
    objective (mean CE + lambda/2 ||W||^2), re-solved by warm-started L-BFGS after every leader
    step, so the total derivative is the implicit-function gradient at the victim's minimiser."""

    constrained: bool = Field(
        True,
        description="True: the proximity penalty and clipping to the clean data range (the paper's "
        "'constr.'); False: unconstrained.",
    )
    penalty: float = Field(
        2.0,
        ge=0,
        le=1e6,
        description="Weight of the proximity term penalty/2 ||nu - mu'||^2 when constrained, in units of the clean "
        "pixel range per pixel and applied as a proximal step with the leader's own step: a pixel whose ascent "
        "direction is consistent settles at most (hi - lo) / penalty from its base (2: half the range).",
    )
    epochs: int = Field(
        200, ge=1, le=100_000,
        description="Leader epochs (paper: 200); each is one leader step per mini-batch of poisons.",
    )
    leader_lr: float = Field(
        0.05,
        gt=0,
        le=10,
        description="Leader step: Adam on the pixels, each step moving a pixel by about leader_lr times the clean "
        "pixel range (hi - lo), cosine-decayed over the epochs.",
    )
    follower: Literal["lbfgs", "gd"] = Field(
        "lbfgs",
        description="lbfgs: after every leader step the defender re-solves the victim's objective by warm-started "
        "L-BFGS (follower_steps iterations), so it stays at the minimiser the total derivative assumes. gd: the "
        "reference's follower, follower_steps plain gradient steps of follower_lr.",
    )
    follower_steps: int = Field(
        10, ge=0, le=10_000,
        description="Defender iterations after every leader step (L-BFGS iterations, or gradient steps for gd; "
        "reference: 20 SGD steps).",
    )
    follower_lr: float = Field(
        0.1,
        gt=0,
        le=100,
        description="follower gd: step size in units of 1 / mean ||[z; 1]||^2 over the clean features, so that it "
        "is stable and comparable for any feature scale (reference: 0.1).",
    )
    warmup_steps: int = Field(
        200, ge=0, le=100_000,
        description="L-BFGS iterations of the defender on the clean part plus the initial poisons before the game, "
        "so that it starts at its best response to them.",
    )
    cg_iters: int = Field(16, ge=1, le=1000, description="Conjugate-gradient iterations for H^-1 v (reference: 16).")
    cg_damping: float = Field(
        1e-3,
        ge=0,
        le=1e3,
        description="Damping lambda in (H + lambda m2 I) for the CG solve, m2 = mean ||[z; 1]||^2 over the clean "
        "features (H is singular: softmax is invariant to a shift shared by all classes).",
    )
    val_fraction: float = Field(
        0.3, gt=0, lt=1, description="Share of the clean training set held out as the attacker's validation set."
    )
    batch_size: int = Field(
        64, ge=1, le=65_536,
        description="Poisons per leader mini-batch (one leader step and one encoder pass each).",
    )
    subset: Literal["random", "first"] = Field(
        "random", description="Which clean points initialise nu: a seeded random subset, or the first ones."
    )


class EMNParams(_Params):
    """Unlearnable examples: sample-wise error-minimising noise."""

    radius: float = Field(8 / 255, gt=0, le=1, description="L_inf radius of each perturbation (paper: 8/255).")
    pgd_steps: int = Field(20, ge=1, le=10_000, description="Sign-PGD steps per round and image (reference: 20).")
    pgd_step: float = Field(0.8 / 255, gt=0, le=1, description="Sign-PGD step size (reference: 0.8/255).")
    head_steps: int = Field(10, ge=1, le=10_000, description="Model SGD steps per round (reference: 10).")
    lr: float = Field(0.1, gt=0, le=10, description="Model SGD learning rate (reference: 0.1).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Model SGD momentum (reference: 0.9).")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="Model SGD weight decay (reference: 5e-4).")
    stop_accuracy: float = Field(
        0.99, gt=0, le=1, description="Stop when training accuracy on x + delta exceeds this (reference: 0.99)."
    )
    max_rounds: int = Field(
        10, ge=1, le=10_000, description="Cap on rounds: a frozen encoder may never reach stop_accuracy."
    )
    end_to_end: bool = Field(
        False,
        description="Train the encoder too (from its pre-trained weights) during the attack and the "
        "evaluation: the paper's Table 4 'end-to-end' column. False: frozen encoder, head only.",
    )
    finetune_epochs: int = Field(
        10, ge=1, le=10_000, description="End-to-end only: epochs of encoder + head training in the evaluation."
    )
    encoder_lr: float = Field(
        0.01, gt=0, le=10, description="End-to-end only: SGD learning rate of the encoder weights."
    )
    batch_size: int = Field(128, ge=1, le=65_536, description="Mini-batch size for model steps and PGD.")

    @model_validator(mode="after")
    def _batch_for_batchnorm(self):
        if self.end_to_end and self.batch_size < 2:
            raise ValueError("end_to_end trains BatchNorm layers and needs batch_size >= 2")
        return self


class DecoderInversionParams(GCFeatureParams):
    """Stage 3 by decoder inversion: a U-Net decoder over the frozen encoder maps zeta back to images."""

    feature_floor: Literal["none", "zero", "auto"] = FeatureMatchingParams.model_fields["feature_floor"]

    decoder_epochs: int = Field(30, ge=1, le=10_000, description="Epochs of decoder training on the clean set.")
    decoder_lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate of the decoder.")
    decoder_batch_size: int = Field(128, ge=1, le=65_536, description="Decoder training mini-batch size.")
    decoder_loss: Literal["auto", "ms_ssim_l1", "ssim_l1"] = Field(
        "auto",
        description="Reconstruction loss: MS-SSIM + L1 (the paper), SSIM + L1 (images too small for five "
        "scales), or auto (MS-SSIM where the image allows five scales).",
    )
    ssim_weight: float = Field(
        0.84, ge=0, le=1, description="alpha in alpha * (1 - (MS-)SSIM) + (1 - alpha) * L1 (Zhao et al.: 0.84)."
    )
    decoder_width: int = Field(64, ge=4, le=1024, description="Channels of the decoder's first up-block.")
    skip_swap: float = Field(
        0.5, ge=0, le=1,
        description="Fraction of each training batch whose skip maps come from another image of the batch "
        "(the bottleneck from the image itself): the decoder must take content from the bottleneck, where zeta "
        "is injected. 0: the paper's plain reconstruction, whose decoder rebuilt the base from its skips and "
        "ignored zeta (no harm at the defaults on digits).",
    )
    batch_size: int = Field(256, ge=1, le=65_536, description="Poisons decoded per batch.")


class AttackInfo(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    title: str
    description: str
    paper: str
    params_model: type[_Params]
    entry: str
    takes_beta: bool = False
    stage: Literal["parameters", "features", "input"] = "input"

    def schema_json(self) -> dict[str, Any]:
        return self.params_model.model_json_schema()


CATALOGUE: dict[str, AttackInfo] = {
    a.name: a
    for a in [
        AttackInfo(
            name="gradpc",
            title="GradPC (target parameters)",
            description="One normalised gradient-ascent step on the clean head's training loss. "
            "Reports the accuracy of the corrupted head itself; produces no poisons.",
            paper=PAPER + " Stage 1; Sun et al. 2020 (parameter corruption).",
            params_model=GradPCParams,
            entry="attacks.gradpc:run",
            stage="parameters",
        ),
        AttackInfo(
            name="gc_feature",
            title="Gradient Canceling in feature space",
            description="Poisoned features zeta whose head gradient cancels the clean gradient at "
            "the GradPC target; evaluated by retraining the head on f(mu) + zeta.",
            paper=PAPER + " Stage 2, Eq. 14; Lu et al. 2023 (Gradient Canceling).",
            params_model=GCFeatureParams,
            entry="attacks.gc_feature:run",
            stage="features",
        ),
        AttackInfo(
            name="feature_matching",
            title="Feature-targeted attack: feature matching",
            description="GradPC target, GC poisoned features, then images nu whose features match "
            "zeta while staying near clean base images (forward-backward splitting, Algorithm 1).",
            paper=PAPER + " Section 4.2.2, Algorithm 1, Eq. 15.",
            params_model=FeatureMatchingParams,
            entry="attacks.feature_matching:run",
            takes_beta=True,
        ),
        AttackInfo(
            name="feature_matching_r",
            title="Feature matching with the anomaly filter (feature matching-r)",
            description="Feature matching, then the poisons whose L_inf magnitude leaves the clean "
            "range are removed before evaluation.",
            paper=PAPER + " Table 3.",
            params_model=FeatureMatchingRParams,
            entry="attacks.feature_matching_r:run",
            takes_beta=True,
        ),
        AttackInfo(
            name="gc_input",
            title="Gradient Canceling in input space",
            description="The Gradient Canceling objective optimised directly over pixels, through the frozen "
            "encoder (closed-form cotangent and one vector-Jacobian product per step); with or without the "
            "proximity penalty and clipping to the clean data range.",
            paper=PAPER + " Table 1, 'GC input space'; Lu et al. 2023.",
            params_model=GCInputParams,
            entry="attacks.gc_input:run",
        ),
        AttackInfo(
            name="tgda_input",
            title="Total Gradient Descent Ascent in input space",
            description="Attacker ascends the validation loss along the total derivative through the "
            "defender's best response (closed-form head Hessian-vector products, damped conjugate "
            "gradient); defender descends the training loss.",
            paper=PAPER + " Table 1, 'TGDA'; Lu et al. 2022 (watml/TGDA-Attack).",
            params_model=TGDAParams,
            entry="attacks.tgda_input:run",
        ),
        AttackInfo(
            name="emn",
            title="Unlearnable examples (sample-wise error-minimising noise)",
            description="Bounded L_inf noise that makes the training images easy to fit, so the model learns "
            "the noise. epsilon is the fraction of training images perturbed, in place (the paper: 1, "
            "every image). Frozen encoder (head only) or end-to-end (encoder trained too).",
            paper=PAPER + " Table 4; Huang et al. 2021 (HanxunH/Unlearnable-Examples).",
            params_model=EMNParams,
            entry="attacks.emn:run",
        ),
        AttackInfo(
            name="decoder_inversion",
            title="Feature-targeted attack: decoder inversion",
            description="GradPC target, GC poisoned features, then images from a U-Net decoder trained over "
            "the frozen encoder, with zeta injected at its bottleneck.",
            paper=PAPER + " Section 4.2.1.",
            params_model=DecoderInversionParams,
            entry="attacks.decoder_inversion:run",
        ),
    ]
}


class UnknownAttackError(ValueError):
    def __init__(self, name: str):
        self.name = name
        self.valid = sorted(CATALOGUE)
        super().__init__(f"unknown attack {name!r}; valid attacks: {', '.join(self.valid)}")


# The default audit: the paper's table (Tables 1-3), each row at the catalogue's defaults.
# (name, params, label); the betas apply to the rows whose attack takes one. Its worst case per
# epsilon is the audit's headline.
PAPER_TABLE: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("gradpc", {}, "gradpc"),
    ("gc_feature", {}, "gc_feature"),
    ("gc_input", {"constrained": False}, "gc_input (no constraints)"),
    ("gc_input", {"constrained": True}, "gc_input (constrained)"),
    ("tgda_input", {"constrained": False}, "tgda_input (no constraints)"),
    ("tgda_input", {"constrained": True}, "tgda_input (constrained)"),
    ("decoder_inversion", {}, "decoder_inversion"),
    ("feature_matching", {}, "feature_matching"),
    ("feature_matching", {"projected": True}, "feature_matching (projected)"),
    ("feature_matching_r", {}, "feature_matching_r"),
)
PAPER_TABLE_BETAS: tuple[float, ...] = (0.25, 0.1, 0.05)
PAPER_TABLE_EPSILONS: tuple[float, ...] = (0.03, 0.1)


def attack_names() -> list[str]:
    return sorted(CATALOGUE)


def get_attack(name: str) -> AttackInfo:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise UnknownAttackError(name) from None


class JobOptions(_Params):
    """The parameters every job shares, validated before any work starts."""

    attack: str
    epsilon: float = Field(0.03, gt=0, le=1, description="Poisoning fraction eps_d: |nu| = eps_d * N.")
    beta: float | None = Field(
        None, ge=0, le=1e6, description="Constraint strength for attacks that take one (feature matching: 0.25)."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    head: HeadRecipe = HeadRecipe()


def validate_job(
    attack: str,
    epsilon: float = 0.03,
    beta: float | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    head: dict[str, Any] | None = None,
    *,
    strict: bool = False,
) -> tuple[JobOptions, _Params]:
    """Validate everything about a job; raises UnknownAttackError or pydantic.ValidationError.

    ``strict``: pydantic's strict mode, for values decoded from JSON (the HTTP API): a bool is not a
    number and a string is neither a number nor a bool (an int still fills a float). Python callers
    keep the default coercions."""
    info = get_attack(attack)
    if beta is not None and not info.takes_beta:
        raise ValueError(f"attack {attack!r} takes no beta")
    if beta is None and info.takes_beta:
        beta = 0.25
    mode = True if strict else None
    opts = JobOptions.model_validate(
        {"attack": attack, "epsilon": epsilon, "beta": beta, "seed": seed, "device": device, "head": head or {}},
        strict=mode,
    )
    return opts, info.params_model.model_validate(params or {}, strict=mode)
