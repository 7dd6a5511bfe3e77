"""The spec reference page, generated at build time from every kind's JSON Schema: it cannot drift.

    mkdocs build --strict -d /tmp/site       # the gen-files plugin runs this: reference/specs.md
    python docs/gen_spec_reference.py        # print the page instead

One section per kind (`raylm.kinds.KINDS`), each a table of every field by dotted path with its type,
default and description (pydantic's field descriptions, the same text as `raylm schema KIND`);
`$ref`s are followed, and each member of a discriminated union (`strategy`, `method`) gets its own
table under a sub-heading. Imports only raylm.kinds, which imports only the pydantic spec models.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel  # noqa: E402

from raylm.kinds import KINDS, json_schema  # noqa: E402

PAGE = "reference/specs.md"

INTRO = """\
# Spec fields

Every field of every kind's spec, generated from the JSON Schema that `raylm schema KIND` prints (the
descriptions are the spec models' own). A dotted path is what `--set` takes: `--set train.lr=1e-3`.
A section without a default is built from its fields' defaults; `required` fields have none. Unions
(`strategy`, `method`) are chosen by `name`, and the name alone is short for the block with its defaults
(`strategy: fsdp`, `method: lora`); each choice's fields are listed under its own heading.
What the fields do together is on each kind's page and in [Job specs](../specs.md).

"""

GUIDES = {kind: f"../kinds/{kind}.md" for kind in KINDS}


def text(value: str) -> str:
    """Markdown for a table cell: one line; outside code spans pipes, `<` and `>` escaped (a pipe inside
    a code span does not end a cell)."""
    parts = value.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def code(value) -> str:
    shown = value if isinstance(value, str) else json.dumps(value)
    shown = json.dumps(value) if isinstance(value, str) and value in ("", " ") else shown
    return f"`{shown}`"


def bounds(node: dict) -> str:
    marks = [
        (">=", node.get("minimum")),
        (">", node.get("exclusiveMinimum")),
        ("<=", node.get("maximum")),
        ("<", node.get("exclusiveMaximum")),
    ]
    shown = [f"{op} {value}" for op, value in marks if value is not None]
    if "minLength" in node:
        shown.append(f"at least {node['minLength']} character(s)")
    if "pattern" in node:
        shown.append(f"matching {code(node['pattern'])}")
    if "maxItems" in node and "prefixItems" not in node:
        shown.append(f"at most {node['maxItems']}")
    return f" ({', '.join(shown)})" if shown else ""


def spec_models() -> dict[str, type[BaseModel]]:
    """raylm's pydantic models by schema title: defaults made by a factory are not in the schema."""
    found, todo = {}, list(BaseModel.__subclasses__())
    while todo:
        model = todo.pop()
        todo.extend(model.__subclasses__())
        if model.__module__.startswith("raylm."):
            found[model.model_config.get("title") or model.__name__] = model
    return found


MODELS = spec_models()


def factory_default(parent: dict, name: str, union: bool) -> str:
    """The default a field's factory makes: a union's choice by name, a list or mapping as JSON; "" for a
    section (its fields' defaults are in their own rows)."""
    model = MODELS.get(parent.get("title", ""))
    field = model.model_fields.get(name) if model else None
    if field is None or field.default_factory is None:
        return ""
    try:
        value = field.get_default(call_default_factory=True)
    except TypeError:  # a factory that needs the other fields' values
        return ""
    if isinstance(value, BaseModel):
        return code(value.name) if union and hasattr(value, "name") else ""
    return code(value)


