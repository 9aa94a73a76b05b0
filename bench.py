"""Benchmark of lift_plus.py: one LIFT+ training step, evaluation, the input pipeline and the
frozen-feature modes, printed as a table. Not part of the tests.

    python bench.py            # the full table on this machine (about 15 minutes on 2 CPU cores)
    python bench.py --quick    # fewer repeats
    python bench.py --input-only --quick   # only the input path against the model's training rate (a few minutes)
    python bench.py --gpu      # on a GPU machine: GPU rows and the projected ImageNet-LT / iNaturalist wall-clock
                               # (sized for one call of under 8 minutes on one H200, compiling included)
    python bench.py --gpu --dry-run   # the same code on this CPU with a tiny ViT: a check before spending GPU time

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
import math
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
AUTHORS = {
    "matmul_gflops": 140.0,
    "step8_s": 4.87,
    "step32_s": 26.8,
    "step32_tuned_s": 18.3,
    "step32_peak_gib": 5.36,
    "eval32_s": 9.9,
    "eval32_tte_s": 50.6,
}
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


def build(device, impl="fast", arch="ViT-B-16"):
    """Random-weight ViT-B/16 LiftModel with AdaptFormer: the taught path ('plain'), or after
    lp.make_fast ('fast'). The same weights for both (seeded). arch: another open_clip name (--gpu --dry-run)."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True)
    model = lp.LiftModel(clip.visual, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), K, 25.0)
    lp.configure_tuning(model, lp.finalize_config(lp.Config(data="imagenet_lt")), K)
    with torch.no_grad():  # trained-looking adapters and a non-zero head, so that gradients flow through every branch
        for af in model.encoder.adaptformer.values():
            af.up.weight.normal_(std=0.02)
        model.head.weight.normal_()  # LiftModel's head starts at zero: logits 0, no gradient below it
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
                    lp.tte_logits(model, batch)  # V passes of B images
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
    print(json.dumps({"median_s": statistics.median(times[args.warmup :]), "peak_bytes": peak}))


