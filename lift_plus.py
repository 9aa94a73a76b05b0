"""LIFT+ (Shi, Wei, Li, arXiv 2504.13282) in one file. Heavy fine-tuning of a foundation model on long-tailed data
makes the train and test class-conditional feature distributions of the tail classes disagree, which biases
predictions toward the head classes (Proposition 3.1). LIFT+ keeps CLIP frozen and tunes < 1 % of its parameters:

    frozen CLIP ViT + AdaptFormer in every block          [paper: lightweight fine-tuning]
                    + cosine classifier from text prompts [paper: semantic-aware initialization]
                    + logit-adjusted cross-entropy        [paper: Proposition 3.1 and its remark]
                    + minimalist data augmentation (MDA)  [paper: minimalist data augmentation]
                    + test-time ensembling of five crops  [paper: test-time ensembling]

Part I is the method in running order; "# Appendix X" calls lead to A baselines and the table, B benchmark files and
CLIP weights, C the offline worlds, D speed, E your own image folders. Part II runs a job, its flags checked.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def interrupted_while_starting(signum, frame):
    """Ctrl-C while torch loads (seconds) ends in one line too, as in every later phase (main)."""
    print("\ninterrupted while starting: nothing to resume", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_starting)

import numpy as np  # noqa: E402 (below the guard)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

# ==========================================================================================
# PART I. LIFT+, in the order it runs
# 1. Config: the paper's hyper-parameters, then the sizes of the baselines, then the settings of a run


def arg(default, help: str, choices: str = "", **bounds):
    """A config field with its doc (also its --help text), its choices (one string) or bounds (check_flags)."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices.split()), **bounds})


TUNINGS = "adaptformer classifier full partial bitfit vpt adapter lora mask zeroshot"  # LIFT+, Appendix A's baselines


@dataclass(frozen=True)
class Config:
    # the method [paper: the LIFT+ framework]; None: a default that depends on other fields (finalize_config)
    tuning: str = arg("adaptformer", "what trains: LIFT+'s AdaptFormer, or a baseline of Appendix A", TUNINGS)
    adapter_dim: int | None = arg(None, "AdaptFormer / Adapter bottleneck r (default 2**floor(log2(K / 2L)))", low=1)
    init: str = arg("semantic", "classifier init (others: Appendix A)", "semantic class_mean linear_probe none")
    prompt: str = arg("a photo of a {}.", "prompt template of the semantic init and zero-shot; {} is the class name")
    logit_scale: float = arg(25.0, "cosine classifier scale s: logit_j = s * cos(f, w_j)", low=0, open_low=True)
    loss: str = arg("la", "la (logit-adjusted cross-entropy) | ce", "la ce")
    tau: float = arg(1.0, "logit-adjustment strength tau", low=0)
    epochs: int | None = arg(None, "training epochs (default 5; 15 for inat2018 and shapes_lt)", low=1)
    batch_size: int = arg(128, "images per optimiser step", low=1)
    lr: float | None = arg(None, "SGD lr (0.02; classifier 0.03; full 0.001, places_lt 0.002)", low=0, open_low=1)
    momentum: float = arg(0.9, "SGD momentum", low=0, high=1, open_high=True)
    weight_decay: float = arg(5e-4, "SGD weight decay on every tuned parameter", low=0)
    mda: str = arg("convex", "MDA schedule of the smallest crop area", "convex linear concave min max")
    min_scale: float = arg(0.08, "smallest crop area fraction of MDA (first epoch)", low=0, high=1, open_low=True)
    tte: bool = arg(True, "test-time ensembling: resize to S + expand, average the logits of five S crops")
    expand: int | None = arg(None, "TTE: shorter side to S + expand (default round(24 S / 224): 248 at 224)", low=0)
    model: str = arg("ViT-B-16", "open_clip ViT name (ViT-B/16 spelling accepted) or an open_clip model-config JSON")
    pretrained: str = arg("openai", "open_clip pretrained tag, a local weights file, or 'none' for random weights")
    quick_gelu: str = arg("auto", "QuickGELU (OpenAI's CLIP uses it; auto follows the weights)", "auto yes no")
    # sizes of the baselines (Appendix A); each is refused for a method without that part
    blocks: str | None = arg(None, "vision blocks the method acts on, e.g. '0-11' or '8,9,10,11' (default: all)")
    partial_blocks: int = arg(1, "partial: number of last vision blocks to tune", low=0)
    lora_rank: int | None = arg(None, "lora: rank on q and v (default 2**floor(log2(K / 4L)), >= 1)", low=1)
    vpt_len: int | None = arg(None, "vpt: deep prompt length per block (default 2**floor(log2(K / L)), >= 1)", low=1)
    mask_ratio: float = arg(0.005, "mask: share of each block weight tuned", low=0, high=1, open_low=True)
    # the run
    data: str = arg("imagenet_lt", "imagenet_lt places_lt inat2018 cifar100_ir{100,50,10} shapes_lt* or a folder")
    root: str = arg("./data", "dataset root: split-list paths are relative to it; CIFAR-100 is downloaded here")
    splits: str | None = arg(None, "folder holding the split lists (default: --root, then the cache, then download)")
    inat_level: str = arg("species", "inat2018: label taxonomy", "kingdom phylum class order family genus species")
    cache: str = arg(os.environ.get("LIFT_PLUS_CACHE", "~/.cache/lift_plus"), "lists, the world ($LIFT_PLUS_CACHE)")
    out: str = arg("runs", "parent folder of run folders")
    run_name: str | None = arg(None, "run folder name (default <data>_<tuning>_seed<seed>)")
    resume: str = arg("no", "continue from the run folder's checkpoint: yes (--resume), or auto: if any", "no yes auto")
    save_every: float = arg(10.0, "minutes between checkpoints within an epoch (0: at epoch ends only)", low=0)
    eval_split: str = arg("test", "test, or val (worlds, ImageNet-LT, Places-LT): to choose settings", "test val")
    eval_only: bool = arg(False, "no training: evaluate --checkpoint (or the untrained model of --tuning zeroshot)")
    checkpoint: str | None = arg(None, "checkpoint file to evaluate with --eval-only")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    amp: str = arg("auto", "mixed precision on GPUs (auto: bf16 where supported, else fp16)", "auto bf16 fp16 off")
    accum_steps: int = arg(1, "micro-batches per optimiser step (gradient accumulation); divides --batch-size", low=1)
    eval_batch_size: int = arg(128, "images per evaluation batch (TTE runs five crops of each)", low=1)
    workers: int | None = arg(None, "DataLoader worker processes (default min(8, CPUs); 0 for shapes_lt)", low=0)
    fast: bool = arg(True, "Appendix D: class-token-only last block and a leaner QuickGELU (same values)")
    cache_features: bool = arg(False, "Appendix D, --tuning classifier: frozen features of centre views, once (no MDA)")
    gpu_decode: bool = arg(
        False, "Appendix D: on a GPU, decode, crop and resize JPEGs there (nvJPEG; not yet measured)"
    )
    compile: bool = arg(False, "Appendix D: torch.compile the model's forward and backward before training starts")
    seed: int = arg(0, "seed of the model init, the data order and the crops", low=0, high=2**31 - 1)
    log_every: int = arg(50, "refresh the progress bar every this many optimiser steps", low=1)
    check: bool = arg(False, "check every input, the weights and the run folder, print the summary and exit (seconds)")


class LiftError(Exception):
    """Bad input: the message names the flag or file and what was expected; main prints it as one line."""


# 2. Data: the long-tailed benchmarks [paper: experiments]


@dataclass
class LTData:
    """A long-tailed task: training and test sets, class names, per-class training counts."""

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classnames: list
    train_counts: np.ndarray  # [K] training images per class
    notes: list = field(default_factory=list)  # what listing the images skipped (Appendix E's folders)
    val: torch.utils.data.Dataset | None = None  # a validation split (worlds, ImageNet-LT, Places-LT)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


class ImageSet(torch.utils.data.Dataset):
    """Labelled images: file paths read lazily (Appendix E's read_image), or a uint8 array [N, H, W, 3] in memory."""

    def __init__(self, images, labels):
        self.images, self.labels = images, list(labels)

    def __len__(self):
        return len(self.labels)

    def load(self, i) -> torch.Tensor:  # -> RGB uint8 [3, H, W]
        if isinstance(self.images, np.ndarray):
            return torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return read_image(self.images[i])


BENCHMARKS, CIFAR100_LT = ("imagenet_lt", "places_lt", "inat2018"), ("cifar100_ir100", "cifar100_ir50", "cifar100_ir10")
WORLDS = ("shapes_lt", "shapes_lt_wide", *(f"shapes_lt_dial{i}" for i in range(5)))  # specs: prepare.py's WORLDS


def build_data(cfg: Config) -> LTData:
    """The task --data names: ImageNet-LT, Places-LT, iNaturalist 2018, CIFAR-100-LT, the world, or your folder."""
    if cfg.data in BENCHMARKS:
        return build_benchmark(cfg)  # Appendix B: the split lists and class names, local or downloaded
    if cfg.data in CIFAR100_LT:
        return build_cifar100_lt(cfg)  # Appendix B: CIFAR-100, made long-tailed
    if cfg.data in WORLDS:
        return build_world_task(cfg)  # Appendix C: the offline world
    return build_folder(cfg)  # Appendix E: your own image folders


# 3. Transforms: [paper: minimalist data augmentation] for training, [paper: test-time ensembling]
#    Images stay uint8 up to the device (the model normalises them); a transform returns views [V, 3, S, S].

MDA_FUNCTIONS = {  # g(t): how fast the smallest crop area rises from min_scale (g = 0) to 1 (g = 1)
    "min": lambda t: 0.0,
    "max": lambda t: 1.0,
    "linear": lambda t: t,
    "convex": lambda t: 1.0 - math.sqrt(1.0 - t * t),
    "concave": lambda t: math.sqrt(1.0 - (1.0 - t) ** 2),
}


def mda_min_scale(epoch: int, epochs: int, schedule: str = "convex", min_scale: float = 0.08) -> float:
    """Smallest crop area fraction at `epoch` (0-based): min_scale + g(t) (1 - min_scale), t = e / (E - 1).
    A single epoch is the first epoch, so it gets the first epoch's range (t = 0)."""
    t = epoch / (epochs - 1) if epochs > 1 else 0.0
    return min_scale + MDA_FUNCTIONS[schedule](t) * (1.0 - min_scale)


def mda_crop_box(height: int, width: int, min_scale: float, gen: torch.Generator):
    """A random square (top, left, side): area fraction uniform in [min_scale, 1], capped at min(H, W)^2 / (H W)."""
    area, cap = height * width, min(height, width) ** 2 / (height * width)
    lo, hi = min(min_scale, cap), min(1.0, cap)
    target = area * (lo + (hi - lo) * torch.rand(1, generator=gen).item())
    side = min(round(math.sqrt(target)), height, width)
    top = int(torch.randint(0, height - side + 1, (1,), generator=gen))
    left = int(torch.randint(0, width - side + 1, (1,), generator=gen))
    return top, left, side


