"""report.md and the accuracy-versus-confidence plot, from report.json's content."""

from __future__ import annotations

from pathlib import Path

from training.evaluate.paper import PAPER


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def markdown(report: dict) -> str:
    paper = PAPER.get(report["dataset"], {})
    clean = report["clean"]
    lines = [
        f"# Adversarial evaluation: `{report['bundle']}`", "",
        f"Examples: {report['examples']}. Accuracy on adversarial examples, in %: an example counts as "
        "defended when a detector rejects it or the reformed example gets its true label.", "",
        "Distortions are means over the examples that fool the undefended classifier.", "",
        "| attack | n | mean L2 | mean L∞ | no defense | detectors only | reformer only | full defense "
        "| paper: no defense → full | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        p = paper.get(r["attack"])
        lines.append(f"| {r['attack']} | {r['examples']} | {_num(r['mean_l2'])} | {_num(r['mean_linf'])} "
                     f"| {_pct(r['no_defense'])} | {_pct(r['detectors_only'])} | {_pct(r['reformer_only'])} "
                     f"| **{_pct(r['full_defense'])}** | {f'{p[0]} → {p[1]}' if p else '—'} | {r['seconds']:.0f} |")
    lines += ["", "Clean test set (all test images):", "",
              f"- accuracy without the defense {_pct(clean['classifier_test_accuracy'])} %, with it "
              f"{_pct(clean['defense_clean_test_accuracy'])} % (reformer only {_pct(clean['reformer_only_test_accuracy'])} %)",
              "- false-positive rate per detector: " + ", ".join(f"{k} {_pct(v, 2)} %" for k, v in
                                                               clean["detector_test_fpr"].items())]
    if report["carlini_confidence_curve"]:
        lines += ["", "Carlini L2 against confidence κ (the paper's Figures 4 and 5): ![](carlini_confidence.png)", "",
                  "| κ | n | mean L2 | no defense | detectors only | reformer only | full defense |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['confidence']:g} | {r['examples']} | {_num(r['mean_l2'])} | {_pct(r['no_defense'])} "
                  f"| {_pct(r['detectors_only'])} | {_pct(r['reformer_only'])} | {_pct(r['full_defense'])} |"
                  for r in report["carlini_confidence_curve"]]
    lines += ["", "Attack parameters:", ""]
    lines += [f"- `{r['attack']}`: {r['params']}" for r in report["rows"]]
    lines += ["", f"Command: `{report['provenance']['command']}` (git {report['provenance']['git_revision']}, "
              f"{report['provenance']['date']})", ""]
    return "\n".join(lines)


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
