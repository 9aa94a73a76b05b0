"""The offline world of lift_plus.py (--data shapes_lt): a tiny CLIP and a long-tailed task for a laptop CPU.

    python data/shapes_lt/prepare.py    # pretrains the world's CLIP (2 minutes) and writes assets/world_clip.pt
    python data/shapes_lt/prepare.py shapes_lt_wide    # the wide world's: assets/world_clip_wide.pt

lift_plus.py loads this file (Appendix C): it renders the task into its cache in seconds and unpacks the shipped
CLIP, so the quick start needs no step of its own. Without internet or a GPU there is no CLIP to fine-tune, so this
world replays the paper's setting in minutes. Each choice stands for one property of CLIP on ImageNet-LT:
  * concepts: 8 colours x 4 textures x 8 shapes, captioned "a photo of a red striped circle." (the web);
  * pretraining: a tiny open_clip CLIP trained contrastively on 16,384 BALANCED captioned images with broad
    nuisances (size, position, rotation, colour, clutter, noise): good features, as CLIP's are. Objects are
    large and roughly centred, as in photo datasets, so that MDA's crops keep part of them. Its words are
    fixed random codes (the token embedding stays at its seeded init), so it ships as 3 MB: assets/;
  * the task is NOT aligned with pretraining, and the prompt only partly bridges it: another camera (warm
    cast, low contrast, a soft lens, more clutter) and class names with four colour words that no caption
    contains ("crimson", "amber", "azure", "violet");
  * long tail: 30 classes, 300 down to 3 training images (imbalance 100), 40 test and 40 validation images each.
    The tail is fine-grained: few-shot classes have rare shapes and borrow head classes' colour and texture
    (world_task_classes), so only shape, which pretraining taught, tells them apart;
  * --data shapes_lt_wide (WIDE_WORLD): wide classes, as ImageNet's are. Each image is one of 8 sub-types of its
    concept, so a tail class's 3 training images show little of what its test images show;
  * --data shapes_lt_dial0 ... shapes_lt_dial4 (DIAL, dial_world): a dial of alignment with the same CLIP, from a
    task drawn and named as pretraining draws and names (level 0) to shapes_lt's camera and words (level 4 = WORLD);
  * 16 SGD steps an epoch (ImageNet-LT has ~900), so every method trains 15 epochs here (lift_plus's
    finalize_config).
"""

