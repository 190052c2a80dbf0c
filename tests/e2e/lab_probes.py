"""Commands and probes inside a namespace: the runner LibvirtLab and OutsideClient share,
ProbeResult, and the outside client itself."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from lab_common import LabError, lab_env

# Runs inside a namespace (``python3 -c``): one TCP or UDP exchange, JSON on stdout.
_PROBE_CODE = r"""
import errno, json, socket, sys, time
proto, host, port, timeout, payload, read_idle, src = sys.argv[1:8]
port = int(port); timeout = float(timeout); read_idle = float(read_idle)
payload = bytes.fromhex(payload)
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
out = {"status": "error", "data": "", "detail": ""}
def classify(e):
    if isinstance(e, ConnectionRefusedError): return "refused"
    if isinstance(e, (socket.timeout, TimeoutError)): return "timeout"
    if getattr(e, "errno", None) in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM): return "unreachable"
    if isinstance(e, ConnectionResetError): return "reset"
    return "error"
s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
data = b""
try:
    if src:
        s.bind((src, 0))
    s.settimeout(timeout)
    if proto == "tcp":
        s.connect((host, port))
        out["status"] = "ok"
        if payload:
            s.sendall(payload)
        deadline = time.monotonic() + timeout
        s.settimeout(read_idle)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
    else:
        s.connect((host, port))
        s.send(payload)
        data = s.recv(65536)
        out["status"] = "ok"
except Exception as e:
    if out["status"] != "ok":
        out["status"] = classify(e)
    out["detail"] = f"{type(e).__name__}: {e}"
finally:
    s.close()
out["data"] = data.hex()
print(json.dumps(out))
"""


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe: status is ok, refused, timeout, unreachable, reset or error."""

    status: str
    data: bytes = b""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


class NsRunner:
    """Runs commands with a fixed argv prefix that enters some namespaces."""

    def _prefix(self) -> list[str]:
        raise NotImplementedError

    def exec_in_ns(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run(argv) inside the namespace; kwargs go to subprocess.run (no check by default)."""
        kwargs.setdefault("env", lab_env())
        return subprocess.run([*self._prefix(), *argv], **kwargs)

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = 120,
            input: str | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside the namespace, capture text output; raise LabError on failure if check.

        env defaults to this process's environment with PATH including the sbin dirs.
        """
        r = subprocess.run([*self._prefix(), *argv], input=input, text=True, timeout=timeout,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=dict(env) if env is not None else lab_env(), check=False)
        if check and r.returncode != 0:
            raise LabError(f"{' '.join(argv)} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("env", lab_env())
        return subprocess.Popen([*self._prefix(), *argv], **kwargs)

    def _probe(self, proto: str, host: str, port: int, payload: bytes, timeout: float,
               read_idle: float, source: str | None) -> ProbeResult:
        r = self.run([sys.executable, "-c", _PROBE_CODE, proto, host, str(port), str(timeout),
                      payload.hex(), str(read_idle), source or ""], check=False, timeout=timeout * 3 + 10)
        try:
            d = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return ProbeResult("error", b"", f"probe crashed: rc={r.returncode} {r.stderr.strip()}")
        return ProbeResult(str(d["status"]), bytes.fromhex(d["data"]), str(d["detail"]))

    def probe_tcp(self, host: str, port: int, payload: bytes = b"", *, timeout: float = 3.0,
                  read_idle: float = 0.5, source: str | None = None) -> ProbeResult:
        """Connect to host:port, send payload, read until EOF/idle.  ok means the connection was made."""
        return self._probe("tcp", host, port, payload, timeout, read_idle, source)

    def probe_udp(self, host: str, port: int, payload: bytes = b"ping", *, timeout: float = 3.0,
                  source: str | None = None) -> ProbeResult:
        """Send one datagram and wait for one answer; ok means an answer came."""
        return self._probe("udp", host, port, payload, timeout, 0.0, source)

    def http_get(self, host: str, port: int = 80, path: str = "/", *, timeout: float = 5.0) -> str:
        """GET over plain HTTP/1.0; returns the body.  Raises LabError unless the reply is 200."""
        hosthdr = f"[{host}]" if ":" in host else host
        req = f"GET {path} HTTP/1.0\r\nHost: {hosthdr}\r\nConnection: close\r\n\r\n".encode()
        r = self.probe_tcp(host, port, req, timeout=timeout, read_idle=timeout)
        if not r.ok:
            raise LabError(f"http://{hosthdr}:{port}{path}: {r.status} {r.detail}")
        head, _, body = r.text.partition("\r\n\r\n")
        if " 200 " not in head.split("\r\n", 1)[0] + " ":
            raise LabError(f"http://{hosthdr}:{port}{path}: unexpected reply {head[:200]!r}")
        return body


@dataclass
class OutsideClient(NsRunner):
    """A namespace on the 'Internet' side of the lab host, linked by a veth pair."""

    ns: str
    lab_if: str
    client_if: str
    lab_addr: str  # with prefix, e.g. 198.51.100.1/24
    client_addr: str
    lab_addr6: str | None = None
    client_addr6: str | None = None

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    @property
    def lab_ip(self) -> str:
        """The lab host's 'public' address as seen from this client (no prefix)."""
        return self.lab_addr.split("/")[0]

    @property
    def client_ip(self) -> str:
        return self.client_addr.split("/")[0]

    @property
    def lab_ip6(self) -> str | None:
        return self.lab_addr6.split("/")[0] if self.lab_addr6 else None
