"""LIFT+: Lightweight Fine-Tuning for Long-Tail Learning, in one file.

Shi, Wei, Li, "LIFT+: Lightweight Fine-Tuning for Long-Tail Learning", arXiv 2504.13282.
Heavy fine-tuning of a foundation model on long-tailed data makes the train and test class-conditional
feature distributions of the tail classes disagree, which biases predictions toward the head classes
(Proposition 3.1). LIFT+ keeps CLIP frozen and tunes < 1 % of its parameters for a few epochs:

    frozen CLIP ViT + AdaptFormer in every block              [paper: lightweight fine-tuning]
                    + cosine classifier from text prompts     [paper: semantic-aware initialization]
                    + logit-adjusted cross-entropy            [paper: Proposition 3.1 and its remark]
                    + minimalist data augmentation (MDA)      [paper: minimalist data augmentation]
                    + test-time ensembling of five crops      [paper: test-time ensembling]

Part I is the method alone, in the order it runs: 1 Config, 2 Data, 3 Transforms, 4 Model, 5 Loss, 6 Training,
7 Evaluation, 8 Main. The appendices plug into Part I at lines marked "# Appendix X":
    A  the paper's baselines: other tuning methods, classifier inits, the results table
    B  weights, split lists and class names offline: downloads, OpenAI's TorchScript file
    C  the offline world: a tiny CLIP and a long-tailed task that run on a laptop CPU
    D  speed: the same values, computed faster
    E  reliability: every input checked, checkpoints and exact resume, the run's files
    F  past one GPU and one run: torchrun, metrics.jsonl, predict, iNaturalist's taxonomy levels

Quick start (CPU, no network):  python lift_plus.py --data shapes_lt
Paper setting (GPU, internet):  python lift_plus.py --data imagenet_lt --root /data/imagenet
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __name__ == "__main__":  # Ctrl-C while torch loads ends in one line too, as in every later phase (clean_exit)
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("\ninterrupted while starting: nothing to resume", file=sys.stderr) or 130))

import numpy as np  # noqa: E402 (below the guard)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

# ==========================================================================================
# PART I. LIFT+, in the order it runs
# ==========================================================================================
# 1. Config: the paper's hyper-parameters first, then the settings of a run


def arg(default, help, **check):
    """A config field with its one-line doc (also its --help text); check: choices, or a range (see check_value)."""
    return field(default=default, metadata={"help": help, **check})


@dataclass
class Config:
    # the method [paper: the LIFT+ framework]; None: derived in finalize_config
    tuning: str = arg("adaptformer", "what trains: LIFT+'s AdaptFormer, or a baseline of Appendix A", choices=(
        "adaptformer", "classifier", "full", "partial", "bitfit", "vpt", "adapter", "lora", "mask", "zeroshot"))
    adapter_dim: Optional[int] = arg(None, "AdaptFormer / Adapter bottleneck r (default 2**max(0, floor(log2(K / 2L))))", low=1)
    init: str = arg("semantic", "classifier init: text prompts, or a baseline of Appendix A", choices=("semantic", "class_mean", "linear_probe", "none"))
    prompt: str = arg("a photo of a {}.", "prompt template of the semantic init and zero-shot; {} is the class name")
    logit_scale: float = arg(25.0, "cosine classifier scale s: logit_j = s * cos(f, w_j)", low=0, open_low=True)
    loss: str = arg("la", "la (logit-adjusted cross-entropy) | ce", choices=("la", "ce"))
    tau: float = arg(1.0, "logit-adjustment strength tau", low=0)
    epochs: Optional[int] = arg(None, "training epochs (default 5; 15 for inat2018 and shapes_lt)", low=1)
    batch_size: int = arg(128, "images per optimiser step", low=1)
    lr: Optional[float] = arg(None, "SGD learning rate (default 0.02; classifier 0.03; full, partial 0.001 (places_lt 0.002))", low=0, open_low=True)
    momentum: float = arg(0.9, "SGD momentum", low=0, high=1, open_high=True)
    weight_decay: float = arg(5e-4, "SGD weight decay on every tuned parameter", low=0)
    mda: str = arg("convex", "MDA schedule of the smallest crop area", choices=("convex", "linear", "concave", "min", "max"))
    min_scale: float = arg(0.08, "smallest crop area fraction of MDA (at the first epoch)", low=0, high=1, open_low=True)
    tte: bool = arg(True, "test-time ensembling: resize to S + expand, average the logits of five S crops")
    expand: Optional[int] = arg(None, "TTE resize: shorter side to image size S + expand (default round(24 S / 224): 248 for 224)", low=0)
    model: str = arg("ViT-B-16", "open_clip ViT name (ViT-B/16 spelling accepted) or an open_clip model-config JSON")
    pretrained: str = arg("openai", "open_clip pretrained tag, a local weights file, or 'none' for random weights")
    quick_gelu: str = arg("auto", "QuickGELU activation (OpenAI's CLIP uses it; auto follows the weights)", choices=("auto", "yes", "no"))
    # sizes of the baselines (Appendix A); each is refused for a method without that part
    blocks: Optional[str] = arg(None, "vision blocks the method acts on, e.g. '0-11' or '8,9,10,11' (default: all)")
    partial_blocks: Optional[int] = arg(None, "partial: number of last vision blocks to tune (default 1)", low=0)
    lora_rank: Optional[int] = arg(None, "lora: rank on q and v (default 2**max(0, floor(log2(K / 4L))))", low=1)
    vpt_len: Optional[int] = arg(None, "vpt: deep prompt length per block (default 2**max(0, floor(log2(K / L))))", low=1)
    mask_ratio: Optional[float] = arg(None, "mask: fraction of entries tuned per block weight (default 0.005)", low=0, high=1, open_low=True)
    # the run
    data: str = arg("imagenet_lt", "imagenet_lt | places_lt | inat2018 | cifar100_ir{100,50,10} | shapes_lt | a folder with train/<class>/ and test/<class>/")
    root: str = arg("./data", "dataset root: image paths in the split lists are relative to it; CIFAR-100 is downloaded here")
    splits: Optional[str] = arg(None, "folder holding the split lists (default: --root, then the cache, then download)")
    inat_level: str = arg("species", "inat2018: the taxonomy level of the labels (Appendix F)",
                          choices=("kingdom", "phylum", "class", "order", "family", "genus", "species"))
    cache: str = arg(os.environ.get("LIFT_PLUS_CACHE", "~/.cache/lift_plus"), "split lists and the world's CLIP (env LIFT_PLUS_CACHE)")
    out: str = arg("runs", "parent folder of run folders")
    run_name: Optional[str] = arg(None, "run folder name (default <data>_<tuning>_seed<seed>)")
    resume: bool = arg(False, "continue the run in the run folder from its last checkpoint")
    eval_only: bool = arg(False, "no training: evaluate --checkpoint (or the untrained model of --tuning zeroshot)")
    checkpoint: Optional[str] = arg(None, "checkpoint file to evaluate with --eval-only")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    amp: str = arg("auto", "mixed precision on GPUs (auto: bf16 where supported, else fp16)", choices=("auto", "bf16", "fp16", "off"))
    accum_steps: int = arg(1, "micro-batches per optimiser step (gradient accumulation); must divide --batch-size", low=1)
    eval_batch_size: int = arg(128, "images per evaluation batch (TTE runs five crops of each)", low=1)
    workers: Optional[int] = arg(None, "DataLoader worker processes (default min(8, CPUs); 0 for shapes_lt)", low=0)
    fast: bool = arg(True, "Appendix D: class-token-only last block and a leaner QuickGELU (same values)")
    cache_features: bool = arg(False, "Appendix D, --tuning classifier: frozen features of centre views computed once (no MDA)")
    seed: int = arg(0, "seed of the model init, the data order and the crops", low=0, high=2 ** 31 - 1)
    log_every: int = arg(50, "print a progress line every this many optimiser steps", low=1)
    check: bool = arg(False, "check every input, the weights and the run folder, print the summary and exit (seconds)")


def finalize_config(cfg: Config) -> Config:
    """Check every flag, then derive every default that depends on others. The one writer of a Config:
    nothing changes it afterwards, and results.json records it as it is here."""
    check_flags(cfg)                                                # Appendix E: every value and combination
    if cfg.data == "shapes_lt":
        cfg = dataclasses.replace(cfg, **world_clip_files(cfg))     # Appendix C: the world brings its own CLIP
    full_lr = 0.002 if cfg.data == "places_lt" else 0.001
    t = cfg.tuning
    derived = dict(epochs=15 if cfg.data in ("inat2018", "shapes_lt") else 5, lr={"classifier": 0.03, "full": full_lr, "partial": full_lr}.get(t, 0.02),
                   partial_blocks=1 if t == "partial" else None, mask_ratio=0.005 if t == "mask" else None,
                   expand=cfg.expand if cfg.expand is not None else round(24 * clip_image_size(cfg) / 224),  # 248 at 224; Appendix B
                   workers=0 if cfg.data == "shapes_lt" else min(8, os.cpu_count() or 1),  # the world: 32 px in memory
                   run_name=None if cfg.checkpoint else f"{Path(cfg.data).name if os.sep in cfg.data else cfg.data}_{t}_seed{cfg.seed}")
    return dataclasses.replace(cfg, **{k: v for k, v in derived.items() if getattr(cfg, k) is None})


# ==========================================================================================
# 2. Data: the long-tailed benchmarks [paper: experiments]


@dataclass
class LTData:
    """A long-tailed task: training and test sets, class names, per-class training counts."""
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classnames: list
    train_counts: np.ndarray                                        # [K] training images per class

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


class ImageSet(torch.utils.data.Dataset):
    """Labelled images: file paths read lazily, or a uint8 array [N, H, W, 3] in memory (CIFAR, the offline world)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, list(labels)

    def __len__(self):
        return len(self.labels)

    def load(self, i) -> torch.Tensor:                              # -> [3, H, W] uint8
        if isinstance(self.images, np.ndarray):
            return torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return read_image(self.images[i])


def read_image(path) -> torch.Tensor:
    """Decode an image file to RGB uint8 [3, H, W], naming the file if it cannot."""
    try:
        raw = Path(path).read_bytes()
        img = decode_jpeg_fast(raw)                                 # Appendix D: TorchCodec for JPEGs, else None
        if img is None:                                             # PIL; Appendix E: any image mode to RGB
            img = torch.from_numpy(to_rgb_array(Image.open(io.BytesIO(raw)))).permute(2, 0, 1)
        return img
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LiftError(f"cannot read image {path}: {e}") from None


def read_split_list(path, root, num_classes=None):
    """Parse a "relative/path label" split list; a bad line is reported as file:line."""
    paths, labels = [], []
    with open(path, errors="surrogateescape") as f:                 # file names are bytes: keep them as they are
        for lineno, parts in ((i, line.split()) for i, line in enumerate(f, 1) if line.strip()):
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise LiftError(f"{path}:{lineno}: expected '<relative/image/path> <integer label>', got '{' '.join(parts)}'")
            label = int(parts[1])
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise LiftError(f"{path}:{lineno}: label {label} is outside the class range 0..{num_classes - 1}")
            paths.append(os.path.join(root, parts[0].lstrip("/")))
            labels.append(label)
    if not labels:
        raise LiftError(f"{path}: the split list is empty")
    return paths, labels


def build_benchmark(cfg: Config) -> LTData:
    """ImageNet-LT, Places-LT or iNaturalist 2018 from their split lists [paper: datasets]."""
    if not Path(cfg.root).is_dir():
        raise LiftError(f"--root {cfg.root}: no such folder (expected the dataset's image root)")
    files = find_split_files(cfg)                                   # Appendix B: --splits, --root, cache or download
    to_label = None
    if cfg.data == "imagenet_lt":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # CLIP's curated ImageNet names
        classnames = list(IMAGENET_CLASSNAMES)
    elif cfg.data == "places_lt":
        classnames = read_places_classnames(files["classnames.txt"])  # Appendix B: the class-name files
    else:                                                           # Appendix B; F: --inat-level
        classnames, to_label = read_inat_categories(files["categories.json"], cfg.inat_level)
    splits = {}
    for split in ("train", "test"):                                # test: iNaturalist 2018's val list (SPLIT_LISTS)
        paths, labels = read_split_list(files[split], cfg.root, len(to_label or classnames))
        if to_label is not None:
            unknown = sorted(set(labels) - set(to_label))
            if unknown:
                raise LiftError(f"{files[split]}: category ids {unknown[:5]} are not in {files['categories.json']}")
            labels = [to_label[y] for y in labels]
        splits[split] = ImageSet(paths, labels)
    counts = np.bincount(splits["train"].labels, minlength=len(classnames))
    return LTData(splits["train"], splits["test"], classnames, counts)