def measure(what, batch, impl="fast", malloc="default", repeats=3, warmup=1, device="cpu", threads=2):
    env = {**os.environ, **(TUNED_MALLOC if malloc == "tuned" else {})}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        what,
        "--batch",
        str(batch),
        "--impl",
        impl,
        "--repeats",
        str(repeats),
        "--warmup",
        str(warmup),
        "--device",
        device,
        "--threads",
        str(threads),
    ]
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
    return 2 * n**3 / best / 1e9


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
    dgrad = max(
        ((out["fast"][1][n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
        for n, g in out["plain"][1].items()
    )
    return dlogit, dgrad


def natural_jpegs(folder: Path, count: int):
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(count):
        img = np.stack(
            [128 + 100 * np.sin(xx / (30 + i % 17) + c) + 40 * np.cos(yy / (20 + i % 11) * c + i) for c in range(3)], -1
        )
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
        for name, f in (
            ("mda_plain", plain_mda),
            ("mda_fast", lambda i: mda(ds.load(i), i)),
            ("tte_plain", plain_tte),
            ("tte_fast", lambda i: tte(ds.load(i), i)),
        ):
            f(0)
            t = timed(lambda: [f(i) for i in range(count)])
            rates[name] = count / t
    return rates


def input_job(views, cfg, device):
    """An lp.Job that serves the batches lp.train gets from `views` (a seeded permutation; on a GPU pinned memory and,
    with --gpu-decode, JpegBatch items that Job.on_device decodes with JpegBatch.decode(device))."""
    job = lp.Job(cfg, lp.LTData(views.base, views.base, ["x"], np.ones(1, dtype=int)))
    job.device, job.progress = torch.device(device), lp.Progress(cfg, 1, Path(tempfile.mkdtemp()) / "metrics.jsonl")
    return job


def job_batches(views, cfg, device, epoch: int = 0):
    """The batches lp.train gets in an epoch: lp.Job.batches."""
    return input_job(views, cfg, device).batches(views, epoch, 0)


def loader_rates(count, workers=(0, 1, 2), passes=3, device="cpu", batch=32):
    """Images per second of the input path as lp.train uses it: lp.Job.batches over lp.Views(lp.ImageSet of
    `count` JPEG files (500x375), MDATransform), batches of `batch`, for each number of worker processes in
    `workers`. A fresh loader per pass, as train makes one per epoch (worker start-up included); one warm-up
    pass, then the median of `passes`. device 'cuda' only turns on pin_memory, as in training."""
    torch.set_num_threads(2)  # the main process's threads when workers = 0
    rates = {}
    with tempfile.TemporaryDirectory() as d:
        natural_jpegs(Path(d), count)
        paths = [str(Path(d) / f"{i}.jpg") for i in range(count)]
        lp.read_image(paths[0])  # TorchCodec loaded before the workers fork
        views = lp.Views(
            lp.ImageSet(paths, [i % K for i in range(count)]), lp.MDATransform(224, 5, "convex", 0.08, seed=0)
        )
        for w in workers:
            cfg = lp.finalize_config(lp.Config(data="imagenet_lt", workers=w, batch_size=batch))
            times = []
            for p in range(1 + passes):
                loader = job_batches(views, cfg, device, p)
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
        print(f"| input path: lp.Job.batches, {w} worker{'s' if w != 1 else ''}{where} | {r:.0f} img/s |")
    print(f"| model: training step, batch 32, ours, CPU fp32 2 threads | {model_rate:.1f} img/s |")
    print()
    print(verdict("input path with 2 workers", rates[2], "model training step", model_rate))
    print(
        "On a CPU-only machine the loader's workers and the model step compete for the same cores, so training "
        "runs slower than either rate alone; on a GPU the verdict compares CPU workers against GPU steps."
    )


# ------------------------------------------------------------------------------------------
# the GPU rows (python bench.py --gpu): one process, so that the compiled graphs serve every row after their own
# ------------------------------------------------------------------------------------------

TARGETS = {"train": 4500, "eval": 2500, "gpu_input": 6000, "data_wait": 0.10, "imagenet_lt_min": 3.0, "inat_min": 25.0}
RUNS = (("ImageNet-LT", 115_846, 5, 50_000, "imagenet_lt_min"), ("iNaturalist 2018", 437_513, 15, 24_426, "inat_min"))


def natural_jpeg(i: int, h: int = 375, w: int = 500, **save) -> bytes:
    """JPEG bytes of a smooth colour field with texture and noise (natural_jpegs' images), quality 90."""
    import io

    from PIL import Image

    rng = np.random.RandomState(i)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack(
        [128 + 100 * np.sin(xx / (30 + i % 17) + c) + 40 * np.cos(yy / (20 + i % 11) * c + i) for c in range(3)], -1
    )
    im = Image.fromarray(np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.convert(save.pop("mode", "RGB")).save(buf, save.pop("format", "JPEG"), quality=90, **save)
    return buf.getvalue()


def write_jpegs(folder: Path, count: int, distinct: int = 512) -> list:
    """`count` JPEG files of 500x375 in `folder`, cycling through `distinct` images made by every core (decoding
    costs the same for a repeated file; the page cache holds them all, as it would a warm dataset)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        images = pool.map(natural_jpeg, range(min(count, distinct)))
    paths = []
    for i in range(count):
        paths.append(str(folder / f"{i}.jpg"))
        Path(paths[-1]).write_bytes(images[i % len(images)])
    return paths


def sync(device):
    """Wait for the device's queued work (timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(fn, images: int, device, warmup: int, iters: int, windows: int = 3) -> float:
    """Images per second of fn() (`images` a call): the median of `windows` timed runs of `iters` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(windows):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return images * iters / statistics.median(times)


def profile_table(fn, device, steps: int = 3, rows: int = 14) -> str:
    """torch.profiler's key_averages of `steps` calls of fn(), by self device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    except (AttributeError, KeyError) as e:  # another torch's names: the table by CPU time
        return f"({e})\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def pixel_parity(folder: Path, device) -> list:
    """The GPU path's views against the CPU path's on a mixed set (plain, greyscale and progressive JPEGs, a PNG, an
    EXIF-rotated and a CMYK JPEG), for MDA and the five TTE views: (name, mean |diff|, max |diff|, images on GPU)."""
    from PIL import Image

    paths = []
    for i, save in enumerate([{}] * 8 + [{"mode": "L"}, {"progressive": True}, {"format": "PNG"}, {"mode": "CMYK"}]):
        paths.append(str(folder / f"parity{i}.{save.get('format', 'jpg').lower()}"))
        Path(paths[-1]).write_bytes(natural_jpeg(1000 + i, **save))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(paths[0]).save(folder / "parity_rotated.jpg", quality=90, exif=exif.tobytes())
    paths.append(str(folder / "parity_rotated.jpg"))
    base, out = lp.ImageSet(paths, list(range(len(paths)))), []
    for name, t in ("MDA", lp.MDATransform(224, 5, "convex", 0.08, seed=0)), ("TTE", lp.EvalTransform(224, 248, True)):
        jpegs = lp.JpegViews(base, t)
        batch, _ = jpegs.collate([jpegs[i] for i in range(len(jpegs))])
        views = batch.decode(device).cpu()
        ref = torch.stack([lp.Views(base, t)[i][0] for i in range(len(paths))])
        diff = (views.int() - ref.int()).abs().float()
        out.append((name, diff.mean().item(), diff.max().item(), sum(isinstance(x, tuple) for x in batch.items)))
    return out


def model_rows(device, dtype, arch: str, B: int, iters: int) -> tuple:
    """Training step and five-crop evaluation at batch B, eager and compiled, with the variants the issue names
    (fused SGD, one pass of the five views, SDPA's kernels), and profiles of the compiled steps.
    Returns (rows, rates, the compiled model)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build(device, "fast", arch)
    S, g, rows, r = model.image_size, torch.Generator().manual_seed(0), [], {}
    images = torch.randint(0, 256, (B, 5, 3, S, S), dtype=torch.uint8, generator=g).to(device)
    first = images[:, 0].contiguous()  # training's views: contiguous, as the loader's are
    labels = torch.randint(0, K, (B,), generator=g).to(device)
    log_prior = torch.log(torch.full((K,), 1.0 / K, device=device))
    params = [p for p in model.parameters() if p.requires_grad]
    opts = {"foreach": torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=5e-4)}
    if device.type == "cuda":
        opts["fused"] = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=5e-4, fused=True)

    def amp():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(opt):
        """One optimiser step of training's forward, logit-adjusted loss and backward."""
        with amp():
            logits = model(first)
        lp.logit_adjusted_loss(logits, labels, log_prior).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eval_step(one_pass=False):
        """The TTE logits of the batch's five views."""
        with torch.no_grad(), amp():
            if one_pass:  # the five views of the batch in one pass of 5 B
                return model(images.flatten(0, 1)).float().view(B, 5, -1).mean(1)
            return lp.tte_logits(model, images)  # lift_plus: five passes of B

    def measure(name, key, fn, n):
        """r[key]: images per second of fn (n images a call); a row with the peak memory."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r[key] = rate(fn, n, device, warmup=3, iters=iters)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "-"
        rows.append((name, r[key], peak))
        print(f"  {name}: {r[key]:.0f} img/s, peak {peak}", flush=True)

    model.train()
    measure(f"training step, batch {B}, eager", "train_eager", lambda: train_step(opts["foreach"]), B)
    if "fused" in opts:

        def fused():
            return train_step(opts["fused"])

        measure(f"training step, batch {B}, eager, fused SGD", "train_eager_fused", fused, B)
        grads = [torch.randn(p.shape, generator=g).to(device) for p in params]
        start = [p.detach().clone() for p in params]
        after = {}
        for name, opt in opts.items():  # one step from the same parameters and gradients
            with torch.no_grad():
                for p, p0, gr in zip(params, start, grads):
                    p.copy_(p0)
                    p.grad = gr.clone()
            opt.state.clear()
            opt.step()
            after[name] = [p.detach().clone() for p in params]
            opt.zero_grad(set_to_none=True)
        d = max((a - b).abs().max().item() for a, b in zip(after["foreach"], after["fused"]))
        print(f"  fused SGD vs foreach SGD, one step on the same gradients: max |param diff| {d:.2e}", flush=True)
    model.eval()
    measure(f"evaluation, five-crop TTE, batch {B}, eager (5 passes of {B})", "eval_eager", eval_step, B)
    measure(
        f"evaluation, five-crop TTE, batch {B}, eager (1 pass of {5 * B})",
        "eval_eager_one_pass",
        lambda: eval_step(True),
        B,
    )
    d = (eval_step() - eval_step(True)).abs().max().item()
    print(f"  five passes vs one pass: max |logit diff| {d:.2e} (bf16 GEMMs of other shapes)", flush=True)
    if device.type == "cuda":
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    measure(f"evaluation, eager, SDPA {backend.name} only", f"eval_{backend.name}", eval_step, B)
            except RuntimeError as e:
                print(f"  SDPA {backend.name}: {str(e).splitlines()[0][:100]}")
    model.compile(dynamic=False)  # as lift_plus's fit does with --compile
    t0 = time.perf_counter()
    lp.compile_warmup(model, {B}, dtype)
    sync(device)
    r["compile_train_s"] = time.perf_counter() - t0
    print(f"  compiling the training step (forward and backward): {r['compile_train_s']:.0f} s", flush=True)
    model.train()
    measure(f"training step, batch {B}, compiled", "train", lambda: train_step(opts["foreach"]), B)
    if "fused" in opts:
        measure(f"training step, batch {B}, compiled, fused SGD", "train_fused", fused, B)
    print(profile_table(lambda: train_step(opts["foreach"]), device), flush=True)
    model.eval()
    t0 = time.perf_counter()
    eval_step()
    sync(device)
    r["compile_eval_s"] = time.perf_counter() - t0
    print(f"  compiling evaluation's forward: {r['compile_eval_s']:.0f} s", flush=True)
    measure(f"evaluation, five-crop TTE, batch {B}, compiled", "eval", eval_step, B)
    print(profile_table(eval_step, device, steps=2), flush=True)
    r["train_tflops"] = step_flops(True) * r["train"] / 1e12
    r["eval_tflops"] = 5 * forward_flops(True) * r["eval"] / 1e12
    return rows, r, model


def input_rate(paths, transform, gpu: bool, device, batch: int, workers: int) -> tuple:
    """Images per second of lp.Job.batches as training and evaluation use it, each batch moved to the device as views
    [B, V, 3, S, S]: decoded by `workers` CPU workers (gpu False), or by nvJPEG in the main process (--gpu-decode).
    Also the main process's seconds per batch in moving it there (Job.on_device: JpegBatch.decode, the decode and
    resize, with the decoder's own wait), and the last batch (for a profile)."""
    cfg = lp.finalize_config(lp.Config(data="imagenet_lt", workers=workers, gpu_decode=gpu, batch_size=batch))
    views = lp.Views(lp.ImageSet(paths, [i % K for i in range(len(paths))]), transform)
    job = input_job(views, cfg, device)
    move, spent, last = job.on_device, [], []

    def on_device(v):  # Job.on_device, timed; the batch as it came from the loader kept for the profile
        t = time.perf_counter()
        out = move(v)
        spent.append(time.perf_counter() - t)
        last[:] = [v]
        return out

    job.on_device = on_device
    batches = math.ceil(len(paths) / batch)
    sync(device)
    t0 = time.perf_counter()
    for _ in job.batches(views, 0, 0):
        pass
    sync(device)
    in_to, v = sum(spent), last[0]
    return len(paths) / (time.perf_counter() - t0), in_to / batches, v


def training_epochs(model, paths, B, epochs: int, gpu: bool, out: Path, workers: int) -> list:
    """A real lp.train over JPEG files (--compile, and --gpu-decode or not): per epoch (images/s, data wait
    fraction, the first batch's wait in s (worker start-up), the data wait of the other batches)."""
    waits = []

    class Recorded(lp.Progress):
        """lp.Progress, also keeping the first batch's wait and each epoch's figures."""

        def timed(self, loader):
            for k, item in enumerate(super().timed(loader)):
                if k == 0:
                    self.first = self.wait
                yield item

        def epoch_end(self, epoch, loss, lr):
            seconds = time.time() - self.start
            waits.append((self.images / seconds, self.wait / seconds, self.first, (self.wait - self.first) / seconds))
            super().epoch_end(epoch, loss, lr)

    cfg = lp.finalize_config(
        lp.Config(
            data="imagenet_lt",
            workers=workers,
            gpu_decode=gpu,
            compile=True,
            epochs=epochs,
            batch_size=B,
            log_every=10**6,
            out=str(out),
            pretrained="none",
        )
    )
    labels = [i % K for i in range(len(paths))]
    data = lp.LTData(
        lp.ImageSet(paths, labels),
        lp.ImageSet(paths[:1], labels[:1]),
        [f"class {k}" for k in range(K)],
        np.bincount(labels, minlength=K),
    )
    real, lp.Progress = lp.Progress, Recorded
    try:
        run = lp.dataclasses.replace(cfg, run_name="gpu" if gpu else "cpu")
        lp.train(run, data, model, lp.Job(run, data, model))
    finally:
        lp.Progress = real
    return waits


def gpu_rows(quick, device="cuda", dry_run=False):
    """The GPU rows (python bench.py --gpu), all in one process: the GPU input path's pixels against the CPU path's;
    bf16 training step and five-crop evaluation at batch 128, eager and compiled (with fused SGD, one-pass TTE and SDPA
    variants, and profiles); the input path on CPU workers and on the GPU; real training epochs over JPEG files (data
    wait); real evaluation; the projected ImageNet-LT and iNaturalist 2018 wall-clock at the slower of model and input.
    dry_run: the same code on a CPU, with a 2-block ViT at 224 and a few images, so that a GPU call cannot die on a
    typo."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    workers = min(8, os.cpu_count() or 1)
    B, iters, n_train, n_eval, arch = 128, 10, 12800, 4096, "ViT-B-16"
    if quick:
        iters, n_train, n_eval = 5, 4096, 2048
    if dry_run:  # a CPU stands in: a tiny ViT; the GPU path chosen anyway
        B, iters, n_train, n_eval, workers = 4, 1, 16, 8, 2
        d = Path(tempfile.mkdtemp())
        (d / "TinyViT-224.json").write_text(
            json.dumps(
                {
                    "embed_dim": 32,
                    "quick_gelu": True,
                    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
                }
            )
        )
        arch = lp.open_clip_name(str(d / "TinyViT-224.json"))
        choose = lp.gpu_jpeg_views
        lp.gpu_jpeg_views = lambda ds, cfg, dev: choose(ds, cfg, torch.device("cuda"))
    import torchvision

    decoder = f"torchvision {torchvision.__version__} io.decode_jpeg"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(
        f"{name}; torch {torch.__version__}, torchvision {torchvision.__version__}; {os.cpu_count()} CPUs; "
        f"{arch}, random weights, {K} classes, bf16 autocast; JPEG decoder on the GPU path: {decoder}",
        flush=True,
    )
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_jpegs(tmp, n_train)
        kib = sum(Path(p).stat().st_size for p in paths) / n_train / 1024
        print(
            f"wrote {n_train} JPEGs of 500x375, {kib:.0f} KiB on average, in {time.perf_counter() - t_start:.0f} s",
            flush=True,
        )
        print(
            "GPU path vs CPU path, same boxes (13 files: 10 JPEGs for the GPU; a PNG, a CMYK and an EXIF-rotated "
            "JPEG for the CPU):"
        )
        for view, mean, worst, n in pixel_parity(tmp, device):
            print(f"  {view}: mean |diff| {mean:.3f}, max {worst:.0f} levels ({n} of 13 files decoded by the GPU path)")
        x = torch.randint(0, 256, (1, 3, 300, 300), dtype=torch.uint8, device=device)
        try:
            torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
            print("  (uint8 antialiased bicubic runs on this device too)")
        except (RuntimeError, NotImplementedError) as e:
            print(f"  (uint8 antialiased bicubic on this device: {str(e).splitlines()[0][:80]})")
        r, input_rows = {}, []
        print("input path:", flush=True)
        mda, tte = lp.MDATransform(224, 5, "convex", 0.08, seed=0), lp.EvalTransform(224, 248, True)
        for key, t, n, gpu in (
            ("cpu_input", mda, n_train, False),
            ("gpu_input", mda, n_train, True),
            ("cpu_input_tte", tte, n_eval, False),
            ("gpu_input_tte", tte, n_eval, True),
        ):
            r[key], in_to, last = input_rate(paths[:n], t, gpu, device, B, workers)
            where = "nvJPEG batched in the main process" if gpu else f"{workers} CPU workers"
            input_rows.append((f"input path, {'MDA' if t is mda else 'five TTE views'}, {where}", r[key], "-"))
            print(
                f"  {input_rows[-1][0]}: {r[key]:.0f} img/s; the main process spends {1000 * in_to:.1f} ms a "
                "batch moving it to the device",
                flush=True,
            )
            if key == "gpu_input":
                print(profile_table(lambda: last.decode(device), device, rows=10), flush=True)
        print("model:", flush=True)
        rows, model_rates, model = model_rows(device, dtype, arch, B, iters)
        r.update(model_rates)
        rows += input_rows
        print("real training epochs (lp.train, --compile):", flush=True)
        for gpu, epochs in ((True, 2), (False, 1)):
            for e, (ips, wait, first, steady) in enumerate(training_epochs(model, paths, B, epochs, gpu, tmp, workers)):
                key = "epoch" if gpu else "epoch_cpu"
                r[key], r[key + "_wait"], r[key + "_steady"] = ips, wait, steady
                print(
                    f"  --{'' if gpu else 'no-'}gpu-decode epoch {e + 1} of {n_train} images: {ips:.0f} img/s, "
                    f"data wait {100 * wait:.1f}% (first batch {first:.2f} s: worker start-up; the other batches "
                    f"{100 * steady:.1f}%)",
                    flush=True,
                )
        cfg = lp.finalize_config(lp.Config(data="imagenet_lt", workers=workers, eval_batch_size=B))
        views = lp.Views(lp.ImageSet(paths[:n_eval], [0] * n_eval), tte)
        t0 = time.perf_counter()
        lp.over_dataset(lambda v: lp.tte_logits(model, v), model, views, cfg)
        r["eval_real"] = n_eval / (time.perf_counter() - t0)
        print(
            f"  real evaluation (lp.over_dataset, TTE, --gpu-decode, compiled) of {n_eval} images: "
            f"{r['eval_real']:.0f} img/s"
        )
    gib_rows = "\n".join(f"| {n} | {v:.0f} | {peak} |" for n, v, peak in rows)
    print(f"\n| measurement | images/s | GPU memory |\n|---|---|---|\n{gib_rows}")
    print(
        f"compiled training step: {r['train_tflops']:.0f} TFLOP/s; compiled evaluation: {r['eval_tflops']:.0f} "
        "TFLOP/s (the bf16 matrix ceiling of an H200: about 790)"
    )
    train_rate, eval_rate = min(r["train"], r["gpu_input"]), min(r["eval"], r["gpu_input_tte"])
    checks = [
        ("training step, compiled, batch 128", r["train"], TARGETS["train"], ">="),
        ("five-crop evaluation, compiled, batch 128", r["eval"], TARGETS["eval"], ">="),
        ("GPU input path (MDA)", r["gpu_input"], TARGETS["gpu_input"], ">="),
        ("data wait %, real epoch, --gpu-decode (the last)", 100 * r["epoch_wait"], 100 * TARGETS["data_wait"], "<"),
    ]
    compiling = r["compile_train_s"] + r["compile_eval_s"]
    for run, n_train_run, epochs, n_test, target in RUNS:
        slower = (epochs * n_train_run / train_rate + n_test / eval_rate) / 60
        real = (epochs * n_train_run / r["epoch"] + n_test / r["eval_real"]) / 60
        print(
            f"projected {run}: {epochs} x {n_train_run:,} images at {train_rate:.0f} img/s + TTE of {n_test:,} at "
            f"{eval_rate:.0f} img/s = {slower:.1f} min (at the real epoch's {r['epoch']:.0f} and real evaluation's "
            f"{r['eval_real']:.0f} img/s: {real:.1f} min; compiling once: {compiling:.0f} s more)"
        )
        checks.append((f"{run} end to end, min", slower, TARGETS[target], "<="))
    print("\n| target | measured | goal | met |\n|---|---|---|---|")
    for what, value, goal, op in checks:
        met = {">=": value >= goal, "<": value < goal, "<=": value <= goal}[op]
        print(f"| {what} | {value:.1f} | {op} {goal:g} | {'yes' if met else 'NO'} |")
    print(f"bench --gpu took {time.perf_counter() - t_start:.0f} s")


def frozen_feature_modes(count=2000, threads=2):
    """Classifier-only epochs on ViT-B/32 features: running the frozen backbone every epoch against
    --cache-features; and the one-pass modes (zero-shot evaluation, class-mean and linear-probe inits)."""
    import open_clip

    torch.set_num_threads(threads)
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(count) % 50
    data = lp.LTData(
        lp.ImageSet(images, labels),
        lp.ImageSet(images[:10], labels[:10]),
        [f"class {i}" for i in range(50)],
        np.bincount(labels),
    )
    cfg = lp.finalize_config(
        lp.Config(
            data="bench",
            model="ViT-B-32",
            tuning="classifier",
            workers=0,
            batch_size=128,
            epochs=1,
            eval_batch_size=128,
            log_every=10**6,
            out=tempfile.mkdtemp(),
        )
    )
    clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    model = lp.LiftModel(clip.visual, (0.5,) * 3, (0.5,) * 3, 50, 25.0)  # CPU: train takes the device from the model
    lp.configure_tuning(model, cfg, 50)
    lp.make_fast(model)  # as lift_plus's fit (--fast, the default)
    S = model.image_size  # 224
    t_backbone = timed(
        lambda: lp.train(cfg, data, model, lp.Job(lp.dataclasses.replace(cfg, run_name="a"), data, model))
    )
    view = lp.Views(data.train, lp.EvalTransform(S, S, False))
    feats = {}
    t_extract = timed(lambda: feats.update(f=lp.extract_features(model, view, cfg)))
    job = lp.Job(lp.dataclasses.replace(cfg, run_name="b"), data, model, feats["f"])
    t_cached = timed(lambda: lp.train(cfg, data, model, job))
    f, y = feats["f"]
    t_mean = timed(lambda: lp.init_from_features(f, y, 50, "class_mean"))
    t_probe = timed(lambda: lp.init_from_features(f, y, 50, "linear_probe"))
    return {
        "images": count,
        "backbone_epoch_s": t_backbone,
        "extract_s": t_extract,
        "cached_epoch_s": t_cached,
        "class_mean_fit_s": t_mean,
        "linear_probe_fit_s": t_probe,
    }


# ------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one warm-up and two timed repeats, fewer images")
    p.add_argument(
        "--input-only",
        action="store_true",
        help="only the input path against the model's training rate (and its one training-step measurement)",
    )
    p.add_argument(
        "--gpu", action="store_true", help="only the GPU rows and the projected ImageNet-LT / iNaturalist wall-clock"
    )
    p.add_argument("--dry-run", action="store_true", help="with --gpu: the same code on this CPU, tiny sizes (a check)")
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
        if not (torch.cuda.is_available() or args.dry_run):
            sys.exit("bench.py --gpu: no CUDA device here (--dry-run runs its code on the CPU)")
        return gpu_rows(args.quick, "cpu" if args.dry_run else "cuda", args.dry_run)
    reps = 2 if args.quick else 3
    gib = 2**30
    if args.input_only:
        print(
            f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 threads, fp32, random-weight ViT-B/16 at 224, "
            f"{K} classes"
        )
        input_vs_model(args.quick, measure("train", 32, "fast", "default", repeats=reps))
        if torch.cuda.is_available():
            print()
            gpu_rows(args.quick)  # the GPU's input path against its training rate
        return
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 threads, fp32, random-weight ViT-B/16 at 224, {K} classes"
    )
    peak = matmul_gflops()
    dlogit, dgrad = check_equivalence()
    print(f"fp32 matmul ceiling: {peak:.0f} GFLOP/s (authors' figure on this kind: {AUTHORS['matmul_gflops']:.0f})")
    print(f"fast vs plain, same weights: max |logit diff| {dlogit:.2e}, max relative gradient diff {dgrad:.2e}")
    print(
        f"FLOPs per image: forward {forward_flops(False) / 1e9:.1f} G (ours {forward_flops(True) / 1e9:.1f} G: "
        f"class-token-only last block); training step {step_flops(False) / 1e9:.1f} G "
        f"(ours {step_flops(True) / 1e9:.1f} G)"
    )
    print()
    print("| measurement | malloc | plain | ours | ours / plain | authors | ours / authors |")
    print("|---|---|---|---|---|---|---|")
    rows = [
        ("train", 8, "default", "step8_s"),
        ("train", 32, "default", "step32_s"),
        ("train", 32, "tuned", "step32_tuned_s"),
        ("eval", 32, "default", "eval32_s"),
        ("eval_tte", 32, "default", "eval32_tte_s"),
    ]
    results = {}
    for what, batch, malloc, key in rows:
        fast = measure(what, batch, "fast", malloc, repeats=reps)
        plain = measure(what, batch, "plain", malloc, repeats=reps)
        results[key] = (fast, plain)
        per = f" ({1000 * fast['median_s'] / batch:.0f} ms/img)"
        if what == "train":

            def util(r, cls):
                return 100 * step_flops(cls) * batch / r["median_s"] / 1e9 / peak

            per = f" ({1000 * fast['median_s'] / batch:.0f} ms/img, {util(fast, True):.0f}% of ceiling)"
        name = {
            "train": f"training step, batch {batch}",
            "eval": "evaluation, batch 32, one crop",
            "eval_tte": "evaluation, batch 32, five-crop TTE",
        }[what]
        print(
            f"| {name} | {malloc} | {plain['median_s']:.2f} s | {fast['median_s']:.2f} s{per} | "
            f"{fast['median_s'] / plain['median_s']:.2f} | {AUTHORS[key]:.2f} s | "
            f"{fast['median_s'] / AUTHORS[key]:.2f} |"
        )
        if (what, batch) == ("train", 32):
            print(
                f"| peak memory of that step above the model | {malloc} | {plain['peak_bytes'] / gib:.2f} GiB | "
                f"{fast['peak_bytes'] / gib:.2f} GiB | {fast['peak_bytes'] / plain['peak_bytes']:.2f} | "
                f"{AUTHORS['step32_peak_gib']:.2f} GiB | {fast['peak_bytes'] / gib / AUTHORS['step32_peak_gib']:.2f} |"
            )
    rates = input_pipeline(100 if args.quick else 200)
    for t in ("mda", "tte"):
        name = {"mda": "input: MDA training transform", "tte": "input: TTE transform"}[t]
        print(
            f"| {name} (JPEG 500x375, 1 core) | | {rates[t + '_plain']:.0f} img/s | {rates[t + '_fast']:.0f} img/s | "
            f"{rates[t + '_fast'] / rates[t + '_plain']:.2f}x faster | | |"
        )
    fm = frozen_feature_modes(500 if args.quick else 2000)
    print(
        f"| classifier-only epoch, {fm['images']} images, ViT-B/32 | | "
        f"backbone every epoch {fm['backbone_epoch_s']:.1f} s | "
        f"cached features {fm['cached_epoch_s']:.2f} s (+ {fm['extract_s']:.1f} s once) | "
        f"{fm['backbone_epoch_s'] / fm['cached_epoch_s']:.0f}x faster per epoch | | |"
    )
    print(
        f"| one-pass frozen modes on those features | | | zero-shot / feature pass {fm['extract_s']:.1f} s, "
        f"class-mean fit {fm['class_mean_fit_s']:.3f} s, linear-probe fit {fm['linear_probe_fit_s']:.2f} s | | | |"
    )
    input_vs_model(args.quick, results["step32_s"][0])
    if torch.cuda.is_available():
        print()
        gpu_rows(args.quick)


if __name__ == "__main__":
    main()
