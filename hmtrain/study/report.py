"""A study's results: per arm, mean ± sample std over seeds, per model row and probe bucket and per level-1
subtree (hmtrain/eval/summary.py's tables, one per arm), and the memory phase's tokens per memory parameter
(hmtrain/eval/tokens_per_param.py) with the fetched memory's perplexity gains, as summary.md and summary.json, plus
the arms' figures (hmtrain/eval/figures.py) beside them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hmtrain.eval.figures import arms_long_tail, arms_overview, gain_vs_tokens_per_param
from hmtrain.eval.summary import GAINS, arms_markdown, perplexity_gains, subtree_markdown, subtree_summary, summarize
from hmtrain.eval.tokens_per_param import run_tokens_per_parameter
from hmtrain.util.files import write_text

SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"
OVERVIEW_PNG, LONG_TAIL_PNG = "arms_overview.png", "arms_long_tail.png"
GAIN_PNG = "gain_vs_tokens_per_param.png"


@dataclass
class Report:
    summary: dict
    markdown: Path
    json: Path
    figures: list[Path] = field(default_factory=list)


def study_summary(spec, per_arm: dict[str, dict[int, dict]], jobs_dir: Path) -> dict:
    """summary.json's content: the spec, and per arm its summary, its subtree summary, its tokens per memory
    parameter (from its first seed's run: the seeds differ in train.seed only), its gains and its results files."""
    arms = {}
    for arm in spec.arms:
        per_seed = per_arm[arm.name]
        arms[arm.name] = {"overrides": arm.overrides, "summary": summarize(per_seed),
                          "subtrees": subtree_summary(per_seed),
                          "tokens": run_tokens_per_parameter(jobs_dir / arm.name / f"seed{min(per_seed)}" / "memory"),
                          "gains": perplexity_gains(per_seed),
                          "results": {str(seed): str(jobs_dir / arm.name / f"seed{seed}" / "eval.json")
                                      for seed in per_seed}}
    return {"study": spec.name, "spec": str(spec.path), "base": {"config": spec.base_config,
                                                                  "overrides": spec.base_overrides},
            "seeds": spec.seeds, "arms": arms}


def study_markdown(summary: dict) -> str:
    parts = [f"# Study {summary['study']}\n", f"Spec: `{summary['spec']}`; base config `{summary['base']['config']}`"
             f" with {summary['base']['overrides'] or 'no overrides'}.\n",
             "Arms: " + "; ".join(f"**{name}** {arm['overrides']}" for name, arm in summary["arms"].items()) + ".\n",
             arms_markdown({name: arm["summary"] for name, arm in summary["arms"].items()}), tokens_markdown(summary)]
    for name, arm in summary["arms"].items():
        subtrees = subtree_markdown(arm["subtrees"])
        if subtrees:
            parts.append(f"Arm **{name}**: {subtrees}")
    return "\n".join(parts)


def tokens_markdown(summary: dict) -> str:
    """Per arm: the memory phase's tokens, per bank parameter and per level, and the fetched memory's gains."""
    arms = {name: arm for name, arm in summary["arms"].items() if arm["tokens"]}  # arms that trained a bank
    if not arms:
        return ""
    levels = sorted({level["level"] for arm in arms.values() for level in arm["tokens"]["levels"]})
    gains = [key for key in GAINS if any(key in arm["gains"] for arm in arms.values())]
    head = ["arm", "memory steps", "memory-phase tokens", "bank parameters", "tokens / parameter",
            *(f"level {level} tokens / parameter" for level in levels),
            *(f"gain over the {GAINS[key]} (%)" for key in gains)]
    rows = []
    for name, arm in arms.items():
        tokens, per_level = arm["tokens"], {level["level"]: level for level in arm["tokens"]["levels"]}
        rows.append([name, str(tokens["memory_steps"]), f"{tokens['tokens']:,}", f"{tokens['bank_parameters']:,}",
                     f"{tokens['tokens_per_parameter']:.3g}",
                     *(f"{per_level[level]['tokens_per_parameter']:.3g}" if level in per_level else "-"
                       for level in levels),
                     *(f"{arm['gains'][key]['mean']:+.2f} ± {arm['gains'][key]['std']:.2f}" if key in arm["gains"]
                       else "-" for key in gains)])
    lines = ["Memory-phase tokens (memory steps x global batch x seq_len, from each arm's run config) per memory "
             "parameter, of the whole bank and per level (a level-l row sees tokens / N_l); the gains are the "
             "fetched memory's held-out perplexity gain, 100 x (1 - ppl_fetched / ppl_other), per seed, then mean "
             f"± sample std over seeds {summary['seeds']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]
    crossing = dense_crossing(arms)
    return "\n".join(lines) + "\n" + (f"\n{crossing}\n" if crossing else "")


def dense_crossing(arms: dict[str, dict]) -> str:
    """Where the dense baseline stops winning, by the mean gains, arms in order of tokens per parameter."""
    shown = sorted((arm["tokens"]["tokens_per_parameter"], name, arm["gains"]["vs_dense"]["mean"])
                   for name, arm in arms.items() if "vs_dense" in arm["gains"])
    if not shown:
        return ""
    first = next((i for i in range(len(shown)) if all(gain > 0 for _, _, gain in shown[i:])), None)
    if first is None:
        return (f"The dense baseline has the lower mean perplexity at the most tokens per parameter measured "
                f"({shown[-1][0]:.3g}, arm {shown[-1][1]}).")
    if first == 0:
        return f"The fetched memory beats the dense baseline in every arm, from {shown[0][0]:.3g} tokens per parameter."
    (below, low, _), (above, high, _) = shown[first - 1], shown[first]
    return (f"The dense baseline stops winning between {below:.3g} (arm {low}) and {above:.3g} (arm {high}) tokens "
            "per parameter: from there on the fetched memory has the lower mean perplexity.")


def write_report(spec, per_arm: dict[str, dict[int, dict]], out: Path, jobs_dir: Path) -> Report:
    out = Path(out)
    summary = study_summary(spec, per_arm, jobs_dir)
    report = Report(summary, out / SUMMARY_MD, out / SUMMARY_JSON)
    write_text(report.json, json.dumps(summary, indent=2))
    write_text(report.markdown, study_markdown(summary))
    summaries = {name: arm["summary"] for name, arm in summary["arms"].items()}
    report.figures.append(arms_overview(summaries, out / OVERVIEW_PNG))
    if any(c.startswith("acc ") for s in summaries.values() for c in s["columns"]):
        report.figures.append(arms_long_tail(summaries, out / LONG_TAIL_PNG))
    points = {name: {"tokens_per_parameter": arm["tokens"]["tokens_per_parameter"], "gains": arm["gains"]}
              for name, arm in summary["arms"].items() if arm["tokens"]}
    if any(point["gains"] for point in points.values()):
        report.figures.append(gain_vs_tokens_per_param(points, out / GAIN_PNG))
    return report