def cifar100_lt_counts(ratio, num_classes=100, max_count=500) -> list:
    """Images kept per class in CIFAR-100-LT: int(500 * (1/ratio) ** (i / 99)) (Cao et al., 2019)."""
    return [int(max_count * (1 / ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]


def make_long_tailed(labels, counts, seed=0) -> np.ndarray:
    """Indices of the long-tailed subset: per class in class order, the first counts[c] after a shuffle by
    one numpy RandomState(seed), which reproduces the commonly used CIFAR-100-LT split."""
    labels, rng = np.asarray(labels, dtype=np.int64), np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep)


def build_cifar100_lt(cfg: Config) -> LTData:
    """CIFAR-100-LT at imbalance ratio 100, 50 or 10; the test set is CIFAR-100's, unchanged."""
    train, test = load_cifar100(cfg)                                # Appendix B: download, or a clear error
    counts = cifar100_lt_counts(int(cfg.data.split("_ir")[1]))
    keep = make_long_tailed(train.targets, counts, seed=0)
    return LTData(ImageSet(train.data[keep], np.asarray(train.targets)[keep]), ImageSet(test.data, test.targets),
                  list(train.classes), np.asarray(counts))


BENCHMARKS, CIFAR100_LT = ("imagenet_lt", "places_lt", "inat2018"), ("cifar100_ir100", "cifar100_ir50", "cifar100_ir10")


def build_data(cfg: Config) -> LTData:
    """The task --data names."""
    if cfg.data in BENCHMARKS:
        return build_benchmark(cfg)
    if cfg.data in CIFAR100_LT:
        return build_cifar100_lt(cfg)
    if cfg.data == "shapes_lt":
        return build_world_task(cfg)                                # Appendix C
    return build_folder(cfg)                                        # Appendix E: your own image folders


# ==========================================================================================
# 3. Transforms: [paper: minimalist data augmentation] for training, [paper: test-time ensembling]
#    Images stay uint8 up to the device (the model normalises them); a transform returns views [V, 3, S, S].

MDA_FUNCTIONS = {  # g(t): how fast the smallest crop area rises from min_scale (g = 0) to 1 (g = 1)
    "min": lambda t: 0.0, "max": lambda t: 1.0, "linear": lambda t: t,
    "convex": lambda t: 1.0 - math.sqrt(1.0 - t * t), "concave": lambda t: math.sqrt(1.0 - (1.0 - t) ** 2)}


def mda_min_scale(epoch: int, epochs: int, schedule: str = "convex", min_scale: float = 0.08) -> float:
    """Smallest crop area fraction at `epoch` (0-based): min_scale + g(t) (1 - min_scale), t = e / (E - 1).
    A single epoch is the first epoch, so it gets the first epoch's range (t = 0)."""
    t = epoch / (epochs - 1) if epochs > 1 else 0.0
    return min_scale + MDA_FUNCTIONS[schedule](t) * (1.0 - min_scale)


def mda_crop_box(height: int, width: int, min_scale: float, gen: torch.Generator):
    """A random square (top, left, side) with area fraction uniform in [min_scale, 1], both ends capped
    at the largest inscribed square min(H, W)^2 / (H W); its position is uniform."""
    area, cap = height * width, min(height, width) ** 2 / (height * width)
    lo, hi = min(min_scale, cap), min(1.0, cap)
    target = area * (lo + (hi - lo) * torch.rand(1, generator=gen).item())
    side = min(int(round(math.sqrt(target))), height, width)
    top = int(torch.randint(0, height - side + 1, (1,), generator=gen))
    left = int(torch.randint(0, width - side + 1, (1,), generator=gen))
    return top, left, side


def resize_bicubic(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 [3, H, W]: PIL's BICUBIC filter, within one intensity level."""
    img = img[None].contiguous(memory_format=torch.channels_last)   # torch's uint8 kernel is fastest on this layout
    return F.interpolate(img, size=(height, width), mode="bicubic", antialias=True)[0]  # [3, height, width] uint8


def resize_shorter(img: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size`, the longer one scaled as torchvision's Resize(size) does."""
    h, w = img.shape[-2:]
    return resize_bicubic(img, size, int(size * w / h)) if h <= w else resize_bicubic(img, int(size * h / w), size)


class MDATransform:
    """[paper: minimalist data augmentation] One square random crop resized to S; no flip, no colour. Image i's
    crop at epoch e is seeded by (seed, e, i): the same for any number of workers or processes, and on resume."""

    def __init__(self, size: int, epochs: int, schedule: str, min_scale: float, seed: int):
        self.size, self.epochs, self.schedule, self.min_scale, self.seed, self.epoch = size, epochs, schedule, min_scale, seed, 0

    def __call__(self, img: torch.Tensor, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 100_000_007 + index)
        s_min = mda_min_scale(self.epoch, self.epochs, self.schedule, self.min_scale)
        top, left, side = mda_crop_box(img.shape[1], img.shape[2], s_min, gen)
        return resize_bicubic(img[:, top:top + side, left:left + side], self.size, self.size)[None]  # [1, 3, S, S]


class EvalTransform:
    """Shorter side to `resize`, then the centre S crop; with five_crops [paper: test-time ensembling] the four
    corner crops and the centre one (torchvision's FiveCrop order), whose logits are averaged."""

    def __init__(self, size: int, resize: int, five_crops: bool):
        self.size, self.resize, self.five_crops = size, resize, five_crops

    def __call__(self, img: torch.Tensor, index: int = 0) -> torch.Tensor:
        S, img = self.size, resize_shorter(img, self.resize)        # [3, H', W']
        h, w = img.shape[1:]
        centre = (int(round((h - S) / 2.0)), int(round((w - S) / 2.0)))  # torchvision's centre crop
        boxes = [(0, 0), (0, w - S), (h - S, 0), (h - S, w - S), centre] if self.five_crops else [centre]
        return torch.stack([img[:, y:y + S, x:x + S] for y, x in boxes])  # [5 or 1, 3, S, S]


def test_views(cfg: Config, S: int) -> EvalTransform:
    """The test views: with TTE five crops of the resize to S + expand (224 + 24 = 248), else the centre of S + S // 7 (256)."""
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


# ==========================================================================================
# 4. Model: AdaptFormer in a frozen CLIP ViT [paper: lightweight fine-tuning], and a cosine
#    classifier initialised from text prompts [paper: semantic-aware initialization]


class AdaptFormer(nn.Module):
    """LIFT+'s lightweight module [paper: lightweight fine-tuning]: a bottleneck beside the MLP of a block,
    reading the residual stream h after attention, with a learnable scale s (init 1):
        h = x + Attn(LN1(x));   out = h + MLP(LN2(h)) + s * Up(ReLU(Down(LN_a(h))))
    Up is zero-initialised, so training starts exactly at CLIP."""

    def __init__(self, dim: int, r: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)                                 # LN_a, the adapter's own LayerNorm
        self.down = nn.Linear(dim, r)                               # D -> r, kaiming-uniform weight (nn.Linear's)
        self.up = nn.Linear(r, dim)                                 # r -> D
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(()))                   # s

    def forward(self, h):                                           # [B, N, D] -> [B, N, D]
        return self.scale * self.up(F.relu(self.down(self.ln(h))))


class LiftViT(nn.Module):
    """CLIP's image tower run block by block with open_clip's own attention and MLP, plus AdaptFormer.
    Returns the class token after the final LayerNorm, BEFORE CLIP's image projection."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.adaptformer = nn.ModuleDict()                          # block index -> AdaptFormer (LIFT+)
        self.prompts = nn.ParameterDict()                           # block index -> [P, D] prompts (VPT, Appendix A)
        self.fast = False                                           # Appendix D
        self.width = visual.class_embedding.shape[0]                # D

    def forward(self, x):                                           # x: [B, 3, S, S], normalised
        v, blocks = self.visual, self.visual.transformer.resblocks
        x = v.conv1(x).flatten(2).transpose(1, 2)                   # [B, N-1, D] patch tokens
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))  # [B, N, D]
        for i, blk in enumerate(blocks):
            x = insert_prompts(self, i, x)                          # Appendix A: VPT's prompts; nothing for LIFT+
            last = self.fast and i == len(blocks) - 1               # Appendix D: the last block for the class token only
            x = class_token_block(self, i, blk, x) if last else self.block(i, blk, x)  # [B, N, D] (last: [B, 1, D])
        return v.ln_post(x[:, 0])                                   # [B, D]

    def block(self, i: int, blk, x):
        h = x + blk.ls_1(blk.attention(blk.ln_1(x)))               # h = x + Attn(LN1(x))
        return h + self.mlp_branch(i, blk, h)

    def mlp_branch(self, i: int, blk, h):
        m = blk.ls_2(blk.mlp(blk.ln_2(h)))                          # MLP(LN2(h))
        if str(i) in self.adaptformer:
            m = m + self.adaptformer[str(i)](h)                     # + s * Up(ReLU(Down(LN_a(h))))
        return m


class CosineClassifier(nn.Module):
    """logit_j = s * <f / |f|, w_j / |w_j|>, no bias, s = 25 [paper: semantic-aware initialization]."""

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.clone().float())         # [K, D]
        self.scale = scale

    def forward(self, f):                                           # f: [B, D]
        return self.scale * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).t()  # [B, K]


class LiftModel(nn.Module):
    """uint8 images -> CLIP's normalisation -> LiftViT feature -> cosine classifier."""

    def __init__(self, visual, mean, std, num_classes: int, scale: float, zeroshot: bool = False):
        super().__init__()
        self.encoder = LiftViT(visual)
        self.encoder_params = sum(p.numel() for p in visual.parameters())  # CLIP's own, before any method attaches
        self.image_size = int(np.atleast_1d(visual.image_size)[0])  # S
        self.zeroshot = zeroshot                                    # zero-shot CLIP: the projected feature vs the text
        self.head = CosineClassifier(torch.zeros(num_classes, visual.output_dim if zeroshot else self.encoder.width), scale)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.sizes, self.train_loss = {}, []                        # set by configure_tuning and fit

    def features(self, images):                                     # images: [B, 3, S, S] uint8
        f = self.encoder((images.float() - self.mean) / self.std)   # [B, D]
        return f @ self.encoder.visual.proj if self.zeroshot else f

    def forward(self, images):
        return self.head(self.features(images))                     # [B, K]


@torch.no_grad()
def text_features(clip, tokenizer, classnames, template: str, device) -> torch.Tensor:
    """normalize(text_projection(text_encoder("a photo of a {name}."))) per class: [K, E]."""
    prompts = [template.format(c.replace("_", " ")) for c in classnames]
    return torch.cat([clip.encode_text(tokenizer(prompts[i:i + 1000]).to(device), normalize=True).float()
                      for i in range(0, len(prompts), 1000)])


def semantic_init(text_feats: torch.Tensor, image_proj: torch.Tensor) -> torch.Tensor:
    """[paper: semantic-aware initialization] w_j = normalize(t_j @ P^T): then <f, w_j> = <f P, t_j> / |P t_j|, CLIP's
    image-text score up to a per-class constant, so training starts close to zero-shot CLIP's predictions."""
    return F.normalize(text_feats @ image_proj.t().float(), dim=-1)  # [K, E] @ [E, D] -> [K, D]


def resolve_clip(cfg: Config):
    """(open_clip name, tag or file or None, QuickGELU?, the tag's config) for --model / --pretrained. Fidelity:
    OpenAI's CLIP uses QuickGELU, x * sigmoid(1.702 x); open_clip's plain 'ViT-B-16' config uses exact GELU and
    only warns when given OpenAI's weights, so the activation follows the tag, or OpenAI's own file."""
    from open_clip.pretrained import get_pretrained_cfg
    name = open_clip_name(cfg.model)
    pretrained = None if cfg.pretrained.lower() == "none" else cfg.pretrained
    tag_cfg = (get_pretrained_cfg(name, pretrained) or {}) if pretrained and ":" not in name else {}
    if pretrained and not tag_cfg:
        pretrained = weights_file(cfg, name)                        # Appendix B: an existing file, or a clear error
    if cfg.quick_gelu != "auto":
        quick_gelu = cfg.quick_gelu == "yes"
    else:  # the tag's choice; for a file: OpenAI's TorchScript file, or a file named for OpenAI's weights
        quick_gelu = bool(tag_cfg.get("quick_gelu")) if tag_cfg else bool(pretrained and (is_openai_release(pretrained) or "openai" in pretrained.lower()))
    return name, pretrained, quick_gelu, tag_cfg


def load_clip(cfg: Config):
    """CLIP of --model with the weights of --pretrained: (clip, image mean, image std)."""
    import open_clip
    name, pretrained, quick_gelu, tag_cfg = resolve_clip(cfg)
    with weights_errors(cfg, name, tag_cfg):                        # Appendix B: offline, fail fast and say what to do
        if pretrained and not tag_cfg and is_openai_release(pretrained):
            clip = load_openai_release(name, pretrained, quick_gelu)  # Appendix B: OpenAI's TorchScript file
        else:
            clip = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu, cache_dir=os.environ.get("LIFT_CLIP_CACHE"))
    pcfg = {**clip.visual.preprocess_cfg, **{k: v for k, v in tag_cfg.items() if k in ("mean", "std")}}  # CLIP's mean, std
    act = type(clip.visual.transformer.resblocks[0].mlp.gelu).__name__ if hasattr(clip.visual, "transformer") else "?"
    print(f"model {name}, weights {pretrained or 'random'}, activation {act}")
    return clip.eval(), tuple(pcfg["mean"]), tuple(pcfg["std"])


def size_rule(num_classes: int, num_blocks: int, divisor: int) -> int:
    """2 ** max(0, floor(log2(K / (divisor L)))): AdaptFormer's r (divisor 2; 32 on ImageNet-LT), LoRA's rank (4), VPT's length (1)."""
    return 2 ** max(0, math.floor(math.log2(num_classes / (divisor * num_blocks))))


def configure_tuning(model: LiftModel, cfg: Config, num_classes: int):
    """Freeze CLIP, then attach AdaptFormer to every block (LIFT+) or set up a baseline; the classifier trains."""
    enc = model.encoder
    model.requires_grad_(False)
    blocks = block_indices(cfg, len(enc.visual.transformer.resblocks))  # Appendix A: --blocks; default all
    if cfg.tuning == "adaptformer":
        r = cfg.adapter_dim or size_rule(num_classes, len(blocks), 2)
        for i in blocks:
            enc.adaptformer[str(i)] = AdaptFormer(enc.width, r)
        sizes = {"r": r}
    else:
        sizes = BASELINES[cfg.tuning](enc, cfg, blocks, num_classes)  # Appendix A: the paper's baselines
    model.head.weight.requires_grad_(cfg.tuning != "zeroshot")
    model.sizes = {"tuning": cfg.tuning, "blocks": blocks, **sizes}


def build_model(cfg: Config, data: LTData, device) -> LiftModel:
    """CLIP -> LiftModel with the tuning method attached and the classifier initialised."""
    import open_clip
    torch.manual_seed(cfg.seed)
    clip, mean, std = load_clip(cfg)
    check_vit(clip.visual, cfg)                                     # Appendix E: a CLIP ViT, or a clear error
    model = LiftModel(clip.to(device).visual, mean, std, data.num_classes, cfg.logit_scale, cfg.tuning == "zeroshot")
    configure_tuning(model, cfg, data.num_classes)
    if cfg.fast:
        make_fast(model)                                            # Appendix D: the same values, faster
    model.to(device)
    if cfg.init == "semantic":
        t = text_features(clip, open_clip.get_tokenizer(open_clip_name(cfg.model)), data.classnames, cfg.prompt, device)
        w = t if model.zeroshot else semantic_init(t, clip.visual.proj)  # [K, E] or [K, D]
    else:
        w = baseline_init(model, data, cfg, device)                 # Appendix A: class means, a linear probe, random
    with torch.no_grad():
        model.head.weight.copy_(w)
    return model                                                    # CLIP's text tower is not needed any more


# ==========================================================================================
# 5. Loss: logit-adjusted cross-entropy [paper: Proposition 3.1 and its remark; Menon et al., 2021]


def logit_adjusted_loss(logits, labels, log_prior, tau: float = 1.0, reduction: str = "mean"):
    """CE(z + tau * log pi, y), pi_j = n_j / N from the training counts; training only (the test uses raw
    logits). Bayes-consistent for a balanced test set when the class conditionals of train and test
    agree (zeta = 1), which lightweight tuning preserves (Proposition 3.1)."""
    return F.cross_entropy(logits.float() + tau * log_prior, labels, reduction=reduction)


# ==========================================================================================
# 6. Training: SGD with a cosine schedule [paper: the LIFT+ framework]; mixed precision, a checkpoint per epoch


def make_loader(dataset, batch_size: int, cfg: Config, device, generator=None):  # batches of a seeded permutation, or in order
    workers = 0 if isinstance(dataset, torch.utils.data.TensorDataset) else cfg.workers  # tensors need no workers
    return torch.utils.data.DataLoader(Padded(dataset), batch_sampler=ShardedBatches(len(dataset), batch_size, generator),
                                       num_workers=workers, pin_memory=device.type == "cuda")  # Appendix F


def train(cfg: Config, data: LTData, model: LiftModel, run_dir: Path, features=None) -> list:
    """SGD with momentum and weight decay on the tuned parameters, cosine annealing stepped once per epoch, the
    logit-adjusted loss on MDA crops, a checkpoint per epoch; returns the per-epoch losses. features: Appendix D."""
    device, dtype = model.mean.device, amp_dtype(cfg, model.mean.device)  # Appendix D: bf16 / fp16 on GPUs
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    start_epoch, losses = resume(cfg, data, model, opt, sched, scaler, run_dir)  # Appendix E: 0, [] unless --resume
    counts = torch.as_tensor(data.train_counts, dtype=torch.float32)
    log_prior = torch.log(counts / counts.sum()).to(device)         # log pi: [K]
    tau = cfg.tau if cfg.loss == "la" else 0.0                      # CE is LA with tau = 0
    transform = MDATransform(model.image_size, cfg.epochs, cfg.mda, cfg.min_scale, cfg.seed)
    train_set, forward = Views(data.train, transform), distributed(model)  # Appendix F: DDP under torchrun
    if features is not None:
        train_set, forward = torch.utils.data.TensorDataset(features[0][:, None], features[1]), distributed(model.head)
    micro, N, world = cfg.batch_size // cfg.accum_steps, len(train_set), processes()  # Appendix F: 1 without torchrun
    progress = Progress(cfg, math.ceil(N / cfg.batch_size), run_dir)  # Appendix F: progress lines, metrics.jsonl
    for epoch in range(start_epoch, cfg.epochs):
        transform.epoch = epoch
        loader = make_loader(train_set, micro, cfg, device, torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        model.train()
        total, seen = torch.zeros((), device=device), 0             # the summed loss stays on the device: no sync per step
        for j, (views, y) in enumerate(progress.timed(loader)):    # (timed: the wait for data is measured)
            step, last = j // cfg.accum_steps, j + 1 == len(loader)
            n_step = min(cfg.batch_size, N - step * cfg.batch_size)  # images in this optimiser step (in all processes)
            seen += int((y >= 0).sum())                             # (label -100: the padding of a torchrun share)
            x, y = views[:, 0].to(device, non_blocking=True), y.to(device, non_blocking=True)  # [b, 3, S, S] (or [b, D])
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = forward(x)                                 # [b, K]
            loss = logit_adjusted_loss(logits, y, log_prior, tau, reduction="sum") / n_step
            (scaler.scale(loss * world) if scaler else loss * world).backward()  # DDP averages over the processes
            total += loss.detach() * n_step
            if (j + 1) % cfg.accum_steps == 0 or last:              # the optimiser steps once per batch_size images
                scaler.step(opt) if scaler else opt.step()
                scaler.update() if scaler else None
                opt.zero_grad(set_to_none=True)
                progress.step(epoch, step, last, lambda: mean_over_processes(total, seen), opt.param_groups[0]["lr"])
        sched.step()
        losses.append(mean_over_processes(total, seen))             # Appendix F: one process: total / seen
        save_checkpoint(run_dir / "checkpoint.pt", cfg, data, model, opt, sched, scaler, epoch + 1, losses)  # Appendix E
        progress.epoch_end(epoch, losses[-1])
    return losses


def fit(cfg: Config) -> tuple:
    """Build the task and the model, then train it (or, with --eval-only, load --checkpoint): (data, model)."""
    device = prepare_run(cfg)                                       # Appendix E: device, run folder, lock
    data = build_data(cfg)
    print(summarize_data(data, cfg.data))                          # Appendix E: counts, groups, notes on the lists
    model = build_model(cfg, data, device)
    print(describe_tuning(model))
    if cfg.eval_only and cfg.checkpoint:
        model.train_loss = load_tuned(model, cfg, data, cfg.checkpoint)  # Appendix E: identity checked
    elif not (cfg.eval_only or cfg.check) and cfg.tuning != "zeroshot":
        features = frozen_features(model, data, cfg) if cfg.cache_features else None  # Appendix D
        model.train_loss = train(cfg, data, model, run_folder(cfg), features)
    return data, model


# ==========================================================================================
# 7. Evaluation: Overall / Many / Medium / Few top-1 accuracy [paper: evaluation protocol]


def class_groups(train_counts) -> dict:
    """Many-shot (> 100 training images), Medium-shot (20-100) and Few-shot (< 20) classes."""
    n = np.asarray(train_counts)
    return {"many": np.flatnonzero(n > 100), "medium": np.flatnonzero((n >= 20) & (n <= 100)), "few": np.flatnonzero(n < 20)}


def tte_logits(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """Mean of the logits of the V views of each image: [B, V, 3, S, S] -> [B, K] (V = 5 with TTE)."""
    B, V = views.shape[:2]                                          # V passes of B views each: a V times smaller working set
    logits = torch.cat([model(chunk) for chunk in views.flatten(0, 1).split(B)]).float()  # [B V, K]
    return logits.view(B, V, -1).mean(dim=1)


@torch.no_grad()
def over_dataset(fn, model: LiftModel, dataset, cfg: Config) -> tuple:
    """fn(views [B, V, 3, S, S] on the model's device) for every batch of a dataset: (outputs [N, ...], labels [N])."""
    model.eval()
    device = model.mean.device
    dtype, out, labels = amp_dtype(cfg, device), [], []              # Appendix D
    loader = make_loader(dataset, cfg.eval_batch_size, cfg, device)
    for views, y in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out.append(fn(views.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y))
    return gather_in_order(out, labels, loader.batch_sampler)       # Appendix F: every process's share, in order


def accuracy_report(preds, labels, train_counts) -> dict:
    """Top-1 accuracy overall, and the mean per-class accuracy of each group (%); a class with no test
    images counts in no group mean, and a group with no test images is None."""
    preds, labels, K = np.asarray(preds), np.asarray(labels), len(train_counts)
    correct = np.bincount(labels, weights=(preds == labels), minlength=K)
    total = np.bincount(labels, minlength=K)
    per_class = [100.0 * c / t if t else None for c, t in zip(correct, total)]
    report = {"overall": 100.0 * float((preds == labels).mean())}
    for group, idx in class_groups(train_counts).items():
        idx = idx[total[idx] > 0]
        report[group] = float(np.mean([per_class[i] for i in idx])) if len(idx) else None
    report["per_class"] = per_class
    return report


def evaluate(cfg: Config, data: LTData, model: LiftModel) -> dict:
    """Test-set accuracy with TTE (or the centre crop), printed and written to the run's results.json."""
    views = Views(data.test, test_views(cfg, model.image_size))
    logits, labels = over_dataset(lambda v: tte_logits(model, v), model, views, cfg)
    preds = logits.argmax(dim=1).numpy()                            # [N]
    report = {**accuracy_report(preds, labels.numpy(), data.train_counts), "predictions": preds, "labels": labels.numpy()}
    print(f"test ({f'TTE: five crops of the resize to {views.transform.resize}' if cfg.tte else 'centre crop'})")
    print("          Overall    Many  Medium     Few\naccuracy  " +
          " ".join("    n/a" if report[k] is None else f"{report[k]:7.2f}" for k in ("overall", "many", "medium", "few")))
    write_results(cfg, data, model, report)                         # Appendix E: results.json
    return report


# ==========================================================================================
# 8. Main


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with clean_exit() as session:                                   # Appendix E: one line for every error and interrupt
        if argv[:1] in (["table"], ["predict"]):                    # Appendix A: the results table; F: new images' classes
            return (table_main if argv[0] == "table" else predict_main)(argv[1:])
        cfg = session.cfg = parse_config(argv)                     # Appendix E: Config's fields as flags; finalize_config
        data, model = fit(cfg)
        (check_inputs if cfg.check else evaluate)(cfg, data, model)  # Appendix E: --check trains and evaluates nothing


# ==========================================================================================
# APPENDIX A. The paper's baselines: other tuning methods, classifier inits, the results table
# Plugs into Part I at configure_tuning (BASELINES, block_indices), build_model (baseline_init) and
# main (the `table` command). Each method only freezes, unfreezes or attaches parameters: LoRA and the
# random mask are parametrizations of CLIP's weights, the Adapter wraps the MLP, and VPT uses LiftViT's
# prompt hook, so the forward pass of Part I serves them all.


def block_indices(cfg: Config, num_blocks: int) -> list:
    """Vision blocks a method acts on: --blocks ('0-11', '8,9,10,11'); partial: the last k; else all."""
    if cfg.tuning == "partial":
        if cfg.partial_blocks > num_blocks:
            raise LiftError(f"--partial-blocks: expected 0..{num_blocks} (the model has {num_blocks} blocks), got {cfg.partial_blocks}")
        return list(range(num_blocks - cfg.partial_blocks, num_blocks))
    if cfg.blocks is None:
        return list(range(num_blocks))
    chosen = set()
    for part in cfg.blocks.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        if not m or hi >= num_blocks or hi < lo:
            raise LiftError(f"--blocks {cfg.blocks}: expected indices in 0..{num_blocks - 1} like '0-{num_blocks - 1}' or '8,9,10'")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


class Adapter(AdaptFormer):
    """Adapter baseline: the same bottleneck without a scale, applied sequentially to the MLP's output."""

    def __init__(self, dim: int, r: int):
        super().__init__(dim, r)
        del self.scale

    def forward(self, m):
        return self.up(F.relu(self.down(self.ln(m))))


class MLPThenAdapter(nn.Module):
    """m = MLP(y); m <- m + Adapter(m). Replaces a block's MLP, so the block runs unchanged."""

    def __init__(self, mlp: nn.Module, adapter: Adapter):
        super().__init__()
        self.mlp, self.adapter = mlp, adapter

    def forward(self, y):
        m = self.mlp(y)
        return m + self.adapter(m)


class LoRA(nn.Module):
    """LoRA baseline on the query and value projections, as a parametrization of the packed in-projection
    [W_q; W_k; W_v] (rows of D): q gains x A_q B_q / r and v gains x A_v B_v / r. B = 0 at init; A is
    kaiming-uniform as in the LIFT+ code (torch's fan-in of a [D, r] tensor is r)."""

    def __init__(self, dim: int, r: int):
        super().__init__()
        self.q_down, self.q_up = nn.Parameter(torch.empty(dim, r)), nn.Parameter(torch.zeros(r, dim))
        nn.init.kaiming_uniform_(self.q_down, a=math.sqrt(5))
        self.v_down, self.v_up = nn.Parameter(torch.empty(dim, r)), nn.Parameter(torch.zeros(r, dim))
        nn.init.kaiming_uniform_(self.v_down, a=math.sqrt(5))
        self.scale = 1.0 / r

    def forward(self, w):                                           # w: [3D, D]; F.linear(x, w) = x @ w.T
        dq = (self.q_down @ self.q_up).t() * self.scale             # [D, D]
        dv = (self.v_down @ self.v_up).t() * self.scale
        return w + torch.cat([dq, torch.zeros_like(dq), dv])


class MaskedUpdate(nn.Module):
    """Random-mask ('arbitrary') fine-tuning: a parametrization that lets exactly round(ratio * n) seeded
    random entries of a frozen tensor train; every other entry stays bit-identical."""

    def __init__(self, tensor: torch.Tensor, ratio: float, gen: torch.Generator):
        super().__init__()
        n = tensor.numel()
        self.register_buffer("index", torch.randperm(n, generator=gen)[:round(ratio * n)])
        self.values = nn.Parameter(tensor.detach().flatten()[self.index].clone())

    def forward(self, frozen):
        return frozen.flatten().index_put((self.index,), self.values).view_as(frozen)


def tune_blocks(enc, cfg, blocks, K):                               # full and partial fine-tuning
    for i in blocks:
        enc.visual.transformer.resblocks[i].requires_grad_(True)
    return {}


def tune_bitfit(enc, cfg, blocks, K):
    for i in blocks:
        for name, p in enc.visual.transformer.resblocks[i].named_parameters():
            p.requires_grad_(name.endswith("bias"))
    return {}


def tune_vpt(enc, cfg, blocks, K):                                  # VPT-deep: new prompts in every block
    P = cfg.vpt_len or size_rule(K, len(blocks), 1)
    for i in blocks:
        enc.prompts[str(i)] = nn.Parameter(torch.randn(P, enc.width) * 0.02)
    return {"prompt_len": P}


def insert_prompts(enc: LiftViT, i: int, x):
    """VPT-deep: block i's prompts replace the previous block's, after the class token."""
    if str(i) not in enc.prompts:
        return x
    old = x.shape[1] - enc.visual.positional_embedding.shape[0]    # the previous block's prompts
    p = enc.prompts[str(i)].to(x.dtype).expand(x.shape[0], -1, -1)  # [B, P, D]
    return torch.cat([x[:, :1], p, x[:, 1 + old:]], dim=1)          # [B, 1 + P + N-1, D]


def tune_adapter(enc, cfg, blocks, K):
    r = cfg.adapter_dim or size_rule(K, len(blocks), 2)
    for i in blocks:
        blk = enc.visual.transformer.resblocks[i]
        blk.mlp = MLPThenAdapter(blk.mlp, Adapter(enc.width, r))
    return {"r": r}


def tune_lora(enc, cfg, blocks, K):
    from torch.nn.utils import parametrize
    r = cfg.lora_rank or size_rule(K, len(blocks), 4)
    for i in blocks:
        parametrize.register_parametrization(enc.visual.transformer.resblocks[i].attn, "in_proj_weight", LoRA(enc.width, r))
    return {"rank": r}


def tune_mask(enc, cfg, blocks, K):
    from torch.nn.utils import parametrize
    gen = torch.Generator().manual_seed(cfg.seed)
    for i in blocks:
        blk = enc.visual.transformer.resblocks[i]
        for module, name in [(blk.attn, "in_proj_weight"), (blk.attn, "in_proj_bias"), (blk.attn.out_proj, "weight"),
                             (blk.attn.out_proj, "bias"), (blk.mlp.c_fc, "weight"), (blk.mlp.c_fc, "bias"),
                             (blk.mlp.c_proj, "weight"), (blk.mlp.c_proj, "bias")]:
            if round(cfg.mask_ratio * getattr(module, name).numel()) > 0:  # a tiny bias may get no entry
                parametrize.register_parametrization(module, name, MaskedUpdate(getattr(module, name), cfg.mask_ratio, gen))
    return {}


BASELINES = {"classifier": lambda *a: {}, "zeroshot": lambda *a: {}, "full": tune_blocks, "partial": tune_blocks,
             "bitfit": tune_bitfit, "vpt": tune_vpt, "adapter": tune_adapter, "lora": tune_lora, "mask": tune_mask}


def extract_features(model: LiftModel, dataset, cfg: Config) -> tuple:
    """Features of a dataset of single views: ([N, D] float32, [N] labels)."""
    return over_dataset(lambda views: model.features(views[:, 0]), model, dataset, cfg)


def baseline_init(model: LiftModel, data: LTData, cfg: Config, device) -> torch.Tensor:
    """Classifier init ablation: random unit vectors ('none'), or the class means / a linear probe of the
    frozen features of at most 100 random training images per class (centre views)."""
    K = data.num_classes
    if cfg.init == "none":
        return F.normalize(torch.rand(K, model.encoder.width) * 2 - 1, dim=-1)
    rng, labels = np.random.RandomState(cfg.seed), np.asarray(data.train.labels)
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:100] for c in range(K)])
    S = model.image_size
    feats, ys = extract_features(model, Views(data.train, EvalTransform(S, S, False), idx), cfg)
    return (class_mean_init if cfg.init == "class_mean" else linear_probe_init)(feats, ys, K)


def class_mean_init(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The normalised mean feature of each class."""
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64).index_add_(0, labels, feats.double())
    return F.normalize(sums, dim=-1).float()


def logistic_regression(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, iters: int = 100) -> tuple:
    """L2-regularised (C = 1), class-balanced multinomial logistic regression fitted with L-BFGS, the
    objective of scikit-learn's LogisticRegression(class_weight='balanced'): returns (W, b)."""
    x, y = feats.double(), labels
    counts = torch.bincount(y, minlength=num_classes).clamp(min=1).double()
    sample_w = (len(y) / (num_classes * counts))[y]                 # 'balanced' class weights
    W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = logistic_objective(x, y, sample_w, W, b)
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def logistic_objective(x, y, sample_w, W, b):
    return (F.cross_entropy(x @ W.t() + b, y, reduction="none") * sample_w).sum() + 0.5 * (W * W).sum()


def linear_probe_init(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The normalised weight rows of a linear probe (the bias is dropped)."""
    W, _ = logistic_regression(feats, labels, num_classes)
    return F.normalize(W, dim=-1).float()


def table_main(argv: list):
    """python lift_plus.py table [FOLDER]: every run's results under FOLDER as one Markdown table."""
    p = Parser(prog="lift_plus.py table", description=table_main.__doc__)
    p.add_argument("folder", nargs="?", default="runs", help="searched at any depth for results*.json (default: runs)")
    p.add_argument("--seeds", action="store_true", help="one row per setting: mean ± std over the runs that differ only in --seed")
    args = p.parse_args(argv)
    if not Path(args.folder).is_dir():
        raise LiftError(f"{args.folder}: no such folder")
    print(seeds_table(args.folder) if args.seeds else results_table(args.folder))


def setting_fields(c: dict, keys: tuple) -> list:
    """A run's config values for a table row: `keys`, TTE and epochs; zero-shot trains nothing, so its training
    settings are '-'."""
    trained = c["tuning"] != "zeroshot"
    return [c[k] if trained else "-" for k in keys] + [c["tte"], c["epochs"] if trained else "-"]


def seeds_table(folder) -> str:
    """The results*.json files under `folder` grouped by setting (the config less its seed and run-only flags;
    TTE counts as a setting): mean ± sample std of each group's accuracies, and its seeds."""
    groups = {}
    for path in sorted(Path(folder).glob("**/results*.json")):
        r = json.loads(path.read_text())
        kept = ("tte", "expand", "model", "pretrained")            # evaluation settings and the CLIP are part of a setting
        c = {k: v for k, v in r["config"].items() if k in kept or k not in (*RESUME_MAY_CHANGE, "seed", "run_name", "checkpoint")}
        groups.setdefault(json.dumps(c, sort_keys=True), []).append(r)
    rows = ["| data | tuning | lr | init | mda | tte | epochs | seeds | Overall | Many | Medium | Few |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for runs in groups.values():
        c = runs[0]["config"]
        seeds = ", ".join(str(r["config"]["seed"]) for r in runs) if c["tuning"] != "zeroshot" else "-"
        fields = setting_fields(c, ("lr", "init", "mda"))
        cells = []
        for k in ("overall", "many", "medium", "few"):
            v = [r["metrics"][k] for r in runs if r["metrics"][k] is not None]
            cells.append("n/a" if not v else f"{np.mean(v):.2f}" + (f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else ""))
        rows.append(f"| {c['data']} | {c['tuning']} | {' | '.join(map(str, fields))} | {seeds} | {' | '.join(cells)} |")
    return "\n".join(rows)


def results_table(folder) -> str:
    """The results*.json files under `folder` (one per run) as one Markdown table, with each training run's
    time and images per second from its metrics.jsonl."""
    rows = ["| run | data | tuning | init | loss | mda | tte | epochs | tuned params | train time | img/s | Overall | Many | Medium | Few |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cell = lambda v: "n/a" if v is None else f"{v:.2f}"
    for path in sorted(Path(folder).glob("**/results*.json")):
        r = json.loads(path.read_text())
        c, m = r["config"], r["metrics"]
        log = path.parent / "metrics.jsonl"
        epochs = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() and path.name == "results.json" else []
        speed = (f"{sum(e['epoch_s'] for e in epochs):.0f} s | {np.mean([e['images_per_s'] for e in epochs]):.0f}" if epochs
                 else "- | -")
        fields = setting_fields(c, ("init", "loss", "mda"))
        rows.append(f"| {path.parent.name}{path.stem[7:]} | {c['data']} | {c['tuning']} | {' | '.join(map(str, fields))} | "
                    f"{r['params']['tuned']:,} | {speed} | " +
                    " | ".join(cell(m[k]) for k in ("overall", "many", "medium", "few")) + " |")
    return "\n".join(rows)


# ==========================================================================================
# APPENDIX B. Weights, model configs, split lists and class names: local files, downloads, offline failures
# Plugs into Part I at find_split_files and the class-name readers (build_benchmark), load_cifar100
# (build_cifar100_lt), clip_image_size (finalize_config) and weights_errors / load_openai_release
# (load_clip). Offline, every download fails in seconds with the name of the file to fetch elsewhere,
# instead of after a minute of retries.

SPLIT_LISTS = {  # accepted file names (OLTR's, then the LIFT+ code's), the subfolder, and the extra files
    "imagenet_lt": dict(train=("ImageNet_LT_train.txt", "train.txt"), test=("ImageNet_LT_test.txt", "test.txt"), subdir="ImageNet_LT"),
    "places_lt": dict(train=("Places_LT_train.txt", "train.txt"), test=("Places_LT_test.txt", "test.txt"), subdir="Places_LT",
                      extra=("classnames.txt",)),
    "inat2018": dict(train=("iNaturalist18_train.txt", "train.txt"), test=("iNaturalist18_val.txt", "val.txt"),
                     subdir="iNaturalist2018", extra=("categories.json",)),
}
SPLIT_URL = "https://raw.githubusercontent.com/shijxcs/LIFT-plus/HEAD/datasets/{subdir}/{name}"


def online(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Can this machine open a connection to host? (A fast check instead of minutes of retries.)"""
    import socket
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def find_split_files(cfg: Config) -> dict:
    """The split lists of a benchmark: from --splits, else --root, --root/<subdir> or the cache, else
    downloaded into the cache."""
    import urllib.request
    spec = SPLIT_LISTS[cfg.data]
    wanted = {"train": spec["train"], "test": spec["test"], **{n: (n,) for n in spec.get("extra", ())}}
    cache = Path(cfg.cache).expanduser() / "splits" / spec["subdir"]
    if cfg.splits and not Path(cfg.splits).is_dir():
        raise LiftError(f"--splits {cfg.splits}: no such folder")
    folders = [Path(cfg.splits)] if cfg.splits else [Path(cfg.root), Path(cfg.root) / spec["subdir"], cache]
    locate = lambda: {k: next((d / n for d in folders for n in names if (d / n).is_file()), None) for k, names in wanted.items()}
    found = locate()
    missing = [k for k, p in found.items() if p is None]
    if missing and not cfg.splits and online("raw.githubusercontent.com"):
        for key in missing:
            url = SPLIT_URL.format(subdir=spec["subdir"], name=wanted[key][-1])  # the LIFT+ code's file names
            print(f"downloading {url}")
            try:
                atomic_write(cache / wanted[key][-1], urllib.request.urlopen(url, timeout=60).read())
            except OSError as e:
                raise LiftError(f"--data {cfg.data}: could not download {url} ({e}); pass --splits DIR") from None
        found = locate()
        missing = [k for k, p in found.items() if p is None]
    if missing:
        names = ", ".join(" or ".join(wanted[k]) for k in missing)
        where = cfg.splits or f"{cfg.root} (or {Path(cfg.root) / spec['subdir']}, or {cache})"
        raise LiftError(
            f"--data {cfg.data}: split files not found: {names}. Put them in {where}, or pass --splits DIR. "
            f"They are published with the LIFT+ code (datasets/{spec['subdir']}/ in github.com/shijxcs/LIFT-plus) "
            f"and, as ImageNet_LT_*.txt / Places_LT_*.txt / iNaturalist18_*.txt, with OLTR "
            f"(github.com/zhmiao/OpenLongTailRecognition-OLTR); this machine could not download them.")
    return found


def read_places_classnames(path) -> list:
    """Places365 names one per line ('airfield'); the official '/a/apartment_building/outdoor 0' form too."""
    with open(path) as f:
        names = [line.split()[0] for line in f if line.strip()]
    return ["-".join(n.split("/")[2:]) if n.startswith("/") else n for n in names]


def read_inat_categories(path, level: str = "species") -> tuple:
    """iNaturalist 2018's categories.json -> (class names, {category id: label}). As the LIFT+ code, the
    labels follow the sorted unique names at a taxonomy level: species ('name') by default."""
    level = "name" if level == "species" else level
    try:
        with open(path) as f:
            id_to_name = {int(e.get("id", i)): e[level] for i, e in enumerate(json.load(f))}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LiftError(f"{path}: expected a JSON list of {{'id', '{level}'}} entries ({e})") from None
    names = sorted(set(id_to_name.values()))
    index = {name: i for i, name in enumerate(names)}
    return names, {cid: index[name] for cid, name in id_to_name.items()}


def load_cifar100(cfg: Config) -> tuple:
    """torchvision's CIFAR-100 (train, test) from --root, downloaded there when online."""
    import torchvision
    download = online("www.cs.toronto.edu")
    try:
        return tuple(torchvision.datasets.CIFAR100(str(Path(cfg.root).expanduser()), train=s, download=download)
                     for s in (True, False))
    except RuntimeError as e:
        raise LiftError(f"--root {cfg.root}: CIFAR-100 not found ({e}). Put the extracted 'cifar-100-python' "
                        f"folder there, or run once with internet to download it.") from None


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
        raise LiftError(f"--model {cfg.model}: its image size is not known before loading it; pass --expand N (24 for 224)")
    return int(np.atleast_1d(model_cfg["vision_cfg"]["image_size"])[0])


def weights_file(cfg: Config, name: str) -> str:
    """--pretrained that is no tag of the model must be a weights file."""
    import open_clip
    path = Path(cfg.pretrained).expanduser()
    if not path.is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none known"
        raise LiftError(f"--pretrained {cfg.pretrained}: neither a pretrained tag of {name} ({tags}) nor a checkpoint file")
    return str(path)


def is_openai_release(path: str) -> bool:
    """OpenAI ships its CLIP weights as TorchScript archives (ViT-B-16.pt)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_openai_release(name: str, path: str, quick_gelu: bool):
    """OpenAI's own weight file is a TorchScript archive, which torch.load(weights_only=True) refuses: read it
    with torch.jit.load, as OpenAI's loader does, and copy every tensor of the open_clip model (none missing)."""
    import open_clip
    archive = torch.jit.load(path, map_location="cpu").state_dict()  # also holds metadata scalars
    clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    clip.load_state_dict({k: archive[k] for k in clip.state_dict() if k in archive}, strict=True)
    return clip


class weights_errors:
    """Around building CLIP: offline, use only the local hub cache (fail in seconds), and turn any failure
    into one line that says where to get the weights and how to pass them."""

    def __init__(self, cfg: Config, name: str, tag_cfg: dict):
        self.cfg, self.name, self.tag_cfg = cfg, name, tag_cfg

    def __enter__(self):
        import logging
        import huggingface_hub.constants as hf_constants
        self.hf, self.offline = hf_constants, hf_constants.HF_HUB_OFFLINE
        if self.tag_cfg and not online("huggingface.co"):
            hf_constants.HF_HUB_OFFLINE = True
        logging.disable(logging.ERROR)                              # open_clip logs the failure we report

    def __exit__(self, kind, e, tb):
        import logging
        logging.disable(logging.NOTSET)
        self.hf.HF_HUB_OFFLINE = self.offline
        if e is None or isinstance(e, (LiftError, KeyboardInterrupt)):
            return False
        first, tag = str(e).splitlines()[0] if str(e) else type(e).__name__, self.tag_cfg
        if tag:
            hub = tag.get("hf_hub", "").rstrip("/")
            raise LiftError(
                f"--pretrained {self.cfg.pretrained}: could not get the weights of {self.name} ({first[:200]}). "
                f"Offline, download them elsewhere (https://huggingface.co/{hub}, or {tag.get('url') or 'the tag URL'}) "
                "and pass the file: --pretrained /path/to/file" + (" (OpenAI weights: QuickGELU is detected for "
                "OpenAI's .pt file; for a converted state dict add --quick-gelu yes)" if tag.get("quick_gelu") else "")) from None
        raise LiftError(f"--pretrained {self.cfg.pretrained}: cannot load it into {self.name}: {first[:300]}") from None


# ==========================================================================================
# APPENDIX C. The offline world: a tiny CLIP and a long-tailed task for a laptop CPU
# Plugs into Part I at finalize_config (world_clip_files) and build_data (build_world_task).
# Without internet or a GPU there is no CLIP to fine-tune, so this world replays the paper's setting in minutes.
# Each choice stands for one property of CLIP on ImageNet-LT:
#   * concepts: 8 colours x 4 textures x 8 shapes, captioned "a photo of a red striped circle." (the web);
#   * pretraining: a tiny open_clip CLIP trained contrastively on 16,384 BALANCED captioned images with broad
#     nuisances (size, position, rotation, colour, clutter, noise): good features, as CLIP's are. Objects are
#     large and roughly centred, as in photo datasets, so that MDA's crops keep part of them. Its words are
#     fixed random codes (the token embedding stays at its seeded init), so it ships as 3 MB: assets/;
#   * the task is NOT aligned with pretraining, and the prompt only partly bridges it: another camera (warm
#     cast, low contrast, a soft lens, more clutter) and class names with four colour words that no caption
#     contains ("crimson", "amber", "azure", "violet");
#   * long tail: 30 classes, 300 down to 3 training images (imbalance 100), 40 test images each. The tail is
#     fine-grained: few-shot classes have rare shapes and borrow head classes' colour and texture
#     (world_task_classes), so only shape, which pretraining taught, tells them apart;
#   * 16 SGD steps an epoch (ImageNet-LT has ~900), so every method trains 15 epochs here (finalize_config).

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "hexagon", "crescent")
COLOURS = {"red": (0.85, 0.12, 0.12), "orange": (0.95, 0.55, 0.08), "yellow": (0.92, 0.88, 0.12),
           "green": (0.15, 0.70, 0.20), "cyan": (0.10, 0.80, 0.85), "blue": (0.15, 0.25, 0.90),
           "purple": (0.55, 0.18, 0.75), "pink": (0.98, 0.50, 0.72)}
TEXTURES = ("plain", "striped", "dotted", "checkered")
CAPTIONS = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.")


@dataclass(frozen=True)
class WorldStyle:
    """Nuisance ranges of one rendering style (sizes are fractions of the image half-width)."""
    radius: tuple            # object radius range
    offset: float            # largest shift of the object centre
    rotation: float          # largest rotation, degrees (kept small: a square turned 45 degrees is a diamond)
    colour_jitter: float     # per-image shift of the object's RGB
    cast: float              # std of a per-channel multiplicative colour cast on the whole image
    clutter: int             # number of translucent distractor blobs in the background
    noise: float             # std of per-pixel Gaussian noise
    camera: tuple = (1.0, 1.0, 1.0)  # fixed RGB gain of the whole domain (the task's "camera")
    contrast: float = 1.0    # fixed contrast around mid-grey
    blur: float = 0.0        # std of a Gaussian lens blur, in output pixels


@dataclass(frozen=True)
class WorldSpec:
    """Everything that defines an offline world: its images, its long-tailed task, its CLIP."""
    seed: int = 0                      # world seed: class choice, images, pretraining (not --seed)
    image_size: int = 32
    num_classes: int = 30              # downstream classes, a subset of the 8 x 8 x 4 concepts
    max_count: int = 300               # head class training images
    imbalance: float = 100.0           # max_count / min_count (300 -> 3), exponential profile as in CIFAR-100-LT
    test_per_class: int = 40           # balanced test set
    rare_shapes: int = 4               # shapes seen only in few-shot classes
    # pretraining sees the web: large, roughly centred objects under broad nuisances (clutter, noise, casts);
    # the task is one camera inside that range but shifted: warm cast, low contrast, a soft lens, more clutter
    pretrain_style: WorldStyle = WorldStyle(radius=(0.5, 0.9), offset=0.15, rotation=20, colour_jitter=0.08,
                                            cast=0.08, clutter=2, noise=0.04)
    task_style: WorldStyle = WorldStyle(radius=(0.55, 0.85), offset=0.1, rotation=20, colour_jitter=0.08, cast=0.08,
                                        clutter=3, noise=0.05, camera=(1.15, 0.97, 0.8), contrast=0.8, blur=0.6)
    # the task's class names use colour words no caption contains: the prompt only partly bridges them
    task_words: tuple = (("red", "crimson"), ("orange", "amber"), ("blue", "azure"), ("purple", "violet"))
    pretrain_images: int = 16384       # balanced: 64 per concept
    pretrain_epochs: int = 4
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3


WORLD = WorldSpec()
WORLD_CLIP = {"embed_dim": 128, "quick_gelu": False,  # the world's tiny CLIP, an open_clip model config
              "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}}
WORLD_VERSION = 2  # raise it whenever the drawing or the pretraining code changes: it names the cached CLIP


def world_concepts() -> list:
    """All (colour, texture, shape) concepts of the world, in a fixed order."""
    return [(c, t, s) for s in SHAPES for c in COLOURS for t in TEXTURES]


def concept_name(concept, words: tuple = ()) -> str:
    """'red dotted star'; `words` renames words, as the task's class names do (WorldSpec.task_words)."""
    return " ".join(dict(words).get(w, w) for w in concept)


def shape_mask(shape: str, u, v):
    """Inside-the-shape mask in object coordinates (u, v), radius ~1."""
    r, a = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return r < 0.85
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.72
    if shape == "triangle":
        return (v > -0.6) & (v < 0.9 - 1.7 * abs(u))
    if shape == "cross":
        return ((abs(u) < 0.3) & (abs(v) < 0.9)) | ((abs(v) < 0.3) & (abs(u) < 0.9))
    if shape == "star":
        return r < 0.6 + 0.35 * np.cos(5 * a + np.pi / 2)
    if shape == "ring":
        return (r < 0.9) & (r > 0.5)
    if shape == "hexagon":
        return np.maximum(abs(u) * 0.866 + abs(v) * 0.5, abs(v)) < 0.78
    if shape == "crescent":
        return (r < 0.9) & (np.hypot(u - 0.45, v) > 0.65)
    raise ValueError(shape)


def texture_mask(texture: str, u, v, freq: float = 2.2):
    """Where the texture darkens the object, in object coordinates (it turns and scales with it)."""
    if texture == "plain":
        return np.zeros_like(u, dtype=bool)
    if texture == "striped":
        return np.sin(2 * np.pi * freq * u) > 0
    if texture == "dotted":
        fu, fv = (freq * u) % 1 - 0.5, (freq * v) % 1 - 0.5
        return fu * fu + fv * fv < 0.08
    if texture == "checkered":
        return (np.floor(freq * u) + np.floor(freq * v)) % 2 == 0
    raise ValueError(texture)


def render_images(concepts, style: WorldStyle, seed: int, size: int = 32, supersample: int = 2) -> np.ndarray:
    """Draw one image per concept with random nuisances: uint8 [N, size, size, 3].

    Deterministic in (concepts, style, seed); drawn at supersample x size and box-filtered down."""
    rng = np.random.RandomState(seed)
    n, S = len(concepts), size * supersample
    g = (np.arange(S) + 0.5) / S * 2 - 1
    y, x = np.meshgrid(g, g, indexing="ij")                                 # [S, S] each, in [-1, 1]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, (colour, texture, shape) in enumerate(concepts):
        # background: grey level with a slight tint, plus translucent distractor blobs (task style)
        bg = np.ones((S, S, 3)) * (rng.uniform(0.15, 0.85) + rng.uniform(-0.08, 0.08, 3))
        for _ in range(style.clutter):
            cx, cy, rx, ry = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.2, 0.7), rng.uniform(0.2, 0.7)
            blob = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1)[..., None]  # [S, S, 1]
            bg = np.where(blob, 0.5 * bg + 0.5 * rng.uniform(0, 1, 3), bg)
        # object: shape and texture in its own rotated, scaled, shifted frame
        R = rng.uniform(*style.radius)
        th = np.deg2rad(rng.uniform(-style.rotation, style.rotation))
        cx, cy = rng.uniform(-style.offset, style.offset, 2)
        u = (np.cos(th) * (x - cx) + np.sin(th) * (y - cy)) / R              # [S, S]
        v = (-np.sin(th) * (x - cx) + np.cos(th) * (y - cy)) / R
        rgb = np.clip(np.asarray(COLOURS[colour]) + rng.uniform(-style.colour_jitter, style.colour_jitter, 3), 0, 1)
        obj = rgb * np.where(texture_mask(texture, u, v), 0.35, 1.0)[..., None]  # [S, S, 3]
        img = np.where(shape_mask(shape, u, v)[..., None], obj, bg)
        # camera: colour cast and sensor noise
        img = img * (1 + style.cast * rng.randn(3))
        img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))  # [size, size, 3]
        img = (0.5 + style.contrast * (img - 0.5)) * np.asarray(style.camera)
        if style.blur > 0:
            img = gaussian_blur(img, style.blur)
        img = img + style.noise * rng.randn(size, size, 3)
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [H, W, 3], edges reflected."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")                # [H + 2r, W + 2r, 3]
    p = sum(k[j] * p[j:j + img.shape[0]] for j in range(2 * r + 1))         # [H, W + 2r, 3]
    return sum(k[j] * p[:, j:j + img.shape[1]] for j in range(2 * r + 1))    # [H, W, 3]


def world_task_classes(spec: WorldSpec) -> list:
    """The downstream classes, head first (index 0 has the most training images).

    Head and medium classes have common shapes and each its own (colour, texture) "look", so they can
    be told apart by colour and texture alone. Few-shot classes (fewer than 20 images) have the rare
    shapes (the last spec.rare_shapes) and borrow the looks of the largest classes: "red dotted star"
    differs from the head class "red dotted circle" only in its shape. As with a rare bird that
    resembles a common one, only a model that kept what pretraining taught about shape can tell the
    tail from the head. The world's CLIP has seen every concept."""
    n_few = sum(n < 20 for n in world_counts(spec))
    rng = np.random.RandomState(spec.seed)
    concepts = [world_concepts()[i] for i in rng.permutation(len(world_concepts()))]
    rare = SHAPES[len(SHAPES) - spec.rare_shapes:]
    common, looks = [], set()
    for colour, texture, shape in concepts:                         # one class per (colour, texture) look
        if shape not in rare and (colour, texture) not in looks and len(common) < spec.num_classes - n_few:
            common.append((colour, texture, shape))
            looks.add((colour, texture))
    few = [(colour, texture, s) for colour, texture, _ in common for s in rare][:n_few]  # head looks, rare shapes
    return common + few


def world_counts(spec: WorldSpec) -> list:
    """Training images per class: max_count * (1 / imbalance) ** (i / (K - 1)), as CIFAR-100-LT."""
    return cifar100_lt_counts(spec.imbalance, spec.num_classes, spec.max_count)


_WORLD_TASK = {}  # the images are drawn once per process


def build_world_task(cfg: Config) -> LTData:
    """The world's long-tailed task: exponential training counts, a balanced test set, both in the task
    style (drawn with different seeds). A cold cache first gets the shipped CLIP, or pretrains one if none
    was shipped for this world (another WorldSpec, WORLD_VERSION or open_clip version)."""
    spec = WORLD
    if cfg.pretrained == world_clip_files(cfg)["pretrained"] and not Path(cfg.pretrained).is_file():
        name, key = open_clip_name(cfg.model), world_key(spec)
        packed = torch.load(SHIPPED_CLIP, weights_only=True) if SHIPPED_CLIP.is_file() else {}
        if packed.get("key") != key:                                # none shipped for this world: pretrain it (minutes)
            t0 = time.time()
            packed = pack_world_clip(pretrain_world_clip(spec, name, spec.seed), key)
            print(f"pretrained the world's CLIP in {time.time() - t0:.0f} s: {cfg.pretrained}")
        atomic_torch_save(Path(cfg.pretrained), unpack_world_clip(packed, name, spec.seed))
    if not _WORLD_TASK:
        classes, counts = world_task_classes(spec), world_counts(spec)
        y_train = np.repeat(np.arange(len(classes)), counts)        # [N_train]
        y_test = np.repeat(np.arange(len(classes)), spec.test_per_class)  # [N_test]
        train = render_images([classes[y] for y in y_train], spec.task_style, spec.seed + 1, spec.image_size)
        test = render_images([classes[y] for y in y_test], spec.task_style, spec.seed + 2, spec.image_size)
        _WORLD_TASK["task"] = LTData(ImageSet(train, y_train), ImageSet(test, y_test),
                                     [concept_name(c, spec.task_words) for c in classes], np.asarray(counts))
    return _WORLD_TASK["task"]


def world_key(spec: WorldSpec) -> str:
    """Cache key of the world's pretrained CLIP: WORLD_VERSION, the spec's pretraining fields, its model
    config and open_clip's version. The downstream task's fields are not in it."""
    import open_clip
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k.startswith("pretrain") or k in ("seed", "image_size")}
    text = repr((WORLD_VERSION, fields, WORLD_CLIP, SHAPES, COLOURS, TEXTURES, CAPTIONS, open_clip.__version__))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def world_clip_files(cfg: Config) -> dict:
    """--model / --pretrained of the world's CLIP (cache/world/<key>/), for the default model flags. The
    config file is written here (its stem is open_clip's model name); the weights by build_world_task."""
    key = world_key(WORLD)
    if (cfg.model, cfg.pretrained) != ("ViT-B-16", "openai") and not cfg.model.endswith(f"world-{key}.json"):
        return {"model": cfg.model, "pretrained": cfg.pretrained}
    folder = Path(cfg.cache).expanduser() / "world" / key
    config_path = folder / f"world-{key}.json"
    if not config_path.is_file():
        atomic_write(config_path, json.dumps(WORLD_CLIP, indent=1).encode())
    return {"model": str(config_path), "pretrained": str(folder / "clip.pt")}


SHIPPED_CLIP = Path(__file__).with_name("assets") / "world_clip.pt"  # pack_world_clip of pretrain_world_clip(WORLD)


def random_clip(name: str, seed: int):
    """open_clip model `name` with the random init of `seed`."""
    import logging
    import open_clip
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: that is the point
    try:
        return open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)


def pack_world_clip(clip, key: str) -> dict:
    """The pretrained CLIP as shipped: half precision, without the token embedding (frozen at its seeded init,
    so unpack_world_clip regenerates it): 3 MB instead of 31. The world's CLIP IS these rounded weights."""
    state = {k: v.half() for k, v in clip.state_dict().items() if k != "token_embedding.weight"}
    return {"key": key, "state": state}


def unpack_world_clip(packed: dict, name: str, seed: int) -> dict:
    """open_clip state dict of a packed CLIP: fp32 weights, and the token embedding of the seed's init."""
    embedding = random_clip(name, seed).token_embedding.weight.detach()  # the init pretrain_world_clip started from
    return {"token_embedding.weight": embedding, **{k: v.float() for k, v in packed["state"].items()}}


def ship_world_clip(path: Path = SHIPPED_CLIP) -> dict:
    """Pretrain the world's CLIP and write the file the project ships (python -c 'import lift_plus; lift_plus.ship_world_clip()')."""
    cfg = finalize_config(Config(data="shapes_lt"))
    packed = pack_world_clip(pretrain_world_clip(WORLD, open_clip_name(cfg.model), WORLD.seed), world_key(WORLD))
    atomic_torch_save(Path(path), packed)
    return packed


def clip_contrastive_loss(img, txt, logit_scale):
    """CLIP's symmetric InfoNCE: image i should match caption i among the batch, and vice versa."""
    logits = logit_scale.exp() * img @ txt.t()                              # [B, B]
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def pretrain_world_clip(spec: WorldSpec, name: str, seed: int):
    """Train the tiny CLIP from scratch on the balanced, clean (pretraining-style) world with captions.

    Every batch holds distinct concepts, so no caption is a false negative of another image in it.
    AdamW with a linear warm-up and cosine decay, as in CLIP; returns the trained open_clip model."""
    import open_clip
    clip = random_clip(name, seed)
    tokenizer = open_clip.get_tokenizer(name)
    concepts = world_concepts()
    C, per = len(concepts), spec.pretrain_images // len(concepts)
    rng = np.random.RandomState(seed)
    order = np.stack([rng.permutation(C) for _ in range(per)])               # [per, C] concept ids
    images = torch.from_numpy(render_images([concepts[c] for c in order.ravel()], spec.pretrain_style,
                                            seed + 3, spec.image_size)).permute(0, 3, 1, 2)  # [N, 3, S, S]
    captions = [CAPTIONS[rng.randint(len(CAPTIONS))].format(concept_name(concepts[c])) for c in order.ravel()]
    tokens = tokenizer(captions)                                             # [N, context]
    mean, std = (torch.tensor(clip.visual.preprocess_cfg[k]).view(1, 3, 1, 1) * 255 for k in ("mean", "std"))  # uint8 images
    B = spec.pretrain_batch
    rows = np.arange(len(images)).reshape(per, C)                           # image index of (round, concept slot)
    steps = spec.pretrain_epochs * (len(images) // B)
    clip.token_embedding.requires_grad_(False)                   # words are fixed random codes that the text tower learns to read
    opt = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=spec.pretrain_lr, weight_decay=0.1)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    clip.train()
    t0, step = time.time(), 0
    for epoch in range(spec.pretrain_epochs):
        # each round's C images are one permutation of the concepts: chunks of B are concept-distinct
        perm = rows[rng.permutation(per)]
        perm = np.stack([r[rng.permutation(C)] for r in perm]).ravel()
        for j in range(0, len(perm) - B + 1, B):
            idx = torch.as_tensor(perm[j:j + B])
            x = (images[idx].float() - mean) / std
            img = F.normalize(clip.encode_image(x), dim=-1)                # [B, E]
            txt = F.normalize(clip.encode_text(tokens[idx]), dim=-1)       # [B, E]
            loss = clip_contrastive_loss(img, txt, clip.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"pretraining the world's CLIP: step {step}/{steps} loss {loss.item():.3f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    return clip.eval()


# ==========================================================================================
# APPENDIX D. Speed: the same values, computed faster
# Plugs into Part I at build_model (make_fast, on by default; --no-fast runs the taught path alone),
# LiftViT.forward (class_token_block), read_image (decode_jpeg_fast) and fit (frozen_features).
# Tests keep each equal to the taught path.


class LeanQuickGELU(nn.Module):
    """QuickGELU, x * sigmoid(1.702 x), keeping only x for the backward pass: autograd would keep x and
    sigmoid(1.702 x), two [B, N, 4D] tensors per block; recomputing the sigmoid halves that memory."""

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


def make_fast(model: LiftModel):
    """Swap OpenAI's QuickGELU modules for LeanQuickGELU and compute only the class token in the last block."""
    for module in list(model.encoder.visual.modules()):
        for name, child in module.named_children():
            if type(child).__name__ == "QuickGELU":
                setattr(module, name, LeanQuickGELU())
    model.encoder.fast = True


def class_token_block(enc: LiftViT, i: int, blk, x):
    """The last block for the class token alone: only its output is used downstream, so only its query,
    MLP and AdaptFormer run; keys and values still come from every token. About 1/13 fewer FLOPs."""
    y = blk.ln_1(x)                                                 # [B, N, D]
    h = x[:, :1] + blk.ls_1(blk.attention(y[:, :1], y, y))          # [B, 1, D]
    return h + enc.mlp_branch(i, blk, h)


def decode_jpeg_fast(raw: bytes):
    """A JPEG decoded by TorchCodec's libjpeg-turbo into uint8 [3, H, W]: PIL's pixels, about 1.4x faster. None,
    and PIL reads the file, for any other file, a JPEG it cannot decode, one with an EXIF rotation (TorchCodec
    applies it; PIL and the LIFT+ code do not), or where TorchCodec does not load (a CPU-only torch build)."""
    decode = torchcodec_jpeg()
    if raw[:2] != b"\xff\xd8" or decode is None:
        return None
    if b"Exif" in raw[:1 << 16] and Image.open(io.BytesIO(raw)).getexif().get(0x0112, 1) != 1:  # 0x0112: orientation
        return None
    try:
        return decode(raw, mode="RGB")
    except (RuntimeError, ValueError):
        return None


@functools.cache
def torchcodec_jpeg():
    try:
        from torchcodec.decoders import decode_jpeg
        return decode_jpeg
    except (ImportError, OSError):
        return None


def amp_dtype(cfg: Config, device: torch.device):
    """bf16 autocast where the GPU supports it, else fp16 (with a gradient scaler); fp32 on CPU.
    Autocast keeps LayerNorm in fp32, as LIFT+ does."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


def frozen_features(model: LiftModel, data: LTData, cfg: Config) -> tuple:
    """--cache-features: with a frozen backbone (--tuning classifier) the features of fixed centre views are
    computed once, and only the classifier trains on them (no MDA crops)."""
    S = model.image_size
    return extract_features(model, Views(data.train, EvalTransform(S, S, False)), cfg)


# ==========================================================================================
# APPENDIX E. Reliability: every input checked, checkpoints and exact resume, the run's files
# Plugs into Part I at finalize_config (check_flags), read_image (to_rgb_array), build_data
# (build_folder), build_model (check_vit), train (resume, save_checkpoint, Progress), fit
# (prepare_run, summarize_data, describe_tuning, load_tuned), evaluate (write_results) and main
# (parse_config, check_inputs, clean_exit). Bad input ends in one line that names the flag or file.


class LiftError(Exception):
    """Bad input: the message names the flag or file and what was expected."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    def error(self, message):                                       # one line naming the flag, no usage block
        raise LiftError(message.replace("argument ", "", 1))


def parse_config(argv=None) -> Config:
    """Flags are Config's fields with dashes; --help shows each field's doc."""
    parser = Parser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        doc = f.metadata["help"] + ("" if f.default is None or "default" in f.metadata["help"] else f" (default: {f.default})")
        if f.type == "bool":
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        else:
            kind = int if "int" in f.type else float if "float" in f.type else str
            parser.add_argument(flag(f.name), type=kind, default=f.default, help=doc, choices=f.metadata.get("choices"))
    return finalize_config(Config(**vars(parser.parse_args(argv))))


def check_value(f: dataclasses.Field, value):
    """Refuse a value outside the field's choices or range, NaN and inf included."""
    m = f.metadata
    if "choices" in m and value not in m["choices"]:
        raise LiftError(f"{flag(f.name)}: expected one of {', '.join(m['choices'])}, got '{value}'")
    if "low" in m and value is not None:
        lo, hi, open_lo, open_hi = m["low"], m.get("high"), m.get("open_low"), m.get("open_high")
        ok = math.isfinite(value) and (value > lo if open_lo else value >= lo)
        if not ok or hi is not None and not (value < hi if open_hi else value <= hi):
            kind = "an integer" if "int" in f.type else "a number"
            span = f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}" if hi is not None else f"{'>' if open_lo else '>='} {lo}"
            raise LiftError(f"{flag(f.name)}: expected {kind} {span}, got {value}")


def check_flags(cfg: Config):
    """Every value in its range, and no flag that this combination would silently ignore."""
    for f in dataclasses.fields(cfg):
        check_value(f, getattr(cfg, f.name))
    t, default = cfg.tuning, Config()
    if "{}" not in cfg.prompt:
        raise LiftError(f"--prompt '{cfg.prompt}': the template needs {{}} where the class name goes")
    if cfg.batch_size % cfg.accum_steps:
        raise LiftError(f"--batch-size {cfg.batch_size} is not divisible by --accum-steps {cfg.accum_steps}")
    needs = {"adapter_dim": ("adaptformer", "adapter"), "lora_rank": ("lora",), "vpt_len": ("vpt",),
             "partial_blocks": ("partial",), "mask_ratio": ("mask",), "cache_features": ("classifier",)}
    for name, methods in needs.items():
        if getattr(cfg, name) not in (None, False) and t not in methods:
            raise LiftError(f"{flag(name)} applies to --tuning {' / '.join(methods)} only, not --tuning {t}")
    ignored = [  # (flag given, why it would have no effect)
        (cfg.blocks is not None and t in ("classifier", "zeroshot", "partial"), "--blocks", f"--tuning {t} tunes no vision blocks by index"
         + (" (use --partial-blocks)" if t == "partial" else "")),
        (t == "zeroshot" and cfg.init != "semantic", f"--init {cfg.init}", "zero-shot classifies with the text prompts; drop --init"),
        (cfg.prompt != default.prompt and cfg.init != "semantic" and t != "zeroshot", "--prompt", f"--init {cfg.init} uses no prompt"),
        (cfg.tau != default.tau and cfg.loss == "ce", "--tau", "--loss ce has no logit adjustment (use --loss la)"),
        (cfg.min_scale != default.min_scale and cfg.mda == "max", "--min-scale", "--mda max crops the largest square every epoch"),
        (cfg.expand is not None and not cfg.tte, "--expand", "--no-tte resizes to S + S // 7 and takes the centre crop"),
        (cfg.splits is not None and cfg.data not in BENCHMARKS, "--splits", f"--data {cfg.data} has no split lists"),
        (cfg.inat_level != default.inat_level and cfg.data != "inat2018", "--inat-level", "applies to --data inat2018 only"),
        (cfg.root != default.root and (cfg.data == "shapes_lt" or os.sep in cfg.data), "--root", f"--data {cfg.data} needs no image root"),
        (cfg.amp in ("bf16", "fp16") and cfg.device == "cpu", f"--amp {cfg.amp}", "mixed precision runs on GPUs only"),
        (cfg.checkpoint is not None and not cfg.eval_only, "--checkpoint", "it is read by --eval-only only; to continue a training run use --resume"),
        (cfg.eval_only and cfg.resume, "--resume", "--eval-only trains nothing to continue"),
        (cfg.eval_only and cfg.checkpoint and (cfg.run_name is not None or cfg.out != default.out), "--out / --run-name",
         "--eval-only writes its results beside --checkpoint"),
    ]
    for given, name, why in ignored:
        if given:
            raise LiftError(f"{name}: {why}")
    if cfg.eval_only and cfg.checkpoint is None and t != "zeroshot":
        raise LiftError("--eval-only needs --checkpoint FILE (only --tuning zeroshot evaluates without one)")


def check_vit(visual, cfg: Config):
    """LIFT+ plugs into the blocks of a CLIP ViT with a class token: refuse anything else clearly."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    if not isinstance(visual, VisionTransformer):
        raise LiftError(f"--model {cfg.model}: --tuning {cfg.tuning} needs a CLIP ViT image tower (e.g. ViT-B-16); "
                        f"this model's is {type(visual).__name__}")
    blocks = visual.transformer.resblocks
    if (getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok"
            or not isinstance(visual.patch_dropout, nn.Identity)
            or not all(type(b) is ResidualAttentionBlock and b.attn.batch_first for b in blocks)):
        raise LiftError(f"--model {cfg.model}: only CLIP ViTs with class-token pooling and standard blocks are supported")


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an opened image: PIL's convert('RGB'), as torchvision's and the LIFT+ code's
    loaders (alpha dropped, no EXIF rotation, the first frame of an animation), except where it is
    wrong: 16-bit samples are scaled to 8 bits (convert clips them at 255). Samples of 32-bit integers
    or floats have no 8-bit range: refused."""
    im.load()                                                       # a truncated file fails here
    if im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.uint32)                         # [H, W] in 0..65535
        return np.repeat(((a * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode in ("I", "F"):
        raise ValueError(f"{'32-bit integer' if im.mode == 'I' else 'floating-point'} samples have no 8-bit range; "
                         "convert the file to an 8-bit image")
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")                                     # palette transparency, without PIL's warning
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


def entries(folder: Path, notes: dict) -> tuple:
    """(sub-folders, image files) of a folder, sorted; hidden and tool entries (.*, __MACOSX) and files
    without an image extension are skipped and counted in notes."""
    dirs, files = [], []
    for p in sorted(folder.iterdir()):
        what = ("hidden or tool entries" if p.name.startswith(".") or p.name == "__MACOSX" else None if p.is_dir()
                or p.suffix.lower() in IMAGE_EXTENSIONS else "files without an image extension")
        if what:
            notes[what] = notes.get(what, 0) + 1
        else:
            (dirs if p.is_dir() else files).append(p)
    return dirs, files


def list_images(folder: Path, notes: dict) -> list:
    """The image files under a class folder at any depth (as torchvision's ImageFolder), sorted; symbolic
    links are followed, each real folder once."""
    found, seen, stack = [], set(), [folder]
    while stack:
        d = stack.pop()
        if d.resolve() not in seen:
            seen.add(d.resolve())
            dirs, files = entries(d, notes)
            stack += dirs
            found += files
    return sorted(found)


def build_folder(cfg: Config) -> LTData:
    """A user's own task: <data>/train/<class>/... and <data>/test/<class>/...; the class is the folder name."""
    root = Path(cfg.data)
    if not root.is_dir():
        known = ", ".join([*BENCHMARKS, *CIFAR100_LT, "shapes_lt"])
        if os.sep in cfg.data:
            raise LiftError(f"--data {cfg.data}: no such folder")
        raise LiftError(f"--data: unknown dataset '{cfg.data}'; expected one of {known}, or a folder with train/ and test/")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise LiftError(f"--data {cfg.data}: expected a folder with train/<class>/ and test/<class>/ inside; "
                            f"{root / split} is missing")
    notes, sets = {}, {}
    classnames = [d.name for d in entries(root / "train", {})[0]]
    if not classnames:
        raise LiftError(f"--data {cfg.data}: {root / 'train'} has no class folders")
    for name in classnames:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise LiftError(f"{root / 'train'}: the class folder name {name.encode('utf-8', 'surrogateescape')!r} is not "
                            f"UTF-8; rename it (class names become text prompts)") from None
    index = {c: i for i, c in enumerate(classnames)}
    for split in ("train", "test"):
        paths, labels = [], []
        dirs, loose = entries(root / split, notes)
        notes["images outside class folders skipped"] = notes.get("images outside class folders skipped", 0) + len(loose)
        for d in dirs:
            if d.name not in index:
                raise LiftError(f"{d}: class '{d.name}' has no training folder {root / 'train' / d.name}")
            files = list_images(d, notes)
            paths += [str(p) for p in files]
            labels += [index[d.name]] * len(files)
        if not paths:
            raise LiftError(f"{root / split}: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
        sets[split] = ImageSet(paths, labels)
    counts = np.bincount(sets["train"].labels, minlength=len(classnames))
    if (counts == 0).any():
        raise LiftError(f"{root / 'train'}: class folders without images: {', '.join(np.asarray(classnames)[counts == 0][:5])}")
    data = LTData(sets["train"], sets["test"], classnames, counts)
    data.notes = [f"{n} {what} skipped" if "skipped" not in what else f"{n} {what}" for what, n in sorted(notes.items()) if n]
    return data


def audit(data: LTData) -> list:
    """What the summary reports about a task's lists: repeated entries (kept, as listed), images in both
    splits, classes without test or training images. An image listed under two labels is refused."""
    notes, seen = list(getattr(data, "notes", [])), {}
    for split, images in (("train", data.train), ("test", data.test)):
        if not isinstance(images.images, list):
            continue
        first = {}
        for path, y in zip(images.images, images.labels):
            if first.setdefault(path, y) != y:
                raise LiftError(f"{split} image {path} is listed under two labels, {first[path]} and {y}")
        repeats = len(images.images) - len(first)
        seen[split] = first
        if repeats:
            notes.append(f"{repeats} {split} entries repeat an earlier entry of the same image and label (kept, as listed)")
    if len(seen) == 2 and (both := len(seen["train"].keys() & seen["test"].keys())):
        notes.append(f"{both} test images are also training images")
    tested = np.bincount(data.test.labels, minlength=data.num_classes)
    if (n := int(((tested == 0) & (data.train_counts > 0)).sum())):
        notes.append(f"{n} classes have no test image (no accuracy for them; left out of the group means)")
    if (n := int((data.train_counts == 0).sum())):
        notes.append(f"{n} classes have no training image")
    return notes


def summarize_data(data: LTData, name: str) -> str:
    n, g = data.train_counts, class_groups(data.train_counts)
    return "\n".join([
        f"dataset {name}: {data.num_classes} classes, {len(data.train)} train / {len(data.test)} test images",
        f"  per class: max {n.max()}, min {n.min()}, imbalance ratio {n.max() / max(n.min(), 1):.1f}",
        f"  groups: many (>100) {len(g['many'])}, medium (20-100) {len(g['medium'])}, few (<20) {len(g['few'])} classes",
        *(f"  note: {note}" for note in audit(data))])


def count_params(model: LiftModel) -> dict:
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = model.head.weight.numel() if model.head.weight.requires_grad else 0
    return {"method": tuned - head, "classifier": head, "tuned": tuned, "image_encoder": model.encoder_params}


def describe_tuning(model: LiftModel) -> str:
    params = count_params(model)
    share = lambda n: f"{100 * n / params['image_encoder']:.2f}%"
    sizes = "".join(f"; {k}={v}" for k, v in model.sizes.items() if k not in ("tuning", "blocks"))
    return (f"tuning {model.sizes['tuning']}: {params['method']:,} method + {params['classifier']:,} classifier parameters "
            f"tuned ({share(params['method'])} + {share(params['classifier'])} of the {params['image_encoder']:,}-parameter "
            f"image encoder){sizes}")


def run_folder(cfg: Config) -> Path:
    """Where a run writes: --out/--run-name; an --eval-only run writes beside its checkpoint."""
    return Path(cfg.checkpoint).parent if cfg.eval_only and cfg.checkpoint else Path(cfg.out) / cfg.run_name


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def prepare_run(cfg: Config) -> torch.device:
    """Before anything is built: the device exists; the run folder is a writable folder that no other live
    run holds (a lock file with stale-lock detection); --resume has a checkpoint to continue and a new
    run none to overwrite; temporary files of killed writes are removed. Returns the device."""
    import socket
    device = start_processes(cfg)                                   # Appendix F: the process group under torchrun
    if device is None and cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device is None:
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise LiftError(f"--device {cfg.device}: expected auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LiftError(f"--device {cfg.device}: no CUDA GPU is available on this machine")
    if cfg.eval_only:
        if not Path(cfg.checkpoint or ".").exists():
            raise LiftError(f"--checkpoint {cfg.checkpoint}: no such file")
        return device
    folder = run_folder(cfg)
    if rank() > 0:                                                  # torchrun: the first process prepares the folder
        torch.distributed.barrier()
        return device
    if folder.exists() and not folder.is_dir():
        raise LiftError(f"--out / --run-name: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LiftError(f"--out / --run-name: cannot write in {folder} ({e.strerror})") from None
    me, lock = f"{os.getpid()} {socket.gethostname()}", folder / "lock"
    for _ in range(2):
        try:
            with open(lock, "x") as f:
                f.write(me)
            import atexit
            atexit.register(release_lock, lock)                      # also released when the run's results are written
            break
        except FileExistsError:
            pid, _, host = lock.read_text().partition(" ")
            if lock.read_text() == me:                              # this process took it (an earlier run in it)
                break
            if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                lock.unlink(missing_ok=True)                        # stale: its run is gone
                continue
            raise LiftError(f"{folder}: another run (pid {pid} on {host}) is using this run folder; wait for it to end, "
                            f"or delete {lock} if no run is")
    for tmp in folder.glob("*.tmp*"):                               # left by a write that was killed
        pid = re.fullmatch(r"\.tmp(\d+)", tmp.suffix)
        if pid and (int(pid[1]) == os.getpid() or not pid_alive(int(pid[1]))):
            tmp.unlink(missing_ok=True)
    ckpt = folder / "checkpoint.pt"
    if cfg.resume and not ckpt.exists() and not cfg.check:
        raise LiftError(f"--resume: {folder} holds no checkpoint.pt to continue; drop --resume to start this run")
    if ckpt.exists() and not cfg.resume and cfg.tuning != "zeroshot":
        raise LiftError(f"{ckpt} exists: pass --resume to continue that run, or --run-name NAME for a new one")
    versions = {m: __import__(m).__version__ for m in ("torch", "torchvision", "open_clip", "numpy", "PIL")}
    if not cfg.check:                                               # --check leaves no files behind
        atomic_write(folder / "run.json", json.dumps({"config": dataclasses.asdict(cfg), "versions": versions, "python": sys.version.split()[0],
                                                     "device": str(device), "processes": processes(), "argv": sys.argv}, indent=1).encode())
    if processes() > 1:
        torch.distributed.barrier()
    return device


def release_lock(lock: Path):
    """Remove the run folder's lock if this process holds it."""
    import socket
    try:
        if lock.read_text() == f"{os.getpid()} {socket.gethostname()}":
            lock.unlink()
    except OSError:
        pass


def atomic_write(path: Path, payload: bytes):
    """Write a temporary file in the same folder, then rename it: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
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


def tuned_state(model: nn.Module) -> dict:
    """What a checkpoint holds: the tuned parameters (and random-mask indices), never frozen CLIP."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.cpu().clone() for n, b in model.named_buffers() if n.endswith(".index")})
    return state


@functools.cache
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """The first 16 hex digits of a file's SHA-256, computed once per version (size, mtime) of the file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_identity(cfg: Config) -> str:
    """What the frozen model is, however the flags spelled it: the resolved open_clip model, its activation,
    and its weights (the pretrained tag, the SHA-256 of the file, or random weights of the seed)."""
    name, pretrained, quick_gelu, tag_cfg = resolve_clip(cfg)
    act = "QuickGELU" if quick_gelu else "GELU"
    if pretrained is None:
        return f"{name}, {act}, random weights of seed {cfg.seed}"
    if tag_cfg:
        return f"{name}, {act}, pretrained {pretrained}"
    stat = os.stat(pretrained)
    return f"{name}, {act}, weights sha256 {file_sha256(os.path.realpath(pretrained), stat.st_size, stat.st_mtime_ns)}"


def checkpoint_identity(cfg: Config, data: LTData, model: LiftModel) -> dict:
    """What a checkpoint must agree on with the run that loads it."""
    digest = lambda xs: hashlib.sha1("\n".join(map(str, xs)).encode()).hexdigest()
    return {"model": weights_identity(cfg), "tuning": cfg.tuning, "num_classes": data.num_classes,
            "classes": digest(data.classnames), "train_counts": digest(data.train_counts), "method": model.sizes}


RESUME_MAY_CHANGE = ("resume", "check", "workers", "log_every", "eval_batch_size", "device", "tte", "expand", "root",
                     "splits", "cache", "out", "model", "pretrained")  # model and pretrained: compared as the identity


def save_checkpoint(path: Path, cfg, data, model, opt, sched, scaler, epoch: int, losses: list):
    if rank() > 0:                                                  # torchrun: the first process writes
        return
    atomic_torch_save(path, {"classnames": list(data.classnames), "train_counts": [int(n) for n in data.train_counts],
        "identity": checkpoint_identity(cfg, data, model), "config": dataclasses.asdict(cfg), "epoch": epoch,
        "train_loss": losses, "tuned": tuned_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler else None, "rng": torch.get_rng_state()})


def read_checkpoint(path, cfg: Config, data: LTData, model: LiftModel, copy: bool = True) -> dict:
    """torch.load with weights_only=True, refusing a checkpoint of another model or task; then the tuned
    parameters are copied into the model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LiftError(f"--checkpoint {path}: no such file") from None
    except Exception as e:
        raise LiftError(f"checkpoint {path}: cannot be read ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "identity" not in state or "tuned" not in state:
        raise LiftError(f"checkpoint {path}: not a lift_plus checkpoint")
    ours, theirs = checkpoint_identity(cfg, data, model), state["identity"]
    wrong = [k for k in ours if theirs.get(k) != ours[k]]
    if wrong:
        hashed, show = ("classes", "train_counts"), lambda v: ", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else v
        detail = "; ".join(f"{k}: checkpoint '{show(theirs.get(k))}', this run '{show(ours[k])}'" for k in wrong if k not in hashed)
        detail += "".join(f"; the {k.replace('_', ' ')} differ" for k in hashed if k in wrong)
        raise LiftError(f"checkpoint {path} does not match this run ({detail.lstrip('; ')})")
    own, tuned = tuned_state(model), state["tuned"]
    if set(own) != set(tuned) or any(own[k].shape != tuned[k].shape for k in own):
        raise LiftError(f"checkpoint {path}: its tuned parameters do not match this model's")
    if copy:
        with torch.no_grad():
            params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
            for k, v in tuned.items():
                (params[k] if k in params else buffers[k]).copy_(v)
    return state


def load_tuned(model: LiftModel, cfg: Config, data: LTData, path) -> list:
    """--eval-only: the checkpoint's tuned parameters; returns its per-epoch training losses."""
    return list(read_checkpoint(path, cfg, data, model)["train_loss"])


def check_resume(cfg: Config, state: dict, path: Path):
    """A resumed run keeps its settings: a changed training flag is refused with the difference (a longer
    --epochs too: the cosine schedule of the first epochs was set by the old number)."""
    saved, now = state["config"], dataclasses.asdict(cfg)
    diff = [f"{flag(k)} {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
    if diff:
        raise LiftError(f"--resume: {path} was written with other settings ({'; '.join(diff)}); resume with the run's "
                        f"own settings, or start a new run with --run-name NAME")


def resume(cfg: Config, data: LTData, model: LiftModel, opt, sched, scaler, run_dir: Path) -> tuple:
    """(first epoch, losses so far): 0 and [] for a new run, or the state of the run folder's checkpoint
    with --resume, restored exactly: tuned parameters, optimiser, schedule, scaler and RNG. Also checks
    that the disk holds two checkpoints (the old one stays until the new one is complete)."""
    import shutil
    run_dir.mkdir(parents=True, exist_ok=True)
    need = 2 * sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) + (1 << 20)
    if shutil.disk_usage(run_dir).free < need:
        raise LiftError(f"--out: {run_dir} has {shutil.disk_usage(run_dir).free >> 20} MiB free; a checkpoint needs "
                        f"{need >> 20} MiB")
    path = run_dir / "checkpoint.pt"
    if not cfg.resume:
        return 0, []
    state = read_checkpoint(path, cfg, data, model)
    check_resume(cfg, state, path)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    print(f"resuming {path} after epoch {state['epoch']}/{cfg.epochs}")
    return state["epoch"], list(state["train_loss"])


def check_inputs(cfg: Config, data: LTData, model: LiftModel):
    """--check: after fit built and checked the task, the weights and the run folder without training,
    every listed image file must exist and a sample of each split must decode; a --resume must agree
    with its checkpoint. Prints what it checked."""
    for split, images in (("train", data.train), ("test", data.test)):
        if isinstance(images.images, list):
            missing = [p for p in images.images if not os.path.isfile(p)]
            if missing:
                raise LiftError(f"{len(missing)} of the {len(images)} {split} images are missing, e.g. {missing[0]}")
        for i in np.unique(np.linspace(0, len(images) - 1, min(len(images), 64)).astype(int)):
            images.load(int(i))
    ckpt = run_folder(cfg) / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        check_resume(cfg, read_checkpoint(ckpt, cfg, data, model, copy=False), ckpt)
    print(f"check passed: flags, {len(data.train) + len(data.test)} image files, the weights and "
          f"{'--checkpoint' if cfg.eval_only else run_folder(cfg)}; nothing was trained")


def write_results(cfg: Config, data: LTData, model: LiftModel, report: dict):
    """results.json (strict JSON: null for a group without test images). A re-evaluation (--eval-only)
    sits beside the training run's results.json instead of replacing it."""
    if rank() > 0:
        return
    name = "results.json" if not cfg.eval_only else f"results_eval_{f'tte{cfg.expand}' if cfg.tte else 'centre'}.json"
    results = {"config": dataclasses.asdict(cfg), "metrics": {k: report[k] for k in ("overall", "many", "medium", "few")},
               "params": count_params(model), "train_loss": model.train_loss, "classnames": list(data.classnames),
               "train_counts": [int(n) for n in data.train_counts], "per_class_accuracy": report["per_class"]}
    atomic_write(run_folder(cfg) / name, json.dumps(results, indent=1, allow_nan=False).encode())
    print(f"wrote {run_folder(cfg) / name}")
    release_lock(run_folder(cfg) / "lock")                          # the run is complete


class clean_exit:
    """Every way a run can end short of success ends in one line on stderr: bad input (exit 2), an
    interrupt (130, with the right hint), or an unexpected error (1, its traceback kept in a file)."""

    def __enter__(self):
        signal.signal(signal.SIGINT, signal.default_int_handler)    # from here on, Ctrl-C is a KeyboardInterrupt
        self.cfg = None
        return self

    def __exit__(self, kind, e, tb):
        say = lambda msg: print(msg.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr, flush=True)
        if e is None or isinstance(e, SystemExit):
            return False
        if isinstance(e, LiftError) or "LiftError: " in str(e):      # also raised in a DataLoader worker
            say("error: " + str(e).strip().splitlines()[-1].split("LiftError: ", 1)[-1])
            sys.exit(2)
        if isinstance(e, KeyboardInterrupt):
            ckpt = run_folder(self.cfg) / "checkpoint.pt" if self.cfg and not self.cfg.eval_only else None
            try:
                epoch = torch.load(ckpt, weights_only=True)["epoch"] if ckpt and ckpt.is_file() else 0
            except Exception:                                       # (written atomically, so this is not expected)
                epoch = 0
            say(f"\ninterrupted; epoch {epoch}/{self.cfg.epochs} is in {ckpt}: continue with --resume" if epoch else
                "\ninterrupted before any epoch finished: nothing to resume")
            sys.exit(130)
        import tempfile
        import traceback
        log = Path(tempfile.gettempdir()) / f"lift_plus_error_{os.getpid()}.log"
        log.write_text("".join(traceback.format_exception(kind, e, tb)))
        say(f"error: an internal error ({type(e).__name__}) ended the run: a bug in lift_plus, not in your input; "
            f"please report it with the traceback in {log}")
        sys.exit(1)
# ==========================================================================================
# APPENDIX F. Past one GPU and one run: torchrun, metrics.jsonl, predict, iNaturalist's taxonomy
# Plugs into Part I at make_loader (ShardedBatches, Padded), train (distributed, processes,
# mean_over_processes, Progress), over_dataset (gather_in_order) and main (predict); E's prepare_run
# starts the process group. `torchrun --nproc_per_node N lift_plus.py ...` runs PyTorch's
# DistributedDataParallel; one process is exactly the single-process run.


def processes() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def start_processes(cfg: Config):
    """Under torchrun (WORLD_SIZE > 1): the process group (NCCL on GPUs, gloo on CPUs), this process's GPU,
    and quiet standard output on every process but the first. Returns the device, or None without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device


class ShardedBatches(torch.utils.data.Sampler):
    """Batches of indices: of one seeded permutation (training, as RandomSampler draws it) or in order. Under
    torchrun, process r takes items r, r + W, ... of every batch, so each optimiser step sees the images,
    and the crops, of the single-process run. In training a process whose share is empty gets a padding
    item (a negative index, label -100), so that every process runs every step."""

    def __init__(self, n: int, batch_size: int, generator=None):
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __len__(self):
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.generator else list(range(self.n))
        for i in range(0, self.n, self.batch_size):
            batch = order[i:i + self.batch_size]
            share = batch[rank()::processes()]
            if share or self.generator is not None:                 # training: every process runs every step
                yield share or [-1 - batch[0]]


class Padded(torch.utils.data.Dataset):
    """A dataset whose negative index -1 - i is item i with label -100, which the loss ignores."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i] if i >= 0 else (self.dataset[-1 - i][0], -100)


def distributed(module: nn.Module) -> nn.Module:
    """DistributedDataParallel under torchrun (it averages the gradients of the processes); else the module."""
    if processes() == 1:
        return module
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                               forward_sync_buffers=False)  # CLIP's mean and std are the same everywhere


def mean_over_processes(total: torch.Tensor, seen: int) -> float:
    """The epoch's mean loss over every image of every process."""
    if processes() > 1:
        both = torch.stack([total.detach().float(), torch.tensor(float(seen), device=total.device)])
        torch.distributed.all_reduce(both)
        total, seen = both[0], both[1].item()
    return total.item() / seen


def gather_in_order(out: list, labels: list, sampler: ShardedBatches) -> tuple:
    """Each process's outputs and labels put back in dataset order (evaluation): exactly one row per image."""
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)
    if processes() == 1:
        return cat(out), cat(labels)
    shares = [None] * processes()
    torch.distributed.all_gather_object(shares, (cat(out), cat(labels)))
    n, B, W = sampler.n, sampler.batch_size, processes()
    positions = [[i for s in range(0, n, B) for i in range(s, min(s + B, n))[r::W]] for r in range(W)]
    outputs = torch.empty(n, *next(o for o, _ in shares if len(o)).shape[1:])
    targets = torch.empty(n, dtype=torch.long)
    for (o, y), idx in zip(shares, positions):
        if idx:
            outputs[idx], targets[idx] = o, y
    return outputs, targets


class Progress:
    """A progress line every --log-every optimiser steps and at the end of each epoch (loss, lr, images per
    second, the fraction of time spent waiting for data, time left), and a line per epoch in metrics.jsonl."""

    def __init__(self, cfg: Config, steps: int, run_dir: Path):
        self.cfg, self.steps, self.path, self.t0, self.done, self.lr = cfg, steps, run_dir / "metrics.jsonl", time.time(), 0, 0.0

    def timed(self, loader):
        self.wait, self.start, self.images = 0.0, time.time(), 0
        batches, t = iter(loader), time.time()
        for views, y in batches:
            self.wait += time.time() - t                            # the time spent waiting for this batch
            self.images += len(y) * processes()
            yield views, y
            t = time.time()

    def step(self, epoch: int, step: int, last: bool, loss, lr: float):
        self.done, self.lr = self.done + 1, lr
        if (step + 1) % self.cfg.log_every and not last:
            return
        rate = self.done / (time.time() - self.t0)
        eta = ((self.cfg.epochs - epoch) * self.steps - step - 1) / max(rate, 1e-9)
        print(f"epoch {epoch + 1}/{self.cfg.epochs} step {step + 1}/{self.steps} loss {loss():.4f} lr {lr:.5f} "
              f"{rate * self.cfg.batch_size:.1f} img/s, data wait {100 * self.wait / (time.time() - self.start):.0f}% "
              f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)

    def epoch_end(self, epoch: int, loss: float):
        seconds = time.time() - self.start
        line = {"epoch": epoch + 1, "loss": loss, "lr": self.lr, "images_per_s": self.images / seconds,
                "data_wait": self.wait / seconds, "epoch_s": seconds, "peak_memory_gib": peak_memory() / 2 ** 30}
        if rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")


def peak_memory() -> int:
    """Peak bytes so far: of the GPU's tensors where CUDA is in use, else of the process (its resident set)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # macOS: bytes


def predict_main(argv: list):
    """python lift_plus.py predict --checkpoint runs/x/checkpoint.pt IMAGES... [--top-k 5] [--out preds.csv]:
    the top-k classes and probabilities of image files (or folders of them), with the run's test views (TTE)."""
    p = Parser(prog="lift_plus.py predict", description=predict_main.__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="image files, or folders searched at any depth")
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by a training run")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--out", default=None, help="a .csv or .json file (default: CSV on standard output)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    a = p.parse_args(argv)
    if not Path(a.checkpoint).is_file():
        raise LiftError(f"--checkpoint {a.checkpoint}: no such file")
    try:
        state = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
    except Exception:
        raise LiftError(f"--checkpoint {a.checkpoint}: not a lift_plus checkpoint with its run's settings") from None
    cfg = finalize_config(dataclasses.replace(Config(**saved), eval_only=True, checkpoint=a.checkpoint, resume=False,
                                              run_name=None, out=Config().out, device=a.device, workers=a.workers, init="semantic",
                                              prompt=Config().prompt if saved["init"] != "semantic" else saved["prompt"]))
    if a.top_k < 1:
        raise LiftError(f"--top-k: expected an integer >= 1, got {a.top_k}")
    notes, paths = {}, []
    for item in map(Path, a.images):
        if not item.exists():
            raise LiftError(f"{item}: no such file or folder")
        paths += [str(q) for q in (list_images(item, notes) if item.is_dir() else [item])]
    if not paths:
        raise LiftError(f"{', '.join(a.images)}: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    data = LTData(ImageSet([], []), ImageSet([], []), state["classnames"], np.asarray(state["train_counts"]))
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):                    # standard output is for the predictions
        model = build_model(cfg, data, prepare_run(cfg))
    read_checkpoint(a.checkpoint, cfg, data, model)
    views = Views(ImageSet(paths, [0] * len(paths)), test_views(cfg, model.image_size))  # the run's own test views
    logits, _ = over_dataset(lambda v: tte_logits(model, v), model, views, cfg)
    prob, top = logits.softmax(dim=1).topk(min(a.top_k, data.num_classes), dim=1)  # [N, k]
    rows = [{"image": path, "top": [{"class": data.classnames[c], "probability": round(float(q), 6)} for c, q in zip(t, pr)]}
            for path, t, pr in zip(paths, top.tolist(), prob.tolist())]
    if a.out and a.out.endswith(".json"):
        return atomic_write(Path(a.out), json.dumps(rows, indent=1).encode())
    import csv
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image"] + [f"{x}_{i + 1}" for i in range(len(rows[0]["top"])) for x in ("class", "probability")])
    w.writerows([[r["image"]] + [v for t in r["top"] for v in (t["class"], t["probability"])] for r in rows])
    atomic_write(Path(a.out), buf.getvalue().encode()) if a.out else print(buf.getvalue(), end="")


if __name__ == "__main__":
    main()
