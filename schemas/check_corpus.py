#!/usr/bin/env python3
"""Check schemas/openapi.json against the request corpus in tests/corpus/.

    python3 schemas/check_corpus.py [-v]

What it checks:

1. The document itself: a valid OpenAPI 3.1 document (if openapi-spec-validator is
   installed); every "$ref" is a local "#/components/schemas/NAME" pointer that
   resolves; no OpenAPI-3.0-only "nullable"; every component is a valid Draft 2020-12
   schema (metaschema check).
2. If the seed documents are present (SEEDS_DIR, default ../shared/seeds beside the repo,
   or /work/shared/seeds) and PyYAML is installed: the seeds' response and error components
   are present unchanged.
3. tests/corpus/valid/{chat,completions}-*.json must validate against
   CreateChatCompletionBody / CreateCompletionBody.
4. tests/corpus/invalid/*.json ({"endpoint", "body", "location"}) must fail, and the
   expected location must be among the reported error locations (printed for each case).
   Locations are written as the gateway reports them: "body" + ".name" per property +
   "[i]" per array index; for a missing required property, the object that lacks it
   plus ".name" (e.g. "body.messages[0].content").

The validator is the one the gateway uses in spirit: the whole document is registered as
one resource and {"$ref": "<doc>#/components/schemas/NAME"} is compiled against it
(python-jsonschema Draft202012Validator + referencing.Registry). If the Python binding
of the Rust crate (`pip install jsonschema-rs`) is importable, the same corpus is also
run through it, which is closer to what the Rust gateway sees.

Exit status 0 when everything passes, 1 otherwise.
"""
import json
import os
import re
import sys
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOC_PATH = HERE / "openapi.json"
CORPUS = REPO / "tests" / "corpus"
DOC_URI = "urn:tollgate:openapi"
BODY = {
    "chat": "CreateChatCompletionBody",
    "completions": "CreateCompletionBody",
}
SEED_UNCHANGED = [
    "ChatCompletion", "ChatCompletionChoice", "ChatCompletionMessage", "ToolCall",
    "FunctionCall", "Completion", "CompletionChoice", "CompletionUsage",
    "V1PromptModelError", "ErrorDetail",
]

VERBOSE = "-v" in sys.argv
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL " + msg)


def location(instance, path, missing=None):
    # Walk the instance so that a property named like a number ("50256" in logit_bias)
    # is written as ".50256", not "[50256]", whatever type the engine reports it as.
    out, node = "body", instance
    for p in path:
        if isinstance(node, list):
            out += f"[{int(p)}]"
            node = node[int(p)]
        else:
            out += f".{p}"
            node = node.get(str(p)) if isinstance(node, dict) else None
    if missing is not None:
        out += f".{missing}"
    return out


# --------------------------------------------------------------------------- document
doc = json.loads(DOC_PATH.read_text())
schemas = doc["components"]["schemas"]


def walk(node, ptr="#"):
    if isinstance(node, dict):
        for k, v in node.items():
            yield ptr, k, v
            yield from walk(v, f"{ptr}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{ptr}/{i}")


for ptr, key, value in walk(doc):
    # Keys inside a "properties" map are property names, not keywords.
    in_properties_map = ptr.endswith("/properties")
    if key == "$ref" and not in_properties_map:
        m = re.fullmatch(r"#/components/schemas/([A-Za-z0-9_.-]+)", value if isinstance(value, str) else "")
        if not m:
            fail(f"non-local $ref {value!r} at {ptr}")
        elif m.group(1) not in schemas:
            fail(f"dangling $ref {value!r} at {ptr}")
    if key in ("nullable", "discriminator", "$id", "$anchor", "$dynamicRef") and not in_properties_map:
        fail(f"keyword {key!r} at {ptr} (not plain JSON Schema 2020-12 / breaks single-resource compile)")

try:
    from openapi_spec_validator import validate as validate_openapi  # type: ignore

    try:
        validate_openapi(doc)
        print("ok: valid OpenAPI 3.1 document (openapi-spec-validator)")
    except Exception as e:  # noqa: BLE001
        fail(f"not a valid OpenAPI 3.1 document: {e}")
except ImportError:
    print("skip: OpenAPI document check (pip install openapi-spec-validator)")

for name, schema in schemas.items():
    try:
        Draft202012Validator.check_schema(schema)
    except Exception as e:  # noqa: BLE001
        fail(f"component {name} is not a valid 2020-12 schema: {e}")

# --------------------------------------------------------------------------- seeds unchanged
def seed_dirs():
    env = os.environ.get("SEEDS_DIR")
    if env:
        yield Path(env)
    yield REPO.parent / "shared" / "seeds"
    yield Path("/work/shared/seeds")


