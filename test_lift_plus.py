"""Tests of lift_plus.py, a second reading of the method: Part I's sections in order, then the appendices.

CPU only: tiny open_clip models with random weights and images the tests write. Parity tests compare
with a reference computation on the same weights (minGPT style); bad-input tests check the exact line
a user sees. The offline world's shipped CLIP is unpacked into a temporary cache (or into
$LIFT_TEST_CACHE, which CI keeps between runs), never into the user's home cache."""

import copy
import dataclasses
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["LIFT_PLUS_CACHE"] = os.environ.get("LIFT_TEST_CACHE") or tempfile.mkdtemp(prefix="lift_plus_test_cache_")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import lift_plus as lp  # noqa: E402

HERE = Path(__file__).resolve().parent
torch.set_num_threads(2)

TINY_VIT = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_RESNET = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ------------------------------------------------------------------------------------------
# fixtures: tiny models, a generated long-tailed image folder, the offline world
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    paths = {}
    for name, spec in {"TinyViT-test": TINY_VIT, "TinyRN-test": TINY_RESNET}.items():
        paths[name] = d / f"{name}.json"
        paths[name].write_text(json.dumps(spec))
    return paths


def make_cfg(configs, **kw) -> lp.Config:
    base = dict(
        model=str(configs["TinyViT-test"]),
        pretrained="none",
        workers=0,
        batch_size=8,
        epochs=2,
        eval_batch_size=16,
        log_every=1000,
        device="cpu",
    )
    return lp.finalize_config(lp.Config(**{**base, **kw}))


