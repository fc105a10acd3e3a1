"""A Refresh at scale against a Kanidm sync endpoint (the harness in tests/kanidm, or the emulator):
N people and N/10 groups of 100 members each in one ScimSyncRequest, as a full read must send it
(Kanidm deletes what a Refresh does not list). Prints the request's size and the server's time.

Usage: python3 refresh.py URL SYNC_TOKEN USERS     (what the harness prints on its first line)
Only the standard library; 127.0.0.1 only.
"""

import json
import sys
import time
import urllib.error
import urllib.request
import uuid

PREFIX = "urn:ietf:params:scim:schemas:kanidm:sync:1:"


def entries(users):
    ns = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")
    people = []
    for i in range(users):
        people.append({
            "schemas": [PREFIX + "account", PREFIX + "person"],
            "id": str(uuid.uuid5(ns, f"user-{i}")),
            "externalId": f"user-{i}@corp.example",
            "name": f"user{i}",
            "displayname": f"User {i}",
            "mail": [{"value": f"user{i}@corp.example", "primary": True}],
        })
    groups = []
    for g in range(max(1, users // 10)):
        members = [{"external_id": f"user-{(g * 37 + k * 101) % users}@corp.example"} for k in range(100)]
        groups.append({
            "schemas": [PREFIX + "group"],
            "id": str(uuid.uuid5(ns, f"group-{g}")),
            "externalId": f"group-{g}",
            "name": f"group{g}",
            "member": members,
        })
    return people + groups


def main():
    url, token, users = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert url.startswith("http://127.0.0.1:"), "loopback only"
    body = json.dumps({
        "from_state": "Refresh",
        "to_state": {"Active": {"cookie": "YmVuY2g"}},
        "entries": entries(users),
        "retain": "Ignore",
    }).encode()
    req = urllib.request.Request(url + "/scim/v1/Sync", data=body, method="POST", headers={
        "Authorization": "Bearer " + token, "Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            status = r.status
            r.read()
    except urllib.error.HTTPError as e:
        status = e.code
    except urllib.error.URLError as e:
        # A server that refuses the body early (its size limit) closes the connection on it.
        status = f"refused: {e.reason}"
    took = time.monotonic() - started
    print(json.dumps({"users": users, "groups": max(1, users // 10), "memberships": max(1, users // 10) * 100,
                      "request_bytes": len(body), "status": status, "seconds": round(took, 2)}))


main()
