"""The harness's verdict: ratios between sections, goals met or not, and the printed table."""

from __future__ import annotations

# The goals (docs/benchmarks.md).
MIN_RATIO_TO_LIMIT = 0.90
MIN_RATIO_TO_PLAIN = 1.0
MAX_MEMORY_GROWTH = 0.10
MAX_NOTHING_NEW_SECONDS = 20.0
MAX_JOIN_TRAIN_SECONDS = 30.0
MIN_CM_IMAGES_PER_SECOND = 20.0
# Issue 15: on an AMX (or bf16 GPU) machine, bf16 leukoflow against fp32 plain script and
# against its own compute limit; the decode stage against cores x one core, S3 concurrency.
MIN_BF16_OVER_FP32_PLAIN = 2.0
MIN_BF16_OVER_BF16_LIMIT = 0.90
MIN_DECODE_OVER_CORES = 0.8
MIN_S3_CONCURRENCY_GAIN = 4.0
# "n new images among a store of many cost time proportional to n, not to the store": the same
# n new images on a store FACTOR times larger may cost at most this much more.
MAX_STORE_EFFECT = 0.15


def _rate(section: dict | None, key: str = "images_per_second") -> float | None:
    return None if not section or section.get(key) is None else float(section[key])


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return None if top is None or not bottom else round(top / bottom, 3)


def ratios(sections: dict) -> dict:
    """3/1 and 3/2 on steady-state throughput (the goals), and 3/2 on total wall time too."""
    limit, plain, ours = (sections.get(k) for k in ("compute_limit", "plain_script", "leukoflow"))
    return {
        "leukoflow_over_compute_limit": _ratio(_rate(ours), _rate(limit)),
        "leukoflow_over_plain_script": _ratio(_rate(ours), _rate(plain)),
        "leukoflow_over_plain_script_total_wall": _ratio(
            _rate(ours, "images_per_second_total"), _rate(plain, "images_per_second_total")
        ),
        "leukoflow_over_plain_script_to_last_vectors": _ratio(
            _rate(ours, "images_per_second_to_last_vectors"),
            _rate(plain, "images_per_second_total"),
        ),
        "basis": "steady-state images/s (engines up, models loaded); *_total_wall: images / "
        "wall time of the whole command; *_to_last_vectors: leukoflow from launch to its last "
        "Parquet file (extraction with start-up, no training) against the plain script's wall",
    }


def _goal(value: float | None, target: float, at_least: bool, unit: str) -> dict:
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"value": value, "target": f"{'>=' if at_least else '<='} {target} {unit}", "met": met}


def goals(sections: dict, ratio: dict) -> dict:
    """Each goal of the issue with the measured value; met is None where it was not measured."""
    memory = sections.get("memory") or {}
    join = sections.get("join_train") or {}
    color = sections.get("color_morphology") or {}
    nightly = (sections.get("nightly_score") or {}).get("stores") or {}
    nothing_new = [s["nothing_new"]["wall_seconds"] for s in nightly.values()]
    rates = (sections.get("precision") or {}).get("images_per_second") or {}
    bf16, fp32 = rates.get("bf16") or {}, rates.get("fp32") or {}
    decode = sections.get("decode_stage") or {}
    # The goal is read against an endpoint with an object store's wait (bench/latency.py): on
    # moto's ~1 ms answers alone, reads are bound by the CPU, which concurrency cannot multiply.
    s3 = (decode.get("s3") or {}).get("with_latency") or {}
    return {
        "end_to_end_vs_compute_limit": _goal(
            ratio["leukoflow_over_compute_limit"], MIN_RATIO_TO_LIMIT, True, "x"
        ),
        "end_to_end_vs_plain_script": _goal(
            ratio["leukoflow_over_plain_script"], MIN_RATIO_TO_PLAIN, True, "x"
        ),
        "memory_growth_factor_n_vs_n": _goal(memory.get("growth"), MAX_MEMORY_GROWTH, False, ""),
        "nightly_nothing_new_seconds": _goal(
            max(nothing_new) if nothing_new else None, MAX_NOTHING_NEW_SECONDS, False, "s"
        ),
        "nightly_with_new_images_larger_store_vs_smaller": _goal(
            _store_effect(nightly), MAX_STORE_EFFECT, False, "(relative change)"
        ),
        "join_train_seconds": _goal(
            join.get("join_train_seconds"), MAX_JOIN_TRAIN_SECONDS, False, "s"
        ),
        "color_morphology_images_per_second_per_core": _goal(
            color.get("images_per_second_per_core"), MIN_CM_IMAGES_PER_SECOND, True, "images/s"
        ),
        "bf16_leukoflow_over_fp32_plain_script": _goal(
            _ratio(bf16.get("leukoflow"), fp32.get("plain_script")),
            MIN_BF16_OVER_FP32_PLAIN, True, "x (AMX / bf16 GPU only)",
        ),
        "bf16_leukoflow_over_bf16_compute_limit": _goal(
            _ratio(bf16.get("leukoflow"), bf16.get("compute_limit")),
            MIN_BF16_OVER_BF16_LIMIT, True, "x",
        ),
        "decode_pipeline_over_cores_x_single_core": _goal(
            decode.get("pipeline_over_cores_x_single_core"), MIN_DECODE_OVER_CORES, True, "x"
        ),
        "decode_s3_concurrent_over_one_at_a_time": _goal(
            s3.get("concurrent_over_one_at_a_time"), MIN_S3_CONCURRENCY_GAIN, True, "x"
        ),
    }  # fmt: skip


