"""grpcio, the reference Python client, with its default limits, calls the gateway.

argv: the gateway's host:port; stdin: one case a line, "method hex-encoded-request expected-code".
Each call must fail with exactly that code (never RESOURCE_EXHAUSTED from
grpcio's own metadata limit), a message under 1 KiB and status details under 8 KiB.
"""
import sys

import grpc

target = sys.argv[1]
cases = [line.split() for line in sys.stdin if line.strip()]
channel = grpc.insecure_channel(target)
failures = []
for method, request_hex, expected in cases:
    call = channel.unary_unary(f"/deadline.stats.v1.AggregationService/{method}")
    try:
        call(bytes.fromhex(request_hex), timeout=10)
        failures.append(f"{method}: succeeded, expected {expected}")
        continue
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""
        trailers = dict(err.trailing_metadata() or ())
    status_details = trailers.get("grpc-status-details-bin", b"")
    if code != expected:
        failures.append(f"{method}: {code} ({details[:200]}), expected {expected}")
    elif len(details) >= 1024 or len(status_details) >= 8192:
        failures.append(f"{method}: message of {len(details)} chars, details of {len(status_details)} bytes")
    else:
        print(f"{method}: {code}, message of {len(details)} chars, details of {len(status_details)} bytes")
if failures:
    sys.exit("\n".join(failures))
