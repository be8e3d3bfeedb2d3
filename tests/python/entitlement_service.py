"""An identity and content service written from docs/entitlement-http.md alone, on
Python's own HTTP server: the peer the real usher binary is tested against.

It first checks docs/entitlement-http.openapi.yaml is a valid OpenAPI 3.1 document
(openapi-spec-validator), then validates every answer it gives against that document's
schemas (openapi-schema-validator) before sending it, so usher is tested with answers
the published contract allows. It prints `listening <port>` and serves until killed.

Users: `alice` premium (4 seats, TV up to 2160 lines, Widevine L1), `bob` with no
subscription, `mo` on a mobile-only plan. Titles: `geo-film` is blocked in DE.
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

IDENTITY = {
    "alice": {
        "allowed": True,
        "seat_limit": 4,
        "plan": "premium",
        "devices": {
            "max_resolution": {"tv": 2160, "default": 1080},
            "drm": {"systems": ["widevine", "playready"], "min_security_level": "L1"},
        },
    },
    "bob": {"allowed": False, "reason": "NO_SUBSCRIPTION"},
    "mo": {
        "allowed": True,
        "seat_limit": 1,
        "devices": {"allowed_types": ["mobile"], "max_resolution": {"default": 720}},
    },
}


def schema_of(spec, path):
    """The JSON schema of a path's 200 answer, with the document's components."""
    answer = spec["paths"][path]["get"]["responses"]["200"]
    schema = dict(answer["content"]["application/json"]["schema"])
    schema["components"] = spec["components"]
    return OAS31Validator(schema)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    args = parser.parse_args()
    with open(args.spec) as f:
        spec = yaml.safe_load(f)
    validate(spec)
    identity_schema = schema_of(spec, "/entitlements")
    content_schema = schema_of(spec, "/availability")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def answer(self, body, schema):
            schema.validate(body)
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "max-age=60")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/identity/entitlements" and "user" in query:
                body = IDENTITY.get(query["user"], {"allowed": True, "seat_limit": 2})
                self.answer(body, identity_schema)
            elif url.path == "/content/availability" and "content" in query:
                blocked = query["content"] == "geo-film" and query.get("region") == "DE"
                body = {"available": False, "reason": "GEO_BLOCKED"} if blocked else {"available": True}
                self.answer(body, content_schema)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