def resize_bicubic(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of [3, H, W]: uint8 as PIL's BICUBIC filter, within one intensity level (float on
    the GPU path of Appendix D, whose caller rounds)."""
    img = img[None].contiguous(memory_format=torch.channels_last)  # torch's uint8 kernel is fastest on this layout
    return F.interpolate(img, size=(height, width), mode="bicubic", antialias=True)[0]  # [3, height, width] uint8


class MDATransform:
    """[paper: minimalist data augmentation] One square random crop resized to S; no flip, no colour. Image i's
    crop at epoch e is seeded by (seed, e, i): the same for any number of workers or processes, and on resume."""

    def __init__(self, size: int, epochs: int, schedule: str, min_scale: float, seed: int):
        self.size, self.epochs, self.schedule, self.min_scale, self.seed = size, epochs, schedule, min_scale, seed
        self.epoch = 0

    def box(self, height: int, width: int, index: int) -> tuple:  # image `index`'s crop (top, left, side) this epoch
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 100_000_007 + index) & (2**63 - 1))
        return mda_crop_box(height, width, mda_min_scale(self.epoch, self.epochs, self.schedule, self.min_scale), gen)

    def __call__(self, img: torch.Tensor, index: int) -> torch.Tensor:
        top, left, side = self.box(img.shape[1], img.shape[2], index)
        return resize_bicubic(img[:, top : top + side, left : left + side], self.size, self.size)[None]  # [1, 3, S, S]


class EvalTransform:
    """Shorter side to `resize` (as torchvision's Resize), the centre S crop; with five_crops [paper: test-time
    ensembling] the four corners and the centre (torchvision's FiveCrop)."""

    def __init__(self, size: int, resize: int, five_crops: bool):
        self.size, self.resize, self.five_crops = size, resize, five_crops

    def boxes(self, height: int, width: int) -> tuple:  # the resize (h, w) and the top-left corners of the views
        S, r = self.size, self.resize
        h, w = (r, int(r * width / height)) if height <= width else (int(r * height / width), r)
        corners = [(round((h - S) / 2.0), round((w - S) / 2.0))]  # torchvision's centre crop
        if self.five_crops:
            corners = [(0, 0), (0, w - S), (h - S, 0), (h - S, w - S), *corners]
        return (h, w), corners

    def __call__(self, img: torch.Tensor, index: int = 0) -> torch.Tensor:
        (h, w), corners = self.boxes(img.shape[1], img.shape[2])
        img, S = resize_bicubic(img, h, w), self.size  # [3, h, w]
        return torch.stack([img[:, y : y + S, x : x + S] for y, x in corners])  # [5 or 1, 3, S, S]


def test_views(cfg: Config, S: int) -> EvalTransform:
    """With TTE five crops of the resize to S + expand (224 + 24 = 248), else the centre of S + S // 7 (256)."""
    return EvalTransform(S, S + cfg.expand, True) if cfg.tte else EvalTransform(S, S + S // 7, False)


class Views(torch.utils.data.Dataset):
    """A dataset seen through a transform: item i is (uint8 views [V, 3, S, S], label)."""

    def __init__(self, base, transform, indices=None):
        self.base, self.transform = base, transform
        self.indices = np.arange(len(base)) if indices is None else np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        return self.transform(self.base.load(j), j), self.base.labels[j]


# 4. Model: AdaptFormer in a frozen CLIP ViT [paper: lightweight fine-tuning], and a cosine
#    classifier initialised from text prompts [paper: semantic-aware initialization]


class AdaptFormer(nn.Module):
    """LIFT+'s lightweight module [paper: lightweight fine-tuning]: a bottleneck beside the MLP of a block,
    reading the residual stream h after attention, with a learnable scale s (init 1):
        h = x + Attn(LN1(x));   out = h + MLP(LN2(h)) + s * Up(ReLU(Down(LN_a(h))))
    Up is zero-initialised, so training starts exactly at CLIP."""

    def __init__(self, dim: int, r: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)  # LN_a, the adapter's own LayerNorm
        self.down = nn.Linear(dim, r)  # D -> r, kaiming-uniform weight (nn.Linear's)
        self.up = nn.Linear(r, dim)  # r -> D
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(()))  # s

    def forward(self, h):  # [B, N, D] -> [B, N, D]
        return self.scale * self.up(F.relu(self.down(self.ln(h))))


class LiftViT(nn.Module):
    """CLIP's image tower run block by block with open_clip's own attention and MLP, plus AdaptFormer.
    Returns the class token after the final LayerNorm, BEFORE CLIP's image projection."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.adaptformer = nn.ModuleDict()  # block index -> AdaptFormer
        self.width = visual.class_embedding.shape[0]  # D

    def forward(self, x):  # x: [B, 3, S, S], normalised
        v = self.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)  # [B, N-1, D] patch tokens
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))  # [B, N, D]
        for i, blk in enumerate(v.transformer.resblocks):
            x = self.block(i, blk, x)
        return v.ln_post(x[:, 0])  # [B, D]

    def block(self, i: int, blk, x):
        h = x + blk.ls_1(blk.attention(blk.ln_1(x)))  # h = x + Attn(LN1(x))
        return h + self.mlp_branch(i, blk, h)

    def mlp_branch(self, i: int, blk, h):
        m = blk.ls_2(blk.mlp(blk.ln_2(h)))  # MLP(LN2(h))
        if str(i) in self.adaptformer:
            m = m + self.adaptformer[str(i)](h)  # + s * Up(ReLU(Down(LN_a(h))))
        return m


class CosineClassifier(nn.Module):
    """logit_j = s * <f / |f|, w_j / |w_j|>, no bias, s = 25 [paper: semantic-aware initialization]."""

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.clone().float())  # [K, D]
        self.scale = scale

    def forward(self, f):  # f: [B, D] -> [B, K]
        return self.scale * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).t()


class LiftModel(nn.Module):
    """uint8 images -> CLIP's normalisation -> LiftViT feature -> cosine classifier."""

    def __init__(self, visual, mean, std, num_classes: int, scale: float, zeroshot: bool = False):
        super().__init__()
        self.encoder = LiftViT(visual)
        self.encoder_params = sum(p.numel() for p in visual.parameters())  # CLIP's own, before a method attaches
        self.image_size = int(np.atleast_1d(visual.image_size)[0])  # S
        self.zeroshot = zeroshot  # zero-shot CLIP: the projected feature against the text features
        width = visual.output_dim if zeroshot else self.encoder.width
        self.head = CosineClassifier(torch.zeros(num_classes, width), scale)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.sizes, self.train_loss = {}, []  # the method's sizes (configure_tuning), its losses (Part II)

    def features(self, images):  # images: [B, 3, S, S] uint8 -> [B, D]
        f = self.encoder((images.float() - self.mean) / self.std)
        return f @ self.encoder.visual.proj if self.zeroshot else f  # zero-shot: CLIP's projection, [B, E]

    def forward(self, images):
        return self.head(self.features(images))  # [B, K]


@torch.no_grad()
def text_features(clip, tokenizer, classnames, template: str, device) -> torch.Tensor:
    """normalize(text_projection(text_encoder("a photo of a {name}."))) per class: [K, E]."""
    prompts = [template.format(c.replace("_", " ")) for c in classnames]
    chunks = [tokenizer(prompts[i : i + 1000]).to(device) for i in range(0, len(prompts), 1000)]
    return torch.cat([clip.encode_text(t, normalize=True).float() for t in chunks])


def semantic_init(text_feats: torch.Tensor, image_proj: torch.Tensor) -> torch.Tensor:
    """[paper: semantic-aware initialization] w_j = normalize(t_j @ P^T): cos(f, w_j) is CLIP's image-text score times
    |f P| / |f| (one factor per image) and 1 / |P t_j| (per class), so training starts close to zero-shot CLIP."""
    return F.normalize(text_feats @ image_proj.t().float(), dim=-1)  # [K, E] @ [E, D] -> [K, D]


def size_rule(num_classes: int, num_blocks: int, divisor: int) -> int:
    """2 ** max(0, floor(log2(K / (divisor L)))): AdaptFormer's r (2: 32 on ImageNet-LT), LoRA's (4), VPT's (1)."""
    return 2 ** max(0, math.floor(math.log2(num_classes / (divisor * num_blocks))))


def configure_tuning(model: LiftModel, cfg: Config, num_classes: int):
    """Freeze CLIP, then attach AdaptFormer to every block (LIFT+) or set up a baseline; the classifier trains."""
    enc = model.encoder
    model.requires_grad_(False)
    blocks = block_indices(cfg, len(enc.visual.transformer.resblocks))  # Appendix A: --blocks; default all
    if cfg.tuning == "adaptformer":
        r = cfg.adapter_dim or size_rule(num_classes, len(blocks), 2)
        enc.adaptformer.update({str(i): AdaptFormer(enc.width, r) for i in blocks})
        sizes = {"r": r}
    else:
        sizes = configure_baseline(model, cfg, blocks, num_classes)  # Appendix A: the paper's baselines
    model.head.weight.requires_grad_(cfg.tuning != "zeroshot")
    model.sizes = {"tuning": cfg.tuning, "blocks": blocks, **sizes}


def build_model(cfg: Config, data: LTData, device) -> LiftModel:
    """Frozen CLIP ViT (OpenAI's weights, their QuickGELU) -> LiftModel, its method attached, its classifier set."""
    torch.manual_seed(cfg.seed)
    clip, mean, std, tokenizer = load_clip(cfg)  # Appendix B: a tag, a file or OpenAI's own (E: a ViT, or refused)
    model = LiftModel(clip.to(device).visual, mean, std, data.num_classes, cfg.logit_scale, cfg.tuning == "zeroshot")
    configure_tuning(model, cfg, data.num_classes)
    model.to(device)
    if cfg.init != "semantic":
        w = baseline_init(model, data, cfg, device)  # Appendix A: class means, a linear probe, random
    elif model.zeroshot:
        w = text_features(clip, tokenizer, data.classnames, cfg.prompt, device)  # [K, E]
    else:
        w = semantic_init(text_features(clip, tokenizer, data.classnames, cfg.prompt, device), clip.visual.proj)
    with torch.no_grad():
        model.head.weight.copy_(w)
    return model  # CLIP's text tower is not needed any more


# 5. Loss: logit-adjusted cross-entropy [paper: Proposition 3.1 and its remark; Menon et al., 2021]


def logit_adjusted_loss(logits, labels, log_prior, tau: float = 1.0, reduction: str = "mean"):
    """CE(z + tau * log pi, y), pi_j = n_j / N from the training counts; training only (the test uses raw
    logits). Bayes-consistent for a balanced test set when the class conditionals of train and test agree
    (zeta = 1, a sufficient condition), which lightweight tuning preserves (Proposition 3.1)."""
    return F.cross_entropy(logits.float() + tau * log_prior, labels, reduction=reduction)


# 6. Training [paper: the LIFT+ framework]: SGD with momentum and weight decay, cosine annealing per epoch, mixed
#    precision on GPUs. The rest is the `run`'s, a Part II Job: batches, checkpoints, resume, signals, torchrun.


def train(cfg: Config, data: LTData, model: LiftModel, run: Job) -> list:
    """[paper: the LIFT+ framework] The logit-adjusted loss on MDA crops; returns each epoch's mean training loss."""
    device, dtype = model.mean.device, autocast_dtype(cfg, model.mean.device)  # Appendix D: bf16 on GPUs, else fp32
    tuned = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(tuned, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # bf16 and fp32 need no scaling
    counts = torch.as_tensor(data.train_counts, dtype=torch.float32)
    log_prior = torch.log(counts / counts.sum()).to(device)  # log pi: [K]
    tau = cfg.tau if cfg.loss == "la" else 0.0  # CE is LA with tau = 0
    transform = MDATransform(model.image_size, cfg.epochs, cfg.mda, cfg.min_scale, cfg.seed)
    forward, first_epoch, step = run.start(model, opt, sched, scaler)  # Part II: 0, 0 unless resumed; DDP, torchrun
    for epoch in range(first_epoch, cfg.epochs):
        transform.epoch = epoch
        model.train()
        for views, y in run.batches(Views(data.train, transform), epoch, step):  # Part II: a seeded order, by step
            views, y = views.to(device, non_blocking=True)[:, 0], y.to(device, non_blocking=True)  # MDA's one view
            total = torch.zeros((), device=device)
            for x, t in zip(views.chunk(cfg.accum_steps), y.chunk(cfg.accum_steps)):  # gradient accumulation
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = forward(x)  # [b, K]
                loss = logit_adjusted_loss(logits, t, log_prior, tau, reduction="sum")
                scaler.scale(loss / len(y)).backward()  # the mean over the step's images
                total += loss.detach()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            run.step_done(epoch, step, total, sched.get_last_lr()[0])  # Part II: progress, checkpoints, signals
        sched.step()
        run.epoch_done(epoch)  # Part II: the epoch's checkpoint
        step = 0
    return run.losses


# 7. Evaluation: Overall / Many / Medium / Few top-1 accuracy [paper: evaluation protocol]


def class_groups(train_counts) -> dict:
    """Many-shot (> 100 training images), Medium-shot (20-100) and Few-shot (< 20) classes."""
    many, few = np.asarray(train_counts) > 100, np.asarray(train_counts) < 20
    return {"many": np.flatnonzero(many), "medium": np.flatnonzero(~many & ~few), "few": np.flatnonzero(few)}


def tte_logits(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """[paper: test-time ensembling] The mean of the logits of each image's V views: [B, V, 3, S, S] -> [B, K]."""
    B, V = views.shape[:2]  # V passes of B views each (B / V images): a V times smaller working set
    logits = torch.cat([model(chunk) for chunk in views.flatten(0, 1).split(B)]).float()  # [B V, K]
    return logits.view(B, V, -1).mean(dim=1)


@torch.no_grad()
def over_dataset(fn, model: LiftModel, dataset, cfg: Config, run: Job | None = None) -> tuple:
    """fn(views [B, V, 3, S, S]) on each batch, in order: (outputs [N, ...], labels [N]); a Job shares them out."""
    model.eval()
    device = model.mean.device
    dtype, out, labels = autocast_dtype(cfg, device), [], []  # Appendix D
    if run is None:
        loader = Loader(dataset, cfg.eval_batch_size, num_workers=cfg.workers)  # Part II: workers pass signals on
    else:
        loader = run.in_order(dataset, cfg.eval_batch_size)  # Part II: under torchrun, this process's share
    for views, y in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out.append(fn(views.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y))
    if run is not None:
        return run.gather(out, labels)
    return torch.cat(out), torch.cat(labels)


def accuracy_report(preds, labels, train_counts) -> dict:
    """Top-1 accuracy overall and the mean per-class accuracy of each group (%); a class without test images counts
    in no group, and a group without them is None."""
    preds, labels, K = np.asarray(preds), np.asarray(labels), len(train_counts)
    correct, total = np.bincount(labels, weights=(preds == labels), minlength=K), np.bincount(labels, minlength=K)
    per_class = [100.0 * c / t if t else None for c, t in zip(correct, total)]
    report = {"overall": 100.0 * float((preds == labels).mean()), "per_class": per_class}
    for group, idx in class_groups(train_counts).items():
        idx = idx[total[idx] > 0]
        report[group] = float(np.mean([per_class[i] for i in idx])) if len(idx) else None
    return report


def evaluate(cfg: Config, data: LTData, model: LiftModel, run: Job | None = None) -> dict:
    """Test-set (or --eval-split val) accuracy with TTE (or the centre crop), printed."""
    views = Views(getattr(data, cfg.eval_split), test_views(cfg, model.image_size))
    logits, labels = over_dataset(lambda v: tte_logits(model, v), model, views, cfg, run)
    preds, labels = logits.argmax(dim=1).numpy(), labels.numpy()  # [N]
    report = {**accuracy_report(preds, labels, data.train_counts), "predictions": preds, "labels": labels}
    what = f"TTE: five crops of the resize to {views.transform.resize}" if cfg.tte else "centre crop"
    cells = ["    n/a" if report[k] is None else f"{report[k]:7.2f}" for k in ("overall", "many", "medium", "few")]
    print(f"{cfg.eval_split} ({what})\n          Overall    Many  Medium     Few\naccuracy  " + " ".join(cells))
    return report


# ==========================================================================================
# APPENDIX A. The paper's baselines (other tunings, classifier inits) and the `table` command
# Part I calls block_indices and configure_baseline (configure_tuning) and baseline_init (build_model); main calls
# table_main. A method only freezes, unfreezes or attaches parameters (LoRA and the random mask parametrize CLIP's
# weights, the Adapter wraps the MLP, VPT is a LiftViT with prompts), so Part I's training serves them all.


def block_indices(cfg: Config, num_blocks: int) -> list:
    """Vision blocks a method acts on: --blocks ('0-11', '8,9,10,11'); partial: the last k; else all."""
    if cfg.tuning == "partial":
        if cfg.partial_blocks > num_blocks:
            raise LiftError(f"--partial-blocks {cfg.partial_blocks}: the model has {num_blocks} blocks")
        return list(range(num_blocks - cfg.partial_blocks, num_blocks))
    if cfg.blocks is None:
        return list(range(num_blocks))
    chosen = []
    for part in cfg.blocks.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)  # 'i' or 'lo-hi'
        if m is None or not int(m[1]) <= int(m[2] or m[1]) < num_blocks:
            raise LiftError(
                f"--blocks {cfg.blocks}: expected indices in 0..{num_blocks - 1} like '0-{num_blocks - 1}' or '8,9,10'"
            )
        chosen += range(int(m[1]), int(m[2] or m[1]) + 1)
    return sorted(set(chosen))


class MLPThenAdapter(nn.Module):
    """Adapter, in place of a block's MLP: m = MLP(y), then m + Up(ReLU(Down(LN(m)))) (AdaptFormer without scale)."""

    def __init__(self, mlp: nn.Module, dim: int, r: int):
        super().__init__()
        self.mlp, self.adapter = mlp, AdaptFormer(dim, r)
        del self.adapter.scale

    def forward(self, y):
        m, a = self.mlp(y), self.adapter
        return m + a.up(F.relu(a.down(a.ln(m))))


class LoRA(nn.Module):
    """A parametrization of the in-projection [W_q; W_k; W_v]: q gains x A_q B_q / r, v gains x A_v B_v / r."""

    def __init__(self, dim: int, r: int):
        super().__init__()
        self.q_down, self.q_up = nn.Parameter(torch.empty(dim, r)), nn.Parameter(torch.zeros(r, dim))
        self.v_down, self.v_up = nn.Parameter(torch.empty(dim, r)), nn.Parameter(torch.zeros(r, dim))
        nn.init.kaiming_uniform_(self.q_down, a=math.sqrt(5))  # as the LIFT+ code: torch's fan-in of [D, r] is r
        nn.init.kaiming_uniform_(self.v_down, a=math.sqrt(5))  # (B = 0: training starts at CLIP)
        self.scale = 1.0 / r

    def forward(self, w):  # w: [3D, D]; F.linear(x, w) = x @ w.T
        dq = (self.q_down @ self.q_up).t() * self.scale  # [D, D]
        dv = (self.v_down @ self.v_up).t() * self.scale
        return w + torch.cat([dq, torch.zeros_like(dq), dv])


class MaskedUpdate(nn.Module):
    """Random mask: a parametrization training round(ratio * n) seeded random entries of a frozen tensor, no other."""

    def __init__(self, tensor: torch.Tensor, ratio: float, gen: torch.Generator):
        super().__init__()
        n = tensor.numel()
        self.register_buffer("index", torch.randperm(n, generator=gen)[: round(ratio * n)])
        self.values = nn.Parameter(tensor.detach().flatten()[self.index].clone())

    def forward(self, frozen):
        return frozen.flatten().index_put((self.index,), self.values).view_as(frozen)


class PromptedViT(LiftViT):
    """VPT-deep: block i's prompts (prompts[i], [P, D]) replace the previous block's, after the class token."""

    def __init__(self, visual):
        super().__init__(visual)
        self.prompts = nn.ParameterDict()  # block index -> [P, D]

    def block(self, i: int, blk, x):
        return super().block(i, blk, self.with_prompts(i, x))

    def with_prompts(self, i: int, x):
        """The tokens x [B, N (+ P'), D] that block i reads: its own prompts, if any, in place of the previous ones."""
        if str(i) not in self.prompts:
            return x
        old = x.shape[1] - self.visual.positional_embedding.shape[0]  # the previous block's prompts
        p = self.prompts[str(i)].to(x.dtype).expand(x.shape[0], -1, -1)  # [B, P, D]
        return torch.cat([x[:, :1], p, x[:, 1 + old :]], dim=1)  # [B, 1 + P + N-1, D]


def configure_baseline(model: LiftModel, cfg: Config, blocks: list, K: int) -> dict:
    """[paper: Figures 4 and 5, the tunings compared] Unfreeze or attach --tuning's parameters in the chosen blocks;
    returns the sizes chosen. Classifier-only and zero-shot keep CLIP frozen."""
    from torch.nn.utils.parametrize import register_parametrization

    width, gen, sizes = model.encoder.width, torch.Generator().manual_seed(cfg.seed), {}
    if cfg.tuning == "vpt":
        sizes = {"prompt_len": cfg.vpt_len or size_rule(K, len(blocks), 1)}
        model.encoder = PromptedViT(model.encoder.visual)
    if cfg.tuning == "adapter":
        sizes = {"r": cfg.adapter_dim or size_rule(K, len(blocks), 2)}
    if cfg.tuning == "lora":
        sizes = {"rank": cfg.lora_rank or size_rule(K, len(blocks), 4)}
    for i in blocks:
        blk = model.encoder.visual.transformer.resblocks[i]
        if cfg.tuning in ("full", "partial"):  # every parameter
            blk.requires_grad_(True)
        if cfg.tuning == "bitfit":  # the biases
            for name, p in blk.named_parameters():
                p.requires_grad_(name.endswith("bias"))
        if cfg.tuning == "vpt":
            model.encoder.prompts[str(i)] = nn.Parameter(torch.randn(sizes["prompt_len"], width) * 0.02)
        if cfg.tuning == "adapter":
            blk.mlp = MLPThenAdapter(blk.mlp, width, sizes["r"])
        if cfg.tuning == "lora":
            register_parametrization(blk.attn, "in_proj_weight", LoRA(width, sizes["rank"]))
        if cfg.tuning == "mask":  # each weight and bias of attention and the MLP, in this order, from one generator
            weights = [(blk.attn, "in_proj_weight"), (blk.attn, "in_proj_bias")]
            weights += [(m, n) for m in (blk.attn.out_proj, blk.mlp.c_fc, blk.mlp.c_proj) for n in ("weight", "bias")]
            for module, name in weights:
                tensor = getattr(module, name)
                if round(cfg.mask_ratio * tensor.numel()) > 0:  # a tiny bias may get no entry
                    register_parametrization(module, name, MaskedUpdate(tensor, cfg.mask_ratio, gen))
    return sizes


def extract_features(model: LiftModel, dataset, cfg: Config) -> tuple:
    """Features of a dataset of single views: ([N, D] float32, [N] labels)."""
    return over_dataset(lambda views: model.features(views[:, 0]), model, dataset, cfg)


def baseline_init(model: LiftModel, data: LTData, cfg: Config, device) -> torch.Tensor:
    """[paper: the ablation of the classifier initialization] Random unit vectors ('none'), or init_from_features of
    the frozen features of at most 100 random training images per class (centre views)."""
    K = data.num_classes
    if cfg.init == "none":
        return F.normalize(torch.rand(K, model.encoder.width) * 2 - 1, dim=-1)
    rng, labels = np.random.RandomState(cfg.seed), np.asarray(data.train.labels)
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:100] for c in range(K)])
    S = model.image_size
    feats, ys = extract_features(model, Views(data.train, EvalTransform(S, S, False), idx), cfg)
    return init_from_features(feats, ys, K, cfg.init)


