"""protocol/ is the spec a third party implements from; these tests keep it equal to the code.

- openapi.json is valid OpenAPI 3.1 and documents exactly the routes ``build_app`` registers;
- every frame schema is valid JSON Schema, accepts the frames the server's code produces, and agrees
  with the frame codec on a table of good and bad client frames;
- the definitions shared by openapi.json and frames/defs.json, and the documented limits, match;
- errors.md is what protocol/gen_errors.py writes;
- the wrap and seal vectors are what protocol/gen_crypto_vectors.py writes, and those not marked as
  encoding edge cases hold values the server accepts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import typing
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator, ValidationError, validators
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from agentchat import crypto
from agentchat.config import Limits, load_settings
from agentchat.core import frames
from agentchat.errors import CODES, AgentChatError, error
from agentchat.server.app import build_app
from agentchat.store.segments import frame_seq

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
FRAMES = PROTOCOL / "frames"
OPENAPI_URI = "urn:agentchat:protocol:openapi.json"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
LIMITS = Limits()


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ schema machinery


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """JSON Schema patterns are ECMA-262 regular expressions, whose ``$`` matches only at the very
    end; Python's ``$`` also matches before a final newline, which would let "ch_...\\n" pass. The
    schemas only use ``$`` as the final anchor."""
    if validator.is_type(instance, "string") and not re.search(_python_regex(pattern), instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _python_regex(pattern: str) -> str:
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern


EcmaValidator = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})


def schema_files() -> list[Path]:
    return sorted(FRAMES.rglob("*.json"))


def _resource(contents: dict[str, Any]) -> Resource:
    # Without "$schema": jsonschema would otherwise switch to its stock 2020-12 validator on entering
    # the resource, and lose the ECMA-262 pattern rule above. Every schema here is 2020-12 anyway
    # (test_frame_schema_is_valid_and_its_examples_match checks it).
    contents = {k: v for k, v in contents.items() if k != "$schema"}
    return Resource.from_contents(contents, default_specification=DRAFT202012)


def registry() -> Registry:
    """Every frame schema under its file URI (they refer to each other by relative path), and the
    OpenAPI document under OPENAPI_URI."""
    resources = [(path.as_uri(), _resource(load(path))) for path in schema_files()]
    resources.append((OPENAPI_URI, _resource(load(PROTOCOL / "openapi.json"))))
    return Registry().with_resources(resources)


REGISTRY = registry()


def validator_for(path: Path) -> Any:
    return EcmaValidator({"$ref": path.as_uri()}, registry=REGISTRY)


def component(name: str) -> Any:
    return EcmaValidator({"$ref": f"{OPENAPI_URI}#/components/schemas/{name}"}, registry=REGISTRY)


CLIENT_FRAME = validator_for(FRAMES / "client-frame.json")
SERVER_FRAME = validator_for(FRAMES / "server-frame.json")


def assert_valid(validator: Any, instance: Any) -> None:
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '(frame)'}: {e.message}"
                for e in validator.iter_errors(instance)]
    assert not problems, f"{str(instance)[:300]} does not match its schema: {problems[:5]}"


def codec(data: bytes) -> str | None:
    """The error code the server's codec answers for ``data`` (None: accepted)."""
    try:
        frames.decode_client_frame(data, max_bytes=LIMITS.max_frame_bytes,
                                   max_ciphertext_bytes=LIMITS.max_ciphertext_bytes)
    except AgentChatError as exc:
        return exc.code
    return None


# ------------------------------------------------------------------------------ OpenAPI


def openapi() -> dict[str, Any]:
    return load(PROTOCOL / "openapi.json")


def test_openapi_document_is_valid_openapi_3_1() -> None:
    doc = openapi()
    assert doc["openapi"].startswith("3.1.")
    validate_openapi(doc)


