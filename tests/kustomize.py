"""A minimal kustomize: renders manifests/ for tests/test_manifests.py (and the entry-point
test), because neither kustomize nor kubectl is a Python dependency.

It supports exactly what manifests/ uses and raises on anything else: ``resources`` (files and
directories), ``labels`` (metadata labels only: no selectors, no templates), ``images``
(``containers``/``initContainers`` anywhere, as kustomize does), and ``patches`` given by
``path`` or inline ``patch`` with an optional ``target`` (group, version, kind, name as an
anchored regex, labelSelector of ``k=v`` terms): JSON6902 patches (add, remove, replace, test;
strict RFC 6902, where kustomize lets ``replace`` create a missing member) and strategic-merge
patches limited to maps and scalar lists (lists are replaced; lists of objects, which need merge
keys, are refused). Where ``kustomize`` or ``kubectl`` is on PATH,
``test_renderer_matches_kustomize`` compares the two renderings.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO

MANIFESTS = REPO / "manifests"
PROFILES = {
    "base": MANIFESTS / "base",
    "gpu": MANIFESTS / "overlays" / "gpu",
    "cpu-small": MANIFESTS / "overlays" / "cpu-small",
}
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader where PyYAML has it


class KustomizeError(Exception):
    """The kustomization uses something render() does not implement, or a patch misapplies."""


_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "labels", "images", "patches"}
_TARGET_KEYS = {"group", "version", "kind", "name", "labelSelector"}


def load_docs(text: str) -> list[Any]:
    """The non-empty documents of a YAML stream."""
    return [doc for doc in yaml.load_all(text, Loader=LOADER) if doc is not None]


def render(directory: Path) -> list[dict]:
    """Render the kustomization in ``directory`` to a list of objects."""
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.load(kfile.read_text(), Loader=LOADER) or {}
    unknown = set(spec) - _KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kfile}: kind must be Kustomization")

    objects: list[dict] = []
    for resource in spec.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            objects.extend(load_docs(path.read_text()))
        else:
            raise KustomizeError(f"{kfile}: resource {resource} not found")
    # kustomize's built-in order: patches, then labels, then images.
    for entry in spec.get("patches", []):
        _apply_patch_entry(objects, entry, directory)
    for entry in spec.get("labels", []):
        _apply_labels(objects, entry)
    for entry in spec.get("images", []):
        _apply_image(objects, entry)
    return objects


def _group_version(obj: dict) -> tuple[str, str]:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    return group, version


def _matches(obj: dict, target: dict) -> bool:
    unknown = set(target) - _TARGET_KEYS
    if unknown:
        raise KustomizeError(f"unsupported patch target fields {sorted(unknown)}")
    group, version = _group_version(obj)
    if "group" in target and target["group"] != group:
        return False
    if "version" in target and target["version"] != version:
        return False
    if "kind" in target and target["kind"] != obj.get("kind"):
        return False
    name = obj.get("metadata", {}).get("name", "")
    if "name" in target and not re.fullmatch(target["name"], name):
        return False
    if "labelSelector" in target:
        labels = obj.get("metadata", {}).get("labels") or {}
        for term in target["labelSelector"].split(","):
            key, sep, value = term.strip().partition("=")
            if not sep or any(c in key for c in "!<>() "):
                raise KustomizeError(f"unsupported labelSelector term {term!r}")
            if labels.get(key) != value.lstrip("="):
                return False
    return True


def _apply_patch_entry(objects: list[dict], entry: dict, directory: Path) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"unsupported patch fields {sorted(unknown)}")
    if "path" in entry:
        text = (directory / entry["path"]).read_text()
    elif "patch" in entry:
        text = entry["patch"]
    else:
        raise KustomizeError("a patch needs `path` or `patch`")
    docs = load_docs(text)
    target = entry.get("target")
    where = entry.get("path", "<inline patch>")

    if len(docs) == 1 and isinstance(docs[0], list):  # JSON6902
        if target is None:
            raise KustomizeError(f"{where}: a JSON6902 patch needs a target")
        hits = [obj for obj in objects if _matches(obj, target)]
        if not hits:
            raise KustomizeError(f"{where}: target {target} matches nothing")
        for obj in hits:
            try:
                apply_json6902(obj, docs[0])
            except KustomizeError as err:
                raise KustomizeError(f"{where} on {obj['metadata']['name']}: {err}") from None
        return

    for patch in docs:  # strategic merge, one object per document
        if not isinstance(patch, dict):
            raise KustomizeError(f"{where}: not a JSON6902 list nor an object")
        if target is not None:
            hits = [obj for obj in objects if _matches(obj, target)]
        else:
            own = {
                "kind": patch.get("kind"),
                "name": re.escape(patch.get("metadata", {}).get("name", "")),
            }
            group, version = _group_version(patch)
            own.update(group=group, version=version)
            hits = [obj for obj in objects if _matches(obj, own)]
        if not hits:
            raise KustomizeError(f"{where}: strategic-merge patch matches nothing")
        for obj in hits:
            merge_patch(obj, patch)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [tok.replace("~1", "/").replace("~0", "~") for tok in path[1:].split("/")]


def _index(container: list, token: str, *, allow_end: bool = False) -> int:
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise KustomizeError(f"bad list index {token!r}")
    idx = int(token)
    if idx > len(container) or (idx == len(container) and not allow_end):
        raise KustomizeError(f"list index {idx} out of range ({len(container)} items)")
    return idx


def _resolve(doc: Any, tokens: list[str]) -> Any:
    for tok in tokens:
        if isinstance(doc, dict):
            if tok not in doc:
                raise KustomizeError(f"no member {tok!r}")
            doc = doc[tok]
        elif isinstance(doc, list):
            doc = doc[_index(doc, tok)]
        else:
            raise KustomizeError(f"cannot descend into a scalar at {tok!r}")
    return doc


def apply_json6902(doc: dict, operations: list[dict]) -> None:
    """RFC 6902 add / remove / replace / test, in place."""
    for op in operations:
        kind, path = op.get("op"), op.get("path")
        if kind not in {"add", "remove", "replace", "test"} or path is None:
            raise KustomizeError(f"unsupported operation {op}")
        tokens = _pointer(path)
        if not tokens:
            raise KustomizeError("operations on the whole document are not supported")
        parent, last = _resolve(doc, tokens[:-1]), tokens[-1]
        if kind == "test":
            if _resolve(doc, tokens) != op.get("value"):
                raise KustomizeError(f"test failed at {path}")
            continue
        value = copy.deepcopy(op.get("value"))
        if isinstance(parent, dict):
            if kind != "add" and last not in parent:
                raise KustomizeError(f"{kind}: {path} does not exist")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = value
        elif isinstance(parent, list):
            if kind == "add":
                if last == "-":
                    parent.append(value)
                else:
                    parent.insert(_index(parent, last, allow_end=True), value)
            elif kind == "remove":
                del parent[_index(parent, last)]
            else:
                parent[_index(parent, last)] = value
        else:
            raise KustomizeError(f"{path}: parent is a scalar")


def merge_patch(target: dict, patch: dict) -> None:
    """Strategic merge restricted to maps and scalar lists (which it replaces), in place."""
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"strategic-merge directive {key} is not supported")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
            raise KustomizeError(
                f"strategic-merge patch of the list {key!r} of objects: use a JSON6902 patch"
            )
        else:
            target[key] = copy.deepcopy(value)


def _apply_labels(objects: list[dict], entry: dict) -> None:
    unknown = set(entry) - {"pairs", "includeSelectors", "includeTemplates"}
    if unknown or entry.get("includeSelectors") or entry.get("includeTemplates"):
        raise KustomizeError(f"only metadata labels are supported, got {entry}")
    for obj in objects:
        labels = obj.setdefault("metadata", {}).setdefault("labels", {})
        labels.update({k: str(v) for k, v in entry.get("pairs", {}).items()})


def _split_image(image: str) -> tuple[str, str]:
    """'reg:5000/x:tag' -> ('reg:5000/x', ':tag'); digests likewise."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _apply_image(objects: list[dict], entry: dict) -> None:
    unknown = set(entry) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"unsupported image fields {sorted(unknown)}")

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and "image" in container:
                            name, suffix = _split_image(container["image"])
                            if name != entry["name"]:
                                continue
                            if "digest" in entry:
                                suffix = "@" + entry["digest"]
                            elif "newTag" in entry:
                                suffix = ":" + str(entry["newTag"])
                            container["image"] = entry.get("newName", name) + suffix
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    for obj in objects:
        visit(obj)


@cache
def _rendered(profile: str) -> str:
    return json.dumps(render(PROFILES[profile]))


def rendered(profile: str) -> list[dict]:
    """A fresh copy of the rendered objects (tests may mutate it)."""
    return json.loads(_rendered(profile))
