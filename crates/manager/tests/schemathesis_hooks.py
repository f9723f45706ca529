"""schemathesis hooks for ferrod's API (crates/manager/tests/api_schemathesis.rs).

Domain and network definitions are TOML documents sent as `application/toml`, a media type
schemathesis has no serializer for: the generated value (a string, as openapi.json says) goes
out as its UTF-8 bytes, anything else as JSON text (which ferrod must refuse cleanly).
"""

import json

import schemathesis


@schemathesis.serializer("application/toml")
def toml_serializer(ctx, value):
    if isinstance(value, bytes):
        return {"data": value}
    if isinstance(value, str):
        return {"data": value.encode("utf-8")}
    return {"data": json.dumps(value).encode("utf-8")}