import dataclasses
import hashlib
import io
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHIPPED_CLIP = (
    Path(__file__).resolve().parents[2] / "assets" / "world_clip.pt"
)  # pack_world_clip of the pretrained CLIP

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "hexagon", "crescent")
COLOURS = {
    "red": (0.85, 0.12, 0.12),
    "orange": (0.95, 0.55, 0.08),
    "yellow": (0.92, 0.88, 0.12),
    "green": (0.15, 0.70, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.15, 0.25, 0.90),
    "purple": (0.55, 0.18, 0.75),
    "pink": (0.98, 0.50, 0.72),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
CAPTIONS = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.")


@dataclass(frozen=True)
class WorldStyle:
    """Nuisance ranges of one rendering style (sizes are fractions of the image half-width)."""

    radius: tuple  # object radius range
    offset: float  # largest shift of the object centre
    rotation: float  # largest rotation, degrees (kept small: a square turned 45 degrees is a diamond)
    colour_jitter: float  # per-image shift of the object's RGB
    cast: float  # std of a per-channel multiplicative colour cast on the whole image
    clutter: int  # number of translucent distractor blobs in the background
    noise: float  # std of per-pixel Gaussian noise
    camera: tuple = (1.0, 1.0, 1.0)  # fixed RGB gain of the whole domain (the task's "camera")
    contrast: float = 1.0  # fixed contrast around mid-grey
    blur: float = 0.0  # std of a Gaussian lens blur, in output pixels
    variants: bool = False  # each image one of 8 sub-types of its concept (render_images): --data shapes_lt_wide


@dataclass(frozen=True)
class WorldSpec:
    """Everything that defines an offline world: its images, its long-tailed task, its CLIP."""

    seed: int = 0  # world seed: class choice, images, pretraining (not --seed)
    image_size: int = 32
    num_classes: int = 30  # downstream classes, a subset of the 8 x 8 x 4 concepts
    max_count: int = 300  # head class training images
    imbalance: float = 100.0  # max_count / min_count (300 -> 3), exponential profile as in CIFAR-100-LT
    test_per_class: int = 40  # balanced test set
    val_per_class: int = 40  # balanced validation set, drawn as the test set with its own seed: choices are made on it
    rare_shapes: int = 4  # shapes seen only in few-shot classes
    # pretraining sees the web: large, roughly centred objects under broad nuisances (clutter, noise, casts);
    # the task is one camera inside that range but shifted: warm cast, low contrast, a soft lens, more clutter
    pretrain_style: WorldStyle = WorldStyle(
        radius=(0.5, 0.9), offset=0.15, rotation=20, colour_jitter=0.08, cast=0.08, clutter=2, noise=0.04
    )
    task_style: WorldStyle = WorldStyle(
        radius=(0.55, 0.85),
        offset=0.1,
        rotation=20,
        colour_jitter=0.08,
        cast=0.08,
        clutter=3,
        noise=0.05,
        camera=(1.15, 0.97, 0.8),
        contrast=0.8,
        blur=0.6,
    )
    # the task's class names use colour words no caption contains: the prompt only partly bridges them
    task_words: tuple = (("red", "crimson"), ("orange", "amber"), ("blue", "azure"), ("purple", "violet"))
    pretrain_images: int = 16384  # balanced: 64 per concept
    pretrain_epochs: int = 4
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3


WORLD = WorldSpec()
# The wide world is meant to change one thing. In ImageNet-LT a class is wide (breeds, views, settings), so a tail
# class's 5 training images show little of what its test images show, yet CLIP's pretraining has seen it all.
# In WORLD a class varies only in pose, size and background, so 3 images already cover it. Here each image is one
# of 8 sub-types of its concept (shade x texture scale x one or two objects), in pretraining and in the task alike.
# Pretraining sees 4 times the images, meant to make its CLIP as good on its own (web) images as WORLD's is on its
# own. It comes out weaker (tutorial.ipynb, section 1, measures both): the wide world also differs in how well its
# CLIP knows the task.
WIDE_WORLD = dataclasses.replace(
    WORLD,
    pretrain_style=dataclasses.replace(WORLD.pretrain_style, variants=True),
    task_style=dataclasses.replace(WORLD.task_style, variants=True),
    pretrain_images=4 * WORLD.pretrain_images,
)
WORLDS = {"shapes_lt": WORLD, "shapes_lt_wide": WIDE_WORLD}  # --data names
SHIPPED_CLIPS = {"shapes_lt": SHIPPED_CLIP, "shapes_lt_wide": SHIPPED_CLIP.with_name("world_clip_wide.pt")}


def dial_world(t: float, words: int, base: WorldSpec = WORLD) -> WorldSpec:
    """`base` with its task moved a fraction t of the way from pretraining's own rendering to its task's camera, and
    only the first `words` of its task_words (none: the class names are the captions' own words).

    t = 0, words = 0: the task is drawn as pretraining draws (its style, a neutral camera) and named in the captions'
    words, so the CLIP already knows it, as CLIP ViT-B/16 knows ImageNet; t = 1, words = len(task_words): `base`.
    Every number of the style (camera, contrast, blur, clutter, noise, radius, offset, ...) moves linearly; clutter
    is rounded half up. Only task fields change, so world_key, and the CLIP, stay base's: no pretraining is run."""
    a, b = base.pretrain_style, base.task_style

    def lerp(x, y):
        if isinstance(x, tuple):
            return tuple(lerp(u, v) for u, v in zip(x, y))
        if isinstance(x, bool):
            return x if t < 0.5 else y
        if isinstance(x, int):
            return int(math.floor(x + t * (y - x) + 0.5))
        return x if x == y else x + t * (y - x)  # equal fields keep their exact value

    style = WorldStyle(**{f.name: lerp(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)})
    return dataclasses.replace(base, task_style=b if t == 1 else style, task_words=base.task_words[:words])


# The dial of alignment (tutorial.ipynb): the same shipped CLIP, tasks from pretraining's own images and words
# (level 0) to WORLD's camera and words (the last level, WORLD itself, so its cached task is reused). The camera moves
# a quarter of the way per level and one colour word is switched in per level, in task_words' order (red, orange,
# blue, purple); orange and blue name 8 of the 12 few-shot classes.
DIAL = {f"shapes_lt_dial{i}": dial_world(i / 4, i) for i in range(5)}
assert DIAL["shapes_lt_dial4"] == WORLD
WORLDS.update(DIAL)  # --data names (lift_plus.WORLDS lists them too)
SHIPPED_CLIPS.update(dict.fromkeys(DIAL, SHIPPED_CLIP))  # one CLIP for every level: WORLD's
WORLD_CLIP = {
    "embed_dim": 128,
    "quick_gelu": False,  # the world's tiny CLIP, an open_clip model config
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
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
    y, x = np.meshgrid(g, g, indexing="ij")  # [S, S] each, in [-1, 1]
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
        rgb = np.clip(np.asarray(COLOURS[colour]) + rng.uniform(-style.colour_jitter, style.colour_jitter, 3), 0, 1)
        objects, freq = [(cx, cy, R)], 2.2  # (centre, radius) of each copy; texture frequency
        if style.variants:  # the sub-type: dark or light shade, coarse or fine texture, one object or two
            dark, fine, two = rng.randint(2, size=3)
            rgb = rgb * 0.6 if dark else 0.4 + 0.6 * rgb
            freq = 3.2 if fine else 1.5
            if two:
                a = rng.uniform(0, np.pi)
                dx, dy = 0.45 * np.cos(a), 0.45 * np.sin(a)
                objects = [(cx + dx, cy + dy, 0.55 * R), (cx - dx, cy - dy, 0.55 * R)]
        img = bg
        for ox, oy, r in objects:
            u = (np.cos(th) * (x - ox) + np.sin(th) * (y - oy)) / r  # [S, S]
            v = (-np.sin(th) * (x - ox) + np.cos(th) * (y - oy)) / r
            obj = rgb * np.where(texture_mask(texture, u, v, freq), 0.35, 1.0)[..., None]  # [S, S, 3]
            img = np.where(shape_mask(shape, u, v)[..., None], obj, img)
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
    p = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")  # [H + 2r, W + 2r, 3]
    p = sum(k[j] * p[j : j + img.shape[0]] for j in range(2 * r + 1))  # [H, W + 2r, 3]
    return sum(k[j] * p[:, j : j + img.shape[1]] for j in range(2 * r + 1))  # [H, W, 3]


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
    rare = SHAPES[len(SHAPES) - spec.rare_shapes :]
    common, looks = [], set()
    for colour, texture, shape in concepts:  # one class per (colour, texture) look
        if shape not in rare and (colour, texture) not in looks and len(common) < spec.num_classes - n_few:
            common.append((colour, texture, shape))
            looks.add((colour, texture))
    few = [(colour, texture, s) for colour, texture, _ in common for s in rare][:n_few]  # head looks, rare shapes
    return common + few


def world_counts(spec: WorldSpec) -> list:
    """Training images per class: int(max_count * (1 / imbalance) ** (i / (K - 1))), as CIFAR-100-LT."""
    K = spec.num_classes
    return [int(spec.max_count * (1 / spec.imbalance) ** (i / (K - 1))) for i in range(K)]


def world_key(spec: WorldSpec) -> str:
    """Cache key of the world's pretrained CLIP: WORLD_VERSION, the spec's pretraining fields, its model
    config and open_clip's version. The downstream task's fields are not in it."""
    import open_clip

    fields = {
        k: v for k, v in dataclasses.asdict(spec).items() if k.startswith("pretrain") or k in ("seed", "image_size")
    }
    if not spec.pretrain_style.variants:
        del fields["pretrain_style"]["variants"]  # so WORLD keeps the key its shipped CLIP was made with
    text = repr((WORLD_VERSION, fields, WORLD_CLIP, SHAPES, COLOURS, TEXTURES, CAPTIONS, open_clip.__version__))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


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


def ship_world_clip(name: str, path: Path | None = None, world: str = "shapes_lt") -> dict:
    """Pretrain the CLIP of world `world` (open_clip model `name`) and write the file the project ships (or `path`)."""
    spec, path = WORLDS[world], path or SHIPPED_CLIPS[world]
    packed = pack_world_clip(pretrain_world_clip(spec, name, spec.seed), world_key(spec))
    buf = io.BytesIO()
    torch.save(packed, buf)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return packed


def render_task(spec: WorldSpec) -> dict:
    """The world's long-tailed task: exponential training counts, and balanced validation and test sets drawn from
    one distribution. All three are in the task style, each with its own seed (pretraining has seed + 3), so adding
    the validation set changed no training or test image. Arrays: images uint8 [N, S, S, 3], labels, names, counts."""
    classes, counts = world_task_classes(spec), world_counts(spec)
    y_train = np.repeat(np.arange(len(classes)), counts)  # [N_train]
    y_test = np.repeat(np.arange(len(classes)), spec.test_per_class)  # [N_test]
    y_val = np.repeat(np.arange(len(classes)), spec.val_per_class)  # [N_val]
    train = render_images([classes[y] for y in y_train], spec.task_style, spec.seed + 1, spec.image_size)
    test = render_images([classes[y] for y in y_test], spec.task_style, spec.seed + 2, spec.image_size)
    val = render_images([classes[y] for y in y_val], spec.task_style, spec.seed + 4, spec.image_size)
    names = np.array([concept_name(c, spec.task_words) for c in classes])
    arrays = dict(train=train, y_train=y_train, test=test, y_test=y_test, val=val, y_val=y_val)
    return dict(**arrays, classnames=names, counts=np.asarray(counts))


def task_key(spec: WorldSpec) -> str:
    """Cache key of the rendered task: WORLD_VERSION and every field of the spec."""
    text = repr((WORLD_VERSION, dataclasses.asdict(spec), SHAPES, COLOURS, TEXTURES))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def clip_contrastive_loss(img, txt, logit_scale):
    """CLIP's symmetric InfoNCE: image i should match caption i among the batch, and vice versa."""
    logits = logit_scale.exp() * img @ txt.t()  # [B, B]
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
    order = np.stack([rng.permutation(C) for _ in range(per)])  # [per, C] concept ids
    images = torch.from_numpy(
        render_images([concepts[c] for c in order.ravel()], spec.pretrain_style, seed + 3, spec.image_size)
    ).permute(0, 3, 1, 2)  # [N, 3, S, S]
    captions = [CAPTIONS[rng.randint(len(CAPTIONS))].format(concept_name(concepts[c])) for c in order.ravel()]
    tokens = tokenizer(captions)  # [N, context]
    mean, std = (
        torch.tensor(clip.visual.preprocess_cfg[k]).view(1, 3, 1, 1) * 255 for k in ("mean", "std")
    )  # uint8 images
    B = spec.pretrain_batch
    rows = np.arange(len(images)).reshape(per, C)  # image index of (round, concept slot)
    steps = spec.pretrain_epochs * (len(images) // B)
    clip.token_embedding.requires_grad_(False)  # words are fixed random codes that the text tower learns to read
    opt = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=spec.pretrain_lr, weight_decay=0.1)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    clip.train()
    t0, step = time.time(), 0
    for epoch in range(spec.pretrain_epochs):
        # each round's C images are one permutation of the concepts: chunks of B are concept-distinct
        perm = rows[rng.permutation(per)]
        perm = np.stack([r[rng.permutation(C)] for r in perm]).ravel()
        for j in range(0, len(perm) - B + 1, B):
            idx = torch.as_tensor(perm[j : j + B])
            x = (images[idx].float() - mean) / std
            img = F.normalize(clip.encode_image(x), dim=-1)  # [B, E]
            txt = F.normalize(clip.encode_text(tokens[idx]), dim=-1)  # [B, E]
            loss = clip_contrastive_loss(img, txt, clip.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            if step % 50 == 0 or step == steps:
                print(
                    f"pretraining the world's CLIP: step {step}/{steps} loss {loss.item():.3f} "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
    return clip.eval()


if __name__ == "__main__":
    import json
    import tempfile

    import open_clip

    for world in sys.argv[1:] or ["shapes_lt"]:  # world names: shapes_lt (the default), shapes_lt_wide
        # the world's CLIP registered as open_clip's model world-<key>, the name lift_plus gives it
        with tempfile.TemporaryDirectory() as folder:
            config = Path(folder) / f"world-{world_key(WORLDS[world])}.json"
            config.write_text(json.dumps(WORLD_CLIP, indent=1))
            open_clip.add_model_config(config)
            ship_world_clip(config.stem, world=world)
        print(f"wrote {SHIPPED_CLIPS[world]}")