def _store_effect(nightly: dict) -> float | None:
    """How much longer the sweep with the same n new images took on the larger store."""
    if len(nightly) < 2:
        return None
    small, large = (nightly[k]["with_new"]["wall_seconds"] for k in sorted(nightly, key=int)[:2])
    return round(large / small - 1.0, 3)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(results: dict) -> str:
    """The table of sections 1-3, the ratios and the goals, as plain text."""
    sections = results["sections"]
    machine = results["machine"]
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, "
        f"GPU: {', '.join(machine['gpus']) or 'none'}",
        f"settings: {results['settings']}",
        "",
        f"{'section':<34}{'steady img/s':>13}{'total img/s':>13}{'wall s':>9}{'peak RSS MB':>13}",
    ]
    rows = (
        ("1 compute limit (forward only)", "compute_limit"),
        ("2 plain script (PIL + predict)", "plain_script"),
        ("3 leukoflow run (end to end)", "leukoflow"),
    )
    for title, key in rows:
        s = sections.get(key) or {}
        lines.append(
            f"{title:<34}{_fmt(_rate(s)):>13}{_fmt(_rate(s, 'images_per_second_total')):>13}"
            f"{_fmt(s.get('wall_seconds'), 1):>9}{_fmt(s.get('peak_rss_mb'), 0):>13}"
        )
    limit = (sections.get("compute_limit") or {}).get("backbones") or {}
    for name, b in limit.items():
        lines.append(
            f"   {name:<31}{_fmt(b['images_per_second']):>13}   best batch {b['best_batch_size']}"
        )
    rates = (sections.get("precision") or {}).get("images_per_second") or {}
    for precision, found in rates.items():
        lines.append(
            f"   {precision}: limit {_fmt(found.get('compute_limit'))}, plain script "
            f"{_fmt(found.get('plain_script'))}, leukoflow {_fmt(found.get('leukoflow'))} img/s"
        )
    decode = sections.get("decode_stage") or {}
    if "pipeline" in decode:
        single = decode["single_core"]["images_per_second_wall"]
        lines.append(
            f"decode stage: 1 core {_fmt(single)} img/s, {decode['threads']['threads']}"
            f" threads {_fmt(decode['threads']['images_per_second'])}, trivial pipeline "
            f"{_fmt(decode['pipeline']['images_per_second'])} img/s on {decode['cores']} cores"
        )
        for name, s3 in (decode.get("s3") or {}).items():
            if isinstance(s3, dict):
                lines.append(
                    f"   S3 reads ({name}): one at a time "
                    f"{_fmt(s3['reads_per_second_one_at_a_time'])}/s, concurrent "
                    f"{_fmt(s3['reads_per_second_concurrent'])}/s"
                    f" ({_fmt(s3['concurrent_over_one_at_a_time'])}x)"
                )
    ratio = results["ratios"]
    lines += [
        "",
        f"ratio 3/1 (steady): {_fmt(ratio['leukoflow_over_compute_limit'], 3)}   "
        f"ratio 3/2 (steady): {_fmt(ratio['leukoflow_over_plain_script'], 3)}   "
        f"ratio 3/2 (total wall): {_fmt(ratio['leukoflow_over_plain_script_total_wall'], 3)}   "
        "ratio 3/2 (launch to last vectors): "
        f"{_fmt(ratio.get('leukoflow_over_plain_script_to_last_vectors'), 3)}",
        "",
        "goals:",
    ]
    for name, goal in results["goals"].items():
        verdict = {True: "met", False: "NOT met", None: "-"}[goal["met"]]
        value = goal["value"]
        value = {k: round(v, 3) for k, v in value.items()} if isinstance(value, dict) else value
        lines.append(f"  {name:<46} {_fmt(value, 3):>10}  ({goal['target']})  {verdict}")
    skipped = [k for k, s in sections.items() if "skipped" in s or "error" in s]
    for key in skipped:
        lines.append(f"  {key}: {sections[key].get('skipped') or sections[key].get('error')}")
    return "\n".join(lines)
