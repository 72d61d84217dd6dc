"""Frontend weights from the public LRW lip-reading and audio models of Ma et al.

Ma, Wang, Shen, Petridis & Pantic, "Lip-reading with densely connected temporal convolutional
networks" (WACV 2021) and Ma, Wang, Petridis, Shen & Pantic, "Training strategies for improved
lip-reading" (ICASSP 2022) publish word classifiers trained on LRW
(github.com/mpc001/Lipreading_using_Temporal_Convolutional_Networks, model zoo table 1:
``lrw_resnet18_dctcn_video.pth.tar``, ``lrw_resnet18_dctcn_audio.pth.tar``; the ``mstcn`` files
share the frontends). Their frontends are the ones of this package, under other names:

=========================================  ==========================================  ==================
theirs (``model_state_dict``)              ours (:class:`VisualFrontend`)              shape (width 64)
=========================================  ==========================================  ==================
``frontend3D.0.weight``                    ``stem_conv.weight``                        (64, 1, 5, 7, 7)
``frontend3D.1.*`` (BatchNorm3d)           ``stem_bn.*`` (BatchNorm2d, per frame)      (64,)
``trunk.layer{s}.{b}.{conv,bn}{1,2}.*``    ``trunk.{2(s-1)+b}.{conv,bn}{1,2}.*``       3x3 convs, BN
``trunk.layer{s}.0.downsample.{0,1}.*``    ``trunk.{2(s-1)}.shortcut.{0,1}.*``         1x1 conv, BN
=========================================  ==========================================  ==================

and for :class:`AudioResNetFrontend` ``trunk.conv1.weight`` (64, 1, 80) -> ``stem.0.weight``,
``trunk.bn1.*`` -> ``stem.1.*`` and ``trunk.layer{s}.{b}.*`` -> ``blocks.{2(s-1)+b}.*`` (1-D).
Batch-norm running statistics and ``num_batches_tracked`` come along; their temporal model
(``tcn.*``) and classifier are not used, and our ``proj`` (present when ``8 * width != out_dim``)
keeps its initialisation.

What the user must match (the loader cannot see it in the weights):

- activation: the dctcn and mstcn models use swish (``x * sigmoid(x)``) everywhere in these
  frontends; build ours with ``activation="swish"`` (``model.frontend_activation=swish``), or
  the copied weights compute another function (a warning is logged). Their older PReLU models
  (``frontend3D.2.weight``, ``relu1.weight``, ...) are refused: our frontends have no PReLU.
- input: video as here (88x88 grayscale, ``(x / 255 - 0.421) / 0.165``, 25 fps); their audio
  model was trained on waveforms normalised per utterance to zero mean and unit variance, while
  this package feeds the raw [-1, 1] waveform. In training mode the stem's batch norm absorbs the
  scale; a frozen (eval-mode) audio frontend uses their running statistics on inputs far smaller
  than theirs (speech in [-1, 1] has a standard deviation of the order of 0.05).

Licence: the authors state their code and models are for non-commercial use only.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from avsr.models.frontends import AudioResNetFrontend, VisualFrontend
from avsr.safe_load import safe_torch_load

log = logging.getLogger(__name__)

LRW_ACTIVATION = "swish"  #: the activation of the dctcn / mstcn LRW models' frontends
_BLOCK = re.compile(r"^(trunk|blocks)\.(\d+)\.(.*)$")
_PRELU = re.compile(r"^(frontend3D\.2|trunk\.relu|trunk\.layer\d\.\d\.relu\d)\.weight$")
_OPTIONAL = "num_batches_tracked"  # absent from files saved before torch 0.4.1


@dataclass
class LRWLoadReport:
    """What :func:`load_lrw_frontend` did.

    - ``path``, ``kind``: the file and ``"video"`` or ``"audio"``
    - ``loaded``: tensors copied (every stem and trunk tensor, running statistics included)
    - ``unused``: the file's tensors that were not used, counted per two-part name prefix
      (``{"tcn.tcn_trunk": 302, "tcn.tcn_output": 2}``)
    - ``uncovered``: our frontend's tensors the file has nothing for (``proj.*`` when present)
    """

    path: str
    kind: str
    loaded: int
    unused: dict[str, int] = field(default_factory=dict)
    uncovered: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        unused = ", ".join(f"{p}.* ({n})" for p, n in self.unused.items()) or "none"
        uncovered = ", ".join(self.uncovered) or "none"
        return (f"{self.kind} frontend: {self.loaded} tensors loaded from the LRW model {self.path}; "
                f"not used from it: {unused}; ours not in it (kept as initialised): {uncovered}")


def _kind(frontend: nn.Module) -> str:
    if isinstance(frontend, VisualFrontend):
        return "video"
    if isinstance(frontend, AudioResNetFrontend):
        return "audio"
    raise ValueError(f"LRW weights fit a VisualFrontend or an AudioResNetFrontend, not a {type(frontend).__name__}")


def source_name(name: str, kind: str) -> Optional[str]:
    """The name in the LRW model of our ``kind`` (``"video"`` / ``"audio"``) frontend's tensor
    ``name``, or None when the LRW model has no such tensor (``proj.*``).

    ``source_name("trunk.4.shortcut.1.running_mean", "video")`` is
    ``"trunk.layer3.0.downsample.1.running_mean"``: block ``i`` is block ``i % 2`` of stage
    ``i // 2 + 1``.
    """
    stems = ({"stem_conv.": "frontend3D.0.", "stem_bn.": "frontend3D.1."} if kind == "video"
             else {"stem.0.": "trunk.conv1.", "stem.1.": "trunk.bn1."})
    for ours, theirs in stems.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    found = _BLOCK.match(name)
    if found and found.group(1) == ("trunk" if kind == "video" else "blocks"):
        i, rest = int(found.group(2)), found.group(3)
        if rest.startswith("shortcut."):
            rest = "downsample." + rest[len("shortcut."):]
        return f"trunk.layer{i // 2 + 1}.{i % 2}.{rest}"
    return None


def read_lrw_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an LRW model file: its ``model_state_dict`` (the training script's checkpoint,
    which also holds ``optimizer_state_dict`` and ``epoch_idx``), or the file itself when it is a
    plain state dict; a ``module.`` prefix (a ``DataParallel`` model) is removed.

    Read with ``torch.load(weights_only=True)``: nothing in the file is run. Raises ValueError
    (naming ``path``) for an unreadable file, pickled code, or a file that is no state dict.
    """
    obj = safe_torch_load(path, "an LRW model file", ValueError)
    if isinstance(obj, Mapping) and isinstance(obj.get("model_state_dict"), Mapping):
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{path}: not an LRW model file (no model_state_dict of tensors; it holds {keys})")
    prefix = "module."
    if all(str(k).startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}


