"""The plot and the HTML report of a sweep directory, rebuilt from its files alone.

Why from files: the sweep appends one CSV row per checkpoint and may be interrupted, resumed, or run by another
process; rebuilding both outputs from ``gsm8k.csv`` and ``generations/*.jsonl`` (and nothing held in memory) means
that after every checkpoint they show exactly what is on disk, and a user can rebuild them at any time.

* :func:`write_plot` draws ``gsm8k.png``: strict accuracy (mean@n over all samples of all problems) against the
  training step, one line per (run, precision, mode); a checkpoint without a step (a plain HF model, e.g. the base
  model) is a dotted horizontal reference line. When any row ran more than one RC cycle, a second panel draws the
  strict accuracy after each cycle t = 1..T_test, one line per checkpoint: RC helps where the line climbs.
* :func:`write_report` writes ``report.html``, one self-contained offline page: the plot as a base64 data URI, the
  CSV rows as the table (error rows show their error), and a viewer of each checkpoint's generations (its JSONL
  embedded in the page) filterable by checkpoint and by correct/incorrect; clicking a problem shows its chain --
  each cycle's reasoning, summary, prediction and verdict -- and the final answer.

Model output is hostile text (it can contain ``</script>`` or ``<img onerror=...>``). It enters the page only as
JSON inside a ``<script type="application/json">`` element, with ``<``, ``>`` and ``&`` written as ``\\u003c``,
``\\u003e``, ``\\u0026`` (so no tag can end the element), and leaves it only through ``textContent``. The template
itself (``report_template.html``) holds no data; its two slots are filled in one pass, so text in the data that
looks like a slot is never filled in.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from importlib import resources
from pathlib import Path

from flash_rc.errors import InputNotFoundError, RowError
from flash_rc.outputs import atomic_write

CSV_NAME = "gsm8k.csv"
PLOT_NAME = "gsm8k.png"
REPORT_NAME = "report.html"
GENERATIONS_DIR = "generations"
# The CSV columns these outputs read (the table shows every column of the header, in its order).
REQUIRED_COLUMNS = ("run", "step", "checkpoint", "precision", "mode", "strict", "cycles", "accuracy_per_cycle",
                    "error", "settings_hash", "generations")
_TEMPLATE_SLOT = re.compile(r"\{\{(data|plot)\}\}")
# JSON text that can sit inside a <script> element: no "<" (so no "</script>" or "<!--"), no ">" or "&".
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def read_rows(sweep_dir: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of ``sweep_dir/gsm8k.csv``, as strings; a missing file or column is a one-line error."""
    path = Path(sweep_dir) / CSV_NAME
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such file (run the sweep first: flash-rc eval)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise RowError(f"{path}:1: header lacks the column(s) {', '.join(missing)}")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise RowError(f"{path}:{line}: has {len(columns)} columns in the header but not in this row")
    return columns, rows


def _number(path: Path, line: int, row: dict[str, str], column: str) -> float | None:
    text = row[column]
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise RowError(f"{path}:{line}: column {column} is {text!r}, not a number") from None


def _accuracy_per_cycle(path: Path, line: int, row: dict[str, str]) -> list[float]:
    text = row["accuracy_per_cycle"]
    try:
        values = json.loads(text) if text else []
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise RowError(f"{path}:{line}: column accuracy_per_cycle is {text!r}, not a JSON list of numbers")
    return [float(v) for v in values]


def _checkpoint_label(row: dict[str, str]) -> str:
    step = f" step {row['step']}" if row["step"] else ""
    cycles = f" ×{row['cycles']}" if row["mode"] == "rc" else ""
    return f"{row['run']}{step} · {row['precision']} · {row['mode']}{cycles} · {row['settings_hash']}"


def _accuracy_limits(accuracies: list[float]) -> tuple[float, float]:
    """Y limits from 0 (drawn a little below, so points at 0 show) to the best accuracy plus 15%: 0.1 to 1.02."""
    top = min(1.02, max(0.1, 1.15 * max(accuracies, default=0.0)))
    return -0.03 * top, top


