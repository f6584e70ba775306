#!/usr/bin/env python3
"""A small OTLP trace and metrics receiver for keepalive's tests, independent of the Rust
opentelemetry crates.

It accepts OTLP/gRPC (grpcio + opentelemetry-proto) and OTLP/HTTP with protobuf bodies (stdlib
http.server) and writes what it received as JSON lines to a file:

  {"type": "request", "protocol": "grpc"|"http", "spans": N, "accepted": true|false, "headers": {...}}
  {"type": "span", "protocol": ..., "resource": {...}, "scope": {...}, "trace_id": "<hex>", ...}

One "request" line per export request (including refused ones), then one "span" line per span of an
accepted request. Metrics (OTLP metrics service, HTTP path /v1/metrics) give one "metrics_request"
line per request, then one "metric" line per metric of an accepted request:

  {"type": "metrics_request", "protocol": ..., "metrics": N, "points": N, "accepted": ..., "headers": {...}}
  {"type": "metric", "protocol": ..., "resource": {...}, "scope": {...}, "name": ..., "unit": ...,
   "data": "sum"|"gauge"|..., "temporality": "CUMULATIVE"|"DELTA"|null, "monotonic": true|false|null,
   "points": [{"attributes": {...}, "value": number, "start_time_unix_nano": N, "time_unix_nano": N}]}

Every line is flushed when written, so a test can poll the file.

Fault injection: --fail-first N refuses the first N requests (gRPC status --fail-grpc-code, HTTP
status --fail-http-status) so that a test can check the exporter's retries and error handling.

TLS: --tls-cert/--tls-key serve both ports over TLS (grpc.ssl_server_credentials, an ssl-wrapped
HTTP server); --tls-client-ca additionally requires a client certificate signed by that CA (mutual
TLS). The "request" line then carries "peer_cn", the common name of the client's certificate (null
without one).

Only loopback addresses are accepted. Port 0 picks a free port; the chosen ports are written as JSON
to --ready-file once both servers listen: {"grpc": PORT, "http": PORT}.
"""

import argparse
import gzip
import ipaddress
import json
import os
import signal
import ssl
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value
    if kind == "bytes_value":
        return v.bytes_value.hex()
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attrs(v.kvlist_value.values)
    return repr(v)


def attrs(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def span_json(protocol, resource, scope, span):
    return {
        "type": "span",
        "protocol": protocol,
        "resource": resource,
        "scope": scope,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "name": span.name,
        "kind": trace_pb2.Span.SpanKind.Name(span.kind),
        "flags": span.flags,
        "start_time_unix_nano": span.start_time_unix_nano,
        "end_time_unix_nano": span.end_time_unix_nano,
        "attributes": attrs(span.attributes),
        "dropped_attributes_count": span.dropped_attributes_count,
        "events": [
            {
                "name": e.name,
                "time_unix_nano": e.time_unix_nano,
                "attributes": attrs(e.attributes),
                "dropped_attributes_count": e.dropped_attributes_count,
            }
            for e in span.events
        ],
        "dropped_events_count": span.dropped_events_count,
        "status": {
            "code": trace_pb2.Status.StatusCode.Name(span.status.code),
            "message": span.status.message,
        },
    }


def number_point(p):
    value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
    return {
        "attributes": attrs(p.attributes),
        "value": value,
        "start_time_unix_nano": p.start_time_unix_nano,
        "time_unix_nano": p.time_unix_nano,
    }


def metric_json(protocol, resource, scope, metric):
    data = metric.WhichOneof("data")
    out = {
        "type": "metric",
        "protocol": protocol,
        "resource": resource,
        "scope": scope,
        "name": metric.name,
        "unit": metric.unit,
        "description": metric.description,
        "data": data,
        "temporality": None,
        "monotonic": None,
        "points": [],
    }
    if data == "sum":
        out["temporality"] = metrics_pb2.AggregationTemporality.Name(metric.sum.aggregation_temporality)
        out["temporality"] = out["temporality"].replace("AGGREGATION_TEMPORALITY_", "")
        out["monotonic"] = metric.sum.is_monotonic
        out["points"] = [number_point(p) for p in metric.sum.data_points]
    elif data == "gauge":
        out["points"] = [number_point(p) for p in metric.gauge.data_points]
    return out


def metric_lines(protocol, headers, request, accepted):
    metrics = [m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics] \
        if request is not None else []
    points = sum(len(getattr(m, m.WhichOneof("data")).data_points) for m in metrics if m.WhichOneof("data"))
    lines = [{
        "type": "metrics_request",
        "protocol": protocol,
        "metrics": len(metrics),
        "points": points,
        "accepted": accepted,
        "headers": headers,
    }]
    if accepted and request is not None:
        for rm in request.resource_metrics:
            resource = attrs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                scope = {"name": sm.scope.name, "version": sm.scope.version}
                lines.extend(metric_json(protocol, resource, scope, m) for m in sm.metrics)
    return lines


class Sink:
    """Serialises output lines and the fault-injection counter across both servers' threads."""

    def __init__(self, path, fail_first):
        self.lock = threading.Lock()
        self.out = open(path, "a", encoding="utf-8")
        self.fail_left = fail_first

    def should_fail(self):
        with self.lock:
            if self.fail_left > 0:
                self.fail_left -= 1
                return True
            return False

    def record(self, protocol, headers, request, accepted, peer_cn=None):
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            self.write(metric_lines(protocol, headers, request, accepted))
            return
        lines = [{
            "type": "request",
            "peer_cn": peer_cn,
            "protocol": protocol,
            "spans": sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            if request is not None else 0,
            "accepted": accepted,
            "headers": headers,
        }]
        if accepted and request is not None:
            for rs in request.resource_spans:
                resource = attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    scope = {"name": ss.scope.name, "version": ss.scope.version}
                    for span in ss.spans:
                        lines.append(span_json(protocol, resource, scope, span))
        self.write(lines)

    def write(self, lines):
        with self.lock:
            for line in lines:
                self.out.write(json.dumps(line, sort_keys=True) + "\n")
            self.out.flush()

    def close(self):
        with self.lock:
            self.out.close()


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink, fail_code):
        self.sink = sink
        self.fail_code = fail_code

    def Export(self, request, context):
        headers = {k: v for k, v in context.invocation_metadata() if not k.endswith("-bin")}
        cn = context.auth_context().get("x509_common_name")
        cn = cn[0].decode() if cn else None
        if self.sink.should_fail():
            self.sink.record("grpc", headers, request, False, cn)
            context.abort(self.fail_code, "injected failure")
        self.sink.record("grpc", headers, request, True, cn)
        return trace_service_pb2.ExportTraceServiceResponse()


