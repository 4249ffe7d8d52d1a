"""docs/options.md is generated from the registry and kept up to date."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kubetuner_trainer.options import Registry, get_registry
from kubetuner_trainer.options.catalog import GROUP_TITLES, OPTIONS
from kubetuner_trainer.options.docs import REGENERATE, main, render_markdown

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "options.md"


def test_options_md_is_up_to_date():
    expected = render_markdown(get_registry())
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    assert current == expected, (
        f"docs/options.md is stale (the catalog or options/implemented/*.txt changed); "
        f"regenerate it from the repository root with: {REGENERATE}"
    )


def test_every_flag_and_alias_is_documented():
    text = DOC.read_text(encoding="utf-8")
    for option in get_registry():
        assert f"`{option.flag}`" in text, option.name
        for alias in option.aliases:
            assert f"`--{alias}`" in text, alias


def test_regeneration_command_is_at_the_top():
    head = DOC.read_text(encoding="utf-8")[:1500]
    assert REGENERATE in head


def test_contents_follow_group_titles():
    text = render_markdown(get_registry())
    positions = [text.index(f"## {title}\n") for title in GROUP_TITLES.values()]
    assert positions == sorted(positions)
    for key in GROUP_TITLES:
        assert f"](#{key})" in text and f'<a id="{key}"></a>' in text


def test_implemented_column_and_escaping():
    options = [
        replace(OPTIONS[0], implemented=True, implemented_choices=frozenset({"flux", "sdxl"})),
        replace(next(o for o in OPTIONS if o.name == "use_ema"), implemented=True),
        replace(next(o for o in OPTIONS if o.name == "seed"), help="a | b"),
    ]
    text = render_markdown(Registry(options))
    assert "partial: `flux`, `sdxl`" in text
    assert "| `--use_ema` | bool | `false` |  |  | yes |" in text
    assert "a \\| b" in text
    assert "3 options, 2 implemented" in text


def test_check_and_write(tmp_path: Path, capsys):
    target = tmp_path / "options.md"
    assert main(["--check", str(target)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main(["--write", str(target)]) == 0
    assert main(["--check", str(target)]) == 0
    target.write_text(target.read_text(encoding="utf-8") + "edited\n", encoding="utf-8")
    assert main(["--check", str(target)]) == 1
    assert main([]) == 0
    assert capsys.readouterr().out == render_markdown(get_registry())
