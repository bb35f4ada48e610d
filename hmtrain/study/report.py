"""A study's results: per arm, mean ± sample std over seeds, per model row and probe bucket and per level-1
subtree (hmtrain/eval/summary.py's tables, one per arm), as summary.md and summary.json, plus the arms'
figures (hmtrain/eval/figures.py) beside them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hmtrain.eval.figures import arms_long_tail, arms_overview
from hmtrain.eval.summary import arms_markdown, subtree_markdown, subtree_summary, summarize
from hmtrain.util.files import write_text

SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"
OVERVIEW_PNG, LONG_TAIL_PNG = "arms_overview.png", "arms_long_tail.png"


@dataclass
class Report:
    summary: dict
    markdown: Path
    json: Path
    figures: list[Path] = field(default_factory=list)


def study_summary(spec, per_arm: dict[str, dict[int, dict]], jobs_dir: Path) -> dict:
    """summary.json's content: the spec, and per arm its summary, its subtree summary and its results files."""
    arms = {}
    for arm in spec.arms:
        per_seed = per_arm[arm.name]
        arms[arm.name] = {"overrides": arm.overrides, "summary": summarize(per_seed),
                          "subtrees": subtree_summary(per_seed),
                          "results": {str(seed): str(jobs_dir / arm.name / f"seed{seed}" / "eval.json")
                                      for seed in per_seed}}
    return {"study": spec.name, "spec": str(spec.path), "base": {"config": spec.base_config,
                                                                  "overrides": spec.base_overrides},
            "seeds": spec.seeds, "arms": arms}


def study_markdown(summary: dict) -> str:
    parts = [f"# Study {summary['study']}\n", f"Spec: `{summary['spec']}`; base config `{summary['base']['config']}`"
             f" with {summary['base']['overrides'] or 'no overrides'}.\n",
             "Arms: " + "; ".join(f"**{name}** {arm['overrides']}" for name, arm in summary["arms"].items()) + ".\n",
             arms_markdown({name: arm["summary"] for name, arm in summary["arms"].items()})]
    for name, arm in summary["arms"].items():
        subtrees = subtree_markdown(arm["subtrees"])
        if subtrees:
            parts.append(f"Arm **{name}**: {subtrees}")
    return "\n".join(parts)


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
    return report
