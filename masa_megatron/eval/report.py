"""Per-problem results store, evaluation report (JSON, markdown, PNG plots) and report comparison.

A record is one evaluated problem (a JSON object):
- ``benchmark`` (str), ``id`` (str, unique in a store), ``scores`` (list of 0/1 per solution),
  ``lengths`` (token length per solution, optional);
- ``predicted_pass_rate``: float in [0, 1] or None, or {source: float | None} for several
  predictors (e.g. {"text": .., "head": ..}); when absent, the mean of the parsed values of
  ``predicted_pass_rates`` (one k/8 per meta rollout, None for unparsed) is used, as source "meta";
- ``predicted_length`` (float | None; else the mean of the parsed ``predicted_lengths``);
- ``notion_net``: {notion: net(n)} from `metrics.notion_net_counts`, or None;
- ``gated`` (bool | None; else `metrics.gating_decision(predicted_pass_rates)`).
Other keys are kept in the store and ignored by the report.

Plots draw on a matplotlib ``Figure`` (Agg canvas, no pyplot, the global backend is untouched); the
``plot_*(ax, ...)`` helpers are reusable on any axes.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from masa_megatron.eval import metrics as M


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, set, tuple)):
        return list(obj.tolist() if isinstance(obj, np.ndarray) else obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class ResultsStore:
    """Append-only JSONL file of records, keyed by ``record["id"]``, that survives crashes.

    Each `append` writes one line, flushes and fsyncs it, so a finished problem is never lost.
    On open, the lines already there are read back; a trailing line without its newline or with
    broken JSON (a crash mid-write) is cut off the file, so its problem is simply done again. A
    broken line followed by good ones is skipped and counted in `n_corrupt`. The file is opened
    for writing on the first append only, so reading a finished store holds no handle.
    """

    def __init__(self, path: str | Path, fsync: bool = True):
        self.path, self.fsync = Path(path), fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict] = {}
        self.n_corrupt = 0
        self.n_truncated_bytes = 0
        self._load()
        self._file = None                                # opened on the first append

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end, bad_since_good, pos = 0, 0, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break                                    # unterminated last line: drop it
            record = self._decode(data[pos:nl])
            if record is None:
                bad_since_good += 1
            else:
                self._records[record["id"]] = record
                self.n_corrupt += bad_since_good
                good_end, bad_since_good = nl + 1, 0
            pos = nl + 1
        if good_end < len(data):
            self.n_truncated_bytes = len(data) - good_end
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    @staticmethod
    def _decode(line: bytes) -> dict | None:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("id"), str) else None

    def completed_ids(self) -> set[str]:
        return set(self._records)

    def records(self) -> list[dict]:
        """Records in the order they were finished."""
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def append(self, record: Mapping) -> None:
        self.append_many([record])

    def append_many(self, records: Iterable[Mapping]) -> None:
        """Write records as lines, then flush and fsync once. Raises ValueError on a record
        without a str ``id`` or with an id already stored."""
        new: dict[str, dict] = {}
        for record in records:
            rid = record.get("id")
            if not isinstance(rid, str) or rid in self._records or rid in new:
                raise ValueError(f"{self.path}: record id {rid!r} is missing or already stored")
            new[rid] = json.loads(json.dumps(dict(record), default=_json_default))  # plain JSON
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in new.values()]
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._file.write("".join(lines))
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._records.update(new)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- plotting helpers
def new_figure(width: float = 5.0, height: float = 4.0):
    """(figure, axes) on the Agg canvas, independent of pyplot state."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_calibration(ax, curve: Mapping, label: str | None = None, diagonal: bool = True):
    """Mean predicted vs mean observed pass rate per non-empty bin of a `calibration_curve`."""
    pred = np.asarray(curve["mean_predicted"], dtype=float)
    obs = np.asarray(curve["mean_observed"], dtype=float)
    keep = np.asarray(curve["counts"]) > 0
    if diagonal:
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.plot(pred[keep], obs[keep], marker="o", label=label)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="predicted pass rate",
           ylabel="observed pass rate")