def init_from_features(feats: torch.Tensor, labels: torch.Tensor, K: int, init: str) -> torch.Tensor:
    """The normalised mean feature of each class ('class_mean'), or the normalised weight rows of a linear probe."""
    if init == "class_mean":
        sums = torch.zeros(K, feats.shape[1], dtype=torch.float64).index_add_(0, labels, feats.double())
        return F.normalize(sums, dim=-1).float()
    return F.normalize(linear_probe(feats, labels, K)[0], dim=-1).float()


def linear_probe(feats: torch.Tensor, labels: torch.Tensor, K: int, iters: int = 100) -> tuple:
    """(W, b): L-BFGS on the objective of scikit-learn's LogisticRegression(C=1, class_weight='balanced')."""
    x, y = feats.double(), labels
    sample_w = (len(y) / (K * torch.bincount(y, minlength=K).clamp(min=1).double()))[y]  # 'balanced' class weights
    W = torch.zeros(K, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = (F.cross_entropy(x @ W.t() + b, y, reduction="none") * sample_w).sum() + 0.5 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(objective)
    return W.detach(), b.detach()


def table_main(argv: list):
    """python lift_plus.py table [FOLDER] [--seeds]: the results*.json under FOLDER as one Markdown table, a row per
    run with a training run's time and images per second (metrics.jsonl), or per setting with its seeds."""
    p = Parser(prog="lift_plus.py table", description=table_main.__doc__)
    p.add_argument("folder", nargs="?", default="runs", help="searched at any depth for results*.json (default: runs)")
    p.add_argument("--seeds", action="store_true", help="a row per setting: mean ± std over the runs of each --seed")
    args = p.parse_args(argv)
    if not Path(args.folder).is_dir():
        raise LiftError(f"{args.folder}: no such folder")
    kept, dropped = ("tte", "expand"), (*RESUME_MAY_CHANGE, "seed", "run_name", "checkpoint")  # Part II's flags
    groups = {}  # a setting: the config less its seed and run-only flags (TTE and the CLIP count)
    for path in sorted(Path(args.folder).glob("**/results*.json")):
        r = json.loads(path.read_text())
        setting = json.dumps({k: v for k, v in r["config"].items() if k in kept or k not in dropped}, sort_keys=True)
        groups.setdefault(setting if args.seeds else path, []).append((path, r))
    rows = []
    for runs in groups.values():
        (path, r), c = runs[0], runs[0][1]["config"]
        keys = ("lr", "init", "mda") if args.seeds else ("init", "loss", "mda")
        row = [c["data"], c["tuning"], *[c[k] for k in keys], c["tte"], c["epochs"]]
        if c["tuning"] == "zeroshot":  # it trains nothing
            row = [c["data"], c["tuning"], "-", "-", "-", c["tte"], "-"]
        if args.seeds:
            seeds = "-"
            if c["tuning"] != "zeroshot":
                seeds = ", ".join(str(run["config"]["seed"]) for _, run in runs)
            row.append(seeds)
        else:  # results_eval_tte3.json: <run>_eval_tte3
            log, epochs, speed = path.parent / "metrics.jsonl", [], ["-", "-"]  # a training run's time and img/s
            if log.is_file() and path.name == "results.json":
                epochs = [json.loads(line) for line in log.read_text().splitlines()]
            if epochs:
                rate = np.mean([e["images_per_s"] for e in epochs])
                speed = [f"{sum(e['epoch_s'] for e in epochs):.0f} s", f"{rate:.0f}"]
            row = [path.parent.name + path.stem[7:], *row, f"{r['params']['tuned']:,}", *speed]
        for k in ("overall", "many", "medium", "few"):  # mean ± sample std; n/a where no run has a value
            v, cell = [run["metrics"][k] for _, run in runs if run["metrics"][k] is not None], "n/a"
            if v:
                cell = f"{np.mean(v):.2f}"
            if len(v) > 1:
                cell += f" ± {np.std(v, ddof=1):.2f}"
            row.append(cell)
        rows.append(row)
    columns = "run | data | tuning | init | loss | mda | tte | epochs | tuned params | train time | img/s"
    if args.seeds:
        columns = "data | tuning | lr | init | mda | tte | epochs | seeds"
    print(f"| {columns} | Overall | Many | Medium | Few |\n" + "|---" * (columns.count("|") + 5) + "|")
    for row in rows:
        print(f"| {' | '.join(map(str, row))} |")


# ==========================================================================================
# APPENDIX B. The benchmarks' split lists and class names, CIFAR-100-LT, CLIP's weights (load_clip)
# Part I calls build_benchmark and build_cifar100_lt (build_data) and load_clip (build_model). Offline, a download
# fails in seconds, naming the file to fetch elsewhere.

SPLIT_LISTS = {  # --data: (its subfolder, OLTR's prefix of the list names, the test list's split, the extra files)
    "imagenet_lt": ("ImageNet_LT", "ImageNet_LT", "test", ()),
    "places_lt": ("Places_LT", "Places_LT", "test", ("classnames.txt",)),
    "inat2018": ("iNaturalist2018", "iNaturalist18", "val", ("categories.json",)),
}


def online(host: str) -> bool:
    """Can this machine open a connection to host within 3 s?"""
    import socket

    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def find_split_files(cfg: Config) -> dict:
    """{'train', 'test', 'val' (--eval-split val), extra file: path}: lists under OLTR's names or the LIFT+ code's
    (train.txt), in --splits, else --root, --root/<subfolder> or the cache, else downloaded into the cache."""
    import urllib.request

    subdir, prefix, test, extra = SPLIT_LISTS[cfg.data]
    names = {"train": (f"{prefix}_train.txt", "train.txt"), "test": (f"{prefix}_{test}.txt", f"{test}.txt")}
    if cfg.eval_split == "val":  # ImageNet-LT's and Places-LT's validation lists (20 images a class)
        names["val"] = (f"{prefix}_val.txt", "val.txt")
    names.update({n: (n,) for n in extra})
    cache = Path(cfg.cache).expanduser() / "splits" / subdir
    folders = [Path(cfg.root), Path(cfg.root) / subdir, cache]
    if cfg.splits:
        if not Path(cfg.splits).is_dir():
            raise LiftError(f"--splits {cfg.splits}: no such folder")
        folders = [Path(cfg.splits)]

    def locate() -> dict:
        return {key: next((d / n for d in folders for n in names[key] if (d / n).is_file()), None) for key in names}

    files = locate()
    if None in files.values() and not cfg.splits and online("raw.githubusercontent.com"):
        for key in [key for key, path in files.items() if path is None]:
            url = f"https://raw.githubusercontent.com/shijxcs/LIFT-plus/HEAD/datasets/{subdir}/{names[key][-1]}"
            print(f"downloading {url}")
            try:
                atomic_write(cache / names[key][-1], urllib.request.urlopen(url, timeout=60).read())
            except OSError as e:
                raise LiftError(f"--data {cfg.data}: could not download {url} ({e}); pass --splits DIR") from None
        files = locate()
    if None in files.values():
        wanted = ", ".join(" or ".join(names[key]) for key, path in files.items() if path is None)
        where = cfg.splits or f"{cfg.root} (or {Path(cfg.root) / subdir}, or {cache})"
        raise LiftError(
            f"--data {cfg.data}: split files not found: {wanted}. Put them in {where}, or pass --splits DIR. They are "
            f"in datasets/{subdir}/ of github.com/shijxcs/LIFT-plus (and OLTR's); this machine could not download them."
        )
    return files


def read_split_list(path, root, num_classes=None):
    """Parse a "relative/path label" split list; a bad line is reported as file:line."""
    paths, labels = [], []
    with open(path, errors="surrogateescape") as f:  # file names are bytes: keep them as they are
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise LiftError(
                    f"{path}:{n}: expected '<relative/image/path> <integer label>', got '{' '.join(parts)}'"
                )
            label = int(parts[1])
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise LiftError(f"{path}:{n}: label {label} is outside the class range 0..{num_classes - 1}")
            paths.append(os.path.join(root, parts[0].lstrip("/")))
            labels.append(label)
    if not labels:
        raise LiftError(f"{path}: the split list is empty")
    return paths, labels


def build_benchmark(cfg: Config) -> LTData:
    """[paper: experiments] ImageNet-LT (CLIP's curated class names), Places-LT (Places365's names) or iNaturalist
    2018 (names at --inat-level; its test set is the val list) from their split lists."""
    if not Path(cfg.root).is_dir():
        raise LiftError(f"--root {cfg.root}: no such folder (expected the dataset's image root)")
    files, to_label = find_split_files(cfg), None  # iNaturalist: {category id: label}
    if cfg.data == "imagenet_lt":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        classnames = list(IMAGENET_CLASSNAMES)
    if cfg.data == "places_lt":  # one a line ('airfield'), or the official '/a/apartment_building/outdoor 0'
        names = [line.split()[0] for line in Path(files["classnames.txt"]).read_text().splitlines() if line.strip()]
        classnames = ["-".join(n.split("/")[2:]) if n.startswith("/") else n for n in names]
    if cfg.data == "inat2018":  # as the LIFT+ code: labels follow the sorted unique names at the taxonomy level
        path, level = files["categories.json"], "name" if cfg.inat_level == "species" else cfg.inat_level
        try:
            id_to_name = {int(e.get("id", i)): e[level] for i, e in enumerate(json.loads(Path(path).read_text()))}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LiftError(f"{path}: expected a JSON list of {{'id', '{level}'}} entries ({e})") from None
        classnames = sorted(set(id_to_name.values()))
        label = {name: i for i, name in enumerate(classnames)}
        to_label = {cid: label[name] for cid, name in id_to_name.items()}
    splits = {}
    for split in [name for name in ("train", "test", "val") if name in files]:
        paths, labels = read_split_list(files[split], cfg.root, len(to_label or classnames))
        if to_label is not None:  # iNaturalist: category ids -> labels of the sorted names
            unknown = sorted(set(labels) - set(to_label))
            if unknown:
                raise LiftError(f"{files[split]}: category ids {unknown[:5]} are not in {files['categories.json']}")
            labels = [to_label[y] for y in labels]
        splits[split] = ImageSet(paths, labels)
    counts = np.bincount(splits["train"].labels, minlength=len(classnames))
    return LTData(splits["train"], splits["test"], classnames, counts, val=splits.get("val"))


def cifar100_lt_counts(ratio, num_classes=100, max_count=500) -> list:
    """Images kept per class in CIFAR-100-LT: int(500 * (1/ratio) ** (i / 99)) (Cao et al., 2019)."""
    return [int(max_count * (1 / ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]


def make_long_tailed(labels, counts, seed=0) -> np.ndarray:
    """Indices of the long-tailed subset: per class in class order, the first counts[c] after a shuffle by one
    numpy RandomState(seed), which reproduces the commonly used CIFAR-100-LT split."""
    labels, rng, keep = np.asarray(labels, dtype=np.int64), np.random.RandomState(seed), []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep)


def build_cifar100_lt(cfg: Config) -> LTData:
    """[paper: experiments] CIFAR-100-LT (ratio 100, 50 or 10) of torchvision's CIFAR-100 in --root; the same test."""
    import torchvision

    root, download = str(Path(cfg.root).expanduser()), online("www.cs.toronto.edu")
    try:
        train, test = (torchvision.datasets.CIFAR100(root, train=s, download=download) for s in (True, False))
    except RuntimeError as e:
        raise LiftError(
            f"--root {cfg.root}: CIFAR-100 not found ({e}); put 'cifar-100-python' there, or run once online"
        ) from None
    counts = cifar100_lt_counts(int(cfg.data.split("_ir")[1]))
    keep = make_long_tailed(train.targets, counts, seed=0)
    train_set = ImageSet(train.data[keep], np.asarray(train.targets)[keep])
    return LTData(train_set, ImageSet(test.data, test.targets), list(train.classes), np.asarray(counts))


def open_clip_name(model: str) -> str:
    """open_clip's name for --model: 'ViT-B/16' -> 'ViT-B-16'; a model-config JSON file is registered first."""
    import open_clip

    if model.endswith(".json"):
        if not Path(model).is_file():
            raise LiftError(f"--model {model}: no such model-config file")
        open_clip.add_model_config(model)
        return Path(model).stem
    name = model.replace("/", "-")
    if ":" not in name and name not in open_clip.list_models():
        vits = ", ".join(m for m in open_clip.list_models() if m.startswith(("ViT-B", "ViT-L")))
        raise LiftError(f"--model {model}: unknown open_clip model; CLIP ViTs include {vits}")
    return name


def clip_image_size(cfg: Config) -> int:
    """The image size S of --model, from its open_clip config (no weights are loaded)."""
    import open_clip

    model_cfg = open_clip.get_model_config(open_clip_name(cfg.model))
    if model_cfg is None:
        raise LiftError(f"--model {cfg.model}: its image size is unknown before loading; pass --expand N (24 for 224)")
    return int(np.atleast_1d(model_cfg["vision_cfg"]["image_size"])[0])


def resolve_clip(cfg: Config) -> tuple:
    """(open_clip name, the tag or file or None, QuickGELU?, the tag's config, OpenAI's TorchScript file?). OpenAI's
    CLIP uses QuickGELU, open_clip's plain 'ViT-B-16' exact GELU: the activation follows the tag or OpenAI's file."""
    import zipfile

    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    name, pretrained, tag_cfg, torchscript = open_clip_name(cfg.model), cfg.pretrained, {}, False
    if pretrained.lower() == "none":
        pretrained = None
    if pretrained and ":" not in name:
        tag_cfg = get_pretrained_cfg(name, pretrained) or {}
    if pretrained and not tag_cfg:  # not a tag: a weights file, maybe OpenAI's TorchScript archive (ViT-B-16.pt)
        pretrained = str(Path(cfg.pretrained).expanduser())
        if not Path(pretrained).is_file():
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none known"
            raise LiftError(f"--pretrained {cfg.pretrained}: neither a pretrained tag of {name} ({tags}) nor a file")
        try:
            with zipfile.ZipFile(pretrained) as z:
                torchscript = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
        except (zipfile.BadZipFile, OSError):
            pass  # not a zip archive: a state dict
    quick_gelu = bool(tag_cfg.get("quick_gelu"))
    if not tag_cfg:  # OpenAI's TorchScript file, or a file named for OpenAI's weights
        quick_gelu = bool(pretrained and (torchscript or "openai" in pretrained.lower()))
    if cfg.quick_gelu != "auto":
        quick_gelu = cfg.quick_gelu == "yes"
    return name, pretrained, quick_gelu, tag_cfg, torchscript


def load_clip(cfg: Config):
    """(CLIP of --model with --pretrained's weights, image mean, image std, tokenizer), refused unless a ViT. OpenAI's
    TorchScript file is read with torch.jit.load, as OpenAI's loader does; offline, a tag's weights fail in seconds."""
    import logging

    import huggingface_hub.constants as hub
    import open_clip

    name, pretrained, quick_gelu, tag_cfg, torchscript = resolve_clip(cfg)
    hub_offline = hub.HF_HUB_OFFLINE
    if tag_cfg and not online("huggingface.co"):
        hub.HF_HUB_OFFLINE = True  # the local hub cache only
    logging.disable(logging.ERROR)  # open_clip logs the failure reported below
    try:
        if torchscript:  # torch.load(weights_only=True) refuses it; every tensor of the open_clip model is copied
            archive = torch.jit.load(pretrained, map_location="cpu").state_dict()  # also holds metadata scalars
            clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
            clip.load_state_dict({k: archive[k] for k in clip.state_dict() if k in archive}, strict=True)
        else:
            cache = os.environ.get("LIFT_CLIP_CACHE")
            clip = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu, cache_dir=cache)
    except Exception as e:  # a download that failed, or a file that does not hold these weights
        why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if not tag_cfg:
            raise LiftError(f"--pretrained {cfg.pretrained}: cannot load it into {name} ({why})") from None
        url, flags = tag_cfg.get("url") or "its URL", "--pretrained /path/to/file"
        if tag_cfg.get("hf_hub"):
            url = f"https://huggingface.co/{tag_cfg['hf_hub'].rstrip('/')}"
        if tag_cfg.get("quick_gelu"):  # OpenAI's weights: a converted state dict needs QuickGELU named
            flags += " --quick-gelu yes"
        raise LiftError(
            f"--pretrained {cfg.pretrained}: could not get the weights of {name} ({why}); download them ({url}) "
            f"and pass {flags}"
        ) from None
    finally:
        logging.disable(logging.NOTSET)
        hub.HF_HUB_OFFLINE = hub_offline
    check_vit(clip.visual, cfg)  # Appendix E
    pcfg = {**clip.visual.preprocess_cfg, **{k: v for k, v in tag_cfg.items() if k in ("mean", "std")}}
    act = type(clip.visual.transformer.resblocks[0].mlp.gelu).__name__
    print(f"model {name}, weights {pretrained or 'random'}, activation {act}")
    return clip.eval(), tuple(pcfg["mean"]), tuple(pcfg["std"]), open_clip.get_tokenizer(name)


# ==========================================================================================
# APPENDIX C. The offline worlds (--data shapes_lt*): their long-tailed tasks and tiny CLIP in the cache
# Part I calls build_world_task, Part II world_clip_files. data/shapes_lt/prepare.py generates the worlds (and says
# which property of CLIP on ImageNet-LT each choice stands for); their pretrained CLIPs ship in assets/.


@functools.cache
def world():
    """data/shapes_lt/prepare.py, the world's generator, as a module (loaded once)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "data" / "shapes_lt" / "prepare.py"
    spec = importlib.util.spec_from_file_location("shapes_lt_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def world_clip_files(cfg: Config) -> dict:
    """--model / --pretrained of the world's CLIP in cache/world/<key>/ (for the default model flags); this writes its
    config file (its stem is open_clip's model name), build_world_task its weights."""
    key = world().world_key(world().WORLDS[cfg.data])
    folder, config = Path(cfg.cache).expanduser() / "world" / key, f"world-{key}.json"
    if (cfg.model, cfg.pretrained) != ("ViT-B-16", "openai") and not cfg.model.endswith(config):
        return {"model": cfg.model, "pretrained": cfg.pretrained}
    if not (folder / config).is_file():
        atomic_write(folder / config, json.dumps(world().WORLD_CLIP, indent=1).encode())
    return {"model": str(folder / config), "pretrained": str(folder / "clip.pt")}


def build_world_task(cfg: Config) -> LTData:
    """The world's task, rendered once into the cache (seconds). A cold cache first unpacks the shipped CLIP, or
    pretrains one if none was shipped for this world (another WorldSpec, WORLD_VERSION or open_clip version)."""
    w, folder = world(), Path(cfg.cache).expanduser() / "world"
    spec, shipped, packed = w.WORLDS[cfg.data], w.SHIPPED_CLIPS[cfg.data], {}
    key = w.world_key(spec)
    if cfg.pretrained == str(folder / key / "clip.pt") and not Path(cfg.pretrained).is_file():
        name = open_clip_name(cfg.model)
        if shipped.is_file():
            packed = torch.load(shipped, weights_only=True)
        if packed.get("key") != key:  # none shipped for this world: pretrain it (minutes)
            t0 = time.time()
            packed = w.pack_world_clip(w.pretrain_world_clip(spec, name, spec.seed), key)
            print(f"pretrained the world's CLIP in {time.time() - t0:.0f} s: {cfg.pretrained}")
        atomic_torch_save(Path(cfg.pretrained), w.unpack_world_clip(packed, name, spec.seed))
    task = folder / f"task-{w.task_key(spec)}.npz"
    if not task.is_file():
        buf = io.BytesIO()
        np.savez(buf, **w.render_task(spec))
        atomic_write(task, buf.getvalue())
    t = np.load(task)
    train, test, val = (ImageSet(t[split], t[f"y_{split}"]) for split in ("train", "test", "val"))
    return LTData(train, test, [str(c) for c in t["classnames"]], t["counts"], val=val)


# ==========================================================================================
# APPENDIX D. Speed, the same values: a leaner encoder, mixed precision, torch.compile, cached features, GPU JPEGs
# Part I's train and over_dataset run under autocast_dtype; Part II's fit applies make_fast (--fast) and frozen_features
# (--cache-features), its Job compile_warmup (--compile) and gpu_jpeg_views (--gpu-decode). Tests keep each equal.


class LeanQuickGELU(nn.Module):
    """QuickGELU, x * sigmoid(1.702 x), keeping only x for backward: half autograd's memory (it keeps the sigmoid)."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * torch.sigmoid(1.702 * x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(1.702 * x)
            return grad * (s + 1.702 * x * s * (1.0 - s))

    def forward(self, x):
        return self.Function.apply(x)


class FastViT(PromptedViT):
    """The taught encoder (LiftViT, or VPT's PromptedViT) whose last block computes the class token alone, the only
    output used: keys and values still come from every token. About 1/13 fewer FLOPs."""

    def block(self, i: int, blk, x):
        if i + 1 < len(self.visual.transformer.resblocks):
            return super().block(i, blk, x)
        x = self.with_prompts(i, x)  # [B, N (+ P), D]
        y = blk.ln_1(x)
        h = x[:, :1] + blk.ls_1(blk.attention(y[:, :1], y, y))  # [B, 1, D]
        return h + self.mlp_branch(i, blk, h)


def make_fast(model: LiftModel):
    """--fast: LeanQuickGELU for OpenAI's QuickGELU, and a FastViT of the very same modules as the encoder."""
    from open_clip.transformer import QuickGELU

    for module in list(model.encoder.visual.modules()):
        for name, child in module.named_children():
            if isinstance(child, QuickGELU):
                setattr(module, name, LeanQuickGELU())
    fast = FastViT(model.encoder.visual)
    for name, child in model.encoder.named_children():  # CLIP, AdaptFormer, VPT's prompts, ...
        setattr(fast, name, child)
    model.encoder = fast


def autocast_dtype(cfg: Config, device: torch.device):
    """--amp: bf16 where the GPU has it, else fp16 (with loss scaling); None (fp32) on the CPU."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


def frozen_features(model: LiftModel, data: LTData, cfg: Config) -> tuple:
    """--cache-features: the frozen backbone's features of the training images' centre views, computed once."""
    return extract_features(model, Views(data.train, EvalTransform(model.image_size, model.image_size, False)), cfg)


def compile_warmup(model: LiftModel, sizes: set, dtype):
    """--compile: a training forward and backward per batch size, before the clock starts (the plain model, not DDP's
    wrapper: the same graphs, and no all-reduce that another process might not join)."""
    device, S = model.mean.device, model.image_size
    model.train()  # training's mode, or the graphs would differ
    for b in sorted(sizes):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(torch.zeros(b, 3, S, S, dtype=torch.uint8, device=device))
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)


def gpu_jpeg_views(dataset, cfg: Config, device) -> tuple:
    """(dataset, collate_fn) for a DataLoader: with --gpu-decode on a GPU, Views of JPEG files become JpegViews."""
    on_disk = isinstance(dataset, Views) and isinstance(dataset.base.images, list)
    if on_disk and cfg.gpu_decode and device.type == "cuda":
        if any(path.lower().endswith((".jpg", ".jpeg")) for path in dataset.base.images):
            jpegs = JpegViews(dataset.base, dataset.transform, dataset.indices)
            return jpegs, jpegs.collate
    return dataset, None


class JpegViews(Views):
    """Item: ((JPEG bytes, path, index), label) for the GPU to decode; Views' own item for other files, CMYK and
    EXIF-rotated JPEGs (which PIL reads differently)."""

    def __getitem__(self, i):
        j = int(self.indices[i])
        try:
            raw = Path(self.base.images[j]).read_bytes()
            im = Image.open(io.BytesIO(raw))  # the header only
            if im.format == "JPEG" and im.mode in ("RGB", "L") and not exif_rotated(im):
                return (raw, self.base.images[j], j), self.base.labels[j]
        except (OSError, ValueError, Image.DecompressionBombError):
            pass  # Views' item: read_image names the file
        return super().__getitem__(i)

    def collate(self, items: list) -> tuple:
        return JpegBatch([x for x, _ in items], self.transform), torch.tensor([y for _, y in items])


@dataclass
class JpegBatch:
    """JpegViews items and their transform; decode(device) makes their views [B, V, 3, S, S] there."""

    items: list
    transform: object

    def decode(self, device) -> torch.Tensor:
        """The JPEGs decoded on `device` in one call (by read_image where the decoder refuses) and seen through the
        transform in float, as CUDA's bicubic has no uint8; the workers made the other items' views."""
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs, views = [x for x in self.items if isinstance(x, tuple)], []
        try:
            data = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw, _, _ in jpegs]
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if jpegs else []
        except (RuntimeError, ValueError):  # refused: read as the CPU path reads it
            images = [read_image(path).to(device) for _, path, _ in jpegs]
        for item in self.items:
            if isinstance(item, tuple):
                item = self.transform(images.pop(0).float(), item[2]).round_().clamp_(0, 255).to(torch.uint8)
            views.append(item.to(device))
        return torch.stack(views)


# ==========================================================================================
# APPENDIX E. Your own image folders and image files, the run's summaries of its task and model, atomic files
# Part I's build_data reads your folders with build_folder and ImageSet its files with read_image; predict lists them
# with image_files; load_clip calls check_vit; Part II's fit prints summarize_data and describe_tuning.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


def hidden(name: str) -> bool:
    """Hidden and tool entries (.DS_Store, .ipynb_checkpoints, __MACOSX): neither classes nor images."""
    return name.startswith(".") or name == "__MACOSX"


def exif_rotated(im: Image.Image) -> bool:
    """An EXIF orientation other than 1: decoders that apply it would differ from PIL and the LIFT+ code."""
    return im.getexif().get(0x0112, 1) != 1


def check_vit(visual, cfg: Config):
    """LIFT+ plugs into the blocks of a CLIP ViT with a class token: anything else is refused in one line."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise LiftError(
            f"--model {cfg.model}: --tuning {cfg.tuning} needs a CLIP ViT image tower (e.g. ViT-B-16); "
            f"this model's is {type(visual).__name__}"
        )
    standard = all(type(b) is ResidualAttentionBlock and b.attn.batch_first for b in visual.transformer.resblocks)
    pooled = getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok"
    if pooled or not isinstance(visual.patch_dropout, nn.Identity) or not standard:
        raise LiftError(
            f"--model {cfg.model}: only CLIP ViTs with class-token pooling and standard blocks are supported"
        )


@functools.cache
def torchcodec_jpeg():
    """TorchCodec's decode_jpeg (libjpeg-turbo: PIL's pixels, about 1.4x faster), or None where it does not load."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError):
        return None
    return decode_jpeg


def read_image(path) -> torch.Tensor:
    """RGB uint8 [3, H, W] as PIL's convert('RGB') reads the file (no EXIF rotation, the first frame, no alpha), but
    16-bit samples scaled to 8 bits (convert clips them) and 32-bit or float samples refused; JPEGs via TorchCodec."""
    try:
        raw, decode = Path(path).read_bytes(), torchcodec_jpeg()
        jpeg = raw[:2] == b"\xff\xd8" and decode is not None  # PIL parses the header only where EXIF may rotate it
        if jpeg and not (b"Exif" in raw[: 1 << 16] and exif_rotated(Image.open(io.BytesIO(raw)))):
            try:
                return decode(raw, mode="RGB")
            except (RuntimeError, ValueError):
                pass  # a JPEG TorchCodec refuses: PIL reads it
        im = Image.open(io.BytesIO(raw))
        im.load()  # a truncated file fails here
        if im.mode in ("I", "F"):
            kind = "32-bit integer" if im.mode == "I" else "floating-point"
            raise ValueError(f"{kind} samples have no 8-bit range; convert the file to an 8-bit image")
        if im.mode.startswith("I;16"):
            grey = (np.asarray(im, dtype=np.uint32) * 255 + 32767) // 65535  # [H, W]: 0..65535 to 0..255
            return torch.from_numpy(grey.astype(np.uint8)).repeat(3, 1, 1)
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA")  # palette transparency, without PIL's warning
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LiftError(f"cannot read image {path}: {e}") from None


def image_files(folder, notes: collections.Counter | None = None) -> list:
    """The image files under `folder` at any depth, as torchvision's make_dataset lists a class folder (links followed;
    a folder reached again through one is read once); hidden entries and other files are counted in `notes`."""
    from torchvision.datasets.folder import make_dataset

    parent, name = os.path.split(os.fspath(folder))
    start, first, realpath = len(os.path.join(parent, name)), {}, functools.cache(os.path.realpath)
    if notes is None:
        notes = collections.Counter()

    def is_image(path: str) -> bool:
        where = os.path.dirname(path)
        if first.setdefault(realpath(where), where) != where:
            return False  # a folder read already, reached again through a link
        if any(hidden(part) for part in path[start:].split(os.sep)):
            notes["hidden or tool entries"] += 1
            return False
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            notes["files without an image extension"] += 1
            return False
        return True

    # make_dataset walks <parent>/<class>/ at any depth: the folder itself, as the one class of its parent
    return [path for path, _ in make_dataset(parent, {name: 0}, is_valid_file=is_image, allow_empty=True)]


def build_folder(cfg: Config) -> LTData:
    """Your own task: <data>/train/<class>/... and <data>/test/<class>/..., images at any depth under their class
    folder; the classes are train/'s folders. What is skipped becomes the task's notes."""
    root, notes, index, sets = Path(cfg.data), collections.Counter(), {}, {}
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        known = ", ".join([*BENCHMARKS, *CIFAR100_LT, *WORLDS])
        raise LiftError(f"--data: unknown dataset '{cfg.data}'; expected {known} or a folder with train/ and test/")
    for split in ("train", "test"):
        entries = {e.name: e.is_dir() for e in os.scandir(root / split)}
        shown = [name for name in entries if not hidden(name)]
        notes["hidden or tool entries"] += len(entries) - len(shown)
        notes["files outside class folders"] += sum(not entries[name] for name in shown)
        classes = sorted(name for name in shown if entries[name])
        if split == "train":
            index = {c: i for i, c in enumerate(classes)}
        images, labels = [], []
        for c in classes:
            if c not in index:
                raise LiftError(f"{root / split / c}: class '{c}' has no training folder {root / 'train' / c}")
            try:
                c.encode("utf-8")  # class names become text prompts
            except UnicodeEncodeError:
                raise LiftError(f"{root / split}: class folder {os.fsencode(c)!r} is not UTF-8; rename it") from None
            found = image_files(root / split / c, notes)
            images += found
            labels += [index[c]] * len(found)
        if not images:
            raise LiftError(f"{root / split}: no images ({' '.join(IMAGE_EXTENSIONS)} files) in class folders")
        sets[split] = ImageSet(images, labels)
    counts = np.bincount(sets["train"].labels, minlength=len(index))
    if empty := [c for c, n in zip(index, counts) if n == 0]:
        raise LiftError(f"{root / 'train'}: class folders without images: {', '.join(empty[:5])}")
    said = [f"{n} {what} skipped" for what, n in sorted(notes.items()) if n]
    return LTData(sets["train"], sets["test"], list(index), counts, said)


def summarize_data(data: LTData, name: str) -> str:
    """The task's counts and groups, and notes on its lists: what was skipped, repeated entries (kept, as listed),
    images in both splits, classes without test or training images. An image listed under two labels is refused."""
    n, notes, seen = data.train_counts, list(data.notes), {"train": {}, "test": {}}
    for split, images in (("train", data.train), ("test", data.test)):
        paths = images.images if isinstance(images.images, list) else []  # arrays in memory: no file listed twice
        for path, y in zip(paths, images.labels):
            if seen[split].setdefault(path, y) != y:
                raise LiftError(f"{split} image {path} is listed under two labels, {seen[split][path]} and {y}")
        if repeats := len(paths) - len(seen[split]):
            notes.append(
                f"{repeats} {split} entries repeat an earlier entry of the same image and label (kept, as listed)"
            )
    if both := len(seen["train"].keys() & seen["test"].keys()):
        notes.append(f"{both} test images are also training images")
    tested = np.bincount(data.test.labels, minlength=data.num_classes)
    if k := int(((tested == 0) & (n > 0)).sum()):
        notes.append(f"{k} classes have no test image (no accuracy for them; left out of the group means)")
    if k := int((n == 0).sum()):
        notes.append(f"{k} classes have no training image")
    many, medium, few = (len(ids) for ids in class_groups(n).values())
    return "\n".join(
        [
            f"dataset {name}: {data.num_classes} classes, {len(data.train)} train / {len(data.test)} test images",
            f"  per class: max {n.max()}, min {n.min()}, imbalance ratio {n.max() / max(n.min(), 1):.1f}",
            f"  groups: many (>100) {many}, medium (20-100) {medium}, few (<20) {few} classes",
            *(f"  note: {note}" for note in notes),
        ]
    )


def count_params(model: LiftModel) -> dict:
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = model.head.weight.numel() if model.head.weight.requires_grad else 0
    return {"method": tuned - head, "classifier": head, "tuned": tuned, "image_encoder": model.encoder_params}


def describe_tuning(model: LiftModel) -> str:
    p = count_params(model)
    method, head = (f"{100 * p[k] / p['image_encoder']:.2f}%" for k in ("method", "classifier"))
    sizes = "".join(f"; {k}={v}" for k, v in model.sizes.items() if k not in ("tuning", "blocks"))
    return (
        f"tuning {model.sizes['tuning']}: {p['method']:,} method + {p['classifier']:,} classifier parameters "
        f"tuned ({method} + {head} of the {p['image_encoder']:,}-parameter image encoder){sizes}"
    )


def atomic_write(path: Path, payload: bytes):
    """Write a temporary file in the same folder, then rename it: a crash never leaves half a file."""
    path, tmp = Path(path), Path(f"{path}.tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LiftError(f"cannot write {path} ({e.strerror}); the previous version, if any, is intact") from None


def atomic_torch_save(path: Path, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


# ==========================================================================================
# PART II. Running a job: main -> parse_config -> run_job -> fit -> a Job for Part I's train and evaluate
# The Job is what lies beyond the method's recipe: seeded batches, resumable mid-epoch and shared among torchrun's
# processes; checkpoints; the signals of a cluster; progress and metrics.jsonl. Then the predict command.


def main(argv=None):
    """Bad input ends in one line (exit 2); a stop signal in one line naming what was saved (130 for Ctrl-C, 143 for
    SIGTERM, 75 for SIGUSR1); a DataLoader worker killed by a signal in one line (exit 1); a bug in its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    Stop.signum, Loader.workers, cfg = None, [], None
    before = {s: signal.signal(s, Stop.on_signal) for s in STOP_CODES}
    try:
        if argv[:1] == ["table"]:
            return table_main(argv[1:])  # Appendix A: the results table
        if argv[:1] == ["predict"]:
            return predict_main(argv[1:])
        cfg = parse_config(argv)
        run_job(cfg)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # before the interpreter exits, or its threads may abort it
    except LiftError as e:
        say(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        for s in STOP_CODES:
            signal.signal(s, signal.SIG_IGN)  # a second signal cannot cut this short
        if rank() == 0:  # under torchrun, the process that wrote the checkpoint
            say(f"\n{Stop.message(cfg)}")
        sys.exit(STOP_CODES[Stop.signum or signal.SIGINT])
    except Exception:  # a worker's death shows as whatever the main process was doing with it
        try:
            lost = lost_worker()
        except RuntimeError:  # torch's SIGCHLD handler reported the same death first
            lost = lost_worker()
        if lost is None:
            raise
        say(f"error: {lost}")
        sys.exit(1)
    finally:  # for a caller in this process (a test, a notebook); a stopped run keeps ignoring signals until it exits
        if cfg is not None and not cfg.eval_only:
            release_lock(run_folder(cfg))
        if Stop.signum is None:
            for s, handler in before.items():
                signal.signal(s, handler)


def say(message: str):
    print(message, file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, no usage block
        raise LiftError(message.replace("argument ", "", 1))


def parse_config(argv=None) -> Config:
    """Flags are Config's fields with dashes; --help shows each field's doc. --resume alone means --resume yes."""
    parser = Parser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        doc, choices = f.metadata["help"], f.metadata["choices"] or None
        if f.default is not None and "default" not in doc:
            doc += f" (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        elif f.name == "resume":
            parser.add_argument(flag(f.name), nargs="?", const="yes", default=f.default, help=doc, choices=choices)
        else:
            kind = {"int": int, "float": float}.get(f.type.split()[0], str)
            parser.add_argument(flag(f.name), type=kind, default=f.default, help=doc, choices=choices)
    return finalize_config(Config(**vars(parser.parse_args(argv))))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def finalize_config(cfg: Config) -> Config:
    """Check every flag, then derive the defaults that depend on others; nothing changes a Config afterwards. A model's
    spelling is made one (ViT-B/16 is ViT-B-16, a file its absolute path): checkpoints compare what the model is."""
    check_flags(cfg)
    if cfg.data in WORLDS:
        cfg = dataclasses.replace(cfg, **world_clip_files(cfg))  # Appendix C: the world brings its own CLIP
    t, full_lr = cfg.tuning, 0.002 if cfg.data == "places_lt" else 0.001
    derived = dict(
        epochs=15 if cfg.data in ("inat2018", *WORLDS) else 5,
        lr={"classifier": 0.03, "full": full_lr, "partial": full_lr}.get(t, 0.02),
        workers=0 if cfg.data in WORLDS else min(8, os.cpu_count() or 1),  # the world: 32 px, in memory
    )
    if cfg.expand is None and cfg.tte:
        derived["expand"] = round(24 * clip_image_size(cfg) / 224)  # 248 at 224; Appendix B
    if cfg.run_name is None and cfg.checkpoint is None:
        derived["run_name"] = f"{Path(cfg.data).name if os.sep in cfg.data else cfg.data}_{t}_seed{cfg.seed}"
    cfg = dataclasses.replace(cfg, **{k: v for k, v in derived.items() if getattr(cfg, k) is None})
    model, pretrained = cfg.model.replace("/", "-"), cfg.pretrained
    if cfg.model.endswith(".json"):
        model = os.path.abspath(os.path.expanduser(cfg.model))
    if os.sep in pretrained and os.path.isfile(os.path.expanduser(pretrained)):  # a path, not a tag
        pretrained = os.path.abspath(os.path.expanduser(pretrained))
    return dataclasses.replace(cfg, model=model, pretrained=pretrained)


def check_flags(cfg: Config):
    """Every value in its choices or range (NaN and inf refused); no flag that this combination would ignore."""
    for f in dataclasses.fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if m["choices"] and value not in m["choices"]:
            raise LiftError(f"{flag(f.name)}: expected one of {', '.join(m['choices'])}, got '{value}'")
        if "low" not in m or value is None:
            continue
        lo, hi, open_lo, open_hi = m["low"], m.get("high"), m.get("open_low"), m.get("open_high")
        span, ok = f"{'>' if open_lo else '>='} {lo}", math.isfinite(value) and (value > lo if open_lo else value >= lo)
        if hi is not None:
            span = f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
            ok = ok and (value < hi if open_hi else value <= hi)
        if not ok:
            kind = "an integer" if "int" in f.type else "a number"
            raise LiftError(f"{flag(f.name)}: expected {kind} {span}, got {value}")
    c, d, t = cfg, Config(), cfg.tuning
    parts = dict(adapter_dim="adaptformer adapter", lora_rank="lora", vpt_len="vpt", partial_blocks="partial")
    for name, methods in dict(parts, mask_ratio="mask", cache_features="classifier").items():
        if getattr(c, name) != getattr(d, name) and t not in methods.split():
            raise LiftError(f"{flag(name)} applies to --tuning {methods.replace(' ', ' / ')} only, not --tuning {t}")
    if "{}" not in c.prompt:
        raise LiftError(f"--prompt '{c.prompt}': the template needs {{}} where the class name goes")
    if c.batch_size % c.accum_steps:
        raise LiftError(f"--batch-size {c.batch_size}: not divisible by --accum-steps {c.accum_steps}")
    if c.blocks is not None and t in ("classifier", "zeroshot", "partial"):
        hint = " (use --partial-blocks)" if t == "partial" else ""
        raise LiftError(f"--blocks: --tuning {t} tunes no vision blocks by index{hint}")
    if t == "zeroshot" and c.init != "semantic":
        raise LiftError(f"--init {c.init}: zero-shot classifies with the text prompts")
    if c.prompt != d.prompt and c.init != "semantic" and t != "zeroshot":
        raise LiftError(f"--prompt: --init {c.init} uses no prompt")
    if c.tau != d.tau and c.loss == "ce":
        raise LiftError("--tau: --loss ce has no logit adjustment (use --loss la)")
    if c.min_scale != d.min_scale and c.mda == "max":
        raise LiftError("--min-scale: --mda max crops the largest square every epoch")
    if c.expand is not None and not c.tte:
        raise LiftError("--expand: --no-tte resizes to S + S // 7 and takes the centre crop")
    if c.splits is not None and c.data not in BENCHMARKS:
        raise LiftError(f"--splits: --data {c.data} has no split lists")
    if c.eval_split == "val" and c.data not in (*WORLDS, "imagenet_lt", "places_lt"):
        raise LiftError(f"--eval-split val: --data {c.data} has no val split")
    if c.inat_level != d.inat_level and c.data != "inat2018":
        raise LiftError("--inat-level: applies to --data inat2018 only")
    if c.root != d.root and (c.data in WORLDS or os.sep in c.data):
        raise LiftError(f"--root: --data {c.data} needs no image root")
    if c.amp in ("bf16", "fp16") and c.device == "cpu":
        raise LiftError(f"--amp {c.amp}: mixed precision runs on GPUs only")
    if c.checkpoint is not None and not c.eval_only:
        raise LiftError("--checkpoint: read by --eval-only only; to continue a training run use --resume")
    if c.eval_only and c.resume != "no":
        raise LiftError("--resume: --eval-only trains nothing to continue")
    if c.eval_only and c.checkpoint and (c.run_name or c.out != d.out):
        raise LiftError("--out / --run-name: --eval-only writes its results beside --checkpoint")
    if c.eval_only and not c.checkpoint and t != "zeroshot":
        raise LiftError("--eval-only: needs --checkpoint FILE (only --tuning zeroshot evaluates without one)")


def run_job(cfg: Config) -> dict:
    """fit, then the evaluation written to results.json; with --check, the inputs checked instead: every listed image
    exists, a sample of each split decodes, and a --resume agrees with its checkpoint."""
    data, model = fit(cfg)
    if not cfg.check:
        report = evaluate(cfg, data, model, Job(cfg, data, model))
        if rank() == 0:
            write_results(cfg, data, model, report)
        return report
    splits = [(split, getattr(data, split)) for split in ("train", "test", "val") if getattr(data, split) is not None]
    for split, images in splits:
        if isinstance(images.images, list):
            missing = [p for p in images.images if not os.path.isfile(p)]
            if missing:
                raise LiftError(f"{len(missing)} of the {len(images)} {split} images are missing, e.g. {missing[0]}")
        for i in np.unique(np.linspace(0, len(images) - 1, min(len(images), 64)).astype(int)):
            images.load(int(i))
    ckpt = run_folder(cfg) / "checkpoint.pt"
    if cfg.resume != "no" and ckpt.exists():
        load_checkpoint(ckpt, cfg, model, resume=True, copy=False)
    where = "--checkpoint" if cfg.eval_only else run_folder(cfg)
    n_files = sum(len(images) for _, images in splits)
    print(f"check passed: flags, {n_files} image files, the weights and {where}; nothing was trained")


def fit(cfg: Config) -> tuple:
    """Build the task and the model, then train it (or, with --eval-only, load --checkpoint): (data, model)."""
    device = prepare_run(cfg)
    data = build_data(cfg)
    print(summarize_data(data, cfg.data))  # Appendix E: counts, groups, notes on the lists
    model = build_model(cfg, data, device)
    if cfg.fast:
        make_fast(model)  # Appendix D: the same values, faster
    if cfg.compile:
        model.compile(dynamic=False)  # Appendix D: a static graph per batch size
    print(describe_tuning(model))
    if cfg.eval_only and cfg.checkpoint:
        model.train_loss = load_checkpoint(cfg.checkpoint, cfg, model)["train_loss"]
    elif not (cfg.eval_only or cfg.check) and cfg.tuning != "zeroshot":
        features = None
        if cfg.cache_features:
            features = frozen_features(model, data, cfg)  # Appendix D
        Stop.in_training = True  # a signal stops the run after its step, with a checkpoint
        try:
            model.train_loss = train(cfg, data, model, Job(cfg, data, model, features))
        finally:
            Stop.in_training = False
        if sum_over_processes(float(Stop.signum is not None))[0]:  # one that came after the last step
            Stop.here()
    return data, model


def run_folder(cfg: Config) -> Path:
    """Where a run writes: --out/--run-name; an --eval-only run writes beside its checkpoint."""
    if cfg.eval_only and cfg.checkpoint:
        return Path(cfg.checkpoint).parent
    return Path(cfg.out) / cfg.run_name


def prepare_run(cfg: Config) -> torch.device:
    """The device; the run folder, locked until the run ends; a checkpoint for --resume, none to overwrite; run.json."""
    import filelock

    device, folder, ckpt = choose_device(cfg), run_folder(cfg), run_folder(cfg) / "checkpoint.pt"
    if cfg.eval_only:
        if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
            raise LiftError(f"--checkpoint {cfg.checkpoint}: no such file")
        return device
    if rank() == 0 and str(folder) not in LOCKS:  # the first process holds the folder, unless it already does
        try:
            folder.mkdir(parents=True, exist_ok=True)
            LOCKS[str(folder)] = filelock.FileLock(folder / "lock")
            LOCKS[str(folder)].acquire(timeout=0)
        except filelock.Timeout:
            del LOCKS[str(folder)]
            raise LiftError(f"{folder}: another run is using this run folder; wait for it to end") from None
        except OSError as e:
            LOCKS.pop(str(folder), None)
            raise LiftError(f"--out / --run-name: cannot write in {folder} ({e.strerror})") from None
    if rank() == 0:
        for tmp in folder.glob("*.tmp*"):  # left by a write that was killed (atomic_write)
            tmp.unlink()
        if cfg.resume == "yes" and not ckpt.exists() and not cfg.check:
            raise LiftError(f"--resume: {folder} holds no checkpoint.pt to continue; drop --resume to start this run")
        if ckpt.exists() and cfg.resume == "no" and cfg.tuning != "zeroshot":
            raise LiftError(f"{ckpt} exists: pass --resume to continue that run, or --run-name NAME for a new one")
        if not cfg.check:  # --check leaves no files behind
            versions = {m: __import__(m).__version__ for m in ("torch", "torchvision", "open_clip", "numpy", "PIL")}
            run = dict(config=dataclasses.asdict(cfg), versions=versions, python=sys.version.split()[0])
            run.update(device=str(device), processes=processes(), argv=sys.argv)
            atomic_write(folder / "run.json", json.dumps(run, indent=1).encode())
    if processes() > 1:
        torch.distributed.barrier()
    return device


LOCKS = {}  # run folder -> the lock this process holds on it


def release_lock(folder: Path):
    lock = LOCKS.pop(str(folder), None)
    if lock is not None:
        lock.release()


class Job:
    """A run's machinery, for Part I's train (start, batches, step_done, epoch_done) and evaluate (in_order, gather)."""

    def __init__(self, cfg: Config, data: LTData, model: LiftModel = None, features=None):
        self.cfg, self.data, self.model, self.features, self.folder = cfg, data, model, features, run_folder(cfg)
        self.device = torch.device("cpu") if model is None else model.mean.device
        self.losses, self.total, self.seen = [], 0.0, 0  # per-epoch losses; the epoch's loss sum and images so far
        self.share, self.real, self.micro_left, self.saved_at = 1.0, 0, 0, time.time()

    def start(self, model, opt, sched, scaler) -> tuple:
        """(the module to train, first epoch, first step of it): 0, 0, or where the run folder's checkpoint stopped
        (--resume, or --resume auto with a checkpoint), restored exactly."""
        self.optim, epoch, step = (opt, sched, scaler), 0, 0
        self.folder.mkdir(parents=True, exist_ok=True)
        ckpt = self.folder / "checkpoint.pt"
        if self.cfg.resume != "no" and ckpt.exists():
            state = load_checkpoint(ckpt, self.cfg, model, resume=True)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if scaler.is_enabled() and state["scaler"]:  # fp16 only: bf16 and fp32 runs have no scale to restore
                scaler.load_state_dict(state["scaler"])
            self.losses, epoch, step = list(state["train_loss"]), state["epoch"], state["step"]
            self.lr = sched.get_last_lr()[0]  # the epoch's lr, for its metrics line if no step of it is left
            if rank() == 0:  # the epoch's loss so far is counted once, by one process
                self.total, self.seen = state["epoch_loss"]
            print(f"resuming {ckpt} after {checkpoint_place(state, self.cfg.epochs)}")
        if self.cfg.compile and self.features is None:  # Appendix D: every batch size compiled before the clock
            B, n = self.cfg.batch_size, len(self.data.train)
            shares = {math.ceil(min(B, n - i) / processes()) for i in range(0, n, B)}  # a process's share of a step
            sizes = {size for images in shares for size in self.micro_batches(images)}
            compile_warmup(model, sizes, autocast_dtype(self.cfg, self.device))
        steps = math.ceil(len(self.data.train) / self.cfg.batch_size)
        self.progress = Progress(self.cfg, steps, self.folder / "metrics.jsonl", epoch * steps + step)
        if self.features is not None:  # Appendix D: the classifier trains on cached features
            return distributed(model.head, self), epoch, step
        return distributed(model, self), epoch, step

    def batches(self, dataset, epoch: int, start: int):
        """The epoch's optimiser steps from step `start` on, on the device: batch_size images each, of one permutation
        seeded by (seed, epoch) as RandomSampler draws it; under torchrun each process loads its share of each."""
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        order, B, workers = order.tolist(), self.cfg.batch_size, self.cfg.workers
        if self.features is not None:  # Appendix D: cached features of centre views, no crops
            dataset, workers = torch.utils.data.TensorDataset(self.features[0][:, None], self.features[1]), 0
        dataset, collate = gpu_jpeg_views(dataset, self.cfg, self.device)  # Appendix D: --gpu-decode
        sampler, pin = ShardedBatches(order, B, start), self.device.type == "cuda"
        loader = Loader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin, collate_fn=collate)
        for j, (views, y) in enumerate(self.progress.timed(loader), start):
            batch = order[j * B : (j + 1) * B]
            self.real = len(batch[rank() :: processes()])
            y[self.real :] = -100  # the share's padding (ShardedBatches), which the loss ignores
            self.share, self.micro_left = len(y) / len(batch), len(self.micro_batches(len(y)))  # for distributed
            yield self.on_device(views), y

    def on_device(self, views) -> torch.Tensor:
        if isinstance(views, JpegBatch):
            return views.decode(self.device)  # Appendix D: --gpu-decode
        return views.to(self.device, non_blocking=True)

    def micro_batches(self, images: int) -> list:
        """The sizes of Part I's micro-batches of a step of `images` images (its chunks for --accum-steps)."""
        return [len(c) for c in torch.arange(images).chunk(self.cfg.accum_steps)]

    def step_done(self, epoch: int, step: int, loss_sum: torch.Tensor, lr: float):
        """After each optimiser step: the loss (summed on the device), progress, checkpoints, signals. Under torchrun
        the processes agree on stopping with one all-reduce; one process never waits for the device here."""
        self.total, self.seen, self.lr = self.total + loss_sum, self.seen + self.real, lr
        self.progress.step(epoch, step, self.mean_loss, lr)
        due = self.cfg.save_every > 0 and time.time() - self.saved_at > 60 * self.cfg.save_every
        stop, due = sum_over_processes(float(Stop.signum is not None), float(due))  # all stop at the same step
        if due or stop:
            self.save(epoch, step)
        if stop:
            Stop.here()

    def mean_loss(self) -> float:
        total, seen = sum_over_processes(float(self.total), self.seen)
        return total / seen

    def epoch_done(self, epoch: int):
        self.losses.append(self.mean_loss())
        self.total, self.seen = 0.0, 0
        self.progress.epoch_end(epoch, self.losses[-1], self.lr)
        self.save(epoch + 1, 0)

    def save(self, epoch: int, step: int):
        """The checkpoint after `step` steps of epoch `epoch` (0: the epoch is complete), written by the first process:
        where the run is, the optimiser, schedule and scaler, the epoch's loss so far, the run's config, the tuned
        tensors, the class names and counts (predict reads them). No RNG state: crops and order come from generators
        seeded by (seed, epoch, image)."""
        self.saved_at, (opt, sched, scaler), data = time.time(), self.optim, self.data
        loss_so_far = sum_over_processes(float(self.total), self.seen)
        if rank() == 0:
            state = dict(epoch=epoch, step=step, train_loss=self.losses, epoch_loss=loss_so_far)
            state.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict())
            state.update(config=dataclasses.asdict(self.cfg), tuned=tuned_state(self.model))
            state.update(classnames=list(data.classnames), train_counts=[int(n) for n in data.train_counts])
            atomic_torch_save(self.folder / "checkpoint.pt", state)
        if processes() > 1:
            torch.distributed.barrier()

    def in_order(self, dataset, batch_size: int):
        """Evaluation's batches on the device, in dataset order; under torchrun this process's contiguous share."""
        n, W, r = len(dataset), processes(), rank()
        share = list(range(r * n // W, (r + 1) * n // W))
        batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
        dataset, collate = gpu_jpeg_views(dataset, self.cfg, self.device)  # Appendix D
        for views, y in Loader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=self.cfg.workers):
            yield self.on_device(views), y

    def gather(self, outputs: list, labels: list) -> tuple:
        """Every process's outputs and labels, in dataset order."""
        shares = [(outputs, labels)]
        if processes() > 1:
            shares = [None] * processes()
            torch.distributed.all_gather_object(shares, (outputs, labels))
        return torch.cat([o for out, _ in shares for o in out]), torch.cat([y for _, ys in shares for y in ys])


# Checkpoints: the tuned tensors and the run's config; a run that loads one must be the same model and task


def tuned_state(model: nn.Module) -> dict:
    """What a checkpoint holds of the model: the tuned parameters (and random-mask indices), never frozen CLIP."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.cpu().clone() for n, b in model.named_buffers() if n.endswith(".index")})
    return state


# flags a resumed run may change: how it runs, not what it computes
RESUME_MAY_CHANGE = tuple(
    "resume check workers log_every eval_batch_size device tte expand root splits cache out save_every gpu_decode "
    "compile".split()
)
SAME_MODEL = ("data", "model", "pretrained", "quick_gelu", "tuning")  # what --eval-only and predict must match


def load_checkpoint(path, cfg: Config, model: LiftModel, resume: bool = False, copy: bool = True) -> dict:
    """A checkpoint's state, its tuned tensors copied into the model. It must come from a run of the same model and
    task (to resume: of every setting but RESUME_MAY_CHANGE's); a refusal names the settings that differ."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["config"]
    except Exception as e:  # a truncated file, another program's file, a folder
        raise LiftError(f"checkpoint {path}: not a lift_plus checkpoint ({str(e).splitlines()[0][:200]})") from None
    keys = [k for k in dataclasses.asdict(cfg) if k not in RESUME_MAY_CHANGE]
    if not resume:
        keys = [*SAME_MODEL, *(["seed"] if cfg.pretrained == "none" else [])]  # random frozen weights: their seed
    diff = "; ".join(
        f"{flag(k)} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in keys if saved.get(k) != getattr(cfg, k)
    )
    if diff and resume:
        raise LiftError(
            f"--resume: {path} was written with other settings ({diff}); resume with the run's own "
            "settings, or start a new run with --run-name NAME"
        )
    if diff:
        raise LiftError(f"checkpoint {path} was written by another model or task ({diff})")
    own = tuned_state(model)
    if set(own) != set(state["tuned"]) or any(own[k].shape != state["tuned"][k].shape for k in own):
        raise LiftError(f"checkpoint {path}: its tuned parameters do not match this model's")
    if copy:
        with torch.no_grad():
            params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
            for k, v in state["tuned"].items():
                (params[k] if k in params else buffers[k]).copy_(v)
    return state


def checkpoint_place(state: dict, epochs: int) -> str:
    """Where a checkpoint stands: 'epoch 5/15', or 'epoch 5/15 + 10 steps' within the next epoch."""
    if state["step"]:
        return f"epoch {state['epoch']}/{epochs} + {state['step']} steps"
    return f"epoch {state['epoch']}/{epochs}"


def write_results(cfg: Config, data: LTData, model: LiftModel, report: dict):
    """results.json (strict JSON: null for a group without test images); a re-evaluation (--eval-only) writes beside
    the training run's results.json instead of replacing it."""
    name = "results.json"
    if cfg.eval_only:
        name = f"results_eval_{f'tte{cfg.expand}' if cfg.tte else 'centre'}.json"
    results = dict(config=dataclasses.asdict(cfg), metrics={k: report[k] for k in ("overall", "many", "medium", "few")})
    results.update(params=count_params(model), train_loss=model.train_loss, classnames=list(data.classnames))
    results.update(train_counts=[int(n) for n in data.train_counts], per_class_accuracy=report["per_class"])
    atomic_write(run_folder(cfg) / name, json.dumps(results, indent=1, allow_nan=False).encode())
    print(f"wrote {run_folder(cfg) / name}")
    release_lock(run_folder(cfg))  # the run is complete


# Signals: SLURM, Kubernetes and a terminal send them to every process of the job, DataLoader workers included

STOP_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 75}  # 75: EX_TEMPFAIL, "requeue me"


class Stop:
    """The signal that stops the run: the first Ctrl-C, SIGTERM or SIGUSR1 to reach this process, sent to it or passed
    on by a DataLoader worker; later ones change nothing. In training the loop reads it after each step (Job.step_done),
    writes a checkpoint and stops; anywhere else on_signal stops the run at once."""

    signum = None
    in_training = False

    @staticmethod
    def on_signal(signum, frame):
        if Stop.signum is not None:
            return
        Stop.signum = signum
        if not Stop.in_training:
            raise KeyboardInterrupt
        say(f"\n{signal.Signals(signum).name}: stopping after this step")

    @staticmethod
    def here():
        """Stop the run now (main prints what was saved). Under torchrun a process that got no signal itself stops
        because another one did: it ends as for SIGTERM."""
        if Stop.signum is None:
            Stop.signum = signal.SIGTERM
        raise KeyboardInterrupt

    @staticmethod
    def message(cfg) -> str:
        """What an interrupted run has saved, read from its checkpoint."""
        if cfg is None or cfg.eval_only or not (run_folder(cfg) / "checkpoint.pt").is_file():
            return "interrupted before any epoch finished: nothing to resume"
        ckpt = run_folder(cfg) / "checkpoint.pt"
        state = torch.load(ckpt, weights_only=True, mmap=True)  # mapped: only the two counters are read
        return f"interrupted; {checkpoint_place(state, cfg.epochs)} is in {ckpt}: continue with --resume"


def pass_signals_on(parent: int, worker_id: int):
    """A DataLoader worker passes a stop signal on to its main process, so that a signal to the whole process group,
    or to one worker, stops the run as one to the main process does. The signals stay blocked in the worker (Loader
    starts it so) and a thread takes them; a SIGTERM from the main process itself is the DataLoader ending its worker.
    Without sigwaitinfo (macOS) the worker ignores them: a signal to the group still reaches the main process."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_CODES)  # already so where the worker was forked
    if not hasattr(signal, "sigwaitinfo"):
        for s in STOP_CODES:
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_CODES)
        return

    def relay():
        while True:
            info = signal.sigwaitinfo(STOP_CODES)
            if info.si_pid == parent:
                os._exit(0)
            os.kill(parent, info.si_signo)

    def quiet_lost_connections(kind, error, traceback):
        """The thread that serves this worker's tensors loses its connection when another worker is killed and the
        main process stops: the main process says why (lost_worker). Any other error is printed."""
        if not issubclass(kind, ConnectionError):
            sys.__excepthook__(kind, error, traceback)

    threading.Thread(target=relay, daemon=True).start()
    sys.excepthook = quiet_lost_connections


class Loader(torch.utils.data.DataLoader):
    """Every DataLoader of a run. Its workers start with the stop signals blocked and pass them on (pass_signals_on).
    Bad input met in a worker (a LiftError) comes back as the batch and is raised here, whole. `workers` keeps the last
    workers started, so that main can name one that a signal killed."""

    workers = []

    def __init__(self, dataset, *args, collate_fn=None, **kwargs):
        worker_init = functools.partial(pass_signals_on, os.getpid())
        batches = CollatedOrError(dataset, collate_fn or torch.utils.data.default_collate)
        super().__init__(batches, *args, collate_fn=CollatedOrError.as_fetched, worker_init_fn=worker_init, **kwargs)

    def __iter__(self):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_CODES)
        try:
            batches = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        Loader.workers = getattr(batches, "_workers", [])  # the worker processes (torch has no public name)
        for batch in batches:
            if isinstance(batch, LiftError):
                raise batch
            yield batch


class CollatedOrError(torch.utils.data.Dataset):
    """A dataset whose DataLoader fetches a whole batch at once (__getitems__): the collated batch, or the LiftError
    that one of its items raised (a worker would send that back only as text)."""

    def __init__(self, dataset, collate):
        self.dataset, self.collate = dataset, collate

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, indices: list):
        try:
            return self.collate([self.dataset[i] for i in indices])
        except LiftError as e:
            return e

    @staticmethod
    def as_fetched(batch):  # the DataLoader's collate_fn: __getitems__ has collated already
        return batch


def lost_worker() -> str | None:
    """What killed a DataLoader worker, if a signal did (the kernel's out-of-memory killer sends SIGKILL). The main
    process can see the death before the worker has ended, so this looks for 1 s, with torch's SIGCHLD handler set
    aside: it would report the same death again, with a traceback."""
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for _ in range(100):
        for w in Loader.workers:
            if w.exitcode is not None and w.exitcode < 0:
                for other in Loader.workers:  # ended now, quietly, before this process closes their connections
                    other.terminate()
                    other.join(1)
                return (
                    f"a DataLoader worker (pid {w.pid}) was killed by {signal.Signals(-w.exitcode).name}, not by a "
                    "signal to the run (out of memory? try fewer --workers); continue with --resume"
                )
        time.sleep(0.01)
    signal.signal(signal.SIGCHLD, handler)
    return None


# torchrun: `torchrun --nproc_per_node N lift_plus.py ...` runs PyTorch's DistributedDataParallel; every optimiser
# step sees the images and crops of the single-process run, and one process is exactly it.


def processes() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def choose_device(cfg: Config) -> torch.device:
    """--device; under torchrun (WORLD_SIZE > 1) the process group (NCCL on GPUs, gloo on CPUs), this process's GPU,
    and quiet standard output on every process but the first."""
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not torch.distributed.is_initialized():
            # torchrun's agent keeps one store across restarts: a restarted group's keys need their own prefix, or a
            # process reads the address of a process that died
            store, r, world_size = next(torch.distributed.rendezvous("env://"))
            attempt = torch.distributed.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
            torch.distributed.init_process_group(
                "nccl" if cuda else "gloo", store=attempt, rank=r, world_size=world_size
            )
        if rank() > 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)
        if not cuda:
            return torch.device("cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    device = torch.device("cuda" if cuda else "cpu")
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise LiftError(f"--device {cfg.device}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LiftError(f"--device {cfg.device}: no CUDA GPU is available on this machine")
    return device


class ShardedBatches(torch.utils.data.Sampler):
    """Batches of the indices `order` from batch `start` on. Under torchrun process r takes items r, r + W, ... of
    every batch, so each step sees the images, and the crops, of the single-process run; a shorter share is padded
    with the batch's first image (Job.batches labels it -100), so that every process runs the same passes."""

    def __init__(self, order: list, batch_size: int, start: int = 0):
        self.order, self.batch_size, self.start = order, batch_size, start

    def __len__(self):
        return math.ceil(len(self.order) / self.batch_size) - self.start

    def __iter__(self):
        for i in range(self.start * self.batch_size, len(self.order), self.batch_size):
            batch = self.order[i : i + self.batch_size]
            share = batch[rank() :: processes()]
            yield share + [batch[0]] * (math.ceil(len(batch) / processes()) - len(share))


def distributed(module: nn.Module, job: Job):
    """The module to train: itself in one process; under torchrun DistributedDataParallel, which reduces the gradients
    once per optimiser step, in its last micro-batch (no_sync before it). Each process's loss is the mean over its
    share of the step (padding included), so the gradient of the mean over the step's images is the sum over processes
    of (share / step images) x gradient: DDP's reduction hook, weighted_sum."""
    if processes() == 1:
        return module
    device = next(module.parameters()).device
    ids = [device] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)  # constants

    def weighted_sum(job: Job, bucket):
        buf = bucket.buffer().mul_(job.share)
        return torch.distributed.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

    def forward(x):
        job.micro_left -= 1
        if job.micro_left > 0:
            with ddp.no_sync():
                return ddp(x)
        return ddp(x)

    ddp.register_comm_hook(job, weighted_sum)
    return forward


def sum_over_processes(*values: float) -> list:
    """Each value summed over the processes (the values themselves in one process)."""
    if processes() == 1:
        return list(values)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    both = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(both)
    return both.tolist()


class Progress:
    """A tqdm bar over the run's images (images per second, time left) with the loss, the lr and the share of time
    spent waiting for data, refreshed every --log-every steps; a line per epoch in metrics.jsonl."""

    def __init__(self, cfg: Config, steps: int, path: Path, done: int = 0):
        from tqdm import tqdm

        self.cfg, self.steps, self.path, self.start, self.wait, self.images = cfg, steps, path, time.time(), 0.0, 0
        total, done = cfg.epochs * steps * cfg.batch_size, done * cfg.batch_size
        self.bar = tqdm(total=total, initial=done, unit="img", unit_scale=True, file=sys.stdout, disable=rank() > 0)

    def timed(self, loader):
        """The loader's batches, measuring the wait for each."""
        t = time.time()
        for views, y in loader:
            self.wait += time.time() - t
            self.images += len(y) * processes()
            yield views, y
            t = time.time()

    def step(self, epoch: int, step: int, loss, lr: float):
        if step % self.cfg.log_every and step != self.steps:
            return
        self.bar.n = (epoch * self.steps + step) * self.cfg.batch_size
        wait = 100 * self.wait / (time.time() - self.start)
        self.bar.set_postfix_str(f"epoch {epoch + 1}, loss {loss():.4f}, lr {lr:.5f}, data wait {wait:.0f}%")

    def epoch_end(self, epoch: int, loss: float, lr: float):
        import resource

        seconds, peak = time.time() - self.start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        if sys.platform != "darwin":  # macOS reports bytes
            peak *= 1024
        if torch.cuda.is_initialized():
            peak = torch.cuda.max_memory_allocated()
        line = dict(epoch=epoch + 1, loss=loss, lr=lr, images_per_s=self.images / seconds)
        line.update(data_wait=self.wait / seconds, epoch_s=seconds, peak_memory_gib=peak / 2**30)
        if rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        self.start, self.wait, self.images = time.time(), 0.0, 0
        if epoch + 1 == self.cfg.epochs:
            self.bar.close()


def predict_main(argv: list):
    """python lift_plus.py predict --checkpoint runs/x/checkpoint.pt IMAGES... [--top-k 5] [--out preds.csv]:
    the top-k classes and probabilities of image files (or folders of them), with the run's test views (TTE)."""
    p = Parser(prog="lift_plus.py predict", description=predict_main.__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="image files, or folders searched at any depth")
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by a training run")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--out", help="a .csv or .json file (default: CSV on standard output)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    a = p.parse_args(argv)
    if a.top_k < 1:
        raise LiftError(f"--top-k: expected an integer >= 1, got {a.top_k}")
    if not Path(a.checkpoint).is_file():
        raise LiftError(f"--checkpoint {a.checkpoint}: no such file")
    try:
        state = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
    except Exception:
        raise LiftError(f"--checkpoint {a.checkpoint}: not a lift_plus checkpoint with its run's settings") from None
    prompt = saved["prompt"] if saved["init"] == "semantic" else Config().prompt  # the classifier is the checkpoint's
    run = dict(resume="no", run_name=None, out=Config().out, device=a.device, workers=a.workers, amp="auto")
    run.update(compile=False, init="semantic", prompt=prompt, eval_only=True, checkpoint=a.checkpoint)
    cfg = finalize_config(dataclasses.replace(Config(**saved), **run))
    paths = []
    for item in map(Path, a.images):
        if not item.exists():
            raise LiftError(f"{item}: no such file or folder")
        paths += image_files(item) if item.is_dir() else [str(item)]
    if not paths:
        raise LiftError(f"{', '.join(a.images)}: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    data = LTData(ImageSet([], []), ImageSet([], []), state["classnames"], np.asarray(state["train_counts"]))
    with contextlib.redirect_stdout(sys.stderr):  # standard output is for the predictions
        model = build_model(cfg, data, prepare_run(cfg))
    if cfg.fast:
        make_fast(model)  # Appendix D
    load_checkpoint(a.checkpoint, cfg, model)
    views = Views(ImageSet(paths, [0] * len(paths)), test_views(cfg, model.image_size))  # the run's own test views
    logits, _ = over_dataset(lambda v: tte_logits(model, v), model, views, cfg)
    prob, top = logits.softmax(dim=1).topk(min(a.top_k, data.num_classes), dim=1)  # [N, k]
    tops = [[(data.classnames[c], round(q, 6)) for c, q in zip(t, pr)] for t, pr in zip(top.tolist(), prob.tolist())]
    if a.out and a.out.endswith(".json"):
        rows = [{"image": p, "top": [{"class": c, "probability": q} for c, q in t]} for p, t in zip(paths, tops)]
        return atomic_write(Path(a.out), json.dumps(rows, indent=1).encode())
    import csv

    buf = io.StringIO()
    header = ["image"] + [f"{x}_{i + 1}" for i in range(top.shape[1]) for x in ("class", "probability")]
    csv.writer(buf).writerows([header] + [[p] + [v for pair in t for v in pair] for p, t in zip(paths, tops)])
    if a.out:
        return atomic_write(Path(a.out), buf.getvalue().encode())
    print(buf.getvalue(), end="")


if __name__ == "__main__":
    main()
