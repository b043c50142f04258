"""The ``hias-nb`` command line (also ``python -m hias_nb``, so ``torchrun -m hias_nb`` works).

Exit status: 0 on success, 2 on bad input with one line on stderr that names the file or the field.
Stage commands, ``demo`` and ``ablation`` take ``--config FILE.yaml`` plus any number of ``--key value`` overrides
of that command's config (``demo``/``ablation``: ``--alpha 0.2`` sets a key only one stage has, ``--round.lr 1e-4``
one several stages have).
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import sys
from pathlib import Path
from typing import Any

from hias_nb.errors import InputError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit 2), as for every other kind of bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{self.prog}: {message}")


def _config_parser(sub, name: str, help_text: str, keys: str, config_help: str) -> argparse.ArgumentParser:
    """A command configured by ``--config FILE`` and ``--key value`` overrides; `keys` lists them in --help."""
    p = sub.add_parser(
        name,
        help=help_text,
        description=f"{help_text}\n\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # "--seed" must not silently mean "--seeds": unknown keys go to the config check
    )
    p.add_argument("--config", help=config_help)
    return p


def _stage_parser(sub, name: str, help_text: str, config_cls) -> None:
    import dataclasses

    fields = ", ".join(f.name for f in dataclasses.fields(config_cls))
    _config_parser(
        sub, name, help_text, f"Config keys (--key value): {fields}", "YAML config file; --key value overrides follow"
    )


def _demo_keys() -> str:
    """The demo's config keys, for ``demo --help`` and ``ablation --help``."""
    import dataclasses

    from hias_nb.demo import PER_STAGE, SECTIONS, DemoConfig

    cfg = DemoConfig()
    own = [f.name for f in dataclasses.fields(cfg) if f.name not in SECTIONS]
    lines = [f"Demo keys (--key value): {', '.join(own)}"]
    for s in SECTIONS:
        keys = [f.name for f in dataclasses.fields(getattr(cfg, s)) if f.name not in PER_STAGE]
        lines.append(f"{s} keys (--{s}.key value, or --key where no other stage has it): {', '.join(keys)}")
    return "\n".join(lines)


def _demo_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    config_help = "YAML demo config (e.g. a demo run's config.yaml); --key value overrides follow"
    p = _config_parser(sub, name, help_text, _demo_keys(), config_help)
    p.add_argument("--quick", action="store_true", help="the small version (hias_nb.demo.QUICK; tests, smoke runs)")
    return p


def _run_parser(sub) -> None:
    run = sub.add_parser(
        "run",
        help="a paper experiment end to end: source-only, warm-up, K rounds, evaluation (resumable)",
        description="a paper experiment end to end (configs/experiments/*.yaml, docs/reproducing.md); --key value "
        "overrides any key of the file, e.g. --source_root DIR --target_root DIR --out DIR --start_from FILE "
        "--round.iterations 4000",
        allow_abbrev=False,
    )
    run.add_argument("experiment", help="experiment YAML, e.g. configs/experiments/gta5_to_cityscapes.yaml")
    run.add_argument("--smoke", action="store_true", help="the same path on tiny sizes, 2 iterations per stage")


