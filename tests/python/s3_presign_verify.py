"""S3's check of a presigned GET, done by botocore (the AWS SDK for Python's own
Signature Version 4): the signature botocore computes for the URL's path, date and
expiry with the given credentials must equal the URL's, and the URL must not have
expired. Prints "ok", "bad signature" or "expired".

usage: s3_presign_verify.py <url> <access key id> <secret access key> <region> <unix now>
"""

import datetime
import hmac
import sys
from urllib.parse import parse_qs, urlsplit

import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def verify(url: str, key: str, secret: str, region: str, now: int) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    signed_at = datetime.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    signed_at = signed_at.replace(tzinfo=datetime.timezone.utc)
    expires = int(query["X-Amz-Expires"])
    # botocore signs at "now": make its now the URL's signing time.
    botocore.auth.get_current_datetime = lambda: signed_at.replace(tzinfo=None)
    request = AWSRequest(method="GET", url=f"{parts.scheme}://{parts.netloc}{parts.path}")
    auth = botocore.auth.S3SigV4QueryAuth(Credentials(key, secret), "s3", region, expires=expires)
    auth.add_auth(request)
    expected = parse_qs(urlsplit(request.url).query)["X-Amz-Signature"][0]
    if not hmac.compare_digest(expected, query["X-Amz-Signature"]):
        return "bad signature"
    if now > signed_at.timestamp() + expires:
        return "expired"
    return "ok"


if __name__ == "__main__":
    url, key, secret, region, now = sys.argv[1:6]
    print(verify(url, key, secret, region, int(now)))
