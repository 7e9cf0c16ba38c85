"""The report's first section: a findings file's claims judged on these results (fewtune.findings.judge), one row
per claim and setting. Formatting only: every verdict, estimate and interval comes from the judge."""

from __future__ import annotations

from ..findings import Findings
from ..findings.judge import Judgement, relation_text
from ..stats import compare
from ..stats.fmt import METRIC_NAMES, scale_for
from .render import Doc

STUDY_HEADING = "The study's findings on your results"


def is_study(findings: Findings) -> bool:
    return findings.source == "shipped study.toml"


def label(findings: Findings) -> str:
    """How the report names a findings file's claims in a sentence: the study's, a published source's, yours."""
    if is_study(findings):
        return "The study's findings"
    return f"The findings of {findings.title}" if findings.shipped else "Your findings"


def heading(findings: Findings) -> str:
    if is_study(findings):
        return STUDY_HEADING
    if findings.shipped:  # another published source's claims (lpft.toml: Kumar et al.)
        return f"Published findings on your results: {findings.title}"
    return f"Your findings on these results ({findings.title or findings.source})"


def _signed(x: float, metric: str) -> str:
    return ("+" if x >= 0 else "") + scale_for(metric)(x)


def estimate_cell(r) -> str:
    if r.contrast is None or r.estimate != r.estimate:
        return "–"
    text = _signed(r.estimate, r.metric)
    if r.lo == r.lo:
        text += f" [{_signed(r.lo, r.metric)}, {_signed(r.hi, r.metric)}]"
    return text


def section(doc: Doc, j: Judgement, default: bool) -> None:
    """Heading, the table of verdicts, the claims with their sources, and how they were judged (collapsed)."""
    f = j.findings
    doc.heading(2, heading(f))
    lead = (f"Each claim of {f.source}" + (f" ({f.title})" if f.title and not is_study(f) else "")
            + ", fixed before these results were seen, judged on every model, task and number of shots here: "
            "supported, contradicted (the opposite shown; for 'within ±margin': shown outside it) or not settled "
            "(with what it would take). The estimate is mean(A) − mean(B) over the claim's options at those shots, "
            "from one model of every option of that model, task and split (seeds paired through it; "
            "docs/findings.md). The family-wise error over all of this section's claims and settings is held at "
            f"{100 * j.alpha:.0f}% by Holm's procedure over {j.hypotheses} one-sided tests (each claim and its "
            "opposite; 'within ±margin' by two one-sided tests), at every look of the grid's plan with that look's share "
            "of it (a verdict reached at a look stands); the "
            "interval shown is the one behind the verdict, at the level Holm tested the claim at. Nothing is judged "
            f"from fewer than {compare.MIN_SEEDS} seeds." + ("" if is_study(f) else " Each findings file is its own family: its claims were "
                                "fixed together, from one source, and its error is held at that level on its own."))
    if default:
        covered = ", ".join(sorted(f.tasks or ["every task"]))
        lead += (" No findings file was given, so the study's shipped findings (study.toml) are used for the tasks "
                 f"they cover ({covered}); `fewtune report --findings FILE` uses yours, `--findings none` leaves this "
                 "section out.")
    if not j.rows:
        doc.para("None of these claims applies to the tasks and models in the database.")
    else:
        rows = []
        for r in j.rows:
            metric = METRIC_NAMES.get(r.metric, r.metric)
            rows.append([r.claim.id, r.verdict, estimate_cell(r), f"{r.task} / {r.model}",
                         "–" if r.shots is None else str(r.shots), f"{r.split or r.claim.split} ({metric})",
                         relation_text(r.claim, r.metric), r.sentence()])
        doc.table(["claim", "verdict", "A − B [interval]", "task / model", "shots", "split (metric)", "claim reads",
                   "why"], rows, caption="One row per claim and setting: the verdict, the estimate of mean(A) − "
                                         "mean(B) and the interval behind it (Holm's level for the claim)")
    doc.bullets([f"{c.id}: {c.statement or relation_text(c, 'accuracy')}" + (f" Source: {c.source}" if c.source else "")
                 for c in f.claims])
    doc.details("How these claims were judged", lead)


def closing(j: Judgement | None, task: str, model: str) -> list[str]:
    """The findings' verdicts for one (task, model), quoted where the report concludes (one bullet, or none)."""
    rows = [r for r in (j.rows if j else []) if r.task == task and r.model == model]
    if not rows:
        return []
    what = label(j.findings)
    return [f"{what} here (first section, family-wise 5% by Holm): " + "; ".join(
        f"{r.claim.id}" + ("" if r.shots is None else f" at {r.shots} shots") + f": {r.verdict}" for r in rows) + "."]
