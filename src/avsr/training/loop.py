"""The training loop: one process, one GPU, or DDP under ``torchrun`` — same code.

:class:`Trainer` builds everything from a :class:`~avsr.config.Config` (tokenizer, model,
optimiser, schedule, frame-budget sampler, DataLoader with workers) and runs epochs of
optimiser steps with gradient accumulation, clipping, mixed precision (bf16/fp16 autocast on GPU,
fp32 on CPU) and a guard that skips steps whose loss or gradient is not finite and stops after
``train.max_nonfinite`` in a row. Every ``save_step`` steps and at every epoch end it writes a
checkpoint holding everything needed to continue exactly (model, optimiser, schedule, AMP scaler,
sampler position, every rank's RNG states, config, tokenizer); ``resume`` picks the newest one up.
Every ``eval_step`` steps it reports validation loss and greedy-CTC WER and keeps ``best.pt``.

Exactness of resuming rests on three things: the batch order depends only on ``(seed, epoch)``
(:class:`~avsr.data.sampler.FrameBudgetSampler`), augmentation only on ``(seed, epoch, index)``
(:class:`~avsr.data.dataset.AVDataset`), and the global RNGs are restored where they were saved
(the DataLoaders draw their worker seeds from private generators, not the global one).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from avsr.config import Config, save_config, to_dict
from avsr.data.batch import Batch
from avsr.data.dataset import AVDataset, collate, hold_out
from avsr.data.manifest import manifest_path, read_manifest
from avsr.data.sampler import FrameBudgetSampler
from avsr.data.transforms import build_transform
from avsr.models.lrw import init_lrw_frontends
from avsr.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    latest_checkpoint,
    load_checkpoint,
    make_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
    tokenizer_from_state,
    tokenizer_to_tensor,
)
from avsr.training.averaging import average_checkpoints
from avsr.training.distributed import DistEnv, all_reduce_sum, barrier, broadcast_object, unwrap, wrap_model
from avsr.training.monitor import Monitor
from avsr.training.schedules import build_scheduler
from avsr.training.validate import ValResult, validate
from avsr.utils import seed_everything

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adam")


VISUAL_FRONTEND = "encoder.visual_frontend."  # state-dict prefix of the visual frontend
AUDIO_FRONTEND = "encoder.audio_frontend"  # module path of the audio frontend


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss or gradient was not finite for ``train.max_nonfinite`` steps in a row."""


class DataLoaderWorkerError(RuntimeError):
    """A DataLoader worker process died (killed by the OS, or crashed in native code)."""


def guard_workers(loader, what: str):
    """Iterate ``loader``; torch's terse "DataLoader worker ... exited unexpectedly" becomes a
    :class:`DataLoaderWorkerError` that says which data it was and what to do."""
    try:
        yield from loader
    except RuntimeError as exc:
        if isinstance(exc, DataLoaderWorkerError) or "DataLoader worker" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0]
        raise DataLoaderWorkerError(
            f"a DataLoader worker process died while loading the {what} data ({first}): most likely the OS killed "
            "it for memory (lower data.num_workers or data.max_frames) or a media decoder crashed; rerun with "
            "data.num_workers=0 to see the failing clip's error in this process") from None


