"""The pipeline every job shares: features, clean head, attack, evaluation.

1. f(train), f(test) from the feature cache (one encoder pass each, ever).
2. The clean head, trained with the one recipe (:func:`attacks.head.train_head`).
3. The attack (resolved from the catalogue), given an :class:`AttackContext`.
4. Evaluation: retrain the head from the same seed on f(mu) + f(nu) -- only
   f(nu) is new, one encoder pass over the poisons -- and report clean accuracy,
   poisoned accuracy and the drop on the test set, with poison statistics.
5. Defences (:mod:`attacks.defences`, on by default, ``defences=False`` skips
   them): the L_inf, k-NN and spectral-signature filters on the same poisoned
   training set, each with the head retrained on what it keeps, in
   ``metrics["defences"]``. Not for parameter attacks (GradPC: no poisons) nor
   attacks that evaluate themselves (end-to-end training).

``run_job`` validates every parameter before any work starts and never returns
a NaN: non-finite values raise :class:`attacks.errors.AttackDiverged`.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.catalogue import HeadRecipe, JobOptions, validate_job
from attacks.defences import DefenceConfig, run_defences
from attacks.errors import AttackDiverged
from attacks.features import FeatureCache, extract_features, resolve_device
from attacks.head import Head, accuracy, feature_scale, fit_head, l2_strength
from attacks.progress import Cancelled, ProgressFn, checkpoint, checks
from attacks.registry import resolve

__all__ = [
    "AttackContext",
    "AttackOutput",
    "AttackDiverged",
    "Cancelled",
    "JobResult",
    "PoisonSet",
    "prepare",
    "run_job",
]


@dataclass(frozen=True)
class PoisonSet:
    """x: (n, C, H, W) float32 poisons; y: (n,) int64 labels; base_index: (n,) int64
    index of each poison's clean base image in the training set."""

    x: torch.Tensor
    y: torch.Tensor
    base_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def save_npz(self, path: str | Path) -> Path:
        path = Path(path)
        with open(path, "wb") as fh:
            fh.write(self.to_npz_bytes())
        return path

    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            x=self.x.detach().cpu().float().numpy(),
            y=self.y.detach().cpu().long().numpy(),
            base_index=self.base_index.detach().cpu().long().numpy(),
        )
        return buf.getvalue()

    @staticmethod
    def load_npz(path: str | Path) -> "PoisonSet":
        with np.load(path, allow_pickle=False) as z:
            return PoisonSet(
                torch.from_numpy(z["x"]), torch.from_numpy(z["y"]), torch.from_numpy(z["base_index"])
            )


@dataclass
class AttackContext:
    """What an attack may read. Nothing in it is to be modified."""

    encoder: torch.nn.Module
    dataset: Any
    Z_train: torch.Tensor
    y_train: torch.Tensor
    Z_test: torch.Tensor
    y_test: torch.Tensor
    clean_head: Head
    recipe: HeadRecipe
    device: torch.device
    amp: bool = False
    seed: int = 0
    encoder_fingerprint: str = ""
    # Where attacks may keep artifacts shared across jobs (e.g. a trained decoder); None: memory only.
    cache_dir: Path | None = None
    # Stage outputs shared across jobs (clean head, GradPC target, GC features); None: no sharing.
    stage_cache: Any = None
    # s = sqrt(mean ||z||^2) over the clean training features: fixes the victim's L2 strength
    # lambda = l2 s^2 for every fit of this job, so poisons cannot move the regulariser.
    feature_scale: float = 1.0
    # Convergence record of the clean head's fit (optimizer, iterations, grad_max, converged, l2).
    clean_head_info: dict = field(default_factory=dict)

    def fit_victim(self, Z: torch.Tensor, y: torch.Tensor, seed: int | None = None, *,
                   quick: bool = False) -> tuple[Head, dict]:
        """The victim's head on (Z, y): the job's recipe, its clean feature scale, (head, info).
        L-BFGS starts from the clean head (the objective is strongly convex: same minimiser, fewer
        iterations); SGD from zero, as the paper's protocol. ``quick``: a looser L-BFGS tolerance
        (1e-3, at most 300 iterations), for a search that only ranks candidates."""
        recipe = self.recipe
        if quick and recipe.optimizer == "lbfgs":
            recipe = recipe.model_copy(update={"tol": max(recipe.tol, 1e-3), "max_iter": min(recipe.max_iter, 300)})
        return fit_head(Z, y, self.dataset.num_classes, recipe, self.seed if seed is None else seed,
                        scale=self.feature_scale, init=self.clean_head if recipe.optimizer == "lbfgs" else None)

    def victim_lambda(self) -> float:
        """lambda of the victim's objective mean CE + lambda/2 ||W||^2, in absolute feature units."""
        return l2_strength(self.recipe, self.feature_scale)


