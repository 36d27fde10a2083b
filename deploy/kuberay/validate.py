"""Validate KubeRay manifests against the CRD schemas the way `kubectl apply --validate=strict`
has the API server do it, without a cluster.

    python deploy/kuberay/validate.py deploy/kuberay/*.yaml          # exit 1 on any error
    python deploy/kuberay/validate.py --crds DIR manifest.yaml

What is checked, for every document (`---`) of every file:
- `apiVersion` is a served version of a CRD in `--crds` (default: tests/data/kuberay, the
  KubeRay v1.7.0 CRDs) and `kind` is its kind;
- `metadata` as ObjectMeta (name or generateName, namespace, labels, annotations, ...);
- the resource against the version's `openAPIV3Schema`: types, formats (int32, int64 ranges),
  enums, patterns, minimum/maximum, required fields; a field the schema does not declare is an
  error unless that object has `x-kubernetes-preserve-unknown-fields: true` (what strict field
  validation does instead of pruning it silently); int-or-string fields take either;
- `x-kubernetes-validations` (CEL) rules, except transition rules (those reading `oldSelf`
  only apply to updates);
- a key given twice in one mapping (strict decoding refuses duplicates).
Errors name the path, e.g. `spec.rayClusterConfig.headGroupSpec.template.spec.containers[0]:
unknown field "imagePullPolicyy"`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CRDS = REPO / "tests" / "data" / "kuberay"
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}

# The ObjectMeta fields a manifest may set (the API server fills in the rest); strict
# validation refuses any other key under `metadata`.
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63,
                      "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


class ManifestError(ValueError):
    """A manifest does not validate; the message lists every error with its path."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (strict decoding does)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ManifestError(
                f"line {key_node.start_mark.line + 1}: duplicate field {key!r}"
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_mapping)


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """The YAML documents of a manifest file (empty ones skipped); duplicate keys refused."""
    text = Path(path).read_text()
    try:
        docs = [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]
    except ManifestError as err:
        raise ManifestError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None
    return docs


@lru_cache(maxsize=8)
def load_crds(crd_dir: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every served version of the CRDs in a folder."""
    schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schemas[(f"{group}/{version['name']}", kind)] = (
                        version["schema"]["openAPIV3Schema"]
                    )
    if not schemas:
        raise ManifestError(f"no CustomResourceDefinition in {crd_dir}")
    return schemas


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a structural schema where undeclared fields are errors (`additionalProperties:
    false` on every object that neither declares a map of values nor preserves unknown
    fields), and `nullable` allows null; the root `metadata` becomes ObjectMeta."""
    schema = copy.deepcopy(schema)
    schema.setdefault("properties", {})["metadata"] = copy.deepcopy(OBJECT_META)
    schema["properties"]["apiVersion"] = {"type": "string"}
    schema["properties"]["kind"] = {"type": "string"}

    def walk(node: dict[str, Any]) -> None:
        if not isinstance(node, dict):
            return
        for key in ("properties", "patternProperties"):
            for child in (node.get(key) or {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("anyOf", "allOf", "oneOf"):
            for child in node.get(key) or []:
                walk(child)
        is_object = node.get("type") == "object" or "properties" in node
        if (is_object and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable") and "type" in node:
            node["type"] = [node["type"], "null"]

    walk(schema)
    return schema


def _path(parts: Iterator[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _schema_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    import jsonschema

    checker = jsonschema.FormatChecker()
    for name, (low, high) in INT_RANGES.items():
        checker.checks(name)(lambda v, lo=low, hi=high: not isinstance(v, int) or lo <= v <= hi)
    validator = jsonschema.Draft7Validator(strict_schema(schema), format_checker=checker)
    errors = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = _path(error.absolute_path)
        if error.validator == "additionalProperties" and error.validator_value is False:
            declared = set(error.schema.get("properties") or {})
            for field in sorted(set(error.instance) - declared):
                errors.append(f"{where}: unknown field {field!r}")
        elif error.validator == "required":
            errors.append(f"{where}: {error.message}")
        else:
            errors.append(f"{where}: {error.message}")
    return errors


def _cel_errors(doc: Any, schema: dict[str, Any], path: list[Any]) -> list[str]:
    """Evaluate the `x-kubernetes-validations` rules on the values present (create semantics:
    rules that compare with `oldSelf` are transition rules and are skipped)."""
    errors: list[str] = []
    if not isinstance(schema, dict):
        return errors
    rules = [r for r in schema.get("x-kubernetes-validations") or []
             if "oldSelf" not in r.get("rule", "")]
    if rules:
        import celpy

        env = celpy.Environment()
        for rule in rules:
            try:
                result = env.program(env.compile(rule["rule"])).evaluate(
                    {"self": celpy.json_to_cel(doc)}
                )
            except Exception as err:  # noqa: BLE001 - a rule that cannot evaluate is an error
                errors.append(f"{_path(path)}: rule {rule['rule']!r} failed to evaluate: {err}")
                continue
            if not bool(result):
                errors.append(f"{_path(path)}: Invalid value: {rule.get('message', rule['rule'])}")
    if isinstance(doc, dict):
        for key, value in doc.items():
            child = (schema.get("properties") or {}).get(key)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is not None:
                errors += _cel_errors(value, child, [*path, key])
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(doc):
            errors += _cel_errors(value, schema["items"], [*path, i])
    return errors


def validate_document(doc: Any, crd_dir: str | Path = DEFAULT_CRDS) -> list[str]:
    """Every error of one manifest document ([] when it would be accepted)."""
    if not isinstance(doc, dict):
        return [f"<root>: expected a mapping, got {type(doc).__name__}"]
    schemas = load_crds(str(crd_dir))
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        known = ", ".join(f"{v} {k}" for v, k in sorted(schemas))
        return [f"<root>: no served CRD for apiVersion {key[0]!r} kind {key[1]!r} (known: "
                f"{known})"]
    errors = []
    metadata = doc.get("metadata") or {}
    if not (isinstance(metadata, dict) and (metadata.get("name") or metadata.get("generateName"))):
        errors.append("metadata.name: Required value: name or generateName is required")
    errors += _schema_errors(doc, schemas[key])
    errors += _cel_errors(doc, schemas[key], [])
    return errors


def validate_file(path: str | Path, crd_dir: str | Path = DEFAULT_CRDS) -> list[str]:
    """Every error of every document of a file, each prefixed with the file and resource."""
    errors = []
    for doc in load_documents(path):
        name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc, dict) else "?"
        kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
        errors += [f"{path}: {kind}/{name}: {e}" for e in validate_document(doc, crd_dir)]
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="+", help="manifest files")
    parser.add_argument("--crds", default=str(DEFAULT_CRDS), help="folder of CRD YAML files")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.manifests:
        try:
            errors = validate_file(path, args.crds)
        except ManifestError as err:
            errors = [str(err)]
        for error in errors:
            print(error, file=sys.stderr)
        failed += bool(errors)
        if not errors:
            print(f"{path}: valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