def resolve_precision(spec: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype of ``spec`` on ``device`` (``None`` = fp32, no autocast).

    ``auto`` is bf16 on GPUs that support it (else fp16) and fp32 on CPU. Raises ``ValueError``
    for an unknown spec or fp16 on CPU.
    """
    if spec not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{spec}'")
    if spec == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW or Adam over ``model``; weight decay only on matrices/kernels (not biases, norms).

    Raises ``ValueError`` for an unknown ``cfg.optimizer`` (a :class:`~avsr.config.TrainConfig`).
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{cfg.optimizer}'")
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def freeze_parts(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Keep the parts ``names`` of ``model`` as they are while the rest trains (fine-tuning).

    A name is a module path of ``model`` (``encoder.scorers``) or ``"frontends"``, every frontend
    the model's mode has (``encoder.visual_frontend``, ``encoder.audio_frontend``). Their
    parameters get ``requires_grad=False`` and the modules run in eval mode even inside a model in
    training mode (a forward pre-hook), so BatchNorm statistics and dropout stay fixed too.
    Returns the module paths frozen; raises ``ValueError`` for a name the model lacks.
    """
    modules = dict(model.named_modules())
    paths: list[str] = []
    for name in names:
        if name == "frontends":
            paths += [p for p in (VISUAL_FRONTEND.rstrip("."), AUDIO_FRONTEND) if p in modules]
        elif name in modules and name:
            paths.append(name)
        else:
            parts = sorted(p for p in modules if p and "." not in p.removeprefix("encoder."))
            raise ValueError(f"train.freeze: the model has no part '{name}'; it has: frontends, {', '.join(parts)}")
    for path in paths:
        module = modules[path]
        module.requires_grad_(False)
        module.register_forward_pre_hook(_stay_in_eval_mode)
    return paths


def _stay_in_eval_mode(module: torch.nn.Module, _args) -> None:
    if module.training:
        module.eval()


def _worker_init(worker_id: int) -> None:
    """One torch thread per DataLoader worker (the main process trains with the others) and
    seeded NumPy/Python generators (augmentation itself uses per-sample generators). OpenCV
    keeps the single thread :func:`make_loader` left it: resizing its pool in a forked child hangs."""
    import random

    import numpy as np

    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: AVDataset, sampler: FrameBudgetSampler, num_workers: int, seed: int,
                pin_memory: bool = False) -> DataLoader:
    """DataLoader over ``sampler``'s batches with persistent, prefetching, seeded workers.

    It draws worker seeds from a private generator, so creating an iterator never advances
    the global torch RNG (which would break exact resumption). With workers, OpenCV in this
    process is set to one thread first: its pthreads pool does not survive ``fork()``, and a
    worker forked from a process with a live multi-thread pool hangs when it resizes it.
    """
    if num_workers > 0:
        import cv2

        cv2.setNumThreads(1)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None,
        pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of ``model``'s parameters (names and bytes): equal on every DDP rank after a step.

    Buffers are left out: batch-norm running statistics legitimately differ between ranks after
    a forward pass (DDP re-broadcasts rank 0's at the start of the next one).
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _mode_uses(mode: str) -> tuple[bool, bool]:
    """(uses video, uses audio) of a model mode."""
    return mode != "audio", mode != "video"


def build_corruptors(cfg: Config, root: Path):
    """Train-time ``(visual, audio)`` corruptors of ``cfg`` (``None`` when disabled).

    Visual corruption (occluders from ``corruption.occluder_dir`` or the built-in bank, noise,
    blur) is on when the mode sees video and ``corruption.visual_prob > 0``; audio noise (babble
    from the training split's own utterances) when the mode hears audio and
    ``corruption.audio_noise_prob > 0``.
    """
    uses_video, uses_audio = _mode_uses(cfg.model.mode)
    visual = audio = None
    if uses_video and cfg.corruption.visual_prob > 0:
        from avsr.corruption.occluders import OccluderBank
        from avsr.corruption.visual import VisualCorruptor

        occ_dir = cfg.corruption.occluder_dir
        visual = VisualCorruptor(cfg.corruption, OccluderBank.from_dir(occ_dir) if occ_dir else OccluderBank.builtin())
    if uses_audio and cfg.corruption.audio_noise_prob > 0:
        from avsr.corruption.audio import AudioCorruptor, WaveBank

        audio = AudioCorruptor(cfg.corruption, WaveBank.from_manifest(root, cfg.data.train_split))
    return visual, audio


FUSION_WEIGHT = "encoder.fusion.0.weight"  # Linear(n_streams * C -> d_model) in front of the Conformer


def _start_from_single_modality(model: torch.nn.Module, source: dict, source_mode: str) -> dict:
    """State entries that make an audio-visual ``model`` (channel fusion: video columns ``[0, C)``,
    audio columns ``[C, 2C)``) start as the single-modality ``source`` model (a state dict of mode
    ``source_mode``) whenever the other stream is silent (zero features):

    - the fusion ``Linear(2C -> d)`` takes the source's ``Linear(C -> d)`` in that modality's
      columns and zeros in the other's (copying only the bias, as a shape-matching copy does,
      left a random projection in front of a pretrained Conformer);
    - reliability scorers start neutral: their last affine layer is zeroed, so every score is
      ``sigmoid(0) = 0.5`` and the scored features are ``1.5 f``; the copied columns are divided
      by 1.5 to match. The scorers learn from there (their last layer gets gradients at once).

    Empty when there is nothing to map (the shapes already agree, e.g. time fusion, or other modes).
    """
    own = model.state_dict()
    w, src = own.get(FUSION_WEIGHT), source.get(FUSION_WEIGHT)
    if w is None or src is None or source_mode not in ("audio", "video") or w.shape == src.shape:
        return {}
    c = src.shape[1]
    if w.shape != (src.shape[0], 2 * c):
        return {}
    out = {}
    scale = _neutral_score_scale(model)
    for name, scorer in getattr(unwrap(model).encoder, "scorers", {}).items():
        # the last affine layer before the sigmoid: a convolution, or the batch norm after it
        # (zeroing the norm's scale, not the conv, keeps its gradient finite)
        last = [(n, m) for n, m in scorer.named_modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.BatchNorm1d))][-1]
        for pname, p in last[1].named_parameters():
            out[f"encoder.scorers.{name}.{last[0]}.{pname}"] = torch.zeros_like(p)
    mapped = torch.zeros_like(w)
    start = c if source_mode == "audio" else 0
    mapped[:, start:start + c] = src / scale
    out[FUSION_WEIGHT] = mapped
    log.info("fusion: %s columns from the %s model, the other modality's zeroed%s", source_mode, source_mode,
             "; reliability scorers start neutral" if scale != 1.0 else "")
    return out


