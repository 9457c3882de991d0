#!/usr/bin/env python3
"""Clean-room device agent + management client for fleetgate, written from docs/protocol.md only.

A second implementation of the wire protocol, in another language, by someone who had only
docs/protocol.md (and docs/operations.md for running the binary) and no fleetgate source: the
proof that the document is enough to write a device agent or a management client from.
`tests/protocol_cleanroom.rs` runs it against the real gateway in `cargo test`. What the
document did not say when it was first written (and now does) is listed in the commit that
added this file.

Usage:
    python3 cleanroom.py --data-dir DATA [--host 127.0.0.1] [--port 8443] [--bin fleetgate]
                         [--work DIR] [--start]

Without --start the gateway must already be running (fleetgate serve --data-dir DATA --listen HOST:PORT);
with --start the script starts it itself and stops exactly that process at the end.
`main` uses the fleetgate binary only for operator steps (creating keys, issuing a
management certificate, reading the hand-out fingerprint); everything on the wire is
implemented here with ssl/socket/struct/json/hashlib/base64/os + cryptography.
Prints PASS/FAIL per step; exits 0 only when every step passed.

Single-threaded on purpose: the management client and the device agent are driven
alternately, so every step is deterministic and every read has a timeout.
"""
import base64
import hashlib
import json
import os
import socket
import ssl
import struct

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TIMEOUT = 10.0
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# --------------------------------------------------------------------------------------
# WebSocket (RFC 6455, client side)
# --------------------------------------------------------------------------------------
OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WSClosed(Exception):
    def __init__(self, code, reason):
        super().__init__("closed %s %r" % (code, reason))
        self.code, self.reason = code, reason


