"""Drives the official Python SDK (`klaviyo-api`) against a base URL.

Run by tests/sdk.rs with the virtualenv that tests/sdk/install.sh makes. Prints one
JSON object on its last line of stdout; exits non-zero when a call fails.

  python_client.py calls URL KEY            get accounts, create an event, get profiles,
                                            create or update a profile
  python_client.py burst URL KEY N          N concurrent get_profiles calls with the
                                            predictive_analytics condition (10/s burst);
                                            counts every 429 the SDK's HTTP stack saw
  python_client.py throttled URL KEY N      N concurrent get_accounts calls (1/s): first
                                            with all retries off (the 429s' shape as the
                                            SDK raises them), then with the SDK's retry on
  python_client.py failing URL KEY          one get_accounts call with the SDK's default
                                            retry (3 attempts): what it raised, what it saw
"""

import json
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import openapi_client.rest
import urllib3
from klaviyo_api import KlaviyoAPI
from openapi_client.exceptions import ApiException

# Every response that reaches the SDK's HTTP stack, including the ones urllib3 retries
# by itself (it honours Retry-After on 429/503 for idempotent requests).
SEEN = []
SEEN_LOCK = threading.Lock()
_make_request = urllib3.connectionpool.HTTPConnectionPool._make_request


def _recording_make_request(self, *args, **kwargs):
    resp = _make_request(self, *args, **kwargs)
    with SEEN_LOCK:
        SEEN.append(
            {
                "status": resp.status,
                "retry_after": resp.headers.get("Retry-After"),
                "proxy_error": resp.headers.get("X-Klaviyo-Proxy-Error"),
            }
        )
    return resp


urllib3.connectionpool.HTTPConnectionPool._make_request = _recording_make_request


def client(url, key, retries=3, wire_retries=True):
    k = KlaviyoAPI(key, max_delay=10, max_retries=retries, test_host=url)
    if not wire_retries:
        # Also switch off urllib3's own retry, so a 429 reaches the caller as is.
        k.configuration.retries = False
        k.api_client.rest_client = openapi_client.rest.RESTClientObject(k.configuration)
    return k


def calls(url, key):
    k = client(url, key)
    accounts = k.Accounts.get_accounts()
    event = k.Events.create_event(
        {
            "data": {
                "type": "event",
                "attributes": {
                    "properties": {"source": "klaviyo-proxy sdk test"},
                    "metric": {"data": {"type": "metric", "attributes": {"name": "Proxy SDK Test"}}},
                    "profile": {"data": {"type": "profile", "attributes": {"email": "sdk@example.com"}}},
                    "unique_id": str(uuid.uuid4()),
                },
            }
        }
    )
    profiles = k.Profiles.get_profiles()
    upsert = k.Profiles.create_or_update_profile(
        {"data": {"type": "profile", "attributes": {"email": "sdk@example.com", "first_name": "Sdk"}}}
    )
    return {
        "account_id": accounts.data[0].id,
        "event": event,
        "profiles": len(profiles.data),
        "first_profile_email": profiles.data[0].attributes.email,
        "profile_id": upsert.data.id,
        "profile_email": upsert.data.attributes.email,
    }


def _status(fn):
    try:
        fn()
        return 200
    except ApiException as e:
        return e.status


def burst(url, key, n):
    k = client(url, key)
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [
            pool.submit(_status, lambda: k.Profiles.get_profiles(additional_fields_profile=["predictive_analytics"]))
            for _ in range(n)
        ]
        statuses = [f.result() for f in futures]
    wire = [s["status"] for s in SEEN]
    return {"ok": statuses.count(200), "statuses": statuses, "wire_429s": wire.count(429), "wire": len(wire)}


def throttled(url, key, n):
    # First with every retry off, to see what the SDK raises for a 429.
    k = client(url, key, retries=0, wire_retries=False)
    with ThreadPoolExecutor(max_workers=n) as pool:
        errors = [f.result() for f in [pool.submit(_try_accounts, k) for _ in range(n)]]
    raised = [e for e in errors if e is not None]
    # Then the same burst as an app runs it, retries on: every call ends well.
    SEEN.clear()
    k = client(url, key, retries=5)
    with ThreadPoolExecutor(max_workers=n) as pool:
        statuses = [f.result() for f in [pool.submit(_status, k.Accounts.get_accounts) for _ in range(n)]]
    return {"raised": raised, "statuses": statuses, "seen": SEEN}


def _try_accounts(k):
    try:
        k.Accounts.get_accounts()
        return None
    except ApiException as e:
        return _describe(e)


def _describe(e):
    body = json.loads(e.body)
    retry_after = e.headers.get("Retry-After")
    return {
        "status": e.status,
        "retry_after": int(retry_after) if retry_after is not None else None,
        "proxy_error": e.headers.get("X-Klaviyo-Proxy-Error"),
        "error_status": body["errors"][0]["status"],
        "error_code": body["errors"][0]["code"],
    }


def failing(url, key):
    k = client(url, key, retries=3)
    return {"raised": _try_accounts(k), "seen": SEEN}


def main():
    mode, url, key = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "calls":
        out = calls(url, key)
    elif mode == "burst":
        out = burst(url, key, int(sys.argv[4]))
    elif mode == "throttled":
        out = throttled(url, key, int(sys.argv[4]))
    elif mode == "failing":
        out = failing(url, key)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