def _neutral_score_scale(model: torch.nn.Module) -> float:
    """How neutral reliability scorers (every score 0.5) scale the features: ``1 + 0.5``, or 1 without scorers."""
    return 1.5 if getattr(unwrap(model).encoder, "scorers", None) else 1.0


def _mix_in_visual_model(model: torch.nn.Module, visual: dict, share: float) -> dict:
    """State entries that blend the lip-reading model ``visual`` (a video-mode state dict) into an
    audio-visual ``model`` started from the audio model (:func:`_start_from_single_modality`):

    - every tensor both have outside the frontends and scorers (Conformer, CTC head, decoder, the
      fusion bias) becomes ``(1 - share) * own + share * visual``: a weight average ("model soup",
      Wortsman et al. 2022), sound here because the lip reader was fine-tuned from the audio model;
    - the channel fusion keeps the audio columns at ``1 - share`` of the audio model's projection
      and takes ``share`` of the lip reader's ``Linear(C -> d)`` into the video columns (divided by
      1.5 when neutral scorers scale the features), so both streams reach the Conformer from step 0.

    ``share`` 0 changes nothing, 1 makes the model the lip reader whenever the audio is silent.
    Measured on GRID s1 (docs/grid_recipe.md): 0.5 starts at 5.3% clean / 20.0% at babble 0 dB,
    against 3.3% / 89.3% for the audio model alone, before any audio-visual training.
    """
    own = model.state_dict()
    out = {}
    for key, w in own.items():
        v = visual.get(key)
        if (key == FUSION_WEIGHT or key.startswith((VISUAL_FRONTEND, AUDIO_FRONTEND, "encoder.scorers."))
                or v is None or v.shape != w.shape or not w.is_floating_point()):
            continue
        out[key] = (1 - share) * w + share * v.to(w.dtype)
    w, v = own[FUSION_WEIGHT], visual[FUSION_WEIGHT]
    if w.shape == v.shape:  # time fusion: one projection shared by both streams
        out[FUSION_WEIGHT] = (1 - share) * w + share * v
    else:
        c = v.shape[1]
        mixed = w.clone()
        mixed[:, c:] *= 1 - share
        mixed[:, :c] = share * v / _neutral_score_scale(model)
        out[FUSION_WEIGHT] = mixed
    return out