def load_lrw_frontend(frontend: VisualFrontend | AudioResNetFrontend, path: str | Path) -> LRWLoadReport:
    """Copy the stem and ResNet-18 trunk of an LRW model of Ma et al. (2021/2022) into ``frontend``.

    Args:
        frontend: a :class:`VisualFrontend` (for ``lrw_resnet18_*_video.pth.tar``) or an
            :class:`AudioResNetFrontend` (for ``lrw_resnet18_*_audio.pth.tar``), at width 64 (and
            stem_kernel_t 5 for video): the shapes of the module docstring's table.
        path: the file (:func:`read_lrw_state_dict`).

    Returns:
        :class:`LRWLoadReport` (also logged). Every tensor of the stem and trunk is copied, running
        statistics included; nothing is copied unless all of them fit.

    Raises:
        ValueError: when the file cannot be read, has none of the expected names (e.g. the other
            modality's model), lacks some of them, uses PReLU activations, or has a tensor whose
            shape does not fit ours (the message names both tensors and both shapes), or when
            ``frontend`` is of another class.
    """
    kind = _kind(frontend)
    source = read_lrw_state_dict(path)
    own = frontend.state_dict()
    names = {ours: source_name(ours, kind) for ours in own}
    expected = {theirs: ours for ours, theirs in names.items() if theirs is not None}
    # the trunks of both modalities share names: the stems tell the files apart
    mark, other, other_mark = (("frontend3D.0.weight", "audio", "trunk.conv1.weight") if kind == "video"
                               else ("trunk.conv1.weight", "video", "frontend3D.0.weight"))
    if mark not in source and other_mark in source:
        raise ValueError(f"{path}: an LRW {other} model (it has {other_mark}, not {mark}): it fits the {other} "
                         f"frontend, not this {type(frontend).__name__}")
    if not any(theirs in source for theirs in expected):
        raise ValueError(f"{path}: none of its {len(source)} tensors has a name of the LRW {kind} model's "
                         f"frontend (e.g. {mark}); it has e.g. {', '.join(list(source)[:3])}")
    prelu = sorted(k for k in source if _PRELU.match(k))
    if prelu:
        raise ValueError(f"{path}: the model uses PReLU activations ({prelu[0]} and {len(prelu) - 1} more), "
                         "which these frontends do not have; use a swish model (lrw_resnet18_dctcn_* or *_mstcn_*)")
    missing = [t for t in expected if t not in source and not t.endswith(_OPTIONAL)]
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensor(s) of the LRW {kind} frontend missing, first "
                         f"{missing[0]} (for our {expected[missing[0]]}); is it a ResNet-18 model?")
    copied = {}
    for theirs, ours in expected.items():
        if theirs not in source:
            continue
        src, dst = source[theirs], own[ours]
        if src.shape != dst.shape:
            raise ValueError(f"{path}: tensor {theirs} has shape {tuple(src.shape)}, but our {ours} of this "
                             f"{type(frontend).__name__} has {tuple(dst.shape)} (the LRW ResNet-18 needs width 64"
                             f"{' and stem_kernel_t 5' if kind == 'video' else ''})")
        copied[ours] = src.to(dst.dtype)
    frontend.load_state_dict(copied, strict=False)  # copies in place: memory formats are kept
    used = set(expected)
    unused = Counter(".".join(k.split(".")[:2]) for k in source if k not in used)
    report = LRWLoadReport(str(path), kind, len(copied), dict(sorted(unused.items())),
                           [k for k in own if k not in copied])
    log.info("%s", report)
    activation = getattr(frontend, "activation", "relu")
    if activation != LRW_ACTIVATION:
        log.warning("%s: the LRW %s frontend was trained with %s activations, but this one uses %s: the copied "
                    "weights compute another function (set model.frontend_activation=%s)",
                    path, kind, LRW_ACTIVATION, activation, LRW_ACTIVATION)
    return report


