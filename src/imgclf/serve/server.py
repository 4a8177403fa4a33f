"""Running the app on a socket (``imgclf serve``).

The port is bound before anything is printed, so a port in use is a one-line
error (exit 2), not a message after "Serving on". uvicorn then serves on that
socket with a cap on connections and a keep-alive timeout, its own answers in
JSON like the app's (:mod:`imgclf.serve.protocol`); the app itself times out
request bodies that stop arriving.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from imgclf.errors import OptionError

#: Host names a server bound to loopback answers to (any port).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Connections (and requests in progress) beyond this get 503 at once.
MAX_CONNECTIONS = 256
#: Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_TIMEOUT = 5


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (every address it names is loopback)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def resolve_host(host: str, port: int) -> tuple:
    """``host:port`` as ``getaddrinfo`` gives it, or a one-line :class:`OptionError`: checked
    first, so a typo is not met with a request for an API key a public address would need."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn: "localhost" is 127.0.0.1
    try:
        return socket.getaddrinfo(host.strip("[]"), port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise OptionError(f"--host {host}: not an address or a name this machine can resolve ({e})") from None


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or a one-line :class:`OptionError`."""
    family, kind, proto, _, address = resolve_host(host, port)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OptionError(f"port {port} on {host} is already in use; stop what uses it or pick another "
                              "with --port") from None  # fmt: skip
        if e.errno == errno.EACCES:
            raise OptionError(f"not allowed to listen on port {port} (ports below 1024 need privileges); "
                              "pick another with --port") from None  # fmt: skip
        raise OptionError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def make_server(app, *, log_level: str = "warning", max_connections: int = MAX_CONNECTIONS):
    """The uvicorn server for ``app``: at most ``max_connections`` connections, idle ones closed
    after :data:`KEEP_ALIVE_TIMEOUT` seconds, and uvicorn's own answers (a request it cannot
    parse, a connection over the limit) in JSON (:mod:`imgclf.serve.protocol`)."""
    import uvicorn

    from imgclf.serve.protocol import protocol_class

    # uvicorn answers 503 once its connections reach the limit, the new one counted: + 1 serves 256
    config = uvicorn.Config(app, log_level=log_level, limit_concurrency=max_connections + 1,
                            timeout_keep_alive=KEEP_ALIVE_TIMEOUT, http=protocol_class(),
                            access_log=False)  # fmt: skip
    return uvicorn.Server(config)


def run_server(app, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve ``app`` on the bound ``sock`` until interrupted (Ctrl-C during the warm-up too)."""
    server = make_server(app, log_level=log_level)
    app.state.serve.stopping = lambda: server.should_exit
    server.run(sockets=[sock])
