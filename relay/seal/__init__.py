"""The sealed session (DESIGN.md section 10): TLS 1.3 between device and agent, inside
one relay stream that the gateway splices without being able to read or forge it.

- `core`: sans-I/O TLS over memory BIOs (bytes in, events out, bytes to send).
- `policy`: the TLS contexts and who may be at the other end (role, site, revocation).
- `transport`: the asyncio adapter that runs the relay/proto `Link` over a sealed stream.
"""