class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink, fail_code):
        self.sink = sink
        self.fail_code = fail_code

    def Export(self, request, context):
        headers = {k: v for k, v in context.invocation_metadata() if not k.endswith("-bin")}
        if self.sink.should_fail():
            self.sink.record("grpc", headers, request, False)
            context.abort(self.fail_code, "injected failure")
        self.sink.record("grpc", headers, request, True)
        return metrics_service_pb2.ExportMetricsServiceResponse()


# HTTP path -> (request message, response message).
HTTP_SIGNALS = {
    "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse),
    "/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest, metrics_service_pb2.ExportMetricsServiceResponse),
}


def make_http_handler(sink, fail_status):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep stderr quiet
            pass

        def reply(self, status, body=b"", content_type="application/x-protobuf"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def peer_cn(self):
            getpeercert = getattr(self.connection, "getpeercert", None)
            cert = getpeercert() if getpeercert else None
            for rdn in (cert or {}).get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        return value
            return None

        def do_POST(self):
            cn = self.peer_cn()
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.path not in HTTP_SIGNALS:
                self.reply(404, b"not found", "text/plain")
                return
            request_type, response_type = HTTP_SIGNALS[self.path]
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.headers.get("Content-Type", "") != "application/x-protobuf":
                sink.record("http", headers, request_type(), False)
                self.reply(415, b"only application/x-protobuf", "text/plain")
                return
            request = request_type()
            try:
                request.ParseFromString(body)
            except Exception:  # noqa: BLE001 - malformed body is a client error
                sink.record("http", headers, request_type(), False)
                self.reply(400, b"bad protobuf", "text/plain")
                return
            if sink.should_fail():
                sink.record("http", headers, request, False, cn)
                self.reply(fail_status, b"injected failure", "text/plain")
                return
            sink.record("http", headers, request, True, cn)
            self.reply(200, response_type().SerializeToString())

    return Handler


def loopback(hostport):
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing non-loopback address {host}")
    return host, int(port)


def tls_options(args):
    """The TLS files as bytes: (cert, key, client CA or None), or None without --tls-cert."""
    if not args.tls_cert:
        return None
    if not args.tls_key:
        raise SystemExit("--tls-cert needs --tls-key")

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    return read(args.tls_cert), read(args.tls_key), read(args.tls_client_ca) if args.tls_client_ca else None


def http_tls_context(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(args.tls_client_ca)
    return ctx


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines output file (appended to)")
    p.add_argument("--grpc", help="gRPC listen address, e.g. 127.0.0.1:0")
    p.add_argument("--http", help="HTTP listen address, e.g. 127.0.0.1:0")
    p.add_argument("--ready-file", help="write {\"grpc\": port, \"http\": port} here once listening")
    p.add_argument("--fail-first", type=int, default=0, help="refuse the first N requests")
    p.add_argument("--fail-grpc-code", default="UNAVAILABLE", help="gRPC status for refused requests")
    p.add_argument("--fail-http-status", type=int, default=503, help="HTTP status for refused requests")
    p.add_argument("--tls-cert", help="serve TLS with this PEM certificate (chain)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this PEM CA (mutual TLS)")
    args = p.parse_args()
    if not args.grpc and not args.http:
        p.error("give --grpc and/or --http")

    tls = tls_options(args)
    sink = Sink(args.out, args.fail_first)
    ports = {}
    grpc_server = None
    http_server = None
    if args.grpc:
        host, port = loopback(args.grpc)
        grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            TraceService(sink, grpc.StatusCode[args.fail_grpc_code]), grpc_server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            MetricsService(sink, grpc.StatusCode[args.fail_grpc_code]), grpc_server)
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if tls is None:
            bound = grpc_server.add_insecure_port(addr)
        else:
            cert, key, client_ca = tls
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)
            bound = grpc_server.add_secure_port(addr, creds)
        if bound == 0:
            raise SystemExit(f"cannot bind gRPC to {args.grpc}")
        grpc_server.start()
        ports["grpc"] = bound
    if args.http:
        host, port = loopback(args.http)
        http_server = ThreadingHTTPServer((host, port), make_http_handler(sink, args.fail_http_status))
        http_server.daemon_threads = True
        if tls is not None:
            # The handshake runs in the handler's thread (on first read), so a client that fails
            # it or stalls never blocks the accept loop.
            http_server.socket = http_tls_context(args).wrap_socket(
                http_server.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=http_server.serve_forever, daemon=True).start()
        ports["http"] = http_server.server_address[1]

    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(ports, f)
        os.replace(tmp, args.ready_file)
    print(json.dumps(ports), flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    if http_server is not None:
        http_server.shutdown()
    if grpc_server is not None:
        grpc_server.stop(grace=1).wait()
    sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