class Trainer:
    """Trains ``cfg`` on ``cfg.data.root``; see the module docstring.

    Args:
        cfg: the experiment (``train.exp_dir`` receives checkpoints, ``tb/`` and ``config.yaml``).
        env: where this process runs (:func:`avsr.training.distributed.init_distributed`).
        resume: ``None`` to start fresh; ``"auto"`` for the newest checkpoint of ``exp_dir``; or a
            checkpoint path. Raises ``FileNotFoundError`` when there is nothing to resume.
    """

    def __init__(self, cfg: Config, env: Optional[DistEnv] = None, resume: Optional[str] = None) -> None:
        self.cfg = cfg
        self.env = env or DistEnv()
        tcfg, dcfg = cfg.train, cfg.data
        if tcfg.accum_grad < 1:
            raise ValueError(f"train.accum_grad must be >= 1, got {tcfg.accum_grad}")
        if not 0 <= tcfg.average_last <= tcfg.keep_last:
            raise ValueError(f"train.average_last ({tcfg.average_last}) must be between 0 and train.keep_last "
                             f"({tcfg.keep_last}): only the kept step checkpoints can be averaged")
        if tcfg.init_visual_share and not tcfg.init_visual_from:
            raise ValueError("train.init_visual_share needs the lip-reading model in train.init_visual_from")
        if tcfg.init_visual_from and tcfg.init_visual_frontend:
            raise ValueError("train.init_visual_from and train.init_visual_frontend both set the visual frontend: "
                             "give one")
        self.exp_dir = Path(tcfg.exp_dir)
        self.amp_dtype = resolve_precision(tcfg.precision, self.env.device)
        seed_everything(cfg.seed)

        state = None
        if resume is not None:
            path = latest_checkpoint(self.exp_dir) if resume == "auto" else Path(resume)
            if path is None:
                raise FileNotFoundError(f"nothing to resume: no checkpoint in {self.exp_dir}")
            state = load_checkpoint(path)
            missing = [k for k in ("optimizer", "scheduler", "sampler", "rng", "trainer") if k not in state]
            if missing:
                raise CheckpointError(f"{path} cannot be resumed (no {', '.join(missing)}: an averaged or "
                                      "exported model?); start from its weights with train.init_from instead")
            self._warn_config_drift(state["config"])
            log.info("resuming from %s (step %d, epoch %d)", path, state["step"], state["epoch"])

        root = Path(dcfg.root)
        train_rows, val_rows = self._split_rows(root)
        init = load_checkpoint(tcfg.init_from) if state is None and tcfg.init_from else None
        if state is not None:
            self.tokenizer = tokenizer_from_state(state)
        elif init is not None and not cfg.text.model_path:
            # fine-tuning keeps the output symbols of the model it starts from (a new corpus, e.g.
            # 25 clips of another GRID speaker, may lack some characters and shift every id)
            self.tokenizer = tokenizer_from_state(init)
            log.info("tokenizer of %s (%d ids)", tcfg.init_from, self.tokenizer.vocab_size)
        else:
            self.tokenizer = self._build_tokenizer([r.transcript for r in train_rows])

        model = make_model(cfg.model, self.tokenizer.vocab_size)
        if state is None:
            if init is not None:
                self._init_weights(model, tcfg.init_from, ckpt=init)
            if tcfg.init_visual_from:
                self._init_weights(model, tcfg.init_visual_from, prefix=VISUAL_FRONTEND,
                                   share=tcfg.init_visual_share)
            if tcfg.init_visual_frontend or tcfg.init_audio_frontend:  # LRW models of Ma et al. (avsr.models.lrw)
                init_lrw_frontends(model, tcfg.init_visual_frontend, tcfg.init_audio_frontend)
        if tcfg.freeze:
            frozen = freeze_parts(model, tcfg.freeze)
            log.info("frozen: %s (%d parameters)", ", ".join(frozen), sum(
                p.numel() for p in model.parameters() if not p.requires_grad))
        self.model = wrap_model(model, self.env, tcfg.find_unused_parameters)
        torch.manual_seed(cfg.seed + self.env.rank)  # same weights everywhere, different dropout per rank
        self.optimizer = build_optimizer(unwrap(self.model), tcfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        visual, audio = build_corruptors(cfg, root)
        self.train_set = AVDataset(root, train_rows, self.tokenizer.encode, build_transform(dcfg, train=True),
                                   seed=cfg.seed, visual_corrupt=visual, audio_corrupt=audio,
                                   curriculum=dcfg.curriculum, max_frames=dcfg.max_frames)
        self.sampler = FrameBudgetSampler(
            self.train_set.lengths, dcfg.max_frames, dcfg.num_buckets, dcfg.max_clips, shuffle=True,
            seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
            curriculum=dcfg.curriculum, cuttable=self.train_set.cuttable)
        if dcfg.curriculum:
            log.info("length curriculum: %s (max clip frames x epochs), then clips up to %d frames; %d clip(s) "
                     "can be cut at word boundaries", ", ".join(f"{a} x {b}" for a, b in dcfg.curriculum),
                     dcfg.max_frames, sum(self.train_set.cuttable))
        pin = self.env.device.type == "cuda"
        self.loader = make_loader(self.train_set, self.sampler, dcfg.num_workers, cfg.seed, pin)
        self.val_loader = self._val_loader(root, val_rows, pin) if val_rows else None

        total = sum(math.ceil(self.sampler.batches_per_epoch(e) / tcfg.accum_grad) for e in range(tcfg.epochs))
        self.total_steps = min(total, tcfg.max_steps) if tcfg.max_steps else total
        self.scheduler = build_scheduler(self.optimizer, tcfg, self.total_steps)

        self.step = self.epoch = 0
        self.best_wer = math.inf
        self.nonfinite = 0
        self._start_batch = 0
        self._last_eval = -1
        self.manager = CheckpointManager(self.exp_dir, tcfg.keep_last) if self.env.is_main else None
        self.monitor = Monitor(self.exp_dir / "tb", enabled=self.env.is_main)
        if self.env.is_main:
            self.manager.remove_partial()
            save_config(cfg, self.exp_dir / "config.yaml")
        if state is not None:
            self._load_state(state)
        log.info("training %s (%s): %d parameters, %d train clips, %d steps planned, device %s, %d rank(s)",
                 cfg.model.mode, dcfg.name or dcfg.root, sum(p.numel() for p in model.parameters()),
                 len(self.train_set), self.total_steps, self.env.device, self.env.world_size)

    # ----------------------------------------------------------------- setup helpers
    def _build_tokenizer(self, transcripts: list[str]):
        from avsr.text import build_tokenizer, from_bytes

        data = build_tokenizer(self.cfg.text, transcripts).to_bytes() if self.env.is_main else None
        return from_bytes(broadcast_object(data, self.env))

    def _init_weights(self, model: torch.nn.Module, path: str, prefix: str = "", ckpt: Optional[dict] = None,
                      share: float = 0.0) -> None:
        """Copy the weights of checkpoint ``path`` (``ckpt`` when already read) whose names (starting
        with ``prefix``) and shapes match ``model``'s. With a ``prefix``, all of the model's tensors
        under it must fit, else ``ValueError`` (a part copied only in places would be a silently
        different network). ``share`` > 0 (``train.init_visual_share``, with the visual frontend's
        prefix) also blends the lip-reading model in (:func:`_mix_in_visual_model`); ``ValueError``
        when ``share`` is outside [0, 1] or the model or ``path`` is not of the modes that needs."""
        ckpt = ckpt if ckpt is not None else load_checkpoint(path)
        source = ckpt["model"]
        if share:
            source_mode = ckpt["config"]["model"]["mode"]
            if not 0.0 < share <= 1.0 or self.cfg.model.mode not in ("audiovisual", "audiovisual_relscore") \
                    or source_mode != "video" or not self.cfg.train.init_from:
                raise ValueError(f"train.init_visual_share={share} needs a value in [0, 1], an audio-visual model "
                                 f"started from train.init_from, and a lip-reading (video) init_visual_from model; "
                                 f"got mode {self.cfg.model.mode} and a {source_mode} model in {path}")
            model.load_state_dict(_mix_in_visual_model(model, source, share), strict=False)
            log.info("blended %.2f of the lip-reading model %s into the shared parts and the fusion", share, path)
        own = model.state_dict()
        usable = {k: v for k, v in source.items()
                  if k.startswith(prefix) and k in own and own[k].shape == v.shape}
        if not prefix:
            usable.update(_start_from_single_modality(model, source, ckpt["config"]["model"]["mode"]))
        wanted = [k for k in own if k.startswith(prefix)] if prefix else []
        if prefix and (not wanted or len(usable) < len(wanted)):
            raise ValueError(f"{path}: only {len(usable)} of the {len(wanted)} tensors under '{prefix}' of this "
                             f"model (mode {self.cfg.model.mode}) fit; is it a model with the same {prefix[:-1]}?")
        model.load_state_dict(usable, strict=False)
        log.info("initialised %d of %d tensors from %s (%d in the checkpoint did not fit)",
                 len(usable), len(own), path, sum(k not in usable for k in source))

    def _split_rows(self, root: Path) -> tuple[list, list]:
        """Train and validation rows: ``<val_split>.tsv``, else ``val_holdout`` train clips (of the last
        split of a ``+``-joined ``train_split``: LRS3's trainval, not its long pretrain clips), else none."""
        dcfg = self.cfg.data
        train_rows = read_manifest(root, dcfg.train_split)
        val_path = manifest_path(root, dcfg.val_split)
        if val_path.is_file():
            return train_rows, read_manifest(root, dcfg.val_split)
        if dcfg.val_holdout > 0:
            last = dcfg.train_split.split("+")[-1] + "/" if "+" in dcfg.train_split else ""
            pool = [r for r in train_rows if r.utt_id.startswith(last)]
            _, val_rows = hold_out(pool, dcfg.val_holdout, self.cfg.seed)
            held = {r.utt_id for r in val_rows}
            train_rows = [r for r in train_rows if r.utt_id not in held]
            log.info("no %s: validating on %d held-out training clips", val_path, len(val_rows))
            return train_rows, val_rows
        log.warning("no validation manifest %s and data.val_holdout=0: validation is off", val_path)
        return train_rows, []

    def _val_loader(self, root: Path, rows: list, pin: bool) -> DataLoader:
        dcfg = self.cfg.data
        dataset = AVDataset(root, rows, self.tokenizer.encode, build_transform(dcfg, train=False), seed=self.cfg.seed)
        sampler = FrameBudgetSampler(dataset.lengths, dcfg.max_frames, dcfg.num_buckets, dcfg.max_clips,
                                     shuffle=False, rank=self.env.rank, world_size=self.env.world_size,
                                     drop_uneven=False)
        return make_loader(dataset, sampler, dcfg.num_workers, self.cfg.seed, pin)

    def _warn_config_drift(self, saved: dict) -> None:
        now = to_dict(self.cfg)
        changed = [f"{s}.{k}" for s, sec in now.items() if isinstance(sec, dict)
                   for k, v in sec.items() if saved.get(s, {}).get(k, v) != v]
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))

    # ----------------------------------------------------------------- state
    def _gather(self, obj):
        """Every rank's ``obj``, in rank order."""
        if not self.env.distributed:
            return [obj]
        out: list = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def _state(self, batches_done: int) -> dict:
        """Checkpoint dict; a collective under DDP (every rank must call it)."""
        return {
            "format": 1,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "config": to_dict(self.cfg),
            "tokenizer": tokenizer_to_tensor(self.tokenizer),
            "step": self.step,
            "epoch": self.epoch,
            "sampler": self.sampler.state_dict(batches_done),
            "rng": self._gather(rng_state()),
            "trainer": {"best_wer": self.best_wer, "nonfinite": self.nonfinite, "last_eval": self._last_eval,
                        "param_digests": self._gather(param_digest(unwrap(self.model)))},
        }

    def _load_state(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.sampler.load_state_dict(state["sampler"])
        self._start_batch = int(state["sampler"]["batches_done"])
        self.best_wer = float(state["trainer"]["best_wer"])
        self.nonfinite = int(state["trainer"]["nonfinite"])
        self._last_eval = int(state["trainer"]["last_eval"])
        set_rng_state(state["rng"][self.env.rank])  # same world size: the sampler state checked it

    def _save(self, batches_done: int, val: Optional[ValResult], periodic: bool = True) -> None:
        """Write ``step-<N>.pt`` (``periodic``) and/or ``best.pt`` (``val`` improved the best WER)."""
        improved = val is not None and val.wer < self.best_wer
        if improved:
            self.best_wer = val.wer
        if not periodic and not improved:
            return
        state = self._state(batches_done)
        if self.env.is_main:
            if periodic:
                path = self.manager.save(state, self.step)
                if improved:
                    self.manager.mark_best(path)
            else:
                save_checkpoint(state, self.exp_dir / "best.pt")
            if improved:
                log.info("new best validation WER %.2f%% at step %d", 100 * val.wer, self.step)
        barrier(self.env)

    # ----------------------------------------------------------------- steps
    def _autocast(self):
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _all_have(self, batch: Optional[Batch]) -> bool:
        """Whether every rank has a batch (a rank whose clips were all unreadable has ``None``)."""
        have = 1.0 if batch is not None else 0.0
        return all_reduce_sum([have], self.env)[0] == self.env.world_size

    def _micro_step(self, batch: Batch, sync: bool) -> tuple:
        """Forward and backward one batch (gradients summed into ``.grad``); returns the output."""
        ctx = self.model.no_sync() if self.env.distributed and not sync else contextlib.nullcontext()
        with ctx:
            with self._autocast():
                out = self.model(batch)
            loss = out.loss / self.cfg.train.accum_grad
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return out

    def _all_reduce_grads(self) -> None:
        """Average accumulated gradients over ranks by hand: DDP skipped it because the group's
        last batch was unreadable on some rank (its earlier batches ran under ``no_sync``)."""
        for p in unwrap(self.model).parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.env.world_size

    def _optimizer_step(self, loss_finite: bool) -> tuple[bool, float]:
        """Clip, check and apply the accumulated gradient; ``(applied, grad norm)``."""
        tcfg = self.cfg.train
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        bad = all_reduce_sum([0.0 if loss_finite else 1.0], self.env)[0] > 0
        if self.scaler is not None and not bad:
            # fp16: an overflowing gradient is routine; the scaler skips the step and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return True, norm
        bad = bad or not math.isfinite(norm)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            self.nonfinite += 1
            log.warning("non-finite loss or gradient at step %d (%d in a row): step skipped", self.step + 1, self.nonfinite)
            if self.nonfinite >= tcfg.max_nonfinite:
                raise NonFiniteLossError(
                    f"the loss or gradient was not finite for {self.nonfinite} steps in a row (step {self.step + 1}); "
                    f"lower train.lr, raise train.warmup_steps, use train.precision=fp32, or check the data")
            return False, norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.nonfinite = 0
        return True, norm

    def _validate(self) -> Optional[ValResult]:
        if self.val_loader is None:
            return None
        val = validate(unwrap(self.model), guard_workers(self.val_loader, "validation"), self.tokenizer, self.env,
                       self.amp_dtype)
        self._last_eval = self.step
        log.info("step %d validation: loss %.4f, WER %.2f%% (%d utterances)", self.step, val.loss, 100 * val.wer, val.utterances)
        self.monitor.scalars("val", {"loss": val.loss, "wer": val.wer}, self.step)
        return val

    def _done(self) -> bool:
        return self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps

    # ----------------------------------------------------------------- loop
    def fit(self) -> Path:
        """Train until ``train.epochs`` epochs or ``train.max_steps`` steps; the path of the model it
        ends with: ``average.pt`` with ``train.average_last > 1``, else the last checkpoint."""
        tcfg = self.cfg.train
        self.model.train()
        try:
            while self.epoch < tcfg.epochs and not self._done():
                if self._start_batch == 0:
                    self.sampler.set_epoch(self.epoch)
                self._run_epoch()
                if self._done():
                    break
                self.epoch += 1
                self.sampler.set_epoch(self.epoch)
                last = self.epoch >= tcfg.epochs
                val = self._validate() if last and self._last_eval != self.step else None
                self._save(0, val, periodic=tcfg.save_epoch_end or last)
            if tcfg.average_last > 1:
                return self._write_average(tcfg.average_last)
        finally:
            self.monitor.close()
        return self.exp_dir / "last.pt"

    def _write_average(self, n: int) -> Path:
        """``average.pt``: the element-wise mean of the newest ``n`` step checkpoints (model averaging
        as in icefall and ESPnet; :func:`~avsr.training.averaging.average_checkpoints`), validated and
        logged. The training model ends holding the averaged weights."""
        path = self.exp_dir / "average.pt"
        if self.env.is_main:
            found = [p for _, p in step_checkpoints(self.exp_dir)][-n:]
            save_checkpoint(average_checkpoints(found), path)
            log.info("wrote %s: the mean of %s", path, ", ".join(p.name for p in found))
        barrier(self.env)
        unwrap(self.model).load_state_dict(load_checkpoint(path)["model"])
        val = self._validate()
        if val is not None:
            log.info("averaged model: validation WER %.2f%% (best single checkpoint %.2f%%)", 100 * val.wer,
                     100 * self.best_wer)
        return path

    def _run_epoch(self) -> None:
        tcfg = self.cfg.train
        n_batches = self.sampler.batches_per_epoch(self.epoch)
        done = self._start_batch
        self._start_batch = 0
        bar = tqdm(total=n_batches, initial=done, desc=f"epoch {self.epoch}", unit="batch",
                   disable=not self.env.is_main, dynamic_ncols=True, leave=False)
        meter = _Meter()
        micro_in_group, loss_finite = 0, True
        last = None  # (batch, output) of the latest micro-batch, for the tensorboard images
        for batch in guard_workers(self.loader, "training"):
            end_of_group = (done + 1) % tcfg.accum_grad == 0 or done + 1 == n_batches
            synced = False
            if self._all_have(batch):
                batch = batch.to(self.env.device, non_blocking=True)
                out = self._micro_step(batch, sync=end_of_group)
                synced = end_of_group
                loss_finite &= bool(torch.isfinite(out.loss.detach()))
                meter.add(out, int(batch.video_lengths.sum()))
                micro_in_group += 1
                last = (batch, out)
            done += 1
            bar.update(1)
            if not end_of_group or micro_in_group == 0:
                continue
            if self.env.distributed and not synced:
                self._all_reduce_grads()
            applied, norm = self._optimizer_step(loss_finite)
            micro_in_group, loss_finite = 0, True
            if not applied:
                continue
            self.step += 1
            if self.step % tcfg.log_step == 0:
                self._log_train(meter, norm, bar)
            paused = time.perf_counter()
            self._after_step(done, end_of_epoch=done == n_batches, last=last)
            meter.pause(time.perf_counter() - paused)  # frames/s counts training time only
            if self._done():
                break
        bar.close()

    def _log_train(self, meter: "_Meter", grad_norm: float, bar) -> None:
        stats = {**meter.means(), "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                 "frames_per_s": meter.frames_per_s() * self.env.world_size}
        self.monitor.scalars("train", stats, self.step)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}")
        log.info("epoch %d step %d: %s", self.epoch, self.step, ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        meter.reset()

    def _after_step(self, batches_done: int, end_of_epoch: bool, last) -> None:
        """Validation, images and checkpoints due after optimiser step ``self.step``."""
        tcfg, dcfg = self.cfg.train, self.cfg.data
        val = None
        if self.step % tcfg.eval_step == 0:
            val = self._validate()
            if last is not None:
                batch, out = last
                self.monitor.images(batch, out.reliability, out.enc_lengths, self.step, dcfg.video_mean, dcfg.video_std)
        # the epoch-end checkpoint (written by fit) covers a periodic one due on the last batch
        periodic = self.step % tcfg.save_step == 0 and not (end_of_epoch and tcfg.save_epoch_end)
        if self._done():
            if val is None and self._last_eval != self.step:
                val = self._validate()
            periodic = True
        self._save(batches_done, val, periodic=periodic)


class _Meter:
    """Sums of the loss terms and frames between two log lines, and the training time they took."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = self.frames = 0
        self.t0 = time.perf_counter()

    def add(self, out, frames: int) -> None:
        for k, v in {"loss": out.loss, **out.losses}.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.as_tensor(v).detach().float()
        self.count += 1
        self.frames += frames

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` (validation, checkpointing) out of the training time."""
        self.t0 += seconds

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(1, self.count) for k, v in self.sums.items()}

    def frames_per_s(self) -> float:
        return self.frames / max(time.perf_counter() - self.t0, 1e-9)
