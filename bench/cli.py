"""`python -m bench`: run the sections, print the table and the ratios, write the JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench import report
from bench.dataset import source_cells, write_cells
from bench.runner import (
    BenchError,
    nightly_for_store,
    run_child_section,
    run_leukoflow,
    run_plain_script,
)
from leukoflow.errors import LeukoflowError
from leukoflow.features import backbones as bb

SECTIONS = (
    "compute_limit",
    "plain_script",
    "leukoflow",
    "precision",
    "decode_stage",
    "memory",
    "color_morphology",
    "join_train",
    "nightly_score",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput of leukoflow against the compute limit and a plain script.",
    )
    add = parser.add_argument
    add("--n", type=int, default=64, help="Images for sections 1-3 (default 64)")
    add("--backbones", default=",".join(bb.DEFAULT_BACKBONES), help="Comma list, in order")
    add("--image-size", type=int, default=224)
    add("--weights", default="none", help="none (random init; same compute) or imagenet")
    add("--batch-size", type=int, default=32, help="Batch of the plain script and leukoflow")
    add("--batch-sizes", default="8,16,32,64", help="Sweep of the compute limit")
    add("--min-seconds", type=float, default=2.0, help="Timing per sweep point (after warm-up)")
    add("--memory-factor", type=int, default=4, help="Memory: peak at FACTOR x N against N")
    add("--cm-images", type=int, default=100, help="Cells for color_morphology (450 px)")
    add("--join-n", type=int, default=10_000, help="Generated images for join + train")
    add("--join-calibration", action="store_true", help="Also time run's calibration folds")
    add("--nightly-new", type=int, default=16, help="New images in the nightly sweep")
    add("--s3-images", type=int, default=128, help="Objects for the decode stage's S3 reads")
    add("--source", type=Path, default=None, help="Real cells (all/, hem/); default synthetic")
    add("--sections", default=",".join(SECTIONS), help="Comma list of sections to run")
    add("--skip", default="", help="Comma list of sections to leave out")
    add("--workdir", type=Path, default=None, help="Scratch folder (default: a temporary one)")
    add("--out", type=Path, default=Path("bench-output/results.json"), help="JSON results")
    add("--render", type=Path, default=None, help="Only print the table of an earlier JSON")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, workdir: Path, images: Path) -> dict:
    names = bb.parse_backbones(args.backbones)
    bb.check_image_size(names, args.image_size)
    if args.weights not in ("none", "imagenet"):
        raise LeukoflowError("--weights is none or imagenet (files from $KERAS_HOME/models)")
    if args.n < 1 or args.batch_size < 1 or args.memory_factor < 2:
        raise LeukoflowError("--n and --batch-size must be >= 1, --memory-factor >= 2")
    return {
        "n": args.n,
        "backbones": names,
        "image_size": args.image_size,
        "weights": args.weights,
        "batch_size": args.batch_size,
        "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
        "min_seconds": args.min_seconds,
        "memory_factor": args.memory_factor,
        "cm_images": args.cm_images,
        "join_n": args.join_n,
        "join_calibration": args.join_calibration,
        "nightly_new": args.nightly_new,
        "s3_images": args.s3_images,
        "images": str(images),
        "workdir": str(workdir),
    }


def selected_sections(args: argparse.Namespace) -> list[str]:
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = sorted((set(chosen) | skipped) - set(SECTIONS))
    if unknown:
        raise LeukoflowError(f"unknown section {', '.join(unknown)}; sections: {SECTIONS}")
    return [s for s in SECTIONS if s in chosen and s not in skipped]


def machine() -> dict:
    """What the numbers were measured on, and how busy the machine was when they started."""
    model = platform.processor()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpus = []
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        gpus = [line.strip() for line in listing.stdout.splitlines() if line.strip()]
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "gpus": gpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


class Bench:
    """One harness run: its settings, scratch folder, and the results as they come in."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.cells = source_cells(args.source, workdir / "sources")
        self.images = write_cells(workdir / "images-n", self.cells, 0, args.n)
        self.settings = settings_from(args, workdir, self.images)
        self.stores: dict[int, Path] = {}  # images in the store -> store (for the nightly)
        self.results: dict = {
            "started_at": datetime.now(UTC).isoformat(),
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "machine": machine(),
            "settings": {k: v for k, v in self.settings.items() if k not in ("images", "workdir")},
            "source": str(args.source) if args.source else "synthetic 450 px cells",
            "sections": {},
        }

    def run(self, name: str) -> dict:
        load_before = os.getloadavg()[0]
        result = getattr(self, f"_{name}")()
        result["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        return result

    def _compute_limit(self) -> dict:
        return run_child_section("compute_limit", self.settings, self.workdir)

    def _plain_script(self) -> dict:
        return run_plain_script(self.settings, self.images, self.workdir)

    def _leukoflow(self) -> dict:
        store = self.workdir / "store-n"
        result = run_leukoflow(self.settings, self.images, store, self.workdir, "leukoflow")
        self.stores[self.args.n] = store
        return result

    def _base_run(self) -> dict:
        """The leukoflow section's result, run now if it was not selected."""
        if "leukoflow" not in self.results["sections"]:
            self.results["sections"]["leukoflow"] = self.run("leukoflow")
        base = self.results["sections"]["leukoflow"]
        if "peak_rss_mb" not in base:
            raise BenchError("this section builds on the leukoflow section, which failed")
        return base

    def _section(self, name: str) -> dict:
        """Another section's result, run now if it was not selected (the fp32 side of the
        precision section)."""
        if name not in self.results["sections"]:
            try:
                self.results["sections"][name] = self.run(name)
            except (BenchError, TimeoutError) as error:
                self.results["sections"][name] = {"error": str(error)}
        found = self.results["sections"][name]
        if "images_per_second" not in found:
            raise BenchError(f"the precision section builds on the {name} section, which failed")
        return found

    def _precision(self) -> dict:
        """Compute limit, plain script and `leukoflow run` in bf16, beside the fp32 sections of
        the same run; bf16 counts only on hardware that runs it natively (AMX, AVX512-BF16,
        GPUs with bf16 tensor cores): elsewhere it is emulated and slower than fp32."""
        fp32 = {k: self._section(k) for k in ("compute_limit", "plain_script", "leukoflow")}
        bf16_settings = {**self.settings, "precision": "bf16"}
        bf16 = {
            "compute_limit": run_child_section(
                "compute_limit", bf16_settings, self.workdir, label="compute_limit-bf16"
            ),
            "plain_script": run_plain_script(bf16_settings, self.images, self.workdir),
            "leukoflow": run_leukoflow(
                bf16_settings, self.images, self.workdir / "store-bf16", self.workdir,
                "leukoflow-bf16",
            ),
        }  # fmt: skip
        return {
            "native_precision_here": bb.native_precision(),
            "bf16_cpu_flags": sorted({"amx_bf16", "amx_tile", "avx512_bf16"} & bb.cpu_flags()),
            "gpu_compute_capabilities": bb.gpu_compute_capabilities(),
            "images_per_second": {
                precision: {k: sections[k]["images_per_second"] for k in sections}
                for precision, sections in (("fp32", fp32), ("bf16", bf16))
            },
            "bf16": bf16,
        }

    def _decode_stage(self) -> dict:
        return run_child_section("decode_stage", self.settings, self.workdir)

    def _memory(self) -> dict:
        base = self._base_run()
        big_n = self.args.n * self.args.memory_factor
        images = write_cells(self.workdir / "images-kn", self.cells, 0, big_n)
        store = self.workdir / "store-kn"
        big = run_leukoflow(self.settings, images, store, self.workdir, "leukoflow-kn")
        self.stores[big_n] = store
        return {
            "n": self.args.n,
            "peak_rss_mb_n": base["peak_rss_mb"],
            "factor": self.args.memory_factor,
            "peak_rss_mb_factor_n": big["peak_rss_mb"],
            "growth": big["peak_rss_mb"] / base["peak_rss_mb"] - 1.0,
            "run_factor_n": big,
        }

    def _color_morphology(self) -> dict:
        return run_child_section("color_morphology", self.settings, self.workdir)

    def _join_train(self) -> dict:
        return run_child_section("join_train", self.settings, self.workdir)

    def _nightly_score(self) -> dict:
        if not score_exists():
            return {"skipped": "`leukoflow score` (flows/score.py) does not exist yet"}
        self._base_run()
        per_store = {}
        for size, store in sorted(self.stores.items()):
            images = self.workdir / ("images-n" if size == self.args.n else "images-kn")
            per_store[str(size)] = nightly_for_store(
                store, images, self.cells, self.args.nightly_new, self.workdir, f"s{size}"
            )
        return {"stores": per_store}


def score_exists() -> bool:
    """Whether the nightly sweep (flows/score.py, `leukoflow score`) is there to measure."""
    import importlib.util

    return importlib.util.find_spec("leukoflow.flows.score") is not None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        results["ratios"] = report.ratios(results["sections"])
        results["goals"] = report.goals(results["sections"], results["ratios"])
        print(report.render(results))
        return 0
    try:
        sections = selected_sections(args)
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="leukoflow-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, workdir)
    except LeukoflowError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    print(f"bench: {args.n} images in {workdir}; sections: {', '.join(sections)}", flush=True)
    failed = False
    for name in SECTIONS:
        if name not in sections or name in bench.results["sections"]:
            continue  # not selected, or already run as another section's prerequisite
        started = time.perf_counter()
        print(f"bench: {name} ...", flush=True)
        try:
            bench.results["sections"][name] = bench.run(name)
        except (BenchError, TimeoutError) as error:
            bench.results["sections"][name] = {"error": str(error)}
            print(f"bench: {name} failed: {error}", file=sys.stderr, flush=True)
            failed = True
        print(f"bench: {name} done in {time.perf_counter() - started:.0f}s", flush=True)
        _write(args.out, bench.results)  # partial results survive a later failure
    done = bench.results["sections"]
    bench.results["sections"] = {n: done.get(n, {"skipped": "not selected"}) for n in SECTIONS}
    bench.results["ratios"] = report.ratios(bench.results["sections"])
    bench.results["goals"] = report.goals(bench.results["sections"], bench.results["ratios"])
    bench.results["finished_at"] = datetime.now(UTC).isoformat()
    _write(args.out, bench.results)
    print(report.render(bench.results))
    print(f"bench: results in {args.out}")
    if args.workdir is None and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)
