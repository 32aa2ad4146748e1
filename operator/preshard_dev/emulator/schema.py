"""CRD structural schemas, applied as the API server applies them on every write (the
status subresource included): pruning of unknown fields, defaulting, OpenAPI validation
(through jsonschema), ``x-kubernetes-list-type`` set/map duplicates and CEL
``x-kubernetes-validations`` (transition rules included, through cel-python), with the
field errors worded as kube-openapi and apiextensions word them.

``StructuralSchema`` is the one implementation: admission (``admission.CRDValidator``)
and the CRD's own tests (tests/unit/test_crd.py) both use it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

from preshard_dev.emulator.errors import FieldError, field_path, go_value

CelPath = tuple[str, ...]


def prune_and_default(
    value: Any,
    schema: dict[str, Any],
    path: str,
    unknown: list[str],
    *,
    prune: bool = True,
    default: bool = True,
) -> Any:
    """Structural pruning (unknown fields dropped, recorded in ``unknown``) and defaulting,
    like the API, in one walk; ``prune``/``default`` turn either off. Objects are changed in
    place; the value (a new list for lists) is returned."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        if prune and props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for k in list(value):
                if k not in props:
                    unknown.append(f"{path}.{k}")
                    del value[k]
        for k, sub in (props or {}).items():
            if default and k not in value and isinstance(sub, dict) and "default" in sub:
                value[k] = copy.deepcopy(sub["default"])
            if k in value:
                value[k] = prune_and_default(
                    value[k], sub, f"{path}.{k}", unknown, prune=prune, default=default
                )
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict) and props is None:
            for k in list(value):
                value[k] = prune_and_default(
                    value[k], addl, f"{path}.{k}", unknown, prune=prune, default=default
                )
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [
            prune_and_default(
                v, schema["items"], f"{path}[{i}]", unknown, prune=prune, default=default
            )
            for i, v in enumerate(value)
        ]
    return value


