"""Training throughput: napari-mevae's Trainer against a plain eager PyTorch ME-VAE.

    python benchmarks/bench_training.py            # full run, rewrites docs/benchmarks.md
    python benchmarks/bench_training.py --quick    # short run (fewer rounds, 2 configurations)

Both sides train the reference architecture (2 encoders, latent 32) on the same in-memory
images with the same batch size.  The plain side is written out below on purpose: a
straightforward ``nn.Module``, sigmoid + BCE * S*S + mean KL, RMSprop lr 5e-4, a plain
``DataLoader``, float32, default threads.  The project side is ``napari_mevae.training.Trainer``
with its default ``TrainOptions`` (only ``batch_size``, ``epochs``, ``seed`` and ``earlystop``
set, so the run does not end while it is being timed).

Measuring on a shared machine: every variant lives in its OWN persistent worker process (so no
process-global setting of one side - flush-denormal, malloc tuning, thread pools - can leak into
the other) and the parent runs them in short alternating blocks of steps, ``ABBA`` order.  The
ratio is the median over rounds of the per-round ratio of adjacent blocks, so load from other
processes hits both sides alike.  FLOPs are counted with ``torch.utils.flop_counter`` on one
forward + backward step of the plain model (both sides run the same architecture); the matmul
peak is a large float32 ``torch.mm`` timed between rounds in the parent.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _docs import replace_section  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Training throughput"
NOTES_MARKER = "<!-- training-throughput-notes -->"
LATENT = 32


# -- the plain eager reference implementation ---------------------------------------------------
class PlainEncoder(nn.Module):
    def __init__(self, channels: int, size: int, latent: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.dense = nn.Linear(64 * (size // 8) ** 2, 128)
        self.mean = nn.Linear(128, latent)
        self.logvar = nn.Linear(128, latent)

    def forward(self, x):
        h = F.relu(self.dense(self.convs(x).flatten(1)))
        return self.mean(h), self.logvar(h)


class PlainMEVAE(nn.Module):
    def __init__(self, channels: int = 1, size: int = 128, latent: int = LATENT) -> None:
        super().__init__()
        self.size = size
        self.enc1 = PlainEncoder(channels, size, latent)
        self.enc2 = PlainEncoder(channels, size, latent)
        self.dense = nn.Linear(latent, 64 * (size // 8) ** 2)
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(64, 128, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, channels, 3, stride=1, padding=1),
        )

    def forward(self, x):
        m1, v1 = self.enc1(x[:, 0])
        m2, v2 = self.enc2(x[:, 1])
        z1 = m1 + torch.exp(0.5 * v1) * torch.randn_like(m1)
        z2 = m2 + torch.exp(0.5 * v2) * torch.randn_like(m2)
        h = F.relu(self.dense(z1 * z2)).view(-1, 64, self.size // 8, self.size // 8)
        return torch.sigmoid(self.deconvs(h)), (m1, v1), (m2, v2)


def plain_loss(recon, target, posteriors, size):
    kls = [-0.5 * torch.sum(1 + v - m.pow(2) - v.exp(), dim=-1) for m, v in posteriors]
    return F.binary_cross_entropy(recon, target) * size * size + (sum(kls) / len(kls)).mean()


def plain_steps(dataset, size: int, batch: int, device: str = "cpu"):
    """Endless plain training loop; yields the batch size after every optimizer step."""
    model = PlainMEVAE(size=size).to(device)
    opt = torch.optim.RMSprop(model.parameters(), lr=5e-4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True)
    model.train()
    while True:
        for x, target in loader:
            x, target = x.to(device), target.to(device)
            recon, p1, p2 = model(x)
            loss = plain_loss(recon, target, [p1, p2], size)
            opt.zero_grad()
            loss.backward()
            opt.step()
            yield x.shape[0]


def project_steps(dataset, size: int, batch: int, options: dict, device: str = "cpu"):
    from napari_mevae.config import TrainOptions, preset
    from napari_mevae.training import Trainer

    # the reference's loss, as the plain loop's: the invariance term (more work) is off
    options = {"device": device, "invariance": 0.0, **options}
    opts = TrainOptions(batch_size=batch, epochs=10**6, seed=0, earlystop=False, **options)
    trainer = Trainer(preset("reference", image_size=size, latent_dim=LATENT), dataset, opts)
    for report in trainer.run():
        if report.kind == "step":
            yield batch  # the data set size is a multiple of the batch: full batches only


# -- data ---------------------------------------------------------------------------------------
def make_data(n: int, size: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Soft blobs (targets) and noisy, shifted copies (the two encoder inputs), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = (torch.rand(2, n, 1, 1, generator=g) * 0.5 + 0.25) * size
    r = (torch.rand(n, 1, 1, generator=g) * 0.1 + 0.05) * size
    blobs = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)).float()
    target = blobs[:, None]
    noise = torch.rand(n, 2, 1, size, size, generator=g) * 0.1
    inputs = (torch.roll(target[:, None].expand(n, 2, 1, size, size), 3, -1) + noise).clamp(0, 1)
    return torch.utils.data.TensorDataset(inputs.contiguous(), target.contiguous())


# -- workers ------------------------------------------------------------------------------------
def worker(
    conn, kind: str, size: int, batch: int, n_images: int, options: dict, device: str
) -> None:
    torch.manual_seed(0)
    data = make_data(n_images, size)
    steps = (
        plain_steps(data, size, batch, device)
        if kind == "plain"
        else project_steps(data, size, batch, options, device)
    )
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        block_s = float(msg)
        images, t0 = 0, time.perf_counter()
        while True:
            images += next(steps)
            if time.perf_counter() - t0 >= block_s:
                break
        if device.startswith("cuda"):  # the GPU may still be working through queued steps
            torch.cuda.synchronize()
        conn.send((images, time.perf_counter() - t0))


class Runner:
    def __init__(
        self, kind: str, size: int, batch: int, n_images: int, options: dict, device: str = "cpu"
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker, args=(child, kind, size, batch, n_images, options, device)
        )
        self.proc.start()
        t0 = time.perf_counter()
        assert self.conn.recv() == "ready"
        self.setup_s = time.perf_counter() - t0

    def block(self, seconds: float) -> tuple[float, float]:
        self.conn.send(seconds)
        images, dt = self.conn.recv()
        return images / dt, dt

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=30)


def exact_batches(n_images: int, batch: int) -> int:
    """A data set size that is a multiple of the batch (so every step is a full batch)."""
    return max(2, -(-n_images // batch)) * batch


# -- FLOPs and peak -----------------------------------------------------------------------------
def flops_per_image(size: int, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = PlainMEVAE(size=size)
    x, t = torch.rand(batch, 2, 1, size, size), torch.rand(batch, 1, size, size)
    with FlopCounterMode(display=False) as counter:
        recon, p1, p2 = model(x)
        plain_loss(recon, t, [p1, p2], size).backward()
    return counter.get_total_flops() / batch


def matmul_gflops(n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(best) / 1e9


# -- the run ------------------------------------------------------------------------------------
def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> extra TrainOptions (for A/B tests of options)."""
    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        opts[key] = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(opts[key], str) and re.fullmatch(r"-?\d+", opts[key]):
            opts[key] = int(opts[key])
    return name, opts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    from napari_mevae.speedups import _cpu_flags

    flags = _cpu_flags()
    if not flags:
        return "unknown"
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)


