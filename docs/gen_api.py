"""Generate docs/api.md from the docstrings of every name in ``fxnorm.__all__``.

The reference is never edited by hand: change a docstring, then run::

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 when docs/api.md is out of date (tests/test_docs.py does this)

Google-style sections (``Args:``, ``Returns:``, ``Raises:``, ``Example:``) become Markdown lists and
code blocks; ``:func:`name``` roles become inline code, linked when ``name`` is documented here.
Dataclass fields are listed with the ``#:`` comments written beside them in the source.

Example:
    >>> text = render()
    >>> "### `find_norms`" in text
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import os
import re
import sys
import textwrap
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fxnorm  # noqa: E402  (after the path set-up on purpose)

__all__ = ["render", "main", "anchor", "markdown_docstring"]

API_PATH = os.path.join(HERE, "api.md")
_SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`~?([^`]+)`")
_LIST_SECTIONS = {"Args", "Arguments", "Parameters", "Raises", "Attributes", "Keyword Args"}
_CODE_SECTIONS = {"Example", "Examples"}
_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#:\s*(.+)$")

#: Section titles of the reference, by the module an object is defined in (others: the module name).
GROUPS = {
    "fxnorm.errors": "Errors",
    "fxnorm.graph.tracing": "Tracing",
    "fxnorm.inspection.sites": "Inspection",
    "fxnorm.inspection.render": "Rendering inspection results",
    "fxnorm.calibration.recalibration": "Reset and recalibration",
    "fxnorm.calibration.report": "Reset and recalibration",
    "fxnorm.calibration.selection": "Reset and recalibration",
    "fxnorm.folding.apply": "Folding",
    "fxnorm.folding.report": "Folding",
    "fxnorm.folding.norm_affine": "Folding",
    "fxnorm.folding.modules": "Folding",
    "fxnorm.reports": "Reports",
    "fxnorm.export": "Export",
    "fxnorm.inspection.programs": "Export",
}


def anchor(name: str) -> str:
    """The GitHub anchor of the heading ``### `name```.

    Example:
        >>> anchor("find_norms"), anchor("NormSite")
        ('find_norms', 'normsite')
    """
    return re.sub(r"[^\w\- ]", "", name.lower()).replace(" ", "-")


def _inline(text: str, names: set[str]) -> str:
    """reST inline markup to Markdown: ``code`` -> `code`, roles -> (linked) code."""

    def role(match: re.Match) -> str:
        target = match.group(1)
        short = target.split(".")[-1].rstrip("()")
        if target.startswith("fxnorm.") and target.count(".") == 1 and short in names:
            return f"[`{short}`](#{anchor(short)})"
        if "." not in target and short in names:
            return f"[`{short}`](#{anchor(short)})"
        return f"`{target}`"

    text = _ROLE.sub(role, text).replace("\\ ", "")  # reST's "\ " joins markup to a word
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _split_sections(doc: str) -> list[tuple[str | None, list[str]]]:
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in doc.splitlines():
        match = _SECTION.match(line)
        if match and not line.startswith(" "):
            sections.append((match.group(1), []))
        else:
            sections[-1][1].append(line)
    return sections


def _list_items(lines: list[str], names: set[str]) -> list[str]:
    body = textwrap.dedent("\n".join(lines)).splitlines()
    items: list[str] = []
    for line in body:
        if not line.strip():
            continue
        if not line.startswith(" "):
            head, sep, rest = line.partition(":")
            if sep and re.fullmatch(r"[\w.*, \[\]|()]+", head.strip()):
                items.append(f"- `{head.strip()}`: {rest.strip()}")
                continue
            items.append(f"- {line.strip()}")
        elif items:
            items[-1] += " " + line.strip()
        else:
            items.append(f"- {line.strip()}")
    return [_inline(item, names) for item in items]


def markdown_docstring(doc: str | None, names: set[str] = frozenset()) -> str:
    """Convert a Google-style docstring to Markdown (sections to lists, examples to code blocks).

    Example:
        >>> print(markdown_docstring("Do it.\\n\\nArgs:\\n    x: the ``input``.\\n"))
        Do it.
        <BLANKLINE>
        **Args**
        <BLANKLINE>
        - `x`: the `input`.
    """
    if not doc:
        return "*(no docstring)*"
    out: list[str] = []
    for title, lines in _split_sections(inspect.cleandoc(doc)):
        if title is None:
            text = "\n".join(lines).strip()
            if text:
                out.append(_inline(text, names))
            continue
        if title in _CODE_SECTIONS:
            code = textwrap.dedent("\n".join(lines)).strip("\n")
            out.append(f"**{title}**\n\n```python\n{code}\n```")
        elif title in _LIST_SECTIONS:
            out.append(f"**{title}**\n\n" + "\n".join(_list_items(lines, names)))
        else:
            text = textwrap.dedent("\n".join(lines)).strip()
            out.append(f"**{title}**\n\n{_inline(text, names)}")
    return "\n\n".join(out)


class _Raw(str):
    """An annotation string that ``inspect`` prints without quotes."""

    def __repr__(self) -> str:
        return str(self)


def _unquoted(sig: inspect.Signature, *, keep_return: bool = True, drop_self: bool = False) -> inspect.Signature:
    """``sig`` with string annotations (``from __future__ import annotations``) printed bare."""

    def raw(annotation: Any) -> Any:
        return _Raw(annotation) if isinstance(annotation, str) else annotation

    params = [p.replace(annotation=raw(p.annotation)) for p in sig.parameters.values()]
    if drop_self and params and params[0].name == "self":
        params = params[1:]
    returns = raw(sig.return_annotation) if keep_return else inspect.Signature.empty
    return sig.replace(parameters=params, return_annotation=returns)


def _signature(name: str, obj: Any) -> str | None:
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        bases = ", ".join(b.__name__ for b in obj.__bases__)
        return f"class {name}({bases})"
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        return f"@dataclass\nclass {name}"  # the fields are listed below the docstring
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None

    sig = _unquoted(sig, keep_return=not inspect.isclass(obj))
    returns = sig.return_annotation
    prefix = "class " if inspect.isclass(obj) else "def "
    line = f"{prefix}{name}{sig}"
    if len(line) <= 100:
        return line
    pieces = [str(p) for p in sig.parameters.values()]
    # markers inspect prints between parameters of different kinds
    shown: list[str] = []
    kinds = [p.kind for p in sig.parameters.values()]
    for i, (piece, kind) in enumerate(zip(pieces, kinds)):
        if kind is inspect.Parameter.KEYWORD_ONLY and (i == 0 or kinds[i - 1] not in
                                                       (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_POSITIONAL)):
            shown.append("    *,")
        shown.append(f"    {piece},")
        if kind is inspect.Parameter.POSITIONAL_ONLY and (i + 1 == len(kinds) or kinds[i + 1] is not kind):
            shown.append("    /,")
    ret = "" if returns is inspect.Signature.empty else f" -> {returns}"
    return f"{prefix}{name}(\n" + "\n".join(shown) + f"\n){ret}"


def _field_comments(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_FIELD_COMMENT.match, source.splitlines()) if m}


def _type_name(tp: Any) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


def _members(cls: type, names: set[str]) -> list[str]:
    out: list[str] = []
    if dataclasses.is_dataclass(cls):
        comments = _field_comments(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = ""
            if f.default is not dataclasses.MISSING:
                default = f" = {f.default!r}"
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f" = {f.default_factory()!r}"  # type: ignore[misc]
            note = f": {_inline(comments[f.name], names)}" if f.name in comments else ""
            rows.append(f"- `{f.name}: {_type_name(f.type)}{default}`{note}")
        out.append("**Fields**\n\n" + "\n".join(rows))
    methods: list[str] = []
    for key, value in vars(cls).items():
        if key.startswith("_") or isinstance(value, enum.Enum):
            continue
        func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        if not callable(func) and not isinstance(value, property):
            continue
        own = getattr(func, "__doc__", None)
        overrides = any(key in vars(base) for base in cls.__mro__[1:] if base is not object)
        if overrides and not own:  # forward/extra_repr of an nn.Module: the base's docstring says nothing here
            continue
        doc = inspect.cleandoc(own) if own else ""
        summary = _inline(doc.split("\n\n")[0].replace("\n", " "), names) if doc else ""
        if isinstance(value, property):
            methods.append(f"- `{key}` (property)" + (f": {summary}" if summary else ""))
            continue
        try:
            sig = str(_unquoted(inspect.signature(func), drop_self=True))
        except (TypeError, ValueError):
            sig = "(...)"
        methods.append(f"- `{key}{sig}`" + (f": {summary}" if summary else ""))
    if methods:
        out.append("**Members**\n\n" + "\n".join(methods))
    return out


def _is_code(obj: Any) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj)


def _data_source(name: str) -> tuple[str, str, str] | None:
    """For a constant or type alias: (defining module, source of the value, its ``#:`` comment)."""
    for module_name in sorted(m for m in sys.modules if m == "fxnorm" or m.startswith("fxnorm.")):
        module = sys.modules[module_name]
        if name not in getattr(module, "__all__", ()):
            continue
        try:
            lines = inspect.getsource(module).splitlines()
        except (OSError, TypeError):
            continue
        for i, line in enumerate(lines):
            match = re.match(rf"^{re.escape(name)}\s*(?::[^=]*)?=\s*(.*)$", line)
            if not match:
                continue
            value = [match.group(1)]
            depth = value[0].count("(") + value[0].count("[") + value[0].count("{") - value[0].count(")") \
                - value[0].count("]") - value[0].count("}")
            j = i + 1
            while depth > 0 and j < len(lines):
                value.append(lines[j].strip())
                depth += lines[j].count("(") + lines[j].count("[") + lines[j].count("{") - lines[j].count(")") \
                    - lines[j].count("]") - lines[j].count("}")
                j += 1
            comment = []
            k = i - 1
            while k >= 0 and lines[k].startswith("#:"):
                comment.insert(0, lines[k][2:].strip())
                k -= 1
            return module_name, " ".join(value), " ".join(comment)
    return None


def _entry(name: str, obj: Any, names: set[str]) -> str:
    parts = [f"### `{name}`"]
    if not _is_code(obj):  # a constant or a type alias: show its definition and its module's docstring
        found = _data_source(name)
        if found is None:
            return "\n\n".join(parts + [f"Value: `{obj!r}`"])
        module_name, value, comment = found
        parts.append(f"```python\n{name} = {value}\n```")
        parts.append(f"*Defined in* `{module_name}`.")
        if comment:
            parts.append(_inline(comment, names))
        module_doc = inspect.getdoc(sys.modules[module_name])
        if module_doc:
            parts.append(f"From the docstring of `{module_name}`:\n\n" + markdown_docstring(module_doc, names))
        return "\n\n".join(parts)
    sig = _signature(name, obj)
    if sig:
        parts.append(f"```python\n{sig}\n```")
    parts.append(f"*Defined in* `{obj.__module__}`.")
    parts.append(markdown_docstring(inspect.getdoc(obj), names))
    if inspect.isclass(obj) and not issubclass(obj, BaseException):
        parts.extend(_members(obj, names))
    return "\n\n".join(parts)


def _home(name: str, obj: Any) -> str:
    """The module a public name is defined in (for constants: the module whose source assigns it)."""
    if _is_code(obj):
        return getattr(obj, "__module__", "fxnorm")
    found = _data_source(name)
    return found[0] if found else "fxnorm"


def render() -> str:
    """The whole of docs/api.md as a string.

    Example:
        >>> render().startswith("# API reference")
        True
    """
    names = list(fxnorm.__all__)
    known = set(names)
    groups: dict[str, list[str]] = {}
    for name in names:
        module = _home(name, getattr(fxnorm, name))
        title = GROUPS.get(module, module)
        groups.setdefault(title, []).append(name)
    lines = [
        "# API reference",
        "",
        "<!-- Generated by `python docs/gen_api.py` from the docstrings: edit those, not this file. -->",
        "",
        f"Every public name of `fxnorm` {fxnorm.__version__} (`fxnorm.__all__`), with its signature and "
        "docstring. The guided tour is [guide.md](guide.md); the command line is documented in "
        "[cli.md](cli.md); how the modules fit together is [design.md](design.md).",
        "",
    ]
    for title, members in groups.items():
        lines.append(f"- **{title}**: " + ", ".join(f"[`{n}`](#{anchor(n)})" for n in members))
    lines.append("")
    for title, members in groups.items():
        lines += [f"## {title}", ""]
        for name in members:
            lines += [_entry(name, getattr(fxnorm, name), known), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/api.md, or with ``--check`` report whether it is up to date (exit status 1 if not)."""
    parser = argparse.ArgumentParser(description="Generate docs/api.md from fxnorm's docstrings.")
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md is out of date")
    parser.add_argument("--output", default=API_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            with open(args.output) as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if current != text:
            print(f"{args.output} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output} ({len(fxnorm.__all__)} names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
