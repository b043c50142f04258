"""DeepLab-v2 on a timm backbone, BatchNorm freezing, parameter groups and checkpoint I/O.

Implements docs/method.md §6.1 (network), 6.2 (BN "freezing"), 6.3 (parameter groups), 6.5 (checkpoint
files) and 6.6 (the published state-dict layout), with the fixes of section 11: loading is never silent
(B19: every key is reported as matched, missing, unexpected or ignored, and a checkpoint that matches
nothing is an error) and never unpickles arbitrary objects (`torch.load(..., weights_only=True)`).

The network is the one of the paper: a ResNet at output stride 8 (dilated layer3/layer4, exactly torchvision's
`replace_stride_with_dilation=[False, True, True]`, which timm's `output_stride=8` reproduces) followed by the
DeepLab-v2 classifier: four parallel 3x3 convolutions with bias at dilations 6/12/18/24 whose outputs are
summed. The published unused "representation" head is left out; its checkpoint keys are ignored on load.

Example:
    >>> model = DeepLabV2("resnet10t", num_classes=19)
    >>> logits = model(torch.zeros(1, 3, 37, 53))  # [1, 19, 37, 53]
    >>> report = load_checkpoint(model, "HIAST_final.pth")  # published or hias_nb layout
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from hias_nb.errors import InputError
from hias_nb.io import atomic_path

__all__ = [
    "ASPP",
    "StrideFourSkip",
    "DeepLabV2",
    "LoadReport",
    "BN_FREEZE_MODES",
    "describe_init",
    "param_groups",
    "freeze_bn",
    "set_bn_eval",
    "save_checkpoint",
    "load_checkpoint",
    "load_complete",
    "checkpoint_meta",
    "checkpoint_architecture",
    "has_skip_branch",
    "PUBLISHED_ARCHITECTURE",
    "write_published_layout",
]

CHECKPOINT_FORMAT = 1
# The published HIAST/IAST models are all DeepLab-v2 on ResNet-101 with ASPP rates 6/12/18/24 (paper §5.1); a file in
# their layout records no architecture, so this is what it is loaded into.
PUBLISHED_ARCHITECTURE: dict[str, Any] = {"backbone": "resnet101", "aspp_rates": (6, 12, 18, 24)}
BN_FREEZE_MODES = ("none", "affine", "full")

# Keys of published checkpoints that hias_nb's model has no counterpart for, on purpose (docs/method.md §6.6):
# the unused representation head, the adversarial discriminators (HIAST `D.*`, IAST `discriminators.*`) and
# the ImageNet classifier of IAST's backbone.
_IGNORED_PREFIXES = ("representation.", "D.", "discriminators.", "backbone.fc.")
_ASPP_KEY = re.compile(r"aspp\.conv2d_list\.\d+\.(weight|bias)")


# ----------------------------------------------------------------------------------------------------------
# Network (docs/method.md §6.1)
# ----------------------------------------------------------------------------------------------------------


class ASPP(nn.Module):
    """DeepLab-v2 classifier: parallel dilated 3x3 convolutions whose outputs are **summed**.

    No BN, no ReLU, no concatenation (docs/method.md §6.1). Weights N(0, 0.01), biases PyTorch's default.

    Shape: `[B, in_channels, h, w] -> [B, num_classes, h, w]`.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class StrideFourSkip(nn.Module):
    """toytown's refinement from the backbone's stride-4 features (not the paper's network; docs/toytown.md).

    A 3x3 convolution to 32 channels with BN and ReLU, then a 1x1 convolution to the classes, added to the ASPP
    logits upsampled to stride 4 — the low-level path of DeepLab-v3+ reduced to one small branch. The last
    convolution starts at zero, so a fresh model computes DeepLab-v2's logits (upsampled in two bilinear steps,
    8 → 4 → 1, instead of one).

    Shape: `[B, in_channels, H/4, W/4] -> [B, num_classes, H/4, W/4]`.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.reduce(x))


class DeepLabV2(nn.Module):
    """DeepLab-v2: timm backbone at output stride 8 plus the summed ASPP of docs/method.md §6.1.

    Args:
        backbone: a timm model name that supports `output_stride` (`resnet101` for the paper; `resnet10t`
            or `resnet18` for CPU runs). Built with random weights; nothing is downloaded.
        num_classes: C, the number of output channels.
        pretrained: a local file holding a torchvision or timm state dict of the backbone (classifier keys
            such as `fc.*` are dropped), or None for a random initialisation.
        aspp_rates: dilation (= padding) of each ASPP branch.
        skip: add `StrideFourSkip` on the backbone's stride-4 features (toytown's default, where it gains about
            four mIoU at every stage for the same CPU time; never in the paper's configurations, whose published
            checkpoints have no such branch).

    Shape: `forward(x: [B, 3, H, W]) -> logits [B, C, H, W]`, the stride-8 logits upsampled bilinearly with
    `align_corners=True` to the input size (as every loss, pseudo-labelling and evaluation of the method uses);
    with `skip`, to stride 4 first, where the skip branch's logits are added.

    Attributes:
        pretrained_report: the `LoadReport` of the pretrained file, None for a random initialisation;
            `describe_init(model)` turns it into one sentence.
        bn_freeze: the BatchNorm mode set by `freeze_bn` ("none" until then).
    """

    def __init__(
        self,
        backbone: str = "resnet101",
        num_classes: int = 19,
        pretrained: str | os.PathLike | None = None,
        aspp_rates: tuple[int, ...] = (6, 12, 18, 24),
        skip: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise InputError(f"num_classes: must be at least 1, got {num_classes}")
        if not aspp_rates or any(int(r) < 1 for r in aspp_rates):
            raise InputError(f"aspp_rates: need one or more positive rates, got {tuple(aspp_rates)}")
        if not timm.is_model(backbone):
            raise InputError(f"backbone: unknown timm model {backbone!r}")
        try:
            self.backbone = timm.create_model(
                backbone, pretrained=False, output_stride=8, num_classes=0, global_pool=""
            )
        except (TypeError, ValueError, AssertionError, NotImplementedError) as e:
            raise InputError(f"backbone: {backbone!r} cannot be built at output stride 8 ({e})") from None
        self.aspp = ASPP(self.backbone.num_features, num_classes, tuple(int(r) for r in aspp_rates))
        self.skip: StrideFourSkip | None = None
        if skip:
            stride4 = [i for i, f in enumerate(self.backbone.feature_info) if f["reduction"] == 4]
            if not stride4:
                raise InputError(f"skip: backbone {backbone!r} has no stride-4 stage")
            self._skip_index = stride4[-1]
            self.skip = StrideFourSkip(self.backbone.feature_info[self._skip_index]["num_chs"], num_classes)
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.aspp_rates = tuple(int(r) for r in aspp_rates)
        self.bn_freeze = "none"
        self.pretrained_report: LoadReport | None = None
        if pretrained is not None:
            self.pretrained_report = _load_pretrained_backbone(self.backbone, Path(pretrained))

    @classmethod
    def from_architecture(cls, arch: Mapping[str, Any]) -> DeepLabV2:
        """A model with random weights of the architecture `checkpoint_architecture` describes."""
        return cls(arch["backbone"], arch["num_classes"], aspp_rates=tuple(arch["aspp_rates"]), skip=arch["skip"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip is None:
            features = self.backbone.forward_features(x)  # [B, F, H/8, W/8]
            logits = self.aspp(features)  # [B, C, H/8, W/8]
        else:
            features, (low,) = self.backbone.forward_intermediates(x, indices=[self._skip_index])  # low: H/4, W/4
            logits = F.interpolate(self.aspp(features), size=low.shape[-2:], mode="bilinear", align_corners=True)
            logits = logits + self.skip(low)  # [B, C, H/4, W/4]
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)

    def train(self, mode: bool = True) -> DeepLabV2:
        """As `nn.Module.train`, except that BN layers stay in eval mode after `freeze_bn(model, "full")`."""
        super().train(mode)
        if mode and self.bn_freeze == "full":
            set_bn_eval(self)
        return self


def describe_init(model: DeepLabV2) -> str:
    """One sentence on how the backbone was initialised, for the command line to print."""
    report = model.pretrained_report
    if report is None:
        return f"backbone {model.backbone_name}: random initialisation (no pretrained file given)"
    total = [k for k in model.backbone.state_dict() if not k.endswith("num_batches_tracked")]
    loaded = [k for k in report.matched if not k.endswith("num_batches_tracked")]
    return f"backbone {model.backbone_name}: loaded {len(loaded)}/{len(total)} tensors from {report.source}"


def _load_pretrained_backbone(backbone: nn.Module, path: Path) -> LoadReport:
    """Load a torchvision/timm backbone state dict; everything but the classifier and BN counters must fit."""
    state = _unwrap_state_dict(_read_file(path), str(path))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or "fc"
    drop = tuple({f"{classifier}.", "fc.", "classifier."})
    own = backbone.state_dict()
    report = LoadReport(source=str(path))
    for key, value in state.items():
        if key in own:
            _check_shape(key, tuple(value.shape), tuple(own[key].shape), str(path))
            report.matched.append(key)
        elif key.startswith(drop):
            report.ignored.append(key)
        else:
            report.unexpected.append(key)
    # Old torchvision files carry no `num_batches_tracked`; it has no effect with a fixed BN momentum.
    report.missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if report.missing or report.unexpected:
        raise InputError(
            f"{path}: does not fit backbone {type(backbone).__name__} "
            f"({len(report.missing)} missing, e.g. {report.missing[:3]}; "
            f"{len(report.unexpected)} unexpected, e.g. {report.unexpected[:3]})"
        )
    backbone.load_state_dict({k: state[k] for k in report.matched}, strict=False)
    return report


# ----------------------------------------------------------------------------------------------------------
# Optimisation: parameter groups (docs/method.md §6.3) and BatchNorm freezing (docs/method.md §6.2, B9)
# ----------------------------------------------------------------------------------------------------------


def param_groups(
    model: nn.Module, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: backbone at `lr`, ASPP head (and the skip branch, if any) at
    `head_lr_mult * lr` (docs/method.md §6.3).

    Parameters with `requires_grad=False` (e.g. frozen BN affine) are left out; a group left empty is dropped.
    Each group carries a `"name"` ("backbone" or "head") for logging.
    """
    model = _unwrap(model)
    backbone, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name.startswith(("aspp.", "skip.")) else backbone).append(p)
    groups = [
        {"name": "backbone", "params": backbone, "lr": lr, "weight_decay": weight_decay},
        {"name": "head", "params": head, "lr": head_lr_mult * lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def _bn_layers(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    return (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def set_bn_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer of `model` in eval mode (running statistics used, never updated)."""
    for bn in _bn_layers(model):
        bn.eval()


def freeze_bn(model: DeepLabV2, mode: str) -> None:
    """Set how BatchNorm layers train.

    - `"none"`: BN weight/bias trainable, BN in train mode under `model.train()` (the default; undoes the others).
    - `"affine"`: BN weight/bias get `requires_grad=False`; BN still normalises with batch statistics and
      updates its running statistics in train mode. This is the reference behaviour (docs/method.md §6.2, B9).
    - `"full"`: as "affine", and BN layers stay in eval mode: `DeepLabV2.train()` re-applies `set_bn_eval`
      after switching the rest of the model to train mode, so the trainer just calls `model.train()`.
      A deep copy (e.g. the EMA teacher) keeps the mode.
    """
    if mode not in BN_FREEZE_MODES:
        raise ValueError(f"freeze_bn: mode must be one of {BN_FREEZE_MODES}, got {mode!r}")
    model = _unwrap(model)
    if mode == "full" and not isinstance(model, DeepLabV2):
        raise TypeError(f"freeze_bn(mode='full') needs a DeepLabV2, got {type(model).__name__}")
    for bn in _bn_layers(model):
        for p in bn.parameters(recurse=False):
            p.requires_grad_(mode == "none")
    if isinstance(model, DeepLabV2):
        model.bn_freeze = mode
        model.train(model.training)  # apply (or lift) the eval mode of BN layers right away


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (docs/method.md §6.5, 6.6)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What `load_checkpoint` did, key by key, in the model's own naming where possible.

    - `matched`: loaded into the model;
    - `missing`: model entries the checkpoint lacks (they keep their current values);
    - `unexpected`: checkpoint keys with no counterpart in the model;
    - `ignored`: checkpoint keys hias_nb drops on purpose (the published representation head, discriminators,
      the backbone's ImageNet classifier).
    """

    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def part(label: str, keys: list[str]) -> str:
            more = ", ..." if len(keys) > 3 else ""
            return f"{len(keys)} {label}" + (f" ({', '.join(keys[:3])}{more})" if keys else "")

        return (
            f"{self.source}: {len(self.matched)} matched; "
            + "; ".join(part(n, k) for n, k in [("missing", self.missing), ("unexpected", self.unexpected)])
            + "; "
            + part("ignored", self.ignored)
        )


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict | None = None) -> None:
    """Write hias_nb's checkpoint format atomically.

    The file is `torch.save` of `{"hias_nb_format": 1, "state_dict": {...CPU tensors...}, "meta": {...}}`;
    `meta` gets `backbone`, `num_classes`, `aspp_rates` and `skip` from the model, plus the caller's entries, which
    must be JSON-like (str, numbers, bools, None, lists, dicts) so that the file loads with `weights_only=True`.
    """
    model = _unwrap(model)
    try:
        user_meta = json.loads(json.dumps(meta or {}))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: meta must be JSON-serialisable ({e})") from None
    if isinstance(model, DeepLabV2):
        user_meta.update(backbone=model.backbone_name, num_classes=model.num_classes, aspp_rates=list(model.aspp_rates),
                         skip=model.skip is not None)  # fmt: skip
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"hias_nb_format": CHECKPOINT_FORMAT, "state_dict": state, "meta": user_meta}, tmp)


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """The `meta` dict of a hias_nb checkpoint; `{}` for any other layout (e.g. a published HIAST file)."""
    return _meta_of(_read_file(Path(path)), path)


def _meta_of(obj: Any, path: str | os.PathLike) -> dict:
    """`checkpoint_meta` of a file's loaded contents `obj`."""
    if isinstance(obj, Mapping) and "hias_nb_format" in obj:
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise InputError(f"{path}: meta is a {type(meta).__name__}, expected a dict")
        return meta
    return {}


def has_skip_branch(path: str | os.PathLike) -> bool:
    """Whether a checkpoint holds toytown's skip branch: a hias_nb file's meta says so (absent: no), a file of any
    other layout has ``skip.*`` keys. Reads the file once."""
    obj = _read_file(Path(path))
    meta = _meta_of(obj, path)
    if meta:
        return bool(meta.get("skip", False))
    return _has_skip_keys(_unwrap_state_dict(obj, str(path)))


def _has_skip_keys(state: Mapping[str, Any]) -> bool:
    return any(_published_to_own(k).startswith("skip.") for k in state)


def checkpoint_architecture(path: str | os.PathLike) -> dict[str, Any]:
    """``{"layout", "backbone", "num_classes", "aspp_rates", "skip"}`` of a checkpoint file: a hias_nb file's meta
    (layout "hias_nb"; files from before the skip branch existed have none, read as False); for any other layout
    (HIAST/IAST, layout "published") `PUBLISHED_ARCHITECTURE` with the class count read from the classifier's
    weight shape ``[num_classes, 2048, 3, 3]``, and a skip branch only when ``skip.*`` keys are present."""
    obj = _read_file(Path(path))
    meta = _meta_of(obj, path)
    if meta:
        missing = [k for k in ("backbone", "num_classes", "aspp_rates") if k not in meta]
        if missing:
            raise InputError(f"{path}: meta has no {missing[0]} (not a model checkpoint)")
        return {"layout": "hias_nb", "backbone": meta["backbone"], "num_classes": int(meta["num_classes"]),
                "aspp_rates": tuple(meta["aspp_rates"]), "skip": bool(meta.get("skip", False))}  # fmt: skip
    state = _unwrap_state_dict(obj, str(path))
    heads = {tuple(v.shape) for k, v in state.items() if _ASPP_KEY.fullmatch(_published_to_own(k)) and v.ndim == 4}
    if len(heads) != 1:
        raise InputError(
            f"{path}: no single DeepLab-v2 classifier (aspp.conv2d_list.*.weight) found; "
            f"is this a segmentation checkpoint? (e.g. keys {list(state)[:3]})"
        )
    return {"layout": "published", **PUBLISHED_ARCHITECTURE, "num_classes": heads.pop()[0],
            "skip": _has_skip_keys(state)}  # fmt: skip


def load_checkpoint(
    model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = False
) -> LoadReport:
    """Load weights and buffers into `model` and report what happened to every key.

    `source` is a file path or an in-memory state dict, in any of these layouts:
    - hias_nb's own (`save_checkpoint`'s wrapper dict, or a bare dict of `backbone.*` / `aspp.*` keys);
    - the published HIAST layout (docs/method.md §6.6): `seg_model.` prefix, optional `module.` prefix,
      `seg_model.representation.*` and `D.*` ignored;
    - the IAST layout: `module.backbone.*`, `module.decoder.aspp.*`; `backbone.fc.*`, `discriminators.*` ignored.
    A generic `{"state_dict": {...}}` wrapper is unwrapped too.

    Raises `InputError` (naming the file and the key) when the file is not a loadable checkpoint or would need
    unpickling of arbitrary objects, when a shape differs (wrong class count included), when nothing at all
    matches (docs/method.md B19), and with `strict=True` when any key is missing or unexpected (ignored keys are fine).
    Nothing is loaded unless every check passes.
    """
    model = _unwrap(model)
    if isinstance(source, Mapping):
        name, obj = "<state dict>", source
    else:
        name, obj = str(source), _read_file(Path(source))
    state = _unwrap_state_dict(obj, name)
    own = model.state_dict()

    report = LoadReport(source=name)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = _published_to_own(key)
        if k in own:
            if k in mapped:
                raise InputError(f"{name}: two checkpoint keys map onto {k}")
            _check_shape(k, tuple(value.shape), tuple(own[k].shape), name)
            mapped[k] = value
            report.matched.append(k)
        elif k.startswith(_IGNORED_PREFIXES):
            report.ignored.append(k)
        else:
            report.unexpected.append(k)
    report.missing = [k for k in own if k not in mapped]

    if not report.matched:
        raise InputError(
            f"{name}: no key matches the model ({len(state)} keys in the file, e.g. {list(state)[:3]}); "
            "is this a checkpoint of this architecture?"
        )
    if strict and (report.missing or report.unexpected):
        raise InputError(f"{name}: strict load refused: {report}")
    model.load_state_dict(mapped, strict=False)
    return report


def load_complete(model: nn.Module, source: str | os.PathLike) -> LoadReport:
    """`load_checkpoint` that refuses a partial load: every model key must be in the file (BatchNorm counters,
    absent from older files, excepted) and no file key may be left unused but for the ignored ones — a
    half-random model is never worth evaluating, labelling with or training from."""
    report = load_checkpoint(model, source)
    missing = [k for k in report.missing if not k.endswith("num_batches_tracked")]
    if missing or report.unexpected:
        m = _unwrap(model)
        arch = f"{m.backbone_name} model with ASPP rates {tuple(m.aspp_rates)}" if isinstance(m, DeepLabV2) else "model"
        raise InputError(
            f"{source}: does not fit a {arch} ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(report.unexpected)} unexpected, e.g. {report.unexpected[:2]})"
        )
    return report


def _published_to_own(key: str) -> str:
    """Map a HIAST/IAST/hias_nb key to hias_nb's naming (docs/method.md §6.6)."""
    # The reference strips 7 characters when the *first* key contains "module"; stripping a leading
    # "module." per key does the same for DDP files and cannot mangle a key that merely contains the word.
    key = key.removeprefix("module.").removeprefix("seg_model.")
    if key.startswith("decoder.aspp."):  # IAST
        key = key.removeprefix("decoder.")
    return key


def _check_shape(key: str, got: tuple[int, ...], want: tuple[int, ...], source: str) -> None:
    if got == want:
        return
    if _ASPP_KEY.fullmatch(key) and got[1:] == want[1:]:
        raise InputError(f"{source}: {key} has {got[0]} classes, the model has {want[0]}")
    raise InputError(f"{source}: {key} has shape {list(got)}, the model expects {list(want)}")


def _read_file(path: Path) -> Any:
    """`torch.load` with `weights_only=True`: plain containers and tensors only, never arbitrary objects."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or unsafe file; all mean "not loadable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a loadable checkpoint ({reason[:200]})") from None


def _unwrap_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """The flat `{key: tensor}` dict inside whatever `torch.load` returned."""
    if isinstance(obj, Mapping) and "hias_nb_format" in obj:
        if obj["hias_nb_format"] != CHECKPOINT_FORMAT:
            raise InputError(f"{name}: hias_nb_format {obj['hias_nb_format']!r} is not supported")
        obj = obj.get("state_dict")
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(f"{name}: not a model state dict (got {type(obj).__name__})")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise InputError(f"{name}: not a model state dict (entry {k!r} holds a {type(v).__name__})")
    return dict(obj)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, so keys carry no `module.` prefix."""
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        return model.module
    return model


def write_published_layout(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rewrite a hias_nb checkpoint in the published HIAST layout (docs/method.md §6.6), for trying
    ``load_checkpoint`` on it: a bare state dict whose keys carry the ``seg_model.`` prefix, plus the unused
    ``representation`` head and a discriminator key, which a loader must ignore. A toytown model's skip branch
    keeps its keys under the same prefix (no published model has one: it loads only into a model with the
    branch). Returns `out`."""
    obj = _read_file(Path(checkpoint))
    if not (isinstance(obj, dict) and "state_dict" in obj):
        raise InputError(f"{checkpoint}: not a hias_nb checkpoint (no state_dict)")
    state = {f"seg_model.{k}": v for k, v in obj["state_dict"].items()}
    state["seg_model.representation.0.weight"] = torch.zeros(4, 8, 1, 1)
    state["seg_model.representation.0.bias"] = torch.zeros(4)
    state["D.conv1.weight"] = torch.zeros(2, 2, 4, 4)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return Path(out)
