"""The flash-rc command: subcommand dispatch and clean errors for user mistakes."""

from flash_rc.cli import main


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("decode", "data", "models", "quantize"))
    assert main(["nope"]) == 2


def test_user_mistakes_are_one_line_errors_not_tracebacks(capsys):
    assert main(["decode", "data.path=x"]) == 2
    err = capsys.readouterr().err
    assert "flash-rc decode: error: invalid recipe" in err and "data.path: Extra inputs" in err
    assert "Traceback" not in err
    assert main(["decode", "data.val_files=x.jsonl", "flash_rc.rc.reasoning_prompt=/no/such/template.txt"]) == 2
    assert "prompt template file not found" in capsys.readouterr().err


def test_bad_problem_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "problems.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{oops\n')
    assert main(["decode", f"data.val_files={bad}"]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