def slug(*parts: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


class Kind:
    """The rows and union sections of one kind's schema."""

    def __init__(self, kind: str):
        self.kind = kind
        self.schema = json_schema(kind)
        self.defs = self.schema.get("$defs", {})

    def target(self, node: dict) -> dict:
        while "$ref" in node:
            node = self.defs[node["$ref"].rsplit("/", 1)[1]]
        return node

    def job_kind(self, node: dict) -> str | None:
        """The kind of a whole job spec embedded in this one (tune's `base`), linked instead of expanded."""
        kind = node.get("properties", {}).get("kind", {})
        return kind.get("const") if node is not self.schema else None

    def describe(self, node: dict, path: str):
        """(type text, object whose fields go below this row or None, union members or None)."""
        node_target = self.target(node)
        if "oneOf" in node_target:
            members = [self.target(m) for m in node_target["oneOf"]]
            names = ", ".join(code(n) for m in members for n in member_names(m))
            return f"one of {names} ([below](#{slug(self.kind, path)}))", None, members
        if "anyOf" in node_target:
            alternatives = node_target["anyOf"]
            shown, expand = [], None
            for alternative in alternatives:
                if alternative.get("type") == "null":
                    continue
                kind_text, obj, _ = self.describe(alternative, path)
                shown.append(kind_text)
                expand = expand or obj
            nullable = any(a.get("type") == "null" for a in alternatives)
            return " or ".join(shown) + (" or `null`" if nullable else ""), expand, None
        if "properties" in node_target:
            kind = self.job_kind(node_target)
            if kind:
                return f"a `{kind}` spec (its fields: [{kind}](#{kind}))", None, None
            return "section", node_target, None
        if "const" in node_target:
            return code(node_target["const"]), None, None
        if "enum" in node_target:
            return " \\| ".join(code(v) for v in node_target["enum"]), None, None
        kind = node_target.get("type")
        if kind == "array":
            if "prefixItems" in node_target:
                items = ", ".join(self.describe(i, path)[0] for i in node_target["prefixItems"])
                return f"[{items}]", None, None
            item_text, obj, _ = self.describe(node_target.get("items", {}), path + "[]")
            if obj is not None:
                return f"list of sections{bounds(node_target)}", obj, None
            return f"list of {item_text}{bounds(node_target)}", None, None
        if kind == "object":
            values = node_target.get("additionalProperties")
            if isinstance(values, dict) and values:
                return f"mapping of {self.describe(values, path)[0]}", None, None
            return "mapping", None, None
        if kind is None:
            return "any", None, None
        return f"{kind}{bounds(node_target)}", None, None

    def rows(self, node: dict, prefix: str, unions: list) -> list[tuple[str, str, str, str]]:
        found = []
        required = set(node.get("required", []))
        for name, prop in node.get("properties", {}).items():
            path = f"{prefix}.{name}" if prefix else name
            kind_text, obj, members = self.describe(prop, path)
            if name in required:
                default = "required"
            elif "default" in prop:
                default = code(prop["default"])
            else:
                default = factory_default(node, name, bool(members))
            description = prop.get("description") or self.target(prop).get("description", "")
            if name == "kind" and "const" in prop:
                description = description or "The job kind."
            found.append((f"`{path}`", kind_text, default, text(description)))
            if members:
                unions.append((path, prop, members))
            elif obj is not None:
                child = path + "[]" if "list of sections" in kind_text else path
                found.extend(self.rows(obj, child, unions))
        return found

    def section(self) -> list[str]:
        lines = [f"## {self.kind} {{ #{self.kind} }}", ""]
        if self.schema.get("description"):
            lines += [self.schema["description"], ""]
        lines += [
            f"Guide: [{self.kind}]({GUIDES[self.kind]}). Schema: `raylm schema {self.kind}`.",
            "",
        ]
        unions: list = []
        lines += table(self.rows(self.schema, "", unions))
        while unions:
            path, prop, members = unions.pop(0)
            lines += [f"### `{path}` {{ #{slug(self.kind, path)} }}", ""]
            if prop.get("description"):
                lines += [text(prop["description"]), ""]
            for member in members:
                names = " \\| ".join(member_names(member))
                anchor = slug(self.kind, path, *member_names(member))
                lines += [f"#### `{path}` (name: {names}) {{ #{anchor} }}", ""]
                if member.get("description"):
                    lines += [text(member["description"]), ""]
                nested: list = []
                lines += table(self.rows(member, path, nested))
                unions.extend(nested)
        return lines


def member_names(member: dict) -> list[str]:
    name = member.get("properties", {}).get("name", {})
    if "const" in name:
        return [name["const"]]
    return list(name.get("enum", [member.get("title", "?")]))


def table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    lines += [f"| {path} | {kind} | {default} | {description} |" for path, kind, default, description in rows]
    return [*lines, ""]


def page() -> str:
    lines = [INTRO]
    lines += [f"- [{kind}](#{kind}): {text(json_schema(kind).get('description', ''))}" for kind in KINDS]
    lines.append("")
    for kind in KINDS:
        lines += Kind(kind).section()
    return "\n".join(lines)


if __name__ == "__main__":
    print(page())
else:  # run by the gen-files plugin
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as out:
        out.write(page())
    mkdocs_gen_files.set_edit_path(PAGE, "gen_spec_reference.py")
