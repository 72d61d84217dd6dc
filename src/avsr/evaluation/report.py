"""Evaluation outputs: ``results.json``, ``hypotheses/<condition>.tsv``, ``report.md`` and a WER-vs-SNR plot.

``results.json`` (written atomically)::

    {"data": {"root", "split", "name", "protocol"}, "conditions": [names in protocol order],
     "systems": {label: {"checkpoint": path, "mode": model mode, "decode": {...DecodeConfig...},
                         "conditions": {condition: {"wer", "cer", "substitutions", "deletions",
                                                    "insertions", "n_utterances", "n_words",
                                                    "decode_seconds", "rtf", "n_skipped",
                                                    ["aux": {...}]}}}}}

``wer``/``cer`` are fractions (``report.md`` shows percent); ``rtf`` is decode seconds (model
forward and search, not file I/O, corruption or auxiliary heads) over seconds of audio. A system
is one checkpoint; its label is its model mode, or ``mode (checkpoint stem)`` when two share a mode.

``aux`` (only for a model with auxiliary heads, :mod:`avsr.evaluation.runner`; each part only
where computed)::

    {"mouth_opening": {"pooled": {"pearson", "mae", "r2"}, "utterance_mean": {"pearson", "mae", "r2"},
                       "n_utterances", "n_frames",
                       "sources": {"video" | "audio": {"pooled": {...}, "utterance_mean": {...}}}},
     "lip2speech": {"stoi", "estoi", "n_utterances", "griffin_lim_iters"}}

``mouth_opening``: the predicted curve (mean of the model's per-modality heads; ``sources``: each
head alone) against the landmark curve (inner-lip gap / mouth width, unitless) on face-detected
frames at 25 fps; ``pooled`` over all frames of all utterances, ``utterance_mean`` the mean of the
per-utterance values (:func:`avsr.evaluation.aux_metrics.curve_metrics`); MAE in curve units;
``n_frames`` the scored frames. ``lip2speech``: mean STOI and ESTOI (about 0–1) of Griffin-Lim
speech from the lip-to-speech head against the clean audio. A value that is undefined (a constant
curve's Pearson r) is ``null``.

``hypotheses/<condition>.tsv``: a header, then one line per utterance and system:
``utt_id  system  errors  n_words  reference  hypothesis`` (``errors`` = S + D + I words after
normalisation; texts as given, tabs and newlines replaced by spaces).

``report.md``: tables of WER and CER (rows: conditions with their visual corruption and babble
SNR; columns: systems), the auxiliary heads' metrics when a system has them (rows: system and
condition; columns: mouth-opening Pearson r pooled and per-utterance mean, MAE and R² pooled,
lip-to-speech STOI and ESTOI), decoding speed, and ``wer_vs_snr.png`` (matplotlib, Agg backend): WER
against babble SNR per system, one line per visual condition, the noise-free audio at "clean".
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from avsr.utils import atomic_path, atomic_write_text

RESULT_KEYS = ("wer", "cer", "substitutions", "deletions", "insertions", "n_utterances", "n_words",
               "decode_seconds", "rtf")
TSV_COLUMNS = ("utt_id", "system", "errors", "n_words", "reference", "hypothesis")
PLOT_NAME = "wer_vs_snr.png"
_SNR_RE = re.compile(r"^(?:(?P<visual>.+)\+)?babble_snr(?P<snr>[-+]?\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class HypothesisRow:
    """One decoded utterance of one system, for ``hypotheses/<condition>.tsv``."""

    utt_id: str
    system: str
    errors: int
    n_words: int
    reference: str
    hypothesis: str


def parse_condition(name: str) -> tuple[str, Optional[float]]:
    """``(visual condition, babble SNR in dB or None)`` of a protocol condition name.

    ``"occlusion+babble_snr-5"`` -> ``("occlusion", -5.0)``; ``"babble_snr10"`` -> ``("clean", 10.0)``;
    ``"noise_blur"`` -> ``("noise_blur", None)`` (clean audio).
    """
    m = _SNR_RE.match(name)
    if m is None:
        return name, None
    return m.group("visual") or "clean", float(m.group("snr"))


def system_labels(modes: Sequence[str], checkpoints: Sequence[str]) -> list[str]:
    """A unique label per system: its mode, or ``mode (checkpoint stem)`` where modes repeat."""
    labels = []
    for mode, ckpt in zip(modes, checkpoints):
        label = mode if modes.count(mode) == 1 else f"{mode} ({Path(ckpt).stem})"
        while label in labels:
            label = f"{label}'"
        labels.append(label)
    return labels


def _clean_field(text: str) -> str:
    return " ".join(str(text).split())


def write_hypotheses(path: str | Path, rows: Sequence[HypothesisRow]) -> None:
    """Write one condition's TSV (format in the module docstring), sorted by utterance and system."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar="\\")
    w.writerow(TSV_COLUMNS)
    for r in sorted(rows, key=lambda r: (r.utt_id, r.system)):
        w.writerow([r.utt_id, r.system, r.errors, r.n_words, _clean_field(r.reference), _clean_field(r.hypothesis)])
    atomic_write_text(path, buf.getvalue())


