"""An edge's check of usher's edge tokens, written from the format documented in
src/manifest/edge.rs and nothing else: prints "ok" or why the request is refused.

usage: edge_verify.py <url> <secret hex> <unix now>
The request's path is the URL's path; its token is the URL's `token` query parameter.
"""

import hashlib
import hmac
import sys
from urllib.parse import parse_qs, urlsplit


def verify(url: str, secret: bytes, now: int) -> str:
    parts = urlsplit(url)
    tokens = parse_qs(parts.query).get("token")
    if not tokens:
        return "no token"
    token = tokens[0]
    signed, sep, mac = token.partition("~hmac=")
    if not sep:
        return "no hmac"
    fields = dict(field.split("=", 1) for field in signed.split("~"))
    if list(fields) != ["exp", "acl", "sid"]:
        return "bad fields"
    expected = hmac.new(secret, signed.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, mac):
        return "bad hmac"
    if now > int(fields["exp"]):
        return "expired"
    acl = fields["acl"]
    if not acl.endswith("*") or not parts.path.startswith(acl[:-1]):
        return "path outside acl"
    return "ok"


if __name__ == "__main__":
    print(verify(sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])))