def write_plot(sweep_dir: str | Path) -> Path:
    """Draw ``sweep_dir/gsm8k.png`` from ``gsm8k.csv`` (atomically) and return its path; error rows are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sweep_dir = Path(sweep_dir)
    csv_path = sweep_dir / CSV_NAME
    _, rows = read_rows(sweep_dir)
    lines: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    references: list[tuple[str, float]] = []
    cycle_curves: list[tuple[str, list[float]]] = []
    for line, row in enumerate(rows, start=2):
        if row["error"]:
            continue
        strict = _number(csv_path, line, row, "strict")
        step = _number(csv_path, line, row, "step")
        if strict is None:
            raise RowError(f"{csv_path}:{line}: column strict is empty in a row without an error")
        if step is None:
            references.append((f"{row['run']} · {row['precision']} · {row['mode']}", strict))
        else:
            lines.setdefault((row["run"], row["precision"], row["mode"]), []).append((step, strict))
        per_cycle = _accuracy_per_cycle(csv_path, line, row)
        if len(per_cycle) > 1:
            step_text = f" step {row['step']}" if row["step"] else ""
            cycle_curves.append((f"{row['run']}{step_text} · {row['precision']}", per_cycle))

    panels = 2 if cycle_curves else 1
    figure = Figure(figsize=(6.4 * panels, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    by_step = figure.add_subplot(1, panels, 1)
    for (run, precision, mode), points in lines.items():
        points.sort()
        steps, accuracies = zip(*points)
        by_step.plot(steps, accuracies, marker="o", label=f"{run} · {precision} · {mode}")
    for label, strict in references:
        by_step.axhline(strict, linestyle=":", color="gray", label=f"{label} (no step)")
    by_step.set(title="GSM8K accuracy (strict) vs step", xlabel="training step", ylabel="accuracy (strict, mean@n)")
    if not (lines or references):
        by_step.text(0.5, 0.5, "no scored checkpoint yet", ha="center", va="center", transform=by_step.transAxes)
    else:
        by_step.legend(fontsize="small")
    by_step.set_ylim(_accuracy_limits([a for points in lines.values() for _, a in points] + [a for _, a in references]))
    by_step.xaxis.get_major_locator().set_params(integer=True)
    by_step.grid(alpha=0.3)
    if cycle_curves:
        by_cycle = figure.add_subplot(1, panels, 2)
        for label, per_cycle in cycle_curves:
            by_cycle.plot(range(1, len(per_cycle) + 1), per_cycle, marker="o", label=label)
        by_cycle.set(title="accuracy (strict) after each RC cycle", xlabel="RC cycle", ylabel="accuracy (strict)")
        by_cycle.set_ylim(_accuracy_limits([a for _, per_cycle in cycle_curves for a in per_cycle]))
        by_cycle.xaxis.get_major_locator().set_params(integer=True)
        by_cycle.legend(fontsize="small")
        by_cycle.grid(alpha=0.3)

    target = sweep_dir / PLOT_NAME
    with atomic_write(target) as handle:
        figure.savefig(handle, format="png")
    return target


def _read_generations(sweep_dir: Path, relative: str) -> list[dict] | None:
    """The records of one generations JSONL named by a CSV row (None if it is gone); it must lie in ``generations/``."""
    generations_dir = (sweep_dir / GENERATIONS_DIR).resolve()
    path = (sweep_dir / relative).resolve()
    if path.parent != generations_dir or path.suffix != ".jsonl":
        raise RowError(f"{sweep_dir / CSV_NAME}: generations {relative!r} is not a .jsonl file in {generations_dir}")
    if not path.is_file():
        return None
    records = []
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                records.append(json.loads(text))
            except json.JSONDecodeError as error:
                raise RowError(f"{path}:{line}: not a JSON object ({error.msg})") from None
    return records


def write_report(sweep_dir: str | Path) -> Path:
    """Write ``sweep_dir/report.html`` (atomically) and return its path; draws ``gsm8k.png`` first if it is missing."""
    sweep_dir = Path(sweep_dir)
    columns, rows = read_rows(sweep_dir)
    plot = sweep_dir / PLOT_NAME
    if not plot.is_file():
        write_plot(sweep_dir)
    checkpoints = []
    for row in rows:
        if row["error"] or not row["generations"]:
            continue
        records = _read_generations(sweep_dir, row["generations"])
        label = _checkpoint_label(row) + (" · generations file missing" if records is None else "")
        checkpoints.append({"label": label, "records": records or []})
    data = {"title": f"GSM8K sweep: {sweep_dir.resolve()}", "columns": columns,
            "rows": [[row[name] for name in columns] for row in rows], "checkpoints": checkpoints}
    slots = {"data": json.dumps(data, ensure_ascii=False).translate(_SCRIPT_SAFE),
             "plot": "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode("ascii")}
    template = resources.files("flash_rc.eval").joinpath("report_template.html").read_text(encoding="utf-8")
    page = _TEMPLATE_SLOT.sub(lambda match: slots[match.group(1)], template)
    target = sweep_dir / REPORT_NAME
    with atomic_write(target, "w") as handle:
        handle.write(page)
    return target