@dataclass
class AttackOutput:
    """What an attack returns. Exactly one of (poisons, poison_features) for a
    poisoning attack; neither for a parameter attack (GradPC)."""

    target: Head | None = None
    poisons: torch.Tensor | None = None
    poison_features: torch.Tensor | None = None
    poison_labels: torch.Tensor | None = None
    base_index: torch.Tensor | None = None
    zeta: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    # The poisons replace their base images in the training set instead of joining it
    # (unlearnable examples: eps_d = infinity when every image is perturbed).
    replaces_base: bool = False
    # An attack that must evaluate itself (end-to-end training of the encoder) returns
    # {"clean_accuracy": ..., "poisoned_accuracy": ...} here; the pipeline then skips
    # the head retraining on cached features and reports these numbers.
    evaluation: dict | None = None


@dataclass
class JobResult:
    metrics: dict
    poisons: PoisonSet | None


def prepare(
    encoder,
    dataset,
    *,
    recipe: HeadRecipe | None = None,
    seed: int = 0,
    device: str = "auto",
    amp: bool = False,
    cache: FeatureCache | None = None,
    progress: ProgressFn | None = None,
    timings: dict | None = None,
    stage_cache=None,
) -> AttackContext:
    """Stages shared by every attack: frozen encoder on device, cached features, clean head
    (through ``stage_cache``, an :class:`attacks.stage_cache.StageCache`, when given)."""
    from attacks.encoders import freeze, place

    report = progress or (lambda s, f: None)
    timings = timings if timings is not None else {}
    dev = resolve_device(device)
    encoder = place(freeze(encoder), dev)  # channels-last convolutions on CUDA
    cache = cache or FeatureCache()
    t0 = time.perf_counter()
    fp = encoder.fingerprint()  # hashes every weight: once per job
    Z_train = cache.features(encoder, dataset, "train", fingerprint=fp, device=dev, amp=amp,
                             progress=lambda f: report("features", f / 2))
    Z_test = cache.features(encoder, dataset, "test", fingerprint=fp, device=dev, amp=amp,
                            progress=lambda f: report("features", 0.5 + f / 2))
    report("features", 1.0)
    timings["features"] = time.perf_counter() - t0
    recipe = recipe or HeadRecipe()
    t0 = time.perf_counter()
    y_train, y_test = dataset.y_train.long(), dataset.y_test.long()
    scale = feature_scale(Z_train)

    def fit_clean():
        h, info = fit_head(Z_train, y_train, dataset.num_classes, recipe, seed, scale=scale,
                           progress=lambda f: report("clean_head", f))
        return {"W": h.W, "b": h.b}, info

    ident = None if stage_cache is None else stage_cache.identity(
        fp, getattr(dataset, "content_hash", None), recipe, seed, dev, amp)
    if ident is None:
        t, head_info = fit_clean()
    else:
        t, head_info = stage_cache.get_or_compute(
            "clean_head", stage_cache.key("clean_head", ident, {}), fit_clean, device=Z_train.device)
    head = Head(t["W"], t["b"])
    timings["clean_head"] = time.perf_counter() - t0
    report("clean_head", 1.0)
    return AttackContext(
        encoder, dataset, Z_train, y_train, Z_test, y_test, head, recipe, dev, amp, seed, fp, cache.directory,
        stage_cache, feature_scale=scale, clean_head_info=dict(head_info),
    )


