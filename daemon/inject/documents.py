"""A YAML stream edited in place: comments, key order, quoting and unknown fields kept.

The stream is cut into its documents by their markers (a line starting `---`, the
line after `...`): in YAML such a line is always a document boundary, so the cut is
exact. Each document is parsed on its own with ruamel.yaml's round-trip loader. A
document nothing changed is written back as the very text it was; a changed one is
dumped by ruamel.yaml with the indentation guessed from its own text, its comments
where they were.

Changes arrive as `patch.Operation`s relative to a node. Objects change key by key;
a replaced list is updated item by item (an item with the same `name`, or equal, is
kept with its comments, and edited where it differs), never rebuilt. Where an item
or key is added after the last one, full-line comments that followed the old last
one (ruamel keeps them on it) move below the new one, so that a comment about the
next key stays above that key.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.tokens import CommentToken

from daemon.webhook.patch import Operation, difference

_DOCUMENT_START = re.compile(r"---(\s|$)")
_DOCUMENT_END = re.compile(r"\.\.\.(\s|$)")
Node = Any  # CommentedMap, CommentedSeq or a scalar
Key = str | int


class YamlInputError(ValueError):
    """The input is not YAML; the message names the document, line and column."""


@dataclass
class Document:
    """One document of the stream: its text as read, and (once parsed) its content."""

    text: str
    first_line: int  # 1-based line of `text` in the stream
    number: int  # 1-based, counting only documents with content
    content: Node = None
    changed: bool = False

    def render(self) -> str:
        if not self.changed:
            return self.text
        return _dump(self.content, self.text)


@dataclass
class Stream:
    documents: list[Document] = field(default_factory=list)

    def render(self) -> str:
        return "".join(document.render() for document in self.documents)


def parse(text: str, *, source: str) -> Stream:
    """Every document of `text`, parsed. Raises YamlInputError naming the first bad spot."""
    stream = Stream()
    number = 0
    for first_line, chunk in _chunks(text):
        document = Document(text=chunk, first_line=first_line, number=0)
        try:
            document.content = _yaml().load(chunk)
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"line {first_line + mark.line}, column {mark.column + 1}: " if mark is not None else ""
            problem = exc.problem or exc.context or "not YAML"
            raise YamlInputError(f"{source}: {where}{problem}") from exc
        except YAMLError as exc:
            raise YamlInputError(f"{source}: from line {first_line}: {str(exc).splitlines()[0]}") from exc
        if document.content is not None:
            number += 1
            document.number = number
        stream.documents.append(document)
    return stream


def _chunks(text: str) -> Iterator[tuple[int, str]]:
    """(first line, text) of each document; comments before a `---` form a chunk of
    their own, directives (`%YAML`) go with the `---` they precede."""
    lines = text.splitlines(keepends=True)
    start = 0
    content = False  # the current chunk has a line that is not a comment or blank
    directives = False  # the current chunk opened with directives, waiting for their `---`
    for index, line in enumerate(lines):
        if line.startswith("%"):
            if not directives and (content or index > start):
                yield start + 1, "".join(lines[start:index])
                start, content = index, False
            directives = True
            continue
        if _DOCUMENT_START.match(line):
            if not directives and index > start:
                yield start + 1, "".join(lines[start:index])
                start = index
            directives, content = False, bool(line[3:].strip()) and not line[3:].strip().startswith("#")
            continue
        if _DOCUMENT_END.match(line):
            yield start + 1, "".join(lines[start:index + 1])
            start, content, directives = index + 1, False, False
            continue
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            content = True
    if start < len(lines):
        yield start + 1, "".join(lines[start:])


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 1_000_000  # never fold a long line that was not folded
    return yaml


def _dump(content: Node, original: str) -> str:
    yaml = _yaml()
    mapping, sequence, offset = _guess_indentation(original)
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    # A chunk holds at most its own start marker, and at most its own end marker.
    yaml.explicit_start = any(_DOCUMENT_START.match(line) for line in original.splitlines())
    yaml.explicit_end = any(_DOCUMENT_END.match(line) for line in original.splitlines())
    out = io.StringIO()
    # Directives (%YAML, %TAG) lead their chunk; written back as they were.
    for line in original.splitlines(keepends=True):
        if not line.startswith("%"):
            break
        out.write(line)
    yaml.dump(content, out)
    return out.getvalue()


def _guess_indentation(text: str) -> tuple[int, int, int]:
    """(mapping indent, sequence indent, dash offset) as ruamel.yaml's `indent()` takes them,
    from the first nested mapping and the first block sequence under a key in the text."""
    mapping: int | None = None
    sequence: tuple[int, int] | None = None
    key_column: int | None = None  # column of the key on the previous line, if it opened a block
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        column = len(line) - len(line.lstrip(" "))
        is_item = stripped.startswith("- ")
        if key_column is not None:
            if is_item and sequence is None and column >= key_column:
                offset = column - key_column
                sequence = (offset + len(stripped) - len(stripped[1:].lstrip(" ")), offset)
            elif not is_item and mapping is None and column > key_column:
                mapping = column - key_column
        if mapping is not None and sequence is not None:
            break
        body = stripped[2:].lstrip(" ") if is_item else stripped
        opens_block = body.endswith(":") and not body.startswith(("{", "[", "'", '"'))
        key_column = (column + len(stripped) - len(body)) if opens_block else None
    mapping = mapping or 2
    sequence_indent, offset = sequence or (mapping + 2, mapping)
    return mapping, max(sequence_indent, offset + 2), offset


# --- plain data and nodes ------------------------------------------------------------


def plain(node: Node) -> Any:
    """The node as JSON-like data: dict, list, str, int, float, bool, None."""
    if isinstance(node, Mapping):
        return {str(key): plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [plain(item) for item in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return bool(node) if type(node).__name__ == "ScalarBoolean" else int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node  # a timestamp: left as ruamel read it


def to_node(value: Any) -> Node:
    if isinstance(value, Mapping):
        mapping = CommentedMap()
        for key, item in value.items():
            mapping[key] = to_node(item)
        return mapping
    if isinstance(value, list):
        return CommentedSeq(to_node(item) for item in value)
    return value


def walk(node: Node, path: Sequence[Key]) -> Node:
    for key in path:
        node = node[key]
    return node


def apply(node: Node, operations: Sequence[Operation]) -> None:
    """Carry out `operations` (paths relative to `node`) on the round-trip tree."""
    for operation in operations:
        parent = walk(node, operation.path[:-1])
        key = operation.path[-1]
        if operation.op == "remove":
            del parent[key]
        elif operation.op == "add" or key not in parent:
            _add_key(parent, key, to_node(operation.value))
        else:
            current = parent[key]
            if isinstance(current, CommentedSeq) and isinstance(operation.value, list):
                update_list(current, operation.value)
            elif isinstance(current, CommentedMap) and isinstance(operation.value, Mapping):
                apply(current, difference(plain(current), operation.value))
            else:
                parent[key] = to_node(operation.value)


def update_list(items: CommentedSeq, wanted: list[Any]) -> None:
    """Make `items` equal `wanted`, keeping the nodes (and comments) of items that stay."""
    current = [plain(item) for item in items]
    matches: list[int | None] = []  # for each wanted item, the index of the old item it continues
    search_from = 0
    for item in wanted:
        found = next((index for index in range(search_from, len(current))
                      if _identity(current[index]) == _identity(item)), None)
        matches.append(found)
        if found is not None:
            search_from = found + 1
    kept = {index for index in matches if index is not None}
    for index in reversed(range(len(items))):
        if index not in kept:
            del items[index]
    for position, (item, old) in enumerate(zip(wanted, matches, strict=True)):
        if old is None:
            if position == len(items):
                _append(items, to_node(item))
            else:
                items.insert(position, to_node(item))
        elif current[old] != item:
            if isinstance(items[position], CommentedMap) and isinstance(item, Mapping):
                apply(items[position], difference(current[old], item))
            else:
                items[position] = to_node(item)


def _identity(item: Any) -> Any:
    if isinstance(item, Mapping) and isinstance(item.get("name"), str):
        return ("name", item["name"])
    return ("value", json.dumps(item, sort_keys=True, default=str))


# --- comments that follow the last item ------------------------------------------------


def _append(items: CommentedSeq, node: Node) -> None:
    moved = _take_trailing_lines(items)
    items.append(node)
    _give_trailing_lines(items, moved)


def _add_key(mapping: CommentedMap, key: Key, node: Node) -> None:
    moved = _take_trailing_lines(mapping)
    mapping[key] = node
    _give_trailing_lines(mapping, moved)


def _last_slot(node: Node) -> tuple[Any, Key, int] | None:
    """Where ruamel keeps the comment that follows `node`'s last scalar: (holder, key, index)."""
    if isinstance(node, CommentedMap) and len(node):
        key: Key = list(node)[-1]
        slot = 2
    elif isinstance(node, CommentedSeq) and len(node):
        key, slot = len(node) - 1, 0
    else:
        return None
    return _last_slot(node[key]) or (node, key, slot)


def _take_trailing_lines(node: Node) -> CommentToken | None:
    """Detach the full-line comments after `node`'s last scalar (its end-of-line comment stays)."""
    found = _last_slot(node)
    if found is None:
        return None
    holder, key, slot = found
    entry = holder.ca.items.get(key)
    token = entry[slot] if entry and len(entry) > slot else None
    if not isinstance(token, CommentToken) or "\n" not in token.value:
        return None
    first, _, rest = token.value.partition("\n")
    if not rest.strip():
        return None
    token.value = first + "\n"
    return CommentToken("\n" + rest, token.start_mark, None)


def _give_trailing_lines(node: Node, moved: CommentToken | None) -> None:
    if moved is None:
        return
    found = _last_slot(node)
    if found is None:
        return
    holder, key, slot = found
    entry = holder.ca.items.setdefault(key, [None] * (4 if isinstance(holder, CommentedMap) else 2))
    while len(entry) <= slot:
        entry.append(None)
    existing = entry[slot]
    if isinstance(existing, CommentToken):
        existing.value = existing.value.rstrip("\n") + moved.value
    else:
        entry[slot] = moved
