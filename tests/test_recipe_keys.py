"""scripts/recipe_keys.py: the README's recipe-key reference is what the TrainRecipe schema says, row by row."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from flash_rc.schema import Section

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "recipe_keys.py"
_spec = importlib.util.spec_from_file_location("recipe_keys", SCRIPT)
recipe_keys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe_keys)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """{dotted key: [type, default, meaning]} of every table row (cells split at unescaped pipes)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            key, *cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[key.strip("`")] = cells
    return rows


def test_readme_reference_is_current():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check", "README.md"], cwd=REPO, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_known_keys_with_their_types_defaults_and_docstrings():
    rendered = recipe_keys.render()
    rows = table_rows(rendered)
    assert rows["data.train_batch_size"][:2] == ["`int` ≥ 1", "`1024`"]  # Field(1024, ge=1)
    assert rows["data.train_batch_size"][2] == "Prompts per training step (each sampled `rollout.n` times)."
    assert rows["data.train_files"][:2] == [r"`str \| list[str]`", "required"]
    assert rows["actor_rollout_ref.actor.optim.lr"][:2] == ["`float` > 0", "`1e-06`"]
    assert rows["actor_rollout_ref.actor.clip_ratio_low"][0] == "`float` ≥ 0, < 1"  # copied from PolicyLossConfig
    assert rows["actor_rollout_ref.rollout.max_model_len"][1] == "`4096`"  # copied from EngineConfig
    assert rows["trainer.logger"][1] == "`[console]`"  # a default_factory
    assert rows["algorithm.rollout_correction.rollout_is"][:2] == [r"`token \| sequence \| geometric \| null`",
                                                                   "`null`"]
    ulysses = rows["actor_rollout_ref.actor.ulysses_sequence_parallel_size"]  # Literal[1]: pinned
    assert ulysses[:2] == ["`int`", "`1`"] and ulysses[2].startswith("*fixed locally (verl default only).*")
    assert not rows["actor_rollout_ref.rollout.top_k"][2].startswith("*fixed")  # Literal[-1, 0]: two choices
    assert "actor_rollout_ref.actor.optim" not in rows and "actor_rollout_ref.actor" not in rows  # sections: walked
    headings = re.findall(r"^#### `(\w+)`$", rendered, flags=re.MULTILINE)
    assert headings == ["data", "actor_rollout_ref", "algorithm", "reward", "trainer", "flash_rc"]


class _Toy(Section):
    choice: Literal["a", "b|c"] = "a"
    """Pick ``a``. Or the other one."""
    ratio: float = Field(0.5, gt=0, le=1)
    """A short first sentence. Then a second one, long enough that the two together pass the 240 characters a row's
    description may take: the reference keeps the first sentence and drops this one, which a reader finds in the
    field's docstring in the schema instead."""
    fixed: Literal[True] = True
    """Not settable here."""


class _ToyRecipe(Section):
    toy: _Toy = _Toy()


class _Undocumented(Section):
    count: int = 0


class _UndocumentedRecipe(Section):
    part: _Undocumented = _Undocumented()


def test_rows_escape_pipes_cut_long_docstrings_and_mark_pinned_keys():
    assert recipe_keys.render(_ToyRecipe).splitlines()[4:] == [
        r"| `toy.choice` | `a \| b\|c` | `a` | Pick `a`. Or the other one. |",
        "| `toy.ratio` | `float` > 0, ≤ 1 | `0.5` | A short first sentence. |",  # the second would pass 240 chars
        "| `toy.fixed` | `bool` | `true` | *fixed locally (verl default only).* Not settable here. |",
    ]


def test_a_key_without_docstring_is_refused_by_name():
    with pytest.raises(SystemExit, match=r"part\.count has no docstring"):
        recipe_keys.render(_UndocumentedRecipe)


def test_check_finds_a_stale_block_and_write_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{recipe_keys.BEGIN}\n| old | table |\n{recipe_keys.END}\n\nafter\n")
    with pytest.raises(SystemExit) as stale:
        recipe_keys.main(["--check", str(readme)])
    assert f"run `python scripts/recipe_keys.py --write {readme}`" in stale.value.code  # a message: exit status 1
    recipe_keys.main(["--write", str(readme)])
    text = readme.read_text()
    assert text == f"# title\n\n{recipe_keys.BEGIN}\n{recipe_keys.render()}\n{recipe_keys.END}\n\nafter\n"
    recipe_keys.main(["--check", str(readme)])  # current now: returns without exiting
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="has no <!-- recipe-keys:begin -->"):
        recipe_keys.main(["--check", str(readme)])