def init_lrw_frontends(model: nn.Module, visual_path: str = "", audio_path: str = "") -> list[LRWLoadReport]:
    """``train.init_visual_frontend`` / ``train.init_audio_frontend``: load the LRW model files
    into the visual and audio frontend of an :class:`~avsr.models.AVSRModel` (an empty path
    skips that frontend).

    Raises ValueError as :func:`load_lrw_frontend` does, and when the model's mode has no such
    frontend or its audio frontend is not ``resnet1d``.
    """
    encoder = model.encoder
    reports = []
    if visual_path:
        if encoder.visual_frontend is None:
            raise ValueError(f"train.init_visual_frontend={visual_path}: a model of mode '{encoder.mode}' "
                             "has no visual frontend")
        reports.append(load_lrw_frontend(encoder.visual_frontend, visual_path))
    if audio_path:
        if encoder.audio_frontend is None:
            raise ValueError(f"train.init_audio_frontend={audio_path}: a model of mode '{encoder.mode}' "
                             "has no audio frontend")
        if not isinstance(encoder.audio_frontend, AudioResNetFrontend):
            raise ValueError(f"train.init_audio_frontend={audio_path} needs model.audio_frontend=resnet1d (the LRW "
                             f"audio model is a 1-D ResNet-18 on the waveform), not a "
                             f"{type(encoder.audio_frontend).__name__}")
        reports.append(load_lrw_frontend(encoder.audio_frontend, audio_path))
    return reports
