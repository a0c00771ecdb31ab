"""Public internet addresses only: the check, and an HTTP proxy that applies it to every connection.

    public_address("169.254.169.254")         # False: link-local (a cloud's metadata service)
    with AddressProxy(allow) as proxy:        # yt-dlp's {"proxy": proxy.url}
        ...                                   # proxy.refused: whether any hop was refused

A page that others can reach (the studio on 0.0.0.0, or shared) fetches what its visitors name; it
must not become their way into the server's own network. Checking the URL's host once is not
enough: a page redirects, an extractor follows links it finds, and a name can resolve to one
address when checked and another when used. So the fetcher's every connection goes through
`AddressProxy`, which resolves each host itself, checks every address the name gives, and connects
to an address it checked. A refused connection is answered alike whatever is behind it, so a
visitor learns nothing about the ports of a refused address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

NAT64 = ipaddress.ip_network("64:ff9b::/96")
V4_COMPATIBLE = ipaddress.ip_network("::/96")  # the deprecated ::a.b.c.d form
MAX_HEAD = 64 * 1024  # a request's line and headers


def public_address(address: str, port: int | None = None) -> bool:
    """True for a globally reachable unicast address; False for loopback, private, link-local
    (169.254.169.254 included), shared, reserved, unspecified (0.0.0.0, ::), multicast and
    documentation addresses, and for IPv6 addresses that carry one of those (IPv4-mapped,
    IPv4-compatible, 6to4, NAT64). The port does not matter; it is there to fit `allow`."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is not part of it
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and (ip in NAT64 or ip in V4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not public_address(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[tuple]:
    """getaddrinfo's stream addresses for host:port ([] if the name does not resolve)."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []


def allowed_host(host: str, port: int, allow: Callable[[str, int], bool]) -> bool | None:
    """Whether every address `host` resolves to is allowed (None: it does not resolve)."""
    infos = resolve(host, port)
    return all(allow(info[4][0], port) for info in infos) if infos else None


class AddressProxy:
    """An HTTP proxy on 127.0.0.1 (an ephemeral port) for one fetch, which connects only to addresses
    `allow(address, port)` accepts: CONNECT for https, absolute-form requests for http. `refused`
    says whether it turned any connection away; `close()` ends it and every connection through it."""

    def __init__(self, allow: Callable[[str, int], bool] = public_address, timeout: float = 30.0):
        self.allow, self.timeout = allow, timeout
        self.refused = False
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads, self._server.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="s4music-address-proxy", daemon=True)
        self._thread.start()

    def __enter__(self) -> AddressProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        with self._lock:
            for s in list(self._sockets):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()
        self._server.server_close()

    # ------------------------------------------------------------------ one client connection
    def _handle(self, client: socket.socket) -> None:
        client.settimeout(self.timeout)
        self._track(client)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                part = client.recv(MAX_HEAD)
                if not part:
                    return
                head += part
                if len(head) > MAX_HEAD:
                    return self._reply(client, 431, "Request Header Fields Too Large")
            head, _, rest = head.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            try:
                method, target, version = lines[0].decode("latin-1").split(" ", 2)
            except ValueError:
                return self._reply(client, 400, "Bad Request")
            if method == "CONNECT":  # https: a tunnel, once the host is allowed
                host, _, port = target.rpartition(":")
                if not host or not port.isdigit():
                    return self._reply(client, 400, "Bad Request")
                host, port, to_client, to_server = host.strip("[]"), int(port), \
                    b"HTTP/1.1 200 Connection established\r\n\r\n", rest
            else:  # http: the request in origin form, for this one exchange
                url = urlsplit(target)
                try:
                    host, port = url.hostname, url.port or 80
                except ValueError:
                    host = None
                if url.scheme != "http" or not host:
                    return self._reply(client, 400, "Bad Request")
                path = (url.path or "/") + (f"?{url.query}" if url.query else "")
                kept = [line for line in lines[1:] if not line.lower().startswith(
                    (b"proxy-", b"connection:", b"keep-alive:"))]
                to_client = b""
                to_server = b"\r\n".join([f"{method} {path} {version}".encode("latin-1"), *kept,
                                          b"Connection: close", b"", b""]) + rest
            upstream = self._connect(client, host, port)
            if upstream is None:
                return None
            try:
                if to_client:
                    client.sendall(to_client)
                if to_server:
                    upstream.sendall(to_server)
                self._pipe(client, upstream)
            finally:
                self._untrack(upstream)
        except OSError:
            return None
        finally:
            self._untrack(client)

    def _connect(self, client: socket.socket, host: str, port: int) -> socket.socket | None:
        """A connection to host:port at an address that was checked, or None (answered already)."""
        infos = resolve(host, port)
        if not infos:
            self._reply(client, 502, "Bad Gateway")
            return None
        if not all(self.allow(info[4][0], port) for info in infos):
            self.refused = True  # every address of the name is checked, so none of them is tried
            self._reply(client, 403, "Forbidden")
            return None
        for family, kind, proto, _, address in infos:
            upstream = socket.socket(family, kind, proto)
            upstream.settimeout(self.timeout)
            try:
                upstream.connect(address)
            except OSError:
                upstream.close()
                continue
            self._track(upstream)
            return upstream
        self._reply(client, 502, "Bad Gateway")
        return None

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy both ways until the server is done (or nothing moves for `timeout` seconds). A client
        that is done sending may still read; once the server is done the exchange is over, so a
        reused connection never carries a second request to another host."""
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(client, selectors.EVENT_READ, upstream)
                sel.register(upstream, selectors.EVENT_READ, client)
                while sel.get_map():
                    events = sel.select(self.timeout)
                    if not events:
                        return
                    for key, _ in events:
                        source, dest = key.fileobj, key.data
                        data = source.recv(65536)
                        if data:
                            dest.sendall(data)
                        elif source is upstream:
                            return
                        else:
                            sel.unregister(source)
                            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            return

    @staticmethod
    def _reply(client: socket.socket, status: int, reason: str) -> None:
        with contextlib.suppress(OSError):
            client.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)

    def _untrack(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(s)
        with contextlib.suppress(OSError):
            s.close()
