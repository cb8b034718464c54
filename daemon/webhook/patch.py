"""The difference between two JSON documents, as operations and as RFC 6902 JSONPatch.

Computed, not written per field: `mutation.mutate` says what the pod should be, and
`difference` says how to get there. Objects are compared key by key, so a patch
touches only what changed; a list that changed is replaced whole. Index-addressed
operations inside lists (add at /spec/volumes/3, remove /env/2) depend on the exact
list they were computed from and go wrong silently if anything reorders it; a whole
list is right whatever the list held. The lists a mutation changes (env, mounts,
volumes, containers) are small, so the patch stays small too.

Paths are tuples of keys; `pointer` renders one as an RFC 6901 JSON Pointer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Path = tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Operation:
    op: Literal["add", "remove", "replace"]
    path: Path
    value: Any = None

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"op": self.op, "path": pointer(self.path)}
        if self.op != "remove":
            entry["value"] = self.value
        return entry


def difference(before: Any, after: Any, path: Path = ()) -> list[Operation]:
    """Operations that turn `before` into `after`: objects key by key, anything else whole."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        operations = [Operation(op="remove", path=(*path, str(key))) for key in before if key not in after]
        for key, value in after.items():
            if key not in before:
                operations.append(Operation(op="add", path=(*path, str(key)), value=value))
            elif not same(before[key], value):
                operations.extend(difference(before[key], value, (*path, str(key))))
        return operations
    if same(before, after):
        return []
    if not path:
        raise ValueError("cannot patch a document into one of another type")
    return [Operation(op="replace", path=path, value=after)]


def same(a: Any, b: Any) -> bool:
    """Equal as JSON: Python's `==` takes True for 1 and 1 for 1.0, JSON does not."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def pointer(path: Sequence[str]) -> str:
    """RFC 6901: `~` is written `~0` and `/` is written `~1`, in that order."""
    return "".join("/" + key.replace("~", "~0").replace("/", "~1") for key in path)


def json_patch(operations: Sequence[Operation]) -> list[dict[str, Any]]:
    return [operation.as_json() for operation in operations]
