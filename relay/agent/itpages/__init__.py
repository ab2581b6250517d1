"""The IT pages on the agent's internal listener (issue 15): devices, enrollment codes,
revocation and the audit trail in a browser, server-rendered (aiohttp, no JavaScript).

settings (the `it_pages:` config section), passwords (the local scrypt admin file), auth
(the Authenticator protocol, its directory and file back-ends, the failed-login limiter),
sessions, html (escaping by default), views (the pages), auditview (filtered, bounded
reading of the trail), app (routes, CSRF, cookies), server (the listener).
"""
