"""Benchmark of lift_plus.py: one LIFT+ training step, evaluation, the input pipeline and the
frozen-feature modes, printed as a table. Not part of the tests.

    python bench.py            # the full table on this machine (about 15 minutes on 2 CPU cores)
    python bench.py --quick    # fewer repeats
    python bench.py --input-only --quick   # only the input path against the model's training rate (a few minutes)
    python bench.py --gpu      # on a GPU machine: GPU rows and the projected ImageNet-LT / iNaturalist wall-clock

CPU: random-weight ViT-B/16 at 224, fp32, 2 threads. On a GPU (when one is present) the model
sections run in bf16 autocast as training does. Every model measurement runs in a fresh
subprocess, so its peak resident memory is its own and the glibc allocator can be set per run:
'default' or 'tuned' (MALLOC_MMAP_MAX_=0, large MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_: freed
activation buffers stay mapped, so the next step does not page-fault them in again).

'plain' is the implementation the fast path is measured against: lift_plus.py's taught forward
(Part I, a LiftModel without make_fast): open_clip's own blocks (nn.MultiheadAttention, its
QuickGELU module, every token through the last block) plus the AdaptFormer line in the MLP branch.
'ours' (fast) is the same model after lp.make_fast (Appendix D): LeanQuickGELU and a class-token-only
last block. Before timing, the fast path's logits and gradients are checked against the plain
one's on the same weights.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lift_plus as lp

# The authors' implementation on this machine kind (same random ViT-B/16, fp32, 2 threads, CPU),
# the targets this benchmark is compared with.
AUTHORS = {"matmul_gflops": 140.0, "step8_s": 4.87, "step32_s": 26.8, "step32_tuned_s": 18.3,
           "step32_peak_gib": 5.36, "eval32_s": 9.9, "eval32_tte_s": 50.6}
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_TOP_PAD_": str(1 << 30)}
D, N, L, K = 768, 197, 12, 1000  # ViT-B/16 at 224: width, tokens, blocks; ImageNet-LT classes


# ------------------------------------------------------------------------------------------
# FLOPs (2 x multiply-adds)
# ------------------------------------------------------------------------------------------

def forward_flops(last_block_cls_only: bool) -> float:
    """ViT-B/16 forward at 224: patch embedding + 12 blocks (qkv, scores, values, out, MLP)."""
    block = 2 * (12 * N * D * D + 2 * N * N * D)
    last = 2 * (2 * N * D * D + 10 * D * D + 2 * N * D) if last_block_cls_only else block
    return 2 * (N - 1) * 3 * 16 * 16 * D + (L - 1) * block + last


def step_flops(last_block_cls_only: bool) -> float:
    """Frozen-backbone training step per image: the forward, and a backward that computes
    activation gradients only (no weight gradients; none for the patch embedding)."""
    fwd = forward_flops(last_block_cls_only)
    block_bwd = 2 * (12 * N * D * D + 4 * N * N * D)
    last_bwd = 2 * (2 * N * D * D + 10 * D * D + 4 * N * D) if last_block_cls_only else block_bwd
    return fwd + (L - 1) * block_bwd + last_bwd


# ------------------------------------------------------------------------------------------
# worker: one model measurement in its own process
# ------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def build(device, impl="fast"):
    """Random-weight ViT-B/16 LiftModel with AdaptFormer: the taught path ('plain'), or after
    lp.make_fast ('fast'). The same weights for both (seeded)."""
    import open_clip
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    model = lp.LiftModel(clip.visual, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), K, 25.0)
    lp.configure_tuning(model, lp.finalize_config(lp.Config(data="imagenet_lt")), K)
    with torch.no_grad():  # trained-looking adapters and a non-zero head, so that gradients flow through every branch
        for af in model.encoder.adaptformer.values():
            af.up.weight.normal_(std=0.02)
        model.head.weight.normal_()                         # LiftModel's head starts at zero: logits 0, no gradient below it
    if impl == "fast":
        lp.make_fast(model)
    return model.to(device)


def worker(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model = build(device, args.impl)
    g = torch.Generator().manual_seed(0)
    views = 5 if args.what == "eval_tte" else 1
    images = torch.randint(0, 256, (args.batch * views, 3, 224, 224), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, K, (args.batch,), generator=g).to(device)
    log_prior = torch.log(torch.full((K,), 1.0 / K, device=device))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9, weight_decay=5e-4)
    import gc
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def step():
        if args.what == "train":
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(images)
            lp.logit_adjusted_loss(logits, labels, log_prior).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                batch = images.view(args.batch, views, 3, 224, 224)
                if args.impl == "fast":
                    lp.tte_logits(model, batch)                              # V passes of B images
                else:
                    model(images).float().view(args.batch, views, -1).mean(1)  # one pass of B * V
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    print(json.dumps({"median_s": statistics.median(times[args.warmup:]), "peak_bytes": peak}))


def measure(what, batch, impl="fast", malloc="default", repeats=3, warmup=1, device="cpu", threads=2):
    env = {**os.environ, **(TUNED_MALLOC if malloc == "tuned" else {})}
    cmd = [sys.executable, __file__, "--worker", what, "--batch", str(batch), "--impl", impl, "--repeats", str(repeats),
           "--warmup", str(warmup), "--device", device, "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# in-process measurements
# ------------------------------------------------------------------------------------------

def matmul_gflops(threads=2, n=2048, repeats=10) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def check_equivalence(threads=2):
    """The fast path's logits and gradients against the plain (taught) path, same weights, fp32."""
    torch.set_num_threads(threads)
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 7])
    out = {}
    for name in ("fast", "plain"):
        model = build(torch.device("cpu"), name)
        logits = model(x)
        lp.logit_adjusted_loss(logits, y, torch.zeros(K)).backward()
        out[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        del model
    dlogit = (out["fast"][0] - out["plain"][0]).abs().max().item()
    dgrad = max(((out["fast"][1][n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in out["plain"][1].items())
    return dlogit, dgrad


def natural_jpegs(folder: Path, count: int):
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(count):
        img = np.stack([128 + 100 * np.sin(xx / (30 + i % 17) + c) + 40 * np.cos(yy / (20 + i % 11) * c + i) for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        from PIL import Image
        Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)


def mda_seed(seed: int, epoch: int, index: int) -> int:
    """The generator seed lp.MDATransform uses for image `index` at `epoch` (inline in its __call__)."""
    return (seed * 1_000_003 + epoch) * 100_000_007 + index


def input_pipeline(count=200):
    """Images per second on one core: the plain PIL path against lift_plus's tensor path."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF
    torch.set_num_threads(1)
    norm = T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    bicubic = T.InterpolationMode.BICUBIC
    with tempfile.TemporaryDirectory() as d:
        natural_jpegs(Path(d), count)
        paths = sorted(Path(d).glob("*.jpg"), key=lambda p: int(p.stem))
        ds = lp.ImageSet([str(p) for p in paths], [0] * count)
        mda = lp.MDATransform(224, 5, "convex", 0.08, seed=0)
        tte = lp.EvalTransform(224, 224 + 24, True)

        def plain_mda(i):
            img = Image.open(paths[i]).convert("RGB")
            gen = torch.Generator().manual_seed(mda_seed(0, 0, i))  # the same crops as the fast path
            top, left, side = lp.mda_crop_box(img.height, img.width, 0.08, gen)
            return norm(TF.to_tensor(TF.resized_crop(img, top, left, side, side, [224, 224], bicubic)))

        def plain_tte(i):
            img = TF.resize(Image.open(paths[i]).convert("RGB"), 248, bicubic)
            return torch.stack([norm(TF.to_tensor(c)) for c in TF.five_crop(img, [224, 224])])

        rates = {}
        for name, f in (("mda_plain", plain_mda), ("mda_fast", lambda i: mda(ds.load(i), i)),
                        ("tte_plain", plain_tte), ("tte_fast", lambda i: tte(ds.load(i), i))):
            f(0)
            t = timed(lambda: [f(i) for i in range(count)])
            rates[name] = count / t
    return rates


def loader_rates(count, workers=(0, 1, 2), passes=3, device="cpu", batch=32):
    """Images per second of the input path as lp.train uses it: lp.make_loader over lp.Views(lp.ImageSet of
    `count` JPEG files (500x375), MDATransform), batches of `batch`, for each number of worker processes in
    `workers`. A fresh loader per pass, as train makes one per epoch (worker start-up included); one warm-up
    pass, then the median of `passes`. device 'cuda' only turns on pin_memory, as in training."""
    torch.set_num_threads(2)                                # the main process's threads when workers = 0
    rates = {}
    with tempfile.TemporaryDirectory() as d:
        natural_jpegs(Path(d), count)
        paths = [str(Path(d) / f"{i}.jpg") for i in range(count)]
        lp.read_image(paths[0])                             # TorchCodec loaded before the workers fork
        views = lp.Views(lp.ImageSet(paths, [i % K for i in range(count)]), lp.MDATransform(224, 5, "convex", 0.08, seed=0))
        for w in workers:
            cfg = lp.finalize_config(lp.Config(data="imagenet_lt", workers=w))
            times = []
            for p in range(1 + passes):
                loader = lp.make_loader(views, batch, cfg, torch.device(device), torch.Generator().manual_seed(p))
                times.append(timed(lambda: sum(len(y) for _, y in loader)))
            rates[w] = count / statistics.median(times[1:])
    return rates


def verdict(input_name, input_rate, model_name, model_rate) -> str:
    """Which of the two limits training throughput: the slower one."""
    ratio = max(input_rate, model_rate) / min(input_rate, model_rate)
    times = f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"
    if input_rate >= model_rate:
        tail = f"the model limits (input is {times} faster)"
    else:
        tail = f"the input path limits (the model is {times} faster)"
    return f"{input_name}: {input_rate:.0f} img/s; {model_name}: {model_rate:.1f} img/s -> {tail}"


def input_vs_model(quick, step32):
    """The input path as training loads it (0, 1, 2 workers) against the fast path's CPU training rate at
    batch 32 (`step32`: its measure() result), and which one limits."""
    count = 128 if quick else 256
    rates = loader_rates(count, (0, 1, 2), passes=2 if quick else 3)
    model_rate = 32 / step32["median_s"]
    print()
    print(f"| input path vs model, training (batch 32, {count} JPEGs 500x375, MDA) | images/s |")
    print("|---|---|")
    for w, r in rates.items():
        where = " (transforms in the main process, 2 threads)" if w == 0 else ""
        print(f"| input path: lp.make_loader, {w} worker{'s' if w != 1 else ''}{where} | {r:.0f} img/s |")
    print(f"| model: training step, batch 32, ours, CPU fp32 2 threads | {model_rate:.1f} img/s |")
    print()
    print(verdict("input path with 2 workers", rates[2], "model training step", model_rate))
    print("On a CPU-only machine the loader's workers and the model step compete for the same cores, so training "
          "runs slower than either rate alone; on a GPU the verdict compares CPU workers against GPU steps.")


def gpu_input_vs_model(quick, train128):
    """GPU machine: the input path with min(8, CPUs) workers (pinned memory, as training) against the GPU bf16
    training rate at batch 128 (`train128`: its measure() result). GPU JPEG decoding is not in lift_plus."""
    w = min(8, os.cpu_count() or 1)
    count = 32 * w * (2 if quick else 4)                    # two or four batches per worker
    rate = loader_rates(count, (w,), passes=2 if quick else 3, device="cuda")[w]
    print(f"| input path: lp.make_loader, {w} workers, pinned ({count} JPEGs 500x375, MDA, batch 32) | | {rate:.0f} img/s | |")
    print()
    print(verdict(f"input path with {w} CPU workers", rate, "GPU bf16 training step, batch 128", 128 / train128["median_s"]))
    return rate


def gpu_rows(quick):
    """The GPU rows alone (python bench.py --gpu): bf16 training steps at batch 32 and 128, five-crop TTE
    evaluation at batch 128, the input path against the model, and the projected wall-clock of the paper's
    ImageNet-LT (5 epochs) and iNaturalist 2018 (15 epochs) runs at the slower of the two rates."""
    gib = 2 ** 30
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {os.cpu_count()} CPUs, random-weight ViT-B/16 at 224, "
          f"bf16 autocast, {K} classes")
    print("| measurement | time | images/s | GPU memory |\n|---|---|---|---|")
    r = {}
    for what, batch in (("train", 32), ("train", 128), ("eval_tte", 128)):
        m = r[what] = measure(what, batch, "fast", repeats=10, warmup=3, device="cuda")
        print(f"| {'training step' if what == 'train' else 'evaluation, five-crop TTE'}, batch {batch} | "
              f"{m['median_s'] * 1000:.1f} ms | {batch / m['median_s']:.0f} | peak {m['peak_bytes'] / gib:.2f} GiB |")
    train, tte = 128 / r["train"]["median_s"], 128 / r["eval_tte"]["median_s"]
    feed = gpu_input_vs_model(quick, r["train"])
    rate = min(train, feed)                                 # training waits for the slower of the model and its input
    for name, n_train, epochs, n_test in (("ImageNet-LT", 115_846, 5, 50_000), ("iNaturalist 2018", 437_513, 15, 24_426)):
        minutes = (epochs * n_train / rate + n_test / min(tte, feed)) / 60
        print(f"projected {name}: {epochs} epochs x {n_train:,} images at {rate:.0f} img/s + TTE of {n_test:,} test images "
              f"at {min(tte, feed):.0f} img/s = {minutes:.1f} min")


def frozen_feature_modes(count=2000, threads=2):
    """Classifier-only epochs on ViT-B/32 features: running the frozen backbone every epoch against
    --cache-features; and the one-pass modes (zero-shot evaluation, class-mean and linear-probe inits)."""
    import open_clip
    torch.set_num_threads(threads)
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(count) % 50
    data = lp.LTData(lp.ImageSet(images, labels), lp.ImageSet(images[:10], labels[:10]),
                     [f"class {i}" for i in range(50)], np.bincount(labels))
    cfg = lp.finalize_config(lp.Config(data="bench", model="ViT-B-32", tuning="classifier", workers=0, batch_size=128,
                                       epochs=1, eval_batch_size=128, log_every=10 ** 6, out=tempfile.mkdtemp()))
    clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    model = lp.LiftModel(clip.visual, (0.5,) * 3, (0.5,) * 3, 50, 25.0)  # CPU: train takes the device from the model
    lp.configure_tuning(model, cfg, 50)
    lp.make_fast(model)                                                   # as lift_plus's build_model (--fast, the default)
    S = model.image_size                                                  # 224
    t_backbone = timed(lambda: lp.train(cfg, data, model, Path(cfg.out) / "a"))
    view = lp.Views(data.train, lp.EvalTransform(S, S, False))
    feats = {}
    t_extract = timed(lambda: feats.update(f=lp.extract_features(model, view, cfg)))
    t_cached = timed(lambda: lp.train(cfg, data, model, Path(cfg.out) / "b", feats["f"]))
    f, y = feats["f"]
    t_mean = timed(lambda: lp.class_mean_init(f, y, 50))
    t_probe = timed(lambda: lp.linear_probe_init(f, y, 50))
    return {"images": count, "backbone_epoch_s": t_backbone, "extract_s": t_extract, "cached_epoch_s": t_cached,
            "class_mean_fit_s": t_mean, "linear_probe_fit_s": t_probe}


# ------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one warm-up and two timed repeats, fewer images")
    p.add_argument("--input-only", action="store_true",
                   help="only the input path against the model's training rate (and its one training-step measurement)")
    p.add_argument("--gpu", action="store_true", help="only the GPU rows and the projected ImageNet-LT / iNaturalist wall-clock")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--what", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--impl", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.what = args.worker
        return worker(args)

    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("bench.py --gpu: no CUDA device here")
        return gpu_rows(args.quick)
    reps = 2 if args.quick else 3
    gib = 2 ** 30
    if args.input_only:
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 threads, fp32, random-weight ViT-B/16 at 224, {K} classes")
        input_vs_model(args.quick, measure("train", 32, "fast", "default", repeats=reps))
        if torch.cuda.is_available():
            print()
            gpu_rows(args.quick)                            # the GPU's input path against its training rate
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 threads, fp32, random-weight ViT-B/16 at 224, {K} classes")
    peak = matmul_gflops()
    dlogit, dgrad = check_equivalence()
    print(f"fp32 matmul ceiling: {peak:.0f} GFLOP/s (authors' figure on this kind: {AUTHORS['matmul_gflops']:.0f})")
    print(f"fast vs plain, same weights: max |logit diff| {dlogit:.2e}, max relative gradient diff {dgrad:.2e}")
    print(f"FLOPs per image: forward {forward_flops(False) / 1e9:.1f} G (ours {forward_flops(True) / 1e9:.1f} G: "
          f"class-token-only last block); training step {step_flops(False) / 1e9:.1f} G (ours {step_flops(True) / 1e9:.1f} G)")
    print()
    print("| measurement | malloc | plain | ours | ours / plain | authors | ours / authors |")
    print("|---|---|---|---|---|---|---|")
    rows = [("train", 8, "default", "step8_s"), ("train", 32, "default", "step32_s"), ("train", 32, "tuned", "step32_tuned_s"),
            ("eval", 32, "default", "eval32_s"), ("eval_tte", 32, "default", "eval32_tte_s")]
    results = {}
    for what, batch, malloc, key in rows:
        fast = measure(what, batch, "fast", malloc, repeats=reps)
        plain = measure(what, batch, "plain", malloc, repeats=reps)
        results[key] = (fast, plain)
        per = f" ({1000 * fast['median_s'] / batch:.0f} ms/img)"
        if what == "train":
            util = lambda r, cls: 100 * step_flops(cls) * batch / r["median_s"] / 1e9 / peak
            per = f" ({1000 * fast['median_s'] / batch:.0f} ms/img, {util(fast, True):.0f}% of ceiling)"
        name = {"train": f"training step, batch {batch}", "eval": "evaluation, batch 32, one crop",
                "eval_tte": "evaluation, batch 32, five-crop TTE"}[what]
        print(f"| {name} | {malloc} | {plain['median_s']:.2f} s | {fast['median_s']:.2f} s{per} | "
              f"{fast['median_s'] / plain['median_s']:.2f} | {AUTHORS[key]:.2f} s | {fast['median_s'] / AUTHORS[key]:.2f} |")
        if (what, batch) == ("train", 32):
            print(f"| peak memory of that step above the model | {malloc} | {plain['peak_bytes'] / gib:.2f} GiB | "
                  f"{fast['peak_bytes'] / gib:.2f} GiB | {fast['peak_bytes'] / plain['peak_bytes']:.2f} | "
                  f"{AUTHORS['step32_peak_gib']:.2f} GiB | {fast['peak_bytes'] / gib / AUTHORS['step32_peak_gib']:.2f} |")
    rates = input_pipeline(100 if args.quick else 200)
    for t in ("mda", "tte"):
        name = {"mda": "input: MDA training transform", "tte": "input: TTE transform"}[t]
        print(f"| {name} (JPEG 500x375, 1 core) | | {rates[t + '_plain']:.0f} img/s | {rates[t + '_fast']:.0f} img/s | "
              f"{rates[t + '_fast'] / rates[t + '_plain']:.2f}x faster | | |")
    fm = frozen_feature_modes(500 if args.quick else 2000)
    print(f"| classifier-only epoch, {fm['images']} images, ViT-B/32 | | backbone every epoch {fm['backbone_epoch_s']:.1f} s | "
          f"cached features {fm['cached_epoch_s']:.2f} s (+ {fm['extract_s']:.1f} s once) | "
          f"{fm['backbone_epoch_s'] / fm['cached_epoch_s']:.0f}x faster per epoch | | |")
    print(f"| one-pass frozen modes on those features | | | zero-shot / feature pass {fm['extract_s']:.1f} s, "
          f"class-mean fit {fm['class_mean_fit_s']:.3f} s, linear-probe fit {fm['linear_probe_fit_s']:.2f} s | | | |")
    input_vs_model(args.quick, results["step32_s"][0])
    if torch.cuda.is_available():
        print()
        gpu_rows(args.quick)


if __name__ == "__main__":
    main()