try:
    import yaml  # type: ignore
except ImportError:
    yaml = None

seed_dir = next((d for d in seed_dirs() if (d / "chat-completions.openapi.md").exists()), None)
if yaml is None or seed_dir is None:
    print("skip: seed comparison (PyYAML or seed documents not available)")
else:
    seen = set()
    for fname in ("chat-completions.openapi.md", "completions.openapi.md"):
        text = (seed_dir / fname).read_text()
        m = re.search(r"````yaml[^\n]*\n(.*?)\n````", text, re.S)
        seed = yaml.safe_load(m.group(1))
        for name, comp in seed["components"]["schemas"].items():
            if name in SEED_UNCHANGED:
                seen.add(name)
                if schemas.get(name) != comp:
                    fail(f"seed component {name} differs from {fname}")
        for p in seed["paths"]:
            if p not in doc["paths"]:
                fail(f"seed path {p} missing")
    for name in SEED_UNCHANGED:
        if name not in seen:
            fail(f"seed component {name} not found in the seeds (list out of date?)")
    print(f"ok: seed response/error components unchanged ({', '.join(sorted(seen))})")

# --------------------------------------------------------------------------- validators
registry = Registry().with_resource(DOC_URI, Resource(doc, DRAFT202012))


def py_validator(endpoint):
    return Draft202012Validator(
        {"$ref": f"{DOC_URI}#/components/schemas/{BODY[endpoint]}"}, registry=registry
    )


def py_errors(endpoint, body):
    out = []
    for e in py_validator(endpoint).iter_errors(body):
        missing = None
        if e.validator == "required":
            m = re.match(r"^'(.*)' is a required property$", e.message)
            missing = m.group(1) if m else None
        out.append((location(body, e.absolute_path, missing), e.message))
    return out


try:
    import jsonschema_rs  # type: ignore

    rs_registry = jsonschema_rs.Registry([(DOC_URI, doc)])
    _rs = {
        ep: jsonschema_rs.Draft202012Validator(
            {"$ref": f"{DOC_URI}#/components/schemas/{name}"}, registry=rs_registry
        )
        for ep, name in BODY.items()
    }

    def rs_errors(endpoint, body):
        out = []
        for e in _rs[endpoint].iter_errors(body):
            missing = e.kind.property if type(e.kind).__name__ == "Required" else None
            out.append((location(body, e.instance_path, missing), e.message))
        return out

    engines = [("python-jsonschema", py_errors), ("jsonschema-rs", rs_errors)]
except ImportError:
    print("skip: jsonschema-rs (pip install jsonschema-rs to also check with the Rust engine)")
    engines = [("python-jsonschema", py_errors)]

# --------------------------------------------------------------------------- corpus
valid_files = sorted((CORPUS / "valid").glob("*.json"))
invalid_files = sorted((CORPUS / "invalid").glob("*.json"))
if len(valid_files) < 25:
    fail(f"only {len(valid_files)} valid bodies (want >= 25)")
if len(invalid_files) < 20:
    fail(f"only {len(invalid_files)} invalid bodies (want >= 20)")

for engine, errors_of in engines:
    print(f"\n== {engine}: valid ({len(valid_files)})")
    for f in valid_files:
        endpoint = f.name.split("-", 1)[0]
        if endpoint not in BODY:
            fail(f"{f.name}: name must start with chat- or completions-")
            continue
        errs = errors_of(endpoint, json.loads(f.read_text()))
        if errs:
            fail(f"[{engine}] valid/{f.name} rejected: {errs}")
        elif VERBOSE:
            print(f"  ok {f.name}")
    print(f"== {engine}: invalid ({len(invalid_files)})")
    for f in invalid_files:
        case = json.loads(f.read_text())
        endpoint, body, expected = case["endpoint"], case["body"], case["location"]
        errs = errors_of(endpoint, body)
        locs = [loc for loc, _ in errs]
        if not errs:
            fail(f"[{engine}] invalid/{f.name} accepted (expected error at {expected})")
            continue
        status = "ok  " if expected in locs else "MISS"
        extra = "" if set(locs) == {expected} else "  (other locations reported too)"
        print(f"  {status} {f.name}: expected {expected}{extra}")
        for loc, msg in errs:
            print(f"         {loc}: {msg}")
        if expected not in locs:
            fail(f"[{engine}] invalid/{f.name}: expected location {expected}, got {locs}")

print()
if failures:
    print(f"{len(failures)} problem(s)")
    sys.exit(1)
print(f"all good: {len(valid_files)} valid accepted, {len(invalid_files)} invalid rejected at the expected location")
