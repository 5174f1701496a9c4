"""`kustomize build` for the few features deploy/k8s uses, for machines with neither kustomize nor kubectl.

Supported: `resources` (files and kustomization folders), `patches` given by `path` (strategic merge, the
target named by the patch's kind and name) and `images`. Anything else in a kustomization raises ValueError,
so a kustomization that grows a feature fails here instead of rendering differently. Where kubectl is
installed, tests/test_deploy.py checks that this renders exactly what `kubectl kustomize` does.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

_SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
# Strategic-merge keys of the lists our patches touch (from the Kubernetes API's patchMergeKey);
# any other list is replaced whole.
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
               "volumeMounts": "mountPath", "imagePullSecrets": "name"}
_PORT_MERGE_KEYS = ("containerPort", "port")        # a container's ports, a Service's


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` prints (in no particular order)."""
    kustomization = _load_kustomization(folder)
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        objects.extend(render(path) if path.is_dir() else _load_documents(path))
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise ValueError(f"{folder}: only patches given by path are supported, got {entry}")
        for patch in _load_documents(folder / entry["path"]):
            _apply_patch(objects, patch, folder)
    for image in kustomization.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects


def _load_kustomization(folder: Path) -> dict[str, Any]:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (folder / name).is_file():
            kustomization = yaml.safe_load((folder / name).read_text()) or {}
            unsupported = set(kustomization) - _SUPPORTED_KEYS
            if unsupported:
                raise ValueError(f"{folder / name}: {sorted(unsupported)} not supported by this renderer")
            return kustomization
    raise ValueError(f"{folder}: no kustomization file")


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any], folder: Path) -> None:
    key = (patch["kind"], patch["metadata"]["name"])
    targets = [obj for obj in objects if (obj["kind"], obj["metadata"]["name"]) == key]
    if len(targets) != 1:
        raise ValueError(f"{folder}: the patch for {key} matches {len(targets)} objects")
    merged = _merge(targets[0], patch)
    targets[0].clear()
    targets[0].update(merged)


def _merge(original: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(original, dict) and isinstance(patch, dict):
        if any(key.startswith("$") for key in patch):
            raise ValueError(f"patch directives are not supported: {sorted(patch)}")
        merged = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = _merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(original, list) and isinstance(patch, list):
        merge_key = _merge_key(field, original + patch)
        if merge_key is not None:
            return _merge_lists(original, patch, merge_key)
    return copy.deepcopy(patch)


def _merge_key(field: str | None, items: list[Any]) -> str | None:
    if not all(isinstance(item, dict) for item in items):
        return None
    if field == "ports":
        return next((key for key in _PORT_MERGE_KEYS if all(key in item for item in items)), None)
    return _MERGE_KEYS.get(field or "")


def _merge_lists(original: list[dict[str, Any]], patch: list[dict[str, Any]], merge_key: str) -> list[Any]:
    # As kustomize does: the patch's items in its order (merged into the original's of the same key), then
    # the original's items that the patch does not name.
    by_key = {item[merge_key]: item for item in original}
    patched = [_merge(by_key[item[merge_key]], item) if item[merge_key] in by_key else copy.deepcopy(item)
               for item in patch]
    named = {item[merge_key] for item in patch}
    return patched + [copy.deepcopy(item) for item in original if item[merge_key] not in named]


def _set_image(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
    elif isinstance(node, dict):
        for field in ("containers", "initContainers"):
            for container in node.get(field, []) if isinstance(node.get(field), list) else []:
                if isinstance(container.get("image"), str):
                    container["image"] = _new_image(container["image"], image)
        for key, value in node.items():
            if key not in ("containers", "initContainers"):
                _set_image(value, image)


def _new_image(reference: str, image: dict[str, str]) -> str:
    name, digest = reference.split("@", 1) if "@" in reference else (reference, None)
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    if name != image["name"]:
        return reference
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