def write_images(folder: Path, counts, size=(40, 48), seed=0):
    """Class c is a noisy image of colour c: easy to learn, so the loss must fall."""
    rng = np.random.RandomState(seed)
    palette = rng.randint(0, 256, (len(counts), 3))
    for c, n in enumerate(counts):
        d = folder / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = palette[c] + rng.randint(-40, 40, (*size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.png")


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A 4-class long-tailed task: 30 / 12 / 5 / 3 training images, 4 test images per class."""
    root = tmp_path_factory.mktemp("task")
    write_images(root / "train", [30, 12, 5, 3], seed=0)
    write_images(root / "test", [4, 4, 4, 4], seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_model(configs, folder):
    """tiny_model(tuning, **flags) -> (cfg, data, model) of the tiny ViT on the folder task, as fit builds it
    (with Appendix D's fast path unless fast=False); built once per setting, a fresh copy each call."""
    built = {}

    def build(tuning="adaptformer", **kw):
        key = (tuning, tuple(sorted(kw.items())))
        if key not in built:
            cfg = make_cfg(configs, data=str(folder), tuning=tuning, **kw)
            data = lp.build_data(cfg)
            model = lp.build_model(cfg, data, torch.device("cpu"))
            if cfg.fast:
                lp.make_fast(model)
            built[key] = (cfg, data, model)
        cfg, data, model = built[key]
        return cfg, data, copy.deepcopy(model)

    return build


def randomize_(module: torch.nn.Module, seed=0):
    """Give every zero-initialised tensor random values so parity tests are not trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def interrupt_loss_call(monkeypatch, n: int):
    """Make the n-th call of the loss (one per micro-batch) raise KeyboardInterrupt, as Ctrl-C would."""
    real, calls = lp.logit_adjusted_loss, {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lp, "logit_adjusted_loss", loss)
    return real


def fit_and_evaluate(cfg):
    return lp.run_job(cfg)


def train_run(configs, folder, out, **kw):
    cfg = make_cfg(configs, data=str(folder), out=str(out), **kw)
    return cfg, fit_and_evaluate(cfg)


@pytest.fixture(scope="session")
def world():
    """The offline world's config with its CLIP in the test cache (the shipped one, unpacked once)."""
    cfg = lp.finalize_config(lp.Config(data="shapes_lt", workers=0, device="cpu", log_every=10**6))
    lp.build_data(cfg)
    return cfg


def cli(*args, cwd=None):
    """The command line in a new process, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(HERE / "lift_plus.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=600,
    )


def tiny_args(configs, data, out, flags: str = "") -> list:
    """Command-line arguments of a run of the tiny ViT (random weights, no workers, the CPU), then `flags`."""
    common = ["--data", str(data), "--model", str(configs["TinyViT-test"]), "--out", str(out)]
    return common + f"--pretrained none --workers 0 --device cpu {flags}".split()


def main_error(capsys, *args) -> str:
    """lift_plus.main in this process: it must exit with status 2 and one line on stderr (any other
    exception, a traceback, fails the test). Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        lp.main(list(args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def assert_clean_error(result, pattern):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(pattern, result.stderr), result.stderr


# ------------------------------------------------------------------------------------------
# Part I, 1. Config: the paper's defaults, derived values
# ------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    cfg = lp.finalize_config(lp.Config(data="imagenet_lt"))
    method = (cfg.tuning, cfg.init, cfg.prompt, cfg.logit_scale, cfg.loss, cfg.tau)
    assert method == ("adaptformer", "semantic", "a photo of a {}.", 25.0, "la", 1.0)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (5, 128, 0.02, 0.9, 5e-4)
    assert (cfg.mda, cfg.min_scale, cfg.tte, cfg.expand) == ("convex", 0.08, True, 24)
    assert (cfg.model, cfg.pretrained, cfg.quick_gelu) == ("ViT-B-16", "openai", "auto")
    assert lp.finalize_config(lp.Config(data="inat2018")).epochs == 15
    lrs = {t: lp.finalize_config(lp.Config(data="imagenet_lt", tuning=t)).lr for t in ("classifier", "full", "partial")}
    assert lrs == {"classifier": 0.03, "full": 0.001, "partial": 0.001}
    assert lp.finalize_config(lp.Config(data="places_lt", tuning="full")).lr == 0.002


def test_finalize_is_the_one_writer():
    cfg = lp.Config(data="imagenet_lt")
    done = lp.finalize_config(cfg)
    assert cfg.epochs is None and cfg.expand is None  # the input is not changed
    assert done.run_name == "imagenet_lt_adaptformer_seed0" and done.workers >= 1
    assert lp.finalize_config(done) == done  # finalising twice changes nothing
    assert lp.finalize_config(lp.Config(data="imagenet_lt", tuning="mask")).mask_ratio == 0.005
    evaluation = lp.finalize_config(lp.Config(data="imagenet_lt", eval_only=True, checkpoint="runs/a/checkpoint.pt"))
    assert (
        evaluation.run_name is None and lp.finalize_config(evaluation) == evaluation
    )  # it writes beside the checkpoint


# ------------------------------------------------------------------------------------------
# Part I, 2. Data: split lists, CIFAR-100-LT, the groups
# ------------------------------------------------------------------------------------------


def test_split_list_parsing(tmp_path):
    f = tmp_path / "ImageNet_LT_train.txt"
    f.write_text("train/n01/a.JPEG 0\n\ntrain/n02/b.JPEG 1\n")
    paths, labels = lp.read_split_list(f, "/data/imagenet", 1000)
    assert paths == ["/data/imagenet/train/n01/a.JPEG", "/data/imagenet/train/n02/b.JPEG"] and labels == [0, 1]


def test_malformed_split_line_and_label_range(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("a.jpg 0\nb.jpg\n")
    with pytest.raises(
        lp.LiftError, match=r"train.txt:2: expected '<relative/image/path> <integer label>', got 'b.jpg'"
    ):
        lp.read_split_list(f, tmp_path, 10)
    f.write_text("a.jpg 0\nb.jpg 12\n")
    with pytest.raises(lp.LiftError, match=r"train.txt:2: label 12 is outside the class range 0..9"):
        lp.read_split_list(f, tmp_path, 10)


def write_benchmark(root: Path, n_classes=3):
    """A miniature ImageNet-LT laid out as the OLTR lists expect."""
    lines = {"train": [], "test": []}
    for split, per in (("train", [6, 3, 1]), ("test", [2, 2, 2])):
        for c in range(n_classes):
            d = root / split / f"n{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per[c]):
                Image.new("RGB", (20, 16), (40 * c, 0, 0)).save(d / f"{i}.JPEG")
                lines[split].append(f"{split}/n{c:02d}/{i}.JPEG {c}")
    for split in lines:
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines[split]) + "\n")


def test_imagenet_lt_from_split_lists_is_lazy(tmp_path, configs):
    write_benchmark(tmp_path)
    cfg = make_cfg(configs, data="imagenet_lt", root=str(tmp_path), cache=str(tmp_path / "cache"))
    for p in (tmp_path / "train").rglob("*.JPEG"):
        p.unlink()  # building must not open images
    data = lp.build_data(cfg)
    assert data.num_classes == 1000 and data.classnames[:2] == ["tench", "goldfish"]
    assert data.train_counts[:3].tolist() == [6, 3, 1] and len(data.test) == 6
    with pytest.raises(lp.LiftError, match=r"cannot read image .*train/n00/0.JPEG"):
        data.train.load(0)


def test_imagenet_lt_val_list_for_choosing_settings(tmp_path, configs, monkeypatch):
    """--eval-split val reads ImageNet-LT's val list (OLTR's name or the LIFT+ code's val.txt); without one it is
    refused naming the file, and a test run never asks for it."""
    monkeypatch.setattr(lp, "online", lambda host: False)
    write_benchmark(tmp_path)
    cfg = make_cfg(configs, data="imagenet_lt", root=str(tmp_path), cache=str(tmp_path / "cache"), eval_split="val")
    with pytest.raises(lp.LiftError, match=r"split files not found: ImageNet_LT_val.txt or val.txt"):
        lp.build_data(cfg)
    (tmp_path / "val.txt").write_text("test/n01/0.JPEG 1\ntest/n02/1.JPEG 2\n")
    data = lp.build_data(cfg)
    assert data.val.labels == [1, 2] and data.val.images[0] == os.path.join(str(tmp_path), "test/n01/0.JPEG")
    assert lp.build_data(dataclasses.replace(cfg, eval_split="test")).val is None


def test_inat_labels_follow_sorted_names(tmp_path, configs):
    (tmp_path / "categories.json").write_text(json.dumps([{"id": 0, "name": "Zebra"}, {"id": 1, "name": "Aardvark"}]))
    (tmp_path / "iNaturalist18_train.txt").write_text("a.jpg 0\nb.jpg 1\nc.jpg 1\n")
    (tmp_path / "iNaturalist18_val.txt").write_text("d.jpg 0\n")
    data = lp.build_data(make_cfg(configs, data="inat2018", root=str(tmp_path), cache=str(tmp_path / "c")))
    assert data.classnames == ["Aardvark", "Zebra"]
    assert data.train.labels == [1, 0, 0] and data.train_counts.tolist() == [2, 1]


def test_places_classnames_both_formats(tmp_path, configs):
    (tmp_path / "Places_LT_train.txt").write_text("a.jpg 0\nb.jpg 1\nc.jpg 1\n")
    (tmp_path / "Places_LT_test.txt").write_text("d.jpg 0\n")
    cfg = make_cfg(configs, data="places_lt", root=str(tmp_path), cache=str(tmp_path / "c"))
    for names in ("airfield\napartment_building-outdoor\n", "/a/airfield 0\n/a/apartment_building/outdoor 1\n"):
        (tmp_path / "classnames.txt").write_text(names)
        assert lp.build_data(cfg).classnames == ["airfield", "apartment_building-outdoor"]


@pytest.mark.parametrize(
    "ratio,total,groups", [(100, 10847, (35, 35, 30)), (50, 12608, (41, 41, 18)), (10, 19573, (69, 31, 0))]
)
def test_cifar100_lt_counts_and_groups(ratio, total, groups):
    counts = lp.cifar100_lt_counts(ratio)
    assert sum(counts) == total and counts[0] == 500 and counts[-1] == 500 // ratio
    g = lp.class_groups(counts)
    assert (len(g["many"]), len(g["medium"]), len(g["few"])) == groups


def test_make_long_tailed_keeps_the_counts_of_each_class():
    labels = np.tile(np.arange(3), 10)  # class c at positions c, c + 3, ...
    keep = lp.make_long_tailed(labels, [5, 3, 1], seed=0)
    assert len(keep) == 9 and len(set(keep.tolist())) == 9
    assert np.bincount(labels[keep], minlength=3).tolist() == [5, 3, 1]
    assert labels[keep].tolist() == [0] * 5 + [1] * 3 + [2]  # class by class, in class order
    assert keep.tolist() == lp.make_long_tailed(labels, [5, 3, 1], seed=0).tolist()  # deterministic
    assert keep.tolist() != lp.make_long_tailed(labels, [5, 3, 1], seed=1).tolist()
    # numpy's seeded shuffle is stable across versions: the published split depends on these exact draws
    assert keep.tolist() == [6, 24, 12, 27, 3, 10, 16, 4, 8]


# ------------------------------------------------------------------------------------------
# Part I, 3. Transforms: the MDA schedule and crops, the TTE views
# ------------------------------------------------------------------------------------------


def test_mda_schedule_values():
    convex = [lp.mda_min_scale(e, 5, "convex") for e in range(5)]
    np.testing.assert_allclose(convex, [0.08, 0.10926, 0.20325, 0.39143, 1.0], atol=5e-5)
    assert [lp.mda_min_scale(e, 5, "min") for e in range(5)] == [0.08] * 5
    assert [lp.mda_min_scale(e, 5, "max") for e in range(5)] == [1.0] * 5
    np.testing.assert_allclose([lp.mda_min_scale(e, 5, "linear") for e in range(5)], [0.08, 0.31, 0.54, 0.77, 1.0])
    concave = [lp.mda_min_scale(e, 5, "concave") for e in range(5)]
    np.testing.assert_allclose(
        concave,
        [
            0.08,
            0.08 + 0.92 * math.sqrt(1 - 0.75**2),
            0.08 + 0.92 * math.sqrt(0.75),
            0.08 + 0.92 * math.sqrt(1 - 0.25**2),
            1.0,
        ],
    )
    assert lp.mda_min_scale(0, 1, "convex") == 0.08  # a single epoch gets the first epoch's range


def test_mda_crops_are_squares_in_range():
    g = torch.Generator().manual_seed(0)
    H, W = 300, 500
    for s_min in (0.08, 0.4, 1.0):
        for _ in range(200):
            top, left, side = lp.mda_crop_box(H, W, s_min, g)
            assert 0 <= top <= H - side and 0 <= left <= W - side
            frac = side * side / (H * W)
            assert min(s_min, H / W) - 0.01 <= frac <= H / W + 0.01  # capped by the inscribed square
    assert lp.mda_crop_box(H, W, 1.0, g)[2] == 300  # the last epoch: the largest square
    t = lp.MDATransform(32, 5, "convex", 0.08, seed=0)
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    out = t(img, index=3)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out, t(img, index=3))  # deterministic per (seed, epoch, index)
    assert not torch.equal(out, t(img, index=4))


def natural_image(h=375, w=500, seed=0) -> Image.Image:
    """A smooth colour field with texture: JPEG-typical content of ImageNet size."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / 37 + c) + 40 * np.cos(yy / 23 * c + 1) for c in range(3)], -1)
    return Image.fromarray(np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8))


def assert_close_to_pil(ours: torch.Tensor, pil_views):
    """The tensor path resamples with torch's antialiased bicubic filter: within 2 levels of PIL's."""
    ref = torch.stack([torch.from_numpy(np.array(v)).permute(2, 0, 1) for v in pil_views])
    diff = (ours.int() - ref.int()).abs()
    assert ours.shape == ref.shape and diff.max() <= 2 and diff.float().mean() < 0.05, (diff.max(), diff.float().mean())


def test_mda_output_matches_the_pil_path(tmp_path):
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    pil = natural_image()
    pil.save(tmp_path / "a.jpg", quality=90)
    pil = Image.open(tmp_path / "a.jpg").convert("RGB")
    img = lp.ImageSet([str(tmp_path / "a.jpg")], [0]).load(0)
    assert torch.equal(img, torch.from_numpy(np.array(pil)).permute(2, 0, 1))  # same decoded pixels as PIL
    t = lp.MDATransform(224, 5, "convex", 0.08, seed=0)
    for index in range(5):
        gen = torch.Generator().manual_seed(index)  # seed 0, epoch 0: the generator seed is the index
        top, left, side = lp.mda_crop_box(375, 500, 0.08, gen)
        ref = TF.resized_crop(pil, top, left, side, side, [224, 224], T.InterpolationMode.BICUBIC)
        assert_close_to_pil(t(img, index), [ref])


def test_tte_views_match_torchvision_five_crops():
    from torchvision import transforms as T

    pil = natural_image(40, 60)
    img = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    views = lp.EvalTransform(32, 40, five_crops=True)(img)
    ref = T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.FiveCrop(32)])(pil)
    assert views.shape == (5, 3, 32, 32)
    assert_close_to_pil(views, ref)
    pil = natural_image()
    single = lp.EvalTransform(224, 256, False)(torch.from_numpy(np.array(pil)).permute(2, 0, 1))
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])(pil)
    assert_close_to_pil(single, [ref])  # resize 256, centre crop 224


# ------------------------------------------------------------------------------------------
# Part I, 4. Model: AdaptFormer, parity with open_clip, the semantic init, QuickGELU fidelity
# ------------------------------------------------------------------------------------------


def test_adaptformer_matches_its_equation(configs, folder, tiny_model):
    """out = h + MLP(LN2(h)) + s * Up(ReLU(Down(LN_a(h)))), h = x + Attn(LN1(x)), by hand."""
    _, _, model = tiny_model()
    enc = model.encoder
    randomize_(enc.adaptformer)
    blk, af = enc.visual.transformer.resblocks[0], enc.adaptformer["0"]
    x = torch.randn(2, 17, 64)
    y = blk.ln_1(x)
    D, H = 64, blk.attn.num_heads
    q, k, v = (y @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias).split(D, dim=-1)

    def heads(t):  # [2, 17, D] -> [2, H, 17, D/H]
        return t.reshape(2, 17, H, D // H).transpose(1, 2)

    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ heads(v)
    h = x + blk.attn.out_proj(att.transpose(1, 2).reshape(2, 17, D))
    mlp = blk.mlp.c_proj(blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(h))))
    ref = h + mlp + af.scale * af.up(torch.relu(af.down(af.ln(h))))
    torch.testing.assert_close(enc.block(0, blk, x), ref, rtol=1e-5, atol=1e-5)


def test_pre_projection_feature_times_projection_equals_encode_image(configs, folder, tiny_model):
    cfg, _, model = tiny_model(tuning="classifier")
    clip, _, _, _ = lp.load_clip(cfg)
    model.encoder.visual.load_state_dict(clip.visual.state_dict())
    x = torch.randn(3, 3, 32, 32)
    ours = model.encoder(x) @ model.encoder.visual.proj  # [3, E]
    torch.testing.assert_close(ours, clip.encode_image(x), rtol=1e-5, atol=1e-5)  # open_clip's own forward


def test_zero_initialised_adaptformer_leaves_features_unchanged(configs, folder, tiny_model):
    _, _, plain = tiny_model(tuning="classifier")
    _, _, lifted = tiny_model(tuning="adaptformer")
    lifted.encoder.visual.load_state_dict(plain.encoder.visual.state_dict())
    assert len(lifted.encoder.adaptformer) == 2
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(lifted.features(x), plain.features(x), rtol=0, atol=0)
    with torch.no_grad():  # the branch is live once Up is non-zero
        lifted.encoder.adaptformer["1"].up.weight.normal_()  # (a constant fill would be cancelled by ln_post)
    assert not torch.allclose(lifted.features(x), plain.features(x))


def test_semantic_init_prediction_agrees_with_zero_shot(configs, folder, tiny_model):
    # With an image projection of orthonormal columns, |P t_j| = 1 for every class, so the cosine
    # classifier's logits are zero-shot CLIP's cosine scores times s |f P| / |f|, a per-image factor.
    cfg, data, model = tiny_model(tuning="adaptformer")
    clip, _, _, _ = lp.load_clip(cfg)
    q, _ = torch.linalg.qr(torch.randn(64, 32))  # [D, E], orthonormal columns
    with torch.no_grad():
        clip.visual.proj.copy_(q)
    tok = __import__("open_clip").get_tokenizer(lp.open_clip_name(cfg.model))
    t = lp.text_features(clip, tok, data.classnames, cfg.prompt, "cpu")
    model.encoder.visual.load_state_dict(clip.visual.state_dict())
    with torch.no_grad():
        model.head.weight.copy_(lp.semantic_init(t, clip.visual.proj))
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    ours = model(x)  # [16, K]
    zero_shot = clip.encode_image((x.float() - model.mean) / model.std, normalize=True) @ t.t()  # cosine scores
    f = model.features(x)  # [16, D]
    factor = (f @ clip.visual.proj).norm(dim=-1, keepdim=True) / f.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(ours, cfg.logit_scale * zero_shot * factor, rtol=1e-4, atol=1e-4)
    # the same top class, except where two classes' cosines tie to within rounding (a CPU may order those either way)
    top2 = zero_shot.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-5
    assert clear.sum() >= 12 and torch.equal(ours.argmax(1)[clear], zero_shot.argmax(1)[clear])


def test_semantic_init_formula_with_general_projection():
    # w_j = normalize(t_j P^T): <f, w_j> = <f P, t_j> / |P t_j|, the zero-shot score up to a class constant
    P, t, f = torch.randn(64, 32), F.normalize(torch.randn(5, 32), dim=-1), torch.randn(3, 64)
    w = lp.semantic_init(t, P)
    torch.testing.assert_close(f @ w.t(), (f @ P) @ t.t() / (t @ P.t()).norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_quick_gelu_follows_the_openai_tag():
    cfg = lp.finalize_config(lp.Config(model="ViT-B/16", pretrained="openai"))
    name, pretrained, quick_gelu, tag, torchscript = lp.resolve_clip(cfg)
    assert (name, pretrained, quick_gelu, torchscript) == ("ViT-B-16", "openai", True, False)
    assert tag["mean"] == (0.48145466, 0.4578275, 0.40821073)
    assert tag["std"] == (0.26862954, 0.26130258, 0.27577711)
    assert tag["interpolation"] == "bicubic"
    import open_clip  # that tag's model computes x * sigmoid(1.702 x)

    clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    act = clip.visual.transformer.resblocks[0].mlp[1]
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))
    assert not torch.allclose(act(x), F.gelu(x), atol=1e-3)


def test_quick_gelu_detected_for_openai_files(tmp_path):
    jit_file = tmp_path / "ViT-B-16.pt"  # OpenAI ships TorchScript archives
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(jit_file))
    plain = tmp_path / "weights.bin"
    torch.save({"a": torch.zeros(1)}, plain)

    def cfg(p, q="auto"):
        return lp.finalize_config(lp.Config(model="ViT-B-16", pretrained=str(p), quick_gelu=q))

    _, _, quick_gelu, _, torchscript = lp.resolve_clip(cfg(jit_file))
    assert quick_gelu is True and torchscript is True
    _, _, quick_gelu, _, torchscript = lp.resolve_clip(cfg(plain))
    assert quick_gelu is False and torchscript is False
    assert lp.resolve_clip(cfg(plain, "yes"))[2] is True


@pytest.fixture(scope="session")
def vit_b16():
    import open_clip

    return open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).visual


def test_vit_b16_adaptformer_size_and_gradients(vit_b16):
    """ViT-B/16, 1000 classes: r = 32, 617,868 AdaptFormer parameters (0.72 % of the encoder)."""
    cfg = lp.finalize_config(lp.Config(data="imagenet_lt"))
    model = lp.LiftModel(copy.deepcopy(vit_b16), (0.5,) * 3, (0.5,) * 3, 1000, 25.0)
    lp.configure_tuning(model, cfg, 1000)
    n = lp.count_params(model)
    assert model.sizes["r"] == 32 and model.image_size == 224
    assert n["method"] == 617_868 and n["classifier"] == 768_000
    assert n["image_encoder"] == 86_192_640
    assert n["method"] / n["image_encoder"] < 0.01
    x = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)  # only the adapters and the classifier get gradients
    with torch.no_grad():
        for af in model.encoder.adaptformer.values():
            af.up.weight.normal_()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        tuned = name.startswith("encoder.adaptformer.") or name == "head.weight"
        assert p.requires_grad == tuned, name
        assert (p.grad is not None) == tuned, name


@pytest.mark.parametrize("K,r", [(1000, 32), (365, 8), (8142, 256), (100, 4), (10, 1)])
def test_bottleneck_rule(K, r):
    assert lp.size_rule(K, 12, 2) == r


# ------------------------------------------------------------------------------------------
# Part I, 5. Loss
# ------------------------------------------------------------------------------------------


def test_logit_adjusted_loss_equals_cross_entropy_on_adjusted_logits():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 3, 3, 0])
    counts = torch.tensor([50.0, 20.0, 5.0, 2.0])
    log_prior = torch.log(counts / counts.sum())
    for tau in (0.0, 1.0, 1.5):
        adjusted = logits + tau * log_prior
        ref = -(adjusted.log_softmax(dim=1)[torch.arange(6), y]).mean()  # by hand
        torch.testing.assert_close(lp.logit_adjusted_loss(logits, y, log_prior, tau), ref)
    torch.testing.assert_close(lp.logit_adjusted_loss(logits, y, log_prior, 0.0), F.cross_entropy(logits, y))


# ------------------------------------------------------------------------------------------
# Part I, 6. Training: checkpoints, exact resume, accumulation, end to end
# ------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_reproduces_evaluation(configs, folder, tmp_path):
    cfg, report = train_run(configs, folder, tmp_path, epochs=1)
    ckpt = tmp_path / cfg.run_name / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert sorted(state["tuned"]) == sorted(
        [
            f"encoder.adaptformer.{i}.{p}"
            for i in (0, 1)
            for p in ("ln.weight", "ln.bias", "down.weight", "down.bias", "up.weight", "up.bias", "scale")
        ]
        + ["head.weight"]
    )  # never the frozen backbone
    again = fit_and_evaluate(make_cfg(configs, data=str(folder), eval_only=True, checkpoint=str(ckpt)))
    assert again["per_class"] == report["per_class"] and again["overall"] == report["overall"]
    assert (tmp_path / cfg.run_name / "results_eval_tte3.json").exists()  # 24 px at 224 -> 3 px at 32
    results = json.loads((tmp_path / cfg.run_name / "results.json").read_text())
    assert results["train_counts"] == [30, 12, 5, 3] and results["metrics"]["overall"] == report["overall"]


def test_checkpoint_of_another_tuning_mode_is_refused(configs, folder, tmp_path):
    cfg, _ = train_run(configs, folder, tmp_path, epochs=1)
    ckpt = tmp_path / cfg.run_name / "checkpoint.pt"
    other = make_cfg(configs, data=str(folder), tuning="lora", eval_only=True, checkpoint=str(ckpt))
    with pytest.raises(
        lp.LiftError, match=r"was written by another model or task \(--tuning 'adaptformer' -> 'lora'\)"
    ):
        fit_and_evaluate(other)
    with pytest.raises(lp.LiftError, match=r"exists: pass --resume"):
        train_run(configs, folder, tmp_path, epochs=1)


def test_interrupted_run_resumes_exactly(configs, folder, tmp_path, monkeypatch):
    _, full = train_run(configs, folder, tmp_path / "a", epochs=3, seed=1)
    real_loss = interrupt_loss_call(monkeypatch, 10)  # 50 images / batch 8 = 7 steps per epoch: epoch 2
    with pytest.raises(KeyboardInterrupt):
        train_run(configs, folder, tmp_path / "b", epochs=3, seed=1)
    monkeypatch.setattr(lp, "logit_adjusted_loss", real_loss)
    cfg, resumed = train_run(configs, folder, tmp_path / "b", epochs=3, seed=1, resume="yes")
    a = torch.load(tmp_path / "a" / cfg.run_name / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / cfg.run_name / "checkpoint.pt", weights_only=True)
    for k in a["tuned"]:
        assert torch.equal(a["tuned"][k], b["tuned"][k]), k
    assert a["train_loss"] == b["train_loss"] and resumed["per_class"] == full["per_class"]


def test_gradient_accumulation_equals_full_batch(configs, folder, tmp_path):
    cfg, _ = train_run(configs, folder, tmp_path / "a", epochs=1, batch_size=16)
    train_run(configs, folder, tmp_path / "b", epochs=1, batch_size=16, accum_steps=4)
    a = torch.load(tmp_path / "a" / cfg.run_name / "checkpoint.pt", weights_only=True)["tuned"]
    b = torch.load(tmp_path / "b" / cfg.run_name / "checkpoint.pt", weights_only=True)["tuned"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_cli_end_to_end_lowers_the_loss(configs, folder, tmp_path):
    r = cli(*tiny_args(configs, folder, tmp_path, "--epochs 4 --batch-size 8 --lr 0.05 --run-name e2e"))
    assert r.returncode == 0, r.stderr
    assert "Overall    Many  Medium     Few" in r.stdout
    results = json.loads((tmp_path / "e2e" / "results.json").read_text())
    losses = results["train_loss"]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert results["config"]["tuning"] == "adaptformer" and len(results["per_class_accuracy"]) == 4
    assert results["metrics"]["overall"] > 25.0  # above chance on 4 classes


# ------------------------------------------------------------------------------------------
# Part I, 7. Evaluation: TTE, the accuracy report
# ------------------------------------------------------------------------------------------


def test_tte_equals_mean_of_per_crop_logits(configs, folder, tiny_model):
    _, _, model = tiny_model()
    randomize_(model.encoder.adaptformer)
    views = torch.randint(0, 256, (3, 5, 3, 32, 32), dtype=torch.uint8)
    per_crop = torch.stack([model(views[:, v]) for v in range(5)], dim=1)  # [3, 5, K]
    torch.testing.assert_close(lp.tte_logits(model, views), per_crop.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_class_group_boundaries():
    g = lp.class_groups([101, 100, 20, 19, 1])
    assert g["many"].tolist() == [0] and g["medium"].tolist() == [1, 2] and g["few"].tolist() == [3, 4]


def test_accuracy_report_by_hand():
    # classes 0 (many), 1 (medium), 2 and 3 (few); class 3 has no test image
    counts = [150, 50, 10, 5]
    labels = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    preds = [0, 0, 0, 1, 1, 0, 2, 0, 3]
    r = lp.accuracy_report(preds, labels, counts)
    assert r["overall"] == pytest.approx(100 * 5 / 9)
    assert r["per_class"] == [pytest.approx(75.0), pytest.approx(50.0), pytest.approx(100 / 3), None]
    assert (r["many"], r["medium"], r["few"]) == (pytest.approx(75.0), pytest.approx(50.0), pytest.approx(100 / 3))
    assert lp.accuracy_report([0], [0], [150, 5])["few"] is None  # a group without test images has no mean


# ------------------------------------------------------------------------------------------
# Part I, 8. Main: the command line
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--data", "imagenet_xx"], r"--data: unknown dataset 'imagenet_xx'"),
        (["--data", "imagenet_lt", "--root", "{tmp}/nope"], r"--root .*nope: no such folder"),
        (["--epochs", "0"], r"--epochs: expected an integer >= 1, got 0"),
        (["--epochs", "two"], r"--epochs: invalid int value: 'two'"),
        (["--lr", "nan"], r"--lr: expected a number > 0, got nan"),
        (["--tuning", "heavy"], r"--tuning: invalid choice: 'heavy'"),
        (
            ["--data", "cifar100_ir100", "--eval-split", "val"],
            r"--eval-split val: --data cifar100_ir100 has no val split",
        ),
        (["--batch-size", "128", "--accum-steps", "3"], r"--batch-size 128: not divisible by --accum-steps 3"),
        (["--data", "{folder}", "--model", "ViT-Q-99"], r"--model ViT-Q-99: unknown open_clip model"),
        (
            ["--data", "{folder}", "--model", "{rn}", "--pretrained", "none"],
            r"--tuning adaptformer needs a CLIP ViT image tower .*ModifiedResNet",
        ),
        (
            ["--data", "{folder}", "--model", "{vit}", "--pretrained", "{tmp}/w.pt"],
            r"--pretrained .*w.pt: neither a pretrained tag",
        ),
    ],
)
def test_bad_flags_give_one_clear_message(tmp_path, configs, folder, capsys, args, pattern):
    names = dict(tmp=tmp_path, folder=folder, rn=configs["TinyRN-test"], vit=configs["TinyViT-test"])
    err = main_error(capsys, *[a.format(**names) for a in args], "--out", str(tmp_path / "runs"))
    assert err.startswith("error: ") and re.search(pattern, err), err


def test_missing_or_unreadable_image_is_named(tmp_path, configs):
    write_images(tmp_path / "t" / "train", [3, 2], seed=0)
    write_images(tmp_path / "t" / "test", [1, 1], seed=1)
    (tmp_path / "t" / "train" / "class_1" / "0.png").write_bytes(b"not an image")
    r = cli(*tiny_args(configs, tmp_path / "t", tmp_path / "runs", "--workers 1 --epochs 1 --batch-size 2"))
    assert_clean_error(r, r"cannot read image .*class_1/0.png")


# ------------------------------------------------------------------------------------------
# Appendix A. The baselines: trainable sets, sizes, start at the frozen model, one SGD step
# ------------------------------------------------------------------------------------------

METHOD_PARAMS = {  # which parameter names each method tunes (besides head.weight)
    "adaptformer": r"encoder\.adaptformer\.",
    "adapter": r"\.mlp\.adapter\.",
    "lora": r"\.attn\.parametrizations\.in_proj_weight\.0\.[qv]_(down|up)$",
    "vpt": r"encoder\.prompts\.",
    "full": r"encoder\.visual\.transformer\.resblocks\.[01]\.",
    "partial": r"encoder\.visual\.transformer\.resblocks\.1\.",
    "bitfit": r"encoder\.visual\.transformer\.resblocks\.\d\..*bias$",
    "mask": r"\.parametrizations\..*\.values$",
    "classifier": r"^$",
}


def vit_b16_block_tensors():
    D = 768
    return {
        "in_w": (3 * D, D),
        "in_b": (3 * D,),
        "out_w": (D, D),
        "out_b": (D,),
        "fc_w": (4 * D, D),
        "fc_b": (4 * D,),
        "proj_w": (D, 4 * D),
        "proj_b": (D,),
        "ln_w": (D,) * 2,
        "ln_b": (D,) * 2,
    }


@pytest.mark.parametrize(
    "tuning", ["adaptformer", "adapter", "lora", "vpt", "full", "partial", "bitfit", "mask", "classifier"]
)
def test_method_sizes_on_vit_b16(vit_b16, tuning):
    """Parameter counts on ViT-B/16 with 1000 classes, from the size rules (reference computation)."""
    D, L, K = 768, 12, 1000
    cfg = lp.finalize_config(
        lp.Config(data="imagenet_lt", tuning=tuning, partial_blocks=3 if tuning == "partial" else 1)
    )
    model = lp.LiftModel(copy.deepcopy(vit_b16), (0.5,) * 3, (0.5,) * 3, K, 25.0)
    lp.configure_tuning(model, cfg, K)
    n = lp.count_params(model)
    numel = math.prod
    block = vit_b16_block_tensors()
    r = 2 ** math.floor(math.log2(K / (2 * L)))
    expected = {
        "adaptformer": L * (2 * D + D * r + r + r * D + D + 1),  # LN_a, Down, Up, scale
        "adapter": L * (2 * D + D * r + r + r * D + D),
        "lora": L * 2 * (2 * D * 16),  # rank 2**floor(log2(K/4L)) = 16
        "vpt": L * 64 * D,  # length 2**floor(log2(K/L)) = 64
        "full": L * (sum(numel(s) for k, s in block.items() if k[:2] != "ln") + 4 * D),
        "partial": 3 * (sum(numel(s) for k, s in block.items() if k[:2] != "ln") + 4 * D),
        "bitfit": L * (3 * D + D + 4 * D + D + 2 * D),  # attn in/out, fc, proj, two LNs
        "mask": L * sum(round(0.005 * numel(s)) for k, s in block.items() if k[:2] != "ln"),
        "classifier": 0,
    }[tuning]
    assert n["method"] == expected and n["classifier"] == K * D and n["image_encoder"] == 86_192_640
    if tuning == "adaptformer":
        assert (model.sizes["r"], n["method"]) == (32, 617_868)


@pytest.mark.parametrize(
    "tuning", ["adaptformer", "adapter", "lora", "vpt", "full", "partial", "bitfit", "mask", "classifier"]
)
def test_method_trainable_set_start_and_one_step(configs, folder, tuning, tiny_model):
    # r = 4: with the tiny model's size-rule r = 1 a single ReLU unit can be dead for every image
    sizes = {"adaptformer": dict(adapter_dim=4), "adapter": dict(adapter_dim=4), "lora": dict(lora_rank=4)}.get(
        tuning, {}
    )
    cfg, data, model = tiny_model(tuning=tuning, **sizes)
    _, _, frozen = tiny_model(tuning="classifier")
    frozen.encoder.visual.load_state_dict(model.encoder.visual.state_dict(), strict=False)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in tuned
    assert all(re.search(METHOD_PARAMS[tuning], n) for n in tuned - {"head.weight"}), sorted(tuned)
    assert tuning == "classifier" or len(tuned) > 1
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # (autograd's attention kernel and the inference one differ in the last bits)
        same = torch.equal(model.features(x), frozen.features(x))
    assert same == (tuning != "vpt")  # every method but VPT starts exactly at the frozen model (prompts attend)

    def snapshot():  # effective tensors, masked and LoRA weights included
        return {
            **{n: p.detach().clone() for n, p in model.named_parameters()},
            **{
                f"{n}.effective": getattr(m, k).detach().clone()
                for n, m in model.named_modules()
                for k in getattr(getattr(m, "parametrizations", None), "keys", lambda: [])()
            },
        }

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=5e-4)
    with torch.no_grad():  # zero-initialised branches get a live Up so that every tuned tensor has a gradient
        for name, p in model.named_parameters():
            if re.search(r"(adaptformer|adapter)\.\w+\.up\.weight$|\.adapter\.up\.weight$|\.[qv]_up$", name):
                p.normal_(std=0.1)
    before = snapshot()
    lp.logit_adjusted_loss(model(x), torch.tensor([0, 1, 2, 3, 0, 1]), torch.zeros(4)).backward()
    opt.step()
    after = snapshot()
    for n in before:
        changed = not torch.equal(before[n], after[n])
        should = n in tuned or (n.endswith(".effective") and tuning in ("mask", "lora"))
        assert changed == should, n


def test_lora_parametrization_equals_the_low_rank_update(configs, folder, tiny_model):
    """q and v gain x A B / r (the LIFT+ code's LoRA); k is unchanged."""
    _, _, model = tiny_model(tuning="lora", lora_rank=4)
    blk = model.encoder.visual.transformer.resblocks[0]
    lora = blk.attn.parametrizations.in_proj_weight[0]
    randomize_(lora)
    w0, b = blk.attn.parametrizations.in_proj_weight.original, blk.attn.in_proj_bias
    x = torch.randn(5, 64)
    q, k, v = (x @ blk.attn.in_proj_weight.t() + b).split(64, dim=-1)
    q0, k0, v0 = (x @ w0.t() + b).split(64, dim=-1)
    torch.testing.assert_close(q, q0 + x @ lora.q_down @ lora.q_up / 4, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v0 + x @ lora.v_down @ lora.v_up / 4, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k0, rtol=0, atol=0)


def test_random_mask_trains_exactly_the_chosen_entries(configs, folder, tmp_path, tiny_model):
    cfg, data, model = tiny_model(tuning="mask", mask_ratio=0.05)
    fc = model.encoder.visual.transformer.resblocks[0].mlp.c_fc
    original = fc.parametrizations.weight.original.detach().clone()
    index = fc.parametrizations.weight[0].index
    assert len(index) == round(0.05 * original.numel()) and len(set(index.tolist())) == len(index)
    cfg = dataclasses.replace(cfg, out=str(tmp_path))
    lp.train(cfg, data, model, lp.Job(cfg, data, model))
    changed = (fc.weight.detach() != original).flatten()
    assert changed.any() and set(torch.nonzero(changed).flatten().tolist()) <= set(index.tolist())
    assert torch.equal(
        fc.weight.detach().flatten()[~torch.isin(torch.arange(original.numel()), index)],
        original.flatten()[~torch.isin(torch.arange(original.numel()), index)],
    )
    again = lp.build_model(cfg, data, torch.device("cpu"))  # the same seed draws the same entries
    assert torch.equal(again.encoder.visual.transformer.resblocks[0].mlp.c_fc.parametrizations.weight[0].index, index)


@pytest.mark.parametrize("init", ["class_mean", "linear_probe", "none"])
def test_classifier_inits(configs, folder, init, tiny_model):
    cfg, data, model = tiny_model(init=init)
    w = model.head.weight.detach()
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(4))
    centre = lp.Views(data.train, lp.EvalTransform(32, 32, False))
    if init == "class_mean":  # reference: mean of the frozen features of each class (all <= 100 here)
        feats, ys = lp.extract_features(model, centre, cfg)
        ref = torch.stack([F.normalize(feats[ys == c].mean(0), dim=0) for c in range(4)])
        torch.testing.assert_close(w, ref, rtol=1e-4, atol=1e-5)
    if init == "linear_probe":  # the probe is a stationary point of its objective, and the init is its rows
        feats, ys = lp.extract_features(model, centre, cfg)
        W, b = lp.linear_probe(feats, ys, 4, iters=500)
        # (the init saw the same images in another order, so the 100-step L-BFGS differs in rounding)
        torch.testing.assert_close(
            w, F.normalize(lp.linear_probe(feats, ys, 4)[0], dim=-1).float(), rtol=1e-3, atol=1e-4
        )
        W, b = W.clone().requires_grad_(), b.clone().requires_grad_()
        weights = (len(ys) / (4 * torch.bincount(ys, minlength=4).double()))[ys]  # scikit-learn's 'balanced'
        x = feats.double()
        ((F.cross_entropy(x @ W.t() + b, ys, reduction="none") * weights).sum() + 0.5 * (W * W).sum()).backward()
        assert W.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def table(capsys, *argv) -> str:
    """What `python lift_plus.py table ARGV` prints."""
    capsys.readouterr()
    lp.table_main([str(a) for a in argv])
    return capsys.readouterr().out


def test_zeroshot_and_results_table(configs, folder, tmp_path_factory, capsys):
    other = tmp_path_factory.mktemp("zeroshot_eval")
    _, evaluated = train_run(configs, folder, other, tuning="zeroshot", eval_only=True, run_name="zs")
    assert (other / "zs" / "results_eval_tte3.json").exists()  # zero-shot evaluates without a checkpoint
    tmp_path = tmp_path_factory.mktemp("table")
    cfg, report = train_run(configs, folder, tmp_path, tuning="zeroshot")
    assert report["per_class"] == evaluated["per_class"]
    assert not (tmp_path / cfg.run_name / "checkpoint.pt").exists()  # zero-shot trains nothing
    assert json.loads((tmp_path / cfg.run_name / "results.json").read_text())["train_loss"] == []
    train_run(configs, folder, tmp_path, tuning="classifier", epochs=1)
    lines = table(capsys, tmp_path).splitlines()
    assert len(lines) == 4 and "| zeroshot |" in lines[2] + lines[3] and "| classifier |" in lines[2] + lines[3]
    assert lines[2].count("|") == lines[0].count("|")
    assert f"| {report['overall']:.2f} |" in lines[3 if "zeroshot" in lines[3] else 2]
    classifier = lines[2 if "zeroshot" in lines[3] else 3]
    assert re.search(r"\| \d+ s \| \d+ \|", classifier) and "| - | - |" in lines[3 if "zeroshot" in lines[3] else 2]
    _, other_seed = train_run(configs, folder, tmp_path, tuning="classifier", epochs=1, seed=1)
    first = json.loads(next(tmp_path.glob("*_classifier_seed0/results.json")).read_text())["metrics"]
    seeds = table(capsys, tmp_path, "--seeds").splitlines()  # the two classifier seeds share a row
    assert len(seeds) == 4 and lines[0].count("|") != seeds[0].count("|")
    row = next(x for x in seeds if "| classifier |" in x)
    pair = [first["overall"], other_seed["overall"]]
    assert f"| 0, 1 | {np.mean(pair):.2f} ± {np.std(pair, ddof=1):.2f} |" in row, row
    assert f"| - | {report['overall']:.2f} |" in next(x for x in seeds if "| zeroshot |" in x)


def test_seeds_table_groups_only_runs_that_differ_in_the_seed(tmp_path, capsys):
    """Runs of two CLIPs, or evaluated with and without TTE, are separate settings; seeds of one setting share a row."""
    base = dataclasses.asdict(lp.finalize_config(lp.Config(data="imagenet_lt")))
    runs = {
        "a0": (dict(seed=0), 70.0),
        "a1": (dict(seed=1), 72.0),
        "b0": (dict(seed=0, model="ViT-B-32"), 60.0),
        "c0": (dict(seed=0, tte=False, workers=3), 50.0),
    }
    for name, (over, acc) in runs.items():
        metrics = {"overall": acc, "many": acc, "medium": acc, "few": None}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps({"config": {**base, **over, "run_name": name}, "metrics": metrics})
        )
    rows = table(capsys, tmp_path, "--seeds").splitlines()[2:]
    assert len(rows) == 3
    assert "| 0, 1 | 71.00 ± 1.41 | 71.00 ± 1.41 | 71.00 ± 1.41 | n/a |" in rows[0]
    assert rows[1].endswith("| 0 | 60.00 | 60.00 | 60.00 | n/a |") and "| False | 5 | 0 | 50.00 |" in rows[2]


# ------------------------------------------------------------------------------------------
# Appendix B. Weights and split lists offline
# ------------------------------------------------------------------------------------------


def test_missing_split_lists_offline(tmp_path, configs, monkeypatch):
    monkeypatch.setattr(lp, "online", lambda *a, **k: False)
    cfg = make_cfg(configs, data="places_lt", root=str(tmp_path), cache=str(tmp_path / "cache"))
    with pytest.raises(
        lp.LiftError, match=r"split files not found: Places_LT_train.txt or train.txt, .*classnames.txt.*--splits DIR"
    ):
        lp.build_data(cfg)


def test_offline_pretrained_tag_fails_fast_with_instructions(configs, monkeypatch, tmp_path):
    import time

    monkeypatch.setattr(lp, "online", lambda *a, **k: False)
    monkeypatch.setenv("LIFT_CLIP_CACHE", str(tmp_path))  # an empty weight cache
    cfg = lp.finalize_config(lp.Config(model="ViT-B-32", pretrained="openai"))
    t0 = time.time()
    with pytest.raises(
        lp.LiftError, match=r"--pretrained openai: could not get the weights of ViT-B-32.*--pretrained /path/to/file"
    ):
        lp.load_clip(cfg)
    assert time.time() - t0 < 30


def test_a_vit_pooled_otherwise_than_by_its_class_token_is_refused(tmp_path):
    spec = copy.deepcopy(TINY_VIT)
    spec["vision_cfg"]["pool_type"] = "avg"
    (tmp_path / "AvgViT-test.json").write_text(json.dumps(spec))
    cfg = lp.Config(model=str(tmp_path / "AvgViT-test.json"), pretrained="none")
    with pytest.raises(lp.LiftError, match=r"only CLIP ViTs with class-token pooling and standard blocks"):
        lp.load_clip(cfg)


def test_a_file_of_other_weights_fails_in_one_line(configs, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    cfg = lp.finalize_config(lp.Config(model=str(configs["TinyViT-test"]), pretrained=str(path)))
    with pytest.raises(lp.LiftError, match=r"--pretrained .*other.pt: cannot load it into TinyViT-test \(\w+Error: "):
        lp.load_clip(cfg)


def test_openai_torchscript_release_loads_with_quick_gelu(configs, tmp_path):
    """OpenAI ships ViT-B-16.pt as a TorchScript archive of the CLIP module: it must load (torch.load
    with weights_only refuses such archives), be recognised as OpenAI's, and compute the same function."""
    import open_clip

    name = lp.open_clip_name(str(configs["TinyViT-test"]))
    torch.manual_seed(3)
    ref = open_clip.create_model(name, pretrained=None).eval()
    img, txt = torch.randn(2, 3, 32, 32), open_clip.get_tokenizer(name)(["a photo of a cat.", "a dog"])
    traced = torch.jit.trace(ref, (img, txt), check_trace=False, strict=False)  # a TorchScript CLIP, as OpenAI's
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(traced, str(path))
    cfg = lp.finalize_config(lp.Config(model=str(configs["TinyViT-test"]), pretrained=str(path)))
    assert lp.resolve_clip(cfg)[2] is True  # QuickGELU
    clip, _, _, _ = lp.load_clip(cfg)
    torch.testing.assert_close(clip.encode_image(img), ref.encode_image(img))
    torch.testing.assert_close(clip.encode_text(txt), ref.encode_text(txt))


# ------------------------------------------------------------------------------------------
# Appendix C. The offline world
# ------------------------------------------------------------------------------------------


def test_world_task_is_long_tailed_and_deterministic(world):
    """The task is rendered once into the cache (data/shapes_lt/prepare.py draws it) and read from there."""
    w, spec = lp.world(), lp.world().WORLD
    task = Path(world.cache).expanduser() / "world" / f"task-{w.task_key(spec)}.npz"
    data = lp.build_data(world)
    assert task.is_file() and np.array_equal(data.train.images, w.render_task(spec)["train"])
    g = lp.class_groups(data.train_counts)
    assert min(len(g["many"]), len(g["medium"]), len(g["few"])) > 0
    assert data.train_counts.max() / data.train_counts.min() == spec.imbalance
    assert len(set(data.classnames)) == data.num_classes == spec.num_classes
    assert np.bincount(data.test.labels).tolist() == [spec.test_per_class] * spec.num_classes
    assert data.train.load(0).shape == (3, spec.image_size, spec.image_size)
    concepts = w.world_concepts()[:3]
    a = w.render_images(concepts, spec.task_style, seed=5)
    assert np.array_equal(a, w.render_images(concepts, spec.task_style, seed=5))
    assert not np.array_equal(a, w.render_images(concepts, spec.task_style, seed=6))


def test_world_validation_split_leaves_train_and_test_as_they_were(world, capsys):
    """The validation split is drawn from the test distribution with a seed of its own: the training and test images
    are those that the seeds drew before it existed, and --eval-split val evaluates on it."""
    w, spec = lp.world(), lp.world().WORLD
    data = lp.build_data(world)
    first = [w.world_task_classes(spec)[0]] * 8  # each split's first 8 images (class 0): the draws begin alike
    assert np.array_equal(data.train.images[:8], w.render_images(first, spec.task_style, spec.seed + 1))
    assert np.array_equal(data.test.images[:8], w.render_images(first, spec.task_style, spec.seed + 2))
    assert np.array_equal(data.val.images[:8], w.render_images(first, spec.task_style, spec.seed + 4))
    assert np.bincount(data.val.labels).tolist() == [spec.val_per_class] * spec.num_classes
    assert data.val.images.shape == data.test.images.shape and not np.array_equal(data.val.images, data.test.images)
    model = lp.build_model(world, data, torch.device("cpu"))
    tiny = dataclasses.replace(world, tuning="zeroshot", eval_split="val", tte=False)
    lp.evaluate(tiny, data, model)
    assert "\nval (centre crop)\n" in capsys.readouterr().out


def test_wide_world_differs_only_in_its_sub_types():
    """shapes_lt_wide: the same classes, counts and seeds; each image one of 8 sub-types, in pretraining too; its
    own CLIP (4 times the pretraining images) ships beside the first world's. The first world's key is unchanged."""
    w = lp.world()
    wide = w.WORLDS["shapes_lt_wide"]
    assert wide == dataclasses.replace(
        w.WORLD,
        pretrain_style=dataclasses.replace(w.WORLD.pretrain_style, variants=True),
        task_style=dataclasses.replace(w.WORLD.task_style, variants=True),
        pretrain_images=4 * w.WORLD.pretrain_images,
    )
    assert w.world_task_classes(wide) == w.world_task_classes(w.WORLD)
    assert w.world_key(wide) != w.world_key(w.WORLD) and w.task_key(wide) != w.task_key(w.WORLD)
    packed = torch.load(w.SHIPPED_CLIPS["shapes_lt_wide"], weights_only=True)
    assert packed["key"] == w.world_key(wide), "assets/world_clip_wide.pt is stale: see data/shapes_lt/prepare.py"
    concept = [w.world_concepts()[0]] * 64
    plain, varied = (w.render_images(concept, s.task_style, seed=1) for s in (w.WORLD, wide))
    assert varied.reshape(64, -1).std(0).mean() > plain.reshape(64, -1).std(0).mean()  # a wider class


def test_world_pretraining_is_cached_and_reused(tmp_path, monkeypatch, capsys):
    w = lp.world()
    small = dataclasses.replace(w.WORLD, pretrain_images=512, pretrain_epochs=1)
    monkeypatch.setitem(w.WORLDS, "shapes_lt", small)
    cfg = lp.finalize_config(lp.Config(data="shapes_lt", cache=str(tmp_path)))
    assert cfg.model.endswith(".json") and not Path(cfg.pretrained).exists()
    lp.build_data(cfg)
    assert Path(cfg.pretrained).is_file() and "pretrained the world's CLIP" in capsys.readouterr().out
    assert Path(cfg.pretrained).parent == tmp_path / "world" / w.world_key(small)
    stamp = Path(cfg.pretrained).stat().st_mtime_ns
    again = lp.finalize_config(lp.Config(data="shapes_lt", cache=str(tmp_path)))
    lp.build_data(again)
    assert (again.model, again.pretrained) == (cfg.model, cfg.pretrained)
    assert Path(again.pretrained).stat().st_mtime_ns == stamp and "pretrain" not in capsys.readouterr().out
    assert w.world_key(dataclasses.replace(small, pretrain_epochs=2)) != w.world_key(
        small
    )  # another world, another key


def test_world_clip_ships_with_the_project(tmp_path, monkeypatch, capsys):
    """A cold cache takes the shipped file (no pretraining): the packed fp16 weights plus the token embedding of
    the seed's init, which pretraining never changes."""
    w = lp.world()
    packed = torch.load(lp.world().SHIPPED_CLIPS["shapes_lt"], weights_only=True)
    assert packed["key"] == w.world_key(w.WORLD), "assets/world_clip.pt is stale: run data/shapes_lt/prepare.py"
    assert "token_embedding.weight" not in packed["state"] and {v.dtype for v in packed["state"].values()} == {
        torch.float16
    }
    cfg = lp.finalize_config(lp.Config(data="shapes_lt", cache=str(tmp_path)))
    lp.build_data(cfg)
    assert "pretrain" not in capsys.readouterr().out
    state = torch.load(cfg.pretrained, weights_only=True)
    name = lp.open_clip_name(cfg.model)
    fresh = w.random_clip(name, w.WORLD.seed).state_dict()
    assert state.keys() == fresh.keys() and torch.equal(
        state["token_embedding.weight"], fresh["token_embedding.weight"]
    )
    assert not torch.equal(state["visual.conv1.weight"], fresh["visual.conv1.weight"])
    assert all(torch.equal(state[k], v.float()) for k, v in packed["state"].items())


def world_clip_predictions(packed: dict, tmp_path: Path, name: str) -> np.ndarray:
    """Zero-shot predictions of a packed world CLIP on the world's test images (TTE, as the quick start)."""
    cfg = lp.finalize_config(lp.Config(data="shapes_lt", tuning="zeroshot", workers=0, device="cpu", out=str(tmp_path)))
    model_name, data = lp.open_clip_name(cfg.model), lp.build_data(cfg)
    torch.save(lp.world().unpack_world_clip(packed, model_name, lp.world().WORLD.seed), tmp_path / f"{name}.pt")
    run = dataclasses.replace(cfg, pretrained=str(tmp_path / f"{name}.pt"), run_name=name)
    return lp.evaluate(run, data, lp.build_model(run, data, torch.device("cpu")))["predictions"]


def check_regenerated(fresh: dict, shipped: dict, tmp_path: Path) -> str:
    """The stated tolerance of a regenerated world CLIP. On a CPU that rounds as the one that wrote the shipped
    file, every tensor is bit-identical. Another CPU may round a few float sums differently and training
    amplifies it, so there the tolerance is on the function: the zero-shot predictions of the two CLIPs agree
    on at least 97 % of the task's test images. Returns which of the two held; fails if neither did."""
    assert fresh["key"] == shipped["key"] and fresh["state"].keys() == shipped["state"].keys()
    if all(torch.equal(fresh["state"][k], v) for k, v in shipped["state"].items()):
        return "bit-identical"
    ours, theirs = (
        world_clip_predictions(fresh, tmp_path, "fresh"),
        world_clip_predictions(shipped, tmp_path, "shipped"),
    )
    agree = float(np.mean(ours == theirs))
    assert agree >= 0.97, (
        f"the regenerated world CLIP agrees with the shipped one on {100 * agree:.1f} % of test images"
    )
    return f"agrees on {100 * agree:.1f} % of test images"


def test_world_clip_regenerates(tmp_path):
    """The shipped CLIP is what the project's own pretraining makes: pretrain again and compare."""
    cfg = lp.finalize_config(lp.Config(data="shapes_lt"))
    fresh = lp.world().ship_world_clip(lp.open_clip_name(cfg.model), tmp_path / "world_clip.pt")
    print(check_regenerated(fresh, torch.load(lp.world().SHIPPED_CLIPS["shapes_lt"], weights_only=True), tmp_path))


def test_world_clip_tolerance_path(tmp_path):
    """Both branches of check_regenerated run on every machine: a CLIP one float ulp away in one tensor takes
    the tolerance path and passes; one with a damaged tensor fails it."""
    shipped = torch.load(lp.world().SHIPPED_CLIPS["shapes_lt"], weights_only=True)
    assert check_regenerated(copy.deepcopy(shipped), shipped, tmp_path) == "bit-identical"
    nudged = copy.deepcopy(shipped)
    w = nudged["state"]["visual.proj"]
    nudged["state"]["visual.proj"] = (w.view(torch.int16) + 1).view(torch.float16)  # the next fp16 value
    assert not torch.equal(nudged["state"]["visual.proj"], w)
    assert check_regenerated(nudged, shipped, tmp_path).startswith("agrees on")
    damaged = copy.deepcopy(shipped)
    damaged["state"]["visual.proj"] = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)).half() * w.std()
    with pytest.raises(AssertionError, match="agrees with the shipped one on"):
        check_regenerated(damaged, shipped, tmp_path)


def test_world_zero_shot_beats_chance(world, tmp_path):
    """The pretrained world CLIP recognises the downstream classes from their names alone."""
    cfg = lp.finalize_config(lp.dataclasses.replace(world, tuning="zeroshot", out=str(tmp_path), run_name=None))
    report = fit_and_evaluate(cfg)
    assert report["overall"] > 3 * 100.0 / lp.world().WORLD.num_classes, report["overall"]


def test_dial_of_alignment_keeps_the_clip_and_moves_zero_shot(world, tmp_path, capsys):
    """The dial's levels share shapes_lt's CLIP (no pretraining runs) and its classes; level 4 is shapes_lt itself.
    The task drawn and named as pretraining draws and names it (level 0) is the one the CLIP knows best."""
    w, zero_shot = lp.world(), {}
    assert w.DIAL["shapes_lt_dial4"] == w.WORLD
    for level in ("shapes_lt_dial0", "shapes_lt_dial4"):
        assert w.world_key(w.DIAL[level]) == w.world_key(w.WORLD)
        fields = dict(data=level, tuning="zeroshot", out=str(tmp_path), run_name=None, tte=False, expand=None)
        cfg = lp.finalize_config(dataclasses.replace(world, **fields))
        zero_shot[level] = fit_and_evaluate(cfg)["overall"]
        assert cfg.pretrained == world.pretrained and "pretrained the world's CLIP" not in capsys.readouterr().out
    assert zero_shot["shapes_lt_dial0"] > zero_shot["shapes_lt_dial4"] + 10, zero_shot


def notebook_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_tutorial_notebook_runs_offline(world, monkeypatch):
    """tutorial.ipynb top to bottom in its quick pass (QUICK, one epoch, one world, a short list of methods; the full
    run takes 31.5 to 49 minutes, by machine): any cell error fails the test. The saved notebook must hold the
    outputs of a full run. Without a GPU the real-CLIP section says that it is skipped, in one sentence."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(HERE / "tutorial.ipynb", as_version=4)
    full = "over seeds (0, 1, 2)"
    assert full in notebook_text(nb) and "QUICK = False" in nb.cells[1].source, "tutorial.ipynb: run it in full"
    monkeypatch.setenv("LIFT_TUTORIAL_SMOKE", "1")
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    printed = notebook_text(nb)
    for label in (
        "tuned parameters, % of the image encoder",
        "the grid's centre (not chosen on validation)",
        "--data shapes_lt_wide",
        "classifier, random init",
        "LoRA",
        "minus it:",
        "loss gap change against Few accuracy change",
        "few-many",
        "Few gap",
        "--data shapes_lt_dial0",
        "full minus LIFT+, paired by seed",
        "centre of 35 (1 view)",
    ):
        assert label in printed, label
    assert full not in printed  # the quick pass
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures >= 7  # the quick pass draws one world
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    if not torch.cuda.is_available():
        assert last == "Skipped: this section trains CLIP ViT-B/16 and needs a GPU; this machine has none.\n"


def notebook_cell(nb, first_line: str) -> str:
    """The source of the notebook's one code cell that starts with first_line."""
    (source,) = [c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith(first_line)]
    return source


def write_cifar100(root: Path, train_per_class=3, test_per_class=2):
    """CIFAR-100 as torchvision reads it: cifar-100-python/{train,test,meta}, pickled dicts with the real files' keys,
    each image a uint8 row of 3072 values (its red, green and blue 32 x 32 planes), class c of colour c."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    palette = np.random.RandomState(0).randint(0, 256, (100, 3))
    for split, n, seed in (("train", train_per_class, 1), ("test", test_per_class, 2)):
        labels = np.tile(np.arange(100), n)  # the classes interleaved, as in the real files
        noise = np.random.RandomState(seed).randint(-40, 40, (len(labels), 3, 32, 32))
        images = np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8).reshape(-1, 3072)
        entry = {
            "filenames": [f"{split}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{split} batch 1 of 1",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": images,
        }
        (d / split).write_bytes(pickle.dumps(entry, protocol=2))
    names = {"fine_label_names": [f"c{c}" for c in range(100)], "coarse_label_names": [f"s{c}" for c in range(20)]}
    (d / "meta").write_bytes(pickle.dumps(names, protocol=2))


@pytest.mark.parametrize("task", ["cifar100_ir100", "imagenet_lt"])
def test_tutorial_real_clip_section_runs_on_the_cpu(task, configs, tmp_path, monkeypatch, capsys):
    """tutorial.ipynb's section 10, real_clip, on the CPU with the tiny random-weight ViT: the setup cell in its quick
    pass (one epoch, one seed) but QUICK off, so each lr is chosen on validation wherever real_clip would choose it.
    CIFAR-100 in torchvision's own format (only torchvision's md5 check is bypassed: its sums are the real files')
    has no validation split: each method runs at its default lr. A miniature ImageNet-LT with its val list: each lr
    is chosen on it. --check comes first: a missing image stops the section before anything trains."""
    import nbformat
    import torchvision

    nb = nbformat.read(HERE / "tutorial.ipynb", as_version=4)
    monkeypatch.setenv("LIFT_TUTORIAL_SMOKE", "1")
    monkeypatch.chdir(HERE)
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the notebook's run folders (OUT)
    monkeypatch.setattr(lp, "online", lambda host: False)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    ns = {"__name__": "tutorial"}
    exec(notebook_cell(nb, "# Setup: every helper of the notebook."), ns)
    exec(notebook_cell(nb, "# Section 10: real_clip"), ns)
    assert ns["L"] is lp and ns["SMOKE"] and ns["SEEDS"] == (0,)
    ns["QUICK"] = False

    root = tmp_path / "data"
    methods = {"classifier": "classifier", "LIFT+ (AdaptFormer)": "adaptformer", "full": "full"}  # label: --tuning
    real = dict(
        data=task,
        root=str(root),
        model=str(configs["TinyViT-test"]),
        pretrained="none",
        device="cpu",
        workers=0,
        batch_size=32,
        eval_batch_size=64,
        cache=str(tmp_path / "cache"),
    )
    if task == "cifar100_ir100":
        write_cifar100(root)  # 3 training images a class: fewer than cifar100_ir100 keeps of any class, all kept
        counts, trained = "300 training, 0 validation, 200 test images", 3
    else:
        write_benchmark(root)
        (root / "ImageNet_LT_val.txt").write_text("test/n00/1.JPEG 0\ntest/n01/1.JPEG 1\ntest/n02/1.JPEG 2\n")
        counts, trained = "10 training, 3 validation, 6 test images", 9  # per method: a grid of 3 lrs, one seed
        (root / "train/n02/0.JPEG").rename(tmp_path / "moved.JPEG")
        with pytest.raises(lp.LiftError, match=r"^1 of the 10 train images are missing, e.g. .*train/n02/0.JPEG$"):
            ns["real_clip"](real)
        assert ns["RUNS"] == {} and capsys.readouterr().out == ""  # nothing trained, no cost line
        (tmp_path / "moved.JPEG").rename(root / "train/n02/0.JPEG")

    S = ns["real_clip"](real)
    out = capsys.readouterr().out
    assert f"--data {task}: {counts}; {trained} training runs of 1 epochs: at least " in out, out
    assert list(S) == list(methods) and ("validation Overall by lr" in out) == (task == "imagenet_lt"), out
    for label, tuning in methods.items():
        centre = lp.finalize_config(lp.Config(data=task, tuning=tuning)).lr  # lift_plus's default
        if task == "cifar100_ir100":
            centred = rf"^  {re.escape(label)} +lr {centre:g}, the grid's centre \(not chosen on validation\)"
            assert re.search(centred, out, re.M), out
            assert S[label]["lr"] == centre
        else:
            chosen = re.search(rf"^  {re.escape(label)} +validation Overall by lr (.*) -> lr ([^,\s]+)", out, re.M)
            val = {lr: float(v) for lr, v in (item.split(": ") for item in chosen[1].split(", "))}
            assert {f"{centre * f:g}" for f in (0.25, 1, 4)} <= set(val) and len(val) <= 6, out
            assert chosen[2] == f"{S[label]['lr']:g}" and val[chosen[2]] == max(val.values()), out
        assert len(S[label]["runs"]) == 1
    number = r"\d+\.\d\d"
    for label in ("zero-shot", *methods):  # Overall and Few have test images in both tasks
        assert re.search(rf"^{re.escape(label)} +{number} +(\S+ +){{2}}{number} *$", out, re.M), out
    frozen = re.search(r"^  the frozen encoder \(classifier alone\): Few accuracy (.*)$", out, re.M)
    assert frozen and "nan" not in frozen[1] and re.search(r"^  minus it: +Few acc +-> Many", out, re.M), out
    for label in ("LIFT+ (AdaptFormer)", "full"):
        line = re.search(rf"^  {re.escape(label)} *[+-]{number} .*$", out, re.M)
        assert line and "nan" not in line[0] and len(line[0].split()) == len(label.split()) + 9, out


# ------------------------------------------------------------------------------------------
# Appendix D. Speed: each fast path equals the taught one
# ------------------------------------------------------------------------------------------


def assert_same_forward_and_gradients(model, other, x, atol=1e-6):
    """`other` computes `model`'s logits on x, and the same gradients of a loss on them."""
    a, b = model(x), other(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in other.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=atol)


def test_lean_quick_gelu_matches_autograd():
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lp.LeanQuickGELU(), (x,))
    y = lp.LeanQuickGELU()(x)
    ref = x * torch.sigmoid(1.702 * x)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("tuning", ["adaptformer", "adapter", "lora", "vpt", "mask"])
