"""eval/report.py: the plot and the self-contained HTML report of a hand-built sweep directory, then the page in
headless Chromium (Playwright driving Debian's system ``chromium``, installed by ``make browser``)."""

from __future__ import annotations

import base64
import csv
import fnmatch
import json
import re
import shutil
import struct
import tomllib
from pathlib import Path

import pytest

from flash_rc.errors import InputNotFoundError, RowError
from flash_rc.eval.report import write_plot, write_report

REPO = Path(__file__).resolve().parents[2]
HEADER = ("run,step,checkpoint,precision,mode,strict,flexible,pass_at_1,pass_at_k,k,n,cycles,accuracy_per_cycle,"
          "problems,seconds,error,settings_hash,generations").split(",")
HOSTILE = '</script><script>window.pwned=1</script> and <img src=x onerror="window.pwned=1"> {{plot}}'
ERROR = "checkpoint runs/tiny/global_step_3: model.safetensors is missing (incomplete checkpoint)"
SINGLE_JSONL = "generations/tiny__step1__bf16__single__aaaaaaaaaaaa.jsonl"
RC_JSONL = "generations/tiny__step2__bf16__rc__bbbbbbbbbbbb.jsonl"


def _record(problem_id, correct_per_cycle, reasoning="Think: 2 + 2 = 4.", summary="I added."):
    cycles = [{"reasoning": f"{reasoning} (cycle {t + 1})", "summary": summary if len(correct_per_cycle) > 1 else None,
               "pred": "4" if ok else "5", "correct": ok} for t, ok in enumerate(correct_per_cycle)]
    return {"problem_id": problem_id, "sample_id": 0, "question": f"Question {problem_id}: what is 2 + 2?",
            "ground_truth": "4", "data_source": "openai/gsm8k", "cycles": cycles,
            "final_pred": cycles[-1]["pred"], "correct": correct_per_cycle[-1]}


# step 1, single mode: 2 of 4 correct -> strict 0.5. step 2, RC with 2 cycles: 1 of 4 correct after cycle 1 (0.25),
# 3 of 4 after cycle 2 (0.75 = strict, scored on the last cycle). The hostile problem is "gsm8k-2" in both.
SINGLE_RECORDS = [_record("gsm8k-0", [True]), _record("gsm8k-1", [False]), _record("gsm8k-2", [True], HOSTILE),
                  _record("gsm8k-3", [False])]
RC_RECORDS = [_record("gsm8k-0", [True, True]), _record("gsm8k-1", [False, True]),
              _record("gsm8k-2", [False, True], HOSTILE, summary=HOSTILE), _record("gsm8k-3", [False, False])]


def _row(**values):
    return {name: values.get(name, "") for name in HEADER}


ROWS = [
    _row(run="tiny", step="1", checkpoint="runs/tiny/global_step_1", precision="bf16", mode="single", strict="0.5",
         flexible="0.5", pass_at_1="0.5", n="1", cycles="1", accuracy_per_cycle="[0.5]", problems="4", seconds="3.2",
         settings_hash="aaaaaaaaaaaa", generations=SINGLE_JSONL),
    _row(run="tiny", step="2", checkpoint="runs/tiny/global_step_2", precision="bf16", mode="rc", strict="0.75",
         flexible="0.75", pass_at_1="0.75", n="1", cycles="2", accuracy_per_cycle="[0.25, 0.75]", problems="4",
         seconds="6.1", settings_hash="bbbbbbbbbbbb", generations=RC_JSONL),
    _row(run="tiny", step="3", checkpoint="runs/tiny/global_step_3", precision="bf16", mode="rc", cycles="2",
         seconds="0.1", error=ERROR, settings_hash="bbbbbbbbbbbb"),
]


