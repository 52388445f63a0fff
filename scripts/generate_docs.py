"""Write every generated piece of documentation from its one home (`make docs`).

- docs/models.md's preset and tracker tables, from models/presets.py's PRESETS, LOADERS and
  TRACKERS;
- params.py's PRESET_NAMES and TRACKER_NAMES (the `model` and `tracker_model` parameters'
  descriptions list them), from PRESETS and TRACKERS;
- docs/node.md's parameter table and config/params.yaml, from ros/params.py's PARAMETERS.

`--check` writes nothing and exits 1 naming the stale files (test_docs.py runs the same check).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARAMS_PY = REPO / "groundlmm_ros" / "groundlmm_ros" / "ros" / "params.py"
PARAMS_YAML = REPO / "groundlmm_ros" / "config" / "params.yaml"
NODE_MD = REPO / "docs" / "node.md"
MODELS_MD = REPO / "docs" / "models.md"


def between(text: str, name: str, generated: str) -> str:
    """text with the lines between `<!-- {name}:begin ... -->` and `<!-- {name}:end -->`
    replaced by generated."""
    pattern = re.compile(rf"(<!-- {name}:begin[^\n]*-->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- {name}:begin --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + generated + "\n" + m.group(2), text, count=1)


def names_source(variable: str, names) -> str:
    """A tuple of names assigned to `variable`, as ruff formats it."""
    return f"{variable} = (\n" + "".join(f'    "{name}",\n' for name in names) + ")"


def with_names(source: str, variable: str, names) -> str:
    """params.py's source with `variable = (...)` holding `names`."""
    pattern = re.compile(rf'{variable} = \((\n    "[^"\n]*",)*\n\)')
    if not pattern.search(source):
        raise ValueError(f"ros/params.py has no {variable} = (...) to write")
    return pattern.sub(lambda _: names_source(variable, names), source, count=1)


def models_table() -> str:
    """docs/models.md's preset table: one row per preset, then model directories."""
    from groundlmm_ros.engine.types import MAX_NEW_TOKENS
    from groundlmm_ros.models.presets import (
        LOADERS,
        PAPER_ANSWER_TOKENS,
        PRESETS,
        REFERENCE_ANSWER_TOKENS,
        recorded_settings,
    )

    answer_note = {
        MAX_NEW_TOKENS: " (the default)",
        PAPER_ANSWER_TOKENS: " (the paper's)",
        REFERENCE_ANSWER_TOKENS: " (the reference's scripts)",
    }

    def settings_cell(settings: dict) -> str:
        shown = [f"`{k}: {yaml_value(v)}`" for k, v in settings.items() if k != "max_new_tokens"]
        return ", ".join(shown) or "the defaults"

    rows = []
    for name, preset in PRESETS.items():
        settings = dict(preset.settings)
        if preset.directory:
            config = json.loads((Path(preset.directory()) / "config.json").read_text())
            settings = {**recorded_settings(config), **settings}
        tokens = settings.get("max_new_tokens", MAX_NEW_TOKENS)
        rows.append(
            f"| `{name}` | {preset.about} | {preset.needs} | {settings_cell(settings)} "
            f"| {tokens}{answer_note.get(tokens, '')} |"
        )
    model_types = ", ".join(f"`{t}`" for t in LOADERS)
    rows.append(
        f"| a directory | its `config.json`'s `model_type`: {model_types} | the directory "
        f"| what `config.json` records (`groundlmm train` writes them), else the defaults "
        f"| {MAX_NEW_TOKENS} (the default) |"
    )
    header = (
        "| `model` | what it is | needs on disk | settings | answer tokens |\n|---|---|---|---|---|"
    )
    return "\n".join([header, *rows])


def trackers_table() -> str:
    """docs/models.md's tracker table: one row per TRACKERS preset."""
    from groundlmm_ros.models.presets import TRACKERS

    rows = [
        f"| `{name}` | {preset.about} | "
        + (f"`{preset.repo_id}` in the Hugging Face cache" if preset.repo_id else "nothing")
        + " |"
        for name, preset in TRACKERS.items()
    ]
    return "\n".join(["| `tracker_model` | what it is | needs on disk |", "|---|---|---|", *rows])


def yaml_value(value) -> str:
    """A default as params.yaml writes it: plain where YAML reads it back unchanged."""
    import yaml

    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and value and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def params_yaml(params: types.ModuleType) -> str:
    dynamic = ", ".join(params.DYNAMIC)
    lines = [
        "# groundlmm_node's parameters, each at its default. Generated from",
        "# groundlmm_ros/ros/params.py by scripts/generate_docs.py: edit them there.",
        "# Read when the node is configured (change them, then cleanup + configure), except",
        f"# {dynamic}, which also apply at once. A named camera's own are",
        "# <camera>.standing_query, ... (default: these). `/**` applies them whatever the node's",
        "# name and namespace.",
        "/**:",
        "  ros__parameters:",
    ]
    for name, (default, description) in params.PARAMETERS.items():
        lines += textwrap.wrap(
            description,
            100,
            initial_indent="    # ",
            subsequent_indent="    #   ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        lines.append(f"    {name}: {yaml_value(default)}")
    return "\n".join(lines) + "\n"


def params_module(source: str) -> types.ModuleType:
    """ros/params.py run from this source: its tables as they will read once it is written."""
    module = types.ModuleType("generated_params")
    sys.modules[module.__name__] = module
    exec(compile(source, str(PARAMS_PY), "exec"), module.__dict__)
    return module


def generated_files() -> dict[Path, str]:
    """Every file holding generated text -> its content as it should be."""
    from groundlmm_ros.models.presets import PRESETS, TRACKERS

    params_source = with_names(PARAMS_PY.read_text(), "PRESET_NAMES", PRESETS)
    params_source = with_names(params_source, "TRACKER_NAMES", TRACKERS)
    params = params_module(params_source)
    return {
        PARAMS_PY: params_source,
        NODE_MD: between(NODE_MD.read_text(), "parameters", params.markdown_table()),
        MODELS_MD: between(
            between(MODELS_MD.read_text(), "presets", models_table()), "trackers", trackers_table()
        ),
        PARAMS_YAML: params_yaml(params),
    }


def stale_files() -> list[Path]:
    return [path for path, text in generated_files().items() if path.read_text() != text]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path.relative_to(REPO)} (run scripts/generate_docs.py)")
        sys.exit(1 if stale else 0)
    for path, text in generated_files().items():
        if path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
