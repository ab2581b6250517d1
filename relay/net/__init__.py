"""The asyncio side of the tunnel: links and streams over TLS, dialling, backoff, TCP splice
and stream compression. `aio` is the only module where sockets meet `relay.proto`."""