class WS:
    """Minimal RFC 6455 client over an already connected (TLS) socket."""

    def __init__(self, sock, host, path, subprotocol=None, timeout=TIMEOUT):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = b""
        self.closed = None
        self.log = []
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET %s HTTP/1.1" % path,
            "Host: %s" % host,
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: %s" % key,
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocol:
            lines.append("Sec-WebSocket-Protocol: %s" % subprotocol)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("EOF during upgrade; got %r" % self.buf)
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        head = head.decode("latin-1").split("\r\n")
        self.status_line = head[0]
        self.headers = {}
        for h in head[1:]:
            k, _, v = h.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        parts = self.status_line.split(" ", 2)
        self.status = int(parts[1])
        if self.status != 101:
            raise ConnectionError("upgrade refused: %s %r" % (self.status_line, self.headers))
        want = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if self.headers.get("sec-websocket-accept") != want:
            raise ConnectionError("bad Sec-WebSocket-Accept")
        self.subprotocol = self.headers.get("sec-websocket-protocol")

    # raw I/O
    def _read_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("EOF")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send_frame(self, opcode, payload, fin=True):
        b0 = (0x80 if fin else 0) | opcode
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", b0, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", b0, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", b0, 0x80 | 127, n)
        mask = os.urandom(4)
        # XOR masking via int arithmetic (fast enough for ~100 KB, no numpy)
        if n:
            m = (mask * (n // 4 + 1))[:n]
            masked = (int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
        else:
            masked = b""
        self.sock.sendall(hdr + mask + masked)

    def read_frame(self):
        b0, b1 = self._read_exact(2)
        fin, rsv, opcode = b0 & 0x80, b0 & 0x70, b0 & 0x0F
        if rsv:
            raise ConnectionError("RSV bits set by gateway")
        if b1 & 0x80:
            raise ConnectionError("gateway frame is masked (§4 says never)")
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8))[0]
        return bool(fin), opcode, self._read_exact(n)

    # messages
    def send_text(self, s):
        self.send_frame(OP_TEXT, s.encode("utf-8"))

    def send_json(self, obj):
        self.send_text(json.dumps(obj, separators=(",", ":")))

    def send_binary(self, b):
        self.send_frame(OP_BIN, b)

    def recv(self):
        """Return (opcode, payload) of the next data message; answers pings; raises WSClosed."""
        msg_op, parts = None, []
        while True:
            fin, op, payload = self.read_frame()
            if op == OP_PING:
                self.log.append(("ping", payload))
                self.send_frame(OP_PONG, payload)
                continue
            if op == OP_PONG:
                self.log.append(("pong", payload))
                continue
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode("utf-8", "replace")
                if self.closed is None:
                    try:  # echo the close (RFC 6455 §5.5.1)
                        self.send_frame(OP_CLOSE, payload[:2])
                    except OSError:
                        pass
                self.closed = (code, reason)
                raise WSClosed(code, reason)
            if op == OP_CONT:
                if msg_op is None:
                    raise ConnectionError("unexpected continuation")
                parts.append(payload)
            else:
                msg_op, parts = op, [payload]
            if fin:
                data = b"".join(parts)
                return msg_op, (data.decode("utf-8") if msg_op == OP_TEXT else data)

    def recv_json(self):
        op, data = self.recv()
        if op != OP_TEXT:
            raise ConnectionError("expected a text message, got opcode %d (%d bytes)" % (op, len(data)))
        return json.loads(data)

    def ping(self, payload=b"cleanroom"):
        self.send_frame(OP_PING, payload)

    def close(self, code=1000, reason=b""):
        try:
            if self.closed is None:
                self.send_frame(OP_CLOSE, struct.pack("!H", code) + reason)
                self.closed = ("sent", code)
                # wait for the gateway's answering close
                while True:
                    try:
                        self.recv()
                    except WSClosed as e:
                        return e.code
        except (OSError, ConnectionError):
            return None
        finally:
            try:
                self.sock.close()
            except OSError:
                pass


# --------------------------------------------------------------------------------------
# TLS helpers
# --------------------------------------------------------------------------------------
def _tls12_certificates_from_handshake(raw):
    """Parse TLS 1.2 plaintext records, return the DER certificates of the Certificate msg."""
    hs = b""
    i = 0
    while i + 5 <= len(raw):
        ctype, _ver, ln = raw[i], raw[i + 1:i + 3], struct.unpack("!H", raw[i + 3:i + 5])[0]
        body = raw[i + 5:i + 5 + ln]
        i += 5 + ln
        if ctype == 20:  # ChangeCipherSpec: everything after is encrypted
            break
        if ctype == 22:
            hs += body
    j = 0
    while j + 4 <= len(hs):
        htype = hs[j]
        hlen = int.from_bytes(hs[j + 1:j + 4], "big")
        msg = hs[j + 4:j + 4 + hlen]
        j += 4 + hlen
        if htype == 11:  # Certificate
            total = int.from_bytes(msg[0:3], "big")
            k, certs = 3, []
            while k < 3 + total:
                cl = int.from_bytes(msg[k:k + 3], "big")
                certs.append(msg[k + 3:k + 3 + cl])
                k += 3 + cl
            return certs
    return None


def fetch_chain(host, port, sni):
    """§5.2 step 1: TLS-only connection, return the server's chain (list of DER).

    Python 3.11's ssl module cannot return the peer chain, so the handshake is done with
    TLS 1.2 through a MemoryBIO and the (plaintext in TLS 1.2) Certificate message is parsed
    from the raw records.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    raw = b""
    s = socket.create_connection((host, port), timeout=TIMEOUT)
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = out.read()
                if pending:
                    s.sendall(pending)
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("EOF in handshake")
                raw += data
                inc.write(data)
        pending = out.read()
        if pending:
            s.sendall(pending)
        try:
            obj.unwrap()
            s.sendall(out.read())
        except (ssl.SSLError, OSError):
            pass
    finally:
        s.close()
    certs = _tls12_certificates_from_handshake(raw)
    if not certs:
        raise ConnectionError("no Certificate message seen")
    return certs


def fingerprint_parts(der):
    fp = hashlib.sha256(der).hexdigest().upper()
    return fp, [fp[i:i + 16] for i in range(0, 64, 16)]


def client_context(root_pem_path, certfile=None, keyfile=None):
    """A context that trusts the pinned root only (§5.2 step 4) and checks the SAN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=root_pem_path)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def tls_connect(ctx, host, port, sni):
    raw = socket.create_connection((host, port), timeout=TIMEOUT)
    return ctx.wrap_socket(raw, server_hostname=sni)


# --------------------------------------------------------------------------------------
# Relay envelope (§6.2)
# --------------------------------------------------------------------------------------
K_REQUEST, K_RESPONSE, K_EVENT = 0x01, 0x02, 0x03
K_OPEN, K_ACCEPT, K_DATA, K_CREDIT, K_CLOSE, K_RESET = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15
HDR = struct.Struct("!BBHIQ")  # kind, flags, unit length, channel, route = 16 bytes


