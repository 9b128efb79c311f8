"""A gRPC client for Ferry's tests: unary calls to `/ferry.test.Who/Call`.

The target is an `xds:///name` target, resolved through the xDS server
named by GRPC_XDS_BOOTSTRAP (proxyless gRPC), or a plain `host:port` (a
proxy in front of the service; --authority names the service).

Each call's outcome goes to stdout as one line, flushed as it happens:

    <unix ms> ok <label>            the backend that answered
    <unix ms> err <CODE> <details>  a failed call

then `done <ok> <failed>` once the run ends. The request and response
are `google.protobuf.StringValue`, written and read by hand so no
generated code is needed: the response's value is the backend's label.

    client.py --target xds:///checkout.shop:8080 --calls 1000
    client.py --target xds:///checkout.shop:8080 --duration 30 --interval 0.01
"""

import argparse
import sys
import time

import grpc

METHOD = "/ferry.test.Who/Call"


def encode_string_value(value: str) -> bytes:
    data = value.encode()
    if not data:
        return b""
    if len(data) > 127:
        raise ValueError("a request value longer than 127 bytes")
    return b"\x0a" + bytes([len(data)]) + data


def decode_string_value(data: bytes) -> str:
    """The `value` (field 1) of an encoded StringValue; "" when absent."""
    if not data:
        return ""
    if data[0] != 0x0A:
        raise ValueError(f"unexpected response bytes {data[:8]!r}")
    length, shift, i = 0, 0, 1
    while True:
        byte = data[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            break
        shift += 7
    return data[i : i + length].decode()


def now_ms() -> int:
    return int(time.time() * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--authority", help="the :authority for a host:port target")
    parser.add_argument("--calls", type=int, help="make this many calls, then stop")
    parser.add_argument("--duration", type=float, help="call for this many seconds")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between calls")
    parser.add_argument("--timeout", type=float, default=5.0, help="each call's deadline")
    parser.add_argument(
        "--ready-timeout", type=float, default=30.0, help="how long to wait for the channel"
    )
    parser.add_argument("--header", action="append", default=[], help="name=value metadata")
    args = parser.parse_args()
    if (args.calls is None) == (args.duration is None):
        parser.error("give exactly one of --calls and --duration")

    options = []
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    metadata = []
    for header in args.header:
        name, _, value = header.partition("=")
        metadata.append((name.lower(), value))

    channel = grpc.insecure_channel(args.target, options=options)
    call = channel.unary_unary(METHOD)
    # The first call waits for the channel (the xDS config, a connection)
    # up to --ready-timeout; the others fail fast, as most clients do.
    # Waiting on the channel's state instead would not do: ring hash
    # connects only when a call picks an endpoint.
    first = True
    ok = failed = made = 0
    deadline = time.monotonic() + args.duration if args.duration is not None else None
    while True:
        if args.calls is not None and made >= args.calls:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        made += 1
        try:
            response = call(
                encode_string_value(""),
                timeout=args.ready_timeout if first else args.timeout,
                metadata=metadata or None,
                wait_for_ready=first,
            )
            label = decode_string_value(response)
            ok += 1
            print(f"{now_ms()} ok {label}", flush=True)
        except grpc.RpcError as e:
            failed += 1
            details = (e.details() or "").replace("\n", " ")
            print(f"{now_ms()} err {e.code().name} {details}", flush=True)
        first = False
        if args.interval > 0:
            time.sleep(args.interval)
    print(f"done {ok} {failed}", flush=True)
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