def run(args) -> str:
    configs = [(128, 10), (64, 10)] if args.quick else [(128, 10), (128, 64), (64, 10), (64, 64)]
    if args.configs:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    rounds = args.rounds or (3 if args.quick else 8)
    block_s = args.block or (1.0 if args.quick else 2.0)
    variants = [("project", {})] + [parse_variant(v) for v in args.variant]
    rows, extra_rows, peaks = [], [], []
    for size, batch in configs:
        n_images = exact_batches(args.images, batch)
        fpi = flops_per_image(size, batch)
        runners = {"plain": Runner("plain", size, batch, n_images, {}, args.device)}
        for name, opts in variants:
            runners[name] = Runner("project", size, batch, n_images, opts, args.device)
        names = list(runners)
        # warm-up: oneDNN primitive caches, first-touch memory, torch.compile if enabled
        warm = {name: r.block(args.warmup)[1] for name, r in runners.items()}
        ips = {name: [] for name in names}
        for rnd in range(rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                ips[name].append(runners[name].block(block_s)[0])
            peaks.append(matmul_gflops(device=args.device))
            print(
                f"  S={size} B={batch} round {rnd + 1}/{rounds}: "
                + ", ".join(f"{n} {ips[n][-1]:.1f}" for n in names)
                + " img/s",
                flush=True,
            )
        for r in runners.values():
            r.close()
        plain = statistics.median(ips["plain"])
        for name, _ in variants:
            ratio = statistics.median(a / b for a, b in zip(ips[name], ips["plain"], strict=True))
            proj = statistics.median(ips[name])
            row = (size, batch, plain, proj, ratio, fpi, warm[name])
            (rows if name == "project" else extra_rows).append((name, *row))
    peak = statistics.median(peaks)
    return report(rows, extra_rows, peak, args, rounds, block_s)


def report(rows, extra_rows, peak, args, rounds, block_s) -> str:
    cmd = "python benchmarks/bench_training.py" + (" --quick" if args.quick else "")
    cmd += f" --configs {args.configs}" if args.configs else ""
    cmd += "".join(f" --variant {v}" for v in args.variant)
    cmd += f" --device {args.device}" if args.device != "cpu" else ""
    from napari_mevae.speedups import resolve_precision

    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    precision = resolve_precision("auto", torch.device(args.device))
    gpu = (
        f" GPU: {torch.cuda.get_device_name(torch.device(args.device))}, both sides on it."
        if args.device.startswith("cuda")
        else ""
    )
    lines = [
        SECTION,
        "",
        f"Command: `{cmd}` (results below from {time.strftime('%Y-%m-%d %H:%M')}).",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPU(s), torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads (default), Python {platform.python_version()}; "
        f"CPU flags: {cpu_flags()}; oneDNN bf16 usable: {bf16}.{gpu}",
        f"Measured float32 matmul peak (2048x2048 torch.mm on {args.device}, median): "
        f"**{peak:.0f} GFLOP/s**.",
        "",
        f"Reference architecture, K=2, latent {LATENT}, 1 channel. Plain = eager nn.Module written "
        "in the benchmark (sigmoid + BCE, RMSprop, DataLoader); project = "
        "`napari_mevae.training.Trainer` with default options (precision `auto`, which is "
        f"**{precision}** on this machine; float32 weights, optimizer and loss). Each side runs "
        "in its own worker "
        f"process; {rounds} rounds of alternating ~{block_s:g} s blocks; img/s are medians, the "
        "ratio is the median of per-round ratios. GFLOP/s = analytic forward+backward FLOPs "
        "(FlopCounterMode) x img/s of the project trainer; fraction = GFLOP/s / float32 matmul "
        "peak (bf16 arithmetic can exceed 1).",
        "",
        "| image_size | batch | plain img/s | project img/s | ratio | project GFLOP/s | "
        "fraction of matmul peak | FLOPs/image (fwd+bwd) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _name, size, batch, plain, proj, ratio, fpi, _warm in rows:
        gf = proj * fpi / 1e9
        lines.append(
            f"| {size} | {batch} | {plain:.1f} | {proj:.1f} | **{ratio:.2f}x** | {gf:.1f} | "
            f"{gf / peak:.2f} | {fpi / 1e9:.2f} G |"
        )
    if extra_rows:
        lines += [
            "",
            "Other trainer options (same protocol; warm-up = first block, includes compile time):",
            "",
            "| variant | image_size | batch | plain img/s | variant img/s | ratio | warm-up s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, size, batch, plain, proj, ratio, _fpi, warm in extra_rows:
            lines.append(
                f"| {name} | {size} | {batch} | {plain:.1f} | {proj:.1f} | {ratio:.2f}x | "
                f"{warm:.1f} |"
            )
    return "\n".join(lines) + "\n"


def write_doc(section: str, path: Path = DOC) -> None:
    """Replace (or add) the Training throughput section, keeping its notes block."""
    body = section.split("\n", 1)[1]  # the section text starts with its own heading
    replace_section(path, SECTION[3:], body, keep_from=re.escape(NOTES_MARKER))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 configurations, 3 short rounds")
    p.add_argument("--rounds", type=int, default=0, help="alternating rounds per configuration")
    p.add_argument("--block", type=float, default=0.0, help="seconds per timed block")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of untimed warm-up")
    p.add_argument("--images", type=int, default=256, help="training images per configuration")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra trainer variant NAME:option=value,... (e.g. compiled:compile=true)",
    )
    p.add_argument("--configs", default="", help="e.g. 128x10,64x64 (image_size x batch)")
    p.add_argument("--no-write", action="store_true", help="print only, leave docs alone")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda[:N]: both sides train there; the project side with its "
        "default precision (bf16 or float16 autocast on GPUs)",
    )
    args = p.parse_args(argv)
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        p.error(f"--device {args.device}: only cpu, or cuda on a machine with a CUDA GPU")
    section = run(args)
    print(section)
    if not args.no_write:
        write_doc(section)
        print(f"written to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