def env_pack(kind, channel, body, unit="", route=0):
    u = unit.encode("utf-8")
    if isinstance(body, (dict, list)):
        body = json.dumps(body, separators=(",", ":")).encode("utf-8")
    return HDR.pack(kind, 0, len(u), channel, route) + u + body


def env_unpack(b):
    kind, flags, ulen, channel, route = HDR.unpack_from(b, 0)
    unit = b[16:16 + ulen].decode("utf-8")
    body = b[16 + ulen:]
    return {"kind": kind, "flags": flags, "unit": unit, "channel": channel, "route": route, "body": body}


def env_json(e):
    return json.loads(e["body"].decode("utf-8"))


# --------------------------------------------------------------------------------------
# Device agent
# --------------------------------------------------------------------------------------
class DeviceAgent:
    def __init__(self, host, port, unit_id, state_dir, sni=None):
        self.host, self.port, self.unit_id = host, port, unit_id
        self.sni = sni or host
        self.state_dir = state_dir
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.receive_dir = os.path.join(state_dir, "received")
        os.makedirs(self.receive_dir, mode=0o700, exist_ok=True)
        self.p = lambda n: os.path.join(state_dir, n)
        self.ws = None
        self.hello = None
        self.streams = {}
        self.received_files = []

    # -- §5.2
    def fingerprint_check(self, expected_fp):
        chain = fetch_chain(self.host, self.port, self.sni)
        root_der = chain[-1]
        fp, parts = fingerprint_parts(root_der)
        exp = expected_fp.replace(" ", "").replace("-", "").upper()
        if fp != exp:
            raise ValueError("fingerprint mismatch: got %s expected %s" % (fp, exp))
        root = x509.load_der_x509_certificate(root_der)
        with open(self.p("root.pem"), "wb") as f:
            f.write(root.public_bytes(serialization.Encoding.PEM))
        # step 2: normal chain validation with that root as the only anchor (+SAN check)
        s = tls_connect(client_context(self.p("root.pem")), self.host, self.port, self.sni)
        s.close()
        self.fingerprint = fp
        return fp, len(chain)

    def _write_private(self, name, data):
        path = self.p(name)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def make_csr(self):
        key = ec.generate_private_key(ec.SECP256R1())
        self._write_private("device.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        csr = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.unit_id if len(self.unit_id.encode()) <= 64
                                          else "device")])).sign(key, hashes.SHA256())  # subject is ignored (§5.3)
        return base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode()

    # -- §5.3
    def register(self, key, session=False, csr_b64=None):
        """Returns (hello, answer, close_code_or_None). Keeps self.ws open when continuing."""
        ctx = client_context(self.p("root.pem"))
        s = tls_connect(ctx, self.host, self.port, self.sni)
        ws = WS(s, "%s:%d" % (self.sni, self.port), "/usg/endpoint", subprotocol="fleetgate.v1")
        hello = ws.recv_json()
        if hello.get("type") != "hello" or hello.get("mode") != "register":
            raise ValueError("unexpected hello %r" % hello)
        if csr_b64 is None:
            csr_b64 = self.make_csr()
        self.last_csr = csr_b64
        msg = {"type": "register", "unit_id": self.unit_id, "key": key, "csr": csr_b64,
               "root": self.fingerprint}
        if session:
            msg["session"] = True
        ws.send_json(msg)
        ans = ws.recv_json()
        close_code = None
        if ans.get("type") == "registered":
            self._write_private("device.pem", ans["certificate"].encode())
            with open(self.p("device-ca.pem"), "w") as f:
                f.write(ans["device_ca"])
        if session and ans.get("type") == "registered":
            self.ws = ws
            self.hello = ws.recv_json()
            return hello, ans, None
        try:
            ws.recv()
        except WSClosed as e:
            close_code = (e.code, e.reason)
        except (ConnectionError, OSError) as e:
            close_code = ("eof", str(e))
        ws.sock.close()
        return hello, ans, close_code

    # -- §5.4
    def connect_session(self):
        ctx = client_context(self.p("root.pem"), self.p("device.pem"), self.p("device.key"))
        s = tls_connect(ctx, self.host, self.port, self.sni)
        self.ws = WS(s, "%s:%d" % (self.sni, self.port), "/usg/endpoint")
        self.hello = self.ws.recv_json()
        return self.hello

    # -- §6 relay, device side
    def send(self, kind, channel, route, body):
        self.ws.send_binary(env_pack(kind, channel, body, unit="", route=route))

    def send_event(self, body):
        self.send(K_EVENT, 0, 0, body)

    def handle_one(self):
        """Read one relay message and react. Returns the decoded envelope."""
        op, data = self.ws.recv()
        if op == OP_TEXT:
            return {"text": json.loads(data)}
        e = env_unpack(data)
        k = e["kind"]
        if k == K_REQUEST:
            req = env_json(e)
            self.send(K_RESPONSE, e["channel"], e["route"], self.dispatch(req))
        elif k == K_OPEN:
            self.on_open(e)
        elif k == K_DATA:
            self.on_data(e)
        elif k == K_CLOSE:
            self.on_close(e)
        elif k == K_RESET:
            self.streams.pop((e["route"], e["channel"]), None)
        elif k == K_CREDIT:
            pass  # the device sends no data in the streams it supports here
        elif k == K_EVENT and env_json(e).get("event") == "management_down":
            # §6.5: the management connection behind this route is gone; end its streams.
            for key in [key for key in self.streams if key[0] == e["route"]]:
                st = self.streams.pop(key)
                st["f"].close()
                os.unlink(st["tmp"])
        return e

    def dispatch(self, req):
        m = req.get("method")
        if m == "ping":
            import time
            return {"ok": True, "result": {"pong": True, "time": int(time.time())}}
        if m == "info":
            import platform
            import time
            up = 0
            try:
                with open("/proc/uptime") as f:
                    up = int(float(f.read().split()[0]))
            except OSError:
                pass
            return {"ok": True, "result": {"unit_id": self.unit_id, "agent": "fleetgate-agent/cleanroom-0.1",
                                           "hostname": socket.gethostname(), "os": platform.system(),
                                           "uptime_secs": up}}
        if m == "exec":
            return {"ok": False, "error": {"code": "not_allowed", "message": "no exec hook configured"}}
        return {"ok": False, "error": {"code": "unknown_method", "message": "unknown method %r" % m}}

    # file streams (§6.6)
    def on_open(self, e):
        o = env_json(e)
        key = (e["route"], e["channel"])
        if o.get("kind") != "file":
            self.send(K_RESET, e["channel"], e["route"],
                      {"error": {"code": "stream_refused", "message": "only file streams here"}})
            return
        name = o.get("path", "")
        dest = os.path.realpath(os.path.join(self.receive_dir, name))
        if not name or not dest.startswith(os.path.realpath(self.receive_dir) + os.sep):
            self.send(K_RESET, e["channel"], e["route"],
                      {"error": {"code": "not_allowed", "message": "path outside the receive directory"}})
            return
        window = 32 * 1024  # small on purpose, so ~100 KB needs several credits
        tmp = dest + ".part"
        st = {"open": o, "dest": dest, "tmp": tmp, "f": open(tmp, "wb"), "h": hashlib.sha256(),
              "size": 0, "window": window, "unacked": 0, "credits_sent": 0, "max_inflight": 0,
              "inflight": 0}
        self.streams[key] = st
        self.send(K_ACCEPT, e["channel"], e["route"], {"window": window})

    def on_data(self, e):
        st = self.streams.get((e["route"], e["channel"]))
        if st is None:
            return
        b = e["body"]
        st["inflight"] += len(b)
        st["max_inflight"] = max(st["max_inflight"], st["inflight"])
        st["f"].write(b)
        st["h"].update(b)
        st["size"] += len(b)
        st["unacked"] += len(b)
        if st["unacked"] >= st["window"] // 2:  # grant when half the window is consumed
            n = st["unacked"]
            st["unacked"] = 0
            st["inflight"] -= n
            st["credits_sent"] += 1
            self.send(K_CREDIT, e["channel"], e["route"], struct.pack("!I", n))

    def on_close(self, e):
        key = (e["route"], e["channel"])
        st = self.streams.pop(key, None)
        if st is None:
            return
        f = st["f"]
        f.flush()
        os.fsync(f.fileno())
        f.close()
        o = st["open"]
        digest = st["h"].hexdigest()
        if st["size"] != o.get("size") or digest != str(o.get("sha256", "")).lower():
            os.unlink(st["tmp"])
            self.send(K_RESET, e["channel"], e["route"],
                      {"error": {"code": "checksum_mismatch", "message": "size/sha256 differ"}})
            return
        os.replace(st["tmp"], st["dest"])
        self.received_files.append((st["dest"], st["size"], digest, st["credits_sent"], st["max_inflight"]))
        self.send(K_CLOSE, e["channel"], e["route"], {"ok": True, "size": st["size"], "sha256": digest})


