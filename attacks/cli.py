"""The ``poisonaudit`` command line.

    poisonaudit run --encoder DIR --dataset digits --attack feature_matching \
        --epsilon 0.03 --beta 0.25 --seed 0 --out runs/fm
    poisonaudit pretrain --arch small_cnn --dataset mnist5k --epochs 3 --out encoders/mnist
    poisonaudit attacks            # the catalogue, with parameters and defaults
    poisonaudit serve | create-team | create-key   # the service (see README)

Every parameter is validated before any work starts; an unknown name or an
out-of-range value is a message naming the valid choices and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from attacks.catalogue import ARCHITECTURES, CATALOGUE, DATASET_KINDS, UnknownAttackError, attack_names, validate_job

EXIT_USAGE = 2


class CLIError(Exception):
    pass


def _parse_params(pairs: Sequence[str] | None, blob: str | None) -> dict[str, Any]:
    """--params JSON object, then each --param KEY=VALUE (VALUE as JSON, else as a string)."""
    params: dict[str, Any] = {}
    if blob:
        try:
            loaded = json.loads(blob)
        except json.JSONDecodeError as e:
            raise CLIError(f"--params is not valid JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise CLIError("--params must be a JSON object")
        params.update(loaded)
    for pair in pairs or []:
        if "=" not in pair:
            raise CLIError(f"--param expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _format_validation(e) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(job)"
        lines.append(f"  {loc}: {err['msg']}")
    return "invalid parameters:\n" + "\n".join(lines)


class _Bars:
    """One tqdm bar per stage, driven by the attack's progress callback."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=1000, desc=f"{stage:>17}", leave=True, file=sys.stderr,
                                          bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")
        bar.update(int(fraction * 1000) - bar.n)

    def close(self):
        for bar in self.bars.values():
            bar.close()


def _load_dataset(args):
    from attacks.data import load_dataset

    return load_dataset(args.dataset, args.data_path, max_train=args.max_train, max_test=args.max_test)


def cmd_run(args) -> int:
    params = _parse_params(args.param, args.params)
    head = _parse_params(None, args.head) if args.head else None
    opts, _ = validate_job(args.attack, args.epsilon, args.beta, params, args.seed, args.device, head)
    # validated: now the heavy imports and the work
    from attacks.encoders import load_encoder
    from attacks.pipeline import run_job

    out = Path(args.out)
    dataset = _load_dataset(args)
    encoder = load_encoder(args.encoder)
    bars = _Bars(not args.quiet)
    try:
        result = run_job(
            encoder=encoder,
            dataset=dataset,
            attack=opts.attack,
            epsilon=opts.epsilon,
            beta=opts.beta,
            params=params,
            seed=opts.seed,
            device=opts.device,
            head=head,
            amp=args.amp,
            cache_dir=args.cache_dir,
            progress=bars,
            defences=not args.no_defences,
        )
    finally:
        bars.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result.metrics, indent=2))
    if result.poisons is not None:
        result.poisons.save_npz(out / "poisoned.npz")
    m = result.metrics
    line = f"{m['attack']}: clean {m['clean_accuracy']:.4f} -> poisoned {m['poisoned_accuracy']:.4f} (drop {m['drop']:.4f})"
    if "target_accuracy" in m:
        line += f", target {m['target_accuracy']:.4f}"
    print(line + f", {m['n_poisons']} poisons; wrote {out}/result.json")
    return 0


