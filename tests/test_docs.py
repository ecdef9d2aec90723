"""The documentation stays true to the code: every public name is in the API reference (which is
generated from the docstrings and must be regenerated when they change), every docstring example
runs, and every relative link in the Markdown docs points to a file (and heading) that exists."""

from __future__ import annotations

import doctest
import importlib
import json
import importlib.util
import os
import pkgutil
import re
import sys

import pytest
import torch

import fxnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
API = os.path.join(DOCS, "api.md")
MARKDOWN = sorted(
    [os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md")]
    + [p for p in (os.path.join(ROOT, "README.md"),) if os.path.exists(p)]
)
MODULES = sorted(m.name for m in pkgutil.walk_packages(fxnorm.__path__, "fxnorm."))
# Doctests of these scripts run too (they are small); their own skip directives apply.
SCRIPTS = ["docs/gen_api.py", "examples/domain_shift.py", "examples/benchmarks/make_docs.py",
           "examples/benchmarks/docs_tables.py"]


def _load_script(relpath: str):
    path = os.path.join(ROOT, relpath)
    if not os.path.exists(path):
        pytest.skip(f"{relpath} is not there")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_api():
    return _load_script("docs/gen_api.py")


# ------------------------------------------------------------------------------------ API reference
def _headings(path: str) -> list[str]:
    with open(path) as f:
        text = _without_fences(f.read())
    return [m.group(2).strip() for m in re.finditer(r"^(#{1,6})\s+(.+?)\s*$", text, flags=re.M)]


def test_every_public_name_has_a_heading_in_the_api_reference():
    headings = set(_headings(API))
    missing = [name for name in fxnorm.__all__ if f"`{name}`" not in headings]
    assert not missing, f"not documented in docs/api.md: {missing}; run python docs/gen_api.py"


def test_the_api_reference_is_generated_from_the_current_docstrings(gen_api):
    with open(API) as f:
        current = f.read()
    assert current == gen_api.render(), "docs/api.md is out of date: run python docs/gen_api.py"


def test_api_reference_shows_signatures_and_docstrings(gen_api):
    text = gen_api.render()
    # a function: its real signature (keyword-only marker, defaults) and its docstring's example
    entry = text.split("### `trace`")[1].split("\n### ")[0]
    assert "*,\n    leaf_modules: LeafModules = ()," in entry
    assert "```python\n>>> import torchvision" in entry
    assert "- `inplace`: replace the children of `model` itself." in entry
    # a dataclass: its fields with the ``#:`` comments of the source
    entry = text.split("### `NormSite`")[1].split("\n## ")[0]
    assert "- `fold: str | None = None`: \"into_producer\", \"into_consumer\" or None" in entry
    # an exception: its base class
    assert "class TraceError(FxNormError)" in text


def test_markdown_docstring_converts_sections_and_roles(gen_api):
    doc = ('Summary with :func:`fxnorm.trace` and ``code``.\n\nArgs:\n    x: first line\n        continued.\n'
           '    y (int): other.\n\nRaises:\n    FoldError: when.\n\nExample:\n    >>> 1 + 1\n    2\n')
    text = gen_api.markdown_docstring(doc, {"trace"})
    assert text == ("Summary with [`trace`](#trace) and `code`.\n\n**Args**\n\n- `x`: first line continued.\n"
                    "- `y (int)`: other.\n\n**Raises**\n\n- `FoldError`: when.\n\n**Example**\n\n"
                    "```python\n>>> 1 + 1\n2\n```")


# --------------------------------------------------------------------------------- docstring examples
def _run_doctests(module) -> None:
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    threads = torch.get_num_threads()
    try:
        tests = finder.find(module, module.__name__)
        out: list[str] = []
        for test in tests:
            runner.run(test, out=out.append)
    finally:
        torch.set_num_threads(threads)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(out)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    _run_doctests(importlib.import_module(name))


@pytest.mark.parametrize("relpath", SCRIPTS)
def test_script_docstring_examples_run(relpath):
    if relpath == "examples/domain_shift.py":
        pytest.importorskip("sklearn")
    _run_doctests(_load_script(relpath))


# ------------------------------------------------------------------------------------------- links
def _without_fences(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)


def _without_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", _without_fences(text))


def _anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for heading in _headings(path):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: str) -> list[str]:
    with open(path) as f:
        text = _without_code(f.read())
    links = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    links += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", text, flags=re.M)  # reference-style definitions
    return links


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_point_to_existing_files_and_headings(path):
    broken = []
    for link in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, flags=re.I):  # http:, https:, mailto: ...
            continue
        target, _, fragment = link.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        if not os.path.exists(full):
            broken.append(f"{link} (no file {os.path.relpath(full, ROOT)})")
        elif fragment and full.endswith(".md") and fragment not in _anchors(full):
            broken.append(f"{link} (no heading #{fragment} in {os.path.relpath(full, ROOT)})")
    assert not broken, f"broken links in {os.path.relpath(path, ROOT)}: {broken}"


