"""LIFT+: Lightweight Fine-Tuning for Long-Tail Learning, in one file.

Shi, Wei, Li, "LIFT+: Lightweight Fine-Tuning for Long-Tail Learning", arXiv 2504.13282.

Heavy fine-tuning of a foundation model on long-tailed data makes the train and test
class-conditional feature distributions of the tail classes disagree (Proposition 3.1), which
biases predictions toward head classes. LIFT+ therefore keeps CLIP frozen and tunes < 1 % of
its parameters for a few epochs:

    frozen CLIP ViT  +  AdaptFormer in every block          [paper: lightweight fine-tuning]
                     +  cosine classifier from text prompts  [paper: semantic-aware initialization]
                     +  logit-adjusted cross-entropy         [paper: Proposition 3.1 and its remark]
                     +  minimalist data augmentation (MDA)   [paper: minimalist data augmentation]
                     +  test-time ensembling of five crops   [paper: test-time ensembling]

The comments name the paper's component ("[paper: ...]") that each function or class implements.

The file reads top to bottom in the order the algorithm runs:
  1. Config            one dataclass, one line of doc per field, parsed from the command line
  2. Data              split lists, CIFAR-100-LT, image folders; Many / Medium / Few groups
  3. Transforms        MDA for training, TTE (or resize + centre crop) for testing
  4. Model             CLIP loading, AdaptFormer, cosine classifier, semantic init
  5. Tuning methods    which parameters train (LIFT+ and the paper's baselines)
  6. Loss              logit-adjusted cross-entropy
  7. Training          SGD + cosine schedule, mixed precision, atomic checkpoints, resume
  8. Evaluation        Overall / Many / Medium / Few accuracy, results.json
  9. Offline world     named toy images, a tiny CLIP pretrained on them, a long-tailed task (CPU quick start)
 10. Main              the command-line entry point

Quick start (CPU, no network):  python lift_plus.py --data shapes_lt
Paper setting (GPU, internet):  python lift_plus.py --data imagenet_lt --root /data/imagenet
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# ==========================================================================================
# 1. Config
# ==========================================================================================


def arg(default, help):
    """A config field with its one-line doc, which is also its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data
    data: str = arg("imagenet_lt", "imagenet_lt | places_lt | inat2018 | cifar100_ir100 | cifar100_ir50 | cifar100_ir10 | shapes_lt | a folder with train/<class>/* and test/<class>/*")
    root: str = arg("./data", "dataset root: image paths in the split lists are relative to it; CIFAR-100 is downloaded here")
    splits: Optional[str] = arg(None, "folder holding the split lists (default: look in --root, then in the cache, then download)")
    cache: str = arg("~/.cache/lift_plus", "where downloaded split lists and the offline world's pretrained model are kept")
    # model
    model: str = arg("ViT-B-16", "open_clip ViT name (ViT-B/16 spelling accepted) or a path to an open_clip model-config JSON")
    pretrained: str = arg("openai", "open_clip pretrained tag, a local checkpoint file, or 'none' for random weights")
    quick_gelu: str = arg("auto", "auto | yes | no: QuickGELU activation (OpenAI's CLIP uses it; auto follows the pretrained tag)")
    # method
    tuning: str = arg("adaptformer", "adaptformer | classifier | full | partial | bitfit | vpt | adapter | lora | mask | zeroshot")
    adapter_dim: Optional[int] = arg(None, "bottleneck r of AdaptFormer / Adapter (default 2**max(0, floor(log2(K / 2L))))")
    blocks: Optional[str] = arg(None, "vision blocks the method acts on, e.g. '0-11' or '8,9,10,11' (default: all; partial: the last --partial-blocks)")
    partial_blocks: int = arg(1, "partial fine-tuning: number of last vision blocks to tune")
    lora_rank: Optional[int] = arg(None, "LoRA rank on q and v (default 2**max(0, floor(log2(K / 4L))))")
    vpt_len: Optional[int] = arg(None, "VPT-deep prompt length per block (default 2**max(0, floor(log2(K / L))))")
    mask_ratio: float = arg(0.005, "random-mask fine-tuning: fraction of entries tuned in each block weight tensor")
    init: str = arg("semantic", "classifier init: semantic | class_mean | linear_probe | none")
    prompt: str = arg("a photo of a {}.", "prompt template for the semantic classifier init and zero-shot")
    logit_scale: float = arg(25.0, "cosine classifier scale s: logit_j = s * cos(f, w_j)")
    # loss
    loss: str = arg("la", "la (logit-adjusted cross-entropy) | ce")
    tau: float = arg(1.0, "logit-adjustment strength tau")
    # optimisation
    epochs: Optional[int] = arg(None, "training epochs (default 5; 15 for inat2018)")
    batch_size: int = arg(128, "images per optimiser step")
    accum_steps: int = arg(1, "micro-batches per optimiser step (gradient accumulation); must divide --batch-size")
    lr: Optional[float] = arg(None, "SGD learning rate (default 0.02; classifier 0.03; full / partial 0.001, 0.002 on places_lt)")
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(5e-4, "SGD weight decay on every tuned parameter")
    # augmentation and test-time ensembling
    mda: str = arg("convex", "MDA schedule of the minimum crop area: convex | linear | concave | min | max")
    min_scale: float = arg(0.08, "smallest crop area fraction of MDA (at the first epoch)")
    tte: bool = arg(True, "test-time ensembling: resize to size+expand, average the logits of five crops")
    expand: Optional[int] = arg(None, "TTE resize: shorter side to image size S + expand (default round(24 S / 224): 248 for 224)")
    # run
    out: str = arg("runs", "parent folder of run folders")
    run_name: Optional[str] = arg(None, "run folder name (default <data>_<tuning>_seed<seed>)")
    resume: bool = arg(False, "continue the run in the run folder from its last checkpoint")
    eval_only: bool = arg(False, "no training: evaluate --checkpoint (or the untrained model for zeroshot)")
    checkpoint: Optional[str] = arg(None, "checkpoint file to evaluate with --eval-only")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    amp: str = arg("auto", "auto (bf16 on GPUs that support it, else fp16) | bf16 | fp16 | off; always off on CPU")
    workers: Optional[int] = arg(None, "DataLoader worker processes (default min(8, CPUs))")
    eval_batch_size: int = arg(128, "images per evaluation batch (TTE runs five crops per image)")
    cache_features: bool = arg(False, "--tuning classifier only: compute the frozen features of fixed views (shorter side to S, centre crop; no MDA) once and train the classifier on them")
    seed: int = arg(0, "seed of the model init, the data order and the crops")
    log_every: int = arg(50, "print a progress line every this many optimiser steps")


TUNINGS = ("adaptformer", "classifier", "full", "partial", "bitfit", "vpt", "adapter", "lora", "mask", "zeroshot")
INITS = ("semantic", "class_mean", "linear_probe", "none")
MDA_SCHEDULES = ("convex", "linear", "concave", "min", "max")


class LiftError(Exception):
    """Bad input: the message names the flag or file and what was expected."""


