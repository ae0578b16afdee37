"""Shared bench helpers: machine facts for result files, SD1.5-width denoisers, synthetic banks, the
tables of docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from seqlora_core.baselines.frozen_slots import random_orthonormal  # noqa: E402
from seqlora_core.method.bank import Concept, ConceptBank, ConceptLayer  # noqa: E402
from seqlora_core.method.compose import compose  # noqa: E402
from seqlora_core.method.stats import Sketch  # noqa: E402
from seqlora_core.method.targets import find_targets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(ap):
    """Parse a bench's arguments, adding ``--threads`` (torch threads) and applying it."""
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def machine() -> dict:
    """What ran the benchmark."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=1))
    return path


def sd15_unet(full: bool, device: str = "cpu"):
    """An SD1.5-width UNet with random weights: full depth, or one layer per block (same widths)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2 if full else 1,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=64,
    )
    return unet.to(device)


def synthetic_bank(
    model: torch.nn.Module, n_concepts: int, rank: int = 4, targets: str = "attn", sketch_rank: int = 8, seed: int = 0
) -> ConceptBank:
    """A bank of ``n_concepts`` random concepts with the shapes a trained one would have.

    Bases are disjoint slots of one random orthonormal basis per width (soft where a layer is full),
    up factors small and random, sketches random rank-``sketch_rank``. For timing and memory only.
    """
    specs = find_targets(model, targets)
    g = torch.Generator().manual_seed(seed)
    bases = {}
    prior = {}
    for s in specs:
        if s.in_features not in bases:
            bases[s.in_features] = random_orthonormal(s.in_features, seed)
        prior[s.name] = _random_sketch(s.in_features, sketch_rank, g)
    concepts = []
    for t in range(n_concepts):
        layers = {}
        for s in specs:
            slots = s.in_features // rank
            a = bases[s.in_features][(t % slots) * rank : (t % slots + 1) * rank].clone()
            b = torch.randn(s.out_features, rank, generator=g) * 1e-3
            layers[s.name] = ConceptLayer(a, b, _random_sketch(s.in_features, sketch_rank, g), soft=t >= slots)
        concepts.append(Concept(f"concept_{t:03d}", [f"tok{t}"], rank, "seqlora", layers))
    return ConceptBank(specs, "diffusers", "sd15-width", prior, concepts)


def _random_sketch(n: int, k: int, g: torch.Generator) -> Sketch:
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.rand(k, generator=g).sort(descending=True).values + 0.1
    return Sketch(u.contiguous(), s.contiguous(), float(s.sum()) * 1.01)


BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"


def update_tables(tag: str, markdown: str, doc: Path = BENCHMARKS_DOC) -> bool:
    """Replace the text between ``<!-- bench:TAG -->`` and ``<!-- /bench:TAG -->`` in docs/benchmarks.md;
    False if the markers are absent."""
    text = doc.read_text()
    start, end = f"<!-- bench:{tag} -->", f"<!-- /bench:{tag} -->"
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{markdown.strip()}\n{end}{tail}")
    return True


class PeakRSS:
    """Samples the process's resident memory every 20 ms while active (CPU peak memory)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        """Resident bytes now (Linux /proc); elsewhere the process's peak so far (ru_maxrss, KiB on Linux)."""
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakRSS:
        self.peak = self.now()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def bank_costs(model: torch.nn.Module, bank: ConceptBank) -> dict:
    """What a bank costs: its file size, the input moments it stores (`fusion`), and the time and peak
    RSS of composing all of it into ``model`` (merged; undone afterwards)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank.safetensors"
        bank.save(path)
        bank_bytes = path.stat().st_size
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        comp = compose(model, bank, None, "merged")
        compose_s = time.perf_counter() - t0
        comp.remove()
    moments = sum(cl.moment.numel() * 4 for c in bank.concepts for cl in c.layers.values() if cl.moment is not None)
    return {"bank_bytes": bank_bytes, "moment_bytes": moments, "compose_s": compose_s, "compose_peak_rss": mem.peak}
