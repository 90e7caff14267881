"""Prompt templates: defaults carry the RC structure, user templates are validated when loaded."""

import pytest

from flash_rc.rc import prompts as P


def test_default_templates_have_exactly_their_fields():
    assert P.template_fields(P.REASONING_PROMPT) == {"problem", "curr_summary"}
    assert P.template_fields(P.SUMMARIZATION_PROMPT) == {"problem", "existing_summary", "reasoning"}
    assert P.template_fields(P.SELF_REFINE_PROMPT) == P.template_fields(P.SELF_VERIFY_PROMPT) == {
        "problem", "curr_reasoning"}


def test_reasoning_prompt_structure_and_literal_braces():
    text = P.PromptTemplate(P.REASONING_PROMPT, P.REASONING_FIELDS).fill(problem="What is 2+2?", curr_summary="")
    # problem, then the (empty in cycle 1) summary section, then instructions asking for a boxed answer
    assert text.index("### PROBLEM\nWhat is 2+2?") < text.index("### SUMMARY OF PREVIOUS ATTEMPT") < text.index(
        "### INSTRUCTIONS")
    assert "\\boxed{}" in text


def test_summarization_prompt_asks_for_a_short_first_person_summary():
    text = P.PromptTemplate(P.SUMMARIZATION_PROMPT, P.SUMMARIZATION_FIELDS).fill(
        problem="p", existing_summary="old summary", reasoning="new reasoning")
    assert "at most two paragraphs" in text and "first person" in text and "do not add any reasoning" in text
    assert text.endswith("### LATEST CANDIDATE SOLUTION\nnew reasoning")
    assert "### EXISTING SUMMARY\nold summary" in text


@pytest.mark.parametrize(
    "template, message",
    [
        ("Solve {problem} using {summary}", "unknown field"),  # typo of curr_summary
        ("Summary: {curr_summary}", "must contain the {problem}"),
        ("Solve {problem} and box it in \\boxed{}", "unknown field"),  # single braces are a field, not literal
        ("Solve {problem", "not a valid format string"),
    ],
)
def test_bad_templates_fail_at_load_time(template, message):
    with pytest.raises(P.TemplateError, match=message):
        P.load_template(template, P.REASONING_PROMPT, P.REASONING_FIELDS)


def test_template_from_file_and_missing_file(tmp_path):
    path = tmp_path / "i_r.txt"
    path.write_text("Problem: {problem}\nSummary: {curr_summary}\nAnswer in \\boxed{{}}.")
    template = P.load_template(str(path), P.REASONING_PROMPT, P.REASONING_FIELDS)
    assert template.fill(problem="x", curr_summary="y") == "Problem: x\nSummary: y\nAnswer in \\boxed{}."
    with pytest.raises(P.TemplateError, match="not found"):
        P.load_template(str(tmp_path / "nope.txt"), P.REASONING_PROMPT, P.REASONING_FIELDS)
    assert P.load_template(None, P.REASONING_PROMPT, P.REASONING_FIELDS).text == P.REASONING_PROMPT
