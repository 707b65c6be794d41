"""botocore against the emulator: every modelled exception decodes to its typed error, and the
paginator walks the results. Run by tests/botocore.rs with the emulator's URL as argv[1]."""

import json
import sys
import time
import urllib.request

import botocore.session
from botocore.config import Config

endpoint = sys.argv[1]
FARM = "farm-" + "0" * 31 + "b"
QUEUE = "queue-" + "0" * 31 + "1"


def admin(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(endpoint + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        return resp.status


client = botocore.session.get_session().create_client(
    "deadline",
    region_name="us-west-2",
    endpoint_url=endpoint,
    aws_access_key_id="AKIDTEST",
    aws_secret_access_key="secret",
    config=Config(inject_host_prefix=False, parameter_validation=False, retries={"max_attempts": 1, "mode": "standard"}),
)

start = dict(
    farmId=FARM,
    resourceIds={"queueIds": [QUEUE]},
    startTime="2026-10-01T00:00:00Z",
    endTime="2026-10-03T00:00:00Z",
    period="HOURLY",
    groupBy=["USAGE_TYPE"],
    statistics=["SUM", "MIN"],
)


def expect_error(exc_class, call, **kwargs):
    try:
        call(**kwargs)
    except exc_class as e:
        return e.response
    raise AssertionError(f"expected {exc_class.__name__}")


agg = client.start_sessions_statistics_aggregation(**start)["aggregationId"]
throttled = expect_error(client.exceptions.ThrottlingException, client.start_sessions_statistics_aggregation, **start)
assert throttled["ResponseMetadata"]["HTTPHeaders"]["retry-after"], throttled

invalid = dict(start, resourceIds={"queueIds": ["queue-bad"]}, timezone="UTC+8")
resp = expect_error(client.exceptions.ValidationException, client.start_sessions_statistics_aggregation, **invalid)
assert resp["reason"] == "FIELD_VALIDATION_FAILED", resp
assert [f["name"] for f in resp["fieldList"]] == ["resourceIds.queueIds[0]", "timezone"], resp

resp = expect_error(client.exceptions.ResourceNotFoundException, client.get_sessions_statistics_aggregation, farmId=FARM, aggregationId="f" * 32)
assert resp["resourceId"] == "f" * 32 and resp["resourceType"], resp

for kind, exc in [
    ("AccessDeniedException", client.exceptions.AccessDeniedException),
    ("InternalServerErrorException", client.exceptions.InternalServerErrorException),
]:
    admin("POST", "/_emulator/faults", {"error_rates": {kind: 1.0}, "operations": ["get"]})
    expect_error(exc, client.get_sessions_statistics_aggregation, farmId=FARM, aggregationId=agg)
admin("DELETE", "/_emulator/faults")

deadline = time.time() + 10
while client.get_sessions_statistics_aggregation(farmId=FARM, aggregationId=agg)["status"] == "IN_PROGRESS":
    assert time.time() < deadline, "aggregation never completed"
    time.sleep(0.02)

rows = []
paginator = client.get_paginator("get_sessions_statistics_aggregation")
for page in paginator.paginate(farmId=FARM, aggregationId=agg, PaginationConfig={"PageSize": 7}):
    assert page["status"] == "COMPLETED"
    rows.extend(page["statistics"])
assert len(rows) == 3 * 48, len(rows)
assert {r["usageType"] for r in rows} == {"COMPUTE", "LICENSE", "PERSISTENT_VOLUME"}
assert set(rows[0]["costInUsd"]) == {"sum", "min"}, rows[0]
assert rows[0]["aggregationStartTime"].year == 2026
print("botocore: ok")