def plot_scatter(ax, x: Sequence, y: Sequence, label: str | None = None,
                 diagonal: bool = True, xlabel: str = "", ylabel: str = ""):
    """Scatter of the pairs where both values are present, with an optional y = x line."""
    pairs = [(a, b) for a, b in zip(x, y) if M.is_number(a) and M.is_number(b)]
    xs, ys = (np.asarray(v, dtype=float) for v in zip(*pairs)) if pairs else ([], [])
    ax.scatter(xs, ys, s=14, alpha=0.5, label=label)
    if diagonal and pairs:
        lo, hi = float(min(np.min(xs), np.min(ys))), float(max(np.max(xs), np.max(ys)))
        ax.plot([lo, hi], [lo, hi], linestyle="--", color="grey", linewidth=1)
    ax.set(xlabel=xlabel, ylabel=ylabel)


def plot_grouped_bars(ax, categories: Sequence[str], series: Mapping[str, Sequence[float | None]],
                      ylabel: str = ""):
    """One group of bars per category, one bar per series (None/nan drawn as 0)."""
    width = 0.8 / max(len(series), 1)
    base = np.arange(len(categories))
    for i, (label, values) in enumerate(series.items()):
        heights = [v if M.is_number(v) else 0.0 for v in values]
        ax.bar(base + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(base)
    ax.set_xticklabels(categories, rotation=20, ha="right")
    ax.set_ylabel(ylabel)


def plot_curves(path: str | Path, series: Mapping[str, tuple[Sequence, Sequence]], xlabel: str,
                ylabel: str, title: str = "") -> Path:
    """Line plot of {label: (xs, ys)} written to `path` (e.g. accuracy vs training step)."""
    fig, ax = new_figure(6.0, 4.0)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), [y if M.is_number(y) else np.nan for y in ys], marker=".", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if series:
        ax.legend()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- report
def _num(x) -> float | None:
    return float(x) if M.is_number(x) else None


def _mean_parsed(values) -> float | None:
    parsed = [float(v) for v in (values or []) if M.is_number(v)]
    return float(np.mean(parsed)) if parsed else None


def pass_rate_predictions(record: Mapping) -> dict[str, float | None]:
    """{source: predicted pass rate or None} of one record (see the module docstring)."""
    value = record.get("predicted_pass_rate")
    if isinstance(value, Mapping):
        return {str(k): _num(v) for k, v in value.items()}
    if value is None:
        value = _mean_parsed(record.get("predicted_pass_rates"))
    return {"meta": _num(value)}


def _columns(records: Sequence[Mapping]) -> dict:
    """Per-problem lists the metrics take, with every source present for every record."""
    preds = [pass_rate_predictions(r) for r in records]
    sources = list(dict.fromkeys(k for p in preds for k in p)) or ["meta"]
    gated = [r["gated"] if isinstance(r.get("gated"), bool)
             else M.gating_decision(r.get("predicted_pass_rates")) for r in records]
    return {
        "scores": [list(r.get("scores") or []) for r in records],
        "lengths": [list(r.get("lengths") or []) for r in records],
        "pass_rates": {s: [p.get(s) for p in preds] for s in sources},
        "lengths_pred": [_num(r.get("predicted_length")) if r.get("predicted_length") is not None
                         else _mean_parsed(r.get("predicted_lengths")) for r in records],
        "notion_nets": [r.get("notion_net") if isinstance(r.get("notion_net"), Mapping) else None
                        for r in records],
        "gated": gated,
    }


def default_ks(max_samples: int) -> list[int]:
    """1, 2, 4, ... up to the largest number of samples per problem."""
    return [2 ** i for i in range(max(int(max_samples), 1).bit_length()) if 2 ** i <= max_samples]


