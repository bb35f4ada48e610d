"""What the GPU check concludes from its sections, and its one markdown table.

The decisions are the two settings the check exists to decide: `model.ffn_impl=auto` (Triton
only where every paper shape is correct and faster than torch eager, forward + backward) and
`parallel.compile` on CUDA (on only where compiling made both training phases' steps faster).
A decision without its measurement says `undecided` and why, never a default.
"""
from __future__ import annotations

TRITON_TOLERANCE = 2e-2  # worst error relative to the tensor's max, bf16 (eps 7.8e-3) over a reduction


def results_of(records: list[dict], name: str) -> dict | None:
    record = next((r for r in records if r["name"] == name), None)
    return record["results"] if record and record["status"] == "ok" else None


def ffn_decision(records: list[dict]) -> dict:
    results = results_of(records, "memory_ffn")
    if not results or not results.get("presets"):
        return {"value": "undecided", "why": "the memory_ffn section did not finish ok"}
    presets = results["presets"]
    raised = [n for n, p in presets.items() if "error" in p]
    if raised:
        return {"value": "torch", "why": f"the benchmark raised on {raised}: {presets[raised[0]]['error']}"}
    if any("triton_error" not in p for p in presets.values()):
        return {"value": "undecided", "why": "triton did not run on every preset (no CUDA?)"}
    wrong = [n for n, p in presets.items() if p["triton_error"] > TRITON_TOLERANCE]
    slower = [n for n, p in presets.items() if p["triton_vs_eager"] < 1.0]
    if wrong or slower:
        return {"value": "torch", "why": f"triton wrong on {wrong or 'none'} (tolerance {TRITON_TOLERANCE:g}), "
                                         f"slower than eager on {slower or 'none'}"}
    return {"value": "triton", "why": "correct and faster than torch eager (fwd+bwd) on every paper shape"}


def compile_decision(records: list[dict]) -> dict:
    eager, compiled = results_of(records, "train_160m"), results_of(records, "train_160m_compile")
    if not eager or not compiled:
        return {"value": "undecided", "why": "train_160m and train_160m_compile did not both finish ok"}
    ratios = {}
    for phase in ("pretrain", "memory"):
        before, after = eager["phases"].get(phase, {}), compiled["phases"].get(phase, {})
        if not before.get("step_s") or not after.get("step_s"):
            return {"value": "undecided", "why": f"no {phase} step time in both runs"}
        ratios[phase] = before["step_s"] / after["step_s"]
    faster = all(r > 1.05 for r in ratios.values())
    speedups = ", ".join(f"{phase} {r:.2f}x" for phase, r in ratios.items())
    return {"value": "on" if faster else "off", "why": f"compiled step speed-up: {speedups} (on needs > 1.05x in both)",
            "first_step_s": compiled["phases"]["pretrain"].get("first_step_s")}


def step_ratio(records: list[dict], over: tuple[str, str], under: tuple[str, str]) -> float | None:
    """Median step time of (section, phase) `over` divided by that of `under`; None when either is missing."""
    times = []
    for name, phase in (over, under):
        results = results_of(records, name)
        times.append(((results or {}).get("phases", {}).get(phase) or {}).get("step_s"))
    return times[0] / times[1] if all(times) else None


def comparisons(records: list[dict]) -> dict:
    """The ratios the training sections exist for (None where a section did not finish ok)."""
    return {
        "memory phase step / widened anchor step": step_ratio(records, ("train_160m", "memory"),
                                                             ("train_160m_widened", "pretrain")),
        "memory phase step / anchor pretraining step": step_ratio(records, ("train_160m", "memory"),
                                                                 ("train_160m", "pretrain")),
        "activation checkpointing step / without, memory phase": step_ratio(
            records, ("train_160m_checkpointing", "memory"), ("train_160m", "memory")),
        "compiled step / eager, memory phase": step_ratio(records, ("train_160m_compile", "memory"),
                                                          ("train_160m", "memory")),
    }


def decisions(records: list[dict]) -> dict:
    return {"model.ffn_impl=auto": ffn_decision(records), "parallel.compile (cuda)": compile_decision(records)}


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    mode = "smoke (CPU, tiny shapes: the numbers mean nothing)" if report["smoke"] else "GPU"
    lines = [f"# GPU check, {report['started']}, {mode}", "",
             f"{report['elapsed_s']} s of a {report['time_limit_s']:g} s limit.", "",
             "| section | status | seconds | result |", "| --- | --- | ---: | --- |"]
    for record in report["sections"]:
        summary = record.get("results", {}).get("summary", "")
        text = "; ".join(x for x in (summary, record.get("error") or "") if x)
        lines.append(f"| {record['name']} | {record['status']} | {record.get('seconds', 0)} | {cell(text)} |")
    for name, ratio in report["comparisons"].items():
        value = "n/a: a section it needs did not finish ok" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| comparison: {cell(name)} | | | {value} |")
    for name, decision in report["decisions"].items():
        lines.append(f"| decision: {cell(name)} | {decision['value']} | | {cell(decision['why'])} |")
    return "\n".join(lines) + "\n"