def build_parser() -> argparse.ArgumentParser:
    from hias_nb.pseudo_label import PseudoLabelConfig
    from hias_nb.self_train import SelfTrainConfig
    from hias_nb.train import TrainConfig
    from hias_nb.warmup import WarmupConfig

    parser = _Parser(prog="hias-nb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _demo_parser(
        sub, "demo", "the whole method on the embedded toytown benchmark (e.g. --quick, --out DIR, --rounds 2)"
    )
    abl = _demo_parser(sub, "ablation", "the toytown ablation: selectors, components, equal-compute control")
    abl.add_argument("--out", default="runs/ablation")
    abl.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    abl.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="subset of: full cbst constant none no_hpla no_rar no_consistency no_strong no_warmup",
    )
    abl.add_argument("--no-control", action="store_true", help="skip the equal-compute control")
    abl.add_argument("--csv", default=None, help="where the long CSV goes (default OUT/ablation.csv)")

    _run_parser(sub)
    data = sub.add_parser("data", help="generate or check datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    gen = dsub.add_parser("generate", help="write the embedded benchmark as PNG files plus a manifest")
    gen.add_argument("name", choices=["toytown"])
    gen.add_argument("--out", required=True)
    gen.add_argument("--images", type=int, default=1000, help="target-train images (other splits scale with it)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    chk = dsub.add_parser("check", help="check a dataset on disk against its description in data_manifests/")
    chk.add_argument("name")
    chk.add_argument("--root", required=True)
    chk.add_argument("--split", action="append", default=None, help="only this split (repeatable)")

    _stage_parser(sub, "train-source", "source-only (or oracle) training", TrainConfig)
    _stage_parser(
        sub, "warmup", "adversarial warm-up (output-space discriminator) from a source-only model", WarmupConfig
    )
    _stage_parser(
        sub, "pseudo-label", "pseudo-labels for the target train split (IAS, CBST, constant, none)", PseudoLabelConfig
    )
    _stage_parser(sub, "self-train", "one HIAST self-training round on pseudo-labelled target data", SelfTrainConfig)

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint (hias_nb's own or the published layout)")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--dataset", default="toytown")
    ev.add_argument("--data-root", default="data/toytown")
    ev.add_argument("--split", default=None, help="default: target_val for toytown, val otherwise")
    ev.add_argument("--backbone", default=None, help="default: from the checkpoint, else resnet101")
    ev.add_argument("--aspp-rates", type=int, nargs="+", default=None)
    ev.add_argument("--resize", type=int, nargs=2, default=None, metavar=("H", "W"))
    ev.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="base evaluation size (default: 768 1536 for cityscapes, as the reference; else full size)",
    )
    ev.add_argument(
        "--protocol",
        nargs="+",
        default=None,
        metavar="NAME",
        help="mean IoU under these protocols, e.g. synthia16 synthia13 (default: the dataset's)",
    )
    ev.add_argument("--scales", type=float, nargs="+", default=[1.0])
    ev.add_argument("--flip", action="store_true")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", default=None, help="write a report.json here")
    ev.add_argument("--name", default="evaluate", help="stage name in the report")
    return parser


def _cmd_data(args) -> int:
    if args.data_command == "generate":
        from hias_nb.data.toytown import generate_toytown

        kwargs = {"size": tuple(args.size)} if args.size else {}
        manifest = generate_toytown(args.out, images=args.images, seed=args.seed, **kwargs)
        print(f"toytown written to {args.out}: {manifest['counts']} at {manifest['size'][0]}x{manifest['size'][1]}")
        return 0
    from hias_nb.data import check_dataset, format_problems

    problems = check_dataset(args.name, args.root, splits=args.split)
    if problems:
        print(format_problems(problems), file=sys.stderr)
        raise InputError(f"{args.root}: {len(problems)} problem(s) found in {args.name}")
    print(f"{args.root}: {args.name} OK")
    return 0


def _check_evaluate_numbers(args) -> None:
    if args.batch_size < 1:
        raise InputError(f"--batch-size: must be positive, got {args.batch_size}")
    if not all(0 < s < float("inf") for s in args.scales):
        raise InputError(f"--scales: must be positive, got {args.scales}")
    for flag, size in (("--size", args.size), ("--resize", args.resize)):
        if size is not None and min(size) < 1:
            raise InputError(f"{flag}: must be positive (H, W), got {size}")


def _check_against_meta(ckpt: Path, meta: dict, backbone: str, rates: tuple[int, ...]) -> None:
    """A hias_nb checkpoint records its architecture: another --backbone or --aspp-rates is refused."""
    if meta.get("backbone") not in (None, backbone):
        raise InputError(f"--backbone: {ckpt} holds a {meta['backbone']} model, not {backbone}")
    if meta.get("aspp_rates") is not None and tuple(meta["aspp_rates"]) != tuple(rates):
        raise InputError(f"--aspp-rates: {ckpt} was trained with {tuple(meta['aspp_rates'])}, not {tuple(rates)}")


def _cmd_evaluate(args) -> int:
    from hias_nb.data import SegDataset
    from hias_nb.evaluate import check_protocols, default_eval_size, evaluate, protocol_mious, stage_entry, write_report
    from hias_nb.models import DeepLabV2, checkpoint_meta, has_skip_branch, load_complete
    from hias_nb.runs import check_writable, resolve_device

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise InputError(f"{ckpt}: checkpoint file not found")
    _check_evaluate_numbers(args)
    if args.json:
        check_writable(args.json, "--json")
    from hias_nb import distributed

    device = resolve_device(args.device)
    distributed.init_distributed(device)  # under torchrun: each process evaluates its share of the images
    split = args.split or ("target_val" if args.dataset == "toytown" else "val")
    ds = SegDataset(args.dataset, args.data_root, split, size=tuple(args.resize) if args.resize else None)
    protocols = args.protocol or [ds.protocol.name]
    primary = check_protocols(protocols, ds.protocol)[0]  # checked before any work; the first is the report's
    size = tuple(args.size) if args.size else default_eval_size(args.dataset)
    meta = checkpoint_meta(ckpt)
    backbone = args.backbone or meta.get("backbone", "resnet101")
    rates = tuple(args.aspp_rates or meta.get("aspp_rates", (6, 12, 18, 24)))
    if meta.get("num_classes") not in (None, ds.protocol.num_classes):
        raise InputError(
            f"{ckpt}: num_classes is {meta['num_classes']} but {args.dataset} ({ds.protocol.name}) "
            f"has {ds.protocol.num_classes}"
        )
    _check_against_meta(ckpt, meta, backbone, rates)
    model = DeepLabV2(backbone, ds.protocol.num_classes, aspp_rates=rates, skip=has_skip_branch(ckpt))
    try:
        print(load_complete(model, ckpt))
    except InputError as e:
        raise InputError(f"{e}; check --backbone") from None
    model.to(device)
    result = evaluate(
        model,
        ds,
        ds.protocol,
        device,
        batch_size=args.batch_size,
        scales=tuple(args.scales),
        flip=args.flip,
        size=size,
    )
    if not distributed.is_main():
        return 0  # rank 0 holds the summed confusion matrix and writes
    result = dataclasses.replace(result, protocol=primary)
    print(result.table(args.name).round(2).to_string())
    mious = protocol_mious(result, protocols)
    where = f"{len(ds)} images" + (f", at {size[0]}×{size[1]}" if size else "")
    if args.resize:  # the labels too are resized (nearest) before scoring: say so, the number is not comparable
        where += f", images and labels resized to {args.resize[0]}×{args.resize[1]}"
    for name, value in mious.items():
        print(f"mIoU ({name}, {where}): {value:.2f}")
    if args.json:
        write_report(
            args.json,
            primary,
            [stage_entry(args.name, result, miou_by_protocol=mious)],
            result.seconds,
            {
                "checkpoint": str(ckpt),
                "dataset": args.dataset,
                "data_root": str(Path(args.data_root).resolve()),
                "split": split,
                "resize": list(args.resize) if args.resize else None,
                "backbone": backbone,
                "aspp_rates": list(rates),
                "scales": list(args.scales),
                "flip": args.flip,
                "size": list(size) if size else None,
                "protocols": protocols,
            },
        )
    return 0


def _cmd_stage(name: str, config: str | None, rest: list[str]) -> int:
    from hias_nb.config import load_config, parse_overrides

    overrides = parse_overrides(rest)
    print = _main_print  # noqa: A001 (under torchrun: one line per job, from the process that wrote the files)
    if name == "train-source":
        from hias_nb.train import TrainConfig, train_source

        path = train_source(load_config(TrainConfig, config, overrides))
        print(f"model written to {path}")
        return 0
    if name == "warmup":
        from hias_nb.warmup import WarmupConfig, adversarial_warmup

        run = adversarial_warmup(load_config(WarmupConfig, config, overrides))
        print(f"warm-up model written to {run / 'model_final.pt'}")
        return 0
    if name == "pseudo-label":
        from hias_nb.pseudo_label import PseudoLabelConfig, generate_pseudo_labels

        folder = generate_pseudo_labels(load_config(PseudoLabelConfig, config, overrides))
        print(f"pseudo-labels written to {folder}")
        return 0
    from hias_nb.self_train import SelfTrainConfig, self_train

    run = self_train(load_config(SelfTrainConfig, config, overrides))
    print(f"student and teacher written to {run}")
    return 0


def _main_print(*args: Any, **kwargs: Any) -> None:
    """`print` on the process that writes the files (rank 0) only."""
    from hias_nb import distributed

    if distributed.is_main():
        builtins.print(*args, **kwargs)


def _cmd_demo(args, rest: list[str]) -> int:
    from hias_nb.config import parse_overrides

    overrides = parse_overrides(rest)
    if args.command == "demo":
        from hias_nb.demo import run_demo

        run_demo(args.quick, args.config, **overrides)
        return 0
    from hias_nb.ablation import VARIANTS, run_ablation

    unknown = [v for v in args.variants or () if v not in VARIANTS]
    if unknown:
        raise InputError(f"--variants: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    variants = tuple(args.variants or VARIANTS)
    control = not args.no_control
    run_ablation(
        args.out, tuple(args.seeds), variants, args.csv, args.quick, control=control, config=args.config, **overrides
    )
    return 0


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("train-source", "warmup", "pseudo-label", "self-train"):
        return _cmd_stage(args.command, args.config, rest)
    if args.command in ("demo", "ablation"):
        return _cmd_demo(args, rest)
    if args.command == "run":
        from hias_nb.config import parse_overrides
        from hias_nb.experiment import run_experiment

        run_experiment(args.experiment, parse_overrides(rest), args.smoke)
        return 0
    if rest:
        raise InputError(f"hias-nb {args.command}: unrecognised arguments: {' '.join(rest)}")
    if args.command == "data":
        return _cmd_data(args)
    if args.command == "evaluate":
        return _cmd_evaluate(args)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except InputError as e:
        print(f"hias-nb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hias-nb: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
