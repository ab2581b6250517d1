"""Who is who: the PKI, SPIFFE identities, enrollment codes, revocation messages, and the
device side of enrollment and renewal."""