def test_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# Title\n\n## A `code` heading\n")
    page.write_text("[ok](there.md#a-code-heading) [bad](missing.md) [bad anchor](there.md#nope)\n"
                    "```\n[not a link](nowhere.md)\n```\n")
    assert _links(str(page)) == ["there.md#a-code-heading", "missing.md", "there.md#nope"]
    assert _anchors(str(tmp_path / "there.md")) == {"title", "a-code-heading"}


# ------------------------------------------------------------------------------ runnable guide pages
GUIDES = ["docs/guide.md"]


@pytest.mark.parametrize("relpath", GUIDES)
def test_python_examples_in_guides_run_and_print_what_they_show(relpath):
    """Every ```python block with ``>>>`` prompts in the page, run in order in one namespace."""
    with open(os.path.join(ROOT, relpath)) as f:
        text = f.read()
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    namespace: dict = {}
    out: list[str] = []
    tests = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S):
        if ">>>" in match.group(1):
            line = text.count("\n", 0, match.start(1))  # so failures point at the page's own lines
            test = parser.get_doctest(match.group(1), namespace, relpath, os.path.join(ROOT, relpath), line)
            test.globs = namespace  # DocTest copies its globals: share one namespace across the blocks
            tests.append(test)
    assert tests, f"{relpath} has no runnable example"
    threads = torch.get_num_threads()
    try:
        for test in tests:
            runner.run(test, out=out.append, clear_globs=False)
    finally:
        torch.set_num_threads(threads)
    assert runner.summarize(verbose=False).failed == 0, "".join(out)


# ---------------------------------------------------------------------------------- benchmarks page
@pytest.fixture(scope="module")
def make_docs():
    return _load_script("examples/benchmarks/make_docs.py")


def test_benchmarks_page_is_rendered_from_the_stored_results(make_docs):
    with open(make_docs.PAGE) as f:
        current = f.read()
    assert current == make_docs.render_page(make_docs.load_results()), (
        "docs/benchmarks.md is out of date: run python examples/benchmarks/make_docs.py")


def test_benchmarks_page_shows_the_measured_shift_accuracies(make_docs):
    results = make_docs.load_results()
    if not results["shift"]:
        pytest.skip("the domain-shift benchmark has not been run")
    page = make_docs.render_page(results)
    section = page.split("## Accuracy under domain shift")[1].split("The same with")[0]
    for row in results["shift"]["rows"]:
        line = next(l for l in section.splitlines() if l.startswith(f"| {row['corruption'].replace('_', ' ')} "))
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        shown = [float(c) for c in cells[1:5]]
        want = [100 * row[m] for m in ("source", "update_bn", "update_bn_no_dropout", "fxnorm")]
        assert shown == pytest.approx(want, abs=0.051), line
        assert float(cells[5]) == pytest.approx(100 * (row["fxnorm"] - row["source"]), abs=0.051)
    for name in ("domain_shift.png",):
        assert os.path.exists(os.path.join(DOCS, name)), f"docs/{name} missing: run make_docs.py"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io's image decoding (used by the CLI)
def test_build_script_commands_in_the_guide_run(tmp_path, monkeypatch):
    """The ```bash block of the guide's build-script section, run with ``fxnorm.cli.main`` in a
    scratch folder holding the model file and image folder it names."""
    cli = pytest.importorskip("fxnorm.cli")
    import shlex
    from contextlib import redirect_stdout

    import torchvision

    with open(os.path.join(ROOT, "docs", "guide.md")) as f:
        text = f.read()
    block = text.split("## 5. The same as a build script")[1].split("```bash\n")[1].split("```")[0]
    commands = [line for line in block.splitlines() if line.startswith("fxnorm ")]
    assert len(commands) >= 3, block
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).eval(), "my_model.pt")
    image = pytest.importorskip("PIL.Image")
    os.mkdir("images")
    for i in range(6):
        pixels = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8)
        image.fromarray(pixels.numpy()).save(f"images/{i}.png")
    for command in commands:
        argv = shlex.split(command)[1:]
        target = None
        if ">" in argv:
            target = argv[argv.index(">") + 1]
            argv = argv[: argv.index(">")]
        with open(target or os.devnull, "w") as sink, redirect_stdout(sink):
            status = cli.main(argv)
        assert status == 0, command
    with open("norms.json") as f:
        norms = json.load(f)
    assert norms["summary"]["total"] == 20 and norms["summary"]["foldable"] == 20
    deployed = torch.load("deploy.pt", weights_only=False)
    assert fxnorm.find_norms(deployed) == []