def served_routes() -> set[tuple[str, str]]:
    """(METHOD, path template) of every route ``build_app`` registers, HEAD-for-GET excepted."""
    app = build_app(load_settings(env={}, token_secret="t" * 40))
    routes: set[tuple[str, str]] = set()
    gets = {id(route.resource) for route in app.router.routes() if route.method == "GET"}
    for route in app.router.routes():
        if route.method == "HEAD" and id(route.resource) in gets:
            continue  # aiohttp answers HEAD for every GET route by itself
        info = route.resource.get_info()
        if "path" in info:
            path = info["path"]
        elif "formatter" in info:
            path = info["formatter"]
        elif "prefix" in info:  # static files
            path = info["prefix"].rstrip("/") + "/{filename}"
        else:
            raise AssertionError(f"cannot tell the path of route {route!r}")
        routes.add((route.method.upper(), path))
    return routes


def documented_routes() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in openapi()["paths"].items()
            for method in item if method in HTTP_METHODS}


def _listing(routes: set[tuple[str, str]]) -> str:
    return "\n".join(f"  {method} {path}" for method, path in sorted(routes, key=lambda r: (r[1], r[0])))


def test_every_served_route_is_documented_in_openapi() -> None:
    undocumented = served_routes() - documented_routes()
    assert not undocumented, (
        "These routes are served (build_app) but not documented in protocol/openapi.json; add each under "
        "'paths' with its request body schema, responses and error statuses:\n" + _listing(undocumented))


def test_every_documented_route_is_served() -> None:
    not_served = documented_routes() - served_routes()
    assert not not_served, (
        "protocol/openapi.json documents routes that build_app does not serve; remove or fix them:\n"
        + _listing(not_served))


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in openapi()["paths"].items()
            for method, op in item.items() if method in HTTP_METHODS]


def test_every_operation_states_success_and_errors() -> None:
    doc = openapi()
    ids = [op["operationId"] for _, _, op in operations()]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for method, path, op in operations():
        statuses = set(op["responses"])
        assert any(s.startswith("2") or s == "101" for s in statuses), f"{method} {path}: no success response"
        security = op.get("security", doc["security"])
        if security and {} not in security:
            assert "401" in statuses, f"{method} {path} needs a token: document 401"
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and "$ref" in response:
                assert response["$ref"].startswith("#/components/responses/"), (method, path, status)


def test_request_bodies_refuse_unknown_fields() -> None:
    """Every route reads its body with ``read_json(request, allowed)``, which refuses other fields: the
    documented schema says so too, so a client generated from it never sends one."""
    doc = openapi()
    for method, path, op in operations():
        if "requestBody" not in op:
            continue
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        if "$ref" in schema:
            schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        assert schema.get("type") == "object" and schema.get("additionalProperties") is False, (
            f"{method} {path}: the request body schema must be an object with additionalProperties false")


def openapi_pointer(*parts: str) -> Any:
    """A validator for the schema at this location of openapi.json (so its $refs resolve)."""
    pointer = "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)
    return EcmaValidator({"$ref": f"{OPENAPI_URI}#/{pointer}"}, registry=REGISTRY)