def _write_sweep(directory: Path, rows=ROWS, header=HEADER) -> Path:
    (directory / "generations").mkdir(parents=True)
    with (directory / "gsm8k.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    # the RC file lists its problems in completion order (here: reversed); the viewer sorts them by id
    for name, records in ((SINGLE_JSONL, SINGLE_RECORDS), (RC_JSONL, RC_RECORDS[::-1])):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


@pytest.fixture
def sweep(tmp_path) -> Path:
    return _write_sweep(tmp_path / "sweep")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _embedded_data(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="sweep-data">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


def test_plot_has_a_cycle_panel_when_a_row_ran_rc_cycles(sweep):
    path = write_plot(sweep)
    assert path == sweep / "gsm8k.png"
    # two panels of 6.4 x 4.2 inches at 100 dpi side by side
    assert _png_size(path) == (1280, 420)
    assert sorted(p.name for p in sweep.iterdir()) == ["generations", "gsm8k.csv", "gsm8k.png"]  # no temp left


def test_plot_has_one_panel_without_rc_cycles_and_draws_with_only_error_rows(tmp_path):
    single = _write_sweep(tmp_path / "single", rows=[ROWS[0]])
    assert _png_size(write_plot(single)) == (640, 420)
    errors_only = _write_sweep(tmp_path / "errors", rows=[ROWS[2]])
    assert _png_size(write_plot(errors_only)) == (640, 420)


def test_report_embeds_rows_plot_and_generations(sweep):
    path = write_report(sweep)
    assert path == sweep / "report.html"
    html = path.read_text()
    data = _embedded_data(html)
    assert data["columns"] == HEADER
    assert data["rows"] == [[row[name] for name in HEADER] for row in ROWS]
    # the error row has no generations: two checkpoints in the viewer, each with its records as written
    assert [c["records"] for c in data["checkpoints"]] == [SINGLE_RECORDS, RC_RECORDS[::-1]]
    assert data["checkpoints"][1]["label"] == "tiny step 2 · bf16 · rc ×2 · bbbbbbbbbbbb"
    # write_report drew the missing plot and embedded exactly its bytes
    uri = re.search(r'<img id="plot"[^>]* src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html).group(1)
    assert base64.b64decode(uri) == (sweep / "gsm8k.png").read_bytes()


def test_report_is_offline_and_hostile_text_cannot_end_the_data_element(sweep):
    html = write_report(sweep).read_text()
    # the only tags in the page are the template's: two <script> elements, one <img>, no external resource
    assert html.count("<script") == 2 and html.count("</script>") == 2
    assert html.count("<img") == 1
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<link" not in html
    assert "\\u003c/script\\u003e\\u003cscript\\u003ewindow.pwned=1\\u003c/script\\u003e" in html
    # "{{plot}}" in model output is not a template slot: it stays literal text in the data
    assert _embedded_data(html)["checkpoints"][0]["records"][2]["cycles"][0]["reasoning"] == HOSTILE + " (cycle 1)"


def test_bad_sweep_directories_are_one_line_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match=r"gsm8k.csv: no such file"):
        write_report(tmp_path)
    short = _write_sweep(tmp_path / "short", header=[name for name in HEADER if name != "settings_hash"])
    with pytest.raises(RowError, match=r"gsm8k.csv:1: header lacks the column\(s\) settings_hash"):
        write_plot(short)
    outside = _write_sweep(tmp_path / "outside", rows=[{**ROWS[0], "generations": "../../etc/passwd.jsonl"}])
    (tmp_path / "outside" / "gsm8k.png").write_bytes(b"")
    with pytest.raises(RowError, match=r"is not a \.jsonl file in"):
        write_report(outside)
    truncated = _write_sweep(tmp_path / "truncated")
    (truncated / RC_JSONL).write_text(json.dumps(RC_RECORDS[0]) + "\n" + '{"problem_id": "gsm8k-1", "cyc')
    with pytest.raises(RowError, match=r"bbbbbbbbbbbb.jsonl:2: not a JSON object"):
        write_report(truncated)
    not_a_number = _write_sweep(tmp_path / "nan", rows=[{**ROWS[0], "strict": "half"}])
    with pytest.raises(RowError, match=r"gsm8k.csv:2: column strict is 'half', not a number"):
        write_plot(not_a_number)


def test_a_deleted_generations_file_is_named_in_the_viewer(tmp_path):
    gone = _write_sweep(tmp_path / "gone", rows=[{**ROWS[0], "generations": "generations/deleted.jsonl"}])
    assert _embedded_data(write_report(gone).read_text())["checkpoints"] == [
        {"label": "tiny step 1 · bf16 · single · aaaaaaaaaaaa · generations file missing", "records": []}]


def test_template_is_package_data():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch("report_template.html", pattern) for pattern in package_data["flash_rc.eval"])


CHROMIUM = shutil.which("chromium")
ARTIFACT = REPO / "outputs" / "test-artifacts" / "report.png"


@pytest.fixture
def page():
    if CHROMIUM is None:
        pytest.skip("no system chromium: `make browser` installs Debian's chromium (needs root + apt)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra (make install)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        page.requests = requests
        yield page
        browser.close()


def test_report_in_a_browser(sweep, page, tmp_path):
    report = write_report(sweep)
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    # offline: nothing but the file itself and the embedded data URI was requested
    assert all(url.startswith(("file://", "data:")) for url in page.requests), page.requests

    assert page.locator("#results-table tbody tr").count() == len(ROWS)
    assert page.locator("#results-table tbody tr.error-row td.error").inner_text() == ERROR
    assert page.eval_on_selector("#plot", "img => img.complete && img.naturalWidth") == 1280

    # the first checkpoint (single mode) is selected at load: all 4 samples listed
    assert page.locator("#problem-list li").count() == 4
    page.select_option("#checkpoint-filter", index=1)  # tiny step 2, RC with 2 cycles
    problem_ids = "lis => lis.map(li => li.dataset.problemId)"
    assert page.eval_on_selector_all("#problem-list li", problem_ids) == ["gsm8k-0", "gsm8k-1", "gsm8k-2", "gsm8k-3"]
    page.click('#problem-list li[data-problem-id="gsm8k-2"]')
    assert page.locator("#chain-view .cycle").count() == 2
    chain = page.inner_text("#chain-view")
    assert "Cycle 1" in chain and "Cycle 2" in chain and "Final answer: 4" in chain
    # the hostile text is shown as text, never run: in the reasoning and the summary of both cycles (2 + 2 = 4)
    assert chain.count('</script><script>window.pwned=1</script>') == 4
    assert page.locator("#chain-view img, #chain-view script").count() == 0
    assert page.evaluate("typeof window.pwned") == "undefined"

    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "report.png", ARTIFACT)
    print(f"report screenshot: {ARTIFACT}")

    # RC checkpoint: gsm8k-3 is the one problem still wrong after the last cycle
    page.select_option("#correct-filter", "incorrect")
    assert page.eval_on_selector_all("#problem-list li", problem_ids) == ["gsm8k-3"]
    page.select_option("#correct-filter", "correct")
    assert page.locator("#problem-list li.incorrect").count() == 0
    assert page.locator("#problem-list li.correct").count() == 3
    assert page.inner_text("#chain-view") == "Click a problem to see its chain."