def poison_statistics(
    poisons: torch.Tensor | None, base: torch.Tensor | None, fnu: torch.Tensor | None, zeta: torch.Tensor | None,
    lo: float, hi: float, chunk: int = 4096,
) -> dict:
    """Per-set summaries of L_inf, L2, distance to base, fraction outside [0, 1], ||f(nu) - zeta||^2."""

    def summary(v: torch.Tensor) -> dict:
        v = v.double()
        return {
            "mean": v.mean().item(),
            "median": v.median().item(),
            "max": v.max().item(),
        }

    stats: dict[str, Any] = {}
    if poisons is not None and poisons.shape[0] > 0:
        # Row chunks: temporaries are bounded by ``chunk`` poisons, not by the number of poisons.
        n = poisons.shape[0]
        rows: dict[str, list[torch.Tensor]] = {"linf": [], "l2": [], "linf_to_base": [], "l2_to_base": []}
        out_unit = out_clean = 0
        for i in range(0, n, chunk):
            checkpoint()
            flat = poisons[i : i + chunk].reshape(-1, poisons[0].numel()).float()
            rows["linf"].append(flat.abs().amax(1))
            rows["l2"].append(flat.norm(dim=1))
            out_unit += int(((flat < 0) | (flat > 1)).sum())
            out_clean += int(((flat < lo) | (flat > hi)).sum())
            if base is not None:
                delta = flat - base[i : i + chunk].reshape(flat.shape).float()
                rows["linf_to_base"].append(delta.abs().amax(1))
                rows["l2_to_base"].append(delta.norm(dim=1))
        total = n * poisons[0].numel()
        stats["linf"] = summary(torch.cat(rows["linf"]))
        stats["l2"] = summary(torch.cat(rows["l2"]))
        stats["fraction_outside_unit_range"] = out_unit / total
        stats["fraction_outside_clean_range"] = out_clean / total
        stats["clean_range"] = [lo, hi]
        if base is not None:
            stats["linf_to_base"] = summary(torch.cat(rows["linf_to_base"]))
            stats["l2_to_base"] = summary(torch.cat(rows["l2_to_base"]))
    if fnu is not None and zeta is not None and fnu.shape[0] > 0:
        stats["feature_match_error"] = summary(((fnu - zeta) ** 2).sum(1))
    if zeta is not None and zeta.shape[0] > 0:
        stats["zeta_norm"] = summary(zeta.norm(dim=1))
    return stats


def scenario_of(encoder, dataset) -> dict:
    """The paper's two settings: the encoder pre-trained on the audited dataset ("same_dataset",
    its fine-tuning rows) or on another one ("transfer"); "unknown" when the encoder has no record."""
    pre = (getattr(encoder, "provenance", None) or {}).get("pretrained_on")
    if not pre:
        return {"scenario": "unknown", "pretrained_on": None}
    same = pre.get("content_hash") is not None and pre.get("content_hash") == getattr(dataset, "content_hash", None)
    return {"scenario": "same_dataset" if same else "transfer", "pretrained_on": pre}