def test_openapi_examples_match_their_schemas() -> None:
    checked = 0
    for path, item in openapi()["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            places = [("requestBody",)] if "requestBody" in op else []
            places += [("responses", status) for status, r in op["responses"].items() if "content" in r]
            for place in places:
                media = op
                for part in place:
                    media = media[part]
                media = media["content"].get("application/json", {})
                if "example" in media:
                    schema = openapi_pointer("paths", path, method, *place, "content", "application/json", "schema")
                    assert_valid(schema, media["example"])
                    checked += 1
    assert checked >= 5


def test_shared_definitions_are_the_same_in_openapi_and_frames() -> None:
    """frames/defs.json is the source; openapi.json repeats each definition under components/schemas."""

    def as_openapi(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" else as_openapi(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [as_openapi(item) for item in node]
        return node

    components = openapi()["components"]["schemas"]
    for name, definition in load(FRAMES / "defs.json")["$defs"].items():
        assert components.get(name) == as_openapi(definition), (
            f"components/schemas/{name} in openapi.json differs from $defs/{name} in frames/defs.json")


def test_documented_limits_are_the_server_defaults() -> None:
    documented = openapi()["x-agentchat-limits"]
    defaults = dataclasses.asdict(LIMITS)
    assert set(documented) == set(defaults), "x-agentchat-limits in openapi.json must list every field of config.Limits"
    for name, value in defaults.items():
        assert documented[name]["default"] == value, name
        assert documented[name]["setting"] == "AGENTCHAT_" + name.upper()
        assert f"| `{name}` | {value} |" in openapi()["info"]["description"], name
    ciphertext = load(FRAMES / "defs.json")["$defs"]["envelope"]["properties"]["ciphertext"]
    assert ciphertext["maxLength"] == frames.b64url_len(LIMITS.max_ciphertext_bytes + frames.GCM_TAG_BYTES)
    assert ciphertext["minLength"] == frames.b64url_len(frames.GCM_TAG_BYTES)
    page = next(p for p in openapi()["paths"]["/api/v1/channels/{channel}/messages"]["get"]["parameters"]
                if p["name"] == "limit")
    assert page["schema"]["maximum"] == LIMITS.history_page_max


def test_real_keys_and_wraps_match_the_schemas() -> None:
    keys = crypto.AgentKeys.generate()
    assert_valid(component("public_keys"), keys.public.to_wire())
    assert_valid(component("did"), keys.did)
    assert_valid(EcmaValidator({"$ref": (FRAMES / "defs.json").as_uri() + "#/$defs/did"}, registry=REGISTRY), keys.did)
    wrapped = crypto.wrap_epoch_key(crypto.new_epoch_key(), keys.public.encryption_key, channel="ch_" + "a" * 16,
                                    epoch=1, recipient=keys.did)
    assert_valid(component("wrapped_key"), wrapped)
    assert_valid(component("epoch_keys"), {keys.did: wrapped})


# ------------------------------------------------------------------------------ frame schemas


@pytest.mark.parametrize("path", schema_files(), ids=lambda p: str(p.relative_to(FRAMES)))
def test_frame_schema_is_valid_and_its_examples_match(path: Path) -> None:
    schema = load(path)
    assert schema.get("$schema") == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    for example in schema.get("examples", []):
        assert_valid(validator_for(path), example)
        direction = path.parent.name
        if direction == "client":
            assert codec(orjson.dumps(example)) is None, f"the codec refuses the example {example}"
            assert_valid(CLIENT_FRAME, example)
        elif direction == "server":
            assert_valid(SERVER_FRAME, example)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_there_is_a_schema_for_every_client_frame_the_codec_knows() -> None:
    known = {_snake(cls.__name__) for cls in typing.get_args(frames.ClientFrame)}
    documented = {path.stem for path in (FRAMES / "client").glob("*.json")}
    assert known == documented, (f"frames.ClientFrame has {sorted(known - documented)} without a schema in "
                                 f"protocol/frames/client/; schemas without a frame: {sorted(documented - known)}")
    for path in (FRAMES / "client").glob("*.json"):
        assert load(path)["properties"]["type"] == {"const": path.stem}


@pytest.mark.parametrize("direction", ["client", "server"])
def test_union_schema_lists_every_frame_of_its_direction(direction: str) -> None:
    union = {ref["$ref"] for ref in load(FRAMES / f"{direction}-frame.json")["oneOf"]}
    files = {f"{direction}/{path.name}" for path in (FRAMES / direction).glob("*.json")}
    assert union == files


def test_every_schema_pattern_is_portable() -> None:
    """Patterns must mean the same in ECMA-262 and Python (anchored, no Python-only syntax)."""

    def patterns(node: Any) -> Any:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern":
                    yield value
                else:
                    yield from patterns(value)
        elif isinstance(node, list):
            for item in node:
                yield from patterns(item)

    found = [p for path in [*schema_files(), PROTOCOL / "openapi.json"] for p in patterns(load(path))]
    assert found
    for pattern in found:
        assert pattern.startswith("^") and pattern.endswith("$"), pattern
        assert not re.search(r"\\[AZz]|\(\?P|\(\?[aiLmsux]", pattern), pattern
        re.compile(pattern)


# ------------------------------------------------------------------------------ frames the code makes


CH = "ch_" + "Q3x9Vb2LmT8rKp4N"
PK = "pk_" + "M2nB6vC8xZ4qW9eR"


def real_envelope(text: str = "hello", epoch: int = 1, size: int | None = None) -> tuple[str, dict[str, Any]]:
    keys = crypto.AgentKeys.generate()
    plaintext = b"x" * size if size is not None else text.encode()
    return keys.did, crypto.seal(crypto.new_epoch_key(), plaintext, channel=CH, epoch=epoch, sender=keys.did,
                                 client_id="c-1", signer=keys)


def test_message_frames_from_the_codec_match_the_schema() -> None:
    for size in (0, 1, 100, LIMITS.max_ciphertext_bytes):
        sender, envelope = real_envelope(size=size)
        for seq in (1, 42, frames.MAX_SEQ):
            data = frames.message_frame(seq, frames.message_body(CH, sender, "c-1", 1767225600000, envelope))
            frame = orjson.loads(data)
            assert_valid(validator_for(FRAMES / "server" / "message.json"), frame)
            assert_valid(SERVER_FRAME, frame)
            record = {k: v for k, v in frame.items() if k != "type"}
            assert_valid(component("message_record"), record)


def test_gap_frames_from_the_codec_match_the_schema() -> None:
    for seq in (1, 42, frames.MAX_SEQ):
        frame = orjson.loads(frames.gap_frame(CH, seq, 1767225600000))
        assert_valid(validator_for(FRAMES / "server" / "gap.json"), frame)
        assert_valid(SERVER_FRAME, frame)
        assert frame_seq(frames.gap_frame(CH, seq, 1)) == seq and frames.is_gap(frames.gap_frame(CH, seq, 1))


def test_error_frames_for_every_code_match_the_schema() -> None:
    for code in CODES:
        for ref in (None, "", "r-1", "x" * 64):
            frame = orjson.loads(frames.error_frame(error(code).to_wire(), ref))
            assert_valid(validator_for(FRAMES / "server" / "error.json"), frame)
            assert_valid(SERVER_FRAME, frame)
            assert_valid(component("error_response"), {"error": error(code).to_wire()})


def test_several_frames_in_one_server_message_split_on_newlines() -> None:
    sender, envelope = real_envelope()
    parts = [frames.message_frame(i, frames.message_body(CH, sender, f"c{i}", 1, envelope)) for i in (1, 2)]
    parts.append(frames.error_frame(error("rate_limited").to_wire(), "r"))
    assert all(b"\n" not in part for part in parts)
    split = frames.split_frames(b"\n".join(parts))
    assert [f["type"] for f in split] == ["message", "message", "error"]
    for frame in split:
        assert_valid(SERVER_FRAME, frame)


# ------------------------------------------------------------------------------ client frames: codec vs schema


def _wrapped(**change: Any) -> dict[str, Any]:
    return {"alg": frames.WRAP_ALG, "ephemeral_key": "E" * 43, "nonce": "N" * 16, "ciphertext": "C" * 64, **change}


def _env(**change: Any) -> dict[str, Any]:
    return {"epoch": 1, "nonce": "N" * 16, "ciphertext": "C" * 24, "signature": "S" * 86, **change}


def _send(**change: Any) -> dict[str, Any]:
    return {"type": "send", "channel": CH, "client_id": "c-1", "envelope": _env(), **change}


MAX_CT = frames.b64url_len(LIMITS.max_ciphertext_bytes + frames.GCM_TAG_BYTES)
without = object()


def _drop(frame: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != name}


# (what, frame, the codec's error code or None for accepted). The schema must accept exactly the
# accepted ones.
CLIENT_FRAME_TABLE: list[tuple[str, Any, str | None]] = [
    # hello
    ("hello", {"type": "hello", "token": "t"}, None),
    ("hello with ref and resume", {"type": "hello", "ref": "h", "token": "t", "resume": {CH: 0, "ch_" + "b" * 32: frames.MAX_SEQ}}, None),
    ("hello, null ref and resume", {"type": "hello", "ref": None, "token": "t", "resume": None}, None),
    ("hello, empty token (refused later, by the token check)", {"type": "hello", "token": ""}, None),
    ("hello, 4096-character token", {"type": "hello", "token": "t" * 4096}, None),
    ("hello without token", {"type": "hello"}, "invalid_field"),
    ("hello, null token", {"type": "hello", "token": None}, "invalid_field"),
    ("hello, numeric token", {"type": "hello", "token": 5}, "invalid_field"),
    ("hello, 4097-character token", {"type": "hello", "token": "t" * 4097}, "too_large"),
    ("hello, extra field", {"type": "hello", "token": "t", "channel": CH}, "invalid_field"),
    ("hello, resume is a list", {"type": "hello", "token": "t", "resume": [CH]}, "invalid_field"),
    ("hello, resume names a bad channel id", {"type": "hello", "token": "t", "resume": {"general": 1}}, "invalid_field"),
    ("hello, resume from -1", {"type": "hello", "token": "t", "resume": {CH: -1}}, "invalid_field"),
    ("hello, resume from true", {"type": "hello", "token": "t", "resume": {CH: True}}, "invalid_field"),
    ("hello, resume from 1.5", {"type": "hello", "token": "t", "resume": {CH: 1.5}}, "invalid_field"),
    ("hello, resume from a string", {"type": "hello", "token": "t", "resume": {CH: "1"}}, "invalid_field"),
    ("hello, resume past the largest seq", {"type": "hello", "token": "t", "resume": {CH: frames.MAX_SEQ + 1}}, "invalid_field"),
    # ref
    ("64-character ref", {"type": "ping", "ref": "r" * 64}, None),
    ("empty ref", {"type": "ping", "ref": ""}, None),
    ("65-character ref", {"type": "ping", "ref": "r" * 65}, "invalid_field"),
    ("numeric ref", {"type": "ping", "ref": 7}, "invalid_field"),
    # type
    ("no type", {"ref": "r"}, "invalid_field"),
    ("null type", {"type": None}, "invalid_field"),
    ("unknown type", {"type": "teleport"}, "unknown_frame"),
    ("numeric type", {"type": 5}, "unknown_frame"),
    ("type in upper case", {"type": "PING"}, "unknown_frame"),
    ("not an object", [{"type": "ping"}], "invalid_field"),
    ("a string", "ping", "invalid_field"),
    # send
    ("send", _send(), None),
    ("send with ref", _send(ref="m-1"), None),
    ("send, 32-character channel id", _send(channel="ch_" + "x" * 32), None),
    ("send, 64-character client id", _send(client_id="A-_z9" * 12 + "abcd"), None),
    ("send, epoch 0", _send(envelope=_env(epoch=0)), None),
    ("send, largest epoch", _send(envelope=_env(epoch=frames.MAX_EPOCH)), None),
    ("send, shortest ciphertext (the tag)", _send(envelope=_env(ciphertext="C" * 22)), None),
    ("send, longest ciphertext", _send(envelope=_env(ciphertext="C" * MAX_CT)), None),
    ("send, ciphertext of 3 characters past a multiple of 4", _send(envelope=_env(ciphertext="C" * 23)), None),
    ("send without channel", _drop(_send(), "channel"), "invalid_field"),
    ("send without client_id", _drop(_send(), "client_id"), "invalid_field"),
    ("send without envelope", _drop(_send(), "envelope"), "invalid_field"),
    ("send, extra field", _send(bonus=1), "invalid_field"),
    ("send, channel id without ch_", _send(channel="Q3x9Vb2LmT8rKp4N"), "invalid_field"),
    ("send, 15-character channel id", _send(channel="ch_" + "x" * 15), "invalid_field"),
    ("send, 33-character channel id", _send(channel="ch_" + "x" * 33), "invalid_field"),
    ("send, channel id with a dot", _send(channel="ch_" + "x" * 15 + "."), "invalid_field"),
    ("send, channel id with a final newline", _send(channel=CH + "\n"), "invalid_field"),
    ("send, empty client id", _send(client_id=""), "invalid_field"),
    ("send, 65-character client id", _send(client_id="c" * 65), "invalid_field"),
    ("send, client id with a space", _send(client_id="c 1"), "invalid_field"),
    ("send, client id with a final newline", _send(client_id="c1\n"), "invalid_field"),
    ("send, envelope is a list", _send(envelope=[]), "invalid_field"),
    ("send, envelope with an extra field", _send(envelope=_env(sender="x")), "invalid_field"),
    ("send, envelope without epoch", _send(envelope=_drop(_env(), "epoch")), "invalid_field"),
    ("send, envelope without signature", _send(envelope=_drop(_env(), "signature")), "invalid_field"),
    ("send, epoch -1", _send(envelope=_env(epoch=-1)), "invalid_field"),
    ("send, epoch 2^31", _send(envelope=_env(epoch=frames.MAX_EPOCH + 1)), "invalid_field"),
    ("send, epoch as a string", _send(envelope=_env(epoch="1")), "invalid_field"),
    ("send, epoch true", _send(envelope=_env(epoch=True)), "invalid_field"),
    ("send, 15-character nonce", _send(envelope=_env(nonce="N" * 15)), "invalid_field"),
    ("send, 17-character nonce", _send(envelope=_env(nonce="N" * 17)), "invalid_field"),
    ("send, nonce in standard base64", _send(envelope=_env(nonce="N" * 15 + "+")), "invalid_field"),
    ("send, padded nonce", _send(envelope=_env(nonce="N" * 14 + "==")), "invalid_field"),
    ("send, nonce with a final newline", _send(envelope=_env(nonce="N" * 15 + "\n")), "invalid_field"),
    ("send, ciphertext shorter than the tag", _send(envelope=_env(ciphertext="C" * 21)), "invalid_field"),
    ("send, ciphertext of 1 character past a multiple of 4", _send(envelope=_env(ciphertext="C" * 25)), "invalid_field"),
    ("send, padded ciphertext", _send(envelope=_env(ciphertext="C" * 22 + "==")), "invalid_field"),
    ("send, ciphertext over the limit", _send(envelope=_env(ciphertext="C" * (MAX_CT + 1))), "too_large"),
    ("send, 85-character signature", _send(envelope=_env(signature="S" * 85)), "invalid_field"),
    # ping
    ("ping", {"type": "ping"}, None),
    ("ping, extra field", {"type": "ping", "ts": 1}, "invalid_field"),
    # resume
    ("resume", {"type": "resume", "resume": {CH: 10}}, None),
    ("resume of nothing", {"type": "resume", "resume": {}}, None),
    ("resume without resume", {"type": "resume"}, "invalid_field"),
    ("resume, null resume", {"type": "resume", "resume": None}, "invalid_field"),
    ("resume, bad channel", {"type": "resume", "resume": {"ch_x": 1}}, "invalid_field"),
    # refuse
    ("refuse", {"type": "refuse", "peek": PK}, None),
    ("refuse without peek", {"type": "refuse"}, "invalid_field"),
    ("refuse, a channel id as peek", {"type": "refuse", "peek": CH}, "invalid_field"),
    ("refuse, peek id with a final newline", {"type": "refuse", "peek": PK + "\n"}, "invalid_field"),
    # grant_key
    ("grant_key", {"type": "grant_key", "peek": PK, "epoch": 3, "wrapped_key": _wrapped()}, None),
    ("grant_key without wrapped_key", {"type": "grant_key", "peek": PK, "epoch": 3}, "invalid_field"),
    ("grant_key without epoch", {"type": "grant_key", "peek": PK, "wrapped_key": _wrapped()}, "invalid_field"),
    ("grant_key, epoch -1", {"type": "grant_key", "peek": PK, "epoch": -1, "wrapped_key": _wrapped()}, "invalid_field"),
    ("grant_key, other alg", {"type": "grant_key", "peek": PK, "epoch": 3, "wrapped_key": _wrapped(alg="rsa")}, "invalid_field"),
    ("grant_key, short ephemeral key", {"type": "grant_key", "peek": PK, "epoch": 3,
                                        "wrapped_key": _wrapped(ephemeral_key="E" * 42)}, "invalid_field"),
    ("grant_key, wrapped key with an extra field", {"type": "grant_key", "peek": PK, "epoch": 3,
                                                    "wrapped_key": _wrapped(recipient="x")}, "invalid_field"),
    ("grant_key, wrapped key without nonce", {"type": "grant_key", "peek": PK, "epoch": 3,
                                              "wrapped_key": _drop(_wrapped(), "nonce")}, "invalid_field"),
    # watch_indicators
    ("watch all", {"type": "watch_indicators"}, None),
    ("watch all, null channels", {"type": "watch_indicators", "channels": None}, None),
    ("watch none", {"type": "watch_indicators", "channels": []}, None),
    ("watch 100 channels", {"type": "watch_indicators", "channels": [f"ch_{i:016d}" for i in range(100)]}, None),
    ("watch 101 channels", {"type": "watch_indicators", "channels": [f"ch_{i:016d}" for i in range(101)]}, "too_large"),
    ("watch, channels is a string", {"type": "watch_indicators", "channels": CH}, "invalid_field"),
    ("watch, a bad channel id", {"type": "watch_indicators", "channels": [CH, "x"]}, "invalid_field"),
]


@pytest.mark.parametrize(("what", "frame", "code"), CLIENT_FRAME_TABLE, ids=[row[0] for row in CLIENT_FRAME_TABLE])
def test_schema_and_codec_agree_on_client_frames(what: str, frame: Any, code: str | None) -> None:
    data = orjson.dumps(frame)
    assert len(data) <= LIMITS.max_frame_bytes, "keep the table under the frame size limit"
    assert codec(data) == code, f"the codec answers {codec(data)!r} for: {what}"
    errors = list(CLIENT_FRAME.iter_errors(frame))
    if code is None:
        assert not errors, f"the schema refuses a frame the codec accepts ({what}): {errors[0].message[:200]}"
        # and the type-specific schema accepts it too
        assert_valid(validator_for(FRAMES / "client" / f"{frame['type']}.json"), frame)
    else:
        assert errors, f"the schema accepts a frame the codec refuses with {code} ({what})"


def test_codec_only_checks_are_the_documented_ones() -> None:
    """What a schema cannot say: JSON syntax and the size of the whole frame (frames.md section 3)."""
    assert codec(b"{oops") == "bad_json"
    assert codec(b"") == "bad_json"
    big = orjson.dumps({"type": "hello", "token": "t", "resume": {f"ch_{i:016d}": 0 for i in range(6000)}})
    assert len(big) > LIMITS.max_frame_bytes
    assert codec(big) == "too_large"
    text = (PROTOCOL / "frames.md").read_text()
    for code in ("bad_json", "invalid_field", "unknown_frame", "too_large"):
        assert f"`{code}`" in text


# ------------------------------------------------------------------------------ errors.md


def _generator(name: str) -> Any:
    """One of protocol/'s generator scripts (``gen_errors`` ...), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, PROTOCOL / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_errors_md_is_generated_from_the_codes() -> None:
    expected = _generator("gen_errors").render()
    assert (PROTOCOL / "errors.md").read_text(encoding="utf-8") == expected, (
        "protocol/errors.md is out of date with agentchat.errors.CODES: run python protocol/gen_errors.py")
    for code, (cls, _) in CODES.items():
        assert f"| `{code}` | {cls.status} | {'yes' if cls.retryable else 'no'} |" in expected


# ------------------------------------------------------------------------------ crypto vectors


def test_the_wrap_and_seal_vectors_are_generated() -> None:
    path = PROTOCOL / "vectors" / "crypto.json"
    current = path.read_text(encoding="utf-8")
    assert _generator("gen_crypto_vectors").render(json.loads(current)) == current, (
        "protocol/vectors/crypto.json is out of date: run python protocol/gen_crypto_vectors.py")


def _server_accepts(channel: str, epoch: int, *dids: str, recipient: str | None = None,
                    client_id: str | None = None) -> bool:
    defs = json.loads((PROTOCOL / "frames" / "defs.json").read_text(encoding="utf-8"))["$defs"]

    def matches(name: str, value: str) -> bool:
        return re.fullmatch(defs[name]["pattern"].removeprefix("^").removesuffix("$"), value) is not None

    ok = matches("channel_id", channel) and defs["epoch"]["minimum"] <= epoch <= defs["epoch"]["maximum"]
    ok = ok and all(matches("did", did) for did in dids)
    if client_id is not None:
        ok = ok and matches("client_id", client_id)
    if recipient is not None:
        ok = ok and (matches("did", recipient) if recipient.startswith("did:")
                     else matches("peek_id", recipient.removeprefix("peek:")))
    return ok


def test_the_main_crypto_vectors_hold_values_the_server_accepts() -> None:
    """A client can replay them through a server; the ``edge_case`` ones check the encoding beyond what
    the server takes (non-ASCII text, epoch 2^53-1) and must say so."""
    vectors = json.loads((PROTOCOL / "vectors" / "crypto.json").read_text(encoding="utf-8"))
    for case in vectors["wrap"]:
        i = case["inputs"]
        assert _server_accepts(i["channel"], i["epoch"], recipient=i["recipient"]) != ("edge_case" in case), case["description"]
    for case in vectors["seal"]:
        i = case["inputs"]
        accepted = _server_accepts(i["channel"], i["epoch"], i["sender"], client_id=i["client_id"])
        assert accepted != ("edge_case" in case), case["description"]
    assert sum("edge_case" not in case for case in vectors["wrap"] + vectors["seal"]) >= 5
    for case in vectors["wrap_invalid"]:
        assert _server_accepts(case["channel"], case["epoch"], recipient=case["recipient"]), case["description"]
    for case in vectors["open_invalid"]:
        assert _server_accepts(case["channel"], case["wire"]["epoch"], case["sender"], client_id=case["client_id"])


# ------------------------------------------------------------------------------ close codes


def test_close_codes_in_the_spec_are_the_codes_the_server_sends() -> None:
    from agentchat.core import rfc6455

    text = (PROTOCOL / "frames.md").read_text(encoding="utf-8")
    section = text[text.index("## 11. Close codes"):text.index("## 12.")]
    documented = {int(code) for code in re.findall(r"^\| (\d{4}) \|", section, re.M)}
    sent = {rfc6455.CLOSE_GOING_AWAY, rfc6455.CLOSE_POLICY, rfc6455.CLOSE_PROTOCOL_ERROR, rfc6455.CLOSE_TOO_BIG,
            rfc6455.CLOSE_INVALID_DATA,
            frames.CLOSE_AUTH, frames.CLOSE_REMOVED, frames.CLOSE_SLOW_CONSUMER, frames.CLOSE_TRY_AGAIN}
    assert documented == sent


def test_did_pattern_is_exactly_the_dids_the_server_decodes() -> None:
    """Base58 digits of one length compare like the numbers they spell, so the 2^256 DIDs are one
    range of 47-digit strings: the pattern spells that range out. Checked against the decoder on
    random keys, random strings of the right shape, and every one-digit change of the range's ends."""
    import os
    import random

    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    patterns = {load(PROTOCOL / "frames" / "defs.json")["$defs"]["did"]["pattern"],
                load(PROTOCOL / "openapi.json")["components"]["schemas"]["did"]["pattern"]}
    assert len(patterns) == 1
    pattern = re.compile(patterns.pop())

    def decodes(did: str) -> bool:
        try:
            crypto.signing_key_from_did(did)
        except ValueError:
            return False
        return True

    rng = random.Random(7)
    for _ in range(2000):
        assert pattern.match(crypto.did_from_signing_key(os.urandom(32)))
    candidates = ["did:agentchat:z" + "".join(rng.choice(alphabet) for _ in range(47)) for _ in range(2000)]
    for end in (bytes(32), b"\xff" * 32):
        digits = crypto.did_from_signing_key(end)[len("did:agentchat:z"):]
        candidates += ["did:agentchat:z" + digits[:i] + c + digits[i + 1:] for i in range(47) for c in alphabet]
    for did in candidates:
        assert bool(pattern.match(did)) == decodes(did), did


def test_the_readme_transcript_is_what_a_run_gives() -> None:
    """protocol/README.md's session transcript comes from protocol/gen_transcript.py: a run today gives
    the same steps, frame types and messages (values differ: keys, ids, times)."""
    spec = importlib.util.spec_from_file_location("gen_transcript", PROTOCOL / "gen_transcript.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def shape(text: str) -> list[str]:
        # How frames are grouped into WebSocket messages depends on timing: only the frames count.
        return [re.sub(r'"[^"]*"|ch_[A-Za-z0-9_-]+|\d+', "_", line) for line in text.splitlines() if "one WebSocket message" not in line]

    readme = (PROTOCOL / "README.md").read_text(encoding="utf-8")
    written = readme[readme.index(module.BEGIN) + len(module.BEGIN):readme.index(module.END)].strip()
    assert shape(module.render()) == shape(written)
