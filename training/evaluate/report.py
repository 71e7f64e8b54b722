"""report.md and the accuracy-versus-confidence plot, from report.json's content."""

from __future__ import annotations

from pathlib import Path

from training.data import DataError
from training.evaluate.attacks import Attack, full_strength, reduced, registry
from training.evaluate.paper import PAPER


def stored_reduced(row: dict, dataset: str | None = None) -> str | None:
    """Why a stored report row ran below full strength, judged against today's registry for ``dataset``
    from the parameters and example count the row recorded (rows recorded before a budget became the
    full-strength one, e.g. L0 before Carlini's schedule, are caught too), else what the run recorded."""
    if dataset is not None:
        try:
            attacks = registry(dataset)
        except DataError:  # a user's data set: its name alone has no shape, so what the run recorded stands
            attacks = {}
        name = row["attack"] if row["attack"] in attacks else row.get("family")
        if name in attacks:
            mine = Attack(row["attack"], row.get("family", attacks[name].family), row.get("params", {}), None)
            return reduced(mine, full_strength(attacks, name), row["examples"])
    if row.get("reduced"):
        return row["reduced"]
    if row.get("family") == "carlini_l0" and "schedule" not in row.get("params", {}):
        return "geometric schedule, not carlini's"
    return None


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _l0(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _n(row: dict, dataset: str | None = None) -> str:
    """The example count, with the reason when the row runs below full strength."""
    why = stored_reduced(row, dataset)
    return f"{row['examples']} (reduced: {why})" if why else str(row["examples"])


def markdown(report: dict) -> str:
    paper = PAPER.get(report["dataset"], {})
    clean = report["clean"]
    lines = [
        f"# Adversarial evaluation: `{report['bundle']}`", "", *([report["note"], ""] if report.get("note") else []),
        *([f"Bundle fingerprint (`service.defense.bundle.fingerprint`): `{report['bundle_fingerprint']}`.", ""]
          if report.get("bundle_fingerprint") else []),
        f"Examples: {report['examples']}. Accuracy on adversarial examples, in %: an example counts as "
        "defended when a detector rejects it or the reformed example gets its true label.", "",
        "Distortions are means over the examples that fool the undefended classifier.", "",
        "Residual: mean of ‖ae(x′) − ae(x)‖₂ / ‖x′ − x‖₂ over the same examples, how much of the "
        "perturbation survives the reformer (1 = all of it). Noise: full-defense accuracy when each example is "
        "moved instead by Gaussian noise of the same L2 size (a control: a random change of that size).", "",
        "| attack | n | mean L2 | mean L∞ | mean L0 (pixels) | residual | no defense | detectors only | reformer only | full defense "
        "| paper: no defense → full | noise | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        p = paper.get(r["attack"]) or paper.get(r.get("family", ""))
        lines.append(f"| {r['attack']} | {_n(r, report['dataset'])} | {_num(r['mean_l2'])} | {_num(r['mean_linf'])} "
                     f"| {_l0(r.get('mean_l0'))} | {_num(r.get('residual'))} "
                     f"| {_pct(r['no_defense'])} | {_pct(r['detectors_only'])} | {_pct(r['reformer_only'])} "
                     f"| **{_pct(r['full_defense'])}** | {f'{p[0]} → {p[1]}' if p else '—'} "
                     f"| {_pct((r.get('same_size_noise') or {}).get('full_defense'))} | {r['seconds']:.0f} |")
    lines += ["", "Clean test set (all test images):", "",
              f"- accuracy without the defense {_pct(clean['classifier_test_accuracy'])} %, with it "
              f"{_pct(clean['defense_clean_test_accuracy'])} % (reformer only {_pct(clean['reformer_only_test_accuracy'])} %)",
              "- false-positive rate per detector: " + ", ".join(f"{k} {_pct(v, 2)} %" for k, v in
                                                               clean["detector_test_fpr"].items())]
    if report["carlini_confidence_curve"]:
        lines += ["", "Carlini L2 against confidence κ (the paper's Figures 4 and 5): ![](carlini_confidence.png)", "",
                  "An attack that fails leaves the image as it is, so read each κ with its attack success: where "
                  "it is low, the classifier cannot be pushed to that logit margin within the budget (or at all) "
                  "and the accuracies there say nothing about the defense.", "",
                  "| κ | n | attack success | mean L2 | no defense | detectors only | reformer only | full defense |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['confidence']:g} | {r['examples']} | {_pct(r.get('attack_success'))} | {_num(r['mean_l2'])} "
                  f"| {_pct(r['no_defense'])} "
                  f"| {_pct(r['detectors_only'])} | {_pct(r['reformer_only'])} | {_pct(r['full_defense'])} |"
                  for r in report["carlini_confidence_curve"]]
    lines += _graybox(report.get("graybox")) + _adaptive(report.get("adaptive")) + _adaptive_pgd(report.get("adaptive_pgd"))
    lines += ["", "Attack parameters:", ""]
    lines += [f"- `{r['attack']}`: {r['params']}" for r in report["rows"]]
    lines += ["", f"Command: `{report['provenance']['command']}` (git {report['provenance']['git_revision']}, "
              f"{report['provenance']['date']})", ""]
    return "\n".join(lines)


def _graybox(g: dict | None) -> list[str]:
    if not g:
        return []
    names = [m.replace("member-", "") for m in g["members"]]
    lines = ["", "## Graybox: Carlini L2 crafted against one member's reformer, defended by another", "",
             f"{g['examples']} examples per column; {g['params']}. Cell (row i, column j): full-defense accuracy "
             "in % when member i defends examples crafted against classifier(ae_j(x)). Random: the mean of the "
             "column, the expected accuracy when the defense picks a member uniformly at random.", "",
             "| defended by ↓, crafted against → | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for i, row in enumerate(g["table"]):
        lines.append(f"| {names[i]} | " + " | ".join(f"**{_pct(v)}**" if i == j else _pct(v)
                                                       for j, v in enumerate(row)) + " |")
    lines.append("| Random | " + " | ".join(_pct(v) for v in g["random"]) + " |")
    lines.append("| attack success on the column's member | " + " | ".join(_pct(c["attack_success"]) for c in g["columns"]) + " |")
    lines.append("| mean L2 | " + " | ".join(_num(c["mean_l2"]) for c in g["columns"]) + " |")
    lo, hi = g["off_diagonal_range"]
    lines += ["", f"Diagonal mean {_pct(g['diagonal_mean'])} %, off-diagonal {_pct(lo)}–{_pct(hi)} %, random row "
              f"{_pct(min(g['random']))}–{_pct(max(g['random']))} %; "
              f"{sum(c['seconds'] for c in g['columns']):.0f} s of attacks."]
    return lines


JUDGED = ("full defense, per member (%)", "full defense, random member", "seconds")


def _runs_table(title: str, text: str, lead: list[str], cells, runs: list[dict], footer: str) -> list[str]:
    """A report section of adaptive runs: heading, paragraph, one row per run (``cells(run)``, then the
    judged columns), and a closing line."""
    columns = [*lead, *JUDGED]
    return (["", f"## {title}", "", text, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            + [f"| {cells(r)} | {_judged(r)} |" for r in runs] + ["", footer])


def _targets(run: dict) -> str:
    """An adaptive run's targets: the member's name, or all of them (expectation over the pool)."""
    return run["members"][0] if len(run["members"]) == 1 else f"all {len(run['members'])} (EOT)"


def _judged(run: dict) -> str:
    """An adaptive run's last three cells: full defense per member, for a random member, seconds."""
    return (f"{', '.join(_pct(v) for v in run['full_defense_per_member'])} "
            f"| **{_pct(run['full_defense_random_member'])}** | {run['seconds']:.0f}")


def _adaptive(a: dict | None) -> list[str]:
    if not a:
        return []
    base = a["undefended_carlini_l2"]
    return _runs_table(
        "Adaptive attack (whitebox, and expectation over the pool)",
        "Carlini L2 through the reformer with a penalty on detector scores above threshold; a success must be "
        "accepted and misclassified by every targeted member. Judged by the core, member by member.",
        ["targets", "n", "success on the twins", "mean L2", "median L2"],
        lambda r: f"{_targets(r)} | {r['examples']} | {_pct(r['attack_success_twin'])} | {_num(r['mean_l2'])} "
                  f"| {_num(r['median_l2'])}", a["runs"],
        f"Undefended Carlini L2 on the same examples and budget: success {_pct(base['attack_success'])} %, "
        f"mean L2 {_num(base['mean_l2'])}, median {_num(base['median_l2'])} ({base['seconds']:.0f} s). "
        f"Budget: {base['params']}; penalty weight {a['runs'][0]['params']['penalty_weight']}, "
        f"margin {a['runs'][0]['params']['penalty_margin']}.")


def _adaptive_pgd(a: dict | None) -> list[str]:
    if not a or not a["runs"]:
        return []
    first = a["runs"][0]["params"]
    return _runs_table(
        "Adaptive PGD (whitebox, and expectation over the pool)",
        "PGD L∞ from a random start, maximising CE(f(D(x′)), y) + CE(f(x′), y) − weight · the detectors' excess "
        "over their thresholds (the second term keeps f(x′) and f(D(x′)) on the same wrong answer, so the "
        "divergence detectors stay quiet); a success must be accepted and misclassified by every targeted "
        "member. Judged by the core, member by member.",
        ["ε", "targets", "n", "success on the twins", "max L∞"],
        lambda r: f"{r['eps']:g} | {_targets(r)} | {r['examples']} | {_pct(r['attack_success_twin'])} "
                  f"| {_num(r['linf'])}", a["runs"],
        f"Budget: {first['steps']} steps of ε/4 (divided by steps // 40 above 1), random start; "
        f"detector weight {first['weight']}, margin 0.05.")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["carlini_confidence_curve"]
    kappas = [r["confidence"] for r in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for key, label in [("no_defense", "no defense"), ("detectors_only", "detectors only"),
                       ("reformer_only", "reformer only"), ("full_defense", "full defense")]:
        ax.plot(kappas, [100 * r[key] for r in curve], marker="o", label=label)
    if all("attack_success" in r for r in curve):
        ax.plot(kappas, [100 * r["attack_success"] for r in curve], color="grey", linestyle=":", marker="x",
                label="attack success (undefended)")
    ax.set_xlabel("Carlini L2 confidence κ")
    ax.set_ylabel("accuracy on adversarial examples (%)")
    ax.set_title(f"{report['dataset']}: {curve[0]['examples']} examples per κ")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(report: dict, out: Path) -> None:
    (out / "report.md").write_text(markdown(report))
    if report["carlini_confidence_curve"]:
        plot(report, out / "carlini_confidence.png")