def _finite(obj: Any, where: str = "result") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise AttackDiverged(f"non-finite value in {where}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _finite(v, where)


def run_job(
    *,
    encoder,
    dataset,
    attack: str,
    epsilon: float = 0.03,
    beta: float | None = None,
    params: dict | None = None,
    seed: int = 0,
    device: str = "auto",
    head: dict | None = None,
    amp: bool = False,
    cache_dir: str | Path | None = None,
    cache: FeatureCache | None = None,
    progress: ProgressFn | None = None,
    defences: bool | DefenceConfig = True,
    stage_cache=None,
) -> JobResult:
    """Run one audit job end to end. Raises before any work on invalid parameters
    (catalogue.UnknownAttackError, pydantic.ValidationError, ValueError).
    ``defences``: True runs :mod:`attacks.defences` with its defaults, a
    DefenceConfig with those parameters, False skips them."""
    opts, attack_params = validate_job(attack, epsilon, beta, params, seed, device, head)
    defence_config = DefenceConfig() if defences is True else (defences or None)
    torch.manual_seed(opts.seed)
    user = progress or (lambda s, f: None)
    last: list = [None, 0.0]

    def report(stage: str, fraction: float) -> None:
        last[0], last[1] = stage, fraction
        user(stage, fraction)

    # Loops without a callback of their own (head fits in sweeps, defences, evaluation) reach the
    # caller's callback through attacks.progress.checkpoint, with the latest stage and fraction.
    with checks(lambda: last[0] is not None and user(last[0], last[1])):
        return _run_job(opts, attack_params, defence_config, report, encoder=encoder, dataset=dataset, amp=amp,
                        cache_dir=cache_dir, cache=cache, stage_cache=stage_cache)


def _run_job(opts, attack_params, defence_config, report, *, encoder, dataset, amp, cache_dir, cache,
             stage_cache) -> JobResult:
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    cache = cache or FeatureCache(cache_dir)
    ctx = prepare(
        encoder, dataset, recipe=opts.head, seed=opts.seed, device=opts.device, amp=amp,
        cache=cache, progress=report, timings=timings, stage_cache=stage_cache,
    )
    clean_acc = accuracy(ctx.clean_head, ctx.Z_test, ctx.y_test)

    t0 = time.perf_counter()
    try:
        out: AttackOutput = resolve(opts.attack)(
            ctx, attack_params, epsilon=opts.epsilon, beta=opts.beta, seed=opts.seed, progress=report
        )
        timings["attack"] = time.perf_counter() - t0
        metrics = _evaluate(ctx, out, opts, timings, report, defence_config)
    except FloatingPointError as e:  # a non-finite head or feature somewhere: one error type for callers
        raise AttackDiverged(str(e)) from e
    if out.evaluation is not None:
        clean_acc = float(out.evaluation["clean_accuracy"])
    metrics.update(
        attack=opts.attack,
        epsilon=opts.epsilon,
        beta=opts.beta,
        seed=opts.seed,
        params=attack_params.model_dump(),
        head_recipe=opts.head.model_dump(),
        clean_accuracy=clean_acc,
        drop=clean_acc - metrics["poisoned_accuracy"],
        device=str(ctx.device),
        bf16=bool(amp and ctx.device.type == "cuda"),  # what ran: autocast is a no-op on the CPU
        device_name=torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        n_train=int(ctx.Z_train.shape[0]),
        n_test=int(ctx.Z_test.shape[0]),
        feature_dim=int(ctx.Z_train.shape[1]),
        encoder_fingerprint=ctx.encoder_fingerprint,
        dataset=getattr(dataset, "name", None),
        dataset_hash=getattr(dataset, "content_hash", None),
        feature_cache={"hits": cache.hits, "misses": cache.misses},
        **({"stage_cache": stage_cache.stats()} if stage_cache is not None else {}),
        **scenario_of(encoder, dataset),
        versions=_versions(),
    )
    metrics["warnings"] = list(metrics.get("warnings", [])) + reliability_warnings(metrics, ctx.clean_head_info)
    timings["total"] = time.perf_counter() - t_start
    metrics["stage_seconds"] = timings
    _finite(metrics)
    poisons = None
    if out.poisons is not None:
        poisons = PoisonSet(out.poisons.float(), out.poison_labels.long(), out.base_index.long())
    return JobResult(metrics=metrics, poisons=poisons)


def noise_level(accuracy_value: float, n_test: int) -> float:
    """Two standard errors of the difference of two test accuracies near ``accuracy_value`` measured
    on ``n_test`` points (binomial): a drop smaller than this is not distinguishable from noise."""
    p = min(max(accuracy_value, 1e-6), 1 - 1e-6)
    return 2.0 * math.sqrt(2.0 * p * (1 - p) / max(n_test, 1))


def reliability_warnings(metrics: dict, clean_info: dict) -> list[str]:
    """What makes a result untrustworthy or weaker than it looks, in words (AutoAttack's checks)."""
    out: list[str] = []
    if clean_info.get("optimizer") == "lbfgs" and not clean_info.get("converged", True):
        out.append(f"the clean head did not converge (largest gradient entry {clean_info.get('grad_max', 0):.2g})")
    victim = (metrics.get("victim") or {}).get("poisoned") or {}
    if victim.get("optimizer") == "lbfgs" and not victim.get("converged", True):
        out.append(f"the poisoned head did not converge (largest gradient entry {victim.get('grad_max', 0):.2g}): "
                   "the poisoned accuracy is not that of the victim's minimiser")
    noise = noise_level(metrics["clean_accuracy"], metrics.get("n_test", 0))
    if abs(metrics["drop"]) < noise and metrics.get("n_poisons", 0) > 0:
        out.append(f"the drop ({100 * metrics['drop']:.2f} points) is within the test set's noise "
                   f"(+-{100 * noise:.2f} points on {metrics.get('n_test')} images)")
    if metrics.get("n_poisons_generated") and metrics.get("n_poisons") == 0:
        out.append(f"all {metrics['n_poisons_generated']} poisons were removed as anomalies: the result is the "
                   "clean accuracy, the attack as run is fully filtered")
    for name, d in (metrics.get("defences") or {}).items():
        if d.get("applicable") and d.get("n_poisons") and d.get("poisons_removed") == d.get("n_poisons"):
            out.append(f"the {name} defence removed all {d['n_poisons']} poisons")
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("poisonaudit")
    except PackageNotFoundError:
        own = None
    return {"torch": torch.__version__, "poisonaudit": own}


def _evaluate(ctx: AttackContext, out: AttackOutput, opts: JobOptions, timings: dict, report,
              defences: DefenceConfig | None = None) -> dict:
    x = ctx.dataset.x_train
    lo, hi = float(x.min()), float(x.max())
    metrics: dict[str, Any] = dict(out.extra)
    if out.target is not None:
        metrics["target_accuracy"] = accuracy(out.target, ctx.Z_test, ctx.y_test)
    t0 = time.perf_counter()
    fnu = None
    if out.poisons is not None:
        if not torch.isfinite(out.poisons).all():
            raise AttackDiverged("the attack returned non-finite poisons")
        if out.evaluation is not None:  # evaluated by the attack itself: no frozen-encoder pass needed
            Zp = ctx.Z_train.new_empty((out.poisons.shape[0], 0))
        else:
            Zp = (
                extract_features(ctx.encoder, out.poisons, device=ctx.device, amp=ctx.amp)
                if out.poisons.shape[0]
                else ctx.Z_train[:0]
            )
            fnu = Zp
    elif out.poison_features is not None:
        Zp = out.poison_features
    else:
        Zp = None
    if out.evaluation is not None:  # the attack trained and evaluated its own model
        metrics["poisoned_accuracy"] = float(out.evaluation["poisoned_accuracy"])
        metrics["n_poisons"] = int(Zp.shape[0]) if Zp is not None else 0
        metrics["evaluated_by"] = "attack"
    elif Zp is None:  # a parameter attack: the target head is the attacked model
        metrics["poisoned_accuracy"] = metrics["target_accuracy"]
        metrics["n_poisons"] = 0
    else:
        if not torch.isfinite(Zp).all():
            raise AttackDiverged("the poisoned features are non-finite")
        if out.replaces_base:
            keep = torch.ones(ctx.Z_train.shape[0], dtype=torch.bool, device=ctx.Z_train.device)
            keep[out.base_index.to(keep.device)] = False
            Zclean, yclean = ctx.Z_train[keep], ctx.y_train[keep]
        else:
            Zclean, yclean = ctx.Z_train, ctx.y_train
        Zmix = torch.cat([Zclean, Zp.float().to(Zclean.device)])
        ymix = torch.cat([yclean, out.poison_labels.long().to(yclean.device)])
        poisoned_head, victim_info = ctx.fit_victim(Zmix, ymix, opts.seed)
        metrics["victim"] = {"clean": ctx.clean_head_info, "poisoned": victim_info,
                             "feature_scale": ctx.feature_scale, "lambda": ctx.victim_lambda()}
        metrics["poisoned_accuracy"] = accuracy(poisoned_head, ctx.Z_test, ctx.y_test)
        metrics["poisoned_train_accuracy"] = accuracy(poisoned_head, ctx.Z_train, ctx.y_train)
        metrics["n_poisons"] = int(Zp.shape[0])
        if defences is not None:
            t1 = time.perf_counter()
            metrics["defences"] = run_defences(
                Zclean, yclean, Zp, out.poison_labels, ctx.Z_test, ctx.y_test, ctx.dataset.num_classes, ctx.recipe,
                opts.seed, poisons=out.poisons, clean_range=(lo, hi), config=defences, scale=ctx.feature_scale,
                undefended_accuracy=metrics["poisoned_accuracy"], progress=report,
            )
            timings["defences"] = time.perf_counter() - t1
    base = x[out.base_index] if (out.base_index is not None and out.poisons is not None) else None
    metrics["poison_stats"] = poison_statistics(out.poisons, base, fnu, out.zeta, lo, hi)
    timings["evaluation"] = time.perf_counter() - t0 - timings.get("defences", 0.0)
    report("evaluation", 1.0)
    return metrics
