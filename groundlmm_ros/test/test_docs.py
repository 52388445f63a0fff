"""The documentation says what the code does: generated text is current, every `groundlmm` command
parses, every link leads somewhere, and the demo model's answers shown are its answers.

The node's commands in docs/node.md run in test_node_readme.py.
"""

import importlib.util
import inspect
import re
import shlex
from pathlib import Path

import cv2
import pytest
import yaml

from groundlmm_ros.cli import build_parser
from groundlmm_ros.demo import UPSCALE
from groundlmm_ros.engine.engine import Engine
from groundlmm_ros.engine.types import MAX_NEW_TOKENS
from groundlmm_ros.evaluation import held_out_scenes
from groundlmm_ros.models.presets import PRESETS, build_engine
from groundlmm_ros.ros.params import (
    PARAMETERS,
    PRESET_NAMES,
    camera_parameter,
    check_parameters,
    markdown_table,
)

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "bench" / "RESULTS.md",
    REPO / "groundlmm_ros" / "model" / "MODEL_CARD.md",
]


def generator():
    spec = importlib.util.spec_from_file_location(
        "generate_docs", REPO / "scripts" / "generate_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_current():
    stale = [str(path.relative_to(REPO)) for path in generator().stale_files()]
    assert stale == [], f"stale generated text in {stale}: run `make docs`"


def test_the_model_parameter_names_every_preset_and_the_tables_show_them():
    assert PRESET_NAMES == tuple(PRESETS)
    node_doc = (REPO / "docs" / "node.md").read_text()
    table = re.search(r"<!-- parameters:begin[^\n]*-->\n(.*?)\n<!-- parameters:end", node_doc, re.S)
    assert table.group(1) == markdown_table()
    assert len(table.group(1).splitlines()) == len(PARAMETERS) + 2
    models_doc = (REPO / "docs" / "models.md").read_text()
    assert all(f"| `{name}` |" in models_doc for name in PRESETS)


def test_one_default_answer_length():
    engine_default = inspect.signature(Engine).parameters["max_new_tokens"].default
    assert engine_default == PARAMETERS["max_new_tokens"][0] == MAX_NEW_TOKENS
    # The prose that names the default names this one.
    assert f"`max_new_tokens: {MAX_NEW_TOKENS}`" in (REPO / "docs" / "models.md").read_text()
    assert f"answer length**: {MAX_NEW_TOKENS} tokens" in (REPO / "docs" / "method.md").read_text()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def groundlmm_commands() -> list[tuple[str, str]]:
    """(file, command) for every `groundlmm ...` command line of the docs' code blocks."""
    commands = []
    for path in DOCS:
        for block in code_blocks(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].strip()
                if line and Path(line.split()[0]).name == "groundlmm":
                    commands.append((path.name, shlex.split(line)[1:]))
    return commands


def test_every_groundlmm_command_in_the_docs_parses():
    commands = groundlmm_commands()
    assert len(commands) >= 6
    parser = build_parser()
    for name, arguments in commands:
        if "--help" in arguments:
            continue
        try:
            parser.parse_args(arguments)
        except SystemExit:
            pytest.fail(f"{name}: `groundlmm {' '.join(arguments)}` does not parse")


def test_every_relative_link_leads_to_a_file_and_heading():
    def anchors(path: Path) -> set[str]:
        headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}

    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.name}: {target} leads nowhere"
            if anchor:
                assert anchor in anchors(linked), f"{path.name}: no heading for {target}"


@pytest.fixture(scope="module")
def demo_scene():
    """`make demo`'s first scene as its camera publishes it, and the demo model."""
    scene = held_out_scenes(1)[0]
    frame = cv2.resize(scene.image, None, fx=UPSCALE, fy=UPSCALE, interpolation=cv2.INTER_NEAREST)
    return frame, build_engine("demo")


def test_the_readmes_demo_answers_are_the_demo_models(demo_scene):
    frame, engine = demo_scene
    readme = (REPO / "README.md").read_text()
    shown = readme[readme.index("<!-- demo-answer:begin") : readme.index("<!-- demo-answer:end")]
    asked = re.findall(r"^  (describe|refer) +'(.+?)' -> '(.+?)'", shown, re.M)
    points = [
        (text, (int(x), int(y)))
        for text, x, y in re.findall(r"\[(.+?)\] point \((\d+), (\d+)\)", shown)
    ]
    assert len(asked) == 3 and len(points) == 4
    grounded = []
    for mode, query, answer in asked:
        result = engine.ground(frame, query, mode)
        assert result.answer == answer, (query, result.answer)
        grounded += [(phrase.text, phrase.point) for phrase in result.phrases]
    assert grounded == points


def test_the_queries_the_demo_model_understands_give_the_answers_shown(demo_scene):
    frame, engine = demo_scene
    node_doc = (REPO / "docs" / "node.md").read_text()
    table = node_doc[
        node_doc.index("<!-- demo-queries:begin") : node_doc.index("<!-- demo-queries:end")
    ]
    rows = re.findall(r"^\| `(.+?)` \| (describe|refer) \| (.+?) \| (.+?) \|$", table, re.M)
    assert len(rows) >= 4
    for query, mode, answer, phrases in rows:
        result = engine.ground(frame, query, mode)
        assert (result.answer, [p.text for p in result.phrases]) == (answer, phrases.split("; "))


def test_the_many_cameras_example_is_a_valid_parameter_file_its_commands_use():
    node_doc = (REPO / "docs" / "node.md").read_text()
    section = node_doc[node_doc.index("## Many cameras") : node_doc.index("## Parameters")]
    params_yaml, commands = re.findall(r"```(?:yaml|bash)\n(.*?)```", section, re.S)[:2]
    values = yaml.safe_load(params_yaml)["/**"]["ros__parameters"]
    cameras = values.pop("cameras")
    flat = {
        camera_parameter(camera, name): value
        for camera in cameras
        for name, value in values.pop(camera, {}).items()
    }
    assert set(values) | {name.split(".")[1] for name in flat} <= set(PARAMETERS)
    assert check_parameters({"cameras": cameras, **values, **flat}) == ""
    used = set(re.findall(r"(?:-r |/)(\w+)/(?:image|query)\b", commands))
    used |= set(re.findall(r"camera: (\w+)", commands))
    used |= set(re.findall(r" (\w+)\.standing_query", commands))
    assert used and used <= set(cameras), used