def read_hypotheses(path: str | Path) -> list[HypothesisRow]:
    """Rows of a TSV written by :func:`write_hypotheses`; raises ValueError naming the file if malformed."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        if tuple(next(reader, ())) != TSV_COLUMNS:
            raise ValueError(f"{path}: header must be {' '.join(TSV_COLUMNS)}")
        try:
            return [HypothesisRow(r[0], r[1], int(r[2]), int(r[3]), r[4], r[5]) for r in reader]
        except (IndexError, ValueError):
            raise ValueError(f"{path}: malformed hypothesis line") from None


def _pct(x: Optional[float]) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def _table(results: dict, conditions: Sequence[str], key: str) -> list[str]:
    systems = list(results["systems"])
    lines = ["| video | audio: babble SNR (dB) | " + " | ".join(systems) + " |",
             "|---|---|" + "---:|" * len(systems)]
    for cond in conditions:
        visual, snr = parse_condition(cond)
        snr_txt = "clean" if snr is None else f"{snr:g}"
        cells = [_pct(results["systems"][s]["conditions"].get(cond, {}).get(key)) for s in systems]
        lines.append(f"| {visual} | {snr_txt} | " + " | ".join(cells) + " |")
    return lines


def _num(x: Optional[float], digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _aux_table(results: dict, conditions: Sequence[str]) -> list[str]:
    """Rows of the "Auxiliary heads" table (empty when no system has an ``aux`` block)."""
    lines = []
    for system, res in results["systems"].items():
        for cond in conditions:
            aux = res["conditions"].get(cond, {}).get("aux")
            if not aux:
                continue
            visual, snr = parse_condition(cond)
            mouth, l2s = aux.get("mouth_opening", {}), aux.get("lip2speech", {})
            pooled, per_utt = mouth.get("pooled", {}), mouth.get("utterance_mean", {})
            cells = [_num(pooled.get("pearson")), _num(per_utt.get("pearson")), _num(pooled.get("mae"), 4),
                     _num(pooled.get("r2")), _num(l2s.get("stoi")), _num(l2s.get("estoi"))]
            lines.append(f"| {system} | {visual} | {'clean' if snr is None else f'{snr:g}'} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["| system | video | audio: babble SNR (dB) | mouth opening: Pearson r (pooled) | Pearson r "
            "(utterance mean) | MAE | R² | lip-to-speech: STOI | ESTOI |",
            "|---|---|---|" + "---:|" * 6, *lines]


def render_markdown(results: dict, plot_name: Optional[str] = PLOT_NAME) -> str:
    """The text of ``report.md`` for ``results`` (the ``results.json`` structure)."""
    conditions = results["conditions"]
    data = results.get("data", {})
    title = " ".join(str(x) for x in (data.get("name"), data.get("split")) if x)
    out = [f"# Results{': ' + title if title else ''}", ""]
    if data.get("protocol"):
        out += [f"Corruption protocol: `{data['protocol']}`.", ""]
    decodes = {s: v.get("decode", {}) for s, v in results["systems"].items()}
    settings = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
    if len({json.dumps(d, sort_keys=True) for d in decodes.values()}) == 1:
        out += ["Decoding: " + settings(next(iter(decodes.values()))) + ".", ""]
    else:
        out += [f"Decoding of **{s}**: {settings(d)}." for s, d in decodes.items()] + [""]
    n_utts = {s: max((c.get("n_utterances", 0) for c in v["conditions"].values()), default=0)
              for s, v in results["systems"].items()}
    n_words = {s: max((c.get("n_words", 0) for c in v["conditions"].values()), default=0)
               for s, v in results["systems"].items()}
    out += ["Systems: " + "; ".join(f"**{s}** = `{v.get('checkpoint', '')}` ({n_utts[s]} utterances, "
                                    f"{n_words[s]} words)" for s, v in results["systems"].items()) + ".", ""]
    out += ["## Word error rate (%)", "", *_table(results, conditions, "wer"), ""]
    out += ["## Character error rate (%)", "", *_table(results, conditions, "cer"), ""]
    aux = _aux_table(results, conditions)
    if aux:
        out += ["## Auxiliary heads", "",
                "Mouth opening: predicted curve (mean of the model's heads) against the landmark curve on "
                "face-detected frames, Pearson r pooled over all frames and averaged over utterances, MAE and R² "
                "pooled. Lip-to-speech: STOI and ESTOI of Griffin-Lim speech against the clean audio, only where "
                "computed (`test.py --aux-conditions`). – = not computed or undefined.", "", *aux, ""]
    out += ["## Decoding speed", "", "| system | decode seconds (all conditions) | real-time factor (mean) |",
            "|---|---:|---:|"]
    for s, v in results["systems"].items():
        conds = list(v["conditions"].values())
        secs = sum(c.get("decode_seconds", 0.0) for c in conds)
        rtf = sum(c.get("rtf", 0.0) for c in conds) / max(len(conds), 1)
        out.append(f"| {s} | {secs:.1f} | {rtf:.3f} |")
    out.append("")
    if plot_name:
        out += ["## Plot", "", f"![WER against babble SNR per system]({plot_name})", ""]
    return "\n".join(out)


def plot_wer_vs_snr(results: dict, path: str | Path) -> None:
    """Write the WER-vs-SNR PNG: one colour per system, one line style per visual condition that
    has babble conditions (its noise-free audio condition drawn at "clean"). Without babble
    conditions it plots WER per condition instead. Uses matplotlib's Agg canvas (no pyplot state)."""
    from matplotlib.figure import Figure

    parsed = {c: parse_condition(c) for c in results["conditions"]}
    snrs = sorted({snr for _, snr in parsed.values() if snr is not None})
    clean_x = (snrs[-1] + 5.0) if snrs else 0.0
    # visual conditions tested at several SNRs (visual-only ones are in the tables, not here)
    visuals = list(dict.fromkeys(v for v, snr in parsed.values() if snr is not None))
    styles = ["-", "--", ":", "-."]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for si, (system, res) in enumerate(results["systems"].items()):
        colour = f"C{si % 10}"
        wer = {c: 100 * m["wer"] for c, m in res["conditions"].items() if math.isfinite(m["wer"])}
        if not visuals:
            conds = [c for c in results["conditions"] if c in wer]
            ax.plot(range(len(conds)), [wer[c] for c in conds], marker="o", color=colour, label=system)
            continue
        for vi, visual in enumerate(visuals):
            pts = sorted((clean_x if snr is None else snr, wer[c]) for c, (v, snr) in parsed.items()
                         if v == visual and c in wer)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, styles[vi % len(styles)], marker="o", color=colour, label=f"{system}, video: {visual}")
    if visuals:
        ax.set_xticks([*snrs, clean_x], [f"{s:g}" for s in snrs] + ["clean"])
        ax.set_xlabel("babble SNR (dB)")
        ax.set_title("WER against babble SNR")
    else:
        ax.set_xticks(range(len(results["conditions"])), results["conditions"], rotation=20, fontsize=8)
        ax.set_xlabel("condition")
        ax.set_title("WER per condition")
    ax.set_ylabel("WER (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write_report(out_dir: str | Path, results: dict, hypotheses: dict[str, Sequence[HypothesisRow]]) -> Path:
    """Write ``results.json``, ``hypotheses/<condition>.tsv``, ``report.md`` and the plot under ``out_dir``.

    ``hypotheses`` maps condition -> rows of every system. Returns the path of ``report.md``.
    """
    out_dir = Path(out_dir)
    for cond, rows in hypotheses.items():
        write_hypotheses(out_dir / "hypotheses" / f"{cond}.tsv", rows)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    plot_wer_vs_snr(results, out_dir / PLOT_NAME)
    report = out_dir / "report.md"
    atomic_write_text(report, render_markdown(results))
    return report


def merge_results(parts: Sequence[dict]) -> tuple[dict, list[dict[str, str]]]:
    """One ``results.json`` structure from several: systems side by side, conditions in first-seen order.

    Returns the merged results and, per part, how its system labels were renamed (labels are
    recomputed with :func:`system_labels` so that two systems of one mode stay apart). Raises
    ValueError when ``parts`` is empty.
    """
    if not parts:
        raise ValueError("nothing to merge")
    conditions: list[str] = []
    flat = []
    for i, part in enumerate(parts):
        conditions += [c for c in part["conditions"] if c not in conditions]
        flat += [(i, label, system) for label, system in part["systems"].items()]
    labels = system_labels([s.get("mode", lab) for _, lab, s in flat], [s.get("checkpoint", lab) for _, lab, s in flat])
    renames: list[dict[str, str]] = [{} for _ in parts]
    systems = {}
    for (i, old, system), new in zip(flat, labels):
        renames[i][old] = new
        systems[new] = system
    return {"data": parts[0].get("data", {}), "conditions": conditions, "systems": systems}, renames