def _summarise(records: Sequence[Mapping], ks: Sequence[int], n_bins: int) -> dict:
    cols = _columns(records)
    return {"n_problems": len(records),
            "samples_per_problem": float(np.mean([len(s) for s in cols["scores"]])) if records else 0.0,
            "pass_at_k": {str(k): v for k, v in M.pass_at_k_stats(cols["scores"], ks).items()},
            "meta": M.meta_awareness_metrics(cols["pass_rates"], cols["scores"], cols["lengths"],
                                             cols["lengths_pred"], cols["notion_nets"],
                                             cols["gated"], n_bins)}


def _finite_or_none(obj):
    """nan/inf -> None recursively, so report.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def build_report(records: Sequence[Mapping], ks: Sequence[int] | None = None,
                 n_bins: int = 10) -> dict:
    """Numbers per benchmark and over all problems; "pass_at_1_macro" averages benchmarks."""
    records = list(records)
    if ks is None:
        ks = default_ks(max((len(r.get("scores") or []) for r in records), default=1))
    names = sorted({str(r.get("benchmark", "unknown")) for r in records})
    benchmarks = {b: _summarise([r for r in records if str(r.get("benchmark", "unknown")) == b],
                                ks, n_bins) for b in names}
    macro = [v["pass_at_k"]["1"]["mean"] for v in benchmarks.values()
             if "1" in v["pass_at_k"] and M.is_number(v["pass_at_k"]["1"]["mean"])]
    return _finite_or_none({"ks": list(ks), "n_bins": n_bins, "benchmarks": benchmarks,
                            "overall": _summarise(records, ks, n_bins),
                            "pass_at_1_macro": float(np.mean(macro)) if macro else None})


def _fmt(value, percent: bool = False) -> str:
    if not M.is_number(value):
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _metric_rows(summary: Mapping) -> list[tuple[str, str]]:
    """(column, formatted value) pairs of one summary, for the markdown tables."""
    meta = summary["meta"]
    rows = [("problems", str(summary["n_problems"]))]
    rows += [(f"pass@{k} %", f"{_fmt(v['mean'], True)} ({_fmt(v['std'], True)})")
             for k, v in summary["pass_at_k"].items()]
    for source, pr in meta["pass_rate"].items():
        rows += [(f"{source} coverage", _fmt(pr["coverage"])), (f"{source} MAE", _fmt(pr["mae"])),
                 (f"{source} Spearman", _fmt(pr["spearman"])), (f"{source} ECE", _fmt(pr["ece"]))]
    gating = meta["gating"]
    rows += [("length in range", _fmt(meta["length"]["in_range"])),
             ("notion precision", _fmt(meta["notion"]["micro"])),
             ("gated fraction", _fmt(gating["gated_fraction"])),
             ("gating P/R/F1", "/".join(_fmt(gating[k]) for k in ("precision", "recall", "f1")))]
    return rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def write_report(records: Sequence[Mapping], out_dir: str | Path,
                 ks: Sequence[int] | None = None, n_bins: int = 10) -> dict:
    """Write report.json, summary.md, calibration.png, pass_rate_scatter.png, length_scatter.png
    and pass_at_k.png into `out_dir`; return the report dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = list(records)
    report = build_report(records, ks, n_bins)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")

    sections = {**report["benchmarks"], "all": report["overall"]}
    columns = [c for c, _ in _metric_rows(report["overall"])]
    rows = [[name] + [dict(_metric_rows(s)).get(c, "–") for c in columns]
            for name, s in sections.items()]
    macro = _fmt(report["pass_at_1_macro"], True)
    (out / "summary.md").write_text(
        f"# Evaluation report\n\nMean pass@1 over benchmarks: {macro} %. Pass@k: mean (std across "
        f"problems), %. Meta metrics are over problems with a prediction.\n\n"
        + _markdown_table(["benchmark"] + columns, rows))

    cols = _columns(records)
    actual = [M.pass_rate(s) for s in cols["scores"]]
    fig, ax = new_figure()
    for source, pr in report["overall"]["meta"]["pass_rate"].items():
        plot_calibration(ax, pr["calibration"], label=source)
    ax.legend()
    save_figure(fig, out / "calibration.png")
    fig, ax = new_figure()
    for source, values in cols["pass_rates"].items():
        plot_scatter(ax, values, actual, label=source, xlabel="predicted pass rate",
                     ylabel="actual pass rate")
    ax.legend()
    save_figure(fig, out / "pass_rate_scatter.png")
    fig, ax = new_figure()
    mean_correct = [_mean_parsed(M.correct_lengths(s, l))
                    for s, l in zip(cols["scores"], cols["lengths"])]
    plot_scatter(ax, cols["lengths_pred"], mean_correct, xlabel="predicted length (tokens)",
                 ylabel="mean correct length (tokens)")
    save_figure(fig, out / "length_scatter.png")
    fig, ax = new_figure(max(5.0, 1.2 * len(report["benchmarks"]) + 2), 4.0)
    plot_grouped_bars(ax, list(report["benchmarks"]),
                      {f"pass@{k}": [b["pass_at_k"][str(k)]["mean"] for b in
                                     report["benchmarks"].values()] for k in report["ks"]},
                      ylabel="pass@k")
    ax.legend()
    save_figure(fig, out / "pass_at_k.png")
    return report