# --------------------------------------------------------------------------------------
# Management client
# --------------------------------------------------------------------------------------
class Management:
    def __init__(self, host, port, cert, key, root, sni=None):
        self.host, self.port = host, port
        self.sni = sni or host
        ctx = client_context(root, cert, key)
        s = tls_connect(ctx, host, port, self.sni)
        self.ws = WS(s, "%s:%d" % (self.sni, port), "/usg/management")
        self.hello = self.ws.recv_json()
        self.next_id = 1
        self.events = []
        self.backlog = []

    def send(self, kind, channel, unit, body):
        self.ws.send_binary(env_pack(kind, channel, body, unit=unit, route=0))

    def recv_env(self):
        while True:
            op, data = self.ws.recv()
            if op == OP_BIN:
                e = env_unpack(data)
                if e["kind"] == K_EVENT:
                    self.events.append((e["unit"], env_json(e), e))
                return e
            # text other than hello: ignored per §6.1

    def request(self, unit, method, params=None, pump=None):
        """Send a request; `pump` is called between reads (drives the device side)."""
        cid = self.next_id
        self.next_id += 1
        self.send(K_REQUEST, cid, unit, {"method": method, "params": params or {}})
        if pump:
            pump()
        while True:
            e = self.recv_env()
            if e["kind"] == K_RESPONSE and e["channel"] == cid:
                return e, env_json(e)
            if e["kind"] != K_EVENT:
                self.backlog.append(e)

    def wait_kind(self, kinds, channel=None):
        for i, e in enumerate(self.backlog):
            if e["kind"] in kinds and (channel is None or e["channel"] == channel):
                return self.backlog.pop(i)
        while True:
            e = self.recv_env()
            if e["kind"] in kinds and (channel is None or e["channel"] == channel):
                return e
            if e["kind"] != K_EVENT:
                self.backlog.append(e)

    def push_file(self, unit, name, data, device, window=64 * 1024, piece=16 * 1024):
        """§6.6 file stream, credit-based; `device` is driven in between (single thread)."""
        sid = self.next_id
        self.next_id += 1
        self.send(K_OPEN, sid, unit, {"kind": "file", "window": window, "path": name, "size": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()})
        device.handle_one()  # open -> accept (or reset)
        e = self.wait_kind((K_ACCEPT, K_RESET), sid)
        if e["kind"] == K_RESET:
            return False, "reset %r" % env_json(e)
        credit = env_json(e)["window"]
        sent, pieces, credits_got, waits = 0, 0, 0, 0
        while sent < len(data):
            if credit <= 0:
                # out of credit: the device must consume and grant; drive it, then wait for credit
                waits += 1
                e = self.wait_kind((K_CREDIT, K_RESET), sid)
                if e["kind"] == K_RESET:
                    return False, "reset %r" % env_json(e)
                credit += struct.unpack("!I", e["body"])[0]
                credits_got += 1
                continue
            n = min(piece, credit, len(data) - sent)
            self.send(K_DATA, sid, unit, data[sent:sent + n])
            device.handle_one()
            sent += n
            credit -= n
            pieces += 1
        self.send(K_CLOSE, sid, unit, {"ok": True})
        device.handle_one()
        e = self.wait_kind((K_CLOSE, K_RESET), sid)
        # drain credits the device may still have sent for this stream
        self.backlog = [b for b in self.backlog if not (b["channel"] == sid and b["kind"] == K_CREDIT)]
        body = env_json(e)
        return e["kind"] == K_CLOSE and body.get("ok") is True, {
            "close": body, "pieces": pieces, "credits_received": credits_got, "credit_waits": waits}