def to_jsonschema(schema: Any) -> Any:
    """Kubernetes structural schema -> JSON Schema (nullable, int-or-string)."""
    if isinstance(schema, list):
        return [to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in out:
        t = out["type"]
        out["type"] = [*t, "null"] if isinstance(t, list) else [t, "null"]
    out.pop("nullable", None)
    return out


def cel_rules(
    schema: dict[str, Any], path: tuple[str, ...] = ()
) -> Iterable[tuple[tuple[str, ...], dict[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, rule
    for k, sub in (schema.get("properties") or {}).items():
        if isinstance(sub, dict):
            yield from cel_rules(sub, (*path, k))


def _at(obj: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    cur = obj
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return False, None
        cur = cur[p]
    return True, cur


_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}


def _schema_error(e: Any) -> list[FieldError]:
    """A jsonschema error as the field errors kube-openapi's validator reports
    (apiextensions' kubeOpenAPIResultToFieldErrors)."""
    path = list(e.absolute_path)
    where = field_path(path) or "<root>"
    v = e.validator
    if v == "required":
        missing = [
            p for p in e.validator_value if p not in (e.instance or {}) and repr(p) in e.message
        ]
        return [(field_path([*path, p]), "FieldValueRequired", "Required value") for p in missing]
    if v == "enum":
        allowed = ", ".join(json.dumps(x) for x in e.validator_value)
        return [
            (
                where,
                "FieldValueNotSupported",
                f"Unsupported value: {go_value(e.instance)}: supported values: {allowed}",
            )
        ]
    if v == "type":
        types = [e.validator_value] if isinstance(e.validator_value, str) else e.validator_value
        want = ",".join(t for t in types if t != "null")  # nullable is not a type to ask for
        got = _TYPE_NAMES.get(type(e.instance), "object")
        return [
            (
                where,
                "FieldValueTypeInvalid",
                f'Invalid value: "{got}": {where} in body must be of type {want}: "{got}"',
            )
        ]
    if v == "maxLength":
        unit = "byte" if e.validator_value == 1 else "bytes"
        return [
            (
                where,
                "FieldValueTooLong",
                f"Too long: may not be more than {e.validator_value} {unit}",
            )
        ]
    if v == "maxItems":
        return [
            (
                where,
                "FieldValueTooMany",
                f"Too many: {len(e.instance)}: must have at most {e.validator_value} items",
            )
        ]
    detail = {
        "minimum": f"should be greater than or equal to {e.validator_value}",
        "maximum": f"should be less than or equal to {e.validator_value}",
        "exclusiveMinimum": f"should be greater than {e.validator_value}",
        "exclusiveMaximum": f"should be less than {e.validator_value}",
        "pattern": f"should match '{e.validator_value}'",
        "minLength": f"should be at least {e.validator_value} chars long",
        "minItems": f"should have at least {e.validator_value} items",
        "uniqueItems": "shouldn't contain duplicates",
        "multipleOf": f"should be a multiple of {e.validator_value}",
    }.get(v, e.message)
    return [
        (
            where,
            "FieldValueInvalid",
            f"Invalid value: {go_value(e.instance)}: {where} in body {detail}",
        )
    ]


def _list_type_errors(value: Any, schema: Any, path: list[Any]) -> list[FieldError]:
    """x-kubernetes-list-type set/map: no duplicate items / map keys (Duplicate value)."""
    out: list[FieldError] = []
    if not isinstance(schema, dict):
        return out
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for k, v in value.items():
            sub = props.get(k, schema.get("additionalProperties"))
            out += _list_type_errors(v, sub, [*path, k])
    elif isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen: list[Any] = []
        for i, item in enumerate(value):
            ident: Any = item
            if kind == "map" and isinstance(item, dict):
                ident = {k: item.get(k) for k in keys}
            if kind in ("set", "map"):
                if ident in seen:
                    shown = (
                        "map[string]interface {}" + json.dumps(ident, separators=(",", ":"))
                        if kind == "map"
                        else go_value(ident)
                    )
                    out.append(
                        (field_path([*path, i]), "FieldValueDuplicate", f"Duplicate value: {shown}")
                    )
                seen.append(ident)
            out += _list_type_errors(item, schema.get("items"), [*path, i])
    return out


class StructuralSchema:
    """One version's ``openAPIV3Schema``: what the API server does with an object's body."""

    def __init__(self, schema: dict[str, Any]) -> None:
        import jsonschema

        self.schema = schema
        self.validator = jsonschema.Draft7Validator(to_jsonschema(schema))
        # (path of the schema node, rule) for every x-kubernetes-validations rule
        self.rules: list[tuple[CelPath, dict[str, Any]]] = list(cel_rules(schema))
        self._programs: dict[str, Any] = {}

    # -- pruning and defaulting ------------------------------------------------------------
    def prune(self, obj: dict[str, Any]) -> list[str]:
        """Drop the fields the schema does not know (in place); return their paths."""
        unknown: list[str] = []
        prune_and_default(obj, self.schema, "", unknown, default=False)
        return unknown

    def default(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Fill in the schema's defaults (in place); return the object."""
        prune_and_default(obj, self.schema, "", [], prune=False)
        return obj

    def prune_and_default(self, obj: dict[str, Any]) -> list[str]:
        """Both, in the API server's one walk (in place); return the pruned paths."""
        unknown: list[str] = []
        prune_and_default(obj, self.schema, "", unknown)
        return unknown

    # -- validation ------------------------------------------------------------------------
    def validation_errors(self, body: dict[str, Any]) -> list[FieldError]:
        """OpenAPI validation and list-type duplicates (``body`` without metadata)."""
        errors: list[FieldError] = []
        for e in sorted(self.validator.iter_errors(body), key=lambda e: [str(p) for p in e.path]):
            errors += _schema_error(e)
        errors += _list_type_errors(body, self.schema, [])
        return errors

    # -- CEL -------------------------------------------------------------------------------
    def program(self, rule: str) -> Any:
        """The compiled CEL program of a rule (compiled once)."""
        prog = self._programs.get(rule)
        if prog is None:
            import celpy

            env = celpy.Environment()
            prog = env.program(env.compile(rule))
            self._programs[rule] = prog
        return prog

    def failed_rules(
        self, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> list[tuple[CelPath, dict[str, Any], Any, Exception | None]]:
        """(path, rule, value at the path, evaluation error or None) of every rule that
        rejects ``obj``: false, or an evaluation error (as the API counts it). A rule
        applies where its field is set; a transition rule (one naming ``oldSelf``) only on
        an update whose old object has the field."""
        if not self.rules:
            return []
        import celpy

        failed: list[tuple[CelPath, dict[str, Any], Any, Exception | None]] = []
        for path, rule in self.rules:
            found, value = _at(obj, path)
            if not found:
                continue
            uses_old = "oldSelf" in rule["rule"]
            old_found, old_value = _at(old, path) if old is not None else (False, None)
            if uses_old and not old_found:
                continue  # transition rules apply to updates only
            prog = self.program(rule["rule"])
            activation = {"self": celpy.json_to_cel(value)}
            if uses_old:
                activation["oldSelf"] = celpy.json_to_cel(old_value)
            error: Exception | None = None
            try:
                ok = bool(prog.evaluate(activation))
            except Exception as exc:  # evaluation error counts as a failed rule, like the API
                ok, error = False, exc
            if not ok:
                failed.append((path, rule, value, error))
        return failed

    def cel_errors(self, obj: dict[str, Any], old: dict[str, Any] | None) -> list[FieldError]:
        """The failed rules as field errors: ``field.Invalid(path, <schema type>, message)``."""
        errors: list[FieldError] = []
        for path, rule, value, error in self.failed_rules(obj, old):
            if error is not None:
                rule = {**rule, "message": f"{rule.get('message', rule['rule'])} ({error})"}
            where = field_path(path) or "<root>"
            got = _TYPE_NAMES.get(type(value), "object")
            msg = rule.get("message") or f"failed rule: {rule['rule']}"
            errors.append((where, "FieldValueInvalid", f'Invalid value: "{got}": {msg}'))
        return errors