def compare_reports(report_dirs: Sequence[str | Path], labels: Sequence[str],
                    out_dir: str | Path) -> dict:
    """Several reports side by side: comparison.md (one row per metric, one column per label),
    calibration.png (overlaid curves, first predictor of each), pass_at_1.png and meta_metrics.png
    (grouped bars). Returns {label: report}."""
    if len(report_dirs) != len(labels):
        raise ValueError(f"{len(report_dirs)} report dirs but {len(labels)} labels")
    reports = {lab: json.loads((Path(d) / "report.json").read_text())
               for d, lab in zip(report_dirs, labels)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    benchmarks = list(dict.fromkeys(b for r in reports.values() for b in r["benchmarks"]))

    def pass1(rep, b):
        return rep["benchmarks"].get(b, {}).get("pass_at_k", {}).get("1", {}).get("mean")

    rows = [[f"{b} pass@1 %"] + [_fmt(pass1(r, b), True) for r in reports.values()]
            for b in benchmarks]
    rows.append(["mean pass@1 %"] + [_fmt(r["pass_at_1_macro"], True) for r in reports.values()])
    overall = [dict(_metric_rows(r["overall"])) for r in reports.values()]
    for name in dict.fromkeys(k for o in overall for k in o if k != "problems"):
        rows.append([f"all: {name}"] + [o.get(name, "–") for o in overall])
    (out / "comparison.md").write_text("# Comparison\n\n" + _markdown_table(["metric", *labels], rows))

    fig, ax = new_figure()
    for lab, rep in reports.items():
        pass_rate = rep["overall"]["meta"]["pass_rate"]
        if pass_rate:
            source, pr = next(iter(pass_rate.items()))
            plot_calibration(ax, pr["calibration"], label=f"{lab} ({source})")
    ax.legend()
    save_figure(fig, out / "calibration.png")
    fig, ax = new_figure(max(5.0, 1.2 * len(benchmarks) + 2), 4.0)
    plot_grouped_bars(ax, benchmarks, {lab: [pass1(r, b) for b in benchmarks]
                                       for lab, r in reports.items()}, ylabel="pass@1")
    ax.legend()
    save_figure(fig, out / "pass_at_1.png")

    def meta_values(rep):
        meta = rep["overall"]["meta"]
        pr = next(iter(meta["pass_rate"].values()), {})
        return [pr.get("mae"), pr.get("ece"), pr.get("spearman"), meta["length"]["in_range"],
                meta["notion"]["micro"], meta["gating"]["f1"]]
    fig, ax = new_figure(7.0, 4.0)
    plot_grouped_bars(ax, ["pass-rate MAE", "ECE", "Spearman", "length in range",
                           "notion precision", "gating F1"],
                      {lab: meta_values(r) for lab, r in reports.items()})
    ax.legend()
    save_figure(fig, out / "meta_metrics.png")
    return reports
