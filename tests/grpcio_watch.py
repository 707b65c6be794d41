"""grpcio, the reference Python client, follows a WatchAggregation stream.

argv: the gateway's host:port and the hex-encoded WatchAggregationRequest. Prints each message
received, hex-encoded, one a line; exits non-zero unless the stream ends with status OK.
"""
import sys

import grpc

channel = grpc.insecure_channel(sys.argv[1])
watch = channel.unary_stream("/deadline.stats.v1.AggregationService/WatchAggregation")
call = watch(bytes.fromhex(sys.argv[2]), timeout=60)
for message in call:
    print(message.hex(), flush=True)
if call.code() != grpc.StatusCode.OK:
    sys.exit(f"the stream ended {call.code().name}: {call.details()}")