# --------------------------------------------------------------------------------------
# Scenario
# --------------------------------------------------------------------------------------
def main():
    import argparse
    import subprocess
    import time

    ap = argparse.ArgumentParser()
    here = None
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8443)
    ap.add_argument("--data-dir", required=True, help="the gateway's data directory")
    ap.add_argument("--bin", default="fleetgate", help="the fleetgate binary (operator steps only)")
    ap.add_argument("--work", default=None, help="where the device and management files go (default: a new temporary directory)")
    ap.add_argument("--start", action="store_true",
                    help="start `fleetgate serve` on --data-dir/--port first, and stop exactly that process at the end")
    args = ap.parse_args()
    if args.work is None:
        import tempfile
        args.work = tempfile.mkdtemp(prefix="cleanroom-")

    gw = None
    if args.start:
        os.makedirs(args.work, mode=0o700, exist_ok=True)
        logf = open(os.path.join(args.work, "gateway.log"), "ab")
        gw = subprocess.Popen([args.bin, "serve", "--data-dir", args.data_dir, "--listen",
                               "%s:%d" % (args.host, args.port), "--shards", "1"], stdout=logf, stderr=logf)
        for _ in range(100):
            try:
                socket.create_connection((args.host, args.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
    try:
        return _scenario(args, here, subprocess, time)
    finally:
        if gw is not None:
            gw.terminate()  # only the PID we started
            try:
                gw.wait(timeout=15)
            except subprocess.TimeoutExpired:
                gw.kill()


def _scenario(args, here, subprocess, time):
    results = []

    def step(name, ok, detail=""):
        results.append((name, ok))
        print("%-4s %s%s" % ("PASS" if ok else "FAIL", name, ("  -- " + str(detail)) if detail else ""), flush=True)
        return ok

    def fg(*a):
        r = subprocess.run([args.bin, "--data-dir", args.data_dir] + list(a), capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            raise RuntimeError("fleetgate %s: %s" % (" ".join(a), r.stderr.strip()))
        return r.stdout

    run_id = "%x" % int(time.time())
    work = os.path.join(args.work, run_id)
    os.makedirs(work, mode=0o700, exist_ok=True)
    H, P = args.host, args.port

    # operator steps: keys, hand-out fingerprint, management certificate
    keys = fg("keys", "create", "--one-time", "2").split()
    handout = fg("keys", "export", keys[0], "--format", "text")
    parts = [ln.split(":", 1)[1].strip() for ln in handout.splitlines() if ln.startswith("Fingerprint Part")]
    expected_fp = "".join(parts)
    mname = "cleanroom-" + run_id
    fg("mgmt", "add", mname, "--out", os.path.join(work, "mgmt"))
    mdir = os.path.join(work, "mgmt")

    # 0. HTTP check-status
    try:
        ctx = ssl.create_default_context(cafile=os.path.join(mdir, "gateway-root.pem"))
        s = tls_connect(ctx, H, P, H)
        s.sendall(b"GET /usg/check-status HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % H.encode())
        resp = b""
        while True:
            c = s.recv(4096)
            if not c:
                break
            resp += c
        s.close()
        body = resp.split(b"\r\n\r\n", 1)[1]
        st = json.loads(body)
        step("http check-status", resp.startswith(b"HTTP/1.1 200") and st.get("status") in ("ok", "warn", "err", "init"),
             body.decode())
    except Exception as ex:
        step("http check-status", False, repr(ex))

    # 1. management connects first (so it sees the device's events)
    mg = None
    try:
        mg = Management(H, P, os.path.join(mdir, mname + ".pem"), os.path.join(mdir, mname + ".key"),
                        os.path.join(mdir, "gateway-root.pem"))
        h = mg.hello
        step("management connect + hello", h.get("type") == "hello" and h.get("mode") == "management"
             and h.get("name") == mname and h.get("protocol") == 1, h)
    except Exception as ex:
        step("management connect + hello", False, repr(ex))

    if mg:
        try:
            e, r = mg.request("", "status")
            step("gateway method status", r.get("ok") is True and e["unit"] == "", r)
        except Exception as ex:
            step("gateway method status", False, repr(ex))

    # 2. device: fingerprint check, register (close mode), reconnect in session mode
    unit = "CLEANROOM-" + run_id.upper()
    dev = DeviceAgent(H, P, unit, os.path.join(work, "device"))
    try:
        fp, nchain = dev.fingerprint_check(expected_fp)
        step("device fingerprint check (§5.2)", True, "root %s… (chain of %d)" % (fp[:16], nchain))
    except Exception as ex:
        step("device fingerprint check (§5.2)", False, repr(ex))
        return finish(results)

    try:
        hello, ans, close = dev.register(keys[0])
        ok = (hello.get("mode") == "register" and ans.get("type") == "registered" and ans.get("reason") == "granted"
              and ans.get("unit_id") == unit)
        cert = x509.load_pem_x509_certificate(ans["certificate"].encode())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        mode = oct(os.stat(dev.p("device.pem")).st_mode & 0o777)
        step("device register (one-time key)", ok and cn == unit, "hello=%s; cn=%s; close=%s; cert file %s" % (
            hello, cn, close, mode))
        step("registration closes with 1000", close is not None and close[0] == 1000, close)
    except Exception as ex:
        step("device register (one-time key)", False, repr(ex))
        return finish(results)

    try:
        h = dev.connect_session()
        step("device session (mutual TLS) + hello", h.get("type") == "hello" and h.get("mode") == "session"
             and h.get("unit_id") == unit, h)
    except Exception as ex:
        step("device session (mutual TLS) + hello", False, repr(ex))
        return finish(results)

    if not mg:
        return finish(results)

    # 3. management: events, devices.list, ping, info, unknown method, device event
    try:
        # events device_registered / device_up should be waiting; collect with a short poll
        mg.ws.sock.settimeout(2)
        try:
            while True:
                mg.recv_env()
        except (socket.timeout, TimeoutError):
            pass
        mg.ws.sock.settimeout(TIMEOUT)
        evs = [(u, b.get("event")) for (u, b, _e) in mg.events]
        step("events device_registered + device_up", (unit, "device_registered") in evs and (unit, "device_up") in evs,
             [(u, b) for (u, b, _e) in mg.events])
    except Exception as ex:
        step("events device_registered + device_up", False, repr(ex))

    try:
        e, r = mg.request("", "devices.list")
        devs = r.get("result", {}).get("devices", [])
        mine = [d for d in devs if d.get("unit_id") == unit]
        step("devices.list shows the device", r.get("ok") is True and bool(mine), mine)
    except Exception as ex:
        step("devices.list shows the device", False, repr(ex))

    try:
        e, r = mg.request(unit, "ping", pump=dev.handle_one)
        step("ping device via relay", r.get("ok") is True and r["result"].get("pong") is True and e["unit"] == unit
             and e["route"] == 0, r)
    except Exception as ex:
        step("ping device via relay", False, repr(ex))

    try:
        e, r = mg.request(unit, "info", pump=dev.handle_one)
        step("info device via relay", r.get("ok") is True and r["result"].get("unit_id") == unit, r)
    except Exception as ex:
        step("info device via relay", False, repr(ex))

    try:
        e, r = mg.request(unit, "no.such.method", pump=dev.handle_one)
        step("unknown method -> unknown_method", r.get("ok") is False and r["error"]["code"] == "unknown_method", r)
    except Exception as ex:
        step("unknown method -> unknown_method", False, repr(ex))

    try:
        e, r = mg.request("NO-SUCH-UNIT", "ping")
        step("offline unit -> device_offline", r.get("ok") is False and r["error"]["code"] == "device_offline"
             and e["unit"] == "NO-SUCH-UNIT", r)
    except Exception as ex:
        step("offline unit -> device_offline", False, repr(ex))

    try:
        n0 = len(mg.events)
        dev.send_event({"event": "cleanroom_hello", "n": 1})
        while len(mg.events) == n0:
            mg.recv_env()
        u, b, _ = mg.events[-1]
        step("device event reaches management", u == unit and b.get("event") == "cleanroom_hello", (u, b))
    except Exception as ex:
        step("device event reaches management", False, repr(ex))

    # 4. file push with credit-based flow control
    try:
        data = os.urandom(100 * 1024 + 123)
        ok, info = mg.push_file(unit, "push.bin", data, dev, window=64 * 1024)
        got = dev.received_files[-1] if dev.received_files else None
        ok2 = False
        if got:
            with open(got[0], "rb") as f:
                ok2 = f.read() == data
            info["device_credits_sent"], info["device_max_inflight"] = got[3], got[4]
        step("file push ~100 KB (credit flow control)", ok and ok2 and got[4] <= 32 * 1024, info)
    except Exception as ex:
        step("file push ~100 KB (credit flow control)", False, repr(ex))

    try:
        ok, info = mg.push_file(unit, "../escape.bin", b"x" * 10, dev)
        step("file push outside dir -> reset not_allowed", (not ok) and "not_allowed" in str(info), info)
    except Exception as ex:
        step("file push outside dir -> reset not_allowed", False, repr(ex))

    # 5. ping from device (WebSocket control frame)
    try:
        dev.ws.ping(b"cleanroom")
        fin, op, payload = dev.ws.read_frame()  # nothing else is pending on this link now
        step("device ping -> pong same payload", op == OP_PONG and payload == b"cleanroom", (op, payload))
    except Exception as ex:
        step("device ping -> pong same payload", False, repr(ex))

    # 5b. a second management connection opens a stream, then disconnects: the device gets
    # management_down on that connection's route (§6.5) and ends the stream.
    try:
        mg2 = Management(H, P, os.path.join(mdir, mname + ".pem"), os.path.join(mdir, mname + ".key"),
                         os.path.join(mdir, "gateway-root.pem"))
        sid = 77
        mg2.send(K_OPEN, sid, unit, {"kind": "file", "window": 65536, "path": "half.bin", "size": 10,
                                     "sha256": "0" * 64})
        opened = dev.handle_one()
        accept = mg2.wait_kind((K_ACCEPT, K_RESET), sid)
        route = opened["route"]
        ok = opened["kind"] == K_OPEN and accept["kind"] == K_ACCEPT and (route, sid) in dev.streams
        mg2.ws.sock.close()
        e = dev.handle_one()
        body = env_json(e) if e.get("kind") == K_EVENT else e
        ok = ok and e.get("kind") == K_EVENT and e["channel"] == 0 and e["route"] == route \
            and body.get("event") == "management_down" and (route, sid) not in dev.streams
        step("management_down when a management connection with a stream goes", ok, body)
    except Exception as ex:
        step("management_down when a management connection with a stream goes", False, repr(ex))

    # 6. register with "session": true on the same connection (second unit, second key)
    unit2 = unit + "-S"
    dev2 = DeviceAgent(H, P, unit2, os.path.join(work, "device2"))
    try:
        dev2.fingerprint_check(expected_fp)
        hello, ans, close = dev2.register(keys[1], session=True)
        h = dev2.hello
        ok = ans.get("type") == "registered" and h.get("mode") == "session" and h.get("unit_id") == unit2
        step("register with session:true continues as session", ok, "registered+%s" % h)
        e, r = mg.request(unit2, "ping", pump=dev2.handle_one)
        step("ping the continued session", r.get("ok") is True, r)
        dev2.ws.close()
    except Exception as ex:
        step("register with session:true continues as session", False, repr(ex))

    # 7. reuse of the spent key by another unit -> key_used
    try:
        dev3 = DeviceAgent(H, P, unit + "-X", os.path.join(work, "device3"))
        dev3.fingerprint_check(expected_fp)
        hello, ans, close = dev3.register(keys[0])
        step("spent one-time key -> refused key_used, close 1008",
             ans.get("type") == "refused" and ans.get("reason") == "key_used" and close and close[0] == 1008,
             (ans, close))
    except Exception as ex:
        step("spent one-time key -> refused key_used, close 1008", False, repr(ex))

    # 8. clean close of the device session; device_down reaches management
    try:
        code = dev.ws.close(1000)
        step("device close handshake echoes 1000", code == 1000, code)
        n0 = len(mg.events)
        while not any(b.get("event") == "device_down" and u == unit for (u, b, _e) in mg.events[n0:]):
            mg.recv_env()
        step("device_down event", True)
    except Exception as ex:
        step("device close / device_down", False, repr(ex))

    try:
        e, r = mg.request(unit, "ping")
        step("ping after device left -> device_offline", r.get("ok") is False and r["error"]["code"] == "device_offline", r)
    except Exception as ex:
        step("ping after device left -> device_offline", False, repr(ex))

    try:
        code = mg.ws.close(1000)
        step("management close handshake", code == 1000, code)
    except Exception as ex:
        step("management close handshake", False, repr(ex))

    return finish(results)


def finish(results):
    npass = sum(1 for _, ok in results if ok)
    print("\n%d/%d steps passed" % (npass, len(results)))
    return 0 if npass == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