def test_fast_path_equals_the_taught_forward_and_gradients(configs, folder, tuning, tiny_model):
    sizes = {
        "adaptformer": dict(adapter_dim=4),
        "adapter": dict(adapter_dim=4),
        "lora": dict(lora_rank=4),
        "mask": dict(mask_ratio=0.3),
    }.get(tuning, {})
    _, _, fast = tiny_model(tuning=tuning, **sizes)
    _, _, plain = tiny_model(tuning=tuning, fast=False, **sizes)
    assert isinstance(fast.encoder, lp.FastViT) and not isinstance(plain.encoder, lp.FastViT)
    assert any(isinstance(m, lp.LeanQuickGELU) for m in fast.modules())
    assert not any(isinstance(m, lp.LeanQuickGELU) for m in plain.modules())
    randomize_(fast.encoder)
    plain.load_state_dict(fast.state_dict())
    assert_same_forward_and_gradients(plain, fast, torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))


def test_cached_features_train_the_classifier_as_the_backbone_would(configs, folder, tmp_path, monkeypatch):
    """--cache-features runs the frozen backbone once; training on the cached features equals
    running the backbone every step on the same fixed views."""
    cfg, cached = train_run(configs, folder, tmp_path / "a", tuning="classifier", cache_features=True, epochs=3)

    class FixedViews(lp.EvalTransform):  # what --cache-features trains on, recomputed every step
        def __init__(self, size, *args):
            super().__init__(size, size, False)

    monkeypatch.setattr(lp, "MDATransform", FixedViews)
    _, direct = train_run(configs, folder, tmp_path / "b", tuning="classifier", epochs=3)
    a = torch.load(tmp_path / "a" / cfg.run_name / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / cfg.run_name / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(a["tuned"]["head.weight"], b["tuned"]["head.weight"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    assert cached["per_class"] == direct["per_class"]


def jpeg_path_files(folder: Path) -> list:
    """A mixed folder: plain, progressive and greyscale JPEGs (decoded by nvJPEG), and the CPU's cases: a PNG, a
    CMYK JPEG and an EXIF-rotated one."""
    pil, exif = natural_image(), Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    pil.save(folder / "plain.jpg", quality=90)
    pil.transpose(Image.Transpose.TRANSPOSE).save(folder / "tall.jpeg", quality=85)
    pil.save(folder / "progressive.jpg", quality=90, progressive=True)
    pil.convert("L").save(folder / "grey.jpg", quality=90)
    pil.save(folder / "image.png")
    pil.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    pil.save(folder / "rotated.jpg", quality=90, exif=exif.tobytes())
    return [
        str(folder / n)
        for n in ("plain.jpg", "tall.jpeg", "progressive.jpg", "grey.jpg", "image.png", "cmyk.jpg", "rotated.jpg")
    ]


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision's decoder
@pytest.mark.parametrize("views", ["mda", "tte", "centre"])
def test_gpu_jpeg_path_gives_the_cpu_paths_boxes_and_views(tmp_path, monkeypatch, views):
    """--gpu-decode's code path run on the CPU (torchvision's CPU decoder standing in for nvJPEG): the workers hand
    over the JPEGs' bytes and the CPU's cases' views, and a mixed batch comes back in order with the CPU path's views
    (float resize: within 2 levels, 0.3 on average), through DataLoader workers, in one decoder call; a batch the
    decoder refuses is read by read_image, as without --gpu-decode."""
    paths = jpeg_path_files(tmp_path)
    transform = {
        "mda": lp.MDATransform(224, 5, "convex", 0.08, seed=3),
        "tte": lp.EvalTransform(224, 248, True),
        "centre": lp.EvalTransform(224, 256, False),
    }[views]
    transform.epoch = 1
    order = [6, 0, 4, 1, 5, 2, 3]  # any order of the base set
    cpu = lp.Views(lp.ImageSet(paths, [10, 11, 12, 13, 14, 15, 16]), transform, order)
    cfg = lp.finalize_config(lp.Config(data="imagenet_lt", gpu_decode=True))
    gpu, collate = lp.gpu_jpeg_views(cpu, cfg, torch.device("cuda"))  # chosen only, nothing runs on a GPU
    assert isinstance(gpu, lp.JpegViews) and len(gpu) == len(cpu)
    in_memory = lp.Views(lp.ImageSet(np.zeros((2, 8, 8, 3), np.uint8), [0, 1]), transform)
    no_jpeg = lp.Views(lp.ImageSet(paths[4:5], [0]), transform)  # the PNG alone
    for dataset, c, device in [
        (cpu, cfg, "cpu"),
        (cpu, dataclasses.replace(cfg, gpu_decode=False), "cuda"),
        (in_memory, cfg, "cuda"),
        (no_jpeg, cfg, "cuda"),
    ]:
        assert lp.gpu_jpeg_views(dataset, c, torch.device(device)) == (dataset, None)
    items = [gpu[i] for i in range(len(gpu))]
    assert [isinstance(x, tuple) for x, _ in items] == [False, True, False, True, False, True, True]
    for (x, y), i in zip(items, order):
        assert y == 10 + i
        if isinstance(x, tuple):
            assert x == (Path(paths[i]).read_bytes(), paths[i], i)
    ref = torch.stack([cpu[i][0] for i in range(len(cpu))])  # [B, V, 3, S, S]
    batch, labels = collate(items)
    assert labels.tolist() == [10 + i for i in order]
    from torchvision import io as tvio

    real, calls = tvio.decode_jpeg, []

    def counted(data, **kw):
        calls.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(tvio, "decode_jpeg", counted)
    out = batch.decode("cpu")
    assert out.shape == ref.shape and out.dtype == torch.uint8
    diff = (out.int() - ref.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.3, (diff.max(), diff.float().mean())
    assert torch.equal(out[[0, 2, 4]], ref[[0, 2, 4]])  # the CPU's cases: made by the worker
    assert calls == [4]  # one call for the batch's four JPEGs
    loader = torch.utils.data.DataLoader(
        gpu, batch_sampler=lp.ShardedBatches(list(range(len(gpu))), 4), num_workers=2, collate_fn=collate
    )
    assert torch.equal(torch.cat([b.decode("cpu") for b, _ in loader]), out)

    def refused(data, **kw):
        calls.append(len(data))
        raise RuntimeError("nvJPEG refuses")

    monkeypatch.setattr(tvio, "decode_jpeg", refused)
    calls.clear()
    pil = batch.decode("cpu")  # read_image (PIL's pixels), the same float resize
    diff = (pil.int() - ref.int()).abs()
    assert calls == [4] and diff.max() <= 2 and diff.float().mean() < 0.3
    assert torch.equal(pil[[0, 2, 4]], ref[[0, 2, 4]])


def test_compiled_model_equals_eager_and_training_warms_it_up(configs, folder, tmp_path, monkeypatch, tiny_model):
    """--compile: torch.compile's forward, backward and no-grad forward equal eager's (fp32, CPU); train compiles
    before its first step, for each batch size it will see (50 images in batches of 8: 8 and 2)."""
    cfg, _, model = tiny_model()
    randomize_(model.encoder.adaptformer)
    compiled = copy.deepcopy(model)
    compiled.compile(dynamic=False)
    lp.compile_warmup(compiled, {3}, None)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert_same_forward_and_gradients(model, compiled, x, atol=1e-5)
    model.eval()
    compiled.eval()
    with torch.no_grad():
        views = x[:2, None]  # [2, 1, 3, S, S]
        torch.testing.assert_close(lp.tte_logits(compiled, views), lp.tte_logits(model, views), rtol=1e-5, atol=1e-5)
    warmed = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: warmed.append("compiled"))  # eager, to be quick
    monkeypatch.setattr(lp, "compile_warmup", lambda model, sizes, dtype: warmed.append(sorted(sizes)))
    train_run(configs, folder, tmp_path, compile=True, epochs=1)
    assert warmed == ["compiled", [2, 8]]


# ------------------------------------------------------------------------------------------
# Appendix E and Part II. Input checks: flags, combinations
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        (dict(lr=float("nan")), "--lr: expected a number > 0, got nan"),
        (dict(lr=float("inf")), "--lr: expected a number > 0, got inf"),
        (dict(batch_size=0), "--batch-size: expected an integer >= 1, got 0"),
        (dict(momentum=1.0), r"--momentum: expected a number in \[0, 1\), got 1.0"),
        (dict(min_scale=0.0), r"--min-scale: expected a number in \(0, 1\], got 0.0"),
        (dict(tau=-1.0), "--tau: expected a number >= 0, got -1.0"),
        (dict(workers=-1), "--workers: expected an integer >= 0, got -1"),
        (dict(loss="focal"), "--loss: expected one of la, ce, got 'focal'"),
        (dict(prompt="a photo"), r"--prompt 'a photo': the template needs \{\} where the class name goes"),
        (dict(lora_rank=4), "--lora-rank applies to --tuning lora only, not --tuning adaptformer"),
        (dict(tuning="adaptformer", cache_features=True), "--cache-features applies to --tuning classifier only"),
        (dict(checkpoint="x.pt"), "--checkpoint: read by --eval-only only; to continue a training run use --resume"),
        (dict(loss="ce", tau=2.0), r"--tau: --loss ce has no logit adjustment \(use --loss la\)"),
        (dict(tte=False, expand=8), "--expand: --no-tte resizes to S \\+ S // 7 and takes the centre crop"),
        (dict(mda="max", min_scale=0.3), "--min-scale: --mda max crops the largest square every epoch"),
        (dict(init="class_mean", prompt="a {}"), "--prompt: --init class_mean uses no prompt"),
        (dict(amp="bf16", device="cpu"), "--amp bf16: mixed precision runs on GPUs only"),
        (dict(eval_only=True, checkpoint="x.pt", resume="yes"), "--resume: --eval-only trains nothing to continue"),
        (
            dict(eval_only=True, checkpoint="x.pt", run_name="r"),
            "--out / --run-name: --eval-only writes its results beside --checkpoint",
        ),
        (dict(data="shapes_lt", splits="/tmp"), "--splits: --data shapes_lt has no split lists"),
        (dict(data="/some/folder", root="/data"), "--root: --data /some/folder needs no image root"),
        (dict(tuning="classifier", blocks="0-3"), "--blocks: --tuning classifier tunes no vision blocks by index"),
        (dict(seed=-1), "--seed: expected an integer in \\[0, 2147483647\\], got -1"),
        (dict(eval_only=True), r"--eval-only: needs --checkpoint FILE"),
        (dict(tuning="zeroshot", init="class_mean"), "--init class_mean: zero-shot classifies with the text prompts"),
    ],
)
def test_every_flag_is_checked_before_anything_runs(flags, message):
    with pytest.raises(lp.LiftError, match=message):
        lp.finalize_config(lp.Config(**{"data": "imagenet_lt", **flags}))


def test_results_json_is_strict(configs, folder, tmp_path):
    """A group without test images is null in results.json, never NaN (which strict JSON readers refuse); a
    report that holds NaN is a bug, refused before anything is written."""
    cfg, report = train_run(configs, folder, tmp_path, tuning="zeroshot")
    text = (tmp_path / cfg.run_name / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["many"] is None and results["metrics"]["many"] is None and '"many": null' in text  # no class > 100
    data, model = lp.fit(cfg)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        lp.write_results(cfg, data, model, {**report, "few": float("nan")})


# ------------------------------------------------------------------------------------------
# Appendix E and Part II. Image decoding, folders and lists, resume, the run folder, exits
# ------------------------------------------------------------------------------------------


def png_16bit_rgb(path: Path, a: np.ndarray):
    """A 16-bit RGB PNG written by hand (PIL cannot write one): a is uint16 [H, W, 3]."""
    import struct
    import zlib

    H, W, _ = a.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(H))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_jpeg_decoding_equals_pil_without_exif_rotation(tmp_path, monkeypatch):
    """The fast JPEG path (TorchCodec) gives PIL's pixels, and a JPEG with an EXIF rotation is read as PIL
    and the LIFT+ code read it: not rotated."""
    torchcodec, decoded = lp.torchcodec_jpeg(), []
    assert torchcodec is not None  # the pinned install has TorchCodec

    def counted(raw, **kw):
        decoded.append(raw)
        return torchcodec(raw, **kw)

    monkeypatch.setattr(lp, "torchcodec_jpeg", lambda: counted)
    pil = natural_image(60, 80)
    pil.save(tmp_path / "plain.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    pil.save(tmp_path / "rotated.jpg", quality=90, exif=exif.tobytes())
    Image.fromarray(np.asarray(pil)[..., 0]).save(tmp_path / "gray.jpg", quality=90)
    for name in ("plain.jpg", "rotated.jpg", "gray.jpg"):
        ref = torch.from_numpy(np.array(Image.open(tmp_path / name).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(lp.read_image(tmp_path / name), ref), name
    assert decoded == [(tmp_path / name).read_bytes() for name in ("plain.jpg", "gray.jpg")]  # PIL reads the rotated


def test_every_image_mode_decodes_to_the_right_rgb_or_is_refused(tmp_path):
    rng = np.random.RandomState(0)
    rgb = rng.randint(0, 256, (12, 16, 3)).astype(np.uint8)

    def read(name):
        return lp.read_image(tmp_path / name).permute(1, 2, 0).numpy().astype(int)

    # 16-bit grayscale: scaled to 8 bits, not clipped at 255 (PIL's convert('RGB') clips)
    g16 = rng.randint(0, 65536, (12, 16)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    ref = np.round(g16 / 257.0).astype(int)
    assert np.abs(read("g16.png") - ref[..., None]).max() == 0
    # 16-bit RGB: within one level of x / 257
    c16 = rng.randint(0, 65536, (12, 16, 3)).astype(np.uint16)
    png_16bit_rgb(tmp_path / "c16.png", c16)
    assert np.abs(read("c16.png") - c16 / 257.0).max() <= 1.0
    # palette with transparency: the palette colours, without PIL's warning
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png", transparency=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read("p.png")
    assert np.array_equal(out, np.asarray(pal.convert("RGB")).astype(int))
    # grayscale with alpha: the grey level in all three channels
    Image.fromarray(np.stack([rgb[..., 0], rgb[..., 1]], -1), "LA").save(tmp_path / "la.png")
    assert np.array_equal(read("la.png"), np.repeat(rgb[..., :1], 3, axis=2).astype(int))
    # CMYK JPEG (libjpeg-turbo and PIL agree)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert np.array_equal(read("cmyk.jpg"), np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB")).astype(int))
    # multi-frame GIF and TIFF: the first frame
    frames = [Image.fromarray(np.full((12, 16, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "multi.tiff", save_all=True, append_images=frames[1:])
    assert read("anim.gif").max() < 100 and read("multi.tiff").max() == 10
    # truncated files and samples without an 8-bit range: one line naming the file
    Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=95)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    Image.fromarray(rgb).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    Image.fromarray(rng.rand(12, 16).astype(np.float32)).save(tmp_path / "float.tiff")
    for name, why in (
        ("cut.jpg", "(?i)truncated"),
        ("cut.png", ""),
        ("float.tiff", "floating-point samples have no 8-bit range"),
    ):
        with pytest.raises(lp.LiftError, match=rf"cannot read image .*{name}: (?i:.*{why.replace('(?i)', '')})"):
            lp.read_image(tmp_path / name)


def test_folder_layouts_are_handled_and_reported(tmp_path, configs):
    root = tmp_path / "task"
    write_images(root / "train", [5, 3], seed=0)
    write_images(root / "test", [2, 0], seed=1)
    (root / "test" / "class_1").rmdir()  # class_1: training images, no test images
    nested = root / "train" / "class_0" / "more" / "deeper"
    nested.mkdir(parents=True)
    (root / "train" / "class_0" / "0.png").rename(nested / "0.png")  # nested subfolders count
    for hidden in (
        root / "train" / ".ipynb_checkpoints",
        root / "train" / "__MACOSX",
        root / "train" / "class_1" / ".cache",
    ):
        hidden.mkdir()
        (hidden / "x.png").write_bytes((root / "train" / "class_1" / "0.png").read_bytes())
    (root / "train" / "class_1" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "class_1" / "notes.txt").write_text("not an image")
    (root / "train" / "class_1" / "link.png").symlink_to(root / "train" / "class_1" / "0.png")
    (root / "train" / "class_1" / "loop").symlink_to(root / "train" / "class_1")  # a folder link back: followed once
    (root / "train" / "loose.png").write_bytes((root / "train" / "class_1" / "0.png").read_bytes())  # not in a class
    odd = os.fsdecode(b"caf\xe9.png")  # a file name that is not UTF-8
    (root / "train" / "class_1" / "1.png").rename(root / "train" / "class_1" / odd)
    data = lp.build_data(make_cfg(configs, data=str(root)))
    assert data.classnames == ["class_0", "class_1"]
    assert data.train_counts.tolist() == [5, 4]  # 3 + the link; hidden, loop and text skipped
    assert torch.is_tensor(data.train.load(data.train.images.index(str(root / "train" / "class_1" / odd))))
    summary = lp.summarize_data(data, "task")
    assert "note: 1 files without an image extension skipped" in summary
    assert "note: 4 hidden or tool entries skipped" in summary  # .ipynb_checkpoints, __MACOSX, .cache, .DS_Store
    assert "note: 1 classes have no test image (no accuracy for them; left out of the group means)" in summary
    assert "note: 1 files outside class folders skipped" in summary
    class_1 = [path for path, y in zip(data.train.images, data.train.labels) if y == 1]
    assert lp.image_files(root / "train" / "class_1") == class_1  # predict lists a folder as a class folder
    os.mkdir(root / "test" / "class_9")
    with pytest.raises(lp.LiftError, match=r"class 'class_9' has no training folder"):
        lp.build_data(make_cfg(configs, data=str(root)))
    os.rmdir(root / "test" / "class_9")
    os.mkdir(root / "train" / "class_2")
    (root / "train" / "class_2" / "notes.txt").write_text("not an image")
    with pytest.raises(lp.LiftError, match=r"train: class folders without images: class_2$"):
        lp.build_data(make_cfg(configs, data=str(root)))
    os.rename(root / "train" / "class_2", root / "train" / os.fsdecode(b"r\xe9sum\xe9"))
    with pytest.raises(lp.LiftError, match=r"is not UTF-8; rename it"):
        lp.build_data(make_cfg(configs, data=str(root)))
    with pytest.raises(lp.LiftError, match=r"--data: unknown dataset '.*train'; expected .* a folder with train/"):
        lp.build_data(make_cfg(configs, data=str(root / "train")))  # no train/ and test/ inside
    write_images(tmp_path / "bare" / "train", [1], seed=0)
    (tmp_path / "bare" / "test" / "class_0").mkdir(parents=True)
    with pytest.raises(lp.LiftError, match=r"test: no images \(\.jpg .*\) in class folders"):
        lp.build_data(make_cfg(configs, data=str(tmp_path / "bare")))


def test_split_list_repeats_and_conflicts(tmp_path, configs):
    write_benchmark(tmp_path)
    lines = (tmp_path / "ImageNet_LT_train.txt").read_text().splitlines()
    (tmp_path / "ImageNet_LT_train.txt").write_text("\n".join(lines + lines[:2]) + "\n")  # two repeated lines
    test_lines = (tmp_path / "ImageNet_LT_test.txt").read_text().splitlines()
    (tmp_path / "ImageNet_LT_test.txt").write_text("\n".join(test_lines + [lines[-1]]) + "\n")  # a training image
    data = lp.build_data(make_cfg(configs, data="imagenet_lt", root=str(tmp_path), cache=str(tmp_path / "c")))
    summary = lp.summarize_data(data, "imagenet_lt")
    assert data.train_counts[:3].tolist() == [8, 3, 1]  # kept, as listed (and as the LIFT+ code reads it)
    assert "note: 2 train entries repeat an earlier entry of the same image and label (kept, as listed)" in summary
    assert "note: 1 test images are also training images" in summary
    assert "note: 997 classes have no training image" in summary
    path, label = lines[0].split()
    (tmp_path / "ImageNet_LT_train.txt").write_text("\n".join(lines + [f"{path} 2"]) + "\n")
    data = lp.build_data(make_cfg(configs, data="imagenet_lt", root=str(tmp_path), cache=str(tmp_path / "c")))
    with pytest.raises(lp.LiftError, match=rf"train image .*{path} is listed under two labels, 0 and 2"):
        lp.summarize_data(data, "imagenet_lt")


def test_resume_refuses_changed_settings_and_nothing_to_resume(configs, folder, tmp_path):
    cfg, _ = train_run(configs, folder, tmp_path, epochs=2)
    with pytest.raises(
        lp.LiftError,
        match=r"--resume: .*checkpoint.pt was written with other settings \(--epochs 2 -> 3; --lr 0.02 -> 0.05\)",
    ):
        train_run(configs, folder, tmp_path, epochs=3, lr=0.05, resume="yes")
    with pytest.raises(lp.LiftError, match=r"--resume: .*other holds no checkpoint.pt to continue; drop --resume"):
        train_run(configs, folder, tmp_path, epochs=2, resume="yes", run_name="other")
    # the same run resumed with run-only changes: allowed, and the files agree on the settings
    _, again = train_run(configs, folder, tmp_path, epochs=2, resume="yes", log_every=1, eval_batch_size=4)
    results = json.loads((tmp_path / cfg.run_name / "results.json").read_text())
    state = torch.load(tmp_path / cfg.run_name / "checkpoint.pt", weights_only=True)
    assert (
        results["config"]["epochs"] == state["config"]["epochs"] == 2 and results["train_loss"] == state["train_loss"]
    )


def test_model_identity_is_what_the_model_is_not_its_spelling(configs, folder, tmp_path, monkeypatch):
    cfg, _ = train_run(configs, folder, tmp_path, epochs=1)
    ckpt = tmp_path / cfg.run_name / "checkpoint.pt"
    monkeypatch.chdir(configs["TinyViT-test"].parent)  # the same config file, spelled relatively
    same = make_cfg(configs, data=str(folder), model="TinyViT-test.json", eval_only=True, checkpoint=str(ckpt))
    fit_and_evaluate(same)
    other_seed = make_cfg(configs, data=str(folder), eval_only=True, checkpoint=str(ckpt), seed=5)
    with pytest.raises(lp.LiftError, match=r"was written by another model or task \(--seed 0 -> 5\)"):
        fit_and_evaluate(other_seed)  # random frozen weights of another seed


def test_run_folder_is_checked_and_locked(configs, folder, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(lp.LiftError, match=r"--out / --run-name: cannot write in .*afile \(File exists\)"):
        train_run(configs, folder, tmp_path, run_name="afile")
    with pytest.raises(lp.LiftError, match=r"--out / --run-name: cannot write in .*afile/run"):
        train_run(configs, folder, tmp_path / "afile", run_name="run")
    run = tmp_path / "locked"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import filelock, sys; lock = filelock.FileLock(sys.argv[1]); "
            "lock.acquire(); print('held', flush=True); sys.stdin.read()",
            str(run / "lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"  # another live process holds the folder
    with pytest.raises(lp.LiftError, match=r"locked: another run is using this run folder; wait for it to end"):
        train_run(configs, folder, tmp_path, run_name="locked")
    holder.communicate("")  # it ends, and the operating system releases its lock
    (run / "checkpoint.pt.tmp12345").write_bytes(b"half a checkpoint")  # left by a killed write
    train_run(configs, folder, tmp_path, run_name="locked", epochs=1)
    assert not (run / "checkpoint.pt.tmp12345").exists()
    assert str(run) not in lp.LOCKS  # a finished run releases the folder


def test_interrupts_end_in_one_line_and_bugs_show_their_traceback(configs, folder, tmp_path, capsys, monkeypatch):
    base = tiny_args(configs, folder, tmp_path, "--epochs 2 --batch-size 8")
    for at, name, hint in (
        (3, "a", r"interrupted before any epoch finished: nothing to resume"),
        (10, "b", r"interrupted; epoch 1/2 is in .*b/checkpoint.pt: continue with --resume"),
    ):
        monkeypatch.undo()
        interrupt_loss_call(monkeypatch, at)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            lp.main(base + ["--run-name", name])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 130 and re.fullmatch(hint, err), err
    monkeypatch.undo()
    r = cli(*base, "--run-name", "c", "--tuning", "nonsense")  # bad input: one line, exit 2
    assert_clean_error(r, r"--tuning: invalid choice: 'nonsense'")
    monkeypatch.setattr(lp, "logit_adjusted_loss", lambda *a, **k: [].pop())  # a bug: Python's own traceback
    with pytest.raises(IndexError, match="pop from empty list"):
        lp.main(base + ["--run-name", "c"])


def test_check_mode_finds_input_problems_without_training(configs, folder, tmp_path, capsys):
    args = tiny_args(configs, folder, tmp_path, "--run-name c --check")
    capsys.readouterr()
    lp.main(args)
    out = capsys.readouterr().out
    assert "check passed: flags, 66 image files" in out and not (tmp_path / "c" / "checkpoint.pt").exists()
    assert not (tmp_path / "c" / "results.json").exists() and not (tmp_path / "c" / "run.json").exists()
    broken = tmp_path / "broken"
    write_images(broken / "train", [3, 2], seed=0)
    write_images(broken / "test", [1, 1], seed=1)
    (broken / "train" / "class_0" / "2.png").unlink()
    (broken / "train" / "class_0" / "2.png").symlink_to(broken / "missing.png")  # a dangling link
    err = main_error(capsys, *args[:1], str(broken), *args[2:])
    assert re.search(r"error: 1 of the 5 train images are missing, e.g. .*class_0/2.png", err), err


# ------------------------------------------------------------------------------------------
# Part II. torchrun, metrics.jsonl, predict; iNaturalist's taxonomy levels
# ------------------------------------------------------------------------------------------


def torchrun(*args, script=HERE / "lift_plus.py", restarts: int = 0):
    """torchrun as `python -m torch.distributed.run` (the same launcher; a moved venv's console scripts break)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--max-restarts", str(restarts), str(script), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600
    )


def test_two_processes_train_and_evaluate_as_one(configs, folder, tmp_path, monkeypatch):
    """torchrun with 2 processes (gloo, CPU) equals one process: the same tuned weights after each epoch and
    the same accuracy. 50 images in steps of 15 split 8 / 7, and the last step's 5 images 3 / 2: each shorter share
    gets a padding item, so that both processes run 3 micro-batches; evaluation batches of 3 split unevenly; an
    interrupted run resumes under torchrun."""
    flags = tiny_args(configs, folder, tmp_path, "--epochs 2 --batch-size 15 --accum-steps 3 --eval-batch-size 3")
    r = torchrun(*flags, "--run-name", "two")
    assert r.returncode == 0, r.stderr[-3000:]
    same = dict(epochs=2, batch_size=15, accum_steps=3, eval_batch_size=3)
    _, one = train_run(configs, folder, tmp_path, run_name="one", **same)
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("two", "one"))
    for k in b["tuned"]:
        torch.testing.assert_close(a["tuned"][k], b["tuned"][k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["per_class_accuracy"] == one["per_class"] and two["metrics"]["overall"] == one["overall"]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    # interrupted in epoch 2 in one process, resumed by two: the weights of the uninterrupted run
    interrupt_loss_call(monkeypatch, 14)  # 4 steps of 3 micro-batches per epoch: in epoch 2
    with pytest.raises(KeyboardInterrupt):
        train_run(configs, folder, tmp_path, run_name="resumed", **same)
    lp.release_lock(tmp_path / "resumed")  # as the interrupted process does when it exits
    r = torchrun(*flags, "--run-name", "resumed", "--resume")
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-3000:]
    c = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for k in b["tuned"]:
        torch.testing.assert_close(c["tuned"][k], b["tuned"][k], rtol=1e-5, atol=1e-6)


def test_sharded_batches_cover_each_batch_once(monkeypatch):
    for n, B, W in ((10, 4, 3), (7, 7, 2), (5, 2, 4)):
        monkeypatch.undo()  # one process
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        single = list(lp.ShardedBatches(order, B))
        assert single == [order[i : i + B] for i in range(0, n, B)]
        assert list(lp.ShardedBatches(order, B, start=1)) == single[1:]  # a resumed epoch
        shares = []
        for r in range(W):
            monkeypatch.setattr(lp, "rank", lambda r=r: r)
            monkeypatch.setattr(lp, "processes", lambda W=W: W)
            shares.append(list(lp.ShardedBatches(order, B)))
        for step, batch in enumerate(single):  # the same images in every step, each once; padding comes last
            real = [s[step][: len(batch[r::W])] for r, s in enumerate(shares)]
            assert sorted(i for share in real for i in share) == sorted(batch)
            assert all(i == batch[0] for r, s in enumerate(shares) for i in s[step][len(batch[r::W]) :])
            assert len({len(s[step]) for s in shares}) == 1  # equal shares: the same micro-batches everywhere


def test_job_batches_are_one_seeded_permutation(configs, folder, tmp_path):
    """The Job's optimiser steps (sharded, resumable) are batch_size images of one permutation seeded by (seed,
    epoch), as a DataLoader with RandomSampler draws them; from step 2 it yields the rest of the epoch."""
    cfg = make_cfg(configs, data=str(folder), out=str(tmp_path), batch_size=8)
    data = lp.build_data(cfg)
    views = lp.Views(data.train, lp.MDATransform(32, cfg.epochs, cfg.mda, cfg.min_scale, cfg.seed))
    job = lp.Job(cfg, data)
    job.progress = lp.Progress(cfg, 7, tmp_path / "metrics.jsonl")
    sampler = torch.utils.data.RandomSampler(views, generator=torch.Generator().manual_seed(cfg.seed * 1000 + 1))
    a, b = list(torch.utils.data.DataLoader(views, 8, sampler=sampler)), list(job.batches(views, 1, 0))
    assert len(a) == len(b) == 7
    for (x, y), (u, v) in zip(a, b):
        assert torch.equal(x, u) and torch.equal(y, v)
    rest = list(job.batches(views, 1, 2))
    assert len(rest) == 5 and all(torch.equal(x, u) for (x, _), (u, _) in zip(rest, b[2:]))


def test_metrics_jsonl_and_run_json(configs, folder, tmp_path):
    cfg, _ = train_run(configs, folder, tmp_path, epochs=2)
    lines = [json.loads(x) for x in (tmp_path / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    state = torch.load(tmp_path / cfg.run_name / "checkpoint.pt", weights_only=True)
    assert [x["loss"] for x in lines] == state["train_loss"] and [x["lr"] for x in lines] == [0.02, 0.01]
    for x in lines:
        assert x["images_per_s"] > 0 and 0 <= x["data_wait"] <= 1 and x["epoch_s"] > 0 and x["peak_memory_gib"] > 0
    run = json.loads((tmp_path / cfg.run_name / "run.json").read_text())
    assert run["config"] == json.loads((tmp_path / cfg.run_name / "results.json").read_text())["config"]
    assert run["versions"]["torch"] == torch.__version__ and run["processes"] == 1


def test_predict_writes_top_k_with_the_runs_views(configs, folder, tmp_path, capsys, tiny_model):
    cfg, _ = train_run(configs, folder, tmp_path, epochs=1)
    ckpt = tmp_path / cfg.run_name / "checkpoint.pt"
    images = folder / "test" / "class_2"
    lp.main(
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            str(images),
            str(folder / "test" / "class_0" / "1.png"),
            "--top-k",
            "2",
            "--out",
            str(tmp_path / "p.json"),
        ]
    )
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png", "2.png", "3.png", "1.png"]
    # the same probabilities as the evaluation path on those images, with TTE
    _, data, model = tiny_model(epochs=1)
    lp.load_checkpoint(ckpt, cfg, model)
    paths = [r["image"] for r in rows]
    views = lp.Views(lp.ImageSet(paths, [0] * 5), lp.EvalTransform(32, 35, True))
    logits, _ = lp.over_dataset(lambda v: lp.tte_logits(model, v), model, views, cfg)
    prob, top = logits.softmax(1).topk(2, dim=1)
    for r, t, p in zip(rows, top.tolist(), prob.tolist()):
        assert [x["class"] for x in r["top"]] == [data.classnames[c] for c in t]
        assert [x["probability"] for x in r["top"]] == pytest.approx(p, abs=1e-6)
    capsys.readouterr()
    lp.main(["predict", "--checkpoint", str(ckpt), str(images / "0.png"), "--top-k", "1"])
    assert capsys.readouterr().out.splitlines()[0] == "image,class_1,probability_1"
    err = main_error(capsys, "predict", "--checkpoint", str(tmp_path / "none.pt"), str(images))
    assert err == f"error: --checkpoint {tmp_path / 'none.pt'}: no such file"
    train_run(configs, folder, tmp_path, epochs=1, tte=False, run_name="centre")  # predicts with its own views
    capsys.readouterr()
    lp.main(["predict", "--checkpoint", str(tmp_path / "centre" / "checkpoint.pt"), str(images / "0.png")])
    assert capsys.readouterr().out.splitlines()[1].startswith(str(images / "0.png"))


def test_inat_taxonomy_levels(tmp_path, configs):
    cats = [
        {
            "id": 0,
            "name": "Canis lupus",
            "genus": "Canis",
            "family": "Canidae",
            "order": "Carnivora",
            "class": "Mammalia",
            "phylum": "Chordata",
            "kingdom": "Animalia",
        },
        {
            "id": 1,
            "name": "Vulpes vulpes",
            "genus": "Vulpes",
            "family": "Canidae",
            "order": "Carnivora",
            "class": "Mammalia",
            "phylum": "Chordata",
            "kingdom": "Animalia",
        },
        {
            "id": 2,
            "name": "Quercus robur",
            "genus": "Quercus",
            "family": "Fagaceae",
            "order": "Fagales",
            "class": "Magnoliopsida",
            "phylum": "Tracheophyta",
            "kingdom": "Plantae",
        },
    ]
    (tmp_path / "categories.json").write_text(json.dumps(cats))
    (tmp_path / "iNaturalist18_train.txt").write_text("a.jpg 0\nb.jpg 1\nc.jpg 2\nd.jpg 2\n")
    (tmp_path / "iNaturalist18_val.txt").write_text("e.jpg 1\n")
    expected = {
        "species": (["Canis lupus", "Quercus robur", "Vulpes vulpes"], [0, 2, 1, 1]),
        "genus": (["Canis", "Quercus", "Vulpes"], [0, 2, 1, 1]),
        "family": (["Canidae", "Fagaceae"], [0, 0, 1, 1]),
        "kingdom": (["Animalia", "Plantae"], [0, 0, 1, 1]),
    }
    for level, (names, labels) in expected.items():
        data = lp.build_data(
            make_cfg(configs, data="inat2018", root=str(tmp_path), cache=str(tmp_path / "c"), inat_level=level)
        )
        assert (data.classnames, data.train.labels) == (names, labels), level
    with pytest.raises(lp.LiftError, match="--inat-level: applies to --data inat2018 only"):
        make_cfg(configs, data="imagenet_lt", inat_level="genus")


# ------------------------------------------------------------------------------------------
# Part II. A cluster's faults: signals, mid-epoch checkpoints, --resume auto, torchrun restarts
# ------------------------------------------------------------------------------------------


SIGNALLED_RUN = """import multiprocessing, os, signal, subprocess, sys
sys.path.insert(0, {here!r})
import lift_plus as lp
at, to, signum = int(sys.argv[1]), sys.argv[2], getattr(signal, sys.argv[3])
real_loss, real_save, calls = lp.logit_adjusted_loss, lp.atomic_torch_save, [0]
def send():  # as another process sends it (kill): to the process group, the main process or one worker
    if os.environ.get("RANK", "0") != "0":
        return
    target = {{"group": -os.getpgid(0), "main": os.getpid()}}.get(to) or multiprocessing.active_children()[0].pid
    subprocess.run(["kill", "-s", signal.Signals(signum).name[3:], "--", str(target)])
def loss(*a, **k):  # the at-th micro-batch's loss
    calls[0] += 1
    if calls[0] == at:
        send()
    return real_loss(*a, **k)
def save(path, obj):  # once the signal came, another one arrives while each checkpoint is written
    if calls[0] >= at and to != "kill":
        send()
    real_save(path, obj)
lp.logit_adjusted_loss, lp.atomic_torch_save = loss, save
lp.main(sys.argv[4:])
"""


def signalled_run(tmp_path: Path, at: int, to: str, signame: str, args: list, launcher: tuple = (sys.executable,)):
    """SIGNALLED_RUN in a session of its own (its process group is the run's alone): `signame` sent to `to` during
    the `at`-th micro-batch's loss."""
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED_RUN.format(here=str(HERE)))
    return subprocess.run(
        [*launcher, str(script), str(at), to, signame, *args],
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture(scope="module")
def uninterrupted(configs, folder, tmp_path_factory):
    """The run that the signalled runs must end as: 3 epochs of 7 steps of 8 images on the image folder."""
    out = tmp_path_factory.mktemp("uninterrupted")
    lp.main(tiny_args(configs, folder, out, "--epochs 3 --batch-size 8 --seed 1 --run-name whole"))
    return out / "whole"


def assert_same_run(a: Path, b: Path, exact: bool = True):
    """Two run folders hold the same tuned tensors, optimiser state, losses and results: bit for bit, or (torchrun
    against one process) up to float rounding."""
    x, y = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    ox, oy = x["optimizer"]["state"], y["optimizer"]["state"]
    assert set(x["tuned"]) == set(y["tuned"]) and set(ox) == set(oy)
    pairs = [(x["tuned"][k], y["tuned"][k]) for k in x["tuned"]]
    pairs += [(ox[k]["momentum_buffer"], oy[k]["momentum_buffer"]) for k in ox]
    pairs += [(torch.tensor(x["train_loss"]), torch.tensor(y["train_loss"]))]
    for u, v in pairs:
        if exact:
            assert torch.equal(u, v)
        else:
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    assert x["scheduler"] == y["scheduler"]
    assert "rng" not in y  # training draws from generators seeded by (seed, epoch, image): no RNG state to save
    rx, ry = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for k in ("metrics", "per_class_accuracy", "params"):
        assert rx[k] == ry[k], k


@pytest.mark.parametrize(
    "to,signum,workers,code,step",
    [
        ("group", signal.SIGTERM, 2, 143, 3),
        ("group", signal.SIGUSR1, 2, 75, 3),
        ("group", signal.SIGINT, 2, 130, 3),
        ("main", signal.SIGTERM, 2, 143, 3),
        ("worker", signal.SIGUSR1, 2, 75, 3),
        ("group", signal.SIGTERM, 0, 143, 3),
        ("group", signal.SIGTERM, 2, 143, 7),
        ("torchrun", signal.SIGTERM, 1, 143, 3),
    ],
)
def test_a_signal_to_any_process_of_the_job_stops_at_a_step_and_resumes_exactly(
    configs, folder, tmp_path, uninterrupted, to, signum, workers, code, step
):
    """SLURM, Kubernetes and a terminal signal every process of a job, the DataLoader workers too. Sent to the
    process group, to the main process alone or to one worker, with a second one while the checkpoint is written:
    the run stops after its step with a checkpoint of that step, says so in one line, and exits with 143 (SIGTERM),
    75 (SIGUSR1: requeue) or 130 (Ctrl-C). Under torchrun every process stops at that step. --resume auto then ends
    with the uninterrupted run's tensors, optimiser state and results, bit for bit, also from the last step of an
    epoch (step 7 of 7)."""
    args = tiny_args(configs, folder, tmp_path, "--epochs 3 --batch-size 8 --seed 1 --run-name cut --resume auto")
    args[args.index("--workers") + 1] = str(workers)
    launcher, where = (sys.executable,), to
    if to == "torchrun":
        launcher, where = (
            (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
            "group",
        )
    r = signalled_run(tmp_path, 7 + step, where, signal.Signals(signum).name, args, launcher)  # epoch 2's step
    assert 'lift_plus.py", line' not in r.stderr, r.stderr[-3000:]  # no traceback of ours
    if to == "torchrun":  # each process exits with the code; torchrun reports them and exits 1, its own way
        assert r.returncode == 1 and r.stderr.count(f"exitcode  : {code} ") == 2, r.stderr[-3000:]
        assert r.stderr.count(f"interrupted; epoch 1/3 + {step} steps") == 1, r.stderr[-3000:]
    else:
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.returncode == code, r.stderr[-3000:]
        assert r.stderr.count(f"{signal.Signals(signum).name}: stopping after this step") == 1, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert re.fullmatch(
            rf"interrupted; epoch 1/3 \+ {step} steps is in .*cut/checkpoint.pt: continue with --resume", last
        )
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, step)
    lp.main(tiny_args(configs, folder, tmp_path, "--epochs 3 --batch-size 8 --seed 1 --run-name cut --resume auto"))
    assert_same_run(uninterrupted, tmp_path / "cut", exact=to != "torchrun")
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # no epoch is counted twice


def test_a_worker_killed_by_sigkill_is_named_and_not_taken_for_a_stop(configs, folder, tmp_path):
    """The out-of-memory killer's SIGKILL to one DataLoader worker, mid-epoch while it still has batches to load: one
    line naming it, exit 1, no traceback (also none from the other worker, whose connection the stop breaks)."""
    args = tiny_args(configs, folder, tmp_path, "--epochs 3 --batch-size 8 --run-name killed")
    args[args.index("--workers") + 1] = "2"
    r = signalled_run(tmp_path, 3, "kill", "SIGKILL", args)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert re.fullmatch(
        r"error: a DataLoader worker \(pid \d+\) was killed by SIGKILL, not by a signal to the run .*--resume",
        r.stderr.strip(),
    ), r.stderr


def test_workers_without_sigwaitinfo_ignore_stop_signals():
    """Where the system has no sigwaitinfo (macOS), a worker ignores stop signals and a signal to the process group
    stops the run through the main process alone."""
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); del signal.sigwaitinfo; import lift_plus as lp; "
        "lp.pass_signals_on(os.getppid(), 0); "
        "assert all(signal.getsignal(s) == signal.SIG_IGN for s in lp.STOP_CODES); "
        "assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(lp.STOP_CODES)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(HERE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_mid_epoch_checkpoints_and_resume_auto_on_a_fresh_folder(configs, folder, tmp_path, monkeypatch):
    """--save-every writes a checkpoint at step boundaries within the epoch; --resume auto on a new folder trains
    from scratch."""
    cfg, _ = train_run(configs, folder, tmp_path, epochs=1, resume="auto")
    assert torch.load(tmp_path / cfg.run_name / "checkpoint.pt", weights_only=True)["epoch"] == 1
    saved, real = [], lp.Job.save

    def save(job, epoch, step):
        saved.append((epoch, step))
        real(job, epoch, step)

    monkeypatch.setattr(lp.Job, "save", save)
    train_run(configs, folder, tmp_path, run_name="often", epochs=1, save_every=1e-6)  # due after every step
    assert saved == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (1, 0)]


def test_killed_torchrun_worker_restarts_from_the_checkpoint(configs, folder, tmp_path):
    """torchrun --max-restarts 1 with --resume auto: one worker is killed in epoch 2; torchrun restarts both, which
    continue from the epoch-1 checkpoint, and the final weights are the uninterrupted single process's."""
    script = tmp_path / "killed_once.py"
    script.write_text(f"""import os, signal, sys
sys.path.insert(0, {str(HERE)!r})
import lift_plus as lp
marker, real, calls = {str(tmp_path / "killed")!r}, lp.logit_adjusted_loss, [0]
def loss(*a, **k):
    calls[0] += 1
    if calls[0] == 6 and os.environ["RANK"] == "1" and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
lp.logit_adjusted_loss = loss
lp.main()
""")
    flags = tiny_args(configs, folder, tmp_path, "--epochs 2 --batch-size 14 --resume auto")
    r = torchrun(*flags, "--run-name", "two", script=script, restarts=1)
    assert r.returncode == 0 and (tmp_path / "killed").exists(), r.stderr[-3000:]
    _, one = train_run(configs, folder, tmp_path, run_name="one", epochs=2, batch_size=14)
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("two", "one"))
    for k in b["tuned"]:
        torch.testing.assert_close(a["tuned"][k], b["tuned"][k], rtol=1e-5, atol=1e-6)