def parse_config(argv=None) -> Config:
    """Build the argparse parser from Config's fields; flags are the field names with dashes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata["help"]
        doc += "" if f.default is None or "default" in doc else f" (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        else:
            kind = {"int": int, "float": float}.get(f.type.replace("Optional[", "").rstrip("]"), str)
            parser.add_argument(flag, type=kind, default=f.default, help=doc)
    cfg = Config(**vars(parser.parse_args(argv)))
    return finalize_config(cfg)


def finalize_config(cfg: Config) -> Config:
    """Check every flag and fill the defaults that depend on other flags."""
    if cfg.tuning not in TUNINGS:
        raise LiftError(f"--tuning: expected one of {', '.join(TUNINGS)}, got '{cfg.tuning}'")
    if cfg.init not in INITS:
        raise LiftError(f"--init: expected one of {', '.join(INITS)}, got '{cfg.init}'")
    if cfg.loss not in ("la", "ce"):
        raise LiftError(f"--loss: expected 'la' or 'ce', got '{cfg.loss}'")
    if cfg.mda not in MDA_SCHEDULES:
        raise LiftError(f"--mda: expected one of {', '.join(MDA_SCHEDULES)}, got '{cfg.mda}'")
    if cfg.quick_gelu not in ("auto", "yes", "no"):
        raise LiftError(f"--quick-gelu: expected auto, yes or no, got '{cfg.quick_gelu}'")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise LiftError(f"--amp: expected auto, bf16, fp16 or off, got '{cfg.amp}'")
    if cfg.epochs is None:
        cfg.epochs = 15 if cfg.data == "inat2018" else 5
    if cfg.epochs < 1:
        raise LiftError(f"--epochs: expected an integer >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1 or cfg.accum_steps < 1:
        raise LiftError(f"--batch-size and --accum-steps must be >= 1, got {cfg.batch_size} and {cfg.accum_steps}")
    if cfg.batch_size % cfg.accum_steps:
        raise LiftError(f"--batch-size {cfg.batch_size} is not divisible by --accum-steps {cfg.accum_steps}")
    if not 0.0 < cfg.min_scale <= 1.0:
        raise LiftError(f"--min-scale: expected a fraction in (0, 1], got {cfg.min_scale}")
    if not 0.0 < cfg.mask_ratio <= 1.0:
        raise LiftError(f"--mask-ratio: expected a fraction in (0, 1], got {cfg.mask_ratio}")
    if cfg.lr is None:
        cfg.lr = {"classifier": 0.03, "full": 0.001, "partial": 0.001}.get(cfg.tuning, 0.02)
        if cfg.tuning in ("full", "partial") and cfg.data == "places_lt":
            cfg.lr = 0.002
    if cfg.cache_features and cfg.tuning != "classifier":
        raise LiftError(f"--cache-features needs --tuning classifier (the backbone must be frozen), got --tuning {cfg.tuning}")
    if cfg.eval_only and cfg.checkpoint is None and cfg.tuning != "zeroshot":
        raise LiftError("--eval-only needs --checkpoint FILE (only --tuning zeroshot evaluates without one)")
    if cfg.workers is None:
        cfg.workers = min(8, os.cpu_count() or 1)
    if cfg.run_name is None:
        cfg.run_name = f"{Path(cfg.data).name if os.sep in cfg.data else cfg.data}_{cfg.tuning}_seed{cfg.seed}"
    return cfg


# ==========================================================================================
# 2. Data: split lists, CIFAR-100-LT, image folders; Many / Medium / Few groups [paper: experiments]
# ==========================================================================================

# Split lists of the standard benchmarks ("relative/path label" per line, OLTR's format).
# For each dataset: the file names we accept for train and test, in order of preference,
# and where the published lists are fetched from when they are missing and we are online.
SPLIT_LISTS = {
    "imagenet_lt": dict(train=("ImageNet_LT_train.txt", "train.txt"), test=("ImageNet_LT_test.txt", "test.txt"),
                        subdir="ImageNet_LT"),
    "places_lt": dict(train=("Places_LT_train.txt", "train.txt"), test=("Places_LT_test.txt", "test.txt"),
                      subdir="Places_LT", extra=("classnames.txt",)),
    "inat2018": dict(train=("iNaturalist18_train.txt", "train.txt"), test=("iNaturalist18_val.txt", "val.txt"),
                     subdir="iNaturalist2018", extra=("categories.json",)),
}
SPLIT_URL = "https://raw.githubusercontent.com/shijxcs/LIFT-plus/HEAD/datasets/{subdir}/{name}"
CIFAR_RATIOS = {"cifar100_ir100": 100, "cifar100_ir50": 50, "cifar100_ir10": 10}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


@dataclass
class LTData:
    """A long-tailed task: training and test sets, class names, and per-class training counts."""
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classnames: list
    train_counts: np.ndarray  # [K] images per class in the training set


class ImageListDataset(torch.utils.data.Dataset):
    """Images named by path, read lazily: building it never touches the files.

    load(i) returns the decoded image as a uint8 tensor [3, H, W]; JPEGs are decoded by
    libjpeg-turbo through torchvision (same pixels as PIL, about 1.5x faster), other formats by PIL."""

    def __init__(self, paths, labels):
        self.paths, self.labels = list(paths), list(labels)

    def __len__(self):
        return len(self.paths)

    def load(self, i) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                raw = f.read()
            if raw[:2] == b"\xff\xd8":  # JPEG
                try:
                    return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
                except RuntimeError:
                    pass  # an unusual JPEG (e.g. CMYK): let PIL try
            with Image.open(io.BytesIO(raw)) as img:
                return pil_to_tensor(img.convert("RGB"))
        except (OSError, ValueError) as e:  # missing, truncated or not an image
            raise LiftError(f"cannot read image {path}: {e}") from None


class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory as a uint8 array [N, H, W, 3] (CIFAR, the offline world)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, list(labels)

    def __len__(self):
        return len(self.labels)

    def load(self, i) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1)          # [3, H, W]


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]


def read_split_list(path, root, num_classes=None):
    """Parse a "relative/path label" split list; every bad line is reported with file:line."""
    paths, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise LiftError(f"{path}:{lineno}: expected '<relative/image/path> <integer label>', got '{line.strip()}'")
            label = int(parts[1])
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise LiftError(f"{path}:{lineno}: label {label} is outside the class range 0..{num_classes - 1}")
            paths.append(os.path.join(root, parts[0].lstrip("/")))
            labels.append(label)
    if not labels:
        raise LiftError(f"{path}: the split list is empty")
    return paths, labels


def find_split_files(cfg: Config) -> dict:
    """Locate the split lists of a benchmark: --splits, then --root, then the cache, then download."""
    spec = SPLIT_LISTS[cfg.data]
    wanted = {"train": spec["train"], "test": spec["test"], **{n: (n,) for n in spec.get("extra", ())}}
    cache = Path(cfg.cache).expanduser() / "splits" / spec["subdir"]
    folders = [Path(cfg.splits)] if cfg.splits else [Path(cfg.root), Path(cfg.root) / spec["subdir"], cache]
    if cfg.splits and not Path(cfg.splits).is_dir():
        raise LiftError(f"--splits {cfg.splits}: no such folder")

    def locate():
        found = {}
        for key, names in wanted.items():
            found[key] = next((d / n for d in folders for n in names if (d / n).is_file()), None)
        return found

    found = locate()
    missing = [k for k, p in found.items() if p is None]
    if missing and not cfg.splits:
        if online("raw.githubusercontent.com"):
            cache.mkdir(parents=True, exist_ok=True)
            for key in missing:
                name = wanted[key][-1]  # the authors' file names: train.txt, test.txt, ...
                url = SPLIT_URL.format(subdir=spec["subdir"], name=name)
                print(f"downloading {url}")
                try:
                    atomic_write_bytes(cache / name, urllib.request.urlopen(url, timeout=60).read())
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


def build_benchmark(cfg: Config) -> LTData:
    """ImageNet-LT, Places-LT or iNaturalist 2018 from their split lists [paper: datasets]."""
    if not Path(cfg.root).is_dir():
        raise LiftError(f"--root {cfg.root}: no such folder (expected the dataset's image root)")
    files = find_split_files(cfg)
    if cfg.data == "imagenet_lt":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # CLIP's curated ImageNet names
        classnames = list(IMAGENET_CLASSNAMES)
        to_label = None
    elif cfg.data == "places_lt":
        classnames = read_places_classnames(files["classnames.txt"])
        to_label = None
    else:  # inat2018: labels follow the sorted unique species names of categories.json
        id_to_name = read_inat_categories(files["categories.json"])
        classnames = sorted(set(id_to_name.values()))
        index = {name: i for i, name in enumerate(classnames)}
        to_label = {cid: index[name] for cid, name in id_to_name.items()}
    num_ids = len(to_label) if to_label else len(classnames)
    splits = {}
    for split in ("train", "test"):
        paths, labels = read_split_list(files[split], cfg.root, num_ids)
        if to_label is not None:
            unknown = sorted(set(labels) - set(to_label))
            if unknown:
                raise LiftError(f"{files[split]}: category ids {unknown[:5]} are not in {files['categories.json']}")
            labels = [to_label[y] for y in labels]
        splits[split] = ImageListDataset(paths, labels)
    counts = np.bincount(splits["train"].labels, minlength=len(classnames))
    return LTData(splits["train"], splits["test"], classnames, counts)


def read_places_classnames(path) -> list:
    """Places365 category names, one per line ('airfield', 'apartment_building-outdoor', ...).

    The official categories_places365.txt format ('/a/airfield 0') is accepted as well."""
    names = []
    with open(path) as f:
        for line in f:
            if line.strip():
                name = line.split()[0]
                if name.startswith("/"):  # '/a/apartment_building/outdoor' -> 'apartment_building-outdoor'
                    name = "-".join(name.split("/")[2:])
                names.append(name)
    return names


def read_inat_categories(path) -> dict:
    """Category id -> species name from iNaturalist 2018's categories.json."""
    try:
        with open(path) as f:
            entries = json.load(f)
        return {int(e.get("id", i)): e["name"] for i, e in enumerate(entries)}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LiftError(f"{path}: expected a JSON list of {{'id', 'name'}} entries ({e})") from None


