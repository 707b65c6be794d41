"""botocore against the emulator's STS, SigV4 checks and ListFarms, an independent client on both sides:
its `sts` client reads the emulator's AssumeRole answer (and its error shapes), its `deadline`
client signs with the assumed credentials and the emulator verifies the signature; a wrong
secret, an expired or foreign token, or a region the emulator does not answer for is refused as
AWS refuses it. Run by tests/emulator_sts.rs with the emulator's URL (region us-west-2,
--sts-external-id expected-id) as argv[1]."""

import sys

import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError

endpoint = sys.argv[1]
ROLE = "arn:aws:iam::123456789012:role/render/stats-reader"
FARM = "farm-" + "0" * 31 + "c"
QUEUE = "queue-" + "0" * 31 + "1"
CONFIG = Config(inject_host_prefix=False, parameter_validation=False, retries={"max_attempts": 1, "mode": "standard"})
session = botocore.session.get_session()


def client(service, region="us-west-2", key="AKIDBASE", secret="base-secret", token=None):
    return session.create_client(
        service,
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=CONFIG,
    )


def error_of(call, **kwargs):
    try:
        call(**kwargs)
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    raise AssertionError(f"{call.__name__} succeeded")


sts = client("sts")
creds = sts.assume_role(RoleArn=ROLE, RoleSessionName="dsg-check", ExternalId="expected-id")["Credentials"]
assert creds["AccessKeyId"].startswith("ASIA"), creds
assert creds["Expiration"].tzinfo is not None, creds
user = sts.assume_role(RoleArn=ROLE, RoleSessionName="dsg-check", ExternalId="expected-id")["AssumedRoleUser"]
assert user["Arn"] == "arn:aws:sts::123456789012:assumed-role/stats-reader/dsg-check", user
assert error_of(sts.assume_role, RoleArn="arn:aws:iam::12:role/x", RoleSessionName="s1", ExternalId="expected-id") == ("ValidationError", 400)
assert error_of(sts.assume_role, RoleArn=ROLE, RoleSessionName="s1", ExternalId="wrong") == ("AccessDenied", 403)
assert error_of(sts.assume_role, RoleArn=ROLE, RoleSessionName="s1") == ("AccessDenied", 403)

start = dict(
    farmId=FARM,
    resourceIds={"queueIds": [QUEUE]},
    startTime="2026-10-01T00:00:00Z",
    endTime="2026-10-02T00:00:00Z",
    period="DAILY",
    groupBy=["QUEUE_ID"],
    statistics=["SUM"],
)
key, secret, token = creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]
deadline = client("deadline", key=key, secret=secret, token=token)
aggregation = deadline.start_sessions_statistics_aggregation(**start)["aggregationId"]
page = deadline.get_sessions_statistics_aggregation(farmId=FARM, aggregationId=aggregation, maxResults=5)
assert page["status"] in ("IN_PROGRESS", "COMPLETED"), page
listed = [f for p in deadline.get_paginator("list_farms").paginate(PaginationConfig={"PageSize": 1}) for f in p["farms"]]
assert [f["farmId"] for f in listed] == [FARM], listed
assert listed[0]["createdAt"].year == 2026, listed

assert error_of(client("deadline", key=key, secret="not-" + secret, token=token).start_sessions_statistics_aggregation, **start) == ("InvalidSignatureException", 403)
assert error_of(client("deadline", region="eu-west-1", key=key, secret=secret, token=token).start_sessions_statistics_aggregation, **start) == ("InvalidSignatureException", 403)
assert error_of(client("deadline", region="eu-west-1").start_sessions_statistics_aggregation, **start) == ("InvalidSignatureException", 403)
forged = token.rsplit(".", 1)[0] + "." + "0" * 64
assert error_of(client("deadline", key=key, secret=secret, token=forged).get_sessions_statistics_aggregation, farmId=FARM, aggregationId=aggregation) == ("UnrecognizedClientException", 403)
print("ok")