def cmd_pretrain(args) -> int:
    from attacks.encoders import EncoderSpec, mark_pretrained_on, save_encoder
    from attacks.pretrain import SimCLRConfig, linear_probe_accuracy, pretrain_simclr

    if args.epochs < 1 or args.batch_size < 2:
        raise CLIError("--epochs must be >= 1 and --batch-size >= 2")
    dataset = _load_dataset(args)
    spec = EncoderSpec(
        arch=args.arch,
        in_channels=dataset.image_shape[0] if args.arch == "small_cnn" else 3,
        input_size=args.input_size,
        cifar_stem=args.cifar_stem,
    )
    config = SimCLRConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device)
    bars = _Bars(not args.quiet)
    try:
        encoder = pretrain_simclr(spec, dataset.x_train, config, progress=bars)
    finally:
        bars.close()
    path = save_encoder(mark_pretrained_on(encoder, dataset), args.out)
    acc = linear_probe_accuracy(encoder, dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test)
    print(f"pre-trained {args.arch} on {dataset.name}: linear probe {acc:.4f}; saved to {path}")
    return 0


def cmd_attacks(args) -> int:
    out = {
        name: {
            "title": a.title,
            "takes_beta": a.takes_beta,
            "description": a.description,
            "parameters": {
                k: {"default": f.default, "description": f.description}
                for k, f in a.params_model.model_fields.items()
            },
        }
        for name, a in CATALOGUE.items()
    }
    print(json.dumps(out, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poisonaudit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(sp):
        sp.add_argument("--dataset", required=True, choices=DATASET_KINDS, metavar="NAME",
                        help=f"one of: {', '.join(DATASET_KINDS)}")
        sp.add_argument("--data-path", help="file or root for npz, imagefolder, cifar10, cifar100")
        sp.add_argument("--max-train", type=int, help="use the first N training images")
        sp.add_argument("--max-test", type=int, help="use the first N test images")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    r = sub.add_parser("run", help="run one attack and evaluate it")
    r.add_argument("--encoder", required=True, help="directory written by `poisonaudit pretrain` or save_encoder")
    data_args(r)
    r.add_argument("--attack", required=True, choices=attack_names(), metavar="ATTACK",
                   help=f"one of: {', '.join(attack_names())}")
    r.add_argument("--epsilon", type=float, default=0.03, help="poisoning fraction in (0, 1]")
    r.add_argument("--beta", type=float, default=None, help="constraint strength (feature matching: 0.25)")
    r.add_argument("--param", action="append", metavar="KEY=VALUE", help="an attack parameter (repeatable)")
    r.add_argument("--params", help="attack parameters as a JSON object")
    r.add_argument("--head", help="head recipe as a JSON object (optimizer, epochs, lr, ...)")
    r.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    r.add_argument("--no-defences", action="store_true", help="skip measuring the defences (faster)")
    r.add_argument("--cache-dir", help="feature cache directory, shared across runs")
    r.add_argument("--out", required=True, help="directory for result.json and poisoned.npz")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("pretrain", help="SimCLR pre-training of an encoder")
    t.add_argument("--arch", default="small_cnn", choices=ARCHITECTURES, metavar="ARCH",
                   help=f"one of: {', '.join(ARCHITECTURES)}")
    data_args(t)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--input-size", type=int, default=None, help="resize inputs to this side inside the encoder")
    t.add_argument("--cifar-stem", action="store_true", help="ResNet: 3x3 stem, no max-pool")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_pretrain)

    a = sub.add_parser("attacks", help="print the attack catalogue")
    a.set_defaults(func=cmd_attacks)

    try:  # the service's commands (no torch); absent in an engine-only install
        from app.cli import add_subcommands
    except ModuleNotFoundError as e:
        if e.name not in {"app", "fastapi", "sqlalchemy", "celery", "alembic", "uvicorn"}:
            raise  # a real bug in app.cli must not silently drop `serve`
    else:
        add_subcommands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pydantic import ValidationError

    from attacks.errors import AttackDiverged

    known: tuple[type[BaseException], ...] = (CLIError, UnknownAttackError, ValueError, AttackDiverged, FileNotFoundError)
    try:
        return int(args.func(args) or 0)
    except ValidationError as e:
        print(f"poisonaudit: error: {_format_validation(e)}", file=sys.stderr)
        return EXIT_USAGE
    except known as e:
        print(f"poisonaudit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("poisonaudit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