def cifar100_lt_counts(ratio, num_classes=100, max_count=500) -> list:
    """Images kept per class in CIFAR-100-LT: int(500 * (1/ratio) ** (i / 99)) (Cao et al., 2019)."""
    return [int(max_count * (1 / ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]


def make_long_tailed(labels, counts, seed=0) -> np.ndarray:
    """Indices of the long-tailed subset: per class, the first counts[c] after a numpy shuffle.

    One global numpy RandomState(seed) shuffles the classes' index lists in class order, which
    reproduces the commonly used CIFAR-100-LT split."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep)


def build_cifar100_lt(cfg: Config) -> LTData:
    """CIFAR-100-LT at imbalance ratio 100, 50 or 10; the test set is CIFAR-100's, unchanged."""
    import torchvision
    root = Path(cfg.root).expanduser()
    online_now = online("www.cs.toronto.edu")
    try:
        train = torchvision.datasets.CIFAR100(str(root), train=True, download=online_now)
        test = torchvision.datasets.CIFAR100(str(root), train=False, download=online_now)
    except RuntimeError as e:
        raise LiftError(f"--root {cfg.root}: CIFAR-100 not found ({e}). Put the extracted 'cifar-100-python' "
                        f"folder there, or run once with internet to download it.") from None
    counts = cifar100_lt_counts(CIFAR_RATIOS[cfg.data])
    keep = make_long_tailed(train.targets, counts, seed=0)
    train_set = ArrayDataset(train.data[keep], np.asarray(train.targets)[keep])
    test_set = ArrayDataset(test.data, test.targets)
    return LTData(train_set, test_set, list(train.classes), np.asarray(counts))


def build_folder(cfg: Config) -> LTData:
    """A user's own task: <data>/train/<class>/* and <data>/test/<class>/*; class = folder name."""
    root = Path(cfg.data)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise LiftError(f"--data {cfg.data}: expected a folder with train/<class>/ and test/<class>/ inside; "
                            f"{root / split} is missing")
    classnames = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classnames:
        raise LiftError(f"--data {cfg.data}: {root / 'train'} has no class folders")
    index = {c: i for i, c in enumerate(classnames)}
    sets = {}
    for split in ("train", "test"):
        paths, labels = [], []
        for d in sorted((root / split).iterdir()):
            if not d.is_dir():
                continue
            if d.name not in index:
                raise LiftError(f"{d}: class '{d.name}' has no training folder {root / 'train' / d.name}")
            for p in sorted(d.iterdir()):
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    paths.append(str(p))
                    labels.append(index[d.name])
        if not paths:
            raise LiftError(f"{root / split}: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
        sets[split] = ImageListDataset(paths, labels)
    counts = np.bincount(sets["train"].labels, minlength=len(classnames))
    empty = [classnames[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise LiftError(f"{root / 'train'}: class folders without images: {', '.join(empty[:5])}")
    return LTData(sets["train"], sets["test"], classnames, counts)


def build_data(cfg: Config) -> LTData:
    """Dispatch --data to the builder of that task."""
    if cfg.data in SPLIT_LISTS:
        return build_benchmark(cfg)
    if cfg.data in CIFAR_RATIOS:
        return build_cifar100_lt(cfg)
    if cfg.data in WORLDS:
        return build_world_task(cfg)
    if os.sep in cfg.data or Path(cfg.data).is_dir():
        if not Path(cfg.data).is_dir():
            raise LiftError(f"--data {cfg.data}: no such folder")
        return build_folder(cfg)
    known = ", ".join([*SPLIT_LISTS, *CIFAR_RATIOS, *WORLDS])
    raise LiftError(f"--data: unknown dataset '{cfg.data}'; expected one of {known}, or a folder with train/ and test/")


def class_groups(train_counts) -> dict:
    """Many-shot (> 100 images), Medium-shot (20-100) and Few-shot (< 20) classes
    [paper: evaluation protocol]."""
    n = np.asarray(train_counts)
    return {"many": np.flatnonzero(n > 100), "medium": np.flatnonzero((n >= 20) & (n <= 100)),
            "few": np.flatnonzero(n < 20)}


def summarize_data(data: LTData, name: str) -> str:
    """The one-screen dataset summary printed at start."""
    n, g = data.train_counts, class_groups(data.train_counts)
    return "\n".join([
        f"dataset {name}: {len(data.classnames)} classes, {len(data.train)} train / {len(data.test)} test images",
        f"  per class: max {n.max()}, min {n.min()}, imbalance ratio {n.max() / max(n.min(), 1):.1f}",
        f"  groups: many (>100) {len(g['many'])}, medium (20-100) {len(g['medium'])}, few (<20) {len(g['few'])} classes",
    ])


# ==========================================================================================
# 3. Transforms: [paper: minimalist data augmentation] and [paper: test-time ensembling]
# ==========================================================================================
# Images stay uint8 tensors from decoding to the device: transforms crop by slicing and resize with
# torch's antialiased bicubic filter, and return [V, 3, S, S] (V views per image); the model
# normalises on its own device, so workers move 4x fewer bytes than with float tensors.

MDA_FUNCTIONS = {  # g(t): how fast the smallest crop area rises from min_scale (t=0) to 1 (g=1)
    "min": lambda t: 0.0,
    "max": lambda t: 1.0,
    "linear": lambda t: t,
    "convex": lambda t: 1.0 - math.sqrt(1.0 - t * t),
    "concave": lambda t: math.sqrt(1.0 - (1.0 - t) ** 2),
}


def mda_min_scale(epoch: int, epochs: int, schedule: str = "convex", min_scale: float = 0.08) -> float:
    """Smallest crop area fraction at `epoch` (0-based): min_scale + g(t) (1 - min_scale), t = e/(E-1).

    With a single epoch t is 0: that epoch is the first one, so it gets the first epoch's range."""
    t = epoch / (epochs - 1) if epochs > 1 else 0.0
    return min_scale + MDA_FUNCTIONS[schedule](t) * (1.0 - min_scale)


def mda_crop_box(height: int, width: int, min_scale: float, gen: torch.Generator):
    """A random square crop (top, left, side) whose area fraction is uniform in [min_scale, 1].

    Both ends are capped at the largest inscribed square, min(H, W)^2 / (H W), so the crop is
    always a square inside the image; its position is uniform."""
    area = height * width
    cap = min(height, width) ** 2 / area
    lo, hi = min(min_scale, cap), min(1.0, cap)
    target = area * (lo + (hi - lo) * torch.rand(1, generator=gen).item())
    side = min(int(round(math.sqrt(target))), height, width)
    top = int(torch.randint(0, height - side + 1, (1,), generator=gen))
    left = int(torch.randint(0, width - side + 1, (1,), generator=gen))
    return top, left, side


def resize_bicubic(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of a uint8 image [3, H, W], PIL's filter (a = -0.5) in torch:
    within one intensity level of PIL's BICUBIC and about 3x faster on a CPU core."""
    img = img[None].contiguous(memory_format=torch.channels_last)           # the layout torch's uint8 kernel is fastest on
    out = F.interpolate(img, size=(height, width), mode="bicubic", antialias=True)
    return out[0]                                                           # [3, height, width] uint8 (same values)


def resize_shorter(img: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size`, the longer one scaled as torchvision's Resize(size) does."""
    h, w = img.shape[-2:]
    if h <= w:
        return resize_bicubic(img, size, int(size * w / h))
    return resize_bicubic(img, int(size * h / w), size)


def centre_box(h: int, w: int, size: int):
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))     # torchvision's centre crop


class MDATransform:
    """Minimalist data augmentation: one square random crop resized to S (bicubic); no flip, no colour.

    The crop of image i at epoch e is drawn from a generator seeded by (seed, e, i), so a run's
    crops do not depend on worker processes and an interrupted run resumes bit-exactly."""

    def __init__(self, size: int, epochs: int, schedule: str, min_scale: float, seed: int):
        self.size, self.epochs, self.schedule, self.min_scale, self.seed = size, epochs, schedule, min_scale, seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __call__(self, img: torch.Tensor, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        s_min = mda_min_scale(self.epoch, self.epochs, self.schedule, self.min_scale)
        top, left, side = mda_crop_box(img.shape[1], img.shape[2], s_min, gen)
        crop = img[:, top:top + side, left:left + side]                     # [3, side, side]
        return resize_bicubic(crop, self.size, self.size)[None]              # [1, 3, S, S]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 100_000_007 + index


class EvalTransform:
    """Test views. TTE: shorter side to S + expand, then the four corner and the centre S crops
    (torchvision's FiveCrop order). Without TTE: shorter side to S + S // 7 (256 for 224), centre crop."""

    def __init__(self, size: int, tte: bool, expand: int):
        self.size, self.tte, self.expand = size, tte, expand

    def __call__(self, img: torch.Tensor, index: int = 0) -> torch.Tensor:
        S = self.size
        img = resize_shorter(img, S + (self.expand if self.tte else S // 7))  # [3, H', W']
        h, w = img.shape[1:]
        t, l = centre_box(h, w, S)
        boxes = [(0, 0), (0, w - S), (h - S, 0), (h - S, w - S), (t, l)] if self.tte else [(t, l)]
        return torch.stack([img[:, y:y + S, x:x + S] for y, x in boxes])     # [V, 3, S, S]


class InitTransform:
    """Features for the class-mean and linear-probing inits: shorter side to S, centre crop."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor, index: int = 0) -> torch.Tensor:
        S = self.size
        img = resize_shorter(img, S)
        t, l = centre_box(img.shape[1], img.shape[2], S)
        return img[None, :, t:t + S, l:l + S]                               # [1, 3, S, S]


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
# 4. Model: frozen CLIP ViT, AdaptFormer [paper: lightweight fine-tuning], cosine classifier
#    [paper: semantic-aware initialization]
# ==========================================================================================


def online(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Can this machine open a connection to host? (A fast check instead of minutes of retries.)"""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def open_clip_name(model: str) -> str:
    """open_clip's name for --model: 'ViT-B/16' -> 'ViT-B-16'; a JSON config file is registered first."""
    import open_clip
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise LiftError(f"--model {model}: no such model-config file")
        open_clip.add_model_config(model)
        return Path(model).stem
    name = model.replace("/", "-")
    if ":" not in name and name not in open_clip.list_models():
        vits = ", ".join(m for m in open_clip.list_models() if m.startswith("ViT-B") or m.startswith("ViT-L"))
        raise LiftError(f"--model {model}: unknown open_clip model; CLIP ViTs include {vits}")
    return name


def is_openai_release(path: str) -> bool:
    """OpenAI ships its CLIP weights as TorchScript archives (ViT-B-16.pt)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def resolve_clip(cfg: Config):
    """(open_clip name, tag or file or None, QuickGELU?, the tag's config) for --model / --pretrained.

    Fidelity: OpenAI's CLIP uses QuickGELU, x * sigmoid(1.702 x). open_clip's plain 'ViT-B-16' config
    uses exact GELU and only warns when given OpenAI's weights, which silently changes the function.
    The activation therefore follows the pretrained tag, or OpenAI's own file when one is passed."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg
    name = open_clip_name(cfg.model)
    pretrained = None if cfg.pretrained.lower() == "none" else cfg.pretrained
    tag_cfg = (get_pretrained_cfg(name, pretrained) or {}) if pretrained and ":" not in name else {}
    if pretrained and not tag_cfg:
        pretrained = str(Path(pretrained).expanduser())
        if not Path(pretrained).is_file():
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none known"
            raise LiftError(f"--pretrained {cfg.pretrained}: neither a pretrained tag of {name} ({tags}) nor a checkpoint file")
    if cfg.quick_gelu != "auto":
        quick_gelu = cfg.quick_gelu == "yes"
    elif tag_cfg:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    else:  # OpenAI's TorchScript file or a file named for OpenAI's weights; else the config's own choice
        quick_gelu = bool(pretrained and (is_openai_release(pretrained) or "openai" in pretrained.lower()))
    return name, pretrained, quick_gelu, tag_cfg


def load_clip(cfg: Config):
    """Build the CLIP model of --model with the weights of --pretrained; returns (clip, mean, std)."""
    import logging
    import open_clip
    name, pretrained, quick_gelu, tag_cfg = resolve_clip(cfg)
    import huggingface_hub.constants as hf_constants
    hub_offline = hf_constants.HF_HUB_OFFLINE
    if tag_cfg and not online("huggingface.co"):
        hf_constants.HF_HUB_OFFLINE = True  # use the local cache only: fail in seconds, not after a minute of retries
    logging.disable(logging.ERROR)  # open_clip logs the same failure we report below
    try:
        if pretrained and not tag_cfg and is_openai_release(pretrained):
            clip = load_openai_release(name, pretrained, quick_gelu)
        else:
            clip = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                          cache_dir=os.environ.get("LIFT_CLIP_CACHE"))
    except Exception as e:
        if tag_cfg:
            hub = tag_cfg.get("hf_hub", "").rstrip("/")
            raise LiftError(
                f"--pretrained {cfg.pretrained}: could not get the weights of {name} ({str(e).splitlines()[0][:200]}). "
                f"Offline, download them elsewhere (https://huggingface.co/{hub}, or {tag_cfg.get('url') or 'the tag URL'}) "
                f"and pass the file: --pretrained /path/to/file" + (" (OpenAI weights: QuickGELU is detected for "
                f"OpenAI's .pt file; for a converted state dict add --quick-gelu yes)" if tag_cfg.get("quick_gelu") else "")
            ) from None
        raise LiftError(f"--pretrained {cfg.pretrained}: cannot load it into {name}: {str(e).splitlines()[0][:300]}") from None
    finally:
        logging.disable(logging.NOTSET)
        hf_constants.HF_HUB_OFFLINE = hub_offline
    mean, std = clip_mean_std(clip.visual, tag_cfg)
    act = type(clip.visual.transformer.resblocks[0].mlp[1]).__name__ if hasattr(clip.visual, "transformer") else "?"
    print(f"model {name}, weights {pretrained or 'random'}, activation {act}")
    return clip.eval(), mean, std


def clip_mean_std(visual, tag_cfg=None) -> tuple:
    """CLIP's input normalisation: the pretrained tag's mean / std, else the model config's, else OpenAI's."""
    pcfg = {**getattr(visual, "preprocess_cfg", {}), **{k: v for k, v in (tag_cfg or {}).items() if k in ("mean", "std")}}
    return tuple(pcfg.get("mean", (0.48145466, 0.4578275, 0.40821073))), tuple(pcfg.get("std", (0.26862954, 0.26130258, 0.27577711)))


def load_openai_release(name: str, path: str, quick_gelu: bool):
    """OpenAI's own weight file (e.g. ViT-B-16.pt) is a TorchScript archive, which torch.load refuses
    with weights_only=True; read it with torch.jit.load, as OpenAI's loader does, and copy its tensors
    (the same names as open_clip's CLIP) into the open_clip model: every one of the model's is required."""
    import open_clip
    archive = torch.jit.load(path, map_location="cpu").state_dict()       # also holds metadata scalars
    clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    clip.load_state_dict({k: archive[k] for k in clip.state_dict() if k in archive}, strict=True)  # none missing
    return clip


def check_vit(visual, cfg: Config):
    """LIFT+ plugs into the blocks of a CLIP ViT with a class token; refuse anything else clearly."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    kind = type(visual).__name__
    if not isinstance(visual, VisionTransformer):
        raise LiftError(f"--model {cfg.model}: --tuning {cfg.tuning} needs a CLIP ViT image tower (e.g. ViT-B-16); "
                        f"this model's is {kind}")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" or \
            not isinstance(visual.patch_dropout, nn.Identity) or \
            not all(type(b) is ResidualAttentionBlock for b in visual.transformer.resblocks):
        raise LiftError(f"--model {cfg.model}: only CLIP ViTs with class-token pooling and standard blocks are supported")


class Adapter(nn.Module):
    """Bottleneck adapter: Up(ReLU(Down(LN_a(x)))), Up zero-initialised so it starts as a no-op.

    As the 'Adapter' baseline it is added sequentially to the MLP output: m <- m + Adapter(m)."""

    def __init__(self, dim: int, r: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)         # LN_a, the adapter's own LayerNorm
        self.down = nn.Linear(dim, r)       # D -> r, kaiming-uniform weight (nn.Linear's default)
        self.up = nn.Linear(r, dim)         # r -> D
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)      # zero: training starts exactly at CLIP
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.relu(self.down(self.ln(x))))


class AdaptFormer(Adapter):
    """AdaptFormer, LIFT+'s lightweight module [paper: lightweight fine-tuning]: parallel to the
    MLP, reading the residual stream after attention, with a learnable scale s (init 1):

        h = x + Attn(LN1(x));   out = h + MLP(LN2(h)) + s * Up(ReLU(Down(LN_a(h))))"""

    def __init__(self, dim: int, r: int):
        super().__init__(dim, r)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, h):
        return self.scale * super().forward(h)


class LoRA(nn.Module):
    """LoRA baseline: a low-rank update x @ A @ B / r added to the query or value projection; B = 0."""

    def __init__(self, dim: int, r: int):
        super().__init__()
        self.down = nn.Parameter(torch.empty(dim, r))
        self.up = nn.Parameter(torch.zeros(r, dim))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as the LIFT+ code: torch's fan-in of [D, r] is r
        self.scale = 1.0 / r

    def forward(self, x):
        return (x @ self.down) @ self.up * self.scale


class QuickGELUFunction(torch.autograd.Function):
    """QuickGELU, x * sigmoid(1.702 x), keeping only x for the backward pass.

    Autograd would keep both x and sigmoid(1.702 x), two [B, N, 4D] tensors per block; recomputing
    the sigmoid in the backward pass halves that memory for the same values."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1.0 - s))


class LiftViT(nn.Module):
    """CLIP's image tower run block by block, so that each tuning method plugs in where the paper
    puts it. Returns the CLS feature after the final LayerNorm, BEFORE the image projection."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.adaptformer = nn.ModuleDict()    # block index -> AdaptFormer   (LIFT+)
        self.adapter = nn.ModuleDict()        # block index -> Adapter       (baseline)
        self.lora_q = nn.ModuleDict()         # block index -> LoRA on q     (baseline)
        self.lora_v = nn.ModuleDict()         # block index -> LoRA on v     (baseline)
        self.prompts = nn.ParameterDict()     # block index -> [P, D] deep prompts (VPT baseline)
        self.num_tokens = visual.positional_embedding.shape[0]  # N = patches + 1

    @property
    def blocks(self):
        return self.visual.transformer.resblocks

    @property
    def width(self) -> int:
        return self.visual.class_embedding.shape[0]

    def forward(self, x):                                                   # x: [B, 3, S, S], normalised
        v = self.visual
        x = v.conv1(x)                                                      # [B, D, S/p, S/p]
        x = x.flatten(2).transpose(1, 2)                                    # [B, N-1, D]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)       # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [B, N, D]
        x = v.ln_pre(x)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x = self.block(str(i), blk, x, cls_only=i == last)
        return v.ln_post(x[:, 0])                                           # [B, D]

    def block(self, i: str, blk, x, cls_only: bool = False):
        """One transformer block with the tuning modules. cls_only (the last block): only the class
        token's output is used downstream, so only its query, MLP and adapters are computed; keys
        and values still come from every token. Same values, about 1/13 fewer FLOPs for ViT-B/16."""
        if i in self.prompts:  # VPT-deep: this block's prompts replace the previous block's
            old = x.shape[1] - self.num_tokens
            p = self.prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)       # [B, P, D]
            x = torch.cat([x[:, :1], p, x[:, 1 + old:]], dim=1)              # [B, 1 + P + N-1, D]
        y = blk.ln_1(x)
        x = x[:, :1] if cls_only else x                                     # the residual stream we keep
        h = x + blk.ls_1(self.attention(i, blk.attn, y, cls_only))         # h = x + Attn(LN1(x))
        m = blk.ls_2(self.mlp(blk.mlp, blk.ln_2(h)))                        # MLP(LN2(h))
        if i in self.adapter:
            m = m + self.adapter[i](m)
        if i in self.adaptformer:
            m = m + self.adaptformer[i](h)                                  # s * Up(ReLU(Down(LN_a(h))))
        return h + m

    @staticmethod
    def mlp(mlp: nn.Sequential, y):
        if type(mlp.gelu).__name__ == "QuickGELU":                          # OpenAI CLIP's activation
            return mlp.c_proj(QuickGELUFunction.apply(mlp.c_fc(y)))
        return mlp(y)

    def attention(self, i: str, attn: nn.MultiheadAttention, y, cls_only: bool = False):
        B, N, D = y.shape
        H = attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias                      # [3D, D], [3D]
        yq = y[:, :1] if cls_only else y                                    # queries: [B, Nq, D]
        q = F.linear(yq, w[:D], b[:D])                                      # [B, Nq, D]
        k, v = F.linear(y, w[D:], b[D:]).chunk(2, dim=-1)                   # 2 x [B, N, D]
        if i in self.lora_q:
            q = q + self.lora_q[i](yq)
            v = v + self.lora_v[i](y)
        Nq = q.shape[1]
        q = q.reshape(B, Nq, H, D // H).transpose(1, 2)                     # [B, H, Nq, D/H]
        k, v = (t.reshape(B, N, H, D // H).transpose(1, 2) for t in (k, v))  # [B, H, N, D/H]
        o = F.scaled_dot_product_attention(q, k, v)                         # [B, H, Nq, D/H]
        return attn.out_proj(o.transpose(1, 2).reshape(B, Nq, D))           # [B, Nq, D]


class CosineClassifier(nn.Module):
    """logit_j = s * <f / |f|, w_j / |w_j|>, no bias [paper: semantic-aware initialization; s = 25]."""

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.clone().float())  # [K, D]
        self.scale = scale

    def forward(self, f):                                                   # f: [B, D]
        return self.scale * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).t()  # [B, K]


class LiftModel(nn.Module):
    """uint8 images -> normalise -> LiftViT feature -> (projection, zero-shot only) -> cosine classifier."""

    def __init__(self, visual, mean, std, num_classes: int, scale: float, zeroshot: bool = False):
        super().__init__()
        self.encoder = LiftViT(visual)
        dim = visual.output_dim if zeroshot else self.encoder.width
        self.head = CosineClassifier(torch.zeros(num_classes, dim), scale)
        self.zeroshot = zeroshot  # zero-shot CLIP compares projected image features with text features
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def features(self, images):                                            # images: [B, 3, S, S] uint8
        x = (images.float() - self.mean) / self.std                         # CLIP's normalisation, on device
        f = self.encoder(x)                                                 # [B, D]
        return f @ self.encoder.visual.proj if self.zeroshot else f

    def forward(self, images):
        return self.head(self.features(images))                            # [B, K]


@torch.no_grad()
def text_features(clip, tokenizer, classnames, template: str, device) -> torch.Tensor:
    """normalize(text_projection(text_encoder("a photo of a {name}."))) for every class: [K, E]."""
    prompts = [template.format(c.replace("_", " ")) for c in classnames]
    out = [clip.encode_text(tokenizer(prompts[i:i + 1000]).to(device), normalize=True).float()
           for i in range(0, len(prompts), 1000)]
    return torch.cat(out)


def semantic_init(text_feats: torch.Tensor, image_proj: torch.Tensor) -> torch.Tensor:
    """[paper: semantic-aware initialization] Map text features back through the image projection,
    w_j = normalize(t_j @ P^T), so that <f, w_j> is proportional to CLIP's image-text score <f P, t_j>."""
    return F.normalize(text_feats @ image_proj.t().float(), dim=-1)        # [K, E] @ [E, D] -> [K, D]


def class_mean_init(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Classifier init baseline: the normalised mean feature of each class."""
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64).index_add_(0, labels, feats.double())
    return F.normalize(sums, dim=-1).float()


def logistic_regression(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, iters: int = 100) -> tuple:
    """L2-regularised (C = 1), class-balanced multinomial logistic regression fitted with L-BFGS,
    the objective of scikit-learn's LogisticRegression(class_weight='balanced'): returns (W, b)."""
    x, y = feats.double(), labels
    counts = torch.bincount(y, minlength=num_classes).clamp(min=1).double()
    sample_w = (len(y) / (num_classes * counts))[y]                        # 'balanced' class weights
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
    """Classifier init baseline: the normalised weight rows of a linear probe (the bias is dropped)."""
    W, _ = logistic_regression(feats, labels, num_classes)
    return F.normalize(W, dim=-1).float()


# ==========================================================================================
# 5. Tuning methods: what trains (LIFT+, and [paper: the fine-tuning methods it is compared with])
# ==========================================================================================


def size_rule(num_classes: int, num_blocks: int, divisor: int) -> int:
    """The paper's size rule 2 ** max(0, floor(log2(K / (divisor * L)))): divisor 2 gives the
    AdaptFormer / Adapter bottleneck r (32 for ImageNet-LT), 4 the LoRA rank, 1 the VPT length."""
    return 2 ** max(0, math.floor(math.log2(num_classes / (divisor * num_blocks))))


def block_indices(cfg: Config, num_blocks: int) -> list:
    """Vision blocks the method acts on: --blocks ('0-11', '8,9,10,11'), partial: the last k, else all."""
    if cfg.tuning == "partial":
        if not 0 <= cfg.partial_blocks <= num_blocks:
            raise LiftError(f"--partial-blocks: expected 0..{num_blocks}, got {cfg.partial_blocks}")
        return list(range(num_blocks - cfg.partial_blocks, num_blocks))
    if cfg.blocks is None:
        return list(range(num_blocks))
    chosen = set()
    for part in cfg.blocks.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or int(m.group(2) or m.group(1)) >= num_blocks or int(m.group(2) or m.group(1)) < int(m.group(1)):
            raise LiftError(f"--blocks {cfg.blocks}: expected indices in 0..{num_blocks - 1} like '0-{num_blocks - 1}' or '8,9,10'")
        chosen.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(chosen)


class MaskedUpdate(nn.Module):
    """Random-mask ('arbitrary') fine-tuning: a parametrization that lets exactly round(ratio * n)
    seeded-random entries of a frozen tensor train; every other entry stays bit-identical."""

    def __init__(self, tensor: torch.Tensor, ratio: float, gen: torch.Generator):
        super().__init__()
        n = tensor.numel()
        self.register_buffer("index", torch.randperm(n, generator=gen)[:round(ratio * n)])
        self.values = nn.Parameter(tensor.detach().flatten()[self.index].clone())

    def forward(self, frozen):
        return frozen.flatten().index_put((self.index,), self.values).view_as(frozen)


def configure_tuning(model: LiftModel, cfg: Config, num_classes: int) -> dict:
    """Freeze CLIP, then attach or unfreeze what --tuning trains. Returns the method's sizes."""
    from torch.nn.utils import parametrize
    enc = model.encoder
    model.requires_grad_(False)
    blocks = block_indices(cfg, len(enc.blocks))
    L, D, K, t = len(blocks), enc.width, num_classes, cfg.tuning
    info = {"tuning": t, "blocks": blocks}
    if t in ("adaptformer", "adapter"):
        r = info["r"] = cfg.adapter_dim or size_rule(K, L, 2)
        for i in blocks:
            (enc.adaptformer if t == "adaptformer" else enc.adapter)[str(i)] = (AdaptFormer if t == "adaptformer" else Adapter)(D, r)
    elif t == "lora":
        r = info["rank"] = cfg.lora_rank or size_rule(K, L, 4)
        for i in blocks:
            enc.lora_q[str(i)], enc.lora_v[str(i)] = LoRA(D, r), LoRA(D, r)
    elif t == "vpt":
        P = info["prompt_len"] = cfg.vpt_len or size_rule(K, L, 1)
        for i in blocks:
            enc.prompts[str(i)] = nn.Parameter(torch.randn(P, D) * 0.02)
    elif t in ("full", "partial"):
        for i in blocks:
            enc.blocks[i].requires_grad_(True)
    elif t == "bitfit":
        for i in blocks:
            for name, p in enc.blocks[i].named_parameters():
                p.requires_grad_(name.endswith("bias"))
    elif t == "mask":
        gen = torch.Generator().manual_seed(cfg.seed)
        for i in blocks:
            blk = enc.blocks[i]
            for module, name in [(blk.attn, "in_proj_weight"), (blk.attn, "in_proj_bias"),
                                 (blk.attn.out_proj, "weight"), (blk.attn.out_proj, "bias"),
                                 (blk.mlp.c_fc, "weight"), (blk.mlp.c_fc, "bias"),
                                 (blk.mlp.c_proj, "weight"), (blk.mlp.c_proj, "bias")]:
                if round(cfg.mask_ratio * getattr(module, name).numel()) > 0:  # a tiny bias may get no entry
                    parametrize.register_parametrization(module, name, MaskedUpdate(getattr(module, name), cfg.mask_ratio, gen))
    if t != "zeroshot":
        model.head.weight.requires_grad_(True)
    return info


def tuned_state(model: nn.Module) -> dict:
    """What a checkpoint holds: the tuned parameters (and random-mask indices), never frozen CLIP."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.cpu().clone() for n, b in model.named_buffers() if n.endswith(".index")})
    return state


def count_params(model: LiftModel) -> dict:
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = model.head.weight.numel() if model.head.weight.requires_grad else 0
    visual = sum(p.numel() for n, p in model.encoder.visual.named_parameters() if "parametrizations" not in n or n.endswith("original"))
    return {"method": tuned - head, "classifier": head, "tuned": tuned, "image_encoder": visual}


# ==========================================================================================
# 6. Loss: logit-adjusted cross-entropy [paper: Proposition 3.1 and its remark; Menon et al., 2021]
# ==========================================================================================


def logit_adjusted_loss(logits, labels, log_prior, tau: float = 1.0, reduction: str = "mean"):
    """CE(z + tau * log pi, y) with pi_j = n_j / N from the training counts. Training only: the
    test uses the raw logits. Bayes-consistent for a balanced test set when the class conditionals
    of train and test agree (zeta = 1), which lightweight tuning preserves (Proposition 3.1)."""
    return F.cross_entropy(logits.float() + tau * log_prior, labels, reduction=reduction)


# ==========================================================================================
# 7. Training: SGD + cosine schedule, mixed precision, atomic checkpoints, exact resume
# ==========================================================================================


def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise LiftError(f"--device {cfg.device}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LiftError(f"--device {cfg.device}: no CUDA GPU is available on this machine")
    return device


def amp_dtype(cfg: Config, device: torch.device):
    """bf16 autocast where the GPU supports it, else fp16 (with a gradient scaler); fp32 on CPU.
    Autocast runs LayerNorm in fp32, as LIFT+ keeps its LayerNorms."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


def autocast(device: torch.device, dtype):
    """Mixed precision where amp_dtype chose a dtype; a no-op context otherwise (CPU, --amp off)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def make_loader(dataset, batch_size: int, cfg: Config, device, generator=None):
    sampler = torch.utils.data.RandomSampler(dataset, generator=generator) if generator is not None else None
    workers = 0 if isinstance(dataset, torch.utils.data.TensorDataset) else cfg.workers  # tensors need no workers
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", drop_last=False)


@torch.no_grad()
def extract_features(model: LiftModel, dataset, cfg: Config, device) -> tuple:
    """Frozen features of a dataset (one view per image): ([N, D] float32, [N] labels)."""
    model.eval()
    dtype = amp_dtype(cfg, device)
    feats, labels = [], []
    for views, y in make_loader(dataset, cfg.eval_batch_size, cfg, device):
        with autocast(device, dtype):
            feats.append(model.features(views[:, 0].to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def init_classifier(model: LiftModel, clip, tokenizer, data: LTData, cfg: Config, device, size: int):
    """Classifier init [paper: semantic-aware initialization, and its ablation]: text prompts
    (semantic, and zero-shot), class means, a linear probe, or random unit vectors ('none')."""
    K = len(data.classnames)
    if cfg.tuning == "zeroshot" or cfg.init == "semantic":
        t = text_features(clip, tokenizer, data.classnames, cfg.prompt, device)     # [K, E]
        w = t if cfg.tuning == "zeroshot" else semantic_init(t, clip.visual.proj)
    elif cfg.init == "none":
        w = F.normalize(torch.rand(K, model.encoder.width) * 2 - 1, dim=-1)
    else:  # class_mean / linear_probe: features of at most 100 random training images per class
        rng = np.random.RandomState(cfg.seed)
        labels = np.asarray(data.train.labels)
        idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:100] for c in range(K)])
        feats, ys = extract_features(model, Views(data.train, InitTransform(size), idx), cfg, device)
        w = (class_mean_init if cfg.init == "class_mean" else linear_probe_init)(feats, ys, K)
    with torch.no_grad():
        model.head.weight.copy_(w.to(model.head.weight.device))


def build_model(cfg: Config, data: LTData, device) -> tuple:
    """CLIP -> LiftModel with the tuning method attached and the classifier initialised."""
    import open_clip
    prepare_world_model(cfg)  # an offline world (section 9) brings its own tiny pretrained CLIP
    torch.manual_seed(cfg.seed)
    clip, mean, std = load_clip(cfg)
    check_vit(clip.visual, cfg)
    clip.to(device)
    model = LiftModel(clip.visual, mean, std, len(data.classnames), cfg.logit_scale, zeroshot=cfg.tuning == "zeroshot")
    info = configure_tuning(model, cfg, len(data.classnames))
    model.to(device)
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, (tuple, list)) else clip.visual.image_size
    tokenizer = open_clip.get_tokenizer(open_clip_name(cfg.model))
    init_classifier(model, clip, tokenizer, data, cfg, device, size)
    info["image_size"] = int(size)
    return model, info  # the text tower goes out of scope here: it is needed only for the init


def atomic_write_bytes(path: Path, payload: bytes):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict):
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def checkpoint_identity(cfg: Config, data: LTData, info: dict) -> dict:
    """What a checkpoint must agree on with the run that loads it."""
    return {"model": cfg.model, "tuning": cfg.tuning, "num_classes": len(data.classnames),
            "classes": hashlib.sha1("\n".join(data.classnames).encode()).hexdigest(),
            "method": {k: v for k, v in info.items() if k not in ("image_size",)}}


def load_checkpoint(path, identity: dict) -> dict:
    """torch.load with weights_only=True, refusing a checkpoint written for another model or task."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LiftError(f"--checkpoint {path}: no such file") from None
    except Exception as e:
        raise LiftError(f"checkpoint {path}: cannot be read ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "identity" not in state or "tuned" not in state:
        raise LiftError(f"checkpoint {path}: not a lift_plus checkpoint")
    theirs = state["identity"]
    wrong = [k for k in identity if theirs.get(k) != identity[k]]
    if wrong:
        detail = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, this run {identity[k]!r}" for k in wrong
                           if k != "classes") + ("; the class names differ" if "classes" in wrong else "")
        raise LiftError(f"checkpoint {path} does not match this run ({detail})")
    return state


def load_tuned(model: nn.Module, tuned: dict, path):
    own = tuned_state(model)
    if set(own) != set(tuned) or any(own[k].shape != tuned[k].shape for k in own):
        raise LiftError(f"checkpoint {path}: its tuned parameters do not match this model's")
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for k, v in tuned.items():
            (params.get(k) if k in params else buffers[k]).copy_(v)


def train(cfg: Config, data: LTData, model: LiftModel, info: dict, device, run_dir: Path, features=None) -> list:
    """The LIFT+ training loop [paper: the LIFT+ framework]: SGD with momentum and weight decay on
    the tuned parameters, cosine annealing stepped once per epoch, logit-adjusted loss, MDA crops;
    a checkpoint per epoch.

    features: (feats [N, D], labels [N]) precomputed by the frozen backbone (--cache-features); then
    only the classifier runs, on the same optimiser, schedule and data order."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    identity = checkpoint_identity(cfg, data, info)
    ckpt_path = run_dir / "checkpoint.pt"
    start_epoch, losses = 0, []
    if ckpt_path.exists():
        if not cfg.resume:
            raise LiftError(f"{ckpt_path} exists: pass --resume to continue that run, or --run-name NAME for a new one")
        state = load_checkpoint(ckpt_path, identity)
        load_tuned(model, state["tuned"], ckpt_path)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch, losses = state["epoch"], list(state["train_loss"])
        print(f"resuming {ckpt_path} after epoch {start_epoch}/{cfg.epochs}")

    counts = torch.as_tensor(data.train_counts, dtype=torch.float32)
    log_prior = torch.log(counts / counts.sum()).to(device)                # log pi: [K]
    tau = cfg.tau if cfg.loss == "la" else 0.0                             # CE is LA with tau = 0
    if features is None:
        transform = MDATransform(info["image_size"], cfg.epochs, cfg.mda, cfg.min_scale, cfg.seed)
        train_set, forward = Views(data.train, transform), model
    else:
        transform = None
        train_set = torch.utils.data.TensorDataset(features[0][:, None], features[1])  # items ([1, D], label)
        forward = model.head
    micro = cfg.batch_size // cfg.accum_steps
    N = len(train_set)
    steps = math.ceil(N / cfg.batch_size)
    t0, done = time.time(), 0
    for epoch in range(start_epoch, cfg.epochs):
        if transform is not None:
            transform.set_epoch(epoch)
        loader = make_loader(train_set, micro, cfg, device, torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        model.train()
        total, seen = torch.zeros((), device=device), 0                     # summed loss stays on the device: no sync per step
        opt.zero_grad(set_to_none=True)
        for j, (views, y) in enumerate(loader):
            step = j // cfg.accum_steps
            n_step = min(cfg.batch_size, N - step * cfg.batch_size)        # images in this optimiser step
            x, y = views[:, 0].to(device, non_blocking=True), y.to(device, non_blocking=True)  # [b, 3, S, S] (or [b, D])
            with autocast(device, dtype):
                logits = forward(x)                                        # [b, K]
            loss = logit_adjusted_loss(logits, y, log_prior, tau, reduction="sum") / n_step
            (scaler.scale(loss) if scaler else loss).backward()
            total += loss.detach() * n_step
            seen += len(y)
            if (j + 1) % cfg.accum_steps == 0 or seen == N:
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                done += 1
                if (step + 1) % cfg.log_every == 0 or seen == N:
                    rate = done / (time.time() - t0)
                    eta = ((cfg.epochs - epoch) * steps - step - 1) / max(rate, 1e-9)
                    print(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps} loss {total.item() / seen:.4f} "
                          f"lr {opt.param_groups[0]['lr']:.5f} {rate * cfg.batch_size:.1f} img/s "
                          f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
        sched.step()
        losses.append(total.item() / seen)
        save_checkpoint(ckpt_path, {
            "identity": identity, "config": dataclasses.asdict(cfg), "epoch": epoch + 1, "train_loss": losses,
            "tuned": tuned_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "rng": torch.get_rng_state()})
    return losses


# ==========================================================================================
# 8. Evaluation: TTE, Overall / Many / Medium / Few accuracy [paper: evaluation protocol], results.json
# ==========================================================================================


def tte_logits(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """Mean of the logits of V views per image: [B, V, 3, S, S] -> [B, K] (V = 5 with TTE).

    The B * V views run as V forward passes of B images: the same values as one pass of B * V,
    with a working set V times smaller (measured faster on CPUs)."""
    B, V = views.shape[:2]
    flat = views.flatten(0, 1)                                              # [B V, 3, S, S]
    logits = torch.cat([model(chunk) for chunk in flat.split(B)]).float()   # [B V, K]
    return logits.view(B, V, -1).mean(dim=1)


@torch.no_grad()
def predict(model: LiftModel, dataset, cfg: Config, device) -> tuple:
    """Logits [N, K] and labels [N] of a test set seen through EvalTransform views."""
    model.eval()
    dtype = amp_dtype(cfg, device)
    out, labels = [], []
    for views, y in make_loader(dataset, cfg.eval_batch_size, cfg, device):
        with autocast(device, dtype):
            out.append(tte_logits(model, views.to(device, non_blocking=True)).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(out), torch.cat(labels)


def accuracy_report(preds, labels, train_counts) -> dict:
    """Top-1 accuracy overall and the mean per-class accuracy of the Many / Medium / Few groups (%)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    K = len(train_counts)
    correct = np.bincount(labels, weights=(preds == labels), minlength=K)
    total = np.bincount(labels, minlength=K)
    per_class = np.where(total > 0, 100.0 * correct / np.maximum(total, 1), np.nan)
    report = {"overall": 100.0 * float((preds == labels).mean())}
    for group, idx in class_groups(train_counts).items():
        idx = idx[total[idx] > 0]
        report[group] = float(np.mean(per_class[idx])) if len(idx) else float("nan")
    report["per_class"] = per_class.tolist()
    return report


def format_report(report: dict) -> str:
    cells = [f"{report[k]:7.2f}" for k in ("overall", "many", "medium", "few")]
    return "          Overall    Many  Medium     Few\naccuracy  " + " ".join(cells)


def write_results(path: Path, cfg: Config, report: dict, data: LTData, params: dict, losses: list):
    results = {"config": dataclasses.asdict(cfg),
               "metrics": {k: report[k] for k in ("overall", "many", "medium", "few")},
               "params": params, "train_loss": losses, "classnames": list(data.classnames),
               "train_counts": [int(n) for n in data.train_counts], "per_class_accuracy": report["per_class"]}
    atomic_write_bytes(path, json.dumps(results, indent=1, allow_nan=True).encode())


def results_table(folder) -> str:
    """Collect the results.json files under `folder` (one per run) into a Markdown table."""
    rows = ["| run | data | tuning | init | loss | mda | tte | epochs | tuned params | Overall | Many | Medium | Few |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(Path(folder).glob("**/results*.json")):
        r = json.loads(path.read_text())
        c, m = r["config"], r["metrics"]
        rows.append(f"| {path.parent.name}{path.stem[7:]} | {c['data']} | {c['tuning']} | {c['init']} | {c['loss']} | {c['mda']} | "
                    f"{c['tte']} | {c['epochs']} | {r['params']['tuned']:,} | " +
                    " | ".join(f"{m[k]:.2f}" for k in ("overall", "many", "medium", "few")) + " |")
    return "\n".join(rows)


# ==========================================================================================
# 9. The offline world: a named toy image domain, a tiny CLIP pretrained on it, a long-tailed task
# ==========================================================================================
# Without internet or a GPU there is no CLIP to fine-tune, so we make a small world in which the
# whole story can be replayed on a laptop CPU in minutes:
#   * images: coloured, textured shapes ("a photo of a red striped circle.") drawn from a seed;
#   * pretraining: a tiny open_clip CLIP trained contrastively on a BALANCED, clean version of the
#     world with captions (cached, so it runs once);
#   * the downstream task: a long-tailed subset of the concepts (300 down to 3 training images per
#     class) seen through a slightly different camera (more clutter and noise, a mild colour cast).
# The shift is kept mild on purpose: relative to its task the tiny CLIP should be a STRONG foundation
# model, as CLIP is for ImageNet-LT, because that is the regime Proposition 3.1 is about. Its tail
# classes are told apart from the head by shape, which pretraining taught and which the head data
# never needs (world_task_classes), so heavy fine-tuning on head-dominated data can lose it.

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
    blur: int = 0            # passes of a [1, 2, 1] / 4 blur at the output resolution


@dataclass(frozen=True)
class WorldSpec:
    """Everything that defines an offline world: its images, its long-tailed task, its CLIP."""
    seed: int = 0                      # world seed: class choice, images, pretraining (not --seed)
    image_size: int = 32
    num_classes: int = 30              # downstream classes, a subset of the 8 x 8 x 4 concepts
    max_count: int = 300               # head class training images
    imbalance: float = 100.0           # max_count / min_count (300 -> 3), exponential profile as in CIFAR-100-LT
    test_per_class: int = 40           # balanced test set
    rare_shapes: int = 4               # shapes seen only in few-shot classes (0: classes drawn at random)
    # the task's camera: the pretraining style with more clutter and noise and a mild, fixed colour cast;
    # no blur, so textures stay visible and zero-shot is already good (a strong foundation model)
    pretrain_style: WorldStyle = WorldStyle(radius=(0.45, 0.80), offset=0.3, rotation=20, colour_jitter=0.08,
                                            cast=0.05, clutter=1, noise=0.03)
    task_style: WorldStyle = WorldStyle(radius=(0.45, 0.80), offset=0.3, rotation=20, colour_jitter=0.08,
                                        cast=0.08, clutter=2, noise=0.05, camera=(0.95, 1.0, 0.9), contrast=0.9)
    pretrain_images: int = 16384       # balanced: 64 per concept
    pretrain_epochs: int = 4
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    model: tuple = (("embed_dim", 128), ("quick_gelu", False),
                    ("vision_cfg", (("image_size", 32), ("layers", 4), ("width", 128), ("head_width", 32), ("patch_size", 8))),
                    ("text_cfg", (("context_length", 16), ("vocab_size", 49408), ("width", 128), ("heads", 4), ("layers", 3))))


WORLDS = {"shapes_lt": WorldSpec()}


def world_concepts() -> list:
    """All (colour, texture, shape) concepts of the world, in a fixed order."""
    return [(c, t, s) for s in SHAPES for c in COLOURS for t in TEXTURES]


def concept_name(concept) -> str:
    colour, texture, shape = concept
    return f"{colour} {texture} {shape}"


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
        for _ in range(style.blur):
            img = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
            img = (img[:-2] + 2 * img[1:-1] + img[2:]) / 4                    # [size, size + 2, 3]
            img = (img[:, :-2] + 2 * img[:, 1:-1] + img[:, 2:]) / 4            # [size, size, 3]
        img = (0.5 + style.contrast * (img - 0.5)) * np.asarray(style.camera)
        img = img + style.noise * rng.randn(size, size, 3)
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def world_task_classes(spec: WorldSpec) -> list:
    """The downstream classes, head first (index 0 has the most training images).

    Head and medium classes have common shapes and each its own (colour, texture) "look", so they can
    be told apart by colour and texture alone. Few-shot classes (fewer than 20 images) have the rare
    shapes (the last spec.rare_shapes) and borrow the looks of the largest classes: "red dotted star"
    differs from the head class "red dotted circle" only in its shape. As with a rare bird that
    resembles a common one, only a model that kept what pretraining taught about shape can tell the
    tail from the head. The world's CLIP has seen every concept."""
    counts = world_counts(spec)
    n_few = sum(n < 20 for n in counts)
    rng = np.random.RandomState(spec.seed)
    concepts = [world_concepts()[i] for i in rng.permutation(len(world_concepts()))]
    if not spec.rare_shapes:
        return concepts[:spec.num_classes]
    rare = SHAPES[len(SHAPES) - spec.rare_shapes:]
    common, looks = [], set()
    for colour, texture, shape in concepts:           # one class per (colour, texture) look
        if shape not in rare and (colour, texture) not in looks and len(common) < spec.num_classes - n_few:
            common.append((colour, texture, shape))
            looks.add((colour, texture))
    few = [(colour, texture, s) for colour, texture, _ in common for s in rare][:n_few]  # head looks, rare shapes
    return common + few


def world_counts(spec: WorldSpec) -> list:
    """Training images per class: max_count * (1 / imbalance) ** (i / (K - 1)), as CIFAR-100-LT."""
    K = spec.num_classes
    return [int(spec.max_count * (1 / spec.imbalance) ** (i / (K - 1))) for i in range(K)]


_WORLD_TASKS = {}  # WorldSpec -> LTData: the images are drawn once per process and world


def build_world_task(cfg: Config) -> LTData:
    """The long-tailed downstream task of the world --data names: exponential training counts,
    a balanced test set, both in the task style (train and test images drawn with different seeds)."""
    spec = WORLDS[cfg.data]
    if spec not in _WORLD_TASKS:
        classes, counts = world_task_classes(spec), world_counts(spec)
        y_train = np.repeat(np.arange(len(classes)), counts)                 # [N_train]
        y_test = np.repeat(np.arange(len(classes)), spec.test_per_class)     # [N_test]
        train = render_images([classes[y] for y in y_train], spec.task_style, spec.seed + 1, spec.image_size)
        test = render_images([classes[y] for y in y_test], spec.task_style, spec.seed + 2, spec.image_size)
        _WORLD_TASKS[spec] = LTData(ArrayDataset(train, y_train), ArrayDataset(test, y_test),
                                   [concept_name(c) for c in classes], np.asarray(counts))
    return _WORLD_TASKS[spec]


def as_dict(pairs):
    """The model config of a WorldSpec (nested tuples, so the spec is hashable) as a JSON-ready dict."""
    return {k: as_dict(v) if isinstance(v, tuple) and v and isinstance(v[0], tuple) else v for k, v in pairs}


def world_key(spec: WorldSpec) -> str:
    """Cache key of the pretrained model: a hash of what changes it (the pretraining fields of the
    spec, the drawing and training code, open_clip's version); the downstream task fields are not in it."""
    import inspect
    import open_clip
    code = "".join(inspect.getsource(f) for f in (shape_mask, texture_mask, render_images, pretrain_world_clip))
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k.startswith("pretrain") or k in ("seed", "image_size", "model")}
    text = repr((fields, SHAPES, COLOURS, TEXTURES, CAPTIONS, code, open_clip.__version__))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def clip_contrastive_loss(img, txt, logit_scale):
    """CLIP's symmetric InfoNCE: image i should match caption i among the batch, and vice versa."""
    logits = logit_scale.exp() * img @ txt.t()                              # [B, B]
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def pretrain_world_clip(spec: WorldSpec, name: str, seed: int):
    """Train the tiny CLIP from scratch on the balanced, clean (pretraining-style) world with captions.

    Every batch holds distinct concepts, so no caption is a false negative of another image in it.
    AdamW with a linear warm-up and cosine decay, as in CLIP; returns the trained open_clip model."""
    import logging
    import open_clip
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: that is the point
    try:
        clip = open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer(name)
    concepts = world_concepts()
    C, per = len(concepts), spec.pretrain_images // len(concepts)
    rng = np.random.RandomState(seed)
    order = np.stack([rng.permutation(C) for _ in range(per)])               # [per, C] concept ids
    images = torch.from_numpy(render_images([concepts[c] for c in order.ravel()], spec.pretrain_style,
                                            seed + 3, spec.image_size)).permute(0, 3, 1, 2)  # [N, 3, S, S]
    captions = [CAPTIONS[rng.randint(len(CAPTIONS))].format(concept_name(concepts[c])) for c in order.ravel()]
    tokens = tokenizer(captions)                                             # [N, context]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in clip_mean_std(clip.visual))  # for uint8 images
    B = spec.pretrain_batch
    rows = np.arange(len(images)).reshape(per, C)                           # image index of (round, concept slot)
    steps = spec.pretrain_epochs * (len(images) // B)
    opt = torch.optim.AdamW(clip.parameters(), lr=spec.pretrain_lr, weight_decay=0.1)
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


def prepare_world_model(cfg: Config) -> None:
    """For a world --data with the default model flags, point --model and --pretrained at the world's
    tiny CLIP, pretraining and caching it first if needed (cache/world/<key>/)."""
    if cfg.data not in WORLDS or (cfg.model, cfg.pretrained) != ("ViT-B-16", "openai"):
        return
    spec = WORLDS[cfg.data]
    key = world_key(spec)
    folder = Path(cfg.cache).expanduser() / "world" / key
    config_path = folder / f"world-{key}.json"                              # the file stem is open_clip's model name
    ckpt_path = folder / "clip.pt"
    if not config_path.is_file():
        atomic_write_bytes(config_path, json.dumps(as_dict(spec.model), indent=1).encode())
    if not ckpt_path.is_file():
        t0 = time.time()
        clip = pretrain_world_clip(spec, open_clip_name(str(config_path)), spec.seed)
        save_checkpoint(ckpt_path, clip.state_dict())
        print(f"pretrained the world's CLIP in {time.time() - t0:.0f} s: {ckpt_path}")
    cfg.model, cfg.pretrained = str(config_path), str(ckpt_path)


# ==========================================================================================
# 10. Main
# ==========================================================================================


def run(cfg: Config) -> dict:
    """Build data and model, train (unless --eval-only or zeroshot), evaluate, write results.json."""
    device = pick_device(cfg)
    data = build_data(cfg)
    print(summarize_data(data, cfg.data))
    model, info = build_model(cfg, data, device)
    if cfg.expand is None:  # the paper's 24 pixels at 224, scaled to this model's image size
        cfg.expand = round(24 * info["image_size"] / 224)
    params = count_params(model)
    share = lambda n: f"{100 * n / params['image_encoder']:.2f}%"
    sizes = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("tuning", "blocks"))
    print(f"tuning {cfg.tuning}: {params['method']:,} method + {params['classifier']:,} classifier parameters tuned "
          f"({share(params['method'])} + {share(params['classifier'])} of the {params['image_encoder']:,}-parameter "
          f"image encoder); {sizes}")
    run_dir = Path(cfg.out) / cfg.run_name
    losses = []
    if cfg.eval_only and cfg.checkpoint:
        state = load_checkpoint(cfg.checkpoint, checkpoint_identity(cfg, data, info))
        load_tuned(model, state["tuned"], cfg.checkpoint)
        losses, run_dir = list(state["train_loss"]), Path(cfg.checkpoint).parent
    elif not cfg.eval_only and cfg.tuning != "zeroshot":
        features = None
        if cfg.cache_features:  # the backbone is frozen: run it once, not once per epoch
            features = extract_features(model, Views(data.train, InitTransform(info["image_size"])), cfg, device)
        losses = train(cfg, data, model, info, device, run_dir, features)
    test_set = Views(data.test, EvalTransform(info["image_size"], cfg.tte, cfg.expand))
    logits, labels = predict(model, test_set, cfg, device)
    report = accuracy_report(logits.argmax(dim=1).numpy(), labels.numpy(), data.train_counts)
    print(f"test ({'TTE: five crops of the resize to ' + str(info['image_size'] + cfg.expand) if cfg.tte else 'centre crop'})")
    print(format_report(report))
    # a re-evaluation (--eval-only) sits beside the training run's results.json instead of replacing it
    name = "results.json" if not cfg.eval_only else f"results_eval_{f'tte{cfg.expand}' if cfg.tte else 'centre'}.json"
    write_results(run_dir / name, cfg, report, data, params, losses)
    print(f"wrote {run_dir / name}")
    return report


def clean_message(e: Exception) -> str:
    """An error raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its last line."""
    msg = str(e).strip()
    if "Original Traceback" in msg:
        msg = msg.splitlines()[-1].split("LiftError: ", 1)[-1]
    return msg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:  # python lift_plus.py table runs/  ->  one Markdown table of all results.json
        print(results_table(argv[1] if len(argv) > 1 else "runs"))
        return
    try:
        run(parse_config(argv))
    except LiftError as e:
        print(f"error: {clean_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished epoch is in the run folder's checkpoint.pt; continue with --resume",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
